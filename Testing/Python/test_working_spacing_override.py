"""A model may segment on another working grid than it trained on (evaluate_tumour.py and
bundle_model.py --working-spacing): the sarcoma CT networks, trained at 1.5 mm with scale
augmentation, find small tumours better on a 1.2 mm grid. The override changes only the named
task, refuses what it cannot mean, and a bundled model keeps it with unchanged weights."""

from __future__ import annotations

import pytest

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
