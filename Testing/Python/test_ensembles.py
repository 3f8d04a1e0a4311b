"""Ensembles of trained models: the mean of the members' probabilities, stored as one model file,
segmenting through the usual call, fine-tunable, and refusing members of another recipe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import make_tiny_model, write_tiny_dataset

from MultiTaskSegLib.ensembles import assemble_ensemble
from MultiTaskSegLib.errors import InputError
from MultiTaskSegLib.finetuning import finetune
from MultiTaskSegLib.inference import segment_image
from MultiTaskSegLib.model_files import SegmentationModel, load_model, save_model
from MultiTaskSegLib.tasks import LabelSpace

TASKS = ["breast_mri", "cardiac_cta"]


def members(tmp_path, seeds=(1, 2)):
    paths = []
    for seed in seeds:
        model = make_tiny_model(TASKS, seed=seed, varied=True, name="tiny")
        model.card = {"operating_points": {"breast_mri": 0.3 + 0.2 * (seed - 1)}, "validation_dice": {"breast_mri": {}}}
        model.provenance = {"training_cases": [f"breast_mri/case{seed}"], "validation_cases": ["breast_mri/case9", f"breast_mri/case{3 - seed}"]}
        paths.append(save_model(model, tmp_path / f"member{seed}"))
    return paths


def volume() -> np.ndarray:
    return np.random.default_rng(0).random((9, 10, 11)).astype(np.float32)


def test_an_ensemble_predicts_the_mean_of_its_members_probabilities(tmp_path):
    paths = members(tmp_path)
    ensemble = assemble_ensemble(paths, name="tiny-ensemble")
    device = torch.device("cpu")
    expected = np.mean([load_model(path).architecture.predict_probabilities(volume(), device) for path in paths], axis=0)
    assert np.allclose(ensemble.architecture.predict_probabilities(volume(), device), expected, atol=1e-6)
    single = load_model(paths[0]).architecture.predict_probabilities(volume(), device)
    assert not np.allclose(expected, single, atol=1e-3), "the members must differ for this test to mean anything"


def test_a_saved_ensemble_loads_as_one_model_and_segments_with_the_mean_operating_point(tmp_path):
    paths = members(tmp_path)
    saved = save_model(assemble_ensemble(paths, name="tiny-ensemble"), tmp_path / "ensemble")
    loaded = load_model(saved)
    assert loaded.architecture.name == "ensemble" and len(loaded.architecture.members) == 2
    assert loaded.card["operating_points"] == {"breast_mri": 0.4}
    assert "validation_dice" not in loaded.card, "a member's validation Dice is not the ensemble's"
    # what any member trained on counts as seen; case1 was member 2's validation case but member 1's training case
    assert loaded.provenance["training_cases"] == ["breast_mri/case1", "breast_mri/case2"]
    assert loaded.provenance["validation_cases"] == ["breast_mri/case9"]
    image = sitk.GetImageFromArray(volume() * 100)
    result = segment_image(loaded, image, tasks=["breast_mri"], device="cpu")
    labels = sitk.GetArrayFromImage(result.labels)
    assert labels.shape == volume().shape and result.labels.GetSpacing() == image.GetSpacing()


def test_progress_runs_once_from_zero_to_one_over_the_members(tmp_path):
    from MultiTaskSegLib.inferers import InferenceOptions

    ensemble = assemble_ensemble(members(tmp_path))
    fractions = []
    ensemble.architecture.predict_probabilities(volume(), torch.device("cpu"),
                                                InferenceOptions(progress=lambda fraction, stage: fractions.append(fraction)))
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0) and min(fractions) <= 0.5


def test_fine_tuning_an_ensemble_changes_every_member(tmp_path):
    saved = save_model(assemble_ensemble(members(tmp_path), name="tiny-ensemble"), tmp_path / "ensemble")
    data = write_tiny_dataset(tmp_path / "corrected", cases=3)
    tuned = finetune(saved, {"breast_mri": data / "breast_mri"}, tmp_path / "run", steps=3, batch_size=4, device="cpu",
                     validate_every=3)
    before, after = load_model(saved).architecture.members, load_model(tmp_path / "run" / "model").architecture.members
    assert tuned.architecture.name == "ensemble"
    for old, new in zip(before, after):
        changed = [not torch.equal(a, b) for a, b in zip(old.network.state_dict().values(), new.network.state_dict().values())]
        assert any(changed)


def test_members_of_another_recipe_or_label_space_are_refused(tmp_path):
    first = make_tiny_model(TASKS, seed=1)
    wider = SegmentationModel.create("wider", "triplanar", LabelSpace.from_names(TASKS), layers=2, channels=6, hidden_features=8)
    other_tasks = make_tiny_model(["breast_mri"], seed=2)
    with pytest.raises(InputError, match="another recipe"):
        assemble_ensemble([first, wider])
    with pytest.raises(InputError, match="one label space"):
        assemble_ensemble([first, other_tasks])
    with pytest.raises(InputError, match="at least two"):
        assemble_ensemble([first])
    with pytest.raises(InputError, match="the same weights"):
        assemble_ensemble([first, make_tiny_model(TASKS, seed=2), make_tiny_model(TASKS, seed=1)])


def test_the_model_file_records_the_members_recipe(tmp_path):
    saved = save_model(assemble_ensemble(members(tmp_path)), tmp_path / "ensemble")
    architecture = json.loads((saved / "model.json").read_text())["architecture"]
    assert architecture["name"] == "ensemble"
    assert architecture["arguments"]["member_architecture"] == "triplanar" and architecture["arguments"]["members"] == 2


def test_the_ensemble_command_writes_a_new_model_and_never_overwrites(tmp_path, capsys):
    from MultiTaskSegLib.cli import main

    paths = [str(path) for path in members(tmp_path)]
    out = tmp_path / "ensemble"
    assert main(["ensemble", "--models", *paths, "--out", str(out), "--name", "tiny-ensemble"]) == 0
    assert "ensemble of 2 triplanar networks" in capsys.readouterr().out
    assert load_model(out).name == "tiny-ensemble"
    before = (out / "model.json").read_bytes()
    assert main(["ensemble", "--models", *paths, "--out", str(out)]) != 0
    assert "exists" in capsys.readouterr().err and (out / "model.json").read_bytes() == before
