"""Finding cases on disk and preparing them on a model's working grid.

A data folder for one task holds one sub-folder per case with an image and a label file, named as
the task declares (``image.nii.gz`` + ``label.nii.gz`` for phantoms, the source's own names for real
data). A data root holds one such folder per task: ``ROOT/TASK/CASE/...``, which is what
``multitaskseg phantoms`` writes. Architectures that synthesise images from labels (SynthSeg) also
take case folders that hold a label map only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import resample_onto, same_geometry, working_grid
from .preprocessing import check_working_grid_size, prepare_image
from .imageio import read_image
from .sampling import PreparedCase
from .tasks import LabelSpace, Task, get_task


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case: image, and label/mask when known."""

    task: str
    name: str
    image: Path | None  # None: a label map only, whose images are synthesised in training
    label: Path | None = None
    mask: Path | None = None
    channel_images: tuple[Path, ...] = ()  # the second and further channels of a multi-channel task


def _first_match(folder: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        matches = sorted(folder.glob(name))
        if matches:
            return matches[0]
    return None


def find_cases(task: Task, folder: str | Path, require_labels: bool = True,
               label_maps_only: bool = False) -> list[CaseFiles]:
    """Cases of ``task`` under ``folder`` (a folder of case folders, or one case folder).

    With ``label_maps_only`` a case folder holding a label file and no image is a case too.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"data folder {folder} for task {task.name} does not exist")
    is_case = _first_match(folder, task.image_files) or (label_maps_only and _first_match(folder, task.label_files))
    candidates = [folder] if is_case else sorted(p for p in folder.iterdir() if p.is_dir())
    cases = []
    for case_folder in candidates:
        image = _first_match(case_folder, task.image_files)
        if image is None:
            label = _first_match(case_folder, task.label_files) if label_maps_only else None
            if label is not None:
                cases.append(CaseFiles(task.name, case_folder.name, None, label))
            continue
        label = _first_match(case_folder, task.label_files)
        if label is None and require_labels:
            raise InputError(
                f"case {case_folder} has an image but no label file (looked for {', '.join(task.label_files)})"
            )
        extra = []
        for channel, names in zip(task.channels[1:], task.channel_files):
            found = _first_match(case_folder, names)
            if found is None:
                raise InputError(f"case {case_folder} has no {channel} image (looked for {', '.join(names)}); "
                                 f"task {task.name} reads {', '.join(task.channels)}")
            extra.append(found)
        cases.append(CaseFiles(task.name, case_folder.name, image, label, _first_match(case_folder, task.mask_files),
                               tuple(extra)))
    if not cases:
        raise InputError(
            f"no cases of task {task.name} in {folder}: expected case folders holding one of "
            f"{', '.join(task.image_files)}"
        )
    return cases


def task_folder_pair(argument: str) -> tuple[str, str] | None:
    """``TASK=FOLDER`` -> (TASK, FOLDER); None for a ROOT, which may hold '=' itself ('runs/lr=0.1/cases')."""
    if "=" not in argument or Path(argument).is_dir():
        return None
    name, folder = argument.split("=", 1)
    return name, folder


def parse_data_arguments(arguments: Iterable[str], task_names: Sequence[str]) -> dict[str, Path]:
    """``TASK=FOLDER`` pairs, or one ROOT holding a folder per task (``ROOT/TASK``)."""
    folders: dict[str, Path] = {}
    for argument in arguments:
        pair = task_folder_pair(argument)
        if pair:
            name, folder = pair
            if name not in task_names:  # a task asked for may be a model's own, which no file registers
                get_task(name)
            folders[name] = Path(folder)
        else:
            root = Path(argument)
            for name in task_names:
                if (root / name).is_dir():
                    folders.setdefault(name, root / name)
    missing = [name for name in task_names if name not in folders]
    if missing:
        raise InputError(
            f"no data for task(s) {', '.join(missing)}: give TASK=FOLDER or a root folder holding a folder per task"
        )
    return {name: folders[name] for name in task_names}


def split_cases(cases: Sequence[CaseFiles], validation_fraction: float, seed: int) -> tuple[list, list]:
    """A deterministic train/validation split per task; at least one training case per task."""
    train, validation = [], []
    for task in sorted({case.task for case in cases}):
        of_task = sorted((c for c in cases if c.task == task), key=lambda c: c.name)
        order = np.random.default_rng([seed, len(of_task)]).permutation(len(of_task))
        count = int(round(len(of_task) * validation_fraction))
        count = min(max(count, 1 if validation_fraction > 0 and len(of_task) > 1 else 0), len(of_task) - 1)
        validation += [of_task[i] for i in order[:count]]
        train += [of_task[i] for i in order[count:]]
    return train, validation


def read_label(path, image: sitk.Image, image_path) -> sitk.Image:
    """A case's label map, refused unless it lies on its image's grid: training and evaluation read
    label values voxel by voxel against the image, so a label on another grid would be misplaced."""
    labels = read_image(path, check_values=False)
    if not same_geometry(labels, image, tolerance=1e-3):
        raise InputError(
            f"label {path} (size {labels.GetSize()}, spacing {labels.GetSpacing()}) is not "
            f"on the grid of image {image_path} (size {image.GetSize()}, spacing {image.GetSpacing()}); "
            "resample the label onto the image first"
        )
    labels.CopyInformation(image)  # drop header rounding below the tolerance
    return labels


def prepare_case(files: CaseFiles, label_space: LabelSpace, spacing_mm: float | None = None) -> PreparedCase:
    """Read, check, normalise and resample one labelled case into the model's label space."""
    task = label_space.task(files.task)
    spacing = spacing_mm or task.working_spacing_mm
    if files.image is None:
        return prepare_label_map(files, label_space, spacing)
    image = read_image(files.image)
    channels = [image, *(read_image(path) for path in files.channel_images)]
    mask = read_image(files.mask, check_values=False) if files.mask else None
    if mask is not None:
        mask = sitk.Cast(mask, sitk.sitkUInt8)
    working, foreground, grid = prepare_image(channels, task, spacing, mask)
    labels = np.zeros(foreground.shape, dtype=np.int16)
    if files.label is not None:
        source_labels = read_label(files.label, image, files.image)
        source_values = sitk.GetArrayViewFromImage(source_labels)
        mapped = task.map_labels(source_values)
        if not mapped.any() and source_values.any():
            found = np.unique(source_values)[:8]
            raise InputError(
                f"label {files.label} holds the values {', '.join(map(str, found))} but none of them is a class of task "
                f"{task.name} (it expects {task_label_summary(task)}); relabel the file or declare the values in the task"
            )
        task_labels = sitk.GetImageFromArray(mapped)
        task_labels.CopyInformation(image)
        resampled = sitk.GetArrayFromImage(resample_onto(task_labels, grid, is_label=True))
        labels = label_space.to_model_labels(task.name, resampled)
    return PreparedCase(task=task.name, name=files.name, image=working, labels=labels, foreground=foreground,
                        extra={"grid": grid, "files": files})



def task_label_summary(task: Task) -> str:
    """The source label values each class of ``task`` reads, for messages."""
    parts = []
    for name, values in zip(task.class_names, task.label_values):
        shown = sorted(values)[:4]
        parts.append(f"{name}: {', '.join(map(str, shown))}{'…' if len(values) > 4 else ''}")
    return "; ".join(parts)


def prepare_label_map(files: CaseFiles, label_space: LabelSpace, spacing_mm: float) -> PreparedCase:
    """A case with a label map only: its source label values on the working grid (``extra``), for
    images synthesised at every training step, and the model's labels. ``image`` is None."""
    task = label_space.task(files.task)
    source_labels = read_image(files.label, check_values=False)
    check_working_grid_size(source_labels, spacing_mm)
    grid = working_grid(source_labels, spacing_mm)
    source = sitk.GetArrayFromImage(resample_onto(sitk.Cast(source_labels, sitk.sitkInt32), grid, is_label=True))
    if source.max() > np.iinfo(np.int16).max or source.min() < 0:
        raise InputError(f"label map {files.label} holds values outside 0..32767; give FreeSurfer-style label values")
    labels = label_space.to_model_labels(task.name, task.map_labels(source))
    return PreparedCase(task=task.name, name=files.name, image=None, labels=labels, foreground=source > 0,
                        extra={"grid": grid, "files": files, "source_labels": source.astype(np.int16)})
