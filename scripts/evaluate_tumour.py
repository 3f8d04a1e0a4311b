"""Judge tumour models on held-out real cases, through ``segment_image`` (the call behind
``multitaskseg segment``), and summarise folds.

Regions are those the field reports: BraTS whole tumour (all four classes), tumour core (necrosis,
non-enhancing and enhancing tumour) and enhancing tumour; the sarcoma gross tumour volume. Dice and
HD95 per case and region go to ``OUT/per_case.csv``; a picture of each case to ``OUT/CASE.png``.
For a model of several tasks, ``confusion_percent`` is the share of the case's voxels given a class
of another task when the scan is segmented with all the model's tasks (not told which it is).

    .venv/bin/python scripts/evaluate_tumour.py --model runs/tumour/fold1/mr/model \\
        --cases runs/tumour/fold1/held_out/sarcoma_t1_mri --task sarcoma_t1_mri --out runs/tumour/fold1/mr/evaluation
    .venv/bin/python scripts/evaluate_tumour.py --summarise runs/tumour/fold*/mr/evaluation --out runs/tumour/mr_cv.md \\
        [--card runs/tumour/cards/sarcoma-mr.json]

``--refresh-tasks`` judges the model with the current task definitions' settings that do not
change what the network learnt (e.g. ``largest_component``), as ``bundle_model.py --refresh-tasks``
would bundle it.

An empty reference and an empty prediction score Dice 1; HD95 is left out (NaN) where either is empty.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from bundle_model import refreshed
from MultiTaskSegLib.datasets import find_cases, read_label
from MultiTaskSegLib.evaluation import dice, hausdorff95, task_confusion
from MultiTaskSegLib.imageio import read_image
from MultiTaskSegLib.inference import choose_device, mirroring, segment_image
from MultiTaskSegLib.model_files import load_model
from MultiTaskSegLib.overlay import class_colors, save_overlay_png
from MultiTaskSegLib.tasks import get_task
from MultiTaskSegLib.training import TrainingConfig, operating_points_on_working_grid

BRATS_REGIONS = {
    "whole tumour": ("Necrosis", "Oedema", "Non-enhancing tumour", "Enhancing tumour"),
    "tumour core": ("Necrosis", "Non-enhancing tumour", "Enhancing tumour"),
    "enhancing tumour": ("Enhancing tumour",),
}
#: task -> region -> class names that make the region (default: each class alone)
REGIONS = {"brats_glioma_t1c": BRATS_REGIONS, "brats_glioma_t1c_flair": BRATS_REGIONS}


def regions_of(task_name: str) -> dict[str, tuple[str, ...]]:
    return REGIONS.get(task_name, {name: (name,) for name in get_task(task_name).class_names})


def region_mask(classes: np.ndarray, task_name: str, names: tuple[str, ...]) -> np.ndarray:
    """``classes`` holds task class indices (1..K)."""
    indices = [get_task(task_name).class_names.index(name) + 1 for name in names]
    return np.isin(classes, indices)


def score_region(predicted: np.ndarray, expected: np.ndarray, grid: sitk.Image) -> tuple[float, float]:
    if not predicted.any() and not expected.any():
        return 1.0, float("nan")
    if not predicted.any() or not expected.any():
        return 0.0, float("nan")
    images = []
    for mask in (predicted, expected):
        image = sitk.GetImageFromArray(mask.astype(np.uint8))
        image.CopyInformation(grid)
        images.append(image)
    return dice(predicted, expected), hausdorff95(*images)


def class_probabilities(result) -> sitk.Image:
    """A one-class task's probability (background left out: component 1 of 2); else every class's."""
    probabilities = result.probabilities
    if probabilities.GetNumberOfComponentsPerPixel() == 2:
        return sitk.VectorIndexSelectionCast(probabilities, 1, sitk.sitkFloat32)
    return probabilities


def evaluate(model_path: str, cases_folder: Path, task_name: str, out: Path, device: str,
             refresh_tasks: bool = False, save_probabilities: bool = False, with_confusion: bool = True,
             mirror: bool | None = None, working_spacing_mm: float | None = None,
             rechoose_operating_point: bool = False) -> list[dict]:
    model = load_model(model_path)
    if refresh_tasks:
        model.label_space = refreshed(model.label_space)
    if working_spacing_mm is not None:
        model.label_space = model.label_space.with_working_spacing({task_name: working_spacing_mm})
    if rechoose_operating_point:  # on the run's validation cases (RUN/model beside RUN/config.json)
        run_config = json.loads((Path(model_path).parent / "config.json").read_text(encoding="utf-8"))
        points = operating_points_on_working_grid(model, TrainingConfig(**run_config), choose_device(device))
        print(f"operating points chosen again on the run's validation cases: {points} "
              f"(the card's: {model.card.get('operating_points')})", flush=True)
        model.card["operating_points"] = {**model.card.get("operating_points", {}), **points}
    task = get_task(task_name)
    offset = model.label_space.offset(task_name)
    rows = []
    if save_probabilities:
        (out / "probabilities.json").write_text(json.dumps({
            "model": str(model_path), "cases": str(cases_folder), "task": task_name,
            "operating_point": model.card.get("operating_points", {}).get(task_name),
            "mirror": mirroring(model, mirror)}, indent=2), encoding="utf-8")
    for case in find_cases(task, cases_folder):
        image = read_image(case.image)
        channels = [image, *(read_image(path) for path in case.channel_images)]  # e.g. T1c, FLAIR
        reference = read_label(case.label, image, case.image)
        started = time.perf_counter()
        result = segment_image(model, channels, [task_name], device, with_probabilities=save_probabilities,
                               mirror=mirror)
        seconds = time.perf_counter() - started
        labels = sitk.GetArrayFromImage(result.labels).astype(np.int32)
        predicted = np.where(labels > 0, labels - offset, 0)
        expected = task.map_labels(sitk.GetArrayFromImage(reference))
        confusion = float("nan")
        if with_confusion and len(model.label_space.task_names) > 1:
            alien = [i for other in model.label_space.task_names if other != task_name
                     for i in model.label_space.indices_for_task(other)]
            untold = sitk.GetArrayFromImage(segment_image(model, channels, None, device, mirror=mirror).labels)
            confusion = task_confusion(untold, alien)
        for region, names in regions_of(task_name).items():
            value, hd95 = score_region(region_mask(predicted, task_name, names), region_mask(expected, task_name, names), image)
            rows.append({"case": case.name, "task": task_name, "region": region, "dice": round(value, 4),
                         "hd95_mm": round(hd95, 2), "seconds": round(seconds, 1), "warnings": len(result.warnings),
                         "confusion_percent": round(confusion, 4)})
        if save_probabilities:  # for studies of post-processing
            sitk.WriteImage(class_probabilities(result), str(out / f"{case.name}_probabilities.nii.gz"), useCompression=True)
        classes = sitk.GetImageFromArray(predicted.astype(np.int16))
        classes.CopyInformation(image)
        truth = sitk.GetImageFromArray(expected.astype(np.int16))
        truth.CopyInformation(image)
        save_overlay_png(image, classes, class_colors(task), out / f"{case.name}.png",
                         title=f"{case.name}, {task_name} (held out)", reference=truth)
        print(f"{case.name}: " + ", ".join(f"{r['region']} {r['dice']:.3f}" for r in rows if r["case"] == case.name)
              + f" ({seconds:.0f} s)", flush=True)
    return rows


def summary(rows: list[dict]) -> str:
    lines = ["| task | region | cases | Dice mean ± sd | Dice median | Dice min | HD95 mm median | task confusion % (median) |",
             "|---|---|---|---|---|---|---|---|"]
    for task_name in dict.fromkeys(row["task"] for row in rows):
        for region in dict.fromkeys(row["region"] for row in rows if row["task"] == task_name):
            chosen = [row for row in rows if row["task"] == task_name and row["region"] == region]
            values = np.array([float(row["dice"]) for row in chosen])
            hd = np.array([float(row["hd95_mm"]) for row in chosen])
            confusion = np.array([float(row.get("confusion_percent", "nan")) for row in chosen])
            confusion_text = f"{np.nanmedian(confusion):.4f}" if np.isfinite(confusion).any() else "–"
            lines.append(f"| {task_name} | {region} | {len(values)} | {values.mean():.3f} ± {values.std():.3f} | "
                         f"{np.median(values):.3f} | {values.min():.3f} | {np.nanmedian(hd) if np.isfinite(hd).any() else float('nan'):.1f} | "
                         f"{confusion_text} |")
    return "\n".join(lines) + "\n"


def card_fields(rows: list[dict]) -> dict:
    """Model-card fields of pooled held-out rows of single-region tasks (the sarcoma models): Dice
    and HD95 per case, with the Dice mean, sd and median."""
    dice_fields, hd_fields = {}, {}
    for task_name in dict.fromkeys(row["task"] for row in rows):
        chosen = [row for row in rows if row["task"] == task_name]
        if len({row["region"] for row in chosen}) != 1:
            raise SystemExit(f"--card takes single-region tasks; {task_name} has several")
        values = np.array([float(row["dice"]) for row in chosen])
        dice_fields[task_name] = {row["case"]: round(float(row["dice"]), 4) for row in chosen} | {
            "mean": round(float(values.mean()), 3), "sd": round(float(values.std()), 3),
            "median": round(float(np.median(values)), 3)}
        hd_fields[task_name] = {row["case"]: round(float(row["hd95_mm"]), 2) for row in chosen
                                if np.isfinite(float(row["hd95_mm"]))}
    return {"cross_validated_dice": dice_fields, "cross_validated_hd95_mm": hd_fields}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--cases", type=Path, help="folder of held-out case folders of one task")
    parser.add_argument("--task")
    parser.add_argument("--summarise", nargs="*", type=Path, help="evaluation folders (with per_case.csv) to pool")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--refresh-tasks", action="store_true", help="take largest_component etc. from the task files")
    parser.add_argument("--no-confusion", action="store_true",
                        help="a multi-task model: skip the second, untold segmentation that measures task confusion")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write OUT/CASE_probabilities.nii.gz (a one-class task's probability; else all classes)")
    parser.add_argument("--mirror", action=argparse.BooleanOptionalAction,
                        help="test-time mirroring on or off (default: as the model card says)")
    parser.add_argument("--working-spacing", type=float, metavar="MM",
                        help="segment on this working grid instead of the model's (e.g. finer than it trained on; "
                             "bundle_model.py --working-spacing makes a bundled model do so)")
    parser.add_argument("--rechoose-operating-point", action="store_true",
                        help="choose the binary task's operating point again on the run's validation cases (MODEL is "
                             "RUN/model beside RUN/config.json), on the grid it segments on: with --working-spacing")
    parser.add_argument("--card", type=Path, help="with --summarise: merge the pooled per-case figures into this card JSON")
    args = parser.parse_args()
    if args.summarise:
        rows, source = [], {}
        for folder in args.summarise:
            with open(folder / "per_case.csv", encoding="utf-8") as handle:
                for row in csv.DictReader(handle):
                    key = (row["task"], row["region"], row["case"])
                    if key in source:  # the table would count the case twice, the card keep one of its figures
                        raise SystemExit(f"case {row['case']} ({row['task']}, {row['region']}) is in both {source[key]} and "
                                         f"{folder}: each held-out case must come from one fold only")
                    source[key] = folder
                    rows.append(row)
        table = summary(rows)
        args.out.write_text(table, encoding="utf-8")
        print(table)
        if args.card:
            card = json.loads(args.card.read_text(encoding="utf-8")) if args.card.exists() else {}
            args.card.write_text(json.dumps(card | card_fields(rows), indent=2), encoding="utf-8")
        return
    if not (args.model and args.cases and args.task):
        parser.error("give --model, --cases and --task (or --summarise)")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = evaluate(args.model, args.cases, args.task, args.out, args.device, args.refresh_tasks, args.save_probabilities,
                    not args.no_confusion, args.mirror, args.working_spacing, args.rechoose_operating_point)
    with open(args.out / "per_case.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "summary.md").write_text(summary(rows), encoding="utf-8")
    print(summary(rows))


if __name__ == "__main__":
    main()
