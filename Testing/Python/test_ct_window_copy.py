"""The smaller copies docs/device_training.md sends to a lent GPU train on exactly the same prepared
cases: a CT clipped to its task's window and stored as int16 (32 MB for the 25 sarcoma CTs against
63 MB), an MR of whole numbers stored as int16."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from MultiTaskSegLib.datasets import CaseFiles, prepare_case
from MultiTaskSegLib.tasks import LabelSpace, get_task


def test_a_ct_clipped_to_the_task_window_prepares_the_same_case(tmp_path):
    task = get_task("sarcoma_ct")
    low, high = (task.normalization_parameters[key] for key in ("low", "high"))
    rng = np.random.default_rng(0)
    hounsfield = rng.integers(-1000, 1400, (12, 40, 36)).astype(np.float32)  # air to bone, as the IBSI copies
    labels = np.zeros(hounsfield.shape, np.uint8)
    labels[4:8, 10:30, 12:24] = 1
    for array, name in ((hounsfield, "original.nii.gz"), (labels, "label.nii.gz")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.98, 0.98, 3.27))
        image.SetOrigin((-20.0, 5.0, 40.0))
        sitk.WriteImage(image, str(tmp_path / name))
    original = sitk.ReadImage(str(tmp_path / "original.nii.gz"))
    sitk.WriteImage(sitk.Cast(sitk.Clamp(original, lowerBound=low, upperBound=high), sitk.sitkInt16),
                    str(tmp_path / "clipped.nii.gz"))

    label_space = LabelSpace.from_names(["sarcoma_ct"])
    prepared = [prepare_case(CaseFiles("sarcoma_ct", "P", tmp_path / name, tmp_path / "label.nii.gz"), label_space)
                for name in ("original.nii.gz", "clipped.nii.gz")]
    assert (tmp_path / "clipped.nii.gz").stat().st_size < (tmp_path / "original.nii.gz").stat().st_size
    np.testing.assert_array_equal(prepared[0].image, prepared[1].image)
    np.testing.assert_array_equal(prepared[0].foreground, prepared[1].foreground)
    np.testing.assert_array_equal(prepared[0].labels, prepared[1].labels)
    assert prepared[0].labels.any() and not prepared[0].foreground.all()


def test_an_mr_of_whole_numbers_stored_as_int16_prepares_the_same_case(tmp_path):
    """The sarcoma T1 MRs hold whole numbers (0 to 2,062) in float32; docs/device_training.md sends them
    as int16 (47 MB against 56 MB), which must train on exactly the same prepared case."""
    rng = np.random.default_rng(1)
    intensities = rng.integers(0, 2063, (12, 40, 36)).astype(np.float32)
    labels = np.zeros(intensities.shape, np.uint8)
    labels[4:8, 10:30, 12:24] = 1
    for array, name in ((intensities, "original.nii.gz"), (labels, "label.nii.gz")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.98, 0.98, 3.27))
        sitk.WriteImage(image, str(tmp_path / name))
    sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(tmp_path / "original.nii.gz")), sitk.sitkInt16),
                    str(tmp_path / "int16.nii.gz"))

    label_space = LabelSpace.from_names(["sarcoma_t1_mri"])
    prepared = [prepare_case(CaseFiles("sarcoma_t1_mri", "P", tmp_path / name, tmp_path / "label.nii.gz"), label_space)
                for name in ("original.nii.gz", "int16.nii.gz")]
    assert sitk.ReadImage(str(tmp_path / "int16.nii.gz")).GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(prepared[0].image, prepared[1].image)
    np.testing.assert_array_equal(prepared[0].foreground, prepared[1].foreground)
    np.testing.assert_array_equal(prepared[0].labels, prepared[1].labels)
