"""Evaluation as in the papers: Dice and HD95 per class, precision-recall for binary tasks, task confusion.

Distances use SimpleITK's Maurer distance maps in millimetres on the image's own grid.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (nothing to find, nothing found)."""
    total = int(prediction.sum()) + int(reference.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(prediction, reference).sum()) / total


def dice_per_class(prediction: np.ndarray, reference: np.ndarray, labels: Iterable[int]) -> dict[int, float]:
    return {int(label): dice(prediction == label, reference == label) for label in labels}


def hausdorff95(prediction: sitk.Image, reference: sitk.Image) -> float:
    """95th percentile of the symmetric surface distance in mm.

    NaN when either mask is empty: an empty mask has no surface, so the distance is undefined.
    """
    # One voxel of background around both masks, so a mask touching the border has a surface there.
    prediction = sitk.ConstantPad(sitk.Cast(prediction, sitk.sitkUInt8), [1, 1, 1], [1, 1, 1], 0)
    reference = sitk.ConstantPad(sitk.Cast(reference, sitk.sitkUInt8), [1, 1, 1], [1, 1, 1], 0)
    if not sitk.GetArrayViewFromImage(prediction).any() or not sitk.GetArrayViewFromImage(reference).any():
        return float("nan")
    distances = []
    for source, target in ((prediction, reference), (reference, prediction)):
        distance_map = sitk.Abs(sitk.SignedMaurerDistanceMap(target, squaredDistance=False, useImageSpacing=True))
        contour = sitk.GetArrayFromImage(sitk.LabelContour(source)) > 0
        distances.append(sitk.GetArrayViewFromImage(distance_map)[contour])
    return float(np.percentile(np.concatenate(distances), 95))


def evaluate_labels(prediction: sitk.Image, reference: sitk.Image, labels: Sequence[int]) -> dict[int, dict[str, float]]:
    """Dice and HD95 per label value on the reference grid."""
    predicted = sitk.GetArrayViewFromImage(prediction)
    expected = sitk.GetArrayViewFromImage(reference)
    results = {}
    for label in labels:
        pred_mask = sitk.GetImageFromArray((predicted == label).astype(np.uint8))
        ref_mask = sitk.GetImageFromArray((expected == label).astype(np.uint8))
        pred_mask.CopyInformation(reference)
        ref_mask.CopyInformation(reference)
        results[int(label)] = {
            "dice": dice(predicted == label, expected == label),
            "hd95_mm": hausdorff95(pred_mask, ref_mask),
        }
    return results


def task_confusion(prediction: np.ndarray, alien_labels: Sequence[int]) -> float:
    """Share (in %) of voxels labelled with a class of another task than the scan's."""
    return 100.0 * float(np.isin(prediction, np.asarray(alien_labels)).mean())


def precision_recall_curve(probabilities: Sequence[np.ndarray], references: Sequence[np.ndarray],
                           thresholds: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Precision, recall and Dice over thresholds, pooled over all test scans (binary tasks).

    The optimal operating point is the threshold with the highest Dice over the whole test set,
    as in Moeskops et al.
    """
    thresholds = np.r_[np.linspace(0.05, 0.95, 19), 0.97, 0.98, 0.99, 0.995, 0.998, 0.999] if thresholds is None else np.asarray(thresholds)
    true_positive = np.zeros(thresholds.size)
    predicted_positive = np.zeros(thresholds.size)
    actual_positive = 0
    for probability, reference in zip(probabilities, references):
        reference = reference.astype(bool)
        actual_positive += int(reference.sum())
        order = np.sort(probability[reference])
        true_positive += reference.sum() - np.searchsorted(order, thresholds, side="left")
        everything = np.sort(probability.ravel())
        predicted_positive += everything.size - np.searchsorted(everything, thresholds, side="left")
    precision = np.divide(true_positive, predicted_positive, out=np.ones_like(true_positive), where=predicted_positive > 0)
    recall = true_positive / max(actual_positive, 1)
    dice_values = np.divide(2 * true_positive, predicted_positive + actual_positive,
                            out=np.zeros_like(true_positive), where=(predicted_positive + actual_positive) > 0)
    best = int(np.argmax(dice_values))
    return {"thresholds": thresholds, "precision": precision, "recall": recall, "dice": dice_values,
            "best_threshold": float(thresholds[best]), "best_dice": float(dice_values[best])}
