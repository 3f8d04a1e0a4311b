"""A 2-D U-Net that reads all three anatomical planes, in the spirit of FastSurfer (Henschel et al. 2020).

FastSurfer segments the brain with three 2-D networks, one per plane, and averages their
probabilities. Here one network learns all three planes (one third of its training slices each,
so it costs a third of three networks to train) and at inference the probabilities of axial,
coronal and sagittal passes are averaged, which smooths the slice-to-slice jitter of any single
plane. The working grid is in LPS order (see :mod:`~MultiTaskSegLib.geometry`), so array axes
0, 1, 2 are the axial, coronal and sagittal directions whatever the file's orientation.

Training slices are changed at every step (:mod:`~MultiTaskSegLib.augmentation`), and cases that
hold a label map only get images synthesised from their labels (SynthSeg), so the network sees
many contrasts, resolutions, poses and fields of view (whole head or skull-stripped). The loss is
soft Dice plus cross-entropy, the usual pair since nnU-Net. Inference runs inside the bounding
box of the non-zero voxels only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..augmentation import SliceAugmentation, augment_slices, synthesize_slices
from ..errors import InputError
from ..inferers import InferenceOptions, bfloat16_autocast, inference_context, part_options, prediction_autocast_type
from ..losses import soft_dice_loss
from ..preprocessing import nonzero_box
from ..sampling import BalancedVoxelSampler
from .base import TrainingStep
from .inputs import check_channels, crop_centred
from .unet2d import SliceUNetConfig, _SliceUNetArchitecture

#: Slice axes of the (z, y, x) working grid: axial, coronal, sagittal.
PLANE_NAMES = ("axial", "coronal", "sagittal")
#: The sagittal plane has no left-right axis to flip.
SAGITTAL = 2
#: Input channels added by ``position_channels``: the voxel's distance from the centre along z, y and x.
POSITION_CHANNELS = 3
#: Rows of the located structures with fewer voxels than this share of the fullest row are strays.
LOCATED_ROW_SHARE = 0.02


@dataclass
class MultiplanarConfig(SliceUNetConfig):
    """Arguments of :class:`MultiplanarUNet2DArchitecture` (documented there)."""

    patch_size: Sequence[int] = (160, 160)
    planes: Sequence[int] = (0, 1, 2)
    restart_epochs: int = 1
    steps_per_epoch: int = 10_000
    cross_entropy_weight: float = 1.0
    batch_dice: bool = True
    augmentation: Mapping[str, Any] | None = None
    whole_slice_inference: bool = False
    crop_margin: int = 8
    locate_stride: int = 0
    locate_margin: int = 16
    position_channels: bool = False
    context_slices: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.planes = tuple(sorted({int(plane) for plane in self.planes}))
        if not self.planes or any(plane not in (0, 1, 2) for plane in self.planes):
            raise InputError(f"planes must be a non-empty subset of 0 (axial), 1 (coronal), 2 (sagittal), got {list(self.planes)}")
        if min(float(self.cross_entropy_weight), int(self.crop_margin), int(self.locate_stride), int(self.locate_margin),
               int(self.context_slices)) < 0:
            raise InputError("cross_entropy_weight, crop_margin, locate_stride, locate_margin and context_slices must be zero or more")
        flags = ("whole_slice_inference", "position_channels", "batch_dice")
        wrong = [f"{name}={getattr(self, name)!r}" for name in flags if getattr(self, name) not in (True, False)]
        if wrong:  # bool("false") is True: a flag given as text would silently mean yes
            raise InputError(f"{', '.join(wrong)}: give true or false (e.g. --arg batch_dice=false)")
        for name in flags:
            setattr(self, name, bool(getattr(self, name)))
        settings = SliceAugmentation.from_arguments(self.augmentation)
        self.augmentation = settings.to_arguments()
        self._slice_augmentation = settings  # not a field: not stored
        self.cross_entropy_weight, self.crop_margin = float(self.cross_entropy_weight), int(self.crop_margin)
        self.locate_stride, self.locate_margin = int(self.locate_stride), int(self.locate_margin)
        self.context_slices = int(self.context_slices)

    @property
    def slice_augmentation(self) -> SliceAugmentation:
        return self._slice_augmentation


class MultiplanarUNet2DArchitecture(_SliceUNetArchitecture):
    """One 2-D U-Net over axial, coronal and sagittal slices, probabilities of the planes averaged.

    Args (network): channels, negative_slope, as :class:`~MultiTaskSegLib.networks.cmunet.CMUNet`;
        in_channels: images per case (a multi-channel task's channels; the trainer sets it).
    Args (training):
        patch_size: (rows, columns) of a slice crop (multiples of ``2 ** (len(channels) - 1)``);
            160 mm at 1 mm holds most of a brain slice, the context that tells cortex from scalp.
        planes: slice axes used in training and averaged at inference (0 axial, 1 coronal, 2 sagittal).
        learning_rate: Adam's initial learning rate.
        restart_epochs, steps_per_epoch: cosine schedule (``restart_epochs * steps_per_epoch`` steps
            per cycle; one cycle over the whole run anneals to zero at its end).
        cross_entropy_weight: weight of cross-entropy beside the soft Dice loss.
        batch_dice: one soft Dice over the whole mini-batch (True), or one per slice, averaged
            (False, MONAI's default): each tumour slice then counts alike, however few its voxels.
        mixed_precision: as the other 2-D U-Nets; here prediction runs in bfloat16 too on such CPUs.
        augmentation: settings of :class:`~MultiTaskSegLib.augmentation.SliceAugmentation`
            (defaults when left out; ``{"probability": 0, "low_resolution_probability": 0}`` turns it off).
    Args (inference):
        inference_margin, inference_block_voxels, window_overlap: windows within each slice, as the
            other 2-D U-Nets.
        whole_slice_inference: one window per (cropped) slice instead of overlapping training-size
            windows: several times less work for a head, at the price of instance-norm statistics taken
            over more context than in training (measured on held-out subjects before it was made the default).
        crop_margin: voxels kept around the non-zero bounding box.
        locate_stride: 0 predicts every plane over the whole non-zero box. N > 0 first predicts every
            N-th slice of the first plane only, and then all planes only over the bounding box of what
            those slices show (requested classes only), grown by ``locate_margin`` voxels plus N;
            outside it is background. A whole-head scan is then about as fast as a skull-stripped one,
            but a structure thinner than N slices that lies between them alone can be missed: for
            large structures (the brain), not for small lesions.
        locate_margin: voxels kept around the located structures.
        position_channels: three more input channels, each voxel's distance from the centre of the
            input volume along z, y and x (0 at the centre, 1 at the edges), for tasks whose intended
            input is a crop around the structure (the sarcoma crops): the crop is then a box prompt,
            as in box-prompted segmentation (MedSAM), and the network can learn that the structure is
            the one near the crop's centre. Distances, not signed positions: instance norm removes a
            slice's mean, which would shift a signed ramp's zero but leaves the V of a distance at the centre.
        context_slices: K > 0 gives the network, for each image channel, the K slices on either side of
            the one it segments as more input channels (2K + 1 per image channel; FastSurfer reads 7
            slices, K = 3): a 2-D network then sees some of the third dimension, which tells a tumour
            that looks like its surroundings in one slice by its shape across slices. Slices beyond the
            volume are 0, in training and at inference alike. Label-map-only cases (synthesised images)
            cannot be used with it.
    """

    name: ClassVar[str] = "unet2d_multiplanar"
    summary: ClassVar[str] = (
        "2-D U-Net on axial, coronal and sagittal slices, probabilities averaged over the three planes "
        "(FastSurfer-style), trained with augmentation and label-synthesised images (SynthSeg-style)"
    )
    Config: ClassVar[type[MultiplanarConfig]] = MultiplanarConfig
    presence_head: ClassVar[bool] = False
    synthesises_images: ClassVar[bool] = True
    reads_channels: ClassVar[bool] = True

    @property
    def slab_thickness(self) -> int:
        """Slices per image channel that the network reads: the segmented one and its context."""
        return 2 * self.config.context_slices + 1

    @property
    def network_channels(self) -> int:
        return self.config.in_channels * self.slab_thickness + (POSITION_CHANNELS if self.config.position_channels else 0)

    def weights_from(self, source) -> dict[str, torch.Tensor]:
        """As every architecture, and the first convolution of a network that reads another number of
        context slices (or no position channels): its weights for the slices both read, zero for the
        others, so the new network starts out predicting exactly as ``source`` and learns from there
        what the further slices add."""
        weights = super().weights_from(source)
        if not isinstance(source, MultiplanarUNet2DArchitecture) or source.config.in_channels != self.config.in_channels:
            return weights
        target = self.network.state_dict()
        for name, tensor in source.network.state_dict().items():
            wanted = target.get(name)
            if (name in weights or wanted is None or tensor.ndim != 4 or tensor.shape[1] != source.network_channels
                    or wanted.shape[1] != self.network_channels or tensor.shape[0] != wanted.shape[0]
                    or tensor.shape[2:] != wanted.shape[2:]):
                continue
            weights[name] = self._widened_input_weights(source, tensor, wanted)
        return weights

    def _widened_input_weights(self, source: MultiplanarUNet2DArchitecture, tensor: torch.Tensor,
                               wanted: torch.Tensor) -> torch.Tensor:
        """``tensor`` (a first convolution of ``source``) laid out as this network's input channels."""
        widened = torch.zeros_like(wanted)
        shared = min(source.config.context_slices, self.config.context_slices)
        for channel in range(self.config.in_channels):
            for offset in range(-shared, shared + 1):
                widened[:, channel * self.slab_thickness + self.config.context_slices + offset] = \
                    tensor[:, channel * source.slab_thickness + source.config.context_slices + offset]
        if source.config.position_channels and self.config.position_channels:
            widened[:, -POSITION_CHANNELS:] = tensor[:, -POSITION_CHANNELS:]
        return widened

    def inference_window(self, plane: Sequence[int]) -> tuple[int, ...]:
        patch_size = self.config.patch_size
        if not self.config.whole_slice_inference:
            return tuple(patch_size)
        multiple = self.network.size_multiple
        return tuple(-(-max(side, patch) // multiple) * multiple for side, patch in zip(plane, patch_size))

    def sample_batch(self, sampler: BalancedVoxelSampler, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        config = self.config
        numbers, positions = sampler.sample(batch_size, rng)
        axes = rng.choice(config.planes, size=len(numbers))
        thickness, context = self.slab_thickness, config.context_slices
        images = np.zeros((len(numbers), config.in_channels * thickness, *config.patch_size), np.float32)
        labels, inside, synthetic = [], [], []
        for item, (number, position, axis) in enumerate(zip(numbers, positions, axes)):
            case = sampler.cases[number]
            centre = np.delete(position, axis)
            label_slice = np.take(case.labels, position[axis], axis=axis)
            label, valid = crop_centred(label_slice, centre, config.patch_size)
            labels.append(label.astype(np.int64))
            inside.append(valid)
            if case.image is None:
                if context:
                    raise InputError("context_slices needs real images: a label-map-only case gives one synthetic "
                                     "slice, not its neighbours; train without label-map-only cases or without context_slices")
                source = np.take(case.extra["source_labels"], position[axis], axis=axis)
                synthetic.append((item, crop_centred(source, centre, config.patch_size)[0]))
            else:
                stack = case.image if case.image.ndim == 4 else case.image[None]  # (channels, z, y, x)
                for channel, volume in enumerate(stack):
                    for offset in range(-context, context + 1):
                        index = position[axis] + offset
                        if 0 <= index < volume.shape[axis]:  # beyond the volume: 0, as inference pads
                            image_slice = np.take(volume, index, axis=axis).astype(np.float32, copy=False)
                            images[item, channel * thickness + context + offset] = crop_centred(image_slice, centre, config.patch_size)[0]
        if synthetic:
            items = [item for item, _ in synthetic]
            if config.in_channels > 1:
                raise InputError("label-map-only cases give one synthetic channel; a multi-channel task needs real images")
            images[items, 0] = synthesize_slices(np.stack([source for _, source in synthetic]), rng,
                                                 config.slice_augmentation.synthesis_blur_max_voxels)
        image_tensor, label_tensor, valid_tensor = augment_slices(
            torch.from_numpy(images), torch.from_numpy(np.stack(labels)), torch.from_numpy(np.stack(inside)),
            rng, config.slice_augmentation, flippable=axes != SAGITTAL,
        )
        if config.position_channels:  # after augmentation: distances are not intensities to change
            shapes = [sampler.cases[number].labels.shape for number in numbers]
            positions_of_crops = np.stack([slice_positions(shape, position, axis, config.patch_size)
                                           for shape, position, axis in zip(shapes, positions, axes)])
            image_tensor = torch.cat([image_tensor, torch.from_numpy(positions_of_crops)], dim=1)
        return {"image": image_tensor, "labels": label_tensor, "valid": valid_tensor}

    def training_step(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> TrainingStep:
        image, labels, valid = (batch[key].to(device, non_blocking=True) for key in ("image", "labels", "valid"))
        with bfloat16_autocast(device, self.config.mixed_precision):
            logits = self.network(image)
        logits = logits.float()
        dice = soft_dice_loss(torch.softmax(logits, dim=1), labels, valid, per_item=not self.config.batch_dice)
        weight = valid.to(logits.dtype)
        cross_entropy = (F.cross_entropy(logits, labels, reduction="none") * weight).sum() / weight.sum().clamp_min(1)
        loss = dice + self.config.cross_entropy_weight * cross_entropy
        return TrainingStep(loss, {"dice_loss": float(dice.detach()), "cross_entropy": float(cross_entropy.detach())})

    def _bfloat16_on_cpu(self, device: torch.device) -> bool:
        """bfloat16 inference on CPUs with bfloat16 arithmetic (CUDA runs float16, see ``inference_context``)."""
        return prediction_autocast_type(device, self.config.mixed_precision) == torch.bfloat16

    def _predict(self, image: np.ndarray, device: torch.device, options: InferenceOptions) -> np.ndarray:
        """The mean of the per-plane probabilities inside the non-zero bounding box (or the located
        structures' box); background outside."""
        config = self.config
        stack = check_channels(image, config.in_channels)
        result = np.zeros((self.num_labels, *stack.shape[1:]), np.float32)
        result[0] = 1.0
        box = nonzero_box(np.any(stack != 0, axis=0), config.crop_margin)
        if box is None:
            return result
        if config.position_channels:  # positions in the whole input volume, before any cropping
            stack = np.concatenate([stack, volume_positions(stack.shape[1:])])
        bfloat16 = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._bfloat16_on_cpu(device))
        with inference_context(self.network, device), bfloat16:
            passes = len(config.planes) + (1 if config.locate_stride else 0)
            if config.locate_stride:
                box = self._locate(stack, box, device, part_options(options, 0, passes, "locating"))
            cropped = None if config.context_slices else np.ascontiguousarray(stack[(slice(None), *box)])
            region = result[(slice(None), *box)]  # the planes are summed in place: no extra volume in memory
            region[0] = 0.0
            for number, axis in enumerate(config.planes, start=passes - len(config.planes)):
                planes_input = cropped if cropped is not None else self._slabs(stack, box, axis)
                self._add_probabilities(region, planes_input, axis, device, part_options(options, number, passes, PLANE_NAMES[axis]),
                                        scale=1.0 / len(config.planes))
        return result

    def _locate(self, stack: np.ndarray, box: tuple[slice, ...], device: torch.device,
                options: InferenceOptions) -> tuple[slice, ...]:
        """The part of ``box`` around what every ``locate_stride``-th slice of the first plane shows
        (a requested class wins the arg-max in a non-zero voxel), grown by the margin; all of ``box``
        if they show nothing. Along each axis the range keeps the rows holding at least
        :data:`LOCATED_ROW_SHARE` of the fullest row's voxels, so stray voxels in the neck or the
        scalp do not stretch it."""
        config = self.config
        axis, stride = config.planes[0], config.locate_stride
        cropped = stack[(slice(None), *box)]
        picks = np.arange(stride // 2, cropped.shape[1 + axis], stride)
        if picks.size == 0:
            return box
        sparse = (self._slabs(stack, box, axis, picks) if config.context_slices
                  else np.ascontiguousarray(np.take(cropped, picks, axis=1 + axis)))
        probabilities = np.zeros((self.num_labels, *sparse.shape[1:]), np.float32)
        self._add_probabilities(probabilities, sparse, axis, device, options)
        labels = options.requested_labels or range(1, self.num_labels)
        kept = np.asarray([0, *sorted({int(label) for label in labels})])
        images = np.take(cropped[:config.in_channels], picks, axis=1 + axis)
        found = (kept[np.argmax(probabilities[kept], axis=0)] != 0) & np.any(images != 0, axis=0)
        if not found.any():
            return box
        located = []
        for number, outer in enumerate(box):
            rows = np.count_nonzero(found, axis=tuple(other for other in range(3) if other != number))
            first, last = np.flatnonzero(rows >= LOCATED_ROW_SHARE * rows.max())[[0, -1]]
            grow = config.locate_margin
            if number == axis:
                first, last, grow = picks[first], picks[last], grow + stride
            located.append(slice(outer.start + max(0, int(first) - grow), outer.start + min(outer.stop - outer.start, int(last) + 1 + grow)))
        return tuple(located)

    def _slabs(self, stack: np.ndarray, box: tuple[slice, ...], axis: int, rows: np.ndarray | None = None) -> np.ndarray:
        """The network's input over ``box`` for slices along ``axis`` (only the ``rows`` of the box along
        it, when given): each image channel of ``stack`` as ``2 * context_slices + 1`` channels, the
        slice and its -K..K neighbours (as in training; 0 beyond the volume), then the other channels
        (positions) as they are."""
        config = self.config
        context, thickness, image_channels = config.context_slices, self.slab_thickness, config.in_channels
        across = list(box)
        across[axis] = slice(None)  # the box across the slices, the whole volume along them
        planes = stack[(slice(None), *across)]
        rows = np.arange(box[axis].start, box[axis].stop) if rows is None else box[axis].start + np.asarray(rows)
        shape = list(planes.shape[1:])
        shape[axis] = rows.size
        slabs = np.zeros((stack.shape[0] + image_channels * (thickness - 1), *shape), np.float32)
        for offset in range(-context, context + 1):
            neighbours = rows + offset
            inside = (neighbours >= 0) & (neighbours < planes.shape[1 + axis])
            for channel in range(image_channels):
                target = np.moveaxis(slabs[channel * thickness + context + offset], axis, 0)  # a view
                target[inside] = np.moveaxis(np.take(planes[channel], neighbours[inside], axis=axis), axis, 0)
        slabs[image_channels * thickness:] = np.take(planes[image_channels:], rows, axis=1 + axis)
        return slabs


def _distances(indices: np.ndarray, side: int) -> np.ndarray:
    """Distance of ``indices`` along an axis of ``side`` voxels from its centre: 0 there, 1 at both ends."""
    return np.abs(indices * (2.0 / (side - 1)) - 1.0).astype(np.float32) if side > 1 else np.zeros(np.shape(indices), np.float32)


def volume_positions(shape: Sequence[int]) -> np.ndarray:
    """``(3, z, y, x)`` float32: each voxel's distance from the volume's centre along z, y and x,
    0 at the centre, 1 at the first and last voxel."""
    return np.stack(np.meshgrid(*(_distances(np.arange(side), side) for side in shape), indexing="ij"))


def slice_positions(shape: Sequence[int], position: Sequence[int], axis: int, patch_size: Sequence[int]) -> np.ndarray:
    """``(3, rows, columns)`` float32: :func:`volume_positions` of a volume of ``shape`` over the
    ``patch_size`` crop of the slice through ``position`` along ``axis``, centred on it as
    :func:`~.inputs.crop_centred` cuts it (growing on past the volume's edges)."""
    sides, along = iter(patch_size), []  # the voxel indices the crop covers along z, y and x
    for channel in range(3):
        if channel == axis:
            along.append(np.array([position[axis]]))
        else:
            side = next(sides)
            along.append(int(position[channel]) - side // 2 + np.arange(side))
    grids = np.meshgrid(*(_distances(indices, side) for indices, side in zip(along, shape)), indexing="ij")
    return np.stack([np.squeeze(grid, axis=axis) for grid in grids])
