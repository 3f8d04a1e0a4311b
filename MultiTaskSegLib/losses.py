"""Losses of the U-Net family.

Segmentation losses take softmax probabilities ``(N, L, *spatial)`` and label-space indices
``(N, *spatial)``; ``valid`` (``(N, *spatial)``, optional) marks the voxels that count, so padding
added around a crop that reached past the image border is left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _one_hot(labels: torch.Tensor, num_labels: int, dtype: torch.dtype) -> torch.Tensor:
    return F.one_hot(labels.long(), num_labels).movedim(-1, 1).to(dtype)


def _masked(probabilities: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None):
    if valid is None:
        return probabilities, target
    weight = valid.unsqueeze(1).to(probabilities.dtype)
    return probabilities * weight, target * weight


def soft_iou_loss(
    probabilities: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor | None = None,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """``1 - IoU`` with Avetisian's multi-class soft IoU, background channel excluded.

    ``IoU = sum(y * p) / (sum(y) + sum(p) - sum(y * p))`` over every foreground channel, voxel and
    batch item together (one ratio, as the paper's formula has it, not a mean of per-class ratios);
    ``y`` is the one-hot label, ``p`` the softmax probability. ``smooth`` is added to numerator and
    denominator so a batch without foreground that predicts none costs nothing.
    """
    target = _one_hot(labels, probabilities.shape[1], probabilities.dtype)
    probabilities, target = _masked(probabilities[:, 1:], target[:, 1:], valid)
    intersection = (probabilities * target).sum()
    union = probabilities.sum() + target.sum() - intersection
    return 1 - (intersection + smooth) / (union + smooth)


def soft_dice_loss(
    probabilities: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor | None = None,
    include_background: bool = False,
    smooth: float = 1e-5,
    per_item: bool = False,
) -> torch.Tensor:
    """``1 - mean over classes of (2 sum(y p) + smooth) / (sum(y) + sum(p) + smooth)``.

    Sums run over the batch and the voxels (one Dice per class for the whole batch, "batch Dice");
    the mean runs over label-space classes 1.. (0 too when ``include_background``). With a softmax
    over the label space the background is learnt through the other classes, as in CMU-Net's binary
    Dice loss. ``per_item`` sums over each item's voxels only and averages the items' Dice (MONAI's
    ``DiceLoss`` default): a slice of a small tumour then weighs as much as one of a large tumour,
    where batch Dice weighs each by its voxels; an item without the class scores near 0 unless it
    predicts none of it.
    """
    target = _one_hot(labels, probabilities.shape[1], probabilities.dtype)
    first = 0 if include_background else 1
    probabilities, target = _masked(probabilities[:, first:], target[:, first:], valid)
    dims = [*([] if per_item else [0]), *range(2, probabilities.dim())]
    intersection = (probabilities * target).sum(dims)
    total = probabilities.sum(dims) + target.sum(dims)
    return 1 - ((2 * intersection + smooth) / (total + smooth)).mean()


def presence_focal_loss(
    logits: torch.Tensor,
    present: torch.Tensor,
    positive_weight: float = 0.8,
    negative_weight: float = 0.2,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Binary focal loss (Lin et al.) per class on presence logits, averaged over items and classes.

    ``present`` holds 1 where the class is present, 0 where absent, same shape as ``logits``.
    ``-a_t (1 - p_t)^gamma log(p_t)`` with ``p_t = sigmoid(logit)`` for present classes and
    ``1 - sigmoid(logit)`` for absent ones, ``a_t`` = ``positive_weight`` / ``negative_weight``
    (CMU-Net: 0.8 / 0.2; 0.5 / 0.5 for its pre-trained encoder).
    """
    present = present.to(logits.dtype)
    log_p_t = -F.binary_cross_entropy_with_logits(logits, present, reduction="none")
    weight = present * positive_weight + (1 - present) * negative_weight
    return (-weight * (1 - log_p_t.exp()) ** gamma * log_p_t).mean()
