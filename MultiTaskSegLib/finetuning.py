"""Learning from hand corrections: fine-tune a model on the user's corrected cases, locally.

A corrected case is stored like any training case (``FOLDER/TASK/CASE/image.nii.gz`` and
``label.nii.gz`` holding the task's source label values), so ``finetune`` reads the folders that
``train`` reads. The fine-tune starts from the parent's weights, label space and architecture, and
guards what the parent knew:

- a learning rate a tenth of the parent's, annealed to zero over a short run (200 steps by default:
  a few minutes on a 2-core CPU);
- with two or more cases, one is held back and the weights kept are those with the best mean Dice
  on it, the parent's own (step 0) included: a fine-tune that does not help returns the parent;
- a case whose labels are mostly values outside the task's classes is refused (a label map in another
  label space would teach the model the wrong classes).

The new model names its parent (name, version, weights SHA-256) and the cases used in its
provenance and card; the parent is never changed.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .datasets import find_cases
from .errors import InputError
from .imageio import read_image, write_image
from .model_catalog import read_model_card
from .model_files import SegmentationModel, as_model
from .tasks import Task
from .training import CHECKPOINT_DIR, TrainingConfig, train, trained_cases

DEFAULT_STEPS = 200
DEFAULT_BATCH_SIZE = 8


def check_case_labels(task: Task, label_path: Path) -> None:
    """Refuse a label file that is mostly values outside the task's classes: a label map in another
    label space would teach the model the wrong classes. A few other values are background, as in
    training (a FreeSurfer aseg's CSF and vessels for the brain tissues)."""
    values, counts = np.unique(sitk.GetArrayFromImage(read_image(label_path, check_values=False)), return_counts=True)
    known = set().union(*task.label_values)
    inside = {int(v): int(c) for v, c in zip(values, counts) if v != 0 and int(v) in known}
    outside = {int(v): int(c) for v, c in zip(values, counts) if v != 0 and int(v) not in known}
    if sum(outside.values()) > sum(inside.values()):
        raise InputError(
            f"label {label_path} holds values {sorted(outside)[:8]} that are no class of task {task.name} "
            f"({', '.join(task.class_names)}) in {sum(outside.values())} voxels, more than the task's classes "
            f"({sum(inside.values())}); store corrections in the model's label space (the module's "
            "'Add to training cases' does), or relabel the file"
        )


def finetune_config(parent: SegmentationModel, data: Mapping[str, str | os.PathLike], steps: int = DEFAULT_STEPS,
                    learning_rate: float | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                    validate_every: int | None = None, seed: int = 0, device: str = "auto",
                    name: str | None = None) -> TrainingConfig:
    """The training settings of a fine-tune of ``parent`` on the cases under ``data`` (task -> folder)."""
    if parent.path is None:
        raise InputError("save the parent model to a folder or .zip before fine-tuning it (its provenance names the file)")
    unknown = [task for task in data if task not in parent.label_space.task_names]
    if unknown:
        raise InputError(f"model {parent.name} does not segment task(s) {', '.join(unknown)}; "
                         f"it segments {', '.join(parent.label_space.task_names)}")
    count = 0
    for task_name, folder in data.items():  # the parent's own task: a model may carry a task no file registers
        task = parent.label_space.task(task_name)
        for case in find_cases(task, folder):
            check_case_labels(task, case.label)
            count += 1
    parent_rate = float(parent.architecture.arguments.get("learning_rate") or 1e-3)
    return TrainingConfig(
        tasks=list(data), architecture=parent.architecture.name, arguments=dict(parent.architecture.arguments),
        batch_size=batch_size, steps=steps, learning_rate=learning_rate or parent_rate / 10,
        validate_every=validate_every or max(1, steps // 4), validation_fraction=1.0 / count if count > 1 else 0.0,
        seed=seed, device=device, model_name=name or f"{parent.name}-finetuned",
        data={task: str(folder) for task, folder in data.items()},
        parent={"source": str(parent.path), "name": parent.name, "version": parent.version,
                "weights_sha256": parent.weights_sha256},
    )


def finetune(parent: str | os.PathLike | SegmentationModel, data: Mapping[str, str | os.PathLike],
             out: str | os.PathLike, **options) -> SegmentationModel:
    """Fine-tune ``parent`` (a model or anything ``load_model`` takes) on ``data``; the model is
    written to ``out/model`` (resumable, like ``train``). ``options``: see :func:`finetune_config`."""
    model = as_model(parent)
    return train(finetune_config(model, data, **options), out)


def finetune_run_folder(cases: str | os.PathLike, parent: SegmentationModel) -> Path:
    """The Slicer module's run folder for a fine-tune of ``parent`` on the stored cases
    (``cases/TASK/CASE``): ``cases/finetunes/NAME-finetuned``, numbered (``-2``, ``-3``...) past the
    folders whose run cannot go on. A run interrupted on the cases stored now resumes; a finished
    model is never replaced, and a run interrupted on other cases is left as it is: a fine-tune started
    after more cases were stored trains afresh on all of them."""
    stored = sorted(f"{task.name}/{case.name}" for task in parent.label_space.tasks if (Path(cases) / task.name).is_dir()
                    for case in find_cases(task, Path(cases) / task.name))
    first = Path(cases) / "finetunes" / f"{parent.name}-finetuned"
    folder, number = first, 1
    while not _resumable_on(folder, stored):
        number += 1
        folder = first.with_name(f"{first.name}-{number}")
    return folder


def _resumable_on(folder: Path, cases: list[str]) -> bool:
    """Whether a fine-tune on ``cases`` can run in ``folder``: a new or empty one, or an interrupted run
    whose checkpoint was trained on the same cases."""
    if not folder.exists() or not any(folder.iterdir()):
        return True
    checkpoint = folder / CHECKPOINT_DIR / "model"
    if (folder / "model").exists() or not checkpoint.is_dir():
        return False
    return trained_cases(read_model_card(checkpoint).get("provenance", {})) == cases


def start_finetune(parent: str | os.PathLike, cases: str | os.PathLike, out: str | os.PathLike,
                   steps: int = DEFAULT_STEPS, device: str = "auto", python: str | os.PathLike | None = None,
                   environment: dict[str, str] | None = None, name: str | None = None):
    """``multitaskseg finetune`` of ``parent`` on the stored cases (``cases/TASK/CASE``) in a child
    process (the Slicer module's Fine-tune button): poll it, cancel it; its result is ``out/model``,
    a model called ``name`` (default: the parent's name + ``-finetuned``)."""
    from .background import CommandJob

    arguments = ["finetune", "--model", str(parent), "--data", str(cases), "--out", str(out),
                 "--steps", str(int(steps)), "--device", device, *(["--name", name] if name else [])]
    return CommandJob(arguments, result=Path(out) / "model", python=python, environment=environment)


def stored_label_values(task: Task) -> np.ndarray:
    """What a stored case holds for each class index of ``task``: 0 for background, then each class's
    smallest source label value, which reading the case back maps to that class again. A class that
    counts 0 as its own, or has no value, cannot be told from background once stored: refused."""
    unstorable = [spec.name for spec, values in zip(task.classes, task.label_values) if not values or 0 in values]
    if unstorable:
        raise InputError(
            f"class {', '.join(repr(name) for name in unstorable)} of task {task.name} has no label value or counts 0, "
            "the background of every label map, as its own, so its corrections cannot be stored apart from background; "
            "give the class non-zero values only under 'labels' in the task's definition (its task file, or 'tasks' in "
            "the model's model.json)"
        )
    return np.array([0] + [min(values) for values in task.label_values], dtype=np.int32)


def case_labels(task: Task, images: Sequence[sitk.Image], classes: np.ndarray) -> sitk.Image:
    """The label image of a corrected case of ``task``: ``classes`` (the task's class indices, 0
    background, 1..K, on the first image's grid) as the task's source values. Refuses labels that
    cannot be stored, so that a caller storing several cases can check them all (with
    :func:`stored_file_names`) before writing one."""
    if len(images) != len(task.channels):
        raise InputError(f"task {task.name} reads {len(task.channels)} image(s) ({', '.join(task.channels)}), got {len(images)}")
    if classes.shape != sitk.GetArrayViewFromImage(images[0]).shape:
        raise InputError(f"the labels ({classes.shape}) are not on the image's grid ({images[0].GetSize()[::-1]})")
    if int(classes.max(initial=0)) > len(task.classes) or int(classes.min(initial=0)) < 0:
        raise InputError(f"class indices must lie in 0..{len(task.classes)} for task {task.name}")
    lookup = stored_label_values(task)
    labels = sitk.GetImageFromArray(lookup[classes].astype(np.uint16 if lookup.max() > 255 else np.uint8))
    labels.CopyInformation(images[0])
    return labels


#: Names Windows reserves for devices, whatever the extension (a stored case must copy anywhere).
WINDOWS_RESERVED_NAMES = {"CON", "PRN", "AUX", "NUL", *(f"COM{n}" for n in range(1, 10)), *(f"LPT{n}" for n in range(1, 10))}


def portable_folder_name(name: str) -> bool:
    """Whether ``name`` makes a folder on Linux, macOS and Windows alike (a case folder is shared)."""
    return (bool(name) and not name.startswith(".") and not name.endswith((".", " "))
            and not any(c in '/\\<>:"|?*' or ord(c) < 32 for c in name)
            and name.split(".")[0].upper() not in WINDOWS_RESERVED_NAMES)


def store_case(folder: str | os.PathLike, task: Task, case_name: str, image: sitk.Image | Sequence[sitk.Image],
               classes: np.ndarray) -> Path:
    """Write one corrected case as a training case under ``FOLDER/TASK/CASE/``: the image (one per
    channel of a multi-channel task) and the labels (see :func:`case_labels`), under the task's first
    file names (``image.nii.gz``, ``label.nii.gz``).

    ``task`` is the definition the model carries (``model.label_space.task(name)``), registered or
    not. An existing case of that name is refused: a stored correction is never overwritten.
    """
    images = [image] if isinstance(image, sitk.Image) else list(image)
    if not portable_folder_name(case_name):
        raise InputError(f"case name {case_name!r} cannot be a folder name on every system; use letters, digits, "
                         "'-' and '_' (and not a name Windows reserves, such as CON or COM1)")
    labels = case_labels(task, images, classes)
    names, label_name = stored_file_names(task)
    case_folder = Path(folder) / task.name / case_name
    if case_folder.exists():
        raise InputError(f"{case_folder} already holds a stored case; choose another case name")
    case_folder.mkdir(parents=True)
    for channel, name in zip(images, names):
        write_image(channel, case_folder / name)
    write_image(labels, case_folder / label_name)
    return case_folder


def stored_file_names(task: Task) -> tuple[list[str], str]:
    """The file names of a stored case of ``task``: one per channel, and the label's (see :func:`stored_file_name`).

    Refused when reading the case back would take one file for another (an image pattern ``*.nii.gz``
    finds ``aseg.nii.gz``, the label, first), as :func:`~MultiTaskSegLib.datasets.find_cases` looks."""
    images = [stored_file_name(task, patterns) for patterns in (task.image_files, *task.channel_files)]
    label = stored_file_name(task, task.label_files)
    stored = sorted({*images, label})
    if len(stored) < len(images) + 1:
        raise InputError(f"task {task.name!r} gives two of its files the same name ({', '.join([*images, label])}), "
                         "so a stored case would write one over the other; give each file its own name in the task's [files]")
    lists = ["[files] image", *(f"[files.channels] {channel}" for channel in task.channels[1:]), "[files] label",
             "[files] mask"]
    kinds = [*task.channels, "label", "mask"]
    patterns_of = [task.image_files, *task.channel_files, task.label_files, task.mask_files]
    for kind, where, patterns, name in zip(kinds, lists, patterns_of, [*images, label, None]):
        found = next((matches[0] for matches in ([n for n in stored if fnmatch.fnmatch(n, p)] for p in patterns)
                      if matches), None)
        if found != name:
            pattern = next(p for p in patterns if fnmatch.fnmatch(found, p))
            raise InputError(
                f"task {task.name!r}: its {kind} pattern {pattern!r} would find {found} in a stored case "
                f"({'the ' + kind + ' is stored as ' + name if name else 'a stored case has no ' + kind}), so the case "
                f"would be read back wrongly; put a plain file name first under {where} in the task's definition, "
                "or narrow the pattern"
            )
    return images, label


def stored_file_name(task: Task, patterns: Sequence[str]) -> str:
    """The file name a stored case uses for one of ``task``'s files: the first plain name the task
    lists, else its first pattern made plain (``*_t1.nii.gz`` -> ``case_t1.nii.gz``), so the case is
    found again and no file is named ``*`` (which some systems cannot even create)."""
    plain = [name for name in patterns if not any(c in name for c in "*?[")]
    if plain:
        return plain[0]
    name = re.sub(r"\[!?\^?([^\]])[^\]]*\]", r"\1", patterns[0]).replace("*", "case").replace("?", "x")
    if any(c in name for c in "*?[]") or not fnmatch.fnmatchcase(name, patterns[0]):
        raise InputError(f"task {task.name!r} names its files only by the pattern {patterns[0]!r}, which gives "
                         "no file name to store a case under; add a plain file name to the task's [files] list")
    return name
