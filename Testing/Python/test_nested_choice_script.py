"""scripts/nested_choice.py: a variant chosen on the other folds' patients, never on the fold it judges."""

from __future__ import annotations

import csv
import subprocess
import sys

from conftest import PROJECT_ROOT, write_evaluation

SCRIPT = PROJECT_ROOT / "scripts" / "nested_choice.py"


def run(tmp_path, *arguments):
    out, table = tmp_path / "nested.md", tmp_path / "nested.csv"
    result = subprocess.run([sys.executable, str(SCRIPT), "--task", "sarcoma_t1_mri", *arguments,
                             "--out", str(out), "--table", str(table)], capture_output=True, text=True, encoding="utf-8",
                            cwd=PROJECT_ROOT)
    return result, (out.read_text(encoding="utf-8") if out.exists() else ""), table


def test_each_fold_is_judged_at_the_variant_best_on_the_other_folds(tmp_path):
    # "fine" wins folds 1 and 2 by far and loses fold 3 a little: chosen by the other folds for fold 3
    # as well, fold 3 is judged at "fine" even though "coarse" is better there (no peeking at fold 3).
    coarse = [write_evaluation(tmp_path / f"coarse{k}", scores) for k, scores in
              enumerate([{"P1": 0.5, "P2": 0.5}, {"P3": 0.5}, {"P4": 0.6, "P5": 0.6}], start=1)]
    fine = [write_evaluation(tmp_path / f"fine{k}", scores) for k, scores in
            enumerate([{"P1": 0.8, "P2": 0.8}, {"P3": 0.7}, {"P4": 0.55, "P5": 0.55}], start=1)]

    result, report, table = run(tmp_path, "--variant", "coarse", *map(str, coarse), "--variant", "fine", *map(str, fine))

    assert result.returncode == 0, result.stderr
    rows = [line for line in report.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[-3] for row in rows] == ["fine", "fine", "fine"]
    with open(table, encoding="utf-8") as handle:
        nested = {row["case"]: float(row["dice"]) for row in csv.DictReader(handle)}
    assert nested == {"P1": 0.8, "P2": 0.8, "P3": 0.7, "P4": 0.55, "P5": 0.55}
    assert "paired **+0.140**" in report  # (0.3 + 0.3 + 0.2 - 0.05 - 0.05) / 5 against coarse throughout


def test_a_fold_is_not_chosen_for_by_itself(tmp_path):
    # "fine" is better only on fold 1, by enough to win the pooled mean: fold 1 still gets "coarse",
    # the choice of the other folds, while a final model (all folds) takes "fine".
    coarse = [write_evaluation(tmp_path / f"coarse{k}", {f"P{k}": 0.5}) for k in (1, 2, 3)]
    fine = [write_evaluation(tmp_path / f"fine{k}", {f"P{k}": score}) for k, score in zip((1, 2, 3), (0.95, 0.45, 0.45))]

    result, report, _ = run(tmp_path, "--variant", "coarse", *map(str, coarse), "--variant", "fine", *map(str, fine))

    assert result.returncode == 0, result.stderr
    rows = [line for line in report.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert rows[0].split(" | ")[-3] == "coarse"
    assert "chosen **fine**" in report


def test_variants_over_different_patients_are_refused(tmp_path):
    first = [write_evaluation(tmp_path / f"a{k}", {f"P{k}": 0.5}) for k in (1, 2)]
    second = [write_evaluation(tmp_path / "b1", {"P1": 0.6}), write_evaluation(tmp_path / "b2", {"P9": 0.6})]

    result, _, _ = run(tmp_path, "--variant", "a", *map(str, first), "--variant", "b", *map(str, second))

    assert result.returncode != 0
    assert "fold 2: variant b judges other patients" in result.stderr
