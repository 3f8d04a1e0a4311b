"""Mini-batch sampling balanced over tasks and, within each task, over the task's classes.

Moeskops et al. draw each mini-batch equally from every task of the network, and within a task
equally from each of its classes (background included), from all voxels of all training images
whose intensity is above zero. Every architecture draws its samples (voxels, patch centres,
slices) through this one sampler so that all of them see the same balance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InputError


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


class BalancedVoxelSampler:
    """Draws voxel positions balanced over tasks, then over each task's labels.

    ``label_indices_by_task`` maps each task to its label-space indices (background excluded);
    background (0) is always added as one more class of every task.
    """

    def __init__(self, cases: Sequence[PreparedCase], label_indices_by_task: Mapping[str, Sequence[int]]):
        if not cases:
            raise InputError("no training cases: give at least one image + label per task")
        self.cases = list(cases)
        self.tasks = tuple(label_indices_by_task)
        missing = [task for task in self.tasks if not any(case.task == task for case in self.cases)]
        if missing:
            raise InputError(f"no training cases for task(s) {', '.join(missing)}; every task of the model needs data")
        # For every (task, label): the case numbers and flat voxel indices holding that label.
        self.pools: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
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
                numbers = np.concatenate(case_numbers) if case_numbers else np.empty(0, np.int32)
                if numbers.size:
                    pools.append((numbers, np.concatenate(flat_indices)))
            self.pools[task] = pools

    def sample(self, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``count`` samples as (case numbers (n,), voxel coordinates (n, 3) in z, y, x), task-grouped."""
        numbers, coordinates = [], []
        for task, task_count in zip(self.tasks, split_evenly(count, len(self.tasks), rng)):
            pools = self.pools[task]
            for (pool_numbers, pool_flat), class_count in zip(pools, split_evenly(int(task_count), len(pools), rng)):
                picks = rng.integers(0, pool_numbers.size, size=int(class_count))
                for number, flat in zip(pool_numbers[picks], pool_flat[picks]):
                    numbers.append(number)
                    coordinates.append(np.unravel_index(flat, self.cases[number].labels.shape))
        return np.asarray(numbers, dtype=np.int64), np.asarray(coordinates, dtype=np.int64).reshape(-1, 3)
