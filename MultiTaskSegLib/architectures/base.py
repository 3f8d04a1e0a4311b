"""What every architecture provides, so the trainer, model files and inference stay generic.

An architecture couples a network with the three things that differ between the papers:
how training samples are drawn from prepared volumes, which loss is used, and how a whole
volume is predicted. The trainer, the model files, ``multitaskseg segment`` and the Slicer
module only talk to this interface; no architecture-specific code lives outside its own module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from ..sampling import BalancedVoxelSampler

#: progress(fraction in 0..1, stage description); returns nothing.
ProgressCallback = Callable[[float, str], None]
#: cancelled() -> True once the user asked to stop.
CancelCheck = Callable[[], bool]


@dataclass
class PreparedCase:
    """One training/validation volume on the model's working grid.

    ``image`` is float32 (z, y, x), already normalised for its task, or None for a label map whose
    images are synthesised (``extra["source_labels"]``, see :attr:`Architecture.synthesises_images`);
    ``labels`` are label-space indices (0 = shared background); ``foreground`` marks voxels that may
    be sampled (intensity above zero, or inside the case's mask).
    """

    task: str
    name: str
    image: np.ndarray | None
    labels: np.ndarray
    foreground: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainingStep:
    """The loss of one mini-batch and its named parts, for logging."""

    loss: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


class Architecture(ABC):
    """A network plus its sampling, loss and whole-volume prediction.

    ``arguments`` are the constructor arguments of the network; they are stored in the model file
    so the same network is rebuilt on load. Defaults reproduce the architecture's paper.
    """

    #: Registry name, used by ``--arch`` and in model files.
    name: ClassVar[str]
    #: One line for ``multitaskseg models`` and the model card.
    summary: ClassVar[str]
    #: Whether training can use cases that have a label map and no image (images drawn from labels).
    synthesises_images: ClassVar[bool] = False
    #: Whether the network reads several image channels (``in_channels``, for multi-channel tasks).
    reads_channels: ClassVar[bool] = False

    def __init__(self, num_labels: int, task_names: Sequence[str], **arguments: Any) -> None:
        self.num_labels = num_labels
        self.task_names = tuple(task_names)
        self.arguments = dict(arguments)
        self.network = self.build_network(num_labels, **arguments)

    @abstractmethod
    def build_network(self, num_labels: int, **arguments: Any) -> torch.nn.Module:
        """Create the torch module."""

    @abstractmethod
    def sample_batch(
        self,
        sampler: "BalancedVoxelSampler",
        batch_size: int,
        rng: np.random.Generator,
    ) -> dict[str, torch.Tensor]:
        """Draw one mini-batch from ``sampler.cases``, using ``sampler.sample`` for its positions so
        the batch is balanced over tasks and, within each task, over its classes."""

    @abstractmethod
    def training_step(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> TrainingStep:
        """Forward the batch and return the loss (the network is in training mode)."""

    def make_optimizer(self, learning_rate: float | None = None) -> torch.optim.Optimizer:
        """Adam, as every paper here uses; subclasses add their paper's settings."""
        return torch.optim.Adam(self.network.parameters(), lr=learning_rate or 1e-3)

    def clip_gradients(self) -> None:
        """Called between backward and the optimiser step; no clipping unless the paper asks."""

    @abstractmethod
    def predict_probabilities(
        self,
        image: np.ndarray,
        device: torch.device,
        progress: ProgressCallback | None = None,
        cancelled: CancelCheck | None = None,
        max_block_voxels: int | None = None,
    ) -> np.ndarray:
        """Softmax probabilities (labels, z, y, x) float32 for a whole normalised volume.

        Runs in eval mode under ``torch.no_grad``; tiles so memory stays bounded
        (``max_block_voxels`` caps one tile); raises ``CancelledError`` when ``cancelled()``.
        """
