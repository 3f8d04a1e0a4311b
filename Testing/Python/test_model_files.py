"""Model files round-trip, refuse a wrong checksum, and never execute code from the file."""

import json
import pickle
import zipfile

import numpy as np
import pytest
import torch

from MultiTaskSegLib.errors import InputError, ModelFileError
from MultiTaskSegLib.model_files import (
    METADATA_FILE,
    WEIGHTS_FILE,
    SegmentationModel,
    as_model,
    load_model,
    read_model_card,
    save_model,
    sha256_of,
)
from MultiTaskSegLib.tasks import LabelSpace

TINY = {"layers": 2, "channels": 4, "hidden_features": 8}


@pytest.fixture
def model() -> SegmentationModel:
    torch.manual_seed(0)
    model = SegmentationModel.create("tiny", "triplanar", LabelSpace.from_names(["breast_mri", "cardiac_cta"]), **TINY)
    model.card = {"description": "a test model"}
    return model


def predictions(model: SegmentationModel) -> np.ndarray:
    volume = np.random.default_rng(0).random((7, 8, 9)).astype(np.float32)
    return model.architecture.predict_probabilities(volume, torch.device("cpu"))


@pytest.mark.parametrize("name", ["model_folder", "model.zip"])
def test_saved_model_loads_with_the_same_outputs_label_space_and_card(tmp_path, model, name):
    path = save_model(model, tmp_path / name)
    loaded = load_model(path)
    assert loaded.label_space == model.label_space
    assert loaded.architecture.arguments == model.architecture.arguments
    assert loaded.card == {"description": "a test model"}
    assert loaded.weights_sha256 == model.weights_sha256 and len(loaded.weights_sha256) == 64
    assert np.array_equal(predictions(loaded), predictions(model))
    assert read_model_card(path)["architecture"]["name"] == "triplanar"


def test_saving_over_an_existing_model_replaces_it_whole(tmp_path, model):
    path = save_model(model, tmp_path / "m")
    first = sha256_of(path / WEIGHTS_FILE)
    with torch.no_grad():
        next(model.architecture.network.parameters()).add_(1.0)
    save_model(model, path)
    assert sha256_of(path / WEIGHTS_FILE) != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_modified_weights_are_refused_with_a_clear_message(tmp_path, model):
    path = save_model(model, tmp_path / "m")
    weights = path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="SHA-256.*corrupt or was modified"):
        load_model(path)


class _Exploit:
    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_disguised_as_weights_cannot_run_code(tmp_path, model):
    path = save_model(model, tmp_path / "m")
    marker = tmp_path / "pwned"
    _Exploit.marker = marker
    weights = path / WEIGHTS_FILE
    weights.write_bytes(pickle.dumps({"weight": _Exploit()}))
    metadata = json.loads((path / METADATA_FILE).read_text())
    metadata["weights_sha256"] = sha256_of(weights)  # the attacker also fixes the checksum
    (path / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ModelFileError, match="weights do not fit"):
        load_model(path)
    assert not marker.exists()


def test_a_torch_pickle_file_is_not_accepted_as_a_model(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ModelFileError, match="not a model"):
        load_model(path)


def test_archive_without_metadata_and_unknown_names_are_refused(tmp_path):
    archive = tmp_path / "broken.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("readme.txt", "hello")
    with pytest.raises(ModelFileError, match="no model.json"):
        load_model(archive)
    with pytest.raises(InputError, match="no model at 'nonexistent'"):
        load_model("nonexistent")


def test_as_model_passes_a_loaded_model_through_and_loads_a_path_after_saying_so(tmp_path, model):
    assert as_model(model) is model
    stages = []
    loaded = as_model(save_model(model, tmp_path / "m"), lambda fraction, stage: stages.append((fraction, stage)))
    assert isinstance(loaded, SegmentationModel) and loaded.weights_sha256 == model.weights_sha256
    assert stages == [(0.0, "loading the model")]
    with pytest.raises(InputError, match="no model given"):
        as_model("")


def test_an_archive_whose_members_would_unpack_to_gigabytes_is_refused_before_extracting(tmp_path, monkeypatch):
    from MultiTaskSegLib import model_files

    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("model.json", "{}")
        zipped.writestr("weights.safetensors", b"\0" * 3_000_000)  # compresses to a few kB
    monkeypatch.setitem(model_files.ARCHIVE_MEMBER_LIMITS, "weights.safetensors", 1_000_000)
    with pytest.raises(ModelFileError, match="would unpack to 3 MiB"):
        load_model(archive)


def test_newer_format_is_refused_with_advice(tmp_path, model):
    path = save_model(model, tmp_path / "m")
    metadata = json.loads((path / METADATA_FILE).read_text())
    metadata["format_version"] = 99
    (path / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ModelFileError, match="update MultiTaskSeg"):
        load_model(path)


def test_a_saved_model_is_readable_by_others_as_the_umask_allows(tmp_path):
    import os
    import stat

    from conftest import make_tiny_model

    from MultiTaskSegLib.model_files import save_model

    previous = os.umask(0o022)
    try:
        folder = save_model(make_tiny_model(["breast_mri"]), tmp_path / "shared-model")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o644}


@pytest.mark.parametrize("change", [{"channels": 1_000_000}, {"layers": 10_000_000}])
def test_architecture_arguments_edited_in_model_json_are_refused_before_allocating(tmp_path, model, change):
    path = save_model(model, tmp_path / "m")
    metadata = json.loads((path / METADATA_FILE).read_text())
    metadata["architecture"]["arguments"].update(change)
    (path / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ModelFileError, match="does not match the stored weights|far larger than the stored weights"):
        load_model(path)


def test_a_label_range_that_would_exhaust_memory_is_refused():
    from MultiTaskSegLib.errors import InputError
    from MultiTaskSegLib.tasks import task_from_dict

    definition = {"name": "huge", "modality": "MR", "classes": [{"name": "A", "color": [1, 0, 0], "labels": ["0-3000000000"]}]}
    with pytest.raises(InputError, match="within 0..65535"):
        task_from_dict(definition, "huge.toml")
