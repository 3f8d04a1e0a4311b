"""The multi-task triplanar CNN of Moeskops et al. (2017), "Deep learning for multi-task medical
image segmentation in multiple modalities".

Every voxel is classified from three orthogonal 51x51 patches centred on it. One stack of 25
valid (unpadded) 3x3 convolutions with 32 kernels, batch normalisation and ELU, without any
subsampling, is shared by the three planes and turns each patch into 32 features (25 valid layers
shrink 51 to 1). The 3 x 32 features go through two fully connected layers of 192 units and a
softmax layer over the model's label space; the fully connected layers are 1x1 convolutions so
that the same weights classify one voxel or a whole block.

Axis conventions (volumes are numpy/torch ``(z, y, x)``):

* axial plane: the ``(y, x)`` slice at fixed ``z`` (rows y, columns x);
* coronal plane: the ``(z, x)`` slice at fixed ``y`` (rows z, columns x);
* sagittal plane: the ``(z, y)`` slice at fixed ``x`` (rows z, columns y).

A plane's patch is always laid out with rows and columns in this order, so the shared convolution
stack sees the same orientation in training, in patch-wise and in dense prediction.

Because the convolutions are valid and nothing is subsampled, running the stack on a slice that is
larger than a patch by ``g - 1`` voxels gives, at each output position, exactly the features of the
patch centred there. :meth:`TriplanarNetwork.forward_block` uses this to classify a whole
``(gz, gy, gx)`` block of voxels from ``gz`` axial, ``gy`` coronal and ``gx`` sagittal slices;
:meth:`TriplanarNetwork.forward` is the plain one-voxel-from-three-patches definition.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


class PlanarConvBlock(nn.Sequential):
    """One 3x3 valid convolution, batch normalisation and ELU (the bias is left to batch norm)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ELU(inplace=True),
        )


class PlanarFeatureStack(nn.Module):
    """The convolution stack shared by the three planes: ``(N, in, H, W) -> (N, C, H - 2L, W - 2L)``.

    Args:
        layers: number ``L`` of 3x3 valid convolution layers; the patch (receptive field) is
            ``2 L + 1`` voxels wide. The paper uses 25 (51x51 patches).
        channels: kernels per layer (features per plane). The paper uses 32.
        in_channels: image channels; the paper segments single-channel images.
    """

    def __init__(self, layers: int = 25, channels: int = 32, in_channels: int = 1) -> None:
        super().__init__()
        if layers < 1 or channels < 1 or in_channels < 1:
            raise ValueError(
                f"layers, channels and in_channels must be positive, got {layers}, {channels}, {in_channels}"
            )
        self.layers = layers
        self.channels = channels
        self.in_channels = in_channels
        self.blocks = nn.Sequential(
            *(PlanarConvBlock(in_channels if number == 0 else channels, channels) for number in range(layers))
        )

    @property
    def margin(self) -> int:
        """Voxels each side of the centre that a feature depends on (``L``)."""
        return self.layers

    @property
    def patch_size(self) -> int:
        """Width of the square patch that yields exactly one feature vector (``2 L + 1``)."""
        return 2 * self.layers + 1

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        if slices.dim() != 4 or slices.shape[1] != self.in_channels:
            raise ValueError(f"expected slices (N, {self.in_channels}, H, W), got shape {tuple(slices.shape)}")
        if min(slices.shape[-2:]) < self.patch_size:
            raise ValueError(
                f"slices of {tuple(slices.shape[-2:])} are smaller than the {self.patch_size}x{self.patch_size} "
                "receptive field; pad them by the network margin first"
            )
        first, rest = self.blocks[0], self.blocks[1:]
        # The first layer measures differences of nearby intensities, which rounding the image to
        # bfloat16 or float16 would perturb by several per cent; it costs 1/C of a layer, so under
        # autocast it keeps the input's precision.
        with torch.autocast(slices.device.type, enabled=False):
            features = first(slices)
        # Channels-last activations let oneDNN/cuDNN skip a layout reorder around every layer (about
        # 25 % faster on the CPU); a 1-channel input cannot carry that layout, so it starts here.
        return rest(features.contiguous(memory_format=torch.channels_last))


class PointwiseClassifier(nn.Module):
    """Fully connected layers as 1x1 convolutions: ``(N, F, *spatial) -> (N, labels, *spatial)``.

    Each hidden layer is a 1x1 convolution, batch normalisation, ELU and dropout; the last layer
    gives one logit per label (softmax is left to the loss / the caller). Works on any number of
    spatial dimensions, including none (``(N, F)``), so patches and whole blocks share the weights.

    Args:
        in_features: features per voxel (3 planes x the stack's channels; 96 in the paper).
        num_labels: size of the label space (shared background + every task's classes).
        hidden_features: units per fully connected layer; the paper uses 192.
        hidden_layers: number of fully connected layers before the output; the paper uses 2.
        dropout: dropout probability after each hidden layer. The paper uses dropout without
            giving the rate; 0.5 is the rate recommended by Srivastava et al. for hidden units.
    """

    def __init__(
        self,
        in_features: int,
        num_labels: int,
        hidden_features: int = 192,
        hidden_layers: int = 2,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"a label space has background and at least one class, got num_labels={num_labels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(hidden_layers):
            layers += [
                nn.Conv1d(width, hidden_features, kernel_size=1, bias=False),
                nn.BatchNorm1d(hidden_features),
                nn.ELU(inplace=True),
                nn.Dropout(dropout),
            ]
            width = hidden_features
        layers.append(nn.Conv1d(width, num_labels, kernel_size=1))
        self.layers = nn.Sequential(*layers)
        self.in_features = in_features
        self.hidden_features = hidden_features if hidden_layers else in_features
        self.num_labels = num_labels

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() < 2 or features.shape[1] != self.in_features:
            raise ValueError(f"expected features (N, {self.in_features}, ...), got shape {tuple(features.shape)}")
        spatial = features.shape[2:]
        logits = self.layers(features.reshape(features.shape[0], self.in_features, -1))
        return logits.reshape(features.shape[0], self.num_labels, *spatial)


class TriplanarNetwork(nn.Module):
    """Shared planar convolution stack + pointwise classifier over three orthogonal planes.

    Args:
        num_labels: size of the label space (shared background + all tasks' classes).
        layers: 3x3 valid convolution layers (25 in the paper, giving 51x51 patches).
        channels: kernels per convolution layer (32 in the paper; 3 x 32 = 96 features per voxel).
        hidden_features: units of each fully connected layer (192 in the paper).
        hidden_layers: fully connected layers before the output layer (2 in the paper).
        dropout: dropout probability in the fully connected layers (rate not given in the paper).
    """

    def __init__(
        self,
        num_labels: int,
        layers: int = 25,
        channels: int = 32,
        hidden_features: int = 192,
        hidden_layers: int = 2,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.features = PlanarFeatureStack(layers, channels)
        self.classifier = PointwiseClassifier(3 * channels, num_labels, hidden_features, hidden_layers, dropout)
        self.num_labels = num_labels

    @property
    def margin(self) -> int:
        """Voxels each side of a voxel that its prediction depends on, in every plane."""
        return self.features.margin

    @property
    def patch_size(self) -> int:
        return self.features.patch_size

    def forward(self, axial: torch.Tensor, coronal: torch.Tensor, sagittal: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, labels)`` of N voxels from their three ``(N, 1, P, P)`` patches (the paper's definition)."""
        size = self.patch_size
        for plane, patches in (("axial", axial), ("coronal", coronal), ("sagittal", sagittal)):
            if tuple(patches.shape[1:]) != (1, size, size):
                raise ValueError(f"{plane} patches must be (N, 1, {size}, {size}), got {tuple(patches.shape)}")
        features = [self.features(patches).flatten(1) for patches in (axial, coronal, sagittal)]
        return self.classifier(torch.cat(features, dim=1))

    def forward_block(
        self,
        axial: torch.Tensor,
        coronal: torch.Tensor,
        sagittal: torch.Tensor,
        slices_per_pass: int | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, labels, gz, gy, gx)`` of B blocks of voxels, each from its enlarged slices.

        With ``M = 2 L`` (twice the margin), for each block:

        * ``axial`` ``(B, gz, gy + M, gx + M)``: the block's ``gz`` axial slices (y, x);
        * ``coronal`` ``(B, gy, gz + M, gx + M)``: its ``gy`` coronal slices (z, x);
        * ``sagittal`` ``(B, gx, gz + M, gy + M)``: its ``gx`` sagittal slices (z, y).

        Every output voxel equals :meth:`forward` on the three patches centred on it (in eval mode;
        in training mode batch norm normalises with the statistics of these slices).
        ``slices_per_pass`` is passed to :meth:`block_features`.
        """
        return self.classifier(self.block_features(axial, coronal, sagittal, slices_per_pass))

    def block_features(
        self,
        axial: torch.Tensor,
        coronal: torch.Tensor,
        sagittal: torch.Tensor,
        slices_per_pass: int | None = None,
        needed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The classifier's input ``(B, 3 C, gz, gy, gx)`` for :meth:`forward_block`: axial, coronal, sagittal features.

        ``slices_per_pass`` runs the convolution stack on at most that many slices at a time, which
        keeps each layer's activations small (on the CPU, large tensors cost more in page faults
        than in arithmetic). Only in eval mode: in training, batch norm needs all slices in one pass.
        ``needed`` ``(B, gz, gy, gx)`` bool marks the voxels whose features are wanted: each pass then
        computes only the rectangle of its slices that holds them, and other voxels' features are 0.
        """
        if axial.dim() != 4 or coronal.dim() != 4 or sagittal.dim() != 4:
            raise ValueError("axial, coronal and sagittal must each be (blocks, slices, rows, columns)")
        if slices_per_pass is not None and self.training:
            raise ValueError("slices_per_pass changes batch-norm statistics in training mode; use it in eval mode only")
        blocks, depth = axial.shape[:2]
        height, width = coronal.shape[1], sagittal.shape[1]
        extra = 2 * self.margin
        expected = {
            "axial": (blocks, depth, height + extra, width + extra),
            "coronal": (blocks, height, depth + extra, width + extra),
            "sagittal": (blocks, width, depth + extra, height + extra),
        }
        for plane, slices in (("axial", axial), ("coronal", coronal), ("sagittal", sagittal)):
            if tuple(slices.shape) != expected[plane]:
                raise ValueError(
                    f"{plane} slices must be {expected[plane]} for blocks of {(depth, height, width)} voxels "
                    f"with margin {self.margin}, got {tuple(slices.shape)}"
                )
        channels = self.features.channels
        result: torch.Tensor | None = None
        for plane, slices in enumerate((axial, coronal, sagittal)):
            wanted = None if needed is None else needed[:, None].permute(PLANE_SLICE_ORDER[plane])[:, :, 0]
            for block, part in _passes(blocks, slices.shape[1], slices_per_pass):
                every = (slice(0, slices.shape[2] - extra), slice(0, slices.shape[3] - extra))
                rows, columns = every if wanted is None else _rectangle(wanted[block, part])
                if rows.start == rows.stop:
                    continue  # no wanted voxel in these slices
                crop = slices[block, part][..., rows.start : rows.stop + extra, columns.start : columns.stop + extra]
                maps = self.features(crop.reshape(-1, 1, *crop.shape[-2:]))
                if result is None:  # in the stack's output type (bfloat16 under CPU autocast)
                    shape = (blocks, 3 * channels, depth, height, width)
                    result = maps.new_empty(shape) if needed is None else maps.new_zeros(shape)
                # Each pass goes straight to its place in the result, without a copy of the whole plane.
                planes = result[:, plane * channels : (plane + 1) * channels].permute(PLANE_SLICE_ORDER[plane])
                target = planes[block, part][..., rows, columns]
                target.copy_(maps.reshape(target.shape))
        if result is None:  # nothing wanted
            result = axial.new_zeros((blocks, 3 * channels, depth, height, width))
        return result


#: Per plane, the order that turns a plane's part (B, C, gz, gy, gx) of the features into its slices'
#: maps (B, slices, C, rows, columns): axial slices run along z, coronal along y, sagittal along x.
PLANE_SLICE_ORDER = ((0, 2, 1, 3, 4), (0, 3, 1, 2, 4), (0, 4, 1, 2, 3))


def _rectangle(wanted: torch.Tensor) -> tuple[slice, slice]:
    """The rows and columns ``(start, stop)`` holding every True of ``wanted`` (``..., rows, columns``);
    empty slices when there is none."""
    plane = wanted.reshape(-1, *wanted.shape[-2:]).any(dim=0)
    rows = torch.nonzero(plane.any(dim=1)).flatten().tolist()
    columns = torch.nonzero(plane.any(dim=0)).flatten().tolist()
    if not rows:
        return slice(0, 0), slice(0, 0)
    return slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1)


def _passes(blocks: int, slices: int, slices_per_pass: int | None) -> list[tuple[Any, slice]]:
    """(block, slices) index pairs of the stack's passes: all slices at once when ``slices_per_pass``
    is None (batch norm in training needs them together), else per block in parts of that size."""
    if slices_per_pass is None:
        return [(slice(None), slice(None))]
    return [(block, slice(start, start + slices_per_pass)) for block in range(blocks) for start in range(0, slices, slices_per_pass)]


def fold_batch_norm(network: TriplanarNetwork) -> TriplanarNetwork:
    """An eval-mode copy of ``network`` for prediction, each batch norm folded into the convolution before it.

    In eval mode batch norm is a fixed affine map per channel, so it becomes part of the preceding
    convolution's weights and bias: one pass over every layer's activations less. ``network``
    itself (its training mode, its weights as saved) is left as it is; the copy is not for training.
    """
    folded = copy.deepcopy(network).eval().requires_grad_(False)
    for sequence in (*folded.features.blocks, folded.classifier.layers):
        for index in reversed(range(1, len(sequence))):
            if isinstance(sequence[index], (nn.BatchNorm1d, nn.BatchNorm2d)):
                sequence[index - 1] = fuse_conv_bn_eval(sequence[index - 1], sequence[index])
                del sequence[index]
    return folded
