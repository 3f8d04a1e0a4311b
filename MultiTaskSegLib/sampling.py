"""Mini-batch sampling balanced over tasks and, within each task, over the task's classes.

Moeskops et al. draw each mini-batch equally from every task of the network, and within a task
equally from each of its classes (background included), from all voxels of all training images
whose intensity is above zero. Every architecture draws its samples (voxels, patch centres,
slices) through this one sampler so that all of them see the same balance.

Drawing from all voxels pooled gives a case a share of its class's samples in proportion to its
volume: a tumour of 5 ml is drawn 40 times less often than one of 200 ml. With ``per_case`` the
sampler first draws a case (evenly among the task's cases that hold the class), then a voxel in
it, as nnU-Net draws cases evenly: small tumours are seen as often as large ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InputError

#: How a class's samples are spread over the training cases (``train --sampling``): in proportion to
#: its volume in each (``voxels``, the default) or evenly over the cases that hold it (``cases``).
SAMPLING_CHOICES = ("voxels", "cases")


@dataclass
class PreparedCase:
    """One training/validation volume on the model's working grid.

    ``image`` is float32 (z, y, x), already normalised for its task, or None for a label map whose
    images are synthesised (``extra["source_labels"]``, see
    :attr:`~MultiTaskSegLib.architectures.base.Architecture.synthesises_images`); ``labels`` are
    label-space indices (0 = shared background); ``foreground`` marks voxels that may be sampled
    (intensity above zero, or inside the case's mask).
    """

    task: str
    name: str
    image: np.ndarray | None
    labels: np.ndarray
    foreground: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)


def split_evenly(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """``total`` items over ``parts`` groups, sizes differing by at most one (extras placed at random)."""
    counts = np.full(parts, total // parts, dtype=np.int64)
    counts[rng.permutation(parts)[: total % parts]] += 1
    return counts


@dataclass
class VoxelPool:
    """The voxels of one class of one task: ``numbers`` (case) and ``flat`` (index in that case),
    grouped by case; case ``k`` of the pool holds positions ``starts[k]`` to ``starts[k] + sizes[k]``."""

    numbers: np.ndarray
    flat: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray

    def picks(self, count: int, rng: np.random.Generator, per_case: bool) -> np.ndarray:
        """``count`` positions: uniform over the voxels, or (``per_case``) over the cases first."""
        if not per_case:
            return rng.integers(0, self.numbers.size, size=count)
        chosen = rng.integers(0, self.sizes.size, size=count)
        return self.starts[chosen] + (rng.random(count) * self.sizes[chosen]).astype(np.int64)


class BalancedVoxelSampler:
    """Draws voxel positions balanced over tasks, then over each task's labels.

    ``label_indices_by_task`` maps each task to its label-space indices (background excluded);
    background (0) is always added as one more class of every task. ``per_case``: each class's
    samples go evenly to the cases that hold it, instead of in proportion to its volume in each.
    """

    def __init__(self, cases: Sequence[PreparedCase], label_indices_by_task: Mapping[str, Sequence[int]],
                 per_case: bool = False):
        if not cases:
            raise InputError("no training cases: give at least one image + label per task")
        self.cases = list(cases)
        self.tasks = tuple(label_indices_by_task)
        self.per_case = per_case
        missing = [task for task in self.tasks if not any(case.task == task for case in self.cases)]
        if missing:
            raise InputError(f"no training cases for task(s) {', '.join(missing)}; every task of the model needs data")
        # For every (task, label): the voxels holding that label, grouped by case.
        self.pools: dict[str, list[VoxelPool]] = {}
        for task in self.tasks:
            pools = []
            for label in (0, *label_indices_by_task[task]):
                case_numbers, flat_indices = [], []
                for number, case in enumerate(self.cases):
                    if case.task != task:
                        continue
                    where = np.flatnonzero((case.labels == label) & case.foreground)
                    case_numbers.append(np.full(where.size, number, dtype=np.int32))
                    flat_indices.append(where)
                sizes = np.array([part.size for part in flat_indices if part.size], dtype=np.int64)
                if sizes.size:
                    pools.append(VoxelPool(np.concatenate(case_numbers), np.concatenate(flat_indices),
                                           np.cumsum(sizes) - sizes, sizes))
            self.pools[task] = pools

    def sample(self, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``count`` samples as (case numbers (n,), voxel coordinates (n, 3) in z, y, x), task-grouped."""
        numbers, coordinates = [], []
        for task, task_count in zip(self.tasks, split_evenly(count, len(self.tasks), rng)):
            pools = self.pools[task]
            for pool, class_count in zip(pools, split_evenly(int(task_count), len(pools), rng)):
                picks = pool.picks(int(class_count), rng, self.per_case)
                for number, flat in zip(pool.numbers[picks], pool.flat[picks]):
                    numbers.append(number)
                    coordinates.append(np.unravel_index(flat, self.cases[number].labels.shape))
        return np.asarray(numbers, dtype=np.int64), np.asarray(coordinates, dtype=np.int64).reshape(-1, 3)
