"""Finding models and reading their cards without PyTorch.

The Slicer module lists the models and shows their cards before PyTorch is installed (installing it
is the user's choice, made on Apply), so nothing here imports torch: only ``model.json`` is read.
Bundled models are found by name; a path to a bundled model that no longer exists (a scene saved
with an older Slicer, whose install folder holds its revision) falls back to the bundled model of
the same name.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

from .errors import InputError, ModelFileError

FORMAT_VERSION = 1
METADATA_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "Resources" / "Models"
MODEL_PATH_VARIABLE = "MULTITASKSEG_MODEL_PATH"


def _read_metadata(folder: Path, where: str) -> dict[str, Any]:
    try:
        metadata = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"{where} is not a model: it has no {METADATA_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{where}: {METADATA_FILE} is not valid JSON ({error})") from None
    if not isinstance(metadata, dict):
        raise ModelFileError(f"{where}: {METADATA_FILE} must hold a JSON object, not {type(metadata).__name__}")
    missing = [key for key in ("name", "architecture", "tasks") if key not in metadata]
    if missing and metadata.get("format_version") == FORMAT_VERSION:
        raise ModelFileError(f"{where}: {METADATA_FILE} lacks {', '.join(missing)}; the model file is incomplete")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{where} has model format {metadata.get('format_version')!r}; this MultiTaskSeg reads format "
            f"{FORMAT_VERSION}: update MultiTaskSeg or re-export the model"
        )
    card = metadata.get("card", {})
    points = card.get("operating_points", {}) if isinstance(card, dict) else None
    if not isinstance(card, dict) or not isinstance(points, dict) or not all(
            isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0 for value in points.values()):
        raise ModelFileError(f"{where}: {METADATA_FILE} has a card whose operating_points are not numbers between 0 "
                             f"and 1 ({points!r}); fix the model card or re-export the model")
    return metadata


def model_folders() -> list[Path]:
    """Where named models are looked up: the bundled folder, then ``$MULTITASKSEG_MODEL_PATH``."""
    folders = [BUNDLED_MODEL_DIR]
    folders += [Path(p) for p in os.environ.get(MODEL_PATH_VARIABLE, "").split(os.pathsep) if p]
    return folders


def bundled_models() -> dict[str, Path]:
    """Named models: every model folder or archive in :func:`model_folders`."""
    found: dict[str, Path] = {}
    for folder in model_folders():
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if (entry / METADATA_FILE).is_file() or entry.suffix == ".zip":
                found.setdefault(entry.name.removesuffix(".zip"), entry)
    return found


def resolve_model_path(source: str | os.PathLike) -> Path:
    """A model folder or archive from a path or a bundled model's name.

    A bundled model's path from an older install (``.../Resources/Models/NAME``, as a saved Slicer
    scene holds it) that no longer exists gives that bundled model; any other missing path is an
    error, never a bundled model that happens to share the folder's name.
    """
    path = Path(source)
    if path.exists():
        return path
    named = bundled_models()
    if str(source) in named:
        return named[str(source)]
    stale_bundled = path.parent.name == "Models" and path.parent.parent.name == "Resources"
    if stale_bundled and path.name.removesuffix(".zip") in named:
        return named[path.name.removesuffix(".zip")]
    raise InputError(
        f"no model at {source!r}: give a model folder or .zip, or one of the bundled models "
        f"({', '.join(named) or 'none installed'}); `multitaskseg models` lists them"
    )


def read_model_card(source: str | os.PathLike) -> dict[str, Any]:
    """The metadata without loading weights (for listings and the Slicer model card)."""
    path = resolve_model_path(source)
    if path.is_file():
        with zipfile.ZipFile(path) as zipped:
            return json.loads(zipped.read(METADATA_FILE))
    return _read_metadata(path, f"model {path}")


class ModelCardCache:
    """The card of the model asked for last, read again only when another model is asked for.

    The Slicer module needs the card on every change of its parameters; reading ``model.json`` (or
    unpacking it from a ``.zip``) each time is wasted work, and a broken card would log its warning
    each time. :meth:`forget` makes the next call read again (a fine-tune rewrote the model in place).
    """

    def __init__(self) -> None:
        self._source: str | None = None
        self._card: dict[str, Any] = {}

    def card(self, source: str | os.PathLike) -> dict[str, Any]:
        """The model's card; {} when ``source`` is empty or the card cannot be read (logged)."""
        source = str(source)
        if source != self._source:
            self._card = self._read(source)
            self._source = source
        return self._card

    def forget(self) -> None:
        self._source = None

    @staticmethod
    def _read(source: str) -> dict[str, Any]:
        if not source:
            return {}
        try:
            return read_model_card(source)
        except Exception as error:  # any unreadable card: the module shows "no model" rather than failing
            logging.getLogger(__name__).warning("MultiTaskSeg: cannot read model %s: %s", source, error)
            return {}
