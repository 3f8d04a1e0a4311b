"""A model may segment on another working grid than it trained on (evaluate_tumour.py and
bundle_model.py --working-spacing): the sarcoma CT networks, trained at 1.5 mm with scale
augmentation, find small tumours better on a 1.2 mm grid. The override changes only the named
task, refuses what it cannot mean, and a bundled model keeps it with unchanged weights."""

from __future__ import annotations

import pytest
import torch

from MultiTaskSegLib.errors import InputError
from MultiTaskSegLib.model_catalog import BUNDLED_MODEL_DIR
from MultiTaskSegLib.model_files import load_model, save_model
from MultiTaskSegLib.tasks import LabelSpace


def test_only_the_named_task_moves_to_the_new_grid():
    space = LabelSpace.from_names(["brain_t1_mri", "sarcoma_ct"])
    brain, sarcoma = space.tasks

    finer = space.with_working_spacing({"sarcoma_ct": 1.2})

    assert finer.task("sarcoma_ct").working_spacing_mm == 1.2 != sarcoma.working_spacing_mm
    assert finer.task("brain_t1_mri") == brain
    assert finer.task("sarcoma_ct").classes == sarcoma.classes


def test_a_task_the_model_lacks_or_an_absurd_spacing_is_refused_by_name():
    space = LabelSpace.from_names(["sarcoma_ct"])

    with pytest.raises(InputError, match="sarcoma_t1_mri.*not among the tasks.*sarcoma_ct"):
        space.with_working_spacing({"sarcoma_t1_mri": 1.2})
    with pytest.raises(InputError, match="sarcoma_ct must be 0.1-10 mm, got 0"):
        space.with_working_spacing({"sarcoma_ct": 0})


def test_a_saved_model_keeps_its_new_grid_and_its_weights(tmp_path):
    model = load_model(BUNDLED_MODEL_DIR / "triplanar-phantoms")
    trained = model.label_space.task("brain_t1_mri").working_spacing_mm
    weights = model.weights_sha256

    model.label_space = model.label_space.with_working_spacing({"brain_t1_mri": trained * 0.8})
    reloaded = load_model(save_model(model, tmp_path / "finer"))

    assert reloaded.label_space.task("brain_t1_mri").working_spacing_mm == pytest.approx(trained * 0.8)
    assert reloaded.weights_sha256 == weights


def test_operating_points_chosen_again_repeat_the_trainers_on_its_grid_and_move_on_another(tmp_path, tiny_dataset):
    """``evaluate_tumour.py / bundle_model.py --rechoose-operating-point(s)``: on the run's own grid the
    run's validation cases give back the trainer's point; on another grid they are chosen there."""
    from MultiTaskSegLib.training import TrainingConfig, operating_points_on_working_grid, train

    settings = dict(tasks=["breast_mri"], architecture="triplanar", batch_size=12, steps=4, validate_every=2,
                    validation_fraction=0.34, seed=3, device="cpu", learning_rate=0.01,
                    arguments={"layers": 2, "channels": 4, "hidden_features": 8, "grid": 2},
                    data={"breast_mri": str(tiny_dataset / "breast_mri")})
    run_config = TrainingConfig(**settings)
    model = train(run_config, tmp_path / "run", log=lambda message: None)
    cpu = torch.device("cpu")

    again = operating_points_on_working_grid(model, run_config, cpu)
    assert again == pytest.approx(model.card["operating_points"])

    trained = model.label_space.task("breast_mri").working_spacing_mm
    model.label_space = model.label_space.with_working_spacing({"breast_mri": trained * 2})
    coarser = operating_points_on_working_grid(model, run_config, cpu)
    assert set(coarser) == {"breast_mri"} and 0 < coarser["breast_mri"] < 1


def test_a_run_without_validation_cases_has_no_operating_point_to_choose_again(tiny_dataset):
    from MultiTaskSegLib.training import TrainingConfig, operating_points_on_working_grid

    model = load_model(BUNDLED_MODEL_DIR / "triplanar-phantoms")
    run_config = TrainingConfig(tasks=["breast_mri"], architecture="triplanar", validation_fraction=0.0,
                                data={"breast_mri": str(tiny_dataset / "breast_mri")})

    with pytest.raises(InputError, match="kept no validation cases.*nothing to choose an operating point on"):
        operating_points_on_working_grid(model, run_config, torch.device("cpu"))
