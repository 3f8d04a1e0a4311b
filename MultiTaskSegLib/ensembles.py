"""Assemble trained models of one recipe into one ensemble model (see
:mod:`~MultiTaskSegLib.architectures.ensemble`): what ``scripts/bundle_model.py --ensemble-with`` does."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from .architectures.ensemble import EnsembleArchitecture
from .errors import InputError
from .model_files import SegmentationModel, as_model


def _same_weights(one: SegmentationModel, other: SegmentationModel) -> bool:
    first, second = one.architecture.network.state_dict(), other.architecture.network.state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def assemble_ensemble(sources: Sequence[str | os.PathLike | SegmentationModel], name: str | None = None) -> SegmentationModel:
    """One model whose probabilities are the mean of ``sources``' (models or model paths).

    The members must segment the same label space with the same architecture and arguments (one
    recipe, other seeds). The first member gives the card, its binary operating points become the
    mean of the members' (each chosen on that member's own validation patients); the provenance
    lists every member, the cases any member trained on and the validation cases none trained on.
    """
    members = [as_model(source) for source in sources]
    if len(members) < 2:
        raise InputError(f"an ensemble needs at least two trained models, got {len(members)}")
    first = members[0]
    for other in members[1:]:
        if other.label_space.to_json() != first.label_space.to_json():
            raise InputError(f"{other.name} segments other tasks or classes than {first.name} "
                             f"({', '.join(other.label_space.task_names)} against {', '.join(first.label_space.task_names)}); "
                             "an ensemble's members share one label space")
        if (other.architecture.name, other.architecture.arguments) != (first.architecture.name, first.architecture.arguments):
            raise InputError(f"{other.name} is another recipe than {first.name} (architecture {other.architecture.name} "
                             f"against {first.architecture.name}, or other arguments); an ensemble's members share one recipe")
    if isinstance(first.architecture, EnsembleArchitecture):
        raise InputError(f"{first.name} is already an ensemble; assemble the trained networks themselves")
    for number, member in enumerate(members):
        for earlier in members[:number]:
            if _same_weights(member, earlier):
                raise InputError(f"two members ({earlier.name} and {member.name}) have the same weights, so the "
                                 "ensemble would average one network with itself; give networks trained apart")
    architecture = EnsembleArchitecture(len(first.label_space), first.label_space.task_names,
                                        member_architecture=first.architecture.name,
                                        member_arguments=first.architecture.arguments, members=len(members))
    for target, member in zip(architecture.members, members):
        target.network.load_state_dict(member.architecture.network.state_dict())
    card = dict(first.card)
    points = [member.card.get("operating_points", {}) for member in members]
    shared = set.intersection(*(set(point) for point in points))
    if shared:
        card["operating_points"] = {task: round(float(np.mean([point[task] for point in points])), 4) for task in sorted(shared)}
    card.pop("validation_dice", None)  # each member's, on its own validation patients: not the ensemble's
    trained = sorted({case for member in members for case in member.provenance.get("training_cases", [])})
    validated = sorted({case for member in members for case in member.provenance.get("validation_cases", [])} - set(trained))
    provenance = {"training_cases": trained, "validation_cases": validated, "ensemble_of": [{"name": member.name, "version": member.version, "source": str(member.path),
                                   "weights_sha256": member.weights_sha256, "provenance": member.provenance}
                                  for member in members]}
    return SegmentationModel(name=name or first.name, architecture=architecture, label_space=first.label_space,
                             version=first.version, card=card, provenance=provenance)
