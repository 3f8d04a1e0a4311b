"""``multitaskseg evaluate``: a model on labelled cases, measured as the papers measure.

For every case the model segments the scan with *all* its tasks (as a multi-task network runs
in practice) so that task confusion can be counted; per class Dice and HD95 are computed with the
output restricted to the case's own task, on the source grid. Binary tasks also get the
precision-recall curve pooled over the test set and the threshold with the highest Dice.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .datasets import CaseFiles, find_cases, parse_data_arguments, read_label
from .evaluation import evaluate_labels, precision_recall_curve, task_confusion
from .imageio import read_image
from .inference import segment_image
from .model_files import SegmentationModel, as_model


def _mean_sd(values: list[float]) -> str:
    finite = [v for v in values if np.isfinite(v)]
    if not finite:
        return "n/a"
    return f"{np.mean(finite):.3f} ± {np.std(finite):.3f}"


def evaluate_model(model_source: str | SegmentationModel, data: Sequence[str], out: Path,
                   tasks: Sequence[str] | None = None, device: str = "auto") -> dict:
    """Evaluate on every case of the data folders (``TASK=FOLDER`` pairs or a root with a folder per task)."""
    model = as_model(model_source)
    tasks = list(tasks or model.label_space.task_names)
    folders = parse_data_arguments(data, tasks)
    cases = [case for name, folder in folders.items() for case in find_cases(model.label_space.task(name), folder)]
    return evaluate_cases(model, cases, out, device)


def evaluate_cases(model: SegmentationModel, cases: Sequence[CaseFiles], out: Path, device: str = "auto") -> dict:
    """Per class Dice/HD95, task confusion and (binary tasks) precision-recall over ``cases``."""
    out.mkdir(parents=True, exist_ok=True)
    space = model.label_space
    rows, confusion_rows = [], []
    binary_probabilities: dict[str, list] = defaultdict(list)
    binary_references: dict[str, list] = defaultdict(list)
    for case in cases:
        task_name = case.task
        task = space.task(task_name)
        own = space.indices_for_task(task_name)
        alien = [i for i in range(1, len(space)) if i not in own]
        image = read_image(case.image)
        reference = space.to_model_labels(task_name, task.map_labels(
            sitk.GetArrayFromImage(read_label(case.label, image, case.image))))
        reference_image = sitk.GetImageFromArray(reference)
        reference_image.CopyInformation(image)
        every_task = segment_image(model, image, tasks=None, device=device, with_probabilities=True)
        predicted_all = sitk.GetArrayViewFromImage(every_task.labels)
        confusion_rows.append({"task": task_name, "case": case.name,
                               "confusion_percent": task_confusion(predicted_all, alien)})
        probabilities = sitk.GetArrayViewFromImage(every_task.probabilities)  # (z, y, x, labels)
        kept = [0, *own]
        restricted = np.asarray(kept)[np.argmax(probabilities[..., kept], axis=-1)]
        restricted_image = sitk.GetImageFromArray(restricted.astype(np.uint8))
        restricted_image.CopyInformation(image)
        for index, scores in evaluate_labels(restricted_image, reference_image, own).items():
            rows.append({"task": task_name, "case": case.name, "class": space.entries[index].class_spec.name,
                         "dice": scores["dice"], "hd95_mm": scores["hd95_mm"]})
        if len(own) == 1:
            foreground = probabilities[..., own[0]] / np.clip(probabilities[..., kept].sum(-1), 1e-6, None)
            binary_probabilities[task_name].append(foreground.astype(np.float32))
            binary_references[task_name].append(reference == own[0])
    operating_points = {}
    for task_name in binary_probabilities:
        curve = precision_recall_curve(binary_probabilities[task_name], binary_references[task_name])
        operating_points[task_name] = {"best_threshold": curve["best_threshold"], "best_dice": curve["best_dice"]}
        with open(out / f"precision_recall_{task_name}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["threshold", "precision", "recall", "dice"])
            writer.writerows(zip(*(np.round(curve[k], 5) for k in ("thresholds", "precision", "recall", "dice"))))
    _write_csv(out / "metrics.csv", rows)
    _write_csv(out / "task_confusion.csv", confusion_rows)
    summary = {
        "model": model.name,
        "per_class": {f"{t}/{c}": {"dice": _mean_sd([r["dice"] for r in rows if (r["task"], r["class"]) == (t, c)]),
                                   "hd95_mm": _mean_sd([r["hd95_mm"] for r in rows if (r["task"], r["class"]) == (t, c)])}
                      for t, c in dict.fromkeys((r["task"], r["class"]) for r in rows)},
        "median_task_confusion_percent": {t: float(np.median([r["confusion_percent"] for r in confusion_rows if r["task"] == t]))
                                          for t in dict.fromkeys(r["task"] for r in confusion_rows)},
        "binary_operating_points": operating_points,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"{'task/class':45s} {'Dice':>15s} {'HD95 (mm)':>17s}")
    for key, values in summary["per_class"].items():
        print(f"{key:45s} {values['dice']:>15s} {values['hd95_mm']:>17s}")
    for task_name, value in summary["median_task_confusion_percent"].items():
        print(f"task confusion {task_name}: median {value:.5f} % of voxels")
    for task_name, point in operating_points.items():
        print(f"{task_name}: best threshold {point['best_threshold']:.2f}, Dice {point['best_dice']:.3f}")
    return summary


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
