"""scripts/compare_multitask.py: paired comparisons of held-out figures, the tables behind README's A/Bs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from conftest import PROJECT_ROOT, write_evaluation

SCRIPT = PROJECT_ROOT / "scripts" / "compare_multitask.py"


def compare(tmp_path, *arguments):
    out = tmp_path / "table.md"
    result = subprocess.run([sys.executable, str(SCRIPT), *arguments, "--out", str(out)],
                            capture_output=True, text=True, cwd=PROJECT_ROOT)
    return result, (out.read_text(encoding="utf-8") if out.exists() else "")


def test_folds_given_twice_are_pooled_and_a_card_arm_pairs_by_patient(tmp_path):
    fold1 = write_evaluation(tmp_path / "fold1", {"P1": 0.8, "P2": 0.6})
    fold3 = write_evaluation(tmp_path / "fold3", {"P3": 0.5})
    model = tmp_path / "bundled"
    model.mkdir()
    card = {"cross_validated_dice": {"sarcoma_t1_mri": {"P1": 0.7, "P2": 0.4, "P3": 0.5, "P9": 0.1,
                                                        "mean": 0.43, "sd": 0.2, "median": 0.45}}}
    (model / "model.json").write_text(json.dumps({"card": card}), encoding="utf-8")

    result, table = compare(tmp_path, "--single", f"sarcoma_t1_mri={model}",
                            "--multi", f"sarcoma_t1_mri={fold1}", f"sarcoma_t1_mri={fold3}")

    assert result.returncode == 0, result.stderr
    row = table.splitlines()[-1]
    # P9 is in the card only, so three patients pair: 0.533 against 0.633, each better by 0.1 or equal
    assert "| 3 | 0.533 ± " in row and "| 0.633 ± " in row and "+0.100" in row


@pytest.mark.parametrize("card", [None, {"cross_validated_dice": {}},
                                  {"cross_validated_dice": {"sarcoma_t1_mri": {"mean": 0.6, "sd": 0.2, "median": 0.7}}}])
def test_an_arm_without_figures_is_refused_by_name(tmp_path, card):
    fold1 = write_evaluation(tmp_path / "fold1", {"P1": 0.8})
    model = tmp_path / "bundled"
    model.mkdir()
    if card is not None:
        (model / "model.json").write_text(json.dumps({"card": card}), encoding="utf-8")

    result, _ = compare(tmp_path, "--single", f"sarcoma_t1_mri={model}", "--multi", f"sarcoma_t1_mri={fold1}")

    assert result.returncode != 0
    assert str(model) in result.stderr and ("per_case.csv" in result.stderr or "cross_validated_dice" in result.stderr)
    assert "Traceback" not in result.stderr


def test_arms_without_a_shared_patient_are_refused(tmp_path):
    first = write_evaluation(tmp_path / "a", {"P1": 0.8})
    second = write_evaluation(tmp_path / "b", {"P2": 0.7})

    result, _ = compare(tmp_path, "--single", f"sarcoma_t1_mri={first}", "--multi", f"sarcoma_t1_mri={second}")

    assert result.returncode != 0 and "share no case" in result.stderr


def test_a_recorded_table_file_is_an_arm_and_a_missing_one_is_named(tmp_path):
    """The per-patient tables run_sarcoma_folds.py copies into docs/results outlive runs/: they pair as files."""
    recorded = tmp_path / "results" / "fold3_mr_cases_evaluation_no-mirror.csv"
    write_evaluation(tmp_path / "results_source", {"P1": 0.6, "P2": 0.5})
    recorded.parent.mkdir()
    (tmp_path / "results_source" / "per_case.csv").rename(recorded)
    seed1 = write_evaluation(tmp_path / "seed1", {"P1": 0.7, "P2": 0.6})

    result, table = compare(tmp_path, "--single", f"sarcoma_t1_mri={recorded}", "--multi", f"sarcoma_t1_mri={seed1}")
    assert result.returncode == 0, result.stderr
    assert "| 2 | 0.550 ± " in table.splitlines()[-1] and "+0.100" in table.splitlines()[-1]

    missing = recorded.with_name("fold1_mr_cases_evaluation_no-mirror.csv")
    result, _ = compare(tmp_path, "--single", f"sarcoma_t1_mri={missing}", "--multi", f"sarcoma_t1_mri={seed1}")
    assert result.returncode != 0 and str(missing) in result.stderr and "Traceback" not in result.stderr


def test_a_case_pooled_twice_into_one_arm_is_refused_by_name(tmp_path):
    """Overlapping folds (or one folder given twice) would pair one figure of the case silently."""
    fold1 = write_evaluation(tmp_path / "fold1", {"P1": 0.8, "P2": 0.6})
    fold2 = write_evaluation(tmp_path / "fold2", {"P2": 0.2, "P3": 0.5})
    other = write_evaluation(tmp_path / "other", {"P1": 0.7, "P2": 0.5, "P3": 0.4})

    result, _ = compare(tmp_path, "--single", f"sarcoma_t1_mri={other}",
                        "--multi", f"sarcoma_t1_mri={fold1}", f"sarcoma_t1_mri={fold2}")

    assert result.returncode != 0 and "case P2" in result.stderr and "second arm" in result.stderr
    assert "Traceback" not in result.stderr
