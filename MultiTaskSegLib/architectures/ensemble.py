"""Several networks of one recipe whose probabilities are averaged: nnU-Net's ensemble of its
cross-validation networks (Isensee et al. 2021), here of runs trained with different seeds (so
different initial weights, mini-batches and validation patients).

An ensemble is assembled from trained models (:func:`~MultiTaskSegLib.ensembles.assemble_ensemble`,
``scripts/bundle_model.py --ensemble-with``), not trained from scratch; its members share one
architecture and its arguments. It is stored as one model file: the members' tensors under
``0.``, ``1.``, ... of one :class:`torch.nn.ModuleList`. Fine-tuning it (learning from corrections)
trains every member on the same mini-batches, the mean of their losses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import InputError
from ..inferers import part_options
from ..sampling import BalancedVoxelSampler
from .base import Architecture, InferenceOptions, MethodConfig, TrainingStep, default_field


@dataclass
class EnsembleConfig(MethodConfig):
    """Arguments of :class:`EnsembleArchitecture` (documented there)."""

    member_architecture: str = "unet2d_multiplanar"
    member_arguments: Mapping[str, Any] = default_field({})
    members: int = 2

    def __post_init__(self) -> None:
        if self.member_architecture == EnsembleArchitecture.name:
            raise InputError("an ensemble's members cannot be ensembles; assemble it from the trained networks")
        if int(self.members) < 1:
            raise InputError(f"an ensemble needs at least one member, got members={self.members}")
        self.members = int(self.members)
        self.member_arguments = dict(self.member_arguments)


class EnsembleArchitecture(Architecture):
    """The mean of the softmax probabilities of ``members`` networks of one architecture.

    Args:
        member_architecture: the members' architecture (a registry name, e.g. ``unet2d_multiplanar``).
        member_arguments: the members' architecture arguments (one set for all: one recipe).
        members: how many networks.
    """

    name: ClassVar[str] = "ensemble"
    summary: ClassVar[str] = "Ensemble: the mean probabilities of several networks of one recipe (nnU-Net style)"
    Config: ClassVar[type[MethodConfig]] = EnsembleConfig

    def build_network(self, num_labels: int) -> torch.nn.Module:
        from . import architecture_class  # the registry imports this module

        build = architecture_class(self.config.member_architecture)
        self.members = [build(num_labels, self.task_names, **self.config.member_arguments)
                        for _ in range(self.config.members)]
        return torch.nn.ModuleList(member.network for member in self.members)

    @property
    def presence_threshold(self) -> float | None:
        return self.members[0].presence_threshold

    # -- fine-tuning: every member on the same mini-batches -----------------------------------------

    def sample_batch(self, sampler: BalancedVoxelSampler, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return self.members[0].sample_batch(sampler, batch_size, rng)

    def training_step(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> TrainingStep:
        steps = [member.training_step(batch, device) for member in self.members]
        loss = torch.stack([step.loss for step in steps]).mean()
        parts = {f"member{number}_loss": float(step.loss.detach()) for number, step in enumerate(steps)}
        return TrainingStep(loss, parts)

    def make_optimizer(self, learning_rate: float | None = None) -> torch.optim.Optimizer:
        """The members' optimiser with its settings, over every member's weights."""
        template = self.members[0].make_optimizer(learning_rate)
        return type(template)(self.network.parameters(), **template.defaults)

    def make_scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int | None = None):
        return self.members[0].make_scheduler(optimizer, steps_per_epoch)

    def clip_gradients(self) -> None:
        for member in self.members:
            member.clip_gradients()

    # -- prediction: the mean of the members' probabilities ----------------------------------------

    def _predict(self, image: np.ndarray, device: torch.device, options: InferenceOptions) -> np.ndarray:
        total = None
        for number, member in enumerate(self.members):
            probabilities = member.predict_probabilities(
                image, device, part_options(options, number, len(self.members), f"network {number + 1} of {len(self.members)}"))
            total = probabilities if total is None else np.add(total, probabilities, out=total)
        return total / np.float32(len(self.members))

    def presence_by_class(self, image: np.ndarray, device: torch.device,
                          options: InferenceOptions | None = None) -> np.ndarray | None:
        presences = [member.presence_by_class(image, device, options) for member in self.members]
        return None if any(presence is None for presence in presences) else np.mean(presences, axis=0)
