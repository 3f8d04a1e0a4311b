"""scripts/study_tumour_postprocessing.py: held-out Dice rescored from saved probabilities, counted per scan and patient."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import SimpleITK as sitk

from conftest import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "scripts" / "study_tumour_postprocessing.py"
SHAPE = (8, 16, 16)


def tumour(*islands: bool) -> np.ndarray:
    """A box (216 voxels), plus a small far island (8 voxels) when asked."""
    mask = np.zeros(SHAPE, bool)
    mask[2:8, 3:9, 3:9] = True
    if any(islands):
        mask[2:4, 12:14, 12:14] = True
    return mask


def write_image(array: np.ndarray, path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.8, 3.3))
    sitk.WriteImage(image, str(path))


def write_evaluation(root, name: str, task: str, model: str, mirror: bool, cases: dict) -> str:
    """An evaluation folder as ``evaluate_tumour.py --save-probabilities`` writes it; ``cases`` maps a
    patient to (predicted mask, reference mask); the prediction is saved as probability 0.9."""
    case_folder, evaluation = root / f"cases_{task}", root / name
    evaluation.mkdir(parents=True)
    for case, (predicted, reference) in cases.items():
        (case_folder / case).mkdir(parents=True, exist_ok=True)
        write_image(np.full(SHAPE, 40, np.int16), case_folder / case / "image.nii.gz")
        write_image(reference.astype(np.uint8), case_folder / case / "label.nii.gz")
        write_image(np.where(predicted, 0.9, 0.05).astype(np.float32), evaluation / f"{case}_probabilities.nii.gz")
    (evaluation / "probabilities.json").write_text(json.dumps(
        {"model": model, "cases": str(case_folder), "task": task, "operating_point": 0.35, "mirror": mirror}))
    return str(evaluation)


def study(tmp_path, *folders) -> str:
    out = tmp_path / "report.md"
    result = subprocess.run([sys.executable, str(SCRIPT), *folders, "--out", str(out)],
                            capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stderr
    return out.read_text(encoding="utf-8")


def test_one_models_mr_and_ct_of_a_patient_are_two_scans_resampled_together(tmp_path):
    """A model of both modalities judged on the same patients: P1's MR and CT are both paired, and the
    bootstrap draws a patient with both scans (here they move in opposite ways, so every resample is 0)."""
    joint = "runs/joint/model"
    mr = write_evaluation(tmp_path, "evaluation_mr", "sarcoma_t1_mri", joint, False, {
        "P1": (tumour(True), tumour(True)),   # the island is tumour: keeping all regions gains
        "P2": (tumour(), tumour())})
    ct = write_evaluation(tmp_path, "evaluation_ct", "sarcoma_ct", joint, False, {
        "P1": (tumour(True), tumour())})      # the island is not: keeping all regions loses as much
    report = study(tmp_path, mr, ct)

    assert "paired per scan over 3 scans of 2 patients, 1 model(s)" in report
    row = next(line for line in report.splitlines() if line.startswith("| operating point | all | no |"))
    assert "+0.000 (+0.000 to +0.000) | 1 / 1 |" in row


def test_a_scan_judged_in_one_pass_and_mirrored_is_counted_once_per_pass(tmp_path):
    model = "runs/fold1/mr/model"
    cases = {"P1": (tumour(), np.roll(tumour(), 8, axis=2)), "P2": (tumour(), tumour())}  # P1 missed: Dice 0
    one_pass = write_evaluation(tmp_path, "fold1/mr/evaluation_no-mirror", "sarcoma_t1_mri", model, False, cases)
    mirrored = write_evaluation(tmp_path, "fold1/mr/evaluation_mirror", "sarcoma_t1_mri", model, True, cases)
    report = study(tmp_path, one_pass, mirrored)

    assert report.startswith("Held-out scans: 2 (2 patients) from ")
    for mirroring in ("no", "yes"):
        row = next(line for line in report.splitlines() if line.startswith(f"| operating point | {mirroring} |"))
        assert row.count("0.500 (1)") == 4  # every rule, per pass: P1 0, P2 1; one patient below 0.1, not two
    assert "| fold1/mr | yes | P1 | 0.000 |" in report and "| fold1/mr | no | P1 | 0.000 |" in report


def test_the_unsure_rule_takes_the_faint_region_only_where_the_network_is_nowhere_sure(tmp_path):
    """P1's tumour is faint (0.2) but for a core of 0.6: at the operating point (0.35) only the core
    passes, the unsure rule takes the whole box; P2 is predicted surely (0.9) and stays as it is."""
    folder = write_evaluation(tmp_path, "fold1/mr/evaluation_no-mirror", "sarcoma_t1_mri", "runs/fold1/mr/model", False,
                              {"P1": (tumour(), tumour()), "P2": (tumour(), tumour())})
    faint = np.where(tumour(), 0.2, 0.01).astype(np.float32)
    faint[4:6, 5:7, 5:7] = 0.6  # 8 of the box's 216 voxels
    write_image(faint, tmp_path / "fold1/mr/evaluation_no-mirror/P1_probabilities.nii.gz")
    report = study(tmp_path, folder)
    row = next(line for line in report.splitlines() if line.startswith("| fold1/mr | no | P1 |"))
    assert row == f"| fold1/mr | no | P1 | {2 * 8 / 224:.3f} | {2 * 8 / 224:.3f} | {2 * 8 / 224:.3f} | 1.000 |"
    assert "| fold1/mr | no | P2 | 1.000 | 1.000 | 1.000 | 1.000 |" in report
