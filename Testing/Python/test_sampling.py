"""Mini-batches are balanced over tasks and, within each task, over the task's classes."""

import numpy as np
import pytest

from MultiTaskSegLib.sampling import PreparedCase
from MultiTaskSegLib.errors import InputError
from MultiTaskSegLib.sampling import BalancedVoxelSampler


def case(task: str, name: str, labels: np.ndarray, foreground: np.ndarray | None = None) -> PreparedCase:
    return PreparedCase(task, name, labels.astype(np.float32), labels.astype(np.int16),
                        np.ones(labels.shape, bool) if foreground is None else foreground)


@pytest.fixture
def cases() -> list[PreparedCase]:
    brain = np.zeros((10, 10, 10), np.int16)
    brain[2:8, 2:8, 2:8] = 1        # a big class
    brain[4, 4, 4:6] = 2            # a class of two voxels
    breast = np.zeros((6, 6, 6), np.int16)
    breast[0, 0, 0] = 3             # one voxel of the only class
    breast_foreground = np.ones_like(breast, bool)
    breast_foreground[3:] = False   # background outside the foreground is never sampled
    other_brain = np.zeros((4, 4, 4), np.int16)
    other_brain[1, 1, 1] = 2
    return [case("brain", "a", brain), case("breast", "b", breast, breast_foreground), case("brain", "c", other_brain)]


def test_batch_is_split_equally_over_tasks_and_their_classes(cases):
    sampler = BalancedVoxelSampler(cases, {"brain": (1, 2), "breast": (3,)})
    counts = {}
    for seed in range(5):
        numbers, coordinates = sampler.sample(210, np.random.default_rng(seed))
        assert len(numbers) == 210
        for number, (z, y, x) in zip(numbers, coordinates):
            key = (cases[number].task, int(cases[number].labels[z, y, x]))
            counts[key] = counts.get(key, 0) + 1
            assert cases[number].foreground[z, y, x]
    # 105 per task per batch; brain: 35 each for background, class 1, class 2; breast: 52-53 each.
    assert counts[("brain", 0)] == counts[("brain", 1)] == counts[("brain", 2)] == 5 * 35
    assert abs(counts[("breast", 0)] - counts[("breast", 3)]) <= 5
    assert counts[("breast", 0)] + counts[("breast", 3)] == 5 * 105


def test_rare_classes_are_drawn_from_every_case_that_has_them(cases):
    sampler = BalancedVoxelSampler(cases, {"brain": (1, 2), "breast": (3,)})
    numbers, coordinates = sampler.sample(2100, np.random.default_rng(0))
    rare = {int(n) for n, (z, y, x) in zip(numbers, coordinates) if cases[n].labels[z, y, x] == 2}
    assert rare == {0, 2}


def test_same_seed_gives_the_same_batch(cases):
    sampler = BalancedVoxelSampler(cases, {"brain": (1, 2), "breast": (3,)})
    first = sampler.sample(50, np.random.default_rng(7))
    second = sampler.sample(50, np.random.default_rng(7))
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_a_task_without_cases_is_refused(cases):
    with pytest.raises(InputError, match="no training cases for task"):
        BalancedVoxelSampler(cases, {"brain": (1, 2), "cardiac": (4,)})


def tumour_cases() -> list[PreparedCase]:
    """Two crops, one with a tumour of 8 voxels, one with a tumour of 512 voxels."""
    small, large = np.zeros((12, 12, 12), np.int16), np.zeros((12, 12, 12), np.int16)
    small[5:7, 5:7, 5:7] = 1
    large[2:10, 2:10, 2:10] = 1
    return [case("sarcoma", "small", small), case("sarcoma", "large", large)]


def tumour_samples_per_case(sampler: BalancedVoxelSampler, cases: list[PreparedCase]) -> np.ndarray:
    numbers, coordinates = sampler.sample(4000, np.random.default_rng(0))
    tumour = np.array([cases[n].labels[tuple(c)] == 1 for n, c in zip(numbers, coordinates)])
    assert tumour.sum() == 2000  # half the batch is tumour either way
    return np.bincount(numbers[tumour], minlength=len(cases))


def test_by_voxels_a_small_tumour_is_drawn_in_proportion_to_its_volume():
    cases = tumour_cases()
    small, large = tumour_samples_per_case(BalancedVoxelSampler(cases, {"sarcoma": (1,)}), cases)
    assert 10 < small < 60 and small + large == 2000  # expected 2000 * 8 / 520 = 31


def test_by_cases_a_small_tumour_is_drawn_as_often_as_a_large_one():
    cases = tumour_cases()
    sampler = BalancedVoxelSampler(cases, {"sarcoma": (1,)}, per_case=True)
    small, large = tumour_samples_per_case(sampler, cases)
    assert abs(small - large) < 150
    numbers, coordinates = sampler.sample(4000, np.random.default_rng(1))
    drawn = {tuple(c) for n, c in zip(numbers, coordinates) if n == 0 and cases[0].labels[tuple(c)] == 1}
    assert len(drawn) == 8  # every voxel of the small tumour, none outside it
