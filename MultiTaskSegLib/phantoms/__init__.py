"""Deterministic phantom data for the three tasks of Moeskops et al. 2017.

Each case is an image (float32: arbitrary MR units, or Hounsfield units for CT) and a label image
(uint16, in the source label values that the task's registry entry maps: FreeSurfer aseg values for
the brain, 1 for the pectoral muscle and for the coronary arteries), on the same oblique grid.
Shape, size, orientation, spacing, noise, bias field and partial volume vary from case to case.

Case ``i`` of a task depends only on (seed, task, i): writing five cases gives the same first three
as writing three. ``size="small"`` draws scaled-down anatomy (at most 64 voxels a side, well under a
second a case) for tests and demos; ``size="full"`` approaches real scan sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from . import brain, breast, cardiac
from .common import SIZES

#: Tasks with a phantom generator, in the paper's order.
PHANTOM_TASKS = ("brain_t1_mri", "breast_mri", "cardiac_cta")

_GENERATORS: dict[str, Callable[[np.random.Generator, bool], tuple[sitk.Image, sitk.Image]]] = {
    "brain_t1_mri": brain.generate,
    "breast_mri": breast.generate,
    "cardiac_cta": cardiac.generate,
}

__all__ = ["PHANTOM_TASKS", "SIZES", "generate_case", "write_phantoms"]


def _check(task: str, size: str) -> None:
    if task not in _GENERATORS:
        raise InputError(f"no phantom for task {task!r}; phantoms exist for {', '.join(PHANTOM_TASKS)}")
    if size not in SIZES:
        raise InputError(f"phantom size must be one of {', '.join(SIZES)}, got {size!r}")


def _check_count(name: str, value: int, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise InputError(f"{name} must be an integer of at least {least}, got {value!r}")


def generate_case(task: str, seed: int, size: str = "small", case: int = 0) -> tuple[sitk.Image, sitk.Image]:
    """One phantom case of ``task``: (image float32, label uint16) on the same grid.

    The case is a function of (seed, task, case) only.
    """
    _check(task, size)
    _check_count("seed", seed, 0)
    _check_count("case", case, 0)
    rng = np.random.default_rng([int(seed), PHANTOM_TASKS.index(task), int(case)])
    return _GENERATORS[task](rng, size == "small")


def write_phantoms(
    out_dir: Path, cases: int = 3, seed: int = 0, size: str = "small", tasks: Sequence[str] = PHANTOM_TASKS,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``out_dir/TASK/case_NNN/image.nii.gz`` and ``label.nii.gz``; returns the case folders.

    Existing case files are refused before anything is written (they may be someone's corrected
    labels), unless ``overwrite``."""
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    if not tasks:
        raise InputError(f"no tasks given; choose from {', '.join(PHANTOM_TASKS)}")
    for task in tasks:
        _check(task, size)
    _check_count("cases", cases, 1)
    _check_count("seed", seed, 0)
    if not overwrite:
        _refuse_existing_cases(Path(out_dir), tasks, cases)
    folders = []
    for task in tasks:
        for number in range(cases):
            image, labels = generate_case(task, seed, size, case=number)
            folder = Path(out_dir) / task / f"case_{number:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(image, str(folder / "image.nii.gz"), useCompression=True)
            sitk.WriteImage(labels, str(folder / "label.nii.gz"), useCompression=True)
            folders.append(folder)
    return folders


def _refuse_existing_cases(out_dir: Path, tasks: Sequence[str], cases: int) -> None:
    existing = [folder / name for task in tasks for number in range(cases)
                for folder in [out_dir / task / f"case_{number:03d}"] for name in ("image.nii.gz", "label.nii.gz")
                if (folder / name).exists()]
    if existing:
        raise InputError(f"{out_dir} already holds {len(existing)} of the case files to write (e.g. {existing[0]}); "
                         "give a new folder, or --overwrite to replace them")
