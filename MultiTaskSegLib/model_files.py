"""Model files: one folder (or .zip of it) with the weights and everything needed to use them.

``model.json`` holds the architecture and its arguments, the label space with its tasks (names,
colours, terminology, preprocessing), the model card, the training provenance, a format version
and the SHA-256 of the weights; ``weights.safetensors`` holds the tensors. Loading never executes
code from the file (safetensors, not pickle) and refuses weights whose checksum does not match.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .architectures import architecture_class
from .architectures.base import Architecture, ProgressCallback
from .errors import InputError, ModelFileError
from .tasks import LabelSpace

from .model_catalog import (  # noqa: F401  (the catalogue is part of this module's interface)
    FORMAT_VERSION,
    METADATA_FILE,
    WEIGHTS_FILE,
    _read_metadata,
    bundled_models,
    model_folders,
    read_model_card,
    resolve_model_path,
)


@dataclass
class SegmentationModel:
    """A network with its label space, preprocessing and card; what ``segment`` and Slicer use."""

    name: str
    architecture: Architecture
    label_space: LabelSpace
    version: str = "0.1.0"
    card: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""
    path: Path | None = None

    @classmethod
    def create(cls, name: str, architecture_name: str, label_space: LabelSpace, **arguments: Any) -> "SegmentationModel":
        build = architecture_class(architecture_name)
        try:
            architecture = build(len(label_space), label_space.task_names, **arguments)
        except (TypeError, ValueError, OverflowError) as error:  # a value of the wrong kind, e.g. --arg patch_size=7
            raise InputError(
                f"architecture {architecture_name}: bad argument ({error}); give values as JSON "
                "(--arg patch_size=[128,128] --arg learning_rate=0.001), names as in the architecture's docstring"
            ) from None
        return cls(name=name, architecture=architecture, label_space=label_space)

    def spacing_mm(self, task_name: str) -> float:
        """The working spacing for a task (stored with the task in the label space)."""
        return self.label_space.task(task_name).working_spacing_mm

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "architecture": {"name": self.architecture.name, "arguments": self.architecture.arguments},
            "tasks": self.label_space.to_json(),
            "card": self.card,
            "provenance": self.provenance,
            "weights_sha256": self.weights_sha256,
            "library_version": __version__,
        }


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model(model: SegmentationModel, destination: str | os.PathLike) -> Path:
    """Write the model folder (or ``.zip``) atomically; returns its path."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        state = {key: value.detach().cpu().contiguous().clone() for key, value in model.architecture.network.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_FILE))
        model.weights_sha256 = sha256_of(staging / WEIGHTS_FILE)
        (staging / METADATA_FILE).write_text(json.dumps(model.metadata(), indent=2), encoding="utf-8")
        _usual_permissions(staging)
        if destination.suffix == ".zip":
            archive = staging.with_suffix(".zip")
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
                for name in (METADATA_FILE, WEIGHTS_FILE):
                    zipped.write(staging / name, name)
            os.replace(archive, destination)
            shutil.rmtree(staging)
        else:
            if destination.exists():
                old = destination.with_name(f".{destination.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(destination, old)
                os.replace(staging, destination)
                shutil.rmtree(old)
            else:
                os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    model.path = destination
    return destination


def _stored_shapes(weights: Path, where: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors header, without reading the tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as stored:
            return {name: tuple(stored.get_slice(name).get_shape()) for name in stored.keys()}
    except Exception as error:  # safetensors raises its own error type for a file that is not one
        raise ModelFileError(f"{where}: the weights do not fit the architecture: {WEIGHTS_FILE} is not a "
                             f"safetensors file ({error})") from None


@contextlib.contextmanager
def _module_budget(limit: int, where: str):
    """Stop building a network once it registers more than ``limit`` sub-modules."""
    count = 0

    def hook(module, name, submodule):
        nonlocal count
        count += 1
        if count > limit:
            raise ModelFileError(f"{where}: the architecture in {METADATA_FILE} is far larger than the stored "
                                 "weights; the file was edited or damaged: copy the model again")

    handle = torch.nn.modules.module.register_module_module_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _check_weights_fit(probe: Architecture, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """The tensors the architecture of ``model.json`` builds must be those stored in the weights file."""
    built = {name: tuple(tensor.shape) for name, tensor in probe.network.state_dict().items()}
    if built != shapes:
        differing = sorted(set(built) ^ set(shapes)) or sorted(n for n in built if built[n] != shapes[n])
        raise ModelFileError(
            f"{where}: the architecture in {METADATA_FILE} does not match the stored weights ({', '.join(differing[:3])}…); "
            "the file was edited or damaged: copy the model again"
        )


def _usual_permissions(folder: Path) -> None:
    """mkdtemp and safetensors make private files; a model is shared like any other file (umask applies),
    so others on a cluster can read it."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for entry in folder.iterdir():
        entry.chmod(0o666 & ~mask)


#: The most a model archive's members may unpack to (a zip bomb stops here, before extraction).
ARCHIVE_MEMBER_LIMITS = {METADATA_FILE: 16 * 2**20, WEIGHTS_FILE: 4 * 2**30}


def load_model(source: str | os.PathLike, device: str | torch.device = "cpu") -> SegmentationModel:
    """Load a model folder, ``.zip`` archive, or the name of a bundled model."""
    path = resolve_model_path(source)
    where = f"model {path}"
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise ModelFileError(f"{where} is neither a model folder nor a .zip model archive")
        with tempfile.TemporaryDirectory() as unpacked, zipfile.ZipFile(path) as zipped:
            for name in (METADATA_FILE, WEIGHTS_FILE):
                if name not in zipped.namelist():
                    raise ModelFileError(f"{where} is not a model archive: it has no {name}")
                size = zipped.getinfo(name).file_size  # zipfile never extracts more than this
                if size > ARCHIVE_MEMBER_LIMITS[name]:
                    raise ModelFileError(f"{where}: its {name} would unpack to {size / 2**20:.0f} MiB, more than a model "
                                         f"holds ({ARCHIVE_MEMBER_LIMITS[name] / 2**20:.0f} MiB); the archive is damaged or not a model")
                zipped.extract(name, unpacked)
            return _load_folder(Path(unpacked), where, path, device)
    return _load_folder(path, where, path, device)


def as_model(source: "str | os.PathLike | SegmentationModel", progress: ProgressCallback | None = None) -> SegmentationModel:
    """``source`` itself when it is a loaded model, else the model it names (folder, ``.zip`` or bundled
    name), loaded after ``progress(0.0, "loading the model")``. Every "model or path" argument goes through here."""
    if isinstance(source, SegmentationModel):
        return source
    if not source:  # Path("") is the current folder: say what is missing instead of "no model.json in ."
        raise InputError("no model given: pass a bundled model name, a model folder or a .zip file")
    if progress is not None:
        progress(0.0, "loading the model")
    return load_model(source)


def _load_folder(folder: Path, where: str, origin: Path, device: str | torch.device) -> SegmentationModel:
    metadata = _read_metadata(folder, where)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelFileError(f"{where} has no {WEIGHTS_FILE}")
    expected = metadata.get("weights_sha256", "")
    actual = sha256_of(weights)
    if actual != expected:
        raise ModelFileError(
            f"{where}: the weights' SHA-256 is {actual[:16]}… but the model card says {str(expected)[:16]}…; "
            "the file is corrupt or was modified — download or copy the model again"
        )
    try:
        label_space = LabelSpace.from_json(metadata["tasks"])
        arch = metadata["architecture"]
        build = architecture_class(arch["name"])
        shapes = _stored_shapes(weights, where)
        # Sizes only, and a bounded number of modules: arguments edited to channels=1e6 or layers=1e7
        # must neither allocate memory nor build modules for minutes before the mismatch shows.
        with torch.device("meta"), _module_budget(4 * len(shapes) + 64, where):
            probe = build(len(label_space), label_space.task_names, **arch["arguments"])
        _check_weights_fit(probe, shapes, where)
        architecture = build(len(label_space), label_space.task_names, **arch["arguments"])
    except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as error:
        if isinstance(error, ModelFileError):
            raise
        raise ModelFileError(f"{where}: {METADATA_FILE} is incomplete or inconsistent ({error})") from None
    try:
        state = load_file(str(weights), device="cpu")
        architecture.network.load_state_dict(state)
    except Exception as error:  # safetensors and torch raise several types for a bad tensor file
        raise ModelFileError(f"{where}: the weights do not fit the architecture ({error})") from None
    architecture.network.to(device)
    return SegmentationModel(
        name=metadata["name"],
        architecture=architecture,
        label_space=label_space,
        version=metadata.get("version", "0"),
        card=metadata.get("card", {}),
        provenance=metadata.get("provenance", {}),
        weights_sha256=actual,
        path=origin,
    )
