"""The smaller copies docs/device_training.md sends to a lent GPU train on exactly the same prepared
cases: a CT clipped to its task's window and stored as int16 (32 MB for the 25 sarcoma CTs against
63 MB), an MR of whole numbers stored as int16."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from MultiTaskSegLib.datasets import CaseFiles, prepare_case
from MultiTaskSegLib.tasks import LabelSpace, get_task


def write_case(folder, intensities):
    """``original.nii.gz`` (float32) and ``label.nii.gz`` (a box of tumour) on a sarcoma crop's grid."""
    labels = np.zeros(intensities.shape, np.uint8)
    labels[4:8, 10:30, 12:24] = 1
    for array, name in ((intensities, "original.nii.gz"), (labels, "label.nii.gz")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.98, 0.98, 3.27))
        image.SetOrigin((-20.0, 5.0, 40.0))
        sitk.WriteImage(image, str(folder / name))


def assert_same_prepared_case(folder, task, names):
    """The training cases the trainer prepares from the two image files (same label) are equal; the first."""
    label_space = LabelSpace.from_names([task])
    prepared = [prepare_case(CaseFiles(task, "P", folder / name, folder / "label.nii.gz"), label_space) for name in names]
    np.testing.assert_array_equal(prepared[0].image, prepared[1].image)
    np.testing.assert_array_equal(prepared[0].foreground, prepared[1].foreground)
    np.testing.assert_array_equal(prepared[0].labels, prepared[1].labels)
    return prepared[0]


def test_a_ct_clipped_to_the_task_window_prepares_the_same_case(tmp_path):
    task = get_task("sarcoma_ct")
    low, high = (task.normalization_parameters[key] for key in ("low", "high"))
    rng = np.random.default_rng(0)
    write_case(tmp_path, rng.integers(-1000, 1400, (12, 40, 36)).astype(np.float32))  # air to bone, as the IBSI copies
    original = sitk.ReadImage(str(tmp_path / "original.nii.gz"))
    sitk.WriteImage(sitk.Cast(sitk.Clamp(original, lowerBound=low, upperBound=high), sitk.sitkInt16),
                    str(tmp_path / "clipped.nii.gz"))

    prepared = assert_same_prepared_case(tmp_path, "sarcoma_ct", ("original.nii.gz", "clipped.nii.gz"))
    assert (tmp_path / "clipped.nii.gz").stat().st_size < (tmp_path / "original.nii.gz").stat().st_size
    assert prepared.labels.any() and not prepared.foreground.all()


def test_an_mr_of_whole_numbers_stored_as_int16_prepares_the_same_case(tmp_path):
    """The sarcoma T1 MRs hold whole numbers (0 to 2,062) in float32; docs/device_training.md sends them
    as int16 (47 MB against 56 MB), which must train on exactly the same prepared case."""
    rng = np.random.default_rng(1)
    write_case(tmp_path, rng.integers(0, 2063, (12, 40, 36)).astype(np.float32))
    sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(tmp_path / "original.nii.gz")), sitk.sitkInt16),
                    str(tmp_path / "int16.nii.gz"))

    assert sitk.ReadImage(str(tmp_path / "int16.nii.gz")).GetPixelID() == sitk.sitkInt16
    assert_same_prepared_case(tmp_path, "sarcoma_t1_mri", ("original.nii.gz", "int16.nii.gz"))
