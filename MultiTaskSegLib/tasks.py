"""The task registry: what each segmentation task is, its classes, and how source labels map onto them.

A *task* (e.g. brain tissues in T1 MRI) has *classes*; a *model* covers one or more tasks over a
*label space* with one shared background (index 0) followed by every task's classes in order.

Tasks are declared in small TOML files, so users add a task without editing code: put a file in
one of the folders listed in the environment variable ``MULTITASKSEG_TASK_PATH`` (separated by
``os.pathsep``) or pass it explicitly to :func:`load_task_file`. The built-in tasks live in
``MultiTaskSegLib/task_definitions``.
"""

from __future__ import annotations

import os
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (Slicer 5.10's): the same parser, as a package
    import tomli as tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from .errors import InputError

BUILTIN_TASK_DIR = Path(__file__).parent / "task_definitions"
TASK_PATH_VARIABLE = "MULTITASKSEG_TASK_PATH"

#: The three tasks of Moeskops et al. 2017, in the paper's order.
PAPER_TASKS = ("brain_t1_mri", "breast_mri", "cardiac_cta")

MODALITIES = ("MR", "CT")
NORMALIZATIONS = ("ct_window", "mr_zscore", "mr_percentile", "none")


@dataclass(frozen=True)
class CodedEntry:
    """One code of a controlled vocabulary (DICOM style triplet: scheme, value, meaning)."""

    scheme: str
    value: str
    meaning: str

    @classmethod
    def from_list(cls, triplet: Sequence[str], where: str) -> "CodedEntry":
        if len(triplet) != 3 or not all(isinstance(part, str) for part in triplet):
            raise InputError(f"{where}: a code must be three strings [scheme, value, meaning], got {triplet!r}")
        return cls(*triplet)


@dataclass(frozen=True)
class Terminology:
    """Where a class sits in Slicer's terminology: category, type and optional anatomic region."""

    category: CodedEntry
    type: CodedEntry
    region: CodedEntry | None = None


@dataclass(frozen=True)
class ClassSpec:
    """One class of a task: its name, display colour (RGB in 0..1) and terminology."""

    name: str
    color: tuple[float, float, float]
    terminology: Terminology | None = None


@dataclass(frozen=True)
class UnsureRegion:
    """For a crop around one tumour: when no voxel's probability of the task's class reaches
    ``confident``, the crop still holds a tumour that the network sees only faintly, so the region of
    probability at least ``threshold`` around the most probable voxel is segmented instead of the
    few voxels above the operating point (see :mod:`~MultiTaskSegLib.postprocessing`)."""

    confident: float
    threshold: float


@dataclass(frozen=True)
class Task:
    """A segmentation task: one modality, one anatomy, one or more classes.

    ``label_values[i]`` holds the source label values that mean class ``i + 1``; everything else
    in a source label image is background. ``image_files``/``label_files``/``mask_files`` list the file
    names (first match wins) in each case folder of a data set, so real data keeps its own names.

    A task may read several co-registered images of a case (``channels``, e.g. contrast T1 and FLAIR
    for gliomas, where oedema shows on FLAIR): ``image_files`` name the first, ``channel_files[i]``
    the ``i + 2``-th; each channel is normalised on its own.
    """

    name: str
    title: str
    modality: str
    anatomy: str
    classes: tuple[ClassSpec, ...]
    label_values: tuple[frozenset[int], ...]
    normalization: str
    normalization_parameters: Mapping[str, float] = field(default_factory=dict)
    working_spacing_mm: float = 1.0
    image_files: tuple[str, ...] = ("image.nii.gz",)
    label_files: tuple[str, ...] = ("label.nii.gz",)
    mask_files: tuple[str, ...] = ()
    description: str = ""
    source: Path | None = field(default=None, compare=False)
    channels: tuple[str, ...] = ("image",)
    channel_files: tuple[tuple[str, ...], ...] = ()
    #: Whether a result whose class volumes fall outside the training range earns a warning; off
    #: where the structure's size varies too much between patients to tell (tumours).
    check_volumes: bool = True
    #: Whether only the largest connected region of the task's classes is kept (one lesion per scan;
    #: see :mod:`~MultiTaskSegLib.postprocessing`).
    largest_component: bool = False
    #: What to segment where the network is nowhere sure (one-tumour crops); None: the operating point alone.
    unsure_region: UnsureRegion | None = None

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.classes)

    def map_labels(self, source_labels: np.ndarray) -> np.ndarray:
        """Turn a source label array into task class indices (0 = background, i = class i)."""
        if not np.issubdtype(source_labels.dtype, np.integer):
            rounded = np.rint(source_labels)
            if not np.allclose(rounded, source_labels):
                raise InputError(
                    f"task {self.name}: the label image holds non-integer values; "
                    "give a label map (integer values), not an intensity image"
                )
            source_labels = rounded.astype(np.int64)
        lookup_values = np.array(sorted(v for values in self.label_values for v in values), dtype=np.int64)
        lookup_classes = np.array(
            [index + 1 for value in lookup_values for index, values in enumerate(self.label_values) if value in values],
            dtype=np.uint8,
        )
        result = np.zeros(source_labels.shape, dtype=np.uint8)
        if lookup_values.size == 0:
            return result
        positions = np.searchsorted(lookup_values, source_labels)
        positions = np.clip(positions, 0, lookup_values.size - 1)
        hits = lookup_values[positions] == source_labels
        result[hits] = lookup_classes[positions[hits]]
        return result


@dataclass(frozen=True)
class LabelEntry:
    """One index of a model's label space."""

    index: int
    task: str | None  # None for the shared background
    class_spec: ClassSpec


BACKGROUND = ClassSpec("Background", (0.0, 0.0, 0.0), None)


def working_spacing_problems(spacings: Mapping[str, float], task_names: Sequence[str]) -> list[str]:
    """Why the working grids ``spacings`` (task name -> mm) cannot be used for ``task_names``, or an empty
    list: one rule for a run's grid (``train --working-spacing``) and a test-time one."""
    problems = []
    for name, spacing in spacings.items():
        if name not in task_names:
            problems.append(f"a working spacing is given for {name}, which is not among the tasks ({', '.join(task_names)})")
        elif not (isinstance(spacing, (int, float)) and 0.1 <= spacing <= 10.0):
            problems.append(f"the working spacing of {name} must be 0.1-10 mm, got {spacing!r}")
    return problems


def parse_working_spacings(pairs: Sequence[str]) -> dict[str, float]:
    """``--working-spacing sarcoma_ct=1.0`` (the CLI's and bundle_model.py's) -> {"sarcoma_ct": 1.0}."""
    result = {}
    for pair in pairs:
        task, _, value = pair.partition("=")
        try:
            result[task.strip()] = float(value)
        except ValueError:
            raise InputError(f"--working-spacing takes TASK=MM, got {pair!r}") from None
    return result


@dataclass(frozen=True)
class LabelSpace:
    """The shared background plus the union of the tasks' classes, in task order."""

    tasks: tuple[Task, ...]

    def __post_init__(self) -> None:
        names = [task.name for task in self.tasks]
        if not names:
            raise InputError("a label space needs at least one task")
        if len(set(names)) != len(names):
            raise InputError(f"a task is listed twice: {names}")

    @classmethod
    def from_names(cls, names: Iterable[str]) -> "LabelSpace":
        return cls(tuple(get_task(name) for name in names))

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(task.name for task in self.tasks)

    @property
    def entries(self) -> tuple[LabelEntry, ...]:
        entries = [LabelEntry(0, None, BACKGROUND)]
        for task in self.tasks:
            for spec in task.classes:
                entries.append(LabelEntry(len(entries), task.name, spec))
        return tuple(entries)

    def __len__(self) -> int:
        return 1 + sum(len(task.classes) for task in self.tasks)

    def with_working_spacing(self, spacings: Mapping[str, float]) -> "LabelSpace":
        """The same tasks on other working grids (task name -> mm): a run's own (``train
        --working-spacing``), or a finer grid at test time, where a network trained with scale
        augmentation sees small structures larger (``evaluate_tumour.py --working-spacing``)."""
        problems = working_spacing_problems(spacings, self.task_names)
        if problems:
            raise InputError("; ".join(problems))
        return LabelSpace(tuple(replace(task, working_spacing_mm=float(spacings[task.name])) if task.name in spacings
                                else task for task in self.tasks))

    def task(self, name: str) -> Task:
        for task in self.tasks:
            if task.name == name:
                return task
        raise InputError(f"task {name!r} is not in this model; it covers {', '.join(self.task_names)}")

    def offset(self, task_name: str) -> int:
        """Label-space index of the task's first class minus one."""
        offset = 0
        for task in self.tasks:
            if task.name == task_name:
                return offset
            offset += len(task.classes)
        raise InputError(f"task {task_name!r} is not in this model; it covers {', '.join(self.task_names)}")

    def indices_for_task(self, task_name: str) -> tuple[int, ...]:
        """Label-space indices of the task's classes (background excluded)."""
        first = self.offset(task_name) + 1
        return tuple(range(first, first + len(self.task(task_name).classes)))

    def to_model_labels(self, task_name: str, task_labels: np.ndarray) -> np.ndarray:
        """Shift task class indices (0 = background) into this label space."""
        offset = self.offset(task_name)
        model_labels = task_labels.astype(np.int16)
        model_labels[task_labels > 0] += offset
        return model_labels

    def to_json(self) -> list[dict]:
        return [task_to_dict(task) for task in self.tasks]

    @classmethod
    def from_json(cls, tasks: list[dict]) -> "LabelSpace":
        return cls(tuple(task_from_dict(entry, where="model file") for entry in tasks))


# ---------------------------------------------------------------------------------------------
# Declarative task files


#: Source label values are at most this (FreeSurfer's largest is 14175); a larger range would only eat memory.
MAX_LABEL_VALUE = 65535


def _parse_label_values(values: Sequence[int | str], where: str) -> frozenset[int]:
    """Accept integers and inclusive ranges written as "1000-1035"."""
    parsed: set[int] = set()
    for value in values:
        if isinstance(value, bool):
            raise InputError(f"{where}: label value {value!r} is not an integer or a range 'A-B'")
        if isinstance(value, int):
            if not 0 <= value <= MAX_LABEL_VALUE:
                raise InputError(f"{where}: label value {value} must lie within 0..{MAX_LABEL_VALUE}")
            parsed.add(value)
            continue
        if isinstance(value, str) and value.count("-") == 1:
            low_text, high_text = value.split("-")
            try:
                low, high = int(low_text), int(high_text)
            except ValueError:
                raise InputError(f"{where}: label range {value!r} must look like '1000-1035'") from None
            if high < low:
                raise InputError(f"{where}: label range {value!r} ends before it starts")
            if low < 0 or high > MAX_LABEL_VALUE:
                raise InputError(f"{where}: label range {value!r} must lie within 0..{MAX_LABEL_VALUE}")
            parsed.update(range(low, high + 1))
            continue
        raise InputError(f"{where}: label value {value!r} is not an integer or a range 'A-B'")
    return frozenset(parsed)


def _names(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(str(v) for v in value)


def task_from_dict(data: Mapping, where: str, source: Path | None = None) -> Task:
    """Build a task from the TOML/JSON structure documented in ``task_definitions/README.md``."""
    try:
        name = str(data["name"])
        modality = str(data["modality"]).upper()
        raw_classes = data["classes"]
    except KeyError as missing:
        raise InputError(f"{where}: missing required key {missing}") from None
    if modality not in MODALITIES:
        raise InputError(f"{where}: modality must be one of {MODALITIES}, got {modality!r}")
    if not raw_classes:
        raise InputError(f"{where}: a task needs at least one class")
    normalization = data.get("normalization", {})
    scheme = str(normalization.get("scheme", "ct_window" if modality == "CT" else "mr_zscore"))
    if scheme not in NORMALIZATIONS:
        raise InputError(f"{where}: normalization scheme must be one of {NORMALIZATIONS}, got {scheme!r}")
    classes, label_values = [], []
    for position, raw in enumerate(raw_classes):
        class_where = f"{where}, class {position + 1}"
        try:
            color = tuple(float(c) for c in raw["color"])
            values = raw["labels"]
            class_name = str(raw["name"])
        except KeyError as missing:
            raise InputError(f"{class_where}: missing required key {missing}") from None
        if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
            raise InputError(f"{class_where}: color must be three numbers in 0..1, got {raw['color']!r}")
        terminology = None
        if "category" in raw and "type" in raw:
            terminology = Terminology(
                CodedEntry.from_list(raw["category"], class_where),
                CodedEntry.from_list(raw["type"], class_where),
                CodedEntry.from_list(raw["region"], class_where) if "region" in raw else None,
            )
        classes.append(ClassSpec(class_name, color, terminology))  # type: ignore[arg-type]
        label_values.append(_parse_label_values(values, class_where))
    for i, first in enumerate(label_values):
        for j in range(i + 1, len(label_values)):
            overlap = first & label_values[j]
            if overlap:
                raise InputError(
                    f"{where}: label values {sorted(overlap)[:5]} are given to both "
                    f"{classes[i].name!r} and {classes[j].name!r}"
                )
    files = data.get("files", {})
    channels = tuple(str(channel) for channel in data.get("channels", ["image"]))
    extra_files = files.get("channels", {})
    if not channels or len(set(channels)) != len(channels):
        raise InputError(f"{where}: channels must be distinct names, got {list(channels)}")
    missing_files = [channel for channel in channels[1:] if channel not in extra_files]
    if missing_files:
        raise InputError(f"{where}: give the file names of channel(s) {', '.join(missing_files)} "
                         "under [files.channels] (the first channel's are [files] image)")
    return Task(
        name=name,
        title=str(data.get("title", name)),
        modality=modality,
        anatomy=str(data.get("anatomy", "")),
        classes=tuple(classes),
        label_values=tuple(label_values),
        normalization=scheme,
        normalization_parameters={k: v for k, v in normalization.items() if k != "scheme"},
        working_spacing_mm=float(data.get("working_spacing_mm", 1.0)),
        image_files=_names(files.get("image", "image.nii.gz")),
        label_files=_names(files.get("label", "label.nii.gz")),
        mask_files=_names(files.get("mask", [])),
        description=str(data.get("description", "")),
        source=source,
        channels=channels,
        channel_files=tuple(_names(extra_files[channel]) for channel in channels[1:]),
        check_volumes=bool(data.get("check_volumes", True)),
        largest_component=bool(data.get("largest_component", False)),
        unsure_region=_parse_unsure_region(data, len(classes), where),
    )


def _parse_unsure_region(data: Mapping, class_count: int, where: str) -> UnsureRegion | None:
    """The ``[unsure_region]`` table, checked: it makes sense for one tumour of one class only."""
    raw = data.get("unsure_region")
    if raw is None:
        return None
    where = f"{where}, [unsure_region]"
    try:
        confident, threshold = float(raw["confident"]), float(raw["threshold"])
    except KeyError as missing:
        raise InputError(f"{where}: missing required key {missing}") from None
    except (TypeError, ValueError):
        raise InputError(f"{where}: confident and threshold must be numbers, got {dict(raw)!r}") from None
    if not (0.0 < threshold < 1.0 and 0.0 < confident < 1.0):
        raise InputError(f"{where}: confident and threshold must be between 0 and 1, got {confident} and {threshold}")
    if threshold >= confident:
        raise InputError(f"{where}: threshold must be below confident, got {threshold} and {confident}")
    if class_count != 1:
        raise InputError(f"{where}: a task with an unsure region must have one class (one tumour), it has {class_count}")
    if not data.get("largest_component", False):
        raise InputError(f"{where}: the rule segments one region, so the task needs largest_component = true")
    return UnsureRegion(confident, threshold)


def _entry_to_list(entry: CodedEntry) -> list[str]:
    return [entry.scheme, entry.value, entry.meaning]


def task_to_dict(task: Task) -> dict:
    """The inverse of :func:`task_from_dict`; model files store their tasks this way."""
    classes = []
    for spec, values in zip(task.classes, task.label_values):
        entry: dict = {"name": spec.name, "color": list(spec.color), "labels": sorted(values)}
        if spec.terminology:
            entry["category"] = _entry_to_list(spec.terminology.category)
            entry["type"] = _entry_to_list(spec.terminology.type)
            if spec.terminology.region:
                entry["region"] = _entry_to_list(spec.terminology.region)
        classes.append(entry)
    files = {"image": list(task.image_files), "label": list(task.label_files), "mask": list(task.mask_files)}
    extra: dict = {} if task.check_volumes else {"check_volumes": False}
    if task.largest_component:
        extra["largest_component"] = True
    if task.unsure_region is not None:
        extra["unsure_region"] = {"confident": task.unsure_region.confident, "threshold": task.unsure_region.threshold}
    if len(task.channels) > 1:
        files["channels"] = {channel: list(names) for channel, names in zip(task.channels[1:], task.channel_files)}
        extra["channels"] = list(task.channels)
    return {
        **extra,
        "name": task.name,
        "title": task.title,
        "modality": task.modality,
        "anatomy": task.anatomy,
        "description": task.description,
        "working_spacing_mm": task.working_spacing_mm,
        "normalization": {"scheme": task.normalization, **task.normalization_parameters},
        "files": files,
        "classes": classes,
    }


def load_task_file(path: str | os.PathLike) -> Task:
    """Read one task from a TOML file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"task file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"task file {path} is not valid TOML: {error}") from None
    return task_from_dict(data, where=f"task file {path}", source=path)


# ---------------------------------------------------------------------------------------------
# Registry

_REGISTRY: dict[str, Task] = {}


def _task_folders() -> list[Path]:
    folders = [BUILTIN_TASK_DIR]
    for entry in os.environ.get(TASK_PATH_VARIABLE, "").split(os.pathsep):
        if entry:
            folders.append(Path(entry))
    return folders


def register_task(task: Task, replace: bool = False) -> Task:
    """Add a task to the registry; a different task under a taken name is refused unless ``replace``."""
    existing = _REGISTRY.get(task.name)
    if existing is not None and existing != task and not replace:
        raise InputError(
            f"a task named {task.name!r} is already registered (from {existing.source}); "
            f"rename the task in {task.source} or remove one of them"
        )
    _REGISTRY[task.name] = task
    return task


def reload_registry() -> None:
    """Read the built-in task files and those in ``$MULTITASKSEG_TASK_PATH`` again."""
    _REGISTRY.clear()
    for folder in _task_folders():
        if not folder.is_dir():
            raise InputError(f"{TASK_PATH_VARIABLE} names {folder}, which is not a folder")
        for path in sorted(folder.glob("*.toml")):
            register_task(load_task_file(path))


def _ensure_loaded() -> None:
    if not _REGISTRY:
        reload_registry()


def get_task(name: str) -> Task:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_REGISTRY))}") from None


def list_tasks() -> list[Task]:
    _ensure_loaded()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]
