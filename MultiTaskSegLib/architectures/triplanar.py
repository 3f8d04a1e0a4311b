"""Moeskops et al. (2017): one triplanar CNN for several segmentation tasks.

Sampling, loss and whole-volume prediction for :class:`~MultiTaskSegLib.networks.triplanar.TriplanarNetwork`
(axis conventions are documented there: axial = (y, x) at fixed z, coronal = (z, x) at fixed y,
sagittal = (z, y) at fixed x).

Outside the image the network sees 0, in training and in prediction alike: normalisation puts the
background at exactly 0 (the paper samples only voxels with intensity above zero), so a patch that
crosses the border of the volume sees more background, not an artefact of the padding.

Training draws each mini-batch of ``batch_size`` voxels from the :class:`BalancedVoxelSampler`, as
the paper does. To use the CPU or GPU better, each sampled voxel brings the ``grid x grid x grid``
cube of voxels around it: the cube is classified from ``3 grid`` slices enlarged by ``grid - 1``
voxels (valid convolutions give every voxel of a slice its own patch's features), so each voxel's
output is still the paper's patch definition while the convolutions are shared between neighbours.
The loss is weighted so that every task, and every class within a task, carries the same weight as
in the paper's balanced batch, although the neighbours of a sampled voxel are mostly of its class
or background. ``grid=1`` is the plain one-patch-per-voxel scheme.

Prediction is dense: a block of the volume is classified from its axial, coronal and sagittal
slices at once, and the volume is tiled into blocks so memory stays bounded.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..inferers import (CancelCheck, InferenceOptions, ProgressCallback, bfloat16_autocast, prediction_autocast_type,
                        raise_if_cancelled, report_progress)
from ..networks.triplanar import TriplanarNetwork, fold_batch_norm
from ..preprocessing import nonzero_box
from ..sampling import BalancedVoxelSampler
from .base import Architecture, MethodConfig, TrainingStep, network_default

#: Default cap of one prediction tile: the paper's network holds 96 features per voxel of a block, about
#: 0.4 GB in bfloat16 (0.8 GB in float32). Larger blocks spend less of the work on the slices' margins:
#: on a brain-sized box, 128^3 blocks are about 1.3x faster than 64^3 ones.
DEFAULT_BLOCK_VOXELS = 128**3
#: Activation memory of one pass of the convolution stack or classifier in prediction: small on the
#: CPU, where page faults on large fresh tensors cost more than the arithmetic; large on a GPU.
PASS_BYTES = {"cpu": 8 * 2**20, "cuda": 2**30}
#: Voxels predicted around the non-zero voxels. Inference calls every voxel outside the foreground
#: background, and the foreground lies inside the non-zero voxels; the margin covers a mask's border
#: resampled by nearest neighbour where the image was resampled linearly.
BOX_MARGIN = 2
#: Label of a voxel that has no loss term (outside the volume or outside the foreground).
IGNORED = -100
PLANES = ("axial", "coronal", "sagittal")


def pad_volume(image: np.ndarray, margin: int) -> np.ndarray:
    """``image`` with ``margin`` zero voxels added on every side (0 = normalised background)."""
    return np.pad(image, margin, mode="constant", constant_values=0)


def choose_block_shape(volume_shape: Sequence[int], max_voxels: int) -> tuple[int, int, int]:
    """The largest near-even tiling of ``volume_shape`` whose blocks hold at most ``max_voxels`` voxels.

    The longest block side is split first, which keeps blocks close to cubes: the margin each
    block's slices need costs least relative to the block.
    """
    if max_voxels < 1:
        raise InputError(f"max_block_voxels must be at least 1, got {max_voxels}")
    counts = [1, 1, 1]
    sizes = [int(size) for size in volume_shape]
    while math.prod(sizes) > max_voxels:
        axis = int(np.argmax(sizes))
        counts[axis] += 1
        sizes[axis] = -(-int(volume_shape[axis]) // counts[axis])
    return sizes[0], sizes[1], sizes[2]


def iterate_blocks(volume_shape: Sequence[int], block_shape: Sequence[int]) -> list[tuple[slice, slice, slice]]:
    """The blocks tiling the volume, as (z, y, x) slices; the last block on an axis may be smaller."""
    ranges = [
        [slice(start, min(start + size, extent)) for start in range(0, extent, size)]
        for extent, size in zip(volume_shape, block_shape)
    ]
    return [(z, y, x) for z in ranges[0] for y in ranges[1] for x in ranges[2]]


@contextlib.contextmanager
def evaluating(network: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the duration; the previous mode is restored afterwards."""
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        network.train(was_training)


def _parameter_dtype(network: torch.nn.Module) -> torch.dtype:
    return next(network.parameters()).dtype


def _check_volume(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3:
        raise InputError(
            f"the image has shape {image.shape}; the triplanar network needs one 3-D (z, y, x) volume, "
            "so choose one channel/component"
        )
    if image.size == 0:
        raise InputError(f"the image has shape {image.shape} and holds no voxel")
    return image


def predict_volume(
    network: TriplanarNetwork,
    image: np.ndarray,
    device: torch.device,
    progress: ProgressCallback | None = None,
    cancelled: CancelCheck | None = None,
    max_block_voxels: int | None = None,
    mixed_precision: bool = True,
) -> np.ndarray:
    """Dense softmax probabilities ``(labels, z, y, x)`` float32 of a whole normalised volume.

    Only the voxels within ``BOX_MARGIN`` voxels of a non-zero voxel are predicted; every other voxel
    is background with probability 1 (normalisation puts the background at exactly 0 and inference
    calls such voxels background anyway; an image without a non-zero voxel is predicted whole). The
    bounding box of those voxels is tiled into blocks; each block runs the shared convolution stack
    on its axial, coronal and sagittal slices (cut from the zero-padded volume with a margin of
    ``L`` voxels in-plane), each pass of slices cropped to the rectangle that holds the voxels to
    predict, giving three feature volumes aligned on the block's voxels, then the 1x1 classifier
    and softmax.

    The network runs as a copy with batch norm folded into the convolutions, channels-last. With
    ``mixed_precision``, it runs under float16 autocast on CUDA and bfloat16 autocast on CPUs with
    bfloat16 arithmetic (the first layer, which sees the image, in float32); otherwise in the
    network's own precision, where the result does not depend on the tiling.
    """
    image = _check_volume(image)
    device = torch.device(device)
    network.to(device)
    dtype = _parameter_dtype(network)
    box = nonzero_box(image, BOX_MARGIN)
    region = image[box] if box else image
    near_voxels = near_nonzero(region, BOX_MARGIN) if box else None
    near = None if near_voxels is None else torch.from_numpy(near_voxels).to(device)
    box = box or tuple(slice(0, extent) for extent in image.shape)
    blocks = iterate_blocks(region.shape, choose_block_shape(region.shape, max_block_voxels or DEFAULT_BLOCK_VOXELS))
    precision = prediction_autocast_type(device, mixed_precision, dtype)
    pass_bytes = PASS_BYTES.get(device.type, PASS_BYTES["cpu"])
    probabilities = np.zeros((network.num_labels, *image.shape), dtype=np.float32)
    probabilities[0] = 1.0
    inside = probabilities[(slice(None), *box)]
    # Channels-last weights: oneDNN then runs the first layer too (one input channel) without reorders.
    folded = fold_batch_norm(network).to(memory_format=torch.channels_last)
    host_dtype = np.float64 if dtype == torch.float64 else np.float32
    autocast = torch.autocast(device.type, dtype=precision) if precision else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        # Voxels between the box and the padding are 0 as well, so the box's patches are unchanged.
        padded = torch.from_numpy(pad_volume(region.astype(host_dtype, copy=False), network.margin)).to(device, dtype)
        bytes_per_value = torch.finfo(precision).bits // 8 if precision else padded.element_size()
        for number, block in enumerate(blocks):
            raise_if_cancelled(cancelled)
            needed = None if near is None else near[block][None]
            logits = _block_logits(folded, padded, block, pass_bytes // bytes_per_value, needed)
            inside[(slice(None), *block)] = logits.float().softmax(dim=0).cpu().numpy()
            report_progress(progress, (number + 1) / len(blocks), f"triplanar prediction: block {number + 1} of {len(blocks)}")
    if near_voxels is not None:
        far = ~near_voxels
        inside[:, far] = 0.0
        inside[0][far] = 1.0
    return probabilities


def near_nonzero(image: np.ndarray, margin: int) -> np.ndarray:
    """The voxels within ``margin`` voxels of a non-zero voxel along every axis (a cube around each)."""
    near = image != 0
    for axis in range(image.ndim):
        grown = near.copy()
        into, source = np.moveaxis(grown, axis, 0), np.moveaxis(near, axis, 0)
        for shift in range(1, margin + 1):
            into[shift:] |= source[:-shift]
            into[:-shift] |= source[shift:]
        near = grown
    return near


def _block_logits(
    network: TriplanarNetwork, padded: torch.Tensor, block: tuple[slice, slice, slice], pass_values: int,
    needed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits ``(labels, depth, height, width)`` of one block, from the volume padded by the margin.

    Each pass of the convolution stack or the classifier holds at most about ``pass_values``
    activations per layer. With ``needed`` ``(1, depth, height, width)``, the stack runs only on the
    rectangles of the slices that hold those voxels; the other voxels' logits are meaningless."""
    margin = network.margin
    zs, ys, xs = block
    depth, height, width = zs.stop - zs.start, ys.stop - ys.start, xs.stop - xs.start
    # The block's voxels plus the margin on every side; each plane takes the block's own slices of it.
    region = padded[zs.start : zs.stop + 2 * margin, ys.start : ys.stop + 2 * margin, xs.start : xs.stop + 2 * margin]
    axial = region[margin : margin + depth]
    coronal = region[:, margin : margin + height].permute(1, 0, 2)
    sagittal = region[:, :, margin : margin + width].permute(2, 0, 1)
    largest_slice = max(axial[0].numel(), coronal[0].numel(), sagittal[0].numel())
    slices_per_pass = max(1, pass_values // (network.features.channels * largest_slice))
    features = network.block_features(axial[None], coronal[None], sagittal[None], slices_per_pass, needed).flatten(2)
    widest = max(network.classifier.in_features, network.classifier.hidden_features)
    voxels_per_pass = max(1, pass_values // widest)
    logits = torch.cat([network.classifier(part) for part in features.split(voxels_per_pass, dim=2)], dim=2)
    return logits.reshape(-1, depth, height, width)


def predict_voxels_patchwise(
    network: TriplanarNetwork,
    padded_image: np.ndarray,
    coords: np.ndarray,
    batch_size: int = 256,
) -> np.ndarray:
    """Softmax probabilities ``(n, labels)`` of single voxels, each from its own three patches.

    The reference definition (one axial, coronal and sagittal patch per voxel), for tests and
    benchmarks. ``padded_image`` is the volume padded by the network margin (:func:`pad_volume`);
    ``coords`` are ``(n, 3)`` (z, y, x) voxel positions in the unpadded volume. The result has the
    network's floating point precision.
    """
    size = network.patch_size
    margin = network.margin
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 3)
    parameter = next(network.parameters())
    results = []
    with evaluating(network):
        for start in range(0, len(coords), batch_size):
            patches: dict[str, list[np.ndarray]] = {plane: [] for plane in PLANES}
            for z, y, x in coords[start : start + batch_size]:
                # Padded coordinates of the voxel are (z, y, x) + margin; a patch starts margin before.
                patches["axial"].append(padded_image[z + margin, y : y + size, x : x + size])
                patches["coronal"].append(padded_image[z : z + size, y + margin, x : x + size])
                patches["sagittal"].append(padded_image[z : z + size, y : y + size, x + margin])
            tensors = [
                torch.from_numpy(np.stack(patches[plane])[:, None]).to(parameter.device, parameter.dtype)
                for plane in PLANES
            ]
            results.append(network(*tensors).softmax(dim=1).cpu().numpy())
    return np.concatenate(results) if results else np.empty((0, network.num_labels))


def _gather(volume: np.ndarray, z: np.ndarray, y: np.ndarray, x: np.ndarray, outside: Any) -> np.ndarray:
    """``volume[z, y, x]`` for broadcastable index arrays, with ``outside`` where they leave the volume."""
    depth, height, width = volume.shape
    inside = (z >= 0) & (z < depth) & (y >= 0) & (y < height) & (x >= 0) & (x < width)
    values = volume[np.clip(z, 0, depth - 1), np.clip(y, 0, height - 1), np.clip(x, 0, width - 1)]
    return np.where(inside, values, outside)


def extract_cube_slices(image: np.ndarray, origins: np.ndarray, grid: int, margin: int) -> dict[str, np.ndarray]:
    """The enlarged slices of cubes of ``grid``^3 voxels, as :meth:`TriplanarNetwork.forward_block` takes them.

    ``origins`` ``(n, 3)`` are the cubes' first (z, y, x) voxels. Each plane gives ``(n, grid, S, S)``
    float32 with ``S = grid + 2 margin``; voxels outside the volume are 0.
    """
    steps = np.arange(grid)
    around = np.arange(grid + 2 * margin) - margin
    z0, y0, x0 = (origins[:, axis, None, None, None] for axis in range(3))
    # Index shapes broadcast to (n, slice, row, column).
    in_slice, in_rows, in_columns = steps[:, None, None], around[None, :, None], around[None, None, :]
    return {
        "axial": _gather(image, z0 + in_slice, y0 + in_rows, x0 + in_columns, 0).astype(np.float32, copy=False),
        "coronal": _gather(image, z0 + in_rows, y0 + in_slice, x0 + in_columns, 0).astype(np.float32, copy=False),
        "sagittal": _gather(image, z0 + in_rows, y0 + in_columns, x0 + in_slice, 0).astype(np.float32, copy=False),
    }


def balanced_voxel_weights(groups: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Loss weights (summing to 1) that give every task, and every class within it, an equal share.

    ``groups`` holds ``task_index * num_labels + label`` per voxel with a loss term. This is the
    balance of the paper's mini-batch (equal over tasks, then over each task's classes) applied to
    whatever voxels the batch holds.
    """
    present, group_of_voxel, voxels_per_group = torch.unique(groups, return_inverse=True, return_counts=True)
    _, task_of_group, groups_per_task = torch.unique(present // num_labels, return_inverse=True, return_counts=True)
    tasks = groups_per_task.numel()
    group_weight = 1.0 / (tasks * groups_per_task[task_of_group] * voxels_per_group)
    return group_weight[group_of_voxel]


def _triplanar_default(argument: str) -> Any:
    return network_default(TriplanarNetwork, argument)


@dataclass
class TriplanarConfig(MethodConfig):
    """Arguments of :class:`TriplanarArchitecture`: the network's (defaults: the paper's), ``grid`` and
    ``mixed_precision``; a model file written before ``mixed_precision`` existed gets its default."""

    layers: int = _triplanar_default("layers")
    channels: int = _triplanar_default("channels")
    hidden_features: int = _triplanar_default("hidden_features")
    hidden_layers: int = _triplanar_default("hidden_layers")
    dropout: float = _triplanar_default("dropout")
    grid: int = 3
    mixed_precision: bool = True

    def __post_init__(self) -> None:
        if int(self.grid) < 1:
            raise InputError(f"grid must be at least 1 (1 = one voxel per sample), got {self.grid}")
        self.layers, self.channels, self.grid = int(self.layers), int(self.channels), int(self.grid)
        self.mixed_precision = bool(self.mixed_precision)
        self.hidden_features, self.hidden_layers, self.dropout = int(self.hidden_features), int(self.hidden_layers), float(self.dropout)


class TriplanarArchitecture(Architecture):
    """Moeskops et al. 2017 with balanced voxel sampling, cross-entropy and dense prediction.

    Network arguments (defaults = the paper): ``layers=25`` (51x51 patches), ``channels=32``,
    ``hidden_features=192``, ``hidden_layers=2``, ``dropout=0.5``. ``grid`` (default 3) is a
    training option only: the side of the cube of voxels learnt around each sampled voxel
    (1 = one patch triple per sampled voxel, as in the paper); it does not change the network.
    ``mixed_precision`` (default on): training under bfloat16 autocast where the device has bfloat16
    arithmetic (CUDA, AVX-512 BF16 or AMX CPUs: 1.5x per step here; the loss in float32), prediction
    in bfloat16 on such CPUs and float16 on CUDA; off, both run in float32.

    Training memory grows with ``batch_size x grid x (2 L + grid)^2``: with the paper's network in
    float32, about 28 MB per sampled voxel at ``grid=1`` and 74 MB at ``grid=3`` (which learns 27
    voxels from each), so the paper's batch of 210 needs about 6 GB and 16 GB respectively; choose
    a smaller batch on a small machine. Prediction needs about 0.4 GB per 128^3 block in bfloat16
    (0.8 GB in float32) plus the probabilities.
    """

    name = "triplanar"
    Config: ClassVar[type[TriplanarConfig]] = TriplanarConfig

    @property
    def summary(self) -> str:
        """What this network is, with its own sizes (the paper's: 25 layers, 32 kernels, 51x51)."""
        stack, size = self.network.features, self.network.patch_size
        return (f"Moeskops 2017 multi-task triplanar CNN: {stack.layers} shared 3x3 conv layers of "
                f"{stack.channels} kernels on {size}x{size} axial/coronal/sagittal patches")

    def build_network(self, num_labels: int) -> TriplanarNetwork:
        config = self.config
        return TriplanarNetwork(num_labels, config.layers, config.channels, config.hidden_features,
                                config.hidden_layers, config.dropout)

    def sample_batch(
        self,
        sampler: BalancedVoxelSampler,
        batch_size: int,
        rng: np.random.Generator,
    ) -> dict[str, torch.Tensor]:
        """``batch_size`` balanced voxels, each with the ``grid``^3 cube around it.

        The sampled voxel sits at a random place in its cube, and cubes are shifted to stay inside
        the volume. Returns the three planes' enlarged slices ``(n, grid, S, S)``, ``labels``
        ``(n, grid, grid, grid)`` (``IGNORED`` outside the volume or the foreground), ``groups``
        (task index x labels + label, for the loss weights), ``case_numbers`` and ``origins``.
        """
        grid, margin = self.config.grid, self.network.margin
        numbers, positions = sampler.sample(batch_size, rng)
        count = len(numbers)
        side = grid + 2 * margin
        batch = {plane: np.empty((count, grid, side, side), dtype=np.float32) for plane in PLANES}
        labels = np.empty((count, grid, grid, grid), dtype=np.int64)
        groups = np.empty((count, grid, grid, grid), dtype=np.int64)
        origins = positions - rng.integers(0, grid, size=positions.shape)
        steps = np.arange(grid)
        for number in np.unique(numbers):
            case = sampler.cases[number]
            if case.task not in self.task_names:
                raise InputError(
                    f"case {case.name!r} belongs to task {case.task!r}, which this model does not cover "
                    f"({', '.join(self.task_names)}); give only cases of the model's tasks"
                )
            rows = np.flatnonzero(numbers == number)
            image = _check_volume(case.image)
            last_origin = np.maximum(np.asarray(image.shape) - grid, 0)
            origins[rows] = np.clip(origins[rows], 0, last_origin)
            for plane, slices in extract_cube_slices(image, origins[rows], grid, margin).items():
                batch[plane][rows] = slices
            z, y, x = (origins[rows, axis, None, None, None] for axis in range(3))
            z, y, x = z + steps[:, None, None], y + steps[None, :, None], x + steps[None, None, :]
            usable = _gather(case.foreground, z, y, x, False)
            case_labels = np.where(usable, _gather(case.labels, z, y, x, 0), IGNORED)
            labels[rows] = case_labels
            groups[rows] = np.where(usable, self.task_names.index(case.task) * self.num_labels + case_labels, IGNORED)
        tensors = {plane: torch.from_numpy(slices) for plane, slices in batch.items()}
        tensors.update(
            labels=torch.from_numpy(labels),
            groups=torch.from_numpy(groups),
            case_numbers=torch.from_numpy(numbers),
            origins=torch.from_numpy(origins),
        )
        return tensors

    def training_step(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> TrainingStep:
        """Class-balanced categorical cross-entropy over every labelled voxel of the batch's cubes."""
        dtype = _parameter_dtype(self.network)
        slices = [batch[plane].to(device=device, dtype=dtype) for plane in PLANES]
        with bfloat16_autocast(device, self.config.mixed_precision and dtype == torch.float32):
            logits = self.network.forward_block(*slices).to(dtype)
        labels = batch["labels"].to(device)
        usable = labels != IGNORED
        voxel_logits = logits.movedim(1, -1)[usable]
        voxel_labels = labels[usable]
        weights = balanced_voxel_weights(batch["groups"].to(device)[usable], self.num_labels).to(dtype)
        loss = (weights * F.cross_entropy(voxel_logits, voxel_labels, reduction="none")).sum()
        with torch.no_grad():
            balanced_accuracy = (weights * (voxel_logits.argmax(dim=1) == voxel_labels)).sum()
        return TrainingStep(
            loss, {"balanced_accuracy": float(balanced_accuracy), "voxels": float(voxel_labels.numel())}
        )

    def make_optimizer(self, learning_rate: float | None = None) -> torch.optim.Optimizer:
        """Adam with Kingma & Ba's defaults; the paper names Adam but gives no settings."""
        return torch.optim.Adam(self.network.parameters(), lr=learning_rate or 1e-3, betas=(0.9, 0.999), eps=1e-8)

    def _predict(self, image: np.ndarray, device: torch.device, options: InferenceOptions) -> np.ndarray:
        return predict_volume(self.network, image, device, options.progress, options.cancelled, options.max_block_voxels,
                              self.config.mixed_precision)
