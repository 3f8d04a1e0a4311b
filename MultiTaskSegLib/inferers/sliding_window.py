"""One sliding-window inferer for every U-Net: batches of windows in, blended probabilities out.

The architecture gives a stack of items (the slices of a volume for the 2-D U-Nets, the volume
itself for the 3-D one), how big a window may be, and a function that predicts one batch of
windows; :func:`blend_windows` does the rest, as MONAI's ``sliding_window_inference`` does: pad,
tile, batch, weight, add into the output, report progress, stop when cancelled. Each window's
probabilities are divided by the blending weights' sum as they are added, so no volume of sums is
held beside the output.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import CancelledError
from .options import CancelCheck, InferenceOptions, ProgressCallback
from .windows import AxisWindows, fit_window, plan_axis_windows, plan_gaussian_windows, round_up, window_region, window_weight

#: predict(batch (windows, channels, *window)) -> probabilities (windows, labels, *window), float32.
BatchPredictor = Callable[[torch.Tensor], np.ndarray]


@dataclass
class WindowGrid:
    """A stack of items padded to the window plans, and how many windows make one batch.

    ``padded`` is ``(items, channels, *spatial)``; every item is cut by the same ``plans`` (one per
    spatial axis). With ``whole_items`` a batch holds whole items, so a per-item decision (a slice's
    presence) sees all of an item's windows together.
    """

    padded: np.ndarray
    plans: tuple[AxisWindows, ...]
    batch_windows: int

    @classmethod
    def plan(cls, stack: np.ndarray, window: Sequence[int], multiple: int, max_voxels: int, *,
             overlap: float | None = None, margin: int = 0, smallest: int | None = None,
             whole_items: bool = False) -> "WindowGrid":
        """Windows of at most ``window`` (shrunk to ``max_voxels`` per batch, never below ``smallest``
        a side) over ``stack`` ``(items, channels, *spatial)``: Gaussian-weighted windows sharing
        ``overlap`` of their side, or, with ``overlap=None``, windows whose ``margin`` is context only."""
        spatial = stack.shape[2:]
        padded_shape = tuple(round_up(max(side, size), multiple) for side, size in zip(spatial, window))
        window = fit_window(window, max_voxels, multiple, smallest)
        if overlap is None:
            plans = tuple(plan_axis_windows(length, side, margin, multiple) for length, side in zip(padded_shape, window))
        else:
            plans = tuple(plan_gaussian_windows(length, side, overlap, multiple) for length, side in zip(padded_shape, window))
        padded = np.zeros((*stack.shape[:2], *padded_shape), np.float32)
        padded[(slice(None), slice(None), *(slice(0, side) for side in spatial))] = stack
        per_batch = max(1, max_voxels // math.prod(window))
        if whole_items:
            per_item = cls.windows_per_item_of(plans)
            per_batch = max(1, per_batch // per_item) * per_item
        return cls(padded, plans, per_batch)

    @staticmethod
    def windows_per_item_of(plans: Sequence[AxisWindows]) -> int:
        return math.prod(len(plan.starts) for plan in plans)

    @property
    def windows_per_item(self) -> int:
        return self.windows_per_item_of(self.plans)

    def batches(self) -> Iterator[tuple[list[tuple[int, ...]], int]]:
        """Batches of ``(item, *window index)`` over all items, and the number of windows in all."""
        windows = list(itertools.product(range(self.padded.shape[0]), *(range(len(plan.starts)) for plan in self.plans)))
        for first in range(0, len(windows), self.batch_windows):
            yield windows[first : first + self.batch_windows], len(windows)

    def tensor(self, items: Sequence[tuple[int, ...]], device: torch.device) -> torch.Tensor:
        """The windows of ``items`` as one ``(windows, channels, *window)`` batch on ``device``."""
        crops = [self.padded[(number, slice(None), *window_region(self.plans, index))] for number, *index in items]
        return torch.from_numpy(np.stack(crops)).to(device)


def blend_windows(grid: WindowGrid, predict: BatchPredictor, target: np.ndarray, device: torch.device,
                  options: InferenceOptions, scale: float = 1.0, stage: str = "Segmenting") -> None:
    """Add ``scale`` times the blended probabilities of every window into ``target`` ``(labels,
    items, *spatial)`` (a view will do; the padding is dropped). Run it inside :func:`inference_context`."""
    total_weight = np.zeros(grid.padded.shape[2:], np.float32)
    for index in itertools.product(*(range(len(plan.starts)) for plan in grid.plans)):
        total_weight[window_region(grid.plans, index)] += window_weight(grid.plans, index)

    @functools.lru_cache(maxsize=None if grid.padded.shape[0] > 1 else 0)  # slices share their windows; a volume does not
    def blend_weight(index: tuple[int, ...]) -> np.ndarray:
        return window_weight(grid.plans, index) * (scale / total_weight[window_region(grid.plans, index)])

    limits = target.shape[2:]
    report_progress(options.progress, 0.0, stage)
    done = 0
    for items, total in grid.batches():
        raise_if_cancelled(options.cancelled)
        for (number, *index), probabilities in zip(items, predict(grid.tensor(items, device))):
            region = window_region(grid.plans, index)
            inside = tuple(slice(0, max(0, min(part.stop, limit) - part.start)) for part, limit in zip(region, limits))
            weight = blend_weight(tuple(index))
            destination = tuple(slice(part.start, part.start + cut.stop) for part, cut in zip(region, inside))
            target[(slice(None), number, *destination)] += (probabilities * weight)[(slice(None), *inside)]
        done += len(items)
        report_progress(options.progress, done / total, stage)


def raise_if_cancelled(cancelled: CancelCheck | None) -> None:
    if cancelled is not None and cancelled():
        raise CancelledError("prediction cancelled by the user; nothing was written")


def report_progress(progress: ProgressCallback | None, fraction: float, stage: str) -> None:
    if progress is not None:
        progress(min(1.0, max(0.0, fraction)), stage)


@contextlib.contextmanager
def inference_context(network: nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode (restored afterwards), no autograd, float16 autocast on CUDA, float32 elsewhere."""
    device = torch.device(device)
    was_training = network.training
    network.to(device).eval()
    precision = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()
    try:
        with torch.inference_mode(), precision:
            yield
    finally:
        network.train(was_training)


def bfloat16_autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for training on ``device`` when ``enabled`` and the device has bfloat16
    arithmetic (about 1.5x (triplanar) to 1.8x (2-D U-Net) per training step on AVX-512 BF16 cores);
    otherwise a context that changes nothing. Losses should be computed on ``.float()`` outputs."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and bfloat16_ready(device))


def prediction_autocast_type(device: torch.device, mixed_precision: bool,
                             dtype: torch.dtype = torch.float32) -> torch.dtype | None:
    """The autocast type of prediction with ``mixed_precision``: float16 on CUDA, bfloat16 on CPUs
    with bfloat16 arithmetic, else None (float32; also for float64 networks)."""
    device = torch.device(device)
    if not mixed_precision or dtype == torch.float64:
        return None
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if device.type == "cpu" and bfloat16_ready(device) else None


def bfloat16_ready(device: torch.device) -> bool:
    """Whether bfloat16 autocast is fast on ``device`` (emulated bfloat16 would be slower than float32)."""
    return _bfloat16_ready(torch.device(device).type)


@functools.cache
def _bfloat16_ready(device_type: str) -> bool:
    """Asked once per device type, not at every training step."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)
