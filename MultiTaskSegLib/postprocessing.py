"""What is done to the labels after the network: keep one connected region where a task expects one.

A tumour crop or a glioma scan holds one tumour; the network sometimes adds small islands far from
it (HD95 of 120-160 mm on held-out gliomas). As nnU-Net does when cross-validation shows it helps,
a task with ``largest_component = true`` keeps only the largest connected region of its classes
(all of them together: a glioma's oedema, core and enhancing parts form one region). What is
removed is said in a warning, so the reader knows to look for a second lesion.

A sarcoma crop always holds its tumour, yet where the tumour looks like muscle the network finds it
only faintly: a few voxels pass the operating point and the Dice is near 0. A task with an
``[unsure_region]`` rule (:class:`~MultiTaskSegLib.tasks.UnsureRegion`) then segments the region of
probability at least its ``threshold`` around the most probable voxel, when no voxel reaches its
``confident`` level, and says so in a warning: the result needs a look at its boundary.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .tasks import LabelSpace, UnsureRegion


def connected_regions(mask: np.ndarray, grid: sitk.Image | None = None) -> np.ndarray:
    """The 26-connected regions of ``mask``, numbered 1, 2, ... from the largest down (0 outside);
    ``grid`` gives the geometry when there is one."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    if grid is not None:
        image.CopyInformation(grid)
    return sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(image, True), sortByObjectSize=True))


def keep_largest_region(labels: np.ndarray, grid: sitk.Image, indices: Sequence[int]) -> tuple[int, float]:
    """Set to background (in place) every voxel of ``indices`` outside the largest connected region
    (26-connected) of those labels; ``grid`` gives the geometry. Returns the number of regions
    removed and their volume in ml."""
    regions = connected_regions(np.isin(labels, indices), grid)
    removed = regions > 1
    count = int(regions.max()) - 1 if regions.max() > 1 else 0
    labels[removed] = 0
    return count, float(removed.sum()) * float(np.prod(grid.GetSpacing())) / 1000.0


def keep_largest_regions(labels: np.ndarray, grid: sitk.Image, label_space: LabelSpace, tasks: Sequence[str]) -> list[str]:
    """:func:`keep_largest_region` for each of ``tasks`` that asks for it; warnings saying what went."""
    warnings = []
    for name in tasks:
        if not label_space.task(name).largest_component:
            continue
        count, volume_ml = keep_largest_region(labels, grid, label_space.indices_for_task(name))
        if count:
            warnings.append(f"{name}: kept the largest connected region; removed {count} smaller one(s) of "
                            f"{volume_ml:.1f} ml in all (look for a second lesion if one is expected)")
    return warnings


def segment_unsure_regions(labels: np.ndarray, probabilities: np.ndarray, kept: np.ndarray, grid: sitk.Image,
                           label_space: LabelSpace, tasks: Sequence[str]) -> list[str]:
    """Apply each of ``tasks``' unsure-region rule to ``labels`` (label-space indices, changed in place;
    a view of part of the volume will do); ``probabilities`` holds one row per label-space index of
    ``kept`` (background first) on the same voxels, ``grid`` gives the spacing. Returns warnings saying
    where the rule was used."""
    warnings = []
    for name in tasks:
        rule = label_space.task(name).unsure_region
        if rule is None:
            continue
        index = label_space.indices_for_task(name)[0]
        row = int(np.flatnonzero(kept == index)[0])
        # As the operating point applies: the class against background alone.
        score = probabilities[row] / np.clip(probabilities[row] + probabilities[0], 1e-6, None)
        score[(labels != 0) & (labels != index)] = 0.0  # another task's voxels stay its own
        region = unsure_region(score, rule)
        if region is None:
            continue
        labels[labels == index] = 0
        labels[region] = index
        volume_ml = float(region.sum()) * float(np.prod(grid.GetSpacing())) / 1000.0
        warnings.append(f"{name}: the network is unsure of this scan (highest probability {score.max():.2f} < "
                        f"{rule.confident}); segmented the region of probability >= {rule.threshold} around its most "
                        f"probable voxel ({volume_ml:.1f} ml): check its boundary")
    return warnings


def unsure_region(score: np.ndarray, rule: UnsureRegion) -> np.ndarray | None:
    """The 26-connected region of ``score >= rule.threshold`` holding the highest score, when that
    score is below ``rule.confident``; None when the network is sure somewhere or nowhere above the
    threshold (then the operating point's result stands)."""
    peak = np.unravel_index(int(np.argmax(score)), score.shape)
    if not rule.threshold <= score[peak] < rule.confident:
        return None
    regions = connected_regions(score >= rule.threshold)
    return regions == regions[peak]
