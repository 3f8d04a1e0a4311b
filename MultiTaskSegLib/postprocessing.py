"""What is done to the labels after the network: keep one connected region where a task expects one.

A tumour crop or a glioma scan holds one tumour; the network sometimes adds small islands far from
it (HD95 of 120-160 mm on held-out gliomas). As nnU-Net does when cross-validation shows it helps,
a task with ``largest_component = true`` keeps only the largest connected region of its classes
(all of them together: a glioma's oedema, core and enhancing parts form one region). What is
removed is said in a warning, so the reader knows to look for a second lesion.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .tasks import LabelSpace


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
