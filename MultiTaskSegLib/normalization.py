"""Intensity normalisation chosen by the task's modality, never by the user.

CT keeps its physical meaning (Hounsfield units), so a fixed window is mapped to 0..1. MR
intensities are arbitrary, so they are z-scored robustly inside the foreground (``mr_zscore``) or
divided by a high percentile of the foreground (``mr_percentile``: unlike a z-score it does not
depend on how much dark air or skull the field of view holds, so a whole-head scan and a
skull-stripped one give the brain similar values). In both cases the
background of the normalised image is 0 so that "intensity above zero" marks the voxels to sample,
as in Moeskops et al.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .tasks import Task


def foreground_mask(image: np.ndarray, task: Task, mask: np.ndarray | None = None) -> np.ndarray:
    """Voxels that belong to the body/organ: the given mask, else intensity above the background.

    MR background is exactly 0 in skull-stripped or masked scans; "non-zero" rather than "above
    zero" also keeps the negative half of already standardised scans (BraTS).
    """
    if mask is not None:
        return mask > 0
    if task.normalization == "ct_window":
        return image > float(task.normalization_parameters.get("low", -300.0))
    return image != 0


def normalize(image: np.ndarray, task: Task, mask: np.ndarray | None = None) -> np.ndarray:
    """Return a float32 copy normalised for ``task`` with background at exactly 0."""
    image = image.astype(np.float32, copy=False)
    foreground = foreground_mask(image, task, mask)
    if task.normalization == "none":
        return np.where(foreground, image, 0.0).astype(np.float32)
    if task.normalization == "ct_window":
        low = float(task.normalization_parameters.get("low", -300.0))
        high = float(task.normalization_parameters.get("high", 900.0))
        scaled = (np.clip(image, low, high) - low) / (high - low)
        return scaled.astype(np.float32)
    if task.normalization not in ("mr_zscore", "mr_percentile"):
        raise InputError(f"unknown normalisation {task.normalization!r} for task {task.name}")
    if not foreground.any():
        raise InputError(
            f"the image has no non-zero voxel, so it has no foreground for {task.modality} normalisation; "
            "give a skull-stripped/bias-corrected MR image with background 0, or a foreground mask"
        )
    values = image[foreground]
    if task.normalization == "mr_percentile":
        return _percentile_scaled(image, foreground, values, task)
    low, high = np.percentile(values, [float(task.normalization_parameters.get("lower_percentile", 0.5)),
                                       float(task.normalization_parameters.get("upper_percentile", 99.5))])
    clipped = np.clip(values, low, high)
    spread = clipped.std()
    if spread == 0:
        raise InputError("the image foreground is constant; there is nothing to segment")
    # Shift so the darkest foreground voxel stays positive: 0 remains reserved for background.
    standardized = (clipped - clipped.mean()) / spread
    result = np.zeros(image.shape, dtype=np.float32)
    result[foreground] = standardized - standardized.min() + 1e-3
    return result


def _percentile_scaled(image: np.ndarray, foreground: np.ndarray, values: np.ndarray, task: Task) -> np.ndarray:
    """``image / p`` with ``p`` the upper percentile of the foreground, clipped to 0..``clip``."""
    sample = values[:: max(1, values.size // 2_000_000)]
    upper = float(np.percentile(sample, float(task.normalization_parameters.get("upper_percentile", 99.5))))
    if upper <= 0:
        raise InputError("the image foreground has no positive intensity; MR images must not be all negative")
    clip = float(task.normalization_parameters.get("clip", 2.0))
    result = np.zeros(image.shape, dtype=np.float32)
    result[foreground] = np.clip(values / upper, 1e-3, clip)
    return result
