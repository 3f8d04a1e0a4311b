"""CMU-Net of Moseley, Wang and Imran, "Context-aware multitasking for medical image segmentation".

A 2-D U-Net whose encoder also feeds a classification head that says, per class, whether the class
is present in the input slice. Five encoder blocks (two 3x3 convolutions with instance norm and
LeakyReLU 0.2 each) go from 16 to 256 channels, doubling per block with a max-pooling in between;
five decoder blocks mirror them from 256 back to 16: the first works on the bottleneck, each of the
other four follows an upsampling (transposed convolution) and concatenation with the encoder output
of its level. A 1x1 convolution gives the segmentation logits. The head (global average pooling and
one fully connected layer) reads the bottleneck, the last encoder block's output.

Without the head this is the paper's baseline U-Net (all the paper's models share one architecture
and differ only in training).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .blocks import DoubleConvBlock, HalvingMaxPool, PresenceHead, UpConv


class CMUNet(nn.Module):
    """``(N, in_channels, H, W) -> (N, num_labels, H, W)`` segmentation logits; every side a multiple
    of :attr:`size_multiple`. With a head, :meth:`classify` gives ``(N, num_labels - 1)`` presence
    logits for label-space classes 1.. (background has no presence logit).

    Args:
        num_labels: segmentation output channels (the model's label space, background included).
        in_channels: image channels.
        channels: channels of each encoder block, one block per entry (paper: 16 ... 256).
        negative_slope: LeakyReLU slope (paper: 0.2).
        presence_head: add the classification head (CMU-Net); ``False`` gives the plain U-Net.
    """

    def __init__(
        self,
        num_labels: int,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        negative_slope: float = 0.2,
        presence_head: bool = True,
    ) -> None:
        super().__init__()
        channels = tuple(int(count) for count in channels)
        if len(channels) < 1 or min(channels) < 1 or num_labels < 2:
            raise ValueError(f"need at least one positive channel count and num_labels >= 2, got {channels}, {num_labels}")
        self.channels = channels
        self.encoder = nn.ModuleList(
            DoubleConvBlock(2, source, target, negative_slope) for source, target in zip([in_channels, *channels[:-1]], channels)
        )
        self.pool = HalvingMaxPool(2)
        self.bottleneck_decoder = DoubleConvBlock(2, channels[-1], channels[-1], negative_slope)
        self.upsample = nn.ModuleList(
            UpConv(2, channels[level + 1], channels[level]) for level in reversed(range(len(channels) - 1))
        )
        self.decoder = nn.ModuleList(
            DoubleConvBlock(2, 2 * channels[level], channels[level], negative_slope)
            for level in reversed(range(len(channels) - 1))
        )
        self.output = nn.Conv2d(channels[0], num_labels, 1)
        self.head = PresenceHead(channels[-1], num_labels - 1) if presence_head else None

    @property
    def size_multiple(self) -> int:
        """Every input side must be a multiple of this."""
        return 2 ** (len(self.channels) - 1)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every encoder block, finest first; the last one is the bottleneck."""
        if any(side % self.size_multiple for side in x.shape[2:]):
            raise ValueError(f"input sides {tuple(x.shape[2:])} must be multiples of {self.size_multiple}; pad the input")
        features = []
        for level, block in enumerate(self.encoder):
            x = block(self.pool(x) if level else x)
            features.append(x)
        return features

    def decode(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Segmentation logits from :meth:`encode`'s output."""
        x = self.bottleneck_decoder(features[-1])
        for upsample, block, skip in zip(self.upsample, self.decoder, reversed(features[:-1])):
            x = block(torch.cat([upsample(x), skip], dim=1))
        return self.output(x)

    def classify(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """Presence logits ``(N, num_labels - 1)`` from the bottleneck (``encode(x)[-1]``)."""
        if self.head is None:
            raise RuntimeError("this U-Net was built without a presence head")
        return self.head(bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
