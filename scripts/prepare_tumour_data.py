"""Lay out the shared tumour data as cross-validation folds (symbolic links), split by patient.

A sarcoma patient has a T1 MR and (25 of 33) a CT; both land in the same fold, so a patient is
never trained on in one modality and judged in the other. BraTS cases give the glioma task.

    python scripts/prepare_tumour_data.py --shared ../shared/data --out runs/tumour --folds 3

gives ``runs/tumour/foldK/train/TASK/CASE/`` and ``runs/tumour/foldK/held_out/TASK/CASE/`` for
``sarcoma_t1_mri``, ``sarcoma_ct``, ``brats_glioma_t1c`` and ``brats_glioma_t1c_flair`` (the same
BraTS cases), and ``foldK/fold.json`` naming them; ``runs/tumour/all/train/TASK/CASE/`` holds
every case, for a final model trained by a fold's recipe on all patients.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from prepare_brain_data import link  # scripts/ is on the path when a script runs

#: task -> (shared sub-folder, file names of one case that the task reads)
SOURCES = {
    "sarcoma_t1_mri": ("sarcoma", ("MR_T1_image.nii.gz", "MR_T1_mask.nii.gz")),
    "sarcoma_ct": ("sarcoma", ("CT_image.nii.gz", "CT_mask.nii.gz")),
    "brats_glioma_t1c": ("brats", ("T1c_subtrMeanDivStd.nii.gz", "Flair_subtrMeanDivStd.nii.gz",
                                   "OTMultiClass.nii.gz", "brainmask.nii.gz")),
    "brats_glioma_t1c_flair": ("brats", ("T1c_subtrMeanDivStd.nii.gz", "Flair_subtrMeanDivStd.nii.gz",
                                         "OTMultiClass.nii.gz", "brainmask.nii.gz")),
}


def cases_of(shared: Path, task: str) -> dict[str, Path]:
    folder, names = SOURCES[task]
    return {case.name: case for case in sorted((shared / folder).glob("*"))
            if all((case / name).exists() for name in names)}


def patient_folds(patients: list[str], folds: int, seed: int) -> list[list[str]]:
    order = np.random.default_rng(seed).permutation(len(patients))
    return [sorted(patients[i] for i in order[k::folds]) for k in range(folds)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    by_task = {task: cases_of(arguments.shared, task) for task in SOURCES}
    if not any(by_task.values()):
        parser.error(f"no sarcoma or BraTS cases under {arguments.shared}")
    sarcoma = patient_folds(sorted(set(by_task["sarcoma_t1_mri"]) | set(by_task["sarcoma_ct"])), arguments.folds, arguments.seed)
    brats = patient_folds(sorted(by_task["brats_glioma_t1c"]), arguments.folds, arguments.seed)  # may leave folds empty
    for number in range(arguments.folds):
        fold = arguments.out / f"fold{number + 1}"
        held = {task: (brats if task.startswith("brats") else sarcoma)[number] for task in SOURCES}
        for task, cases in by_task.items():
            for name, folder in cases.items():
                part = "held_out" if name in held[task] else "train"
                for file_name in SOURCES[task][1]:
                    link(folder / file_name, fold / part / task / name / file_name)
        summary = {task: {"held_out": sorted(set(held[task]) & set(cases)), "train": sorted(set(cases) - set(held[task]))}
                   for task, cases in by_task.items()}
        (fold / "fold.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        print(fold, {task: len(part["held_out"]) for task, part in summary.items()})
    for task, cases in by_task.items():  # every case, for the final models trained by the folds' recipe
        for name, folder in cases.items():
            for file_name in SOURCES[task][1]:
                link(folder / file_name, arguments.out / "all" / "train" / task / name / file_name)


if __name__ == "__main__":
    main()
