"""scripts/study_planes.py: each plane of a multiplanar model alone and every subset, judged on held-out cases."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "scripts"))
from study_planes import plane_probabilities, report, study_model  # noqa: E402

from MultiTaskSegLib.evaluation import dice  # noqa: E402
from MultiTaskSegLib.inference import segment_image  # noqa: E402
from MultiTaskSegLib.model_files import load_model, save_model  # noqa: E402
from MultiTaskSegLib.training import TrainingConfig, train  # noqa: E402

TINY = {"channels": [4, 8], "patch_size": [32, 32], "mixed_precision": False, "whole_slice_inference": True}


def _write_crop(folder, seed: int) -> None:
    """A sarcoma-like crop on the task's 1.5 mm grid: a bright ellipsoid in textured tissue."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:20, :28, :28]
    tumour = ((z - 10) / 5.0) ** 2 + ((y - 14 - seed % 3) / 7.0) ** 2 + ((x - 13) / 6.0) ** 2 <= 1
    image = 100 + 10 * rng.standard_normal(tumour.shape) + 60 * tumour
    folder.mkdir(parents=True)
    for name, array in (("image", image.astype(np.float32)), ("label", tumour.astype(np.uint8))):
        volume = sitk.GetImageFromArray(array)
        volume.SetSpacing((1.5, 1.5, 1.5))
        sitk.WriteImage(volume, str(folder / f"{name}.nii.gz"))


@pytest.fixture(scope="module")
def fold(tmp_path_factory):
    root = tmp_path_factory.mktemp("planes")
    for number in range(3):
        _write_crop(root / "train" / f"STS_{number:03d}", number)
    _write_crop(root / "held_out" / "STS_100", 7)
    config = TrainingConfig(tasks=["sarcoma_t1_mri"], architecture="unet2d_multiplanar", arguments=TINY,
                            batch_size=4, steps=4, validate_every=4, validation_fraction=0.0, device="cpu",
                            data={"sarcoma_t1_mri": str(root / "train")})
    save_model(train(config, root / "run", log=lambda message: None), root / "model")
    return root


def test_the_all_plane_row_is_the_models_own_segmentation(fold):
    rows = study_model(fold / "model", fold / "held_out", "sarcoma_t1_mri")
    by_planes = {row["planes"]: row["dice"] for row in rows}
    assert list(by_planes) == ["axial", "coronal", "sagittal", "axial+coronal", "axial+sagittal",
                               "coronal+sagittal", "axial+coronal+sagittal"]
    model = load_model(fold / "model")
    image = sitk.ReadImage(str(fold / "held_out" / "STS_100" / "image.nii.gz"))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(fold / "held_out" / "STS_100" / "label.nii.gz"))) > 0
    own = sitk.GetArrayFromImage(segment_image(model, [image], ["sarcoma_t1_mri"], "cpu", mirror=False).labels) > 0
    assert own.any() and 0 < by_planes["axial+coronal+sagittal"] < 1  # a real comparison, not two empty masks
    assert by_planes["axial+coronal+sagittal"] == pytest.approx(dice(own, reference), abs=1e-3)


def test_one_plane_is_predicted_and_the_model_keeps_its_planes(fold):
    model = load_model(fold / "model")
    image = sitk.ReadImage(str(fold / "held_out" / "STS_100" / "image.nii.gz"))
    axial, sagittal = (plane_probabilities(model, image, "sarcoma_t1_mri", plane) for plane in (0, 2))
    assert axial.shape == sitk.GetArrayFromImage(image).shape
    assert not np.allclose(axial, sagittal, atol=1e-4)
    assert tuple(model.architecture.config.planes) == (0, 1, 2)


def test_the_report_pairs_every_subset_with_all_planes():
    rows = [{"model": "m", "case": case, "planes": planes, "dice": value}
            for case, values in (("a", (0.5, 0.7)), ("b", (0.2, 0.6)))
            for planes, value in zip(("axial", "axial+coronal+sagittal"), values)]
    text = report(rows)
    assert "| axial | 0.350 | -0.300" in text
    assert "| axial+coronal+sagittal | 0.650 | +0.000" in text


def test_a_model_that_is_not_multiplanar_is_refused_by_name(tmp_path):
    from conftest import make_tiny_model
    save_model(make_tiny_model(["sarcoma_t1_mri"]), tmp_path / "triplanar")
    completed = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "study_planes.py"), "--model",
                                str(tmp_path / "triplanar"), "--cases", str(tmp_path), "--task", "sarcoma_t1_mri",
                                "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert completed.returncode != 0
    assert "needs unet2d_multiplanar" in completed.stderr
