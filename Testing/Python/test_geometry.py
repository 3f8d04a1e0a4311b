"""Resampling to the working grid and back must give back the source geometry exactly."""

import numpy as np
import pytest
import SimpleITK as sitk

from MultiTaskSegLib.geometry import (
    resample_onto,
    resample_probabilities_onto,
    resample_to_spacing,
    same_geometry,
    working_grid,
)


def oblique_anisotropic_volume() -> tuple[sitk.Image, sitk.Image]:
    """A ball in an oblique, anisotropic grid, with a matching label."""
    size = (40, 36, 18)
    spacing = (0.8, 0.9, 2.5)
    rotation = sitk.VersorTransform((0.3, -0.2, 0.9), 0.6).GetMatrix()
    zz, yy, xx = np.meshgrid(*(np.arange(n) * s for n, s in zip(size[::-1], spacing[::-1])), indexing="ij")
    centre = [n * s / 2 for n, s in zip(size[::-1], spacing[::-1])]
    distance = np.sqrt((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2)
    image = sitk.GetImageFromArray((100.0 * (distance < 11)).astype(np.float32))
    label = sitk.GetImageFromArray((distance < 11).astype(np.uint8))
    for item in (image, label):
        item.SetSpacing(spacing)
        item.SetOrigin((12.5, -40.0, 7.25))
        item.SetDirection(rotation)
    return image, label


def test_working_grid_keeps_direction_and_physical_extent():
    image, _ = oblique_anisotropic_volume()
    grid = working_grid(image, 1.0)
    assert grid.GetDirection() == image.GetDirection()
    assert grid.GetSpacing() == (1.0, 1.0, 1.0)
    assert grid.GetSize() == (32, 32, 45)
    # Both grids are centred on the same physical point.
    centre_of = lambda im: im.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in im.GetSize()])
    assert np.allclose(centre_of(grid), centre_of(image), atol=1e-6)


def test_round_trip_gives_back_the_source_geometry_exactly():
    image, label = oblique_anisotropic_volume()
    working_label = resample_to_spacing(label, 1.0, is_label=True)
    back = resample_onto(working_label, label, is_label=True)
    assert same_geometry(back, label, tolerance=0)
    assert back.GetPixelID() == label.GetPixelID()
    original = sitk.GetArrayViewFromImage(label).astype(bool)
    returned = sitk.GetArrayViewFromImage(back).astype(bool)
    agreement = 2 * (original & returned).sum() / (original.sum() + returned.sum())
    assert agreement > 0.95


def test_images_are_resampled_linearly_and_labels_keep_their_values():
    image, label = oblique_anisotropic_volume()
    working = resample_to_spacing(image, 1.0, is_label=False)
    assert working.GetPixelID() == sitk.sitkFloat32
    values = np.unique(sitk.GetArrayViewFromImage(working))
    assert values.size > 2  # interpolated boundary values exist
    labels = np.unique(sitk.GetArrayFromImage(resample_to_spacing(label, 1.0, is_label=True)))
    assert set(labels) == {0, 1}


def test_probabilities_resampled_back_have_the_source_shape():
    image, label = oblique_anisotropic_volume()
    grid = working_grid(image, 1.5)
    working = sitk.GetArrayFromImage(resample_onto(label, grid, is_label=True)).astype(np.float32)
    probabilities = np.stack([1 - working, working])
    back = resample_probabilities_onto(probabilities, grid, image)
    assert back.shape == (2,) + sitk.GetArrayViewFromImage(image).shape
    assert np.allclose(back.sum(axis=0)[back.sum(axis=0) > 0], 1.0, atol=1e-5)
    predicted = back.argmax(axis=0).astype(bool)
    reference = sitk.GetArrayViewFromImage(label).astype(bool)
    assert 2 * (predicted & reference).sum() / (predicted.sum() + reference.sum()) > 0.9


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.5, 0.5, 0.5)])
def test_same_spacing_is_left_alone_but_cast_to_float(spacing):
    image = sitk.Image(8, 8, 8, sitk.sitkInt16)
    image.SetSpacing(spacing)
    result = resample_to_spacing(image, spacing[0], is_label=False)
    assert result.GetSize() == image.GetSize() and result.GetPixelID() == sitk.sitkFloat32


@pytest.mark.parametrize("orientation", ["LIA", "RAS", "PIR", "SPL", "LPS"])
def test_probabilities_of_a_permuted_grid_come_back_by_reindexing_exactly_as_resampling_gives_them(orientation):
    from MultiTaskSegLib.geometry import axis_permutation, resample_onto, resample_probabilities_onto, working_grid

    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.random((12, 14, 16)).astype(np.float32))
    image.SetOrigin((3.0, -2.0, 5.0))
    image = sitk.DICOMOrient(image, orientation)
    grid = working_grid(image, 1.0)
    probabilities = rng.random((3, *reversed(grid.GetSize()))).astype(np.float32)
    assert axis_permutation(grid, image) is not None
    expected = []
    for channel in probabilities:
        moving = sitk.GetImageFromArray(channel)
        moving.CopyInformation(grid)
        expected.append(sitk.GetArrayFromImage(resample_onto(moving, image, is_label=False)))
    np.testing.assert_array_equal(resample_probabilities_onto(probabilities, grid, image), np.stack(expected))


def test_grids_that_share_no_voxel_centres_are_resampled_not_reindexed():
    from MultiTaskSegLib.geometry import axis_permutation, working_grid

    image = sitk.Image([12, 14, 16], sitk.sitkFloat32)
    image.SetSpacing((1.1, 1.0, 1.0))
    assert axis_permutation(working_grid(image, 1.0), image) is None
    oblique = sitk.Image([12, 14, 16], sitk.sitkFloat32)
    oblique.SetDirection(sitk.VersorTransform((0, 0, 1), 0.3).GetMatrix())
    oblique.SetSpacing((1.0, 1.0, 2.5))  # thick slices: the working grid's voxels fall between them
    assert axis_permutation(working_grid(oblique, 1.0), oblique) is None
