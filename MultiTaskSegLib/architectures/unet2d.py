"""The CMU-Net paper's three 2-D U-Nets: CMU-Net (presence head), U-Net, pre-trained-encoder U-Net.

===================== ================================================================
``cmunet``            2-D slices, 0.5 Dice + 0.5 focal loss on a per-class presence head
``unet2d``            the same 2-D U-Net without the head, Dice loss only (baseline)
``unet2d_pretrained`` encoder + head first trained on presence, then the U-Net on Dice
===================== ================================================================

Training crops are 2-D slices around positions from ``sampler.sample`` (balanced over tasks and
classes), zero-padded where they reach past the image, the padding left out of the losses.
2-D networks run slice by slice, each slice padded to at least the training ``patch_size`` and cut into
windows of that size (as in training, where instance norm saw crops of that size), several windows
per batch; ``max_block_voxels`` caps the voxels of one batch. On CUDA inference runs under float16
autocast; on the CPU it runs in float32 without autocast. ``progress(fraction, stage)`` is called
after every batch; ``cancelled()`` is checked before every batch and raises
:class:`~MultiTaskSegLib.errors.CancelledError`.

Windows larger than a slice's side overlap by ``window_overlap`` and are blended with Gaussian
weights, so the output has no window edges (instance norm makes every window see its own
statistics).

CMU-Net uses its presence head at inference: a slice where no requested class reaches
``presence_threshold`` in any of its windows is not decoded and is background;
``InferenceOptions.requested_labels`` names the label-space indices the user asked for (default: all). The decision is made per slice, as in the paper, never per window: a window
blanked beside a decoded neighbour would leave a straight-edged hole.

Hooks of :class:`~.base.Architecture` that these architectures fill in:

* ``make_scheduler(optimizer, steps_per_epoch=None)``: cosine annealing
  with warm restarts every ``restart_epochs`` epochs, as the CMU-Net paper; an epoch is
  ``steps_per_epoch`` training steps (default: the architecture's ``steps_per_epoch`` argument, the
  paper's 1,664 training slices over its batch size). Call ``scheduler.step()`` once after every
  optimiser step.
* ``presence_by_class(image, device)`` on ``cmunet`` (``None`` on the others): per label, the highest presence probability
  over all slices (background: 1), so the application can say which requested structures seem
  absent from the scan (e.g. below ``presence_threshold``).
* ``unet2d_pretrained`` counts its own ``training_step`` calls (the network buffer
  ``training_steps_done``, saved with the weights): the first ``pretrain_steps`` train the encoder
  and head on presence only, the rest the U-Net on Dice only. The trainer needs to do nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..errors import InputError
from ..inferers import (InferenceOptions, WindowGrid, bfloat16_autocast, blend_windows, inference_context, raise_if_cancelled,
                        report_progress)
from ..losses import presence_focal_loss, soft_dice_loss
from ..networks.cmunet import CMUNet
from ..sampling import BalancedVoxelSampler
from .base import Architecture, MethodConfig, TrainingStep, default_field, network_default
from .inputs import as_ints, check_channels, crop_centred


def presence_targets(labels: np.ndarray, inside: np.ndarray, num_labels: int, min_voxels: int = 1) -> np.ndarray:
    """``(num_labels - 1,)`` float32: 1 for each label-space class 1.. with at least ``min_voxels``
    voxels in the part of the crop that lies inside the image, else 0.

    "Present" means *visible to the network*: a class elsewhere in the slice but outside the crop is
    absent, because the head only sees the crop. Classes of the model's other tasks are absent too,
    as the shared background makes them in the segmentation target.
    """
    counts = np.bincount(labels[inside].ravel().astype(np.int64), minlength=num_labels)[1:num_labels]
    return (counts >= min_voxels).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# CMU-Net paper: 2-D U-Nets on slices

#: Share of a window's side its neighbours overlap at inference (Gaussian blending, see
#: :func:`~MultiTaskSegLib.inferers.windows.plan_gaussian_windows`); ``None`` in a model file: the
#: older margin scheme.
WINDOW_OVERLAP = 0.5


@dataclass
class SliceUNetConfig(MethodConfig):
    """Arguments every 2-D U-Net takes (see :class:`CMUNetArchitecture` for their meaning)."""

    channels: Sequence[int] = default_field(network_default(CMUNet, "channels"))
    negative_slope: float = network_default(CMUNet, "negative_slope")
    in_channels: int = network_default(CMUNet, "in_channels")
    patch_size: Sequence[int] = (128, 128)
    learning_rate: float = 1e-3
    restart_epochs: int = 10
    steps_per_epoch: int = 277
    presence_min_voxels: int = 1
    inference_margin: int = 16
    inference_block_voxels: int = 2**20
    window_overlap: float | None = WINDOW_OVERLAP
    mixed_precision: bool = True

    def __post_init__(self) -> None:
        self.channels = tuple(int(count) for count in self.channels)
        self.mixed_precision = bool(self.mixed_precision)
        self.patch_size = as_ints(self.patch_size, 2, "patch_size")
        multiple = 2 ** (len(self.channels) - 1)
        if any(side % multiple or side < 2 * multiple for side in self.patch_size):
            raise InputError(
                f"patch_size {list(self.patch_size)} must have sides that are multiples of {multiple} "
                f"(2^{len(self.channels) - 1} for {len(self.channels)} encoder blocks) and at least {2 * multiple}, "
                "so instance norm at the bottleneck sees more than one voxel"
            )
        if self.window_overlap is not None and not 0.0 <= float(self.window_overlap) < 1.0:
            raise InputError(f"window_overlap must lie in 0..1 (1 excluded), or be null for margin blending; "
                             f"got {self.window_overlap}")
        if int(self.in_channels) < 1:
            raise InputError(f"in_channels must be 1 or more, got {self.in_channels}")
        self.negative_slope, self.learning_rate = float(self.negative_slope), float(self.learning_rate)
        self.in_channels, self.restart_epochs = int(self.in_channels), int(self.restart_epochs)
        self.steps_per_epoch, self.presence_min_voxels = int(self.steps_per_epoch), int(self.presence_min_voxels)
        self.inference_margin, self.inference_block_voxels = int(self.inference_margin), int(self.inference_block_voxels)
        self.window_overlap = None if self.window_overlap is None else float(self.window_overlap)


@dataclass
class PlanarUNetConfig(SliceUNetConfig):
    """The CMU-Net paper's baseline U-Net on one plane (paper: learning rate 1e-2, batch 10)."""

    slice_axis: int = 0
    learning_rate: float = 1e-2
    steps_per_epoch: int = 166

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.slice_axis not in (0, 1, 2):
            raise InputError(f"slice_axis must be 0 (axial), 1 (coronal) or 2 (sagittal), got {self.slice_axis}")
        self.slice_axis = int(self.slice_axis)


def _check_focal_weights(weights: Sequence[float]) -> tuple[float, float]:
    weights = tuple(float(weight) for weight in weights)
    if len(weights) != 2 or min(weights) < 0:
        raise InputError(f"focal weights are (positive, negative), two non-negative numbers; got {list(weights)}")
    return weights


@dataclass
class CMUNetConfig(PlanarUNetConfig):
    """CMU-Net (paper: learning rate 1e-3, batch 6, loss 0.5 Dice + 0.5 focal)."""

    learning_rate: float = 1e-3
    steps_per_epoch: int = 277
    segmentation_weight: float = 0.5
    classification_weight: float = 0.5
    focal_weights: Sequence[float] = (0.8, 0.2)
    focal_gamma: float = 2.0
    presence_threshold: float | None = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.focal_weights = _check_focal_weights(self.focal_weights)
        self.segmentation_weight, self.classification_weight = float(self.segmentation_weight), float(self.classification_weight)
        self.focal_gamma = float(self.focal_gamma)
        self.presence_threshold = None if self.presence_threshold is None else float(self.presence_threshold)


@dataclass
class PretrainedUNetConfig(PlanarUNetConfig):
    """The two-phase baseline (paper: 100 epochs of presence pre-training, focal weights 0.5/0.5)."""

    pretrain_steps: int = 16_600
    focal_weights: Sequence[float] = (0.5, 0.5)
    focal_gamma: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.pretrain_steps) < 0:
            raise InputError(f"pretrain_steps must be zero or more, got {self.pretrain_steps}")
        self.pretrain_steps = int(self.pretrain_steps)
        self.focal_weights = _check_focal_weights(self.focal_weights)
        self.focal_gamma = float(self.focal_gamma)


class _SliceUNetArchitecture(Architecture):
    """What the 2-D U-Nets share: slice sampling, scheduler, slice-wise prediction.

    A training sample is the ``patch_size`` crop, perpendicular to the slice axis (0 = axial in
    (z, y, x) volumes), of the slice through a balanced position, centred on it. The batch also holds
    the crop's presence targets (see :func:`presence_targets`).
    """

    Config: ClassVar[type[SliceUNetConfig]] = SliceUNetConfig
    #: Whether the network has the presence head.
    presence_head: ClassVar[bool] = True

    @property
    def network_channels(self) -> int:
        """Input channels of the network: the task's images (and, where an architecture adds them, more)."""
        return self.config.in_channels

    def build_network(self, num_labels: int) -> CMUNet:
        config = self.config
        return CMUNet(num_labels, in_channels=self.network_channels, channels=config.channels,
                      negative_slope=config.negative_slope, presence_head=self.presence_head)

    def sample_batch(self, sampler: BalancedVoxelSampler, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        numbers, positions = sampler.sample(batch_size, rng)
        axis, size = self.config.slice_axis, self.config.patch_size
        images, labels, inside, present = [], [], [], []
        for number, position in zip(numbers, positions):
            case = sampler.cases[number]
            centre = np.delete(position, axis)
            image_slice = np.take(case.image, position[axis], axis=axis)
            label_slice = np.take(case.labels, position[axis], axis=axis)
            image, valid = crop_centred(image_slice.astype(np.float32, copy=False), centre, size)
            label = crop_centred(label_slice, centre, size)[0].astype(np.int64)
            images.append(image)
            labels.append(label)
            inside.append(valid)
            present.append(presence_targets(label, valid, self.num_labels, self.config.presence_min_voxels))
        return {
            "image": torch.from_numpy(np.stack(images)[:, None]),
            "labels": torch.from_numpy(np.stack(labels)),
            "valid": torch.from_numpy(np.stack(inside)),
            "present": torch.from_numpy(np.stack(present)),
        }

    def make_optimizer(self, learning_rate: float | None = None) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.network.parameters(), lr=learning_rate or self.config.learning_rate)

    def make_scheduler(
        self, optimizer: torch.optim.Optimizer, steps_per_epoch: int | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """Cosine annealing with warm restarts every ``restart_epochs`` epochs of ``steps_per_epoch``
        steps (default: the architecture's ``steps_per_epoch``); step it once per optimiser step."""
        epoch = self.config.steps_per_epoch if steps_per_epoch is None else int(steps_per_epoch)
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=max(1, self.config.restart_epochs * epoch))

    def _segmentation_loss(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Dice loss of the batch, and the encoder features it came from."""
        image, labels, valid = (batch[key].to(device, non_blocking=True) for key in ("image", "labels", "valid"))
        with bfloat16_autocast(device, self.config.mixed_precision):
            features = self.network.encode(image)
            logits = self.network.decode(features)
        probabilities = torch.softmax(logits.float(), dim=1)
        return soft_dice_loss(probabilities, labels, valid), features

    # -- slice-wise prediction ----------------------------------------------------------------

    def _slice_grid(self, image: np.ndarray, axis: int, max_block_voxels: int | None) -> WindowGrid:
        """The slices along ``axis`` cut into in-plane windows, whole slices per batch (so that a
        presence decision can be taken per slice)."""
        config = self.config
        slices = np.moveaxis(check_channels(image, self.network_channels), 1 + axis, 0)  # (slices, C, H, W)
        multiple = self.network.size_multiple
        # Windows keep at least 2x2 bottleneck voxels: instance norm needs more than one.
        return WindowGrid.plan(slices, self.inference_window(slices.shape[2:]), multiple,
                               max_block_voxels or config.inference_block_voxels, overlap=config.window_overlap,
                               margin=config.inference_margin, smallest=2 * multiple, whole_items=True)

    def inference_window(self, plane: Sequence[int]) -> tuple[int, ...]:
        """The in-plane window of inference for slices of size ``plane``: the training crop, as instance
        norm saw crops of that size in training."""
        return tuple(self.config.patch_size)

    def _predict(self, image: np.ndarray, device: torch.device, options: InferenceOptions) -> np.ndarray:
        """See the module docstring: slices along ``slice_axis``."""
        out = np.zeros((self.num_labels, *np.shape(image)[-3:]), np.float32)
        with inference_context(self.network, device):
            self._add_probabilities(out, image, self.config.slice_axis, device, options)
        return out

    def _add_probabilities(self, out: np.ndarray, image: np.ndarray, axis: int, device: torch.device,
                           options: InferenceOptions, scale: float = 1.0) -> None:
        """Add ``scale`` times the probabilities of slices along ``axis`` into ``out`` (labels, z, y, x;
        a view will do). Run inside :func:`~MultiTaskSegLib.inferers.inference_context`."""
        grid = self._slice_grid(image, axis, options.max_block_voxels)
        target = np.moveaxis(out, 1 + axis, 1)  # (labels, slices, rows, columns), a view

        def predict(batch: torch.Tensor) -> np.ndarray:
            return self._window_probabilities(batch, grid.windows_per_item, options.requested_labels)

        blend_windows(grid, predict, target, device, options, scale, "Segmenting slices")

    def _skip_mask(self, features: list[torch.Tensor], requested_labels: Sequence[int] | None) -> torch.Tensor | None:
        """Windows whose segmentation is skipped (background); ``None`` when nothing is skipped."""
        return None

    def _window_probabilities(self, batch: torch.Tensor, per_slice: int, requested_labels: Sequence[int] | None) -> np.ndarray:
        """Softmax probabilities of a batch of windows (whole slices of ``per_slice`` windows each);
        windows of skipped slices are background."""
        features = self.network.encode(batch)
        skipped = self._skip_mask(features, requested_labels)
        if skipped is None:  # nothing to skip: no masked copies of the features
            return torch.softmax(self.network.decode(features).float(), dim=1).cpu().numpy()
        # A slice is skipped only when all its windows are.
        skipped = skipped.view(-1, per_slice).all(dim=1).repeat_interleave(per_slice)
        kept = ~skipped
        probabilities = torch.zeros((len(batch), self.num_labels, *features[0].shape[2:]), device=batch.device)
        probabilities[:, 0] = 1
        if bool(kept.any()):
            logits = self.network.decode([feature[kept] for feature in features])
            probabilities[kept] = torch.softmax(logits.float(), dim=1)
        return probabilities.cpu().numpy()


class CMUNetArchitecture(_SliceUNetArchitecture):
    """CMU-Net: 2-D U-Net plus a per-class presence head, trained jointly on
    ``segmentation_weight * Dice + classification_weight * focal``.

    Args (network, see :class:`~MultiTaskSegLib.networks.cmunet.CMUNet`): channels, negative_slope, in_channels.
    Args (training):
        patch_size: (rows, columns) of a slice crop, multiples of ``2 ** (len(channels) - 1)``.
        slice_axis: axis of the (z, y, x) volume the slices are perpendicular to (0 = axial).
        learning_rate: Adam's learning rate (paper: 1e-3 for CMU-Net, batch size 6).
        segmentation_weight, classification_weight: loss weights (paper: 0.5 and 0.5).
        focal_weights: (positive, negative) focal loss weights (paper: 0.8, 0.2).
        focal_gamma: focal loss exponent (Lin et al.: 2).
        presence_min_voxels: voxels of a class the crop must hold for it to count as present.
        mixed_precision: train under bfloat16 autocast where the device has bfloat16 arithmetic (CUDA,
            CPUs with AVX-512 BF16/AMX: 1.8x per step here), losses in float32; the multi-planar U-Net
            also predicts in bfloat16 on such CPUs.
        restart_epochs: epochs between warm restarts of the cosine schedule (paper: 10).
        steps_per_epoch: training steps that make one epoch for the schedule (paper: 1,664 slices
            per epoch; 277 steps at CMU-Net's batch size 6, 166 at the baselines' 10).
    Args (inference):
        presence_threshold: slices where every requested class has presence probability below this
            in every window are not decoded and get background; ``None`` decodes everything.
        inference_margin, inference_block_voxels: as for the 3-D U-Net, within the slice plane;
            windows are ``patch_size`` unless that exceeds the voxel limit.
        window_overlap: share of a window's side that its neighbours overlap, blended with Gaussian
            weights; ``None`` (older model files) uses ``inference_margin`` and linear blending.
    """

    name: ClassVar[str] = "cmunet"
    summary: ClassVar[str] = "CMU-Net: 2-D U-Net with a per-class presence head, Dice + focal loss, skips absent slices"
    Config: ClassVar[type[CMUNetConfig]] = CMUNetConfig
    presence_head: ClassVar[bool] = True

    @property
    def presence_threshold(self) -> float | None:
        return self.config.presence_threshold

    def training_step(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> TrainingStep:
        config = self.config
        dice, features = self._segmentation_loss(batch, device)
        present = batch["present"].to(device, non_blocking=True)
        with bfloat16_autocast(device, config.mixed_precision):
            presence = self.network.classify(features[-1])
        focal = presence_focal_loss(presence.float(), present, *config.focal_weights, config.focal_gamma)
        loss = config.segmentation_weight * dice + config.classification_weight * focal
        return TrainingStep(loss, {"dice_loss": float(dice.detach()), "focal_loss": float(focal.detach())})

    def _skip_mask(self, features: list[torch.Tensor], requested_labels: Sequence[int] | None) -> torch.Tensor | None:
        if self.presence_threshold is None:
            return None
        columns = self._presence_columns(requested_labels)
        presence = torch.sigmoid(self.network.classify(features[-1]).float())[:, columns]
        return presence.max(dim=1).values < self.presence_threshold

    def _presence_columns(self, requested_labels: Sequence[int] | None) -> list[int]:
        labels = range(1, self.num_labels) if requested_labels is None else requested_labels
        columns = sorted({int(label) - 1 for label in labels if int(label) != 0})
        if not columns or columns[-1] >= self.num_labels - 1 or columns[0] < 0:
            raise InputError(
                f"requested labels {list(labels)} must be label-space indices between 1 and {self.num_labels - 1}"
            )
        return columns

    def presence_by_class(self, image: np.ndarray, device: torch.device,
                          options: InferenceOptions | None = None) -> np.ndarray:
        """``(num_labels,)`` float32: per label the highest presence probability of any slice window
        (index 0, the background, is always 1). Runs only the encoder and the head."""
        options = options or InferenceOptions()
        grid = self._slice_grid(image, self.config.slice_axis, options.max_block_voxels)
        highest = np.zeros(self.num_labels, np.float32)
        highest[0] = 1
        stage = "Checking which structures are present"
        report_progress(options.progress, 0.0, stage)
        with inference_context(self.network, device):
            done = 0
            for items, total in grid.batches():
                raise_if_cancelled(options.cancelled)
                features = self.network.encode(grid.tensor(items, device))
                presence = torch.sigmoid(self.network.classify(features[-1]).float()).amax(dim=0).cpu().numpy()
                highest[1:] = np.maximum(highest[1:], presence)
                done += len(items)
                report_progress(options.progress, done / total, stage)
        return highest


class UNet2DArchitecture(_SliceUNetArchitecture):
    """The CMU-Net paper's baseline: the same 2-D U-Net without the head, Dice loss only.

    Arguments as :class:`CMUNetArchitecture` where they apply (paper: learning rate 1e-2, batch 10).
    """

    name: ClassVar[str] = "unet2d"
    summary: ClassVar[str] = "2-D U-Net on slices with Dice loss (the CMU-Net paper's baseline)"
    Config: ClassVar[type[PlanarUNetConfig]] = PlanarUNetConfig
    presence_head: ClassVar[bool] = False

    def training_step(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> TrainingStep:
        dice, _ = self._segmentation_loss(batch, device)
        return TrainingStep(dice, {"dice_loss": float(dice.detach())})


class PretrainedEncoderUNet2DArchitecture(_SliceUNetArchitecture):
    """The CMU-Net paper's two-phase baseline: the encoder and presence head are trained on the
    focal loss for ``pretrain_steps`` training steps, then the whole U-Net on the Dice loss.

    The architecture counts its own ``training_step`` calls in the network buffer
    ``training_steps_done``, so the count is saved with the weights and a resumed run continues in
    the right phase. In the first phase the decoder gets no gradient (Adam leaves it alone); in the
    second the head gets none. The head is not used at inference.

    Args: as :class:`CMUNetArchitecture` where they apply, and
        pretrain_steps: training steps of the first phase (default: the paper's 100 epochs, of
            ``steps_per_epoch`` = 166 steps (1,664 slices at batch size 10); a multiple of the
            restart period, so segmentation starts with a warm restart of the learning rate).
        focal_weights: (positive, negative) focal weights of the first phase (paper: 0.5, 0.5).
    """

    name: ClassVar[str] = "unet2d_pretrained"
    summary: ClassVar[str] = "2-D U-Net whose encoder is first pre-trained on slice presence classification, then segmentation"
    Config: ClassVar[type[PretrainedUNetConfig]] = PretrainedUNetConfig
    presence_head: ClassVar[bool] = True

    def build_network(self, num_labels: int) -> CMUNet:
        network = super().build_network(num_labels)
        network.register_buffer("training_steps_done", torch.zeros((), dtype=torch.int64))
        return network

    @property
    def pretraining(self) -> bool:
        """True while the next ``training_step`` trains the encoder on presence classification."""
        return int(self.network.training_steps_done) < self.config.pretrain_steps

    def training_step(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> TrainingStep:
        pretraining = self.pretraining
        self.network.training_steps_done += 1
        if pretraining:
            image, present = (batch[key].to(device, non_blocking=True) for key in ("image", "present"))
            with bfloat16_autocast(device, self.config.mixed_precision):
                logits = self.network.classify(self.network.encode(image)[-1]).float()
            focal = presence_focal_loss(logits, present, *self.config.focal_weights, self.config.focal_gamma)
            return TrainingStep(focal, {"focal_loss": float(focal.detach()), "phase": 1.0})
        dice, _ = self._segmentation_loss(batch, device)
        return TrainingStep(dice, {"dice_loss": float(dice.detach()), "phase": 2.0})
