"""Resampling between a scan's own grid and a model's working grid, with SimpleITK.

Going to the working grid changes the spacing (the paper resamples to isotropic voxels) and
reorders the axes into one anatomical orientation, LPS (array axes z, y, x = inferior-superior,
anterior-posterior, right-left), whatever order the file stores them in, so that a network's
planes are the anatomical planes (as MONAI's ``Orientationd``); a residual obliquity is kept; coming back uses the source image itself as the reference, so the result
has the source's size, spacing, origin and direction exactly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk


#: The orientation of every working grid (DICOM letters: the directions the axes x, y, z point to).
WORKING_ORIENTATION = "LPS"


def canonical_orientation(image: sitk.Image) -> sitk.Image:
    """An empty image with ``image``'s physical extent, its axes permuted and flipped to LPS."""
    blank = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    blank.CopyInformation(image)
    return sitk.DICOMOrient(blank, WORKING_ORIENTATION)


def working_grid(image: sitk.Image, spacing_mm: float | Sequence[float]) -> sitk.Image:
    """An empty image covering the same physical extent as ``image`` at ``spacing_mm``, in LPS order."""
    image = canonical_orientation(image)
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,))
    source_spacing = np.asarray(image.GetSpacing(), dtype=float)
    extent = source_spacing * np.asarray(image.GetSize(), dtype=float)
    size = np.maximum(1, np.round(extent / spacing)).astype(int)
    # Centre the new grid on the old one: voxel centres sit half a voxel inside the extent.
    shift_index = (extent - size * spacing) / 2.0 + (spacing - source_spacing) / 2.0
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    origin = np.asarray(image.GetOrigin(), dtype=float) + direction @ shift_index
    grid = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    grid.SetSpacing([float(s) for s in spacing])
    grid.SetOrigin([float(o) for o in origin])
    grid.SetDirection(image.GetDirection())
    return grid


def resample_onto(image: sitk.Image, reference: sitk.Image, is_label: bool, default_value: float = 0.0) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid: labels by nearest neighbour, images linearly."""
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    output_type = image.GetPixelID() if is_label else sitk.sitkFloat32
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, default_value, output_type)


def resample_to_spacing(image: sitk.Image, spacing_mm: float | Sequence[float], is_label: bool) -> sitk.Image:
    """Resample to the working spacing (isotropic when one number is given)."""
    if np.allclose(image.GetSpacing(), np.broadcast_to(spacing_mm, (3,))):
        return image if is_label else sitk.Cast(image, sitk.sitkFloat32)
    return resample_onto(image, working_grid(image, spacing_mm), is_label)


def resample_probabilities_onto(probabilities: np.ndarray, grid: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """Resample per-class probabilities (C, z, y, x) from ``grid`` onto ``reference`` linearly.

    Taking the arg-max after this gives smoother boundaries than resampling the labels. When the
    grids share their voxel centres the result is a reindexed view of ``probabilities`` (no copy).
    """
    mapping = axis_permutation(grid, reference)
    if mapping is not None and probabilities.dtype == np.float32:
        # The same voxels in another axis order (a 1 mm scan stored as LIA): a view of the input.
        return mapping(probabilities)
    resampled = np.empty((len(probabilities), *reversed(reference.GetSize())), np.float32)
    for number, channel in enumerate(probabilities):  # one class at a time: memory for one more volume only
        image = sitk.GetImageFromArray(np.ascontiguousarray(channel, dtype=np.float32))
        image.CopyInformation(grid)
        moved = resample_onto(image, reference, is_label=False)  # kept alive while its view is copied
        resampled[number] = sitk.GetArrayViewFromImage(moved)
    return resampled


def axis_permutation(grid: sitk.Image, reference: sitk.Image, tolerance: float = 1e-4):
    """When every voxel centre of ``reference`` is a voxel centre of ``grid`` (the grids differ by an
    axis permutation, flips and a whole-voxel shift), a function taking ``(C, z, y, x)`` arrays on
    ``grid`` to ``(C, z, y, x)`` arrays on ``reference`` by reindexing; else None."""
    def frame(image):
        return np.asarray(image.GetDirection(), float).reshape(3, 3) * np.asarray(image.GetSpacing(), float)

    grid_inverse = np.linalg.inv(frame(grid))
    matrix = grid_inverse @ frame(reference)  # reference index (x, y, z) -> grid index
    offset = grid_inverse @ (np.asarray(reference.GetOrigin(), float) - np.asarray(grid.GetOrigin(), float))
    rounded, shift = np.rint(matrix), np.rint(offset)
    if (np.abs(matrix - rounded).max() > tolerance or np.abs(offset - shift).max() > tolerance
            or sorted(np.abs(rounded).sum(axis=0)) != [1, 1, 1] or sorted(np.abs(rounded).sum(axis=1)) != [1, 1, 1]):
        return None
    size = np.asarray(reference.GetSize())
    corners = np.stack([shift, rounded @ (size - 1) + shift])  # grid indices of the first and last voxel
    if corners.min() < -tolerance or np.any(corners.max(axis=0) > np.asarray(grid.GetSize()) - 1 + tolerance):
        return None
    source_axis = [int(np.flatnonzero(rounded[:, axis])[0]) for axis in range(3)]  # grid axis of each reference axis
    ranges = []
    for axis in (2, 1, 0):  # reference array axes (z, y, x): the grid axis each runs along, as a slice
        step, start, count = int(rounded[source_axis[axis], axis]), int(shift[source_axis[axis]]), int(size[axis])
        stop = start + step * count
        ranges.append(slice(start, stop if stop >= 0 else None, step))
    order = [3 - source_axis[axis] for axis in (2, 1, 0)]  # grid array axis (after the channel) of each

    def reindex(values: np.ndarray) -> np.ndarray:
        return np.transpose(values, (0, *order))[(slice(None), *ranges)]  # a view: no copy

    return reindex


def same_geometry(first: sitk.Image, second: sitk.Image, tolerance: float = 1e-6) -> bool:
    """True when both images have the same size, spacing, origin and direction."""
    return (
        first.GetSize() == second.GetSize()
        and np.allclose(first.GetSpacing(), second.GetSpacing(), atol=tolerance)
        and np.allclose(first.GetOrigin(), second.GetOrigin(), atol=tolerance)
        and np.allclose(first.GetDirection(), second.GetDirection(), atol=tolerance)
    )
