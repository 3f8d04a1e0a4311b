"""``make demo``: held-out phantoms of every paper task, segmented by every bundled model.

Writes, under the output folder: the phantoms, a picture of each with its reference labels,
a ``.seg.nrrd`` per model and case, overlay pictures (reference beside prediction), and a Dice
table printed and saved as CSV. With no bundled model it stops after the phantoms and pictures.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .datasets import find_cases, read_label
from .evaluation import dice_per_class
from .imageio import read_image
from .inference import segment_image
from .model_files import bundled_models, load_model
from .overlay import save_overlay_png
from .phantoms import PHANTOM_TASKS, write_phantoms
from .segments import write_result
from .tasks import LabelSpace, get_task

#: Training phantoms use seed 0; the demo's cases come from another seed, so they are held out.
DEMO_SEED = 1000
DEMO_CASES = 2

#: Models trained on phantoms carry this suffix; the demo segments phantoms with those only.
PHANTOM_MODEL_SUFFIX = "-phantoms"


def _colors(space: LabelSpace) -> dict[int, tuple[float, float, float]]:
    return {entry.index: entry.class_spec.color for entry in space.entries[1:]}


def run_demo(out: Path, device: str = "auto", cases: int = DEMO_CASES) -> int:
    out = Path(out)
    print(f"writing {cases} held-out small phantom cases per task under {out / 'phantoms'}")
    write_phantoms(out / "phantoms", cases=cases, seed=DEMO_SEED, size="small", overwrite=True)  # the demo's own
    all_cases = [case for task in PHANTOM_TASKS for case in find_cases(get_task(task), out / "phantoms" / task)]
    for case in all_cases:
        space = LabelSpace.from_names([case.task])
        labels = sitk.GetImageFromArray(space.to_model_labels(case.task, get_task(case.task).map_labels(
            sitk.GetArrayFromImage(sitk.ReadImage(str(case.label))))))
        labels.CopyInformation(sitk.ReadImage(str(case.image)))
        save_overlay_png(read_image(case.image), labels, _colors(space), out / "pictures" / f"{case.task}_{case.name}.png",
                         title=f"{case.task} {case.name} (reference)")
    print(f"pictures of the phantoms and their labels: {out / 'pictures'}")

    models = bundled_models()
    if not models:
        print("no bundled model found in Resources/Models: nothing to segment")
        return 0
    rows = []
    for model_name, path in models.items():
        if not model_name.endswith(PHANTOM_MODEL_SUFFIX):
            print(f"{model_name}: a model for real scans, not run here: the small phantoms are miniature, "
                  "scaled-down anatomy (its results on real subjects are in the README)")
            continue
        model = load_model(path)
        for case in all_cases:
            if case.task not in model.label_space.task_names:
                continue
            image = read_image(case.image)
            started = time.perf_counter()
            result = segment_image(model, image, tasks=[case.task], device=device)
            seconds = time.perf_counter() - started
            output = write_result(result, out / "segmentations" / model_name / f"{case.task}_{case.name}.seg.nrrd")
            task = get_task(case.task)
            reference = model.label_space.to_model_labels(
                case.task, task.map_labels(sitk.GetArrayFromImage(read_label(case.label, image, case.image))))
            indices = model.label_space.indices_for_task(case.task)
            scores = dice_per_class(sitk.GetArrayViewFromImage(result.labels), reference, indices)
            reference_image = sitk.GetImageFromArray(reference)
            reference_image.CopyInformation(image)
            save_overlay_png(image, result.labels, _colors(model.label_space),
                             out / "pictures" / model_name / f"{case.task}_{case.name}.png",
                             title=f"{model_name}: {case.task} {case.name}", reference=reference_image)
            for index, value in scores.items():
                rows.append({"model": model_name, "architecture": model.architecture.name, "task": case.task,
                             "case": case.name, "class": model.label_space.entries[index].class_spec.name,
                             "dice": round(value, 4), "seconds": round(seconds, 1), "output": str(output)})
    with open(out / "dice.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print_table(rows)
    print(f"segmentations (.seg.nrrd, open in 3D Slicer): {out / 'segmentations'}; Dice table: {out / 'dice.csv'}")
    return 0


def print_table(rows: list[dict]) -> None:
    """Mean Dice per model, task and class over the demo cases."""
    print(f"\n{'model':34s} {'task':14s} {'class':26s} {'Dice':>6s}")
    for model, task, cls in dict.fromkeys((row["model"], row["task"], row["class"]) for row in rows):
        values = [row["dice"] for row in rows if (row["model"], row["task"], row["class"]) == (model, task, cls)]
        print(f"{model:34s} {task:14s} {cls:26s} {np.mean(values):6.3f}")
