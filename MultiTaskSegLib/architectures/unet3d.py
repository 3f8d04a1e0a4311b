"""Avetisian's volumetric U-Net: planar-factorised convolutions, soft IoU loss.

Training blocks are centred on positions from ``sampler.sample`` so every batch is balanced over
the model's tasks and their classes; a block reaching past the image is padded with zeros (the
normalised "nothing" value) and the padding is left out of the loss. Prediction accepts any volume
size and tiles large volumes into blended windows (:mod:`~MultiTaskSegLib.inferers`). On CUDA inference runs
under float16 autocast; on the CPU in float32. ``progress(fraction, stage)`` is called after every
window; ``cancelled()`` is checked before every window and raises
:class:`~MultiTaskSegLib.errors.CancelledError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..inferers import InferenceOptions, WindowGrid, blend_windows, inference_context, round_up
from ..losses import soft_iou_loss
from ..networks.unet_factorised import FactorisedUNet3d
from ..sampling import BalancedVoxelSampler
from .base import Architecture, MethodConfig, TrainingStep, default_field, network_default
from .inputs import as_ints, check_volume, crop_centred

# ---------------------------------------------------------------------------------------------
# Avetisian: volumetric U-Net with planar-factorised convolutions


@dataclass
class FactorisedUNet3DConfig(MethodConfig):
    """Arguments of :class:`FactorisedUNet3DArchitecture` (documented there)."""

    first_channels: int = network_default(FactorisedUNet3d, "first_channels")
    depth: int = network_default(FactorisedUNet3d, "depth")
    plane_kernels: Sequence[Sequence[int]] = default_field(
        [list(kernel) for kernel in network_default(FactorisedUNet3d, "plane_kernels")])
    block_dropout: float = network_default(FactorisedUNet3d, "block_dropout")
    output_dropout: float = network_default(FactorisedUNet3d, "output_dropout")
    up_kernel_size: int = network_default(FactorisedUNet3d, "up_kernel_size")
    block_shape: Sequence[int] = (32, 32, 32)
    learning_rate: float = 7.6e-5
    l2_weight: float = 3e-4
    gradient_clip: float = 1.0
    inference_margin: int = 16
    inference_block_voxels: int = 128**3

    def __post_init__(self) -> None:
        self.block_shape = as_ints(self.block_shape, 3, "block_shape")
        self.first_channels, self.depth, self.up_kernel_size = int(self.first_channels), int(self.depth), int(self.up_kernel_size)
        if any(side % 2**self.depth for side in self.block_shape):
            raise InputError(f"block_shape {list(self.block_shape)} must have sides that are multiples of 2^depth = {2**self.depth}")
        self.plane_kernels = [[int(side) for side in kernel] for kernel in self.plane_kernels]
        self.block_dropout, self.output_dropout = float(self.block_dropout), float(self.output_dropout)
        self.learning_rate, self.l2_weight, self.gradient_clip = float(self.learning_rate), float(self.l2_weight), float(self.gradient_clip)
        self.inference_margin, self.inference_block_voxels = int(self.inference_margin), int(self.inference_block_voxels)


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
    Config: ClassVar[type[FactorisedUNet3DConfig]] = FactorisedUNet3DConfig

    def build_network(self, num_labels: int) -> FactorisedUNet3d:
        config = self.config
        return FactorisedUNet3d(num_labels, first_channels=config.first_channels, depth=config.depth,
                                plane_kernels=config.plane_kernels, block_dropout=config.block_dropout,
                                output_dropout=config.output_dropout, up_kernel_size=config.up_kernel_size)

    def sample_batch(self, sampler: BalancedVoxelSampler, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        numbers, positions = sampler.sample(batch_size, rng)
        images, labels, inside = [], [], []
        for number, position in zip(numbers, positions):
            case = sampler.cases[number]
            image, valid = crop_centred(case.image.astype(np.float32, copy=False), position, self.config.block_shape)
            images.append(image)
            labels.append(crop_centred(case.labels, position, self.config.block_shape)[0].astype(np.int64))
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
        l2 = self.config.l2_weight * sum(
            (module.weight**2).sum() / 2 for module in self.network.modules() if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d))
        )
        return TrainingStep(iou + l2, {"iou_loss": float(iou.detach()), "l2": float(l2.detach())})

    def make_optimizer(self, learning_rate: float | None = None) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.network.parameters(), lr=learning_rate or self.config.learning_rate, betas=(0.9, 0.999))

    def clip_gradients(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.config.gradient_clip)

    def _predict(self, image: np.ndarray, device: torch.device, options: InferenceOptions) -> np.ndarray:
        image = check_volume(image)
        multiple = self.network.size_multiple
        grid = WindowGrid.plan(image[None, None], tuple(round_up(side, multiple) for side in image.shape), multiple,
                               options.max_block_voxels or self.config.inference_block_voxels,
                               margin=self.config.inference_margin)
        out = np.zeros((self.num_labels, *image.shape), np.float32)
        blocks = grid.windows_per_item
        stage = "Segmenting the volume" if blocks == 1 else f"Segmenting {blocks} blocks"

        def predict(batch: torch.Tensor) -> np.ndarray:
            return torch.softmax(self.network(batch).float(), dim=1).cpu().numpy()

        with inference_context(self.network, device):
            blend_windows(grid, predict, out[:, None], device, options, stage=stage)
        return out
