"""Metrics against hand-computed values: Dice, HD95 in millimetres, task confusion, precision-recall."""

import numpy as np
import pytest
import SimpleITK as sitk

from MultiTaskSegLib.evaluation import dice, evaluate_labels, hausdorff95, precision_recall_curve, task_confusion


def mask_image(array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    return image


def test_dice_of_overlapping_boxes():
    first = np.zeros((4, 4, 4), bool)
    second = np.zeros((4, 4, 4), bool)
    first[:2] = True   # 32 voxels
    second[1:3] = True  # 32 voxels, 16 shared
    assert dice(first, second) == pytest.approx(0.5)
    assert dice(first, first) == 1.0
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


def test_hausdorff95_of_a_shifted_slab_is_the_shift_in_millimetres():
    first = np.zeros((20, 10, 10), np.uint8)
    second = np.zeros_like(first)
    first[5:10] = 1
    second[8:13] = 1  # shifted by 3 slices of 2 mm
    assert hausdorff95(mask_image(first, (1, 1, 2)), mask_image(second, (1, 1, 2))) == pytest.approx(6.0)
    assert hausdorff95(mask_image(first), mask_image(first)) == 0.0


def test_hausdorff95_is_finite_for_a_mask_that_fills_the_volume_and_nan_for_an_empty_one():
    full = np.ones((6, 6, 6), np.uint8)
    inner = np.zeros_like(full)
    inner[1:5, 1:5, 1:5] = 1
    # Surface to surface: the inner cube's 56 surface voxels are 1 mm from the full cube's surface;
    # of its 152 surface voxels, 96 face voxels are 1 mm, 48 edge voxels sqrt(2), 8 corners sqrt(3)
    # away from the inner surface: the 95th percentile of the 208 distances is sqrt(2).
    assert hausdorff95(mask_image(full), mask_image(inner)) == pytest.approx(np.sqrt(2))
    assert np.isnan(hausdorff95(mask_image(full), mask_image(np.zeros_like(full))))


def test_evaluate_labels_reports_each_class():
    reference = np.zeros((8, 8, 8), np.uint8)
    reference[:4] = 1
    reference[4:] = 2
    prediction = reference.copy()
    prediction[3] = 2
    results = evaluate_labels(mask_image(prediction), mask_image(reference), [1, 2])
    assert results[1]["dice"] == pytest.approx(2 * 3 / 7)
    assert results[2]["dice"] == pytest.approx(2 * 4 / 9)
    assert results[1]["hd95_mm"] == pytest.approx(1.0)


def test_task_confusion_is_the_share_of_voxels_in_alien_classes():
    prediction = np.zeros(10_000, np.uint8)
    prediction[:3] = 7
    prediction[3:10] = 1
    assert task_confusion(prediction, alien_labels=[7, 8]) == pytest.approx(0.03)


def test_best_operating_point_maximises_dice_over_the_whole_test_set():
    reference = np.array([1, 1, 1, 0, 0, 0], bool)
    probability = np.array([0.9, 0.8, 0.35, 0.3, 0.1, 0.0])
    curve = precision_recall_curve([probability], [reference], thresholds=np.array([0.2, 0.32, 0.5]))
    # t=0.2: 4 predicted, 3 right -> Dice 6/7; t=0.32: 3 right of 3 -> 1.0; t=0.5: 2 of 3 -> 0.8
    assert curve["dice"] == pytest.approx([6 / 7, 1.0, 0.8])
    assert curve["precision"] == pytest.approx([0.75, 1.0, 1.0])
    assert curve["recall"] == pytest.approx([1.0, 1.0, 2 / 3])
    assert curve["best_threshold"] == 0.32
