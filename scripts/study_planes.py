"""Which slice planes a ``unet2d_multiplanar`` tumour model should average (FastSurfer's claim that
averaging the three planes beats any one of them), judged on held-out cases of a one-class task.

Each plane's probabilities are predicted once per case (the network as trained, inference over
that plane only) and every subset of planes is scored from their mean, at the model's operating
point with the task's own post-processing (largest region; the unsure rule where the task has it): mean Dice per subset and the paired
difference, with a 95 % bootstrap interval, against the three planes the model averages now. The
three-plane row reproduces ``evaluate_tumour.py`` (one pass).

    .venv/bin/python scripts/study_planes.py --model runs/tumour/fold3/ct_from_mr_cases/model \\
        --cases runs/tumour/fold3/held_out/sarcoma_ct --task sarcoma_ct --out runs/tumour/fold3/ct_from_mr_cases/planes

Several ``--model``/``--cases`` pairs (one per fold) are pooled into one report.
"""

from __future__ import annotations

import argparse
import csv
import itertools
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from bundle_model import refreshed
from compare_multitask import bootstrap_interval
from evaluate_tumour import class_probabilities
from MultiTaskSegLib.datasets import find_cases, read_label
from MultiTaskSegLib.evaluation import dice
from MultiTaskSegLib.imageio import read_image
from MultiTaskSegLib.inference import segment_image
from MultiTaskSegLib.model_files import load_model
from MultiTaskSegLib.tasks import get_task
from study_tumour_postprocessing import UNSURE_RULE, apply_rule

PLANE_NAMES = {0: "axial", 1: "coronal", 2: "sagittal"}


def plane_probabilities(model, image: sitk.Image, task_name: str, plane: int) -> np.ndarray:
    """The tumour probability of ``image`` on its own grid, predicted over one plane only."""
    config = model.architecture.config
    trained_planes = config.planes
    config.planes = (plane,)
    try:
        result = segment_image(model, [image], [task_name], "cpu", with_probabilities=True, mirror=False)
    finally:
        config.planes = trained_planes
    return sitk.GetArrayFromImage(class_probabilities(result))


def subsets(planes: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [subset for size in range(1, len(planes) + 1) for subset in itertools.combinations(planes, size)]


def study_model(model_path: Path, cases_folder: Path, task_name: str) -> list[dict]:
    """One row per case and subset of the model's planes: the Dice of their mean probability."""
    model = load_model(str(model_path))
    if model.architecture.name != "unet2d_multiplanar":
        raise SystemExit(f"{model_path} is a {model.architecture.name} model; the study needs unet2d_multiplanar")
    task = get_task(task_name)
    if len(task.class_names) != 1:
        raise SystemExit(f"{task_name} has {len(task.class_names)} classes; the study takes one-class tasks (sarcoma)")
    model.label_space = refreshed(model.label_space)
    operating_point = model.card.get("operating_points", {}).get(task_name) or 0.5
    unsure = model.label_space.task(task_name).unsure_region  # the model's own post-processing, as segment_image
    rule = "largest" if unsure is None else "unsure"
    planes = tuple(model.architecture.config.planes)
    rows = []
    for case in find_cases(task, cases_folder):
        image = read_image(case.image)
        reference = task.map_labels(sitk.GetArrayFromImage(read_label(case.label, image, case.image))) > 0
        probabilities = {plane: plane_probabilities(model, image, task_name, plane) for plane in planes}
        spacing = np.array(image.GetSpacing())[::-1]
        for subset in subsets(planes):
            mean = sum(probabilities[p] for p in subset) / len(subset)
            mask = apply_rule(mean >= operating_point, rule, spacing, mean, unsure or UNSURE_RULE)
            value = dice(mask, reference) if mask.any() or reference.any() else 1.0
            rows.append({"model": str(model_path), "case": case.name, "planes": "+".join(PLANE_NAMES[p] for p in subset),
                         "dice": round(float(value), 4)})
        print(case.name, ", ".join(f"{row['planes']} {row['dice']:.3f}" for row in rows if row["case"] == case.name), flush=True)
    return rows


def report(rows: list[dict]) -> str:
    """Mean Dice per subset and the paired difference against the subset of every plane."""
    names = list(dict.fromkeys(row["planes"] for row in rows))
    scores = {(row["planes"], row["model"], row["case"]): row["dice"] for row in rows}
    cases = sorted({(row["model"], row["case"]) for row in rows})
    every = np.array([scores[(names[-1], *case)] for case in cases])
    lines = [f"{len(cases)} held-out cases; the models average {names[-1]} now.", "",
             "| planes | mean Dice | paired difference against all planes (95 % bootstrap interval) | better / worse (> 0.01) |",
             "|---|---|---|---|"]
    for name in names:
        values = np.array([scores[(name, *case)] for case in cases])
        differences = values - every
        low, high = bootstrap_interval(differences)
        lines.append(f"| {name} | {values.mean():.3f} | {differences.mean():+.3f} ({low:+.3f} to {high:+.3f}) | "
                     f"{int((differences > 0.01).sum())} / {int((differences < -0.01).sum())} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, nargs="+", required=True, help="unet2d_multiplanar model folders (one per fold)")
    parser.add_argument("--cases", type=Path, nargs="+", required=True, help="each model's held-out case folder, in order")
    parser.add_argument("--task", required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for per_case.csv and report.md")
    args = parser.parse_args()
    if len(args.model) != len(args.cases):
        parser.error(f"give one --cases folder per --model ({len(args.model)} models, {len(args.cases)} case folders)")
    rows = [row for model, cases in zip(args.model, args.cases) for row in study_model(model, cases, args.task)]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "per_case.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = report(rows)
    (args.out / "report.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
