"""What every architecture provides, so the trainer, model files and inference stay generic.

An architecture couples a network with the three things that differ between the papers:
how training samples are drawn from prepared volumes, which loss is used, and how a whole
volume is predicted. The trainer, the model files, ``multitaskseg segment`` and the Slicer
module only talk to this interface; no architecture-specific code lives outside its own module.

Each architecture states its arguments once, as a :class:`MethodConfig` dataclass (defaults =
its paper; network defaults read from the network's own signature); the model file stores
``config.to_arguments()`` and rebuilds the same network from it.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..inferers.options import CancelCheck, InferenceOptions, ProgressCallback
from ..sampling import BalancedVoxelSampler, PreparedCase

__all__ = ["Architecture", "CancelCheck", "InferenceOptions", "MethodConfig", "PreparedCase", "ProgressCallback",
           "TrainingStep", "network_default"]


def network_default(network: type, argument: str) -> Any:
    """The default of ``argument`` in ``network``'s constructor, so a config does not restate it."""
    return inspect.signature(network).parameters[argument].default


def default_field(value: Any) -> Any:
    """A dataclass field defaulting to ``value`` (a tuple or dict is copied for each config)."""
    if isinstance(value, (list, dict)):
        return field(default_factory=lambda: type(value)(value))
    return field(default=value)


@dataclass
class MethodConfig:
    """Base of the architectures' argument dataclasses: built from a model file's or the command
    line's arguments (unknown names refused), stored back as plain JSON values."""

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> "MethodConfig":
        known = [item.name for item in fields(cls)]
        unknown = sorted(set(arguments) - set(known))
        if unknown:
            raise InputError(f"unknown architecture argument(s) {', '.join(unknown)}; this architecture takes "
                             f"{', '.join(known)}")
        return cls(**arguments)

    def to_arguments(self) -> dict[str, Any]:
        """The arguments as JSON values (tuples become lists)."""
        return _plain(asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


@dataclass
class TrainingStep:
    """The loss of one mini-batch and its named parts, for logging."""

    loss: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


class Architecture(ABC):
    """A network plus its sampling, loss and whole-volume prediction.

    ``config`` holds the arguments (an instance of the class's ``Config``); ``arguments`` are
    those, as stored in the model file so the same network is rebuilt on load.
    """

    #: Registry name, used by ``--arch`` and in model files.
    name: ClassVar[str]
    #: One line for ``multitaskseg models`` and the model card.
    summary: ClassVar[str]
    #: The arguments' dataclass.
    Config: ClassVar[type[MethodConfig]]
    #: Whether training can use cases that have a label map and no image (images drawn from labels).
    synthesises_images: ClassVar[bool] = False
    #: Whether the network reads several image channels (``in_channels``, for multi-channel tasks).
    reads_channels: ClassVar[bool] = False

    def __init__(self, num_labels: int, task_names: Sequence[str], **arguments: Any) -> None:
        self.num_labels = num_labels
        self.task_names = tuple(task_names)
        self.config = self.Config.from_arguments(arguments)
        self.network = self.build_network(num_labels)

    @property
    def arguments(self) -> dict[str, Any]:
        return self.config.to_arguments()

    @abstractmethod
    def build_network(self, num_labels: int) -> torch.nn.Module:
        """Create the torch module from ``self.config``."""

    @abstractmethod
    def sample_batch(self, sampler: BalancedVoxelSampler, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Draw one mini-batch from ``sampler.cases``, using ``sampler.sample`` for its positions so
        the batch is balanced over tasks and, within each task, over its classes."""

    @abstractmethod
    def training_step(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> TrainingStep:
        """Forward the batch and return the loss (the network is in training mode)."""

    def weights_from(self, source: "Architecture") -> dict[str, torch.Tensor]:
        """The tensors of ``source``'s network to start this network from (``train --init-from``):
        those whose name and shape agree."""
        target = self.network.state_dict()
        return {name: tensor for name, tensor in source.network.state_dict().items()
                if name in target and target[name].shape == tensor.shape}

    def make_optimizer(self, learning_rate: float | None = None) -> torch.optim.Optimizer:
        """Adam, as every paper here uses; subclasses add their paper's settings."""
        return torch.optim.Adam(self.network.parameters(), lr=learning_rate or 1e-3)

    def make_scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int | None = None):
        """The paper's learning-rate schedule, stepped once after every optimiser step; ``None``: a
        constant rate. ``steps_per_epoch`` overrides the architecture's epoch (a fine-tune's own run)."""
        return None

    def clip_gradients(self) -> None:
        """Called between backward and the optimiser step; no clipping unless the paper asks."""

    def predict_probabilities(self, image: np.ndarray, device: torch.device,
                              options: InferenceOptions | None = None) -> np.ndarray:
        """Softmax probabilities (labels, z, y, x) float32 for a whole normalised volume.

        Runs in eval mode without gradients; tiles so memory stays bounded (``options``: progress,
        cancel, block size, the classes asked for); raises ``CancelledError`` when cancelled.
        """
        return self._predict(image, torch.device(device), options or InferenceOptions())

    @abstractmethod
    def _predict(self, image: np.ndarray, device: torch.device, options: InferenceOptions) -> np.ndarray:
        """:meth:`predict_probabilities` with its options filled in."""

    #: The presence below which :meth:`presence_by_class` calls a structure absent (None: no head).
    presence_threshold: ClassVar[float | None] = None

    def presence_by_class(self, image: np.ndarray, device: torch.device,
                          options: InferenceOptions | None = None) -> np.ndarray | None:
        """Per label the highest presence probability the network gives anywhere in the volume
        (background: 1), for a network with a presence head; ``None`` for the others."""
        return None
