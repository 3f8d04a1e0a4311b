"""Avetisian's volumetric U-Net: planar-factorised convolutions, soft IoU loss.

Training blocks are centred on positions from ``sampler.sample`` so every batch is balanced over
the model's tasks and their classes; a block reaching past the image is padded with zeros (the
normalised "nothing" value) and the padding is left out of the loss. Prediction accepts any volume
size and tiles large volumes into blended windows (:mod:`.unet_windows`). On CUDA inference runs
under float16 autocast; on the CPU in float32. ``progress(fraction, stage)`` is called after every
window; ``cancelled()`` is checked before every window and raises
:class:`~MultiTaskSegLib.errors.CancelledError`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..losses import soft_iou_loss
from ..networks.blocks import AVETISIAN_PLANE_KERNELS
from ..networks.unet_factorised import FactorisedUNet3d
from .base import Architecture, CancelCheck, ProgressCallback, TrainingStep
from .unet_windows import (
    as_ints,
    check_volume,
    crop_centred,
    fit_window,
    inference_context,
    plan_axis_windows,
    raise_if_cancelled,
    report_progress,
    round_up,
    window_region,
    window_weight,
)

if TYPE_CHECKING:
    from ..sampling import BalancedVoxelSampler

# ---------------------------------------------------------------------------------------------
# Avetisian: volumetric U-Net with planar-factorised convolutions


class FactorisedUNet3DArchitecture(Architecture):
    """Avetisian's volumetric U-Net trained on 3-D blocks with the soft IoU loss.

    Args (network, see :class:`~MultiTaskSegLib.networks.unet_factorised.FactorisedUNet3d`):
        first_channels, depth, plane_kernels, block_dropout, output_dropout, up_kernel_size.
    Args (training):
        block_shape: (z, y, x) sides of a training block, multiples of ``2 ** depth``; each block is
            centred on one balanced position.
        learning_rate: Adam's learning rate (paper: 7.6e-5; ``make_optimizer`` may override it).
        l2_weight: weight of ``sum(w^2) / 2`` over all convolution weights (not biases), added to
            the loss (paper: 3e-4, TensorFlow's ``l2_loss`` convention).
        gradient_clip: the global gradient norm is clipped to this (paper: 1.0).
    Args (inference):
        inference_margin: context voxels a window gets beyond the part it contributes.
        inference_block_voxels: largest window when ``predict_probabilities`` gets no
            ``max_block_voxels``; smaller volumes run in one pass.
    """

    name: ClassVar[str] = "unet3d_factorised"
    summary: ClassVar[str] = (
        "Avetisian volumetric U-Net: four planar 3x3 convolutions per block, soft IoU loss, 3-D blocks"
    )

    def __init__(
        self,
        num_labels: int,
        task_names: Sequence[str],
        *,
        first_channels: int = 30,
        depth: int = 3,
        plane_kernels: Sequence[Sequence[int]] = AVETISIAN_PLANE_KERNELS,
        block_dropout: float = 0.15,
        output_dropout: float = 0.15,
        up_kernel_size: int = 2,
        block_shape: Sequence[int] = (32, 32, 32),
        learning_rate: float = 7.6e-5,
        l2_weight: float = 3e-4,
        gradient_clip: float = 1.0,
        inference_margin: int = 16,
        inference_block_voxels: int = 128**3,
    ) -> None:
        block_shape = as_ints(block_shape, 3, "block_shape")
        if any(side % 2**depth for side in block_shape):
            raise InputError(f"block_shape {block_shape} must have sides that are multiples of 2^depth = {2**depth}")
        super().__init__(
            num_labels,
            task_names,
            first_channels=int(first_channels),
            depth=int(depth),
            plane_kernels=[[int(side) for side in kernel] for kernel in plane_kernels],
            block_dropout=float(block_dropout),
            output_dropout=float(output_dropout),
            up_kernel_size=int(up_kernel_size),
            block_shape=block_shape,
            learning_rate=float(learning_rate),
            l2_weight=float(l2_weight),
            gradient_clip=float(gradient_clip),
            inference_margin=int(inference_margin),
            inference_block_voxels=int(inference_block_voxels),
        )
        self.block_shape = tuple(block_shape)
        self.learning_rate = float(learning_rate)
        self.l2_weight = float(l2_weight)
        self.gradient_clip = float(gradient_clip)
        self.inference_margin = int(inference_margin)
        self.inference_block_voxels = int(inference_block_voxels)

    def build_network(self, num_labels: int, **arguments: Any) -> FactorisedUNet3d:
        return FactorisedUNet3d(
            num_labels,
            first_channels=arguments["first_channels"],
            depth=arguments["depth"],
            plane_kernels=arguments["plane_kernels"],
            block_dropout=arguments["block_dropout"],
            output_dropout=arguments["output_dropout"],
            up_kernel_size=arguments["up_kernel_size"],
        )

    def sample_batch(self, sampler: BalancedVoxelSampler, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        numbers, positions = sampler.sample(batch_size, rng)
        images, labels, inside = [], [], []
        for number, position in zip(numbers, positions):
            case = sampler.cases[number]
            image, valid = crop_centred(case.image.astype(np.float32, copy=False), position, self.block_shape)
            images.append(image)
            labels.append(crop_centred(case.labels, position, self.block_shape)[0].astype(np.int64))
            inside.append(valid)
        return {
            "image": torch.from_numpy(np.stack(images)[:, None]),
            "labels": torch.from_numpy(np.stack(labels)),
            "valid": torch.from_numpy(np.stack(inside)),
        }

    def training_step(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> TrainingStep:
        image, labels, valid = (batch[key].to(device, non_blocking=True) for key in ("image", "labels", "valid"))
        probabilities = torch.softmax(self.network(image), dim=1)
        iou = soft_iou_loss(probabilities, labels, valid)
        l2 = self.l2_weight * sum(
            (module.weight**2).sum() / 2 for module in self.network.modules() if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d))
        )
        return TrainingStep(iou + l2, {"iou_loss": float(iou.detach()), "l2": float(l2.detach())})

    def make_optimizer(self, learning_rate: float | None = None) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.network.parameters(), lr=learning_rate or self.learning_rate, betas=(0.9, 0.999))

    def clip_gradients(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.gradient_clip)

    def predict_probabilities(
        self,
        image: np.ndarray,
        device: torch.device,
        progress: ProgressCallback | None = None,
        cancelled: CancelCheck | None = None,
        max_block_voxels: int | None = None,
    ) -> np.ndarray:
        image = check_volume(image)
        multiple = self.network.size_multiple
        padded_shape = tuple(round_up(side, multiple) for side in image.shape)
        padded = np.zeros(padded_shape, np.float32)
        padded[tuple(slice(0, side) for side in image.shape)] = image
        window = fit_window(padded_shape, max_block_voxels or self.inference_block_voxels, multiple)
        plans = [plan_axis_windows(length, side, self.inference_margin, multiple) for length, side in zip(padded_shape, window)]
        blocks = list(itertools.product(*(range(len(plan.starts)) for plan in plans)))
        summed = np.zeros((self.num_labels, *padded_shape), np.float32)
        total_weight = np.zeros(padded_shape, np.float32)
        stage = "Segmenting the volume" if len(blocks) == 1 else f"Segmenting {len(blocks)} blocks"
        report_progress(progress, 0.0, stage)
        with inference_context(self.network, device):
            for done, index in enumerate(blocks, start=1):
                raise_if_cancelled(cancelled)
                region = window_region(plans, index)
                weight = window_weight(plans, index)
                block = torch.from_numpy(np.ascontiguousarray(padded[region]))[None, None].to(device)
                probabilities = torch.softmax(self.network(block).float(), dim=1)[0].cpu().numpy()
                summed[(slice(None), *region)] += probabilities * weight
                total_weight[region] += weight
                report_progress(progress, done / len(blocks), stage)
        summed /= total_weight
        return np.ascontiguousarray(summed[(slice(None), *(slice(0, side) for side in image.shape))])
