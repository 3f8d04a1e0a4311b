"""From a scan to the network's input and back to the foreground: the steps training and inference share.

Normalise each channel for its task, put the channels on one grid, resample to the task's working
spacing; after prediction, everything outside the foreground is background. Training
(:mod:`~MultiTaskSegLib.datasets`) and inference (:mod:`~MultiTaskSegLib.inference`) both call
these, so a model sees at inference exactly what it saw in training.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import resample_onto, same_geometry, working_grid
from .normalization import normalize
from .tasks import Task


def prepare_image(image: sitk.Image | Sequence[sitk.Image], task: Task, spacing_mm: float, mask: sitk.Image | None = None):
    """Normalise for the task and resample to the working spacing.

    ``image`` is one volume, or for a multi-channel task one volume per channel in the task's order
    (put on the first one's grid by :func:`align_channels`). Returns (normalised float32 array
    (z, y, x), or (channels, z, y, x) for several channels; foreground bool array (z, y, x);
    working-grid image).
    """
    images = [image] if isinstance(image, sitk.Image) else list(image)
    if len(images) != len(task.channels):
        raise InputError(f"task {task.name} reads {len(task.channels)} image(s) ({', '.join(task.channels)}), "
                         f"got {len(images)}; give one input per channel in that order")
    images = align_channels(images, task)
    mask_array = sitk.GetArrayViewFromImage(mask) if mask is not None else None
    check_working_grid_size(images[0], spacing_mm)
    grid = working_grid(images[0], spacing_mm)
    channels = []
    for channel in images:
        normalised = sitk.GetImageFromArray(normalize(sitk.GetArrayViewFromImage(channel), task, mask_array))
        normalised.CopyInformation(channel)
        channels.append(sitk.GetArrayFromImage(resample_onto(normalised, grid, is_label=False)).astype(np.float32))
    if mask is not None:
        foreground = sitk.GetArrayFromImage(resample_onto(mask, grid, is_label=True)) > 0
    else:
        foreground = np.any([channel > 0 for channel in channels], axis=0)
    working = channels[0] if len(channels) == 1 else np.stack(channels)
    return working, foreground, grid


#: A channel must cover at least this share of the first channel's field of view.
MIN_CHANNEL_COVERAGE = 0.5


def align_channels(images: Sequence[sitk.Image], task: Task) -> list[sitk.Image]:
    """The channels on the first channel's grid: unchanged where they share it, else resampled
    linearly; refused when one covers too little of the first one's field of view (not registered,
    or another patient's scan)."""
    first = images[0]
    aligned = [first]
    for name, channel in zip(task.channels[1:], images[1:]):
        if same_geometry(channel, first, tolerance=1e-3):
            channel = sitk.Image(channel)
            channel.CopyInformation(first)
            aligned.append(channel)
            continue
        ones = sitk.Image(channel.GetSize(), sitk.sitkUInt8) + 1
        ones.CopyInformation(channel)
        coverage = float(sitk.GetArrayFromImage(resample_onto(ones, first, is_label=True)).mean())
        if coverage < MIN_CHANNEL_COVERAGE:
            raise InputError(
                f"the {name} image covers {coverage:.0%} of the {task.channels[0]} image's field of view"
                f"{' (they do not overlap at all)' if coverage == 0 else ''}; give co-registered images of one "
                f"patient and study (register {name} to {task.channels[0]} first)"
            )
        aligned.append(resample_onto(channel, first, is_label=False))
    return aligned


#: A working grid larger than this many voxels is refused before anything is allocated.
MAX_WORKING_VOXELS = 600 * 600 * 600


def working_grid_sides(image: sitk.Image, spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """The image's extent in mm and the voxels per axis of its working grid at ``spacing_mm``."""
    extent = np.asarray(image.GetSpacing(), float) * np.asarray(image.GetSize(), float)
    return extent, np.maximum(1, np.round(extent / spacing_mm))


def check_working_grid_size(image: sitk.Image, spacing_mm: float) -> None:
    """Refuse a resampling that would allocate an enormous grid (e.g. a 20 mm scan at 0.5 mm), or
    shrink the scan to a single slice (a spacing in metres read as millimetres)."""
    extent, sides = working_grid_sides(image, spacing_mm)
    if sides.min() < 2:
        raise InputError(
            f"the image covers {' x '.join(f'{e:.3g}' for e in extent)} mm; at the working spacing of {spacing_mm} mm "
            f"that is {' x '.join(f'{s:.0f}' for s in sides)} voxels, too thin to segment; check the image spacing in "
            "its header (millimetres: a spacing in metres or centimetres makes the scan this small)"
        )
    voxels = float(np.prod(sides))
    if voxels > MAX_WORKING_VOXELS:
        raise InputError(
            f"the image covers {' x '.join(f'{e:.0f}' for e in extent)} mm; at the working spacing of {spacing_mm} mm "
            f"that is {voxels:.3g} voxels, more than {MAX_WORKING_VOXELS:.3g}; check the image spacing in its header, "
            "or crop the image"
        )


def background_outside(probabilities: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Voxels outside the foreground are background: they were never training samples (the paper
    samples voxels above zero only), so the networks have no say there. Only the undecided box is
    touched: outside it every voxel is background already."""
    box = undecided_box(probabilities)
    if box is not None:
        region, inside = probabilities[(slice(None), *box)], foreground[box]
        np.multiply(region, inside, out=region)  # a broadcast product: 10x faster than a masked write per label
        region[0][~inside] = 1.0
    return probabilities


def undecided_box(probabilities: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of the voxels whose background probability is below 1 (None if there are none).

    Outside it every voxel is background whatever the decision rule, so masking, normalising and
    deciding skip it: more than half of a whole-head scan once the brain has been located.
    """
    return nonzero_box(probabilities[0] < 1.0, 0)


def nonzero_box(image: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    """The bounding box of the non-zero voxels grown by ``margin`` (clipped to the volume); None if none."""
    nonzero = image != 0
    box = []
    for axis in range(image.ndim):
        other = tuple(a for a in range(image.ndim) if a != axis)
        occupied = np.flatnonzero(np.any(nonzero, axis=other))
        if occupied.size == 0:
            return None
        box.append(slice(max(0, int(occupied[0]) - margin), min(image.shape[axis], int(occupied[-1]) + 1 + margin)))
    return tuple(box)
