"""Building blocks shared by the U-Net family (MONAI style: small modules, explicit arguments).

* :class:`FactorisedConvBlock3d`: Avetisian's volumetric block, four planar 3x3 convolutions.
* :class:`DoubleConvBlock`: two 3x3 convolutions with instance norm and LeakyReLU (CMU-Net).
* :class:`HalvingMaxPool`: 2x max-pooling as pairwise maxima (PyTorch's CPU max-pool is ~10x slower).
* :class:`UpConv`: a transposed convolution that doubles every spatial side.
* :class:`PresenceHead`: global average pooling and one fully connected layer (CMU-Net).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: Avetisian's four planar kernels in (z, y, x): one flat in each axis, then the axial plane again.
#: The paper says "four 2D convolutions along different axes" with 3x3 kernels (36 weights per
#: channel pair); a volume has only three planes, so the fourth repeats the first (Figure 2 of the
#: paper, which would settle it, is not available).
AVETISIAN_PLANE_KERNELS: tuple[tuple[int, int, int], ...] = ((1, 3, 3), (3, 1, 3), (3, 3, 1), (1, 3, 3))


def _conv_nd(spatial_dims: int) -> type[nn.Module]:
    if spatial_dims == 2:
        return nn.Conv2d
    if spatial_dims == 3:
        return nn.Conv3d
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


class FactorisedConvBlock3d(nn.Sequential):
    """Planar convolutions, each followed by ReLU and dropout: ``(N, in, D, H, W) -> (N, out, D, H, W)``.

    Args:
        in_channels: channels of the input.
        out_channels: channels of every convolution's output.
        plane_kernels: kernel size (z, y, x) of each convolution, in order; odd sides, "same" padding.
            The default is Avetisian's block (see :data:`AVETISIAN_PLANE_KERNELS`).
        dropout: drop probability after each convolution (the paper's keep probability is 0.85).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        plane_kernels: Sequence[Sequence[int]] = AVETISIAN_PLANE_KERNELS,
        dropout: float = 0.15,
    ) -> None:
        layers: list[nn.Module] = []
        channels = in_channels
        for kernel in plane_kernels:
            kernel = tuple(int(side) for side in kernel)
            if len(kernel) != 3 or any(side < 1 or side % 2 == 0 for side in kernel):
                raise ValueError(f"each plane kernel needs three odd sides (z, y, x), got {kernel}")
            layers += [
                nn.Conv3d(channels, out_channels, kernel, padding=tuple(side // 2 for side in kernel)),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
            ]
            channels = out_channels
        if not layers:
            raise ValueError("plane_kernels is empty; a block needs at least one convolution")
        super().__init__(*layers)


class DoubleConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by instance norm and LeakyReLU.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the input.
        out_channels: channels of both convolutions' outputs.
        negative_slope: LeakyReLU slope for negative inputs (CMU-Net: 0.2).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, negative_slope: float = 0.2) -> None:
        conv = _conv_nd(spatial_dims)
        norm = nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d
        super().__init__(
            conv(in_channels, out_channels, 3, padding=1),
            norm(out_channels, affine=True),
            nn.LeakyReLU(negative_slope, inplace=True),
            conv(out_channels, out_channels, 3, padding=1),
            norm(out_channels, affine=True),
            nn.LeakyReLU(negative_slope, inplace=True),
        )


class HalvingMaxPool(nn.Module):
    """Max-pooling by 2 in every spatial axis, as ``nn.MaxPool2d(2)`` / ``nn.MaxPool3d(2)`` (same values).

    On even sides it takes the maximum of the even and odd voxels axis by axis: on the CPU
    PyTorch's max-pool kernel computes the arg-max indices too and took 19 % of the 2-D U-Net's
    bfloat16 inference time, the pairwise maxima about a tenth of that. Odd sides fall back to
    PyTorch's max-pool (which drops the last voxel).

    Args:
        spatial_dims: 2 or 3.
    """

    def __init__(self, spatial_dims: int) -> None:
        super().__init__()
        _conv_nd(spatial_dims)  # validates spatial_dims
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sides = x.shape[-self.spatial_dims:]
        if any(side % 2 for side in sides):
            pool = nn.functional.max_pool2d if self.spatial_dims == 2 else nn.functional.max_pool3d
            return pool(x, 2)
        for axis in range(x.ndim - self.spatial_dims, x.ndim):
            x = torch.maximum(x[_every_other(x.ndim, axis, 0)], x[_every_other(x.ndim, axis, 1)])
        return x


def _every_other(ndim: int, axis: int, first: int) -> tuple[slice, ...]:
    """Index of every second voxel along ``axis``, starting at ``first``."""
    return tuple(slice(first, None, 2) if number == axis else slice(None) for number in range(ndim))


class UpConv(nn.Module):
    """Transposed convolution with stride 2: every spatial side doubles exactly.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the coarse input.
        out_channels: channels of the upsampled output.
        kernel_size: 2 covers every output voxel once; 1 (Avetisian's "1x1 upconvolution") writes
            only one voxel of every 2x2(x2) cell and leaves the others at the bias.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 2) -> None:
        super().__init__()
        if kernel_size not in (1, 2):
            raise ValueError(f"kernel_size must be 1 or 2 so the output is exactly twice the input, got {kernel_size}")
        transposed = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
        _conv_nd(spatial_dims)  # validates spatial_dims
        self.conv = transposed(in_channels, out_channels, kernel_size, stride=2, output_padding=2 - kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PresenceHead(nn.Module):
    """Global average pooling and one fully connected layer: ``(N, C, ...) -> (N, classes)`` logits.

    Args:
        in_channels: channels of the feature map it reads (the encoder bottleneck).
        num_classes: one logit per class, each an independent present/absent decision.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features.flatten(2).mean(dim=2))
