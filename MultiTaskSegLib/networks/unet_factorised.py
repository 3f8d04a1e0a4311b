"""The volumetric U-Net of Avetisian, "Volumetric medical image segmentation with deep convolutional
neural networks".

Every convolutional block is four planar 3x3 convolutions along different axes instead of 3x3x3
ones (:class:`~.blocks.FactorisedConvBlock3d`), each followed by ReLU and dropout. The encoder
max-pools and doubles the channels per level; the decoder upsamples with transposed convolutions and
concatenates the encoder output of the same level. Dropout sits right before the 1x1x1 output
convolution. The paper needed image sides of ``2^3 n``, i.e. three poolings (four levels), with
30 channels in the first level; no batch normalisation (the paper found it unstable).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .blocks import AVETISIAN_PLANE_KERNELS, FactorisedConvBlock3d, HalvingMaxPool, UpConv


class FactorisedUNet3d(nn.Module):
    """``(N, in_channels, D, H, W) -> (N, num_labels, D, H, W)`` logits; every side a multiple of
    :attr:`size_multiple` (``2 ** depth``).

    Args:
        num_labels: output channels (the model's label space, background included).
        in_channels: image channels.
        first_channels: channels of the first level; doubled at every level (paper: 30).
        depth: number of max-poolings (paper: 3, hence its ``2^3 n`` image sides).
        plane_kernels: kernels of one block's convolutions (paper: four planar 3x3 kernels).
        block_dropout: drop probability after every convolution of a block.
        output_dropout: drop probability right before the output layer (paper: keep 0.85).
        up_kernel_size: kernel of the transposed convolutions. The paper writes "1x1"; with stride 2
            that leaves three of every four (2-D) or seven of every eight (3-D) upsampled voxels
            empty, so the default is 2, which fills each one; pass 1 to follow the text literally.
    """

    def __init__(
        self,
        num_labels: int,
        in_channels: int = 1,
        first_channels: int = 30,
        depth: int = 3,
        plane_kernels: Sequence[Sequence[int]] = AVETISIAN_PLANE_KERNELS,
        block_dropout: float = 0.15,
        output_dropout: float = 0.15,
        up_kernel_size: int = 2,
    ) -> None:
        super().__init__()
        if depth < 0 or first_channels < 1 or num_labels < 2:
            raise ValueError(
                f"need depth >= 0, first_channels >= 1 and num_labels >= 2, got {depth}, {first_channels}, {num_labels}"
            )
        self.depth = depth
        channels = [first_channels * 2**level for level in range(depth + 1)]
        self.encoder = nn.ModuleList(
            FactorisedConvBlock3d(source, target, plane_kernels, block_dropout)
            for source, target in zip([in_channels, *channels[:-1]], channels)
        )
        self.pool = HalvingMaxPool(3)
        self.upsample = nn.ModuleList(
            UpConv(3, channels[level + 1], channels[level], up_kernel_size) for level in reversed(range(depth))
        )
        self.decoder = nn.ModuleList(
            FactorisedConvBlock3d(2 * channels[level], channels[level], plane_kernels, block_dropout)
            for level in reversed(range(depth))
        )
        self.output_dropout = nn.Dropout(output_dropout)
        self.output = nn.Conv3d(channels[0], num_labels, 1)
        self._initialise_weights()

    def _initialise_weights(self) -> None:
        # Without normalisation layers, PyTorch's default initialisation shrinks the signal at every
        # one of the many ReLU convolutions; He initialisation (as the U-Net paper) keeps its scale.
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)) and module is not self.output:
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    @property
    def size_multiple(self) -> int:
        """Every input side must be a multiple of this."""
        return 2**self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(side % self.size_multiple for side in x.shape[2:]):
            raise ValueError(f"input sides {tuple(x.shape[2:])} must be multiples of {self.size_multiple}; pad the input")
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(x)
            if level < self.depth:
                skips.append(x)
                x = self.pool(x)
        for upsample, block, skip in zip(self.upsample, self.decoder, reversed(skips)):
            x = block(torch.cat([upsample(x), skip], dim=1))
        return self.output(self.output_dropout(x))
