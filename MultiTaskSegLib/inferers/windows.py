"""Overlapping windows over any volume size, aligned with a network's poolings, and their weights.

A volume is padded up to a multiple of the network's pooling factor (removing the papers'
``2^levels`` size limit) and cut into windows on a grid aligned with the poolings; a window's
outermost ``margin`` voxels towards a neighbour only give context, and where the inner parts of two
windows overlap their probabilities are blended with linear weights. With a margin at least the
network's receptive radius this equals one pass over the whole volume.

Networks with instance norm (the 2-D U-Nets) normalise each window by its own statistics, so two
windows disagree where they meet whatever the margin: their windows overlap by a fraction instead
and are blended with Gaussian importance weights (nnU-Net; MONAI's ``sliding_window_inference`` with
``mode="gaussian"``), which leaves no edge where one window's say stops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

#: Weight of a window's context margin in the blend: tiny, so a voxel never has zero total weight.
CONTEXT_WEIGHT = 1e-6


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class AxisWindows:
    """Overlapping windows along one (padded) axis and each window's blending weights."""

    starts: tuple[int, ...]
    size: int
    weights: tuple[np.ndarray, ...]


def plan_axis_windows(length: int, size: int, margin: int, multiple: int) -> AxisWindows:
    """Windows of ``size`` over ``length`` (both multiples of ``multiple``), starting on multiples
    of ``multiple`` so the poolings of every window line up with those of a whole-volume pass.

    The outer ``margin`` voxels of a window towards a neighbour are context only (weight ~0); the
    inner parts of neighbouring windows meet or overlap, and cross-fade linearly where they overlap.
    Weights are relative: the caller divides by their sum at every voxel.
    """
    if size >= length:
        return AxisWindows((0,), length, (np.ones(length, np.float32),))
    margin = max(0, min(margin, (size - multiple) // 2))
    step = max(multiple, (size - 2 * margin) // multiple * multiple)
    starts = (*range(0, length - size, step), length - size)
    overlap = size - 2 * margin - step
    positions = np.arange(size, dtype=np.float64)
    weights = []
    for start in starts:
        distance = np.full(size, np.inf)
        if start > 0:
            distance = np.minimum(distance, positions)
        if start + size < length:
            distance = np.minimum(distance, size - 1 - positions)
        weights.append(np.clip((distance - margin + 1) / (overlap + 1), CONTEXT_WEIGHT, 1.0).astype(np.float32))
    return AxisWindows(starts, size, tuple(weights))


def plan_gaussian_windows(length: int, size: int, overlap: float, multiple: int) -> AxisWindows:
    """Windows of ``size`` over ``length`` sharing about ``overlap`` of their side with each
    neighbour, starting on multiples of ``multiple``; weights fall off as a Gaussian of standard
    deviation ``size / 8`` from the window's centre (floored at 1e-3, so every voxel has weight)."""
    if size >= length:
        return AxisWindows((0,), length, (np.ones(length, np.float32),))
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"window overlap must lie in 0..1 (1 excluded), got {overlap}")
    step = max(multiple, int(size * (1.0 - overlap)) // multiple * multiple)
    starts = (*range(0, length - size, step), length - size)
    positions = np.arange(size, dtype=np.float64)
    sigma = size / 8.0
    weight = np.exp(-0.5 * ((positions - (size - 1) / 2) / sigma) ** 2)
    weight = np.clip(weight / weight.max(), 1e-3, 1.0).astype(np.float32)
    return AxisWindows(starts, size, tuple(weight for _ in starts))


def fit_window(shape: Sequence[int], max_voxels: int, multiple: int, smallest: int | None = None) -> tuple[int, ...]:
    """``shape`` with its largest sides shrunk by ``multiple`` until it holds at most ``max_voxels``,
    never below ``smallest`` (default ``multiple``) per side, nor below a side already smaller."""
    smallest = multiple if smallest is None else smallest
    window = list(shape)
    while math.prod(window) > max_voxels:
        shrinkable = [axis for axis, side in enumerate(window) if side - multiple >= smallest]
        if not shrinkable:
            break
        largest = max(shrinkable, key=lambda axis: window[axis])
        window[largest] -= multiple
    return tuple(window)


def window_weight(plans: Sequence[AxisWindows], index: Sequence[int]) -> np.ndarray:
    weight = np.ones((), np.float32)
    for plan, number in zip(plans, index):
        weight = np.multiply.outer(weight, plan.weights[number])
    return weight


def window_region(plans: Sequence[AxisWindows], index: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(plan.starts[number], plan.starts[number] + plan.size) for plan, number in zip(plans, index))
