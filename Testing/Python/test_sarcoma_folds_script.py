"""scripts/run_sarcoma_folds.py: a rerun skips what is finished and keeps every per-patient table in the repository."""

from __future__ import annotations

import subprocess
import sys

from conftest import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "scripts" / "run_sarcoma_folds.py"


def finished_run(fold, run, case):
    """A run folder whose network and its held-out evaluation are done (as a previous run leaves them)."""
    (fold / run / "model").mkdir(parents=True)
    (fold / run / "model" / "model.json").write_text("{}", encoding="utf-8")
    (fold / run / "evaluation_no-mirror").mkdir()
    (fold / run / "evaluation_no-mirror" / "per_case.csv").write_text(
        f"case,task,region,dice\n{case},sarcoma_t1_mri,tumour,0.7\n", encoding="utf-8")


def finished_fold(root, number):
    """A fold whose MR network (by cases) is trained and evaluated."""
    fold = root / f"fold{number}"
    finished_run(fold, "mr_cases", f"STS_00{number}")
    (fold / "fold.json").write_text("{}", encoding="utf-8")


def test_finished_steps_are_skipped_and_their_tables_recorded(tmp_path):
    for number in (1, 2):
        finished_fold(tmp_path / "runs", number)
    record = tmp_path / "record"

    result = subprocess.run([sys.executable, str(SCRIPT), "--root", str(tmp_path / "runs"), "--folds", "1", "2",
                             "--steps", "mr", "--sampling", "cases", "--no-mirrored-evaluations", "--record", str(record)],
                            capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)

    assert result.returncode == 0, result.stderr
    assert "$ " not in result.stdout  # nothing trained or evaluated again
    assert sorted(path.name for path in record.iterdir()) == ["fold1_mr_cases_evaluation_no-mirror.csv",
                                                             "fold2_mr_cases_evaluation_no-mirror.csv"]
    assert "STS_002" in (record / "fold2_mr_cases_evaluation_no-mirror.csv").read_text(encoding="utf-8")


def test_a_folder_that_is_not_a_fold_is_refused_by_name(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--root", str(tmp_path), "--folds", "1"],
                            capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)

    assert result.returncode != 0
    assert "fold1" in result.stderr and "prepare_tumour_data.py" in result.stderr


def test_a_variant_is_named_and_its_table_recorded_beside_the_recipe(tmp_path):
    finished_fold(tmp_path / "runs", 3)
    finished_run(tmp_path / "runs" / "fold3", "mr_cases_scale0.7-1.4", "STS_035")
    record = tmp_path / "record"

    result = subprocess.run([sys.executable, str(SCRIPT), "--root", str(tmp_path / "runs"), "--folds", "3",
                             "--steps", "mr", "--sampling", "cases", "--variant", "scale0.7-1.4", "--train-arg",
                             'augmentation={"scale_low": 0.7}', "--no-mirrored-evaluations", "--record", str(record)],
                            capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)

    assert result.returncode == 0, result.stderr
    assert "$ " not in result.stdout
    assert [path.name for path in record.iterdir()] == ["fold3_mr_cases_scale0.7-1.4_evaluation_no-mirror.csv"]
    assert "STS_035" in (record / "fold3_mr_cases_scale0.7-1.4_evaluation_no-mirror.csv").read_text(encoding="utf-8")


def test_a_variant_without_its_arguments_or_over_both_steps_is_refused(tmp_path):
    finished_fold(tmp_path / "runs", 3)
    base = [sys.executable, str(SCRIPT), "--root", str(tmp_path / "runs"), "--folds", "3", "--variant", "wide"]

    without_arguments = subprocess.run(base + ["--steps", "mr"], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    both = subprocess.run(base + ["--train-arg", "x=1"], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)

    assert without_arguments.returncode != 0 and "--train-arg" in without_arguments.stderr
    assert both.returncode != 0 and "one step" in both.stderr


def test_a_ct_variant_starts_from_the_recipes_mr_network(tmp_path):
    """The variant changes the CT training only: its MR network is the fold's recipe network, not a variant's."""
    finished_fold(tmp_path / "runs", 3)
    fold = (tmp_path / "runs" / "fold3").resolve()

    result = subprocess.run([sys.executable, str(SCRIPT), "--root", str(tmp_path / "runs"), "--folds", "3",
                             "--steps", "ct_from_mr", "--sampling", "cases", "--variant", "wide", "--train-arg",
                             'augmentation={"scale_low": 0.7}', "--no-mirrored-evaluations",
                             "--record", str(tmp_path / "record")],
                            capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)

    command = next(line for line in result.stdout.splitlines() if line.startswith("$ "))
    assert f"--out {fold / 'ct_from_mr_cases_wide'} " in command
    assert f"--init-from {fold / 'mr_cases' / 'model'}" in command
    assert "--arg augmentation={\"scale_low\": 0.7}" in command
    assert result.returncode != 0  # the fold has no CT training cases here: the trainer refuses, nothing is made


def test_a_working_spacing_variant_passes_the_spacing_for_the_steps_task(tmp_path):
    finished_fold(tmp_path / "runs", 3)
    base = [sys.executable, str(SCRIPT), "--root", str(tmp_path / "runs"), "--folds", "3", "--steps", "ct_from_mr",
            "--sampling", "cases", "--working-spacing", "1.0", "--no-mirrored-evaluations", "--record", str(tmp_path / "record")]

    unnamed = subprocess.run(base, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    named = subprocess.run(base + ["--variant", "1mm"], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)

    assert unnamed.returncode != 0 and "--working-spacing" in unnamed.stderr and "--variant" in unnamed.stderr
    command = next(line for line in named.stdout.splitlines() if line.startswith("$ "))
    assert "--working-spacing sarcoma_ct=1.0" in command
    assert f"--out {(tmp_path / 'runs' / 'fold3').resolve() / 'ct_from_mr_cases_1mm'} " in command


def test_longer_training_on_another_device_is_a_named_variant(tmp_path):
    """--mini-batches changes the recipe (its cosine cycle too), so it needs a variant name; --device is
    passed to the trainer (and the evaluation), e.g. for a longer run on a lent GPU."""
    finished_fold(tmp_path / "runs", 3)
    base = [sys.executable, str(SCRIPT), "--root", str(tmp_path / "runs"), "--folds", "3", "--steps", "mr",
            "--sampling", "cases", "--mini-batches", "12000", "--no-mirrored-evaluations", "--record", str(tmp_path / "record")]

    unnamed = subprocess.run(base, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    named = subprocess.run(base + ["--variant", "long12k", "--device", "cuda"], capture_output=True, text=True,
                           cwd=PROJECT_ROOT, timeout=120)

    assert unnamed.returncode != 0 and "--mini-batches" in unnamed.stderr and "--variant" in unnamed.stderr
    command = next(line for line in named.stdout.splitlines() if line.startswith("$ "))
    fold = (tmp_path / "runs" / "fold3").resolve()
    assert f"--out {fold / 'mr_cases_long12k'} " in command
    assert "--arg steps_per_epoch=12000 --steps 12000 --device cuda" in command
    assert named.returncode != 0  # the fold has no MR training cases here: the trainer refuses, nothing is made


def test_training_only_on_a_lent_gpu_checkpoints_often_and_evaluates_nothing(tmp_path):
    """--no-evaluate --checkpoint-minutes: the GPU call trains (checkpointing often, as the call may be
    cut) and leaves the judging to the same command here; a finished network is then neither trained
    nor judged, and no table is recorded."""
    finished_fold(tmp_path / "runs", 3)
    record = tmp_path / "record"
    base = [sys.executable, str(SCRIPT), "--root", str(tmp_path / "runs"), "--steps", "mr", "--sampling", "cases",
            "--no-evaluate", "--checkpoint-minutes", "1", "--record", str(record)]
    (tmp_path / "runs" / "all").mkdir()

    finished = subprocess.run(base + ["--folds", "3"], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    final_only = subprocess.run(base + ["--folds", "--final"], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    no_fold = subprocess.run(base + ["--folds"], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)

    assert finished.returncode == 0, finished.stderr
    assert "$ " not in finished.stdout and not record.exists()
    command = next(line for line in final_only.stdout.splitlines() if line.startswith("$ "))
    assert f"--out {(tmp_path / 'runs' / 'all').resolve() / 'mr_cases'} " in command
    assert command.endswith("--checkpoint-minutes 1.0")
    assert final_only.returncode != 0  # no MR training cases under all/: the trainer refuses, nothing is made
    assert no_fold.returncode != 0 and "--final" in no_fold.stderr
