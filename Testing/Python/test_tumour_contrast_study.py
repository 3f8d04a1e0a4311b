"""scripts/study_tumour_contrast.py: per-patient volume, contrast and separability, and their correlation with Dice."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "scripts"))
from study_tumour_contrast import average_ranks, separability, spearman  # noqa: E402

SCRIPT = PROJECT_ROOT / "scripts" / "study_tumour_contrast.py"


def write_case(folder, tumour_value: float, half_size: int, seed: int) -> None:
    """Muscle (40 HU, noise sd 5) around a box-shaped tumour of the given mean, fat (-120 HU) at one edge."""
    rng = np.random.default_rng(seed)
    image = rng.normal(40.0, 5.0, (20, 40, 40))
    image[:, :, :3] = -120.0
    mask = np.zeros(image.shape, np.uint8)
    box = (slice(10 - half_size // 2, 10 + half_size // 2), slice(20 - half_size, 20 + half_size), slice(20 - half_size, 20 + half_size))
    mask[box] = 1
    image[box] = rng.normal(tumour_value, 5.0, image[box].shape)
    folder.mkdir(parents=True)
    for array, name in ((image.astype(np.float32), "CT_image.nii.gz"), (mask, "CT_mask.nii.gz")):
        written = sitk.GetImageFromArray(array)
        written.SetSpacing((1.0, 1.0, 2.0))
        sitk.WriteImage(written, str(folder / name))


def test_ranks_separability_and_spearman_follow_their_definitions():
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]
    assert separability(np.array([5.0, 6.0]), np.array([1.0, 2.0])) == 1.0
    assert separability(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
    rho, p = spearman(np.arange(10.0), np.arange(10.0) ** 2, permutations=2000)
    assert rho == pytest.approx(1.0) and p < 0.01


def test_report_measures_each_patient_and_shows_dice_following_contrast(tmp_path):
    cases = tmp_path / "cases"
    contrasts = [0.0, 10.0, 30.0, 60.0, 90.0, 120.0]
    table = tmp_path / "per_case.csv"
    lines = ["case,task,region,dice"]
    for number, contrast in enumerate(contrasts):
        write_case(cases / f"P{number}", 40.0 + contrast, half_size=4 + number % 2 * 2, seed=number)
        lines.append(f"P{number},sarcoma_ct,Sarcoma,{0.1 + contrast / 200:.3f}")
    table.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "report.md"
    subprocess.run([sys.executable, str(SCRIPT), str(table), "--cases", str(cases), "--out", str(out)],
                   check=True, capture_output=True, encoding="utf-8")
    report = out.read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| P")}
    assert len(rows) == len(contrasts)
    measured = [float(rows[f"P{n}"].split("|")[4]) for n in range(len(contrasts))]
    assert measured == pytest.approx(contrasts, abs=3.0)
    volumes = {n: float(rows[f"P{n}"].split("|")[2]) for n in (0, 1)}
    assert volumes == {0: pytest.approx(8 * 8 * 4 * 2 / 1000, abs=0.05), 1: pytest.approx(12 * 12 * 6 * 2 / 1000, abs=0.05)}
    assert float(rows["P0"].split("|")[3]) == pytest.approx(8 * 8 / 1600, abs=0.005)  # a box: its slices' share
    assert float(rows["P0"].split("|")[5]) < 0.3 < float(rows["P3"].split("|")[5])
    contrast_row = next(line for line in report.splitlines() if line.startswith("| absolute contrast"))
    assert float(contrast_row.split("|")[2]) == pytest.approx(1.0)
