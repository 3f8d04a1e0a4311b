"""What one whole-volume prediction is told besides the image: progress, cancel, memory, classes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Callable

#: progress(fraction in 0..1, stage description); returns nothing.
ProgressCallback = Callable[[float, str], None]
#: cancelled() -> True once the user asked to stop.
CancelCheck = Callable[[], bool]


@dataclass(frozen=True)
class InferenceOptions:
    """Settings of one ``predict_probabilities`` call, the same for every architecture.

    ``progress`` is called with the fraction done and a stage; ``cancelled()`` is checked before
    every batch (a true answer raises :class:`~MultiTaskSegLib.errors.CancelledError`);
    ``max_block_voxels`` caps the voxels of one batch (default: the architecture's own cap);
    ``requested_labels`` are the label-space indices the user asked for (default: all), so a
    network with a presence head can skip slices where none of them is present.
    """

    progress: ProgressCallback | None = None
    cancelled: CancelCheck | None = None
    max_block_voxels: int | None = None
    requested_labels: Sequence[int] | None = None


def part_options(options: InferenceOptions, number: int, parts: int, name: str) -> InferenceOptions:
    """``options`` whose progress reports the ``number``-th of ``parts`` equal parts (a plane, an
    ensemble's network) as its share of the whole, its stage tagged with ``name``."""
    progress = options.progress
    if progress is None:
        return options

    def part_progress(fraction: float, stage: str) -> None:
        progress((number + fraction) / parts, f"{stage} ({name})")

    return replace(options, progress=part_progress)
