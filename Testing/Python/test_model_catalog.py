"""Models are listed and their cards read without PyTorch, and found by name after a Slicer update."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from MultiTaskSegLib.errors import InputError
from MultiTaskSegLib.model_catalog import (
    BUNDLED_MODEL_DIR,
    ModelCardCache,
    bundled_models,
    read_model_card,
    resolve_model_path,
)

ROOT = Path(__file__).resolve().parents[2]


def test_models_and_their_cards_are_listed_where_torch_cannot_be_imported():
    script = (
        "import sys, json; sys.modules['torch'] = None; sys.modules['safetensors'] = None\n"
        "from MultiTaskSegLib.model_catalog import bundled_models, read_model_card\n"
        "print(json.dumps({name: [t['name'] for t in read_model_card(path)['tasks']] "
        "for name, path in bundled_models().items()}))\n"
    )
    listed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    cards = json.loads(listed.stdout)
    assert set(cards) == set(bundled_models()) and cards
    assert all(tasks for tasks in cards.values())


def test_a_missing_model_of_ones_own_is_an_error_even_when_a_bundled_model_has_its_name():
    name = next(iter(bundled_models()))
    for missing in (Path("/mnt/unmounted/my_models") / name, Path("my_models") / f"{name}.zip"):
        with pytest.raises(InputError, match="no model at"):
            resolve_model_path(missing)


def test_a_stale_path_to_a_bundled_model_from_an_older_slicer_gives_the_bundled_model():
    name = next(iter(bundled_models()))
    stale = Path("/Applications/Slicer-5.8.1.app/Contents/lib/Slicer-5.8/qt-scripted-modules/Resources/Models") / name
    assert not stale.exists()
    assert resolve_model_path(stale) == bundled_models()[name]
    assert read_model_card(str(stale))["name"] == read_model_card(name)["name"]


def test_bundled_models_are_found_by_name():
    for name, path in bundled_models().items():
        assert resolve_model_path(name) == path


def test_a_model_json_that_is_not_a_complete_object_is_refused_clearly(tmp_path):
    import pytest

    from MultiTaskSegLib.errors import ModelFileError

    for text, message in (("[1, 2]", "JSON object"), ('{"format_version": 1, "tasks": []}', "lacks name, architecture")):
        (tmp_path / "model.json").write_text(text, encoding="utf-8")
        with pytest.raises(ModelFileError, match=message):
            read_model_card(tmp_path)


def card_folder(folder: Path, name: str) -> Path:
    """A model folder holding only a model.json (enough for its card) of the given name."""
    metadata = read_model_card(next(iter(bundled_models().values())))
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps({**metadata, "name": name}), encoding="utf-8")
    return folder


def test_the_card_is_read_once_per_model_and_again_when_the_model_changes(tmp_path):
    first, second = card_folder(tmp_path / "first", "first"), card_folder(tmp_path / "second", "second")
    cache = ModelCardCache()
    assert cache.card(str(first))["name"] == "first"
    (first / "model.json").write_text(json.dumps({**read_model_card(first), "name": "rewritten"}), encoding="utf-8")
    assert cache.card(str(first))["name"] == "first"  # not read again for the same model
    assert cache.card(str(second))["name"] == "second"
    assert cache.card(str(first))["name"] == "rewritten"  # another model was asked for in between
    (first / "model.json").write_text(json.dumps({**read_model_card(first), "name": "fine-tuned"}), encoding="utf-8")
    cache.forget()
    assert cache.card(str(first))["name"] == "fine-tuned"


def test_no_model_or_an_unreadable_card_gives_an_empty_card(tmp_path, caplog):
    cache = ModelCardCache()
    assert cache.card("") == {}
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.json").write_text("{not json", encoding="utf-8")
    assert cache.card(str(tmp_path / "broken")) == {}
    assert "not valid JSON" in caplog.text
