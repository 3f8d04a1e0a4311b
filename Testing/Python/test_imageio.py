"""Reading and writing keep geometry; bad input is refused with a message that says what to do."""

import numpy as np
import pytest
import SimpleITK as sitk

from MultiTaskSegLib import imageio
from MultiTaskSegLib.errors import InputError
from MultiTaskSegLib.geometry import same_geometry
from MultiTaskSegLib.imageio import read_image, write_image


def volume(shape=(12, 14, 16), dtype=np.float32) -> sitk.Image:
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.normal(100, 20, shape).astype(dtype))
    image.SetSpacing((0.7, 0.8, 2.0))
    image.SetOrigin((-3.0, 4.0, 5.5))
    image.SetDirection(sitk.VersorTransform((1, 1, 0), 0.4).GetMatrix())
    return image


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_round_trip_keeps_values_and_geometry(tmp_path, suffix):
    image = volume()
    path = write_image(image, tmp_path / f"scan{suffix}")
    loaded = read_image(path)
    assert same_geometry(loaded, image, tolerance=1e-5)
    assert np.array_equal(sitk.GetArrayViewFromImage(loaded), sitk.GetArrayViewFromImage(image))


def write_dicom_series(image: sitk.Image, folder, skip: int | None = None) -> None:
    """One CT file per slice, as a scanner exports them (``skip``: a slice left out)."""
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        if k == skip:
            continue
        slice_k = image[:, :, k]
        slice_k.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))))
        slice_k.SetMetaData("0020|0013", str(k))
        slice_k.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.1")
        slice_k.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        slice_k.SetMetaData("0008|0060", "CT")
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_k)


def test_dicom_series_folder_is_read_as_one_volume(tmp_path):
    image = sitk.Cast(volume(), sitk.sitkInt16)
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_dicom_series(image, tmp_path)
    loaded = read_image(tmp_path)
    assert loaded.GetSize() == image.GetSize()
    assert np.allclose(loaded.GetSpacing(), image.GetSpacing(), atol=1e-3)
    assert np.array_equal(sitk.GetArrayViewFromImage(loaded), sitk.GetArrayViewFromImage(image))


def test_a_dicom_series_with_a_missing_slice_is_refused_not_stretched(tmp_path):
    image = sitk.Cast(volume(), sitk.sitkInt16)
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_dicom_series(image, tmp_path, skip=image.GetDepth() // 2)
    with pytest.raises(InputError, match="not evenly spaced.*a slice missing"):
        read_image(tmp_path)


def test_two_dimensional_image_is_refused(tmp_path):
    path = write_image(sitk.GetImageFromArray(np.arange(64, dtype=np.float32).reshape(8, 8)), tmp_path / "slice.nrrd")
    with pytest.raises(InputError, match="2-D image"):
        read_image(path)


def test_single_slice_volume_is_refused_as_a_single_slice(tmp_path):
    path = write_image(sitk.GetImageFromArray(np.arange(64, dtype=np.float32).reshape(1, 8, 8)), tmp_path / "one.nrrd")
    with pytest.raises(InputError, match="a single slice, a 2-D image, .*segment 3-D volumes"):
        read_image(path)


@pytest.mark.parametrize("shape", [(8, 1, 8), (8, 8, 1)], ids=["one coronal row", "one sagittal column"])
def test_a_single_slice_along_any_axis_is_refused(tmp_path, shape):
    path = write_image(sitk.GetImageFromArray(np.arange(64, dtype=np.float32).reshape(shape)), tmp_path / "one.nrrd")
    with pytest.raises(InputError, match="a single slice, a 2-D image, .*segment 3-D volumes"):
        read_image(path)


def test_a_single_voxel_is_called_what_it_is(tmp_path):
    path = write_image(sitk.GetImageFromArray(np.ones((1, 1, 1), np.float32)), tmp_path / "voxel.nii.gz")
    with pytest.raises(InputError, match="a single voxel"):
        read_image(path)


def test_a_volume_stored_as_a_four_dimensional_series_of_one_is_read_as_that_volume(tmp_path):
    volume = sitk.GetImageFromArray((np.arange(120, dtype=np.float32) % 7 + 1).reshape(4, 5, 6))
    volume.SetSpacing((0.8, 0.9, 2.5))
    path = write_image(sitk.JoinSeries([volume]), tmp_path / "one.nrrd")
    assert sitk.ReadImage(str(path)).GetDimension() == 4
    read = read_image(path)
    assert read.GetDimension() == 3 and read.GetSpacing() == pytest.approx((0.8, 0.9, 2.5))
    assert np.array_equal(sitk.GetArrayViewFromImage(read), sitk.GetArrayViewFromImage(volume))


def test_four_dimensional_image_asks_for_a_channel_and_the_channel_can_be_picked(tmp_path):
    data = np.stack([np.full((4, 5, 6), value, np.float32) + np.arange(6) for value in (1, 2, 3)])
    path = write_image(sitk.JoinSeries([sitk.GetImageFromArray(d) for d in data]), tmp_path / "series.nii.gz")
    with pytest.raises(InputError, match="choose one channel"):
        read_image(path)
    picked = read_image(path, channel=2)
    assert picked.GetDimension() == 3
    assert np.array_equal(sitk.GetArrayViewFromImage(picked), data[2])
    with pytest.raises(InputError, match="channel must be 0..2"):
        read_image(path, channel=5)


def test_multi_component_image_asks_for_a_channel(tmp_path):
    rgb = sitk.GetImageFromArray(np.random.default_rng(1).random((4, 5, 6, 3)).astype(np.float32), isVector=True)
    path = write_image(rgb, tmp_path / "rgb.nrrd")
    with pytest.raises(InputError, match="3 components per voxel; choose one channel"):
        read_image(path)
    assert read_image(path, channel=1).GetNumberOfComponentsPerPixel() == 1


def test_constant_image_is_refused(tmp_path):
    path = write_image(sitk.GetImageFromArray(np.zeros((6, 6, 6), np.float32)), tmp_path / "empty.nii.gz")
    with pytest.raises(InputError, match="constant"):
        read_image(path)


def test_nan_and_inf_are_refused(tmp_path):
    data = np.random.default_rng(2).random((6, 6, 6)).astype(np.float32)
    data[1, 2, 3] = np.nan
    data[2, 2, 2] = np.inf
    path = write_image(sitk.GetImageFromArray(data), tmp_path / "nan.mha")
    with pytest.raises(InputError, match="2 NaN or infinite voxels"):
        read_image(path)


def test_a_sheared_direction_matrix_is_refused_not_written_back_on_another_grid(tmp_path):
    """NRRD and MHA can store axes that are not perpendicular; the networks would see sheared
    anatomy, and a NIfTI output would be written on ITK's orthogonalised grid, not the scan's."""
    image = volume()
    image.SetDirection((1, 0, 0, 0.5, 0.866, 0, 0, 0, 1))
    path = write_image(image, tmp_path / "sheared.nrrd")
    with pytest.raises(InputError, match="not perpendicular.*resample it onto a grid with perpendicular axes"):
        read_image(path)
    rounded = volume()
    rounded.SetDirection(np.round(rounded.GetDirection(), 5))  # DICOM and NIfTI headers round their cosines
    assert np.allclose(read_image(write_image(rounded, tmp_path / "rounded.nrrd")).GetDirection(), rounded.GetDirection())


def test_a_sheared_nifti_is_refused_with_itks_reason(tmp_path):
    import struct

    path = write_image(volume(), tmp_path / "scan.nii", compress=False)
    header = bytearray(path.read_bytes())
    header[252:256] = struct.pack("<2h", 0, 1)  # no qform; the sform alone says where the voxels are
    header[280:328] = struct.pack("<12f", 0.7, 0.4, 0, 0, 0, 0.69, 0, 0, 0, 0, 2.0, 0)  # y axis leaning 30 degrees
    path.write_bytes(bytes(header))
    with pytest.raises(InputError, match="not an image SimpleITK can read .*orthonormal direction cosines"):
        read_image(path)


def test_file_that_is_not_an_image_is_refused(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("not an image")
    with pytest.raises(InputError, match="not an image SimpleITK can read"):
        read_image(path)
    with pytest.raises(InputError, match="does not exist"):
        read_image(tmp_path / "missing.nii.gz")


def test_folder_without_dicom_is_refused(tmp_path):
    with pytest.raises(InputError, match="no DICOM series"):
        read_image(tmp_path)


def test_volume_too_large_for_memory_is_refused_before_reading(tmp_path, monkeypatch):
    path = write_image(volume(), tmp_path / "scan.nrrd")
    monkeypatch.setattr(imageio, "available_memory_bytes", lambda: 1000)
    with pytest.raises(InputError, match="more than this machine can process"):
        read_image(path)


def test_a_four_dimensional_file_too_large_as_a_whole_is_refused_before_reading(tmp_path, monkeypatch):
    # the reader loads every volume before one is picked, so all of them must fit
    volumes = [sitk.GetImageFromArray(np.full((10, 10, 10), value, np.float32)) for value in range(8)]
    path = write_image(sitk.JoinSeries(volumes), tmp_path / "series.nrrd")
    monkeypatch.setattr(imageio, "available_memory_bytes", lambda: 4 * 4 * 1000 * 4)  # a quarter: 4 volumes
    with pytest.raises(InputError, match="10x10x10x8 voxels .* more than this machine can process"):
        read_image(path, channel=1)


def test_write_is_atomic_and_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.nii.gz"
    write_image(volume(), target)
    before = target.read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", crash)
    with pytest.raises(OSError, match="disk full"):
        write_image(volume((3, 3, 3)), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("kept", [0.1, 0.5, 0.9, 0.999])
def test_a_nifti_file_cut_short_is_refused_not_read_with_zeros(tmp_path, suffix, kept):
    import numpy as np
    import SimpleITK as sitk

    from MultiTaskSegLib.errors import InputError
    from MultiTaskSegLib.imageio import read_image

    image = sitk.GetImageFromArray((np.random.default_rng(1).random((12, 14, 16)) * 100 + 1).astype(np.float32))
    whole = tmp_path / f"whole{suffix}"
    sitk.WriteImage(image, str(whole), useCompression=suffix.endswith(".gz"))
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: max(1, int(len(data) * kept))])
    with pytest.raises(InputError, match="truncated|not an image"):
        read_image(cut)
    assert read_image(whole).GetSize() == image.GetSize()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_infinite_voxels_in_a_nifti_file_are_refused(tmp_path, bad):
    import numpy as np
    import SimpleITK as sitk

    from MultiTaskSegLib.errors import InputError
    from MultiTaskSegLib.imageio import read_image

    values = np.ones((6, 7, 8), np.float32)
    values[2, 3, 4] = bad
    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
    with pytest.raises(InputError, match="1 NaN or infinite voxels"):
        read_image(path)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_values_beyond_the_float32_range_are_refused_naming_the_file_and_the_range(tmp_path, suffix):
    """The models compute in float32: a double image with values past 3.4e38 would become infinite
    and come back as an empty segmentation without a word."""
    data = np.random.default_rng(3).random((6, 7, 8)) * 4e39 + 1e30
    data.flat[:2] = 1e30, 4e39
    path = write_image(sitk.GetImageFromArray(data), tmp_path / f"huge{suffix}")
    with pytest.raises(InputError, match=rf"'{tmp_path}/huge{suffix}' has values from 1e\+30 to 4e\+39, beyond .*"
                                         r"3\.4e\+38.*rescale"):
        read_image(path)
    with pytest.raises(InputError, match="the input volume has values from"):  # images from Slicer, or built in memory
        imageio.check_image(sitk.GetImageFromArray(data), "the input volume")
    large = write_image(sitk.GetImageFromArray(data / 1e9), tmp_path / f"large{suffix}")  # within the range: kept
    assert sitk.GetArrayViewFromImage(read_image(large)).max() == pytest.approx(data.max() / 1e9)
