"""Judge a brain model on held-out real subjects as a user would meet them.

For every held-out subject (a folder with ``t1.nii.gz``, ``aseg.nii.gz`` and, where there is one,
``t1_head.nii.gz``), the model segments through ``segment_image``, the call behind
``multitaskseg segment``:

- ``skull-stripped``: the FreeSurfer brain;
- ``whole head``: the whole-head scan (skull, eyes, neck), scored against the same aseg;
- ``scanner-like head``: the whole-head scan with Rician noise in the air and everywhere (3 % of the
  bright tissue), a smooth bias field and another intensity scale, as an unprocessed scan has them
  (FreeSurfer's ``T1.mgz`` has a zero background and normalised white matter);
- ``3 mm``: the whole-head scan (else the brain) with 3 mm slices along the inferior-superior axis
  (Gaussian slice profile, then sampled every 3 mm), scored against the aseg on that grid;
- ``repeat``: two more "acquisitions" of the whole head (rotated by a few degrees and resampled at
  1.1 mm; shifted by half a voxel with another bias field and noise): the coefficient of variation of
  each tissue's volume over the three scans measures consistency (a proxy: these are not real repeat scans).

Dice and HD95 per class go to ``OUT/per_case.csv``, means to ``OUT/summary.md``, and a picture of
each whole-head result beside its reference to ``OUT/SUBJECT_whole_head.png``.

    .venv/bin/python scripts/evaluate_brain.py --model runs/brain/fold1/run/model \\
        --subjects runs/brain/fold1/held_out --out runs/brain/fold1/evaluation
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from MultiTaskSegLib.evaluation import evaluate_labels
from MultiTaskSegLib.imageio import read_image
from MultiTaskSegLib.inference import segment_image
from MultiTaskSegLib.model_files import load_model
from MultiTaskSegLib.overlay import class_colors, save_overlay_png
from MultiTaskSegLib.tasks import get_task

TASK = "brain_t1_mri"


def superior_axis(image: sitk.Image) -> int:
    """The index axis closest to the inferior-superior direction."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return int(np.argmax(np.abs(direction[2])))


def thick_slices(image: sitk.Image, labels: sitk.Image, thickness: float = 3.0) -> tuple[sitk.Image, sitk.Image]:
    """The scan with ``thickness`` mm slices along the inferior-superior axis, and labels on that grid."""
    axis = superior_axis(image)
    variance = [0.0, 0.0, 0.0]
    variance[axis] = (thickness / 2.355) ** 2  # a Gaussian slice profile whose full width at half maximum is the thickness
    blurred = sitk.DiscreteGaussian(sitk.Cast(image, sitk.sitkFloat32), variance, 32, 0.01, True)
    spacing = list(image.GetSpacing())
    size = list(image.GetSize())
    size[axis] = int(size[axis] * spacing[axis] / thickness)
    spacing[axis] = thickness
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing(spacing)
    grid.SetDirection(image.GetDirection())
    grid.SetOrigin(image.GetOrigin())
    resampled = sitk.Resample(blurred, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return resampled, sitk.Resample(labels, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())


def scanner_like(image: sitk.Image, rng: np.random.Generator) -> sitk.Image:
    """Rician noise everywhere (air included), a bias field and an intensity scale of 3.7."""
    values = sitk.GetArrayFromImage(image).astype(np.float32)
    sigma = 0.03 * np.percentile(values[values > 0], 99)
    noisy = np.sqrt((values + rng.normal(0, sigma, values.shape)) ** 2 + rng.normal(0, sigma, values.shape) ** 2)
    z, _, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in values.shape], indexing="ij")
    result = sitk.GetImageFromArray((3.7 * noisy * np.exp(0.25 * z - 0.15 * x)).astype(np.float32))
    result.CopyInformation(image)
    return result


def repeat_scan(image: sitk.Image, rng: np.random.Generator, rotate: bool) -> sitk.Image:
    """Another "acquisition": rotated and resampled at 1.1 mm, or shifted half a voxel; new bias and noise."""
    centre = image.TransformContinuousIndexToPhysicalPoint([s / 2 for s in image.GetSize()])
    transform = sitk.Euler3DTransform()
    transform.SetCenter(centre)
    if rotate:
        transform.SetRotation(*np.deg2rad(rng.uniform(-6, 6, 3)))
        spacing = [1.1 * s for s in image.GetSpacing()]
    else:
        transform.SetTranslation([0.5 * s for s in image.GetSpacing()])
        spacing = list(image.GetSpacing())
    size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing(spacing)
    grid.SetDirection(image.GetDirection())
    grid.SetOrigin(image.GetOrigin())
    moved = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), grid, transform, sitk.sitkLinear, 0.0))
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in moved.shape], indexing="ij")
    coefficients = rng.normal(0, 0.08, 3)
    bias = np.exp(coefficients[0] * z + coefficients[1] * y + coefficients[2] * x)
    scale = np.percentile(moved[moved > 0], 99) if (moved > 0).any() else 1.0
    noisy = moved * bias + np.where(moved > 0, rng.normal(0, 0.01 * scale, moved.shape), 0)
    result = sitk.GetImageFromArray(np.clip(noisy, 0, None).astype(np.float32))
    result.CopyInformation(grid)
    return result


def segment_classes(model, image: sitk.Image, device: str):
    """The brain task's class indices (1..6) segmented on ``image``'s grid, and the result's warnings."""
    result = segment_image(model, image, [TASK], device)
    labels = sitk.GetArrayFromImage(result.labels).astype(np.int16)
    classes = sitk.GetImageFromArray(np.where(labels > 0, labels - model.label_space.offset(TASK), 0).astype(np.int16))
    classes.CopyInformation(image)
    return classes, result.warnings


def score(model, image: sitk.Image, reference: sitk.Image, device: str) -> tuple[dict, sitk.Image, list[str], float]:
    task = get_task(TASK)
    started = time.perf_counter()
    predicted_image, warnings = segment_classes(model, image, device)
    seconds = time.perf_counter() - started
    truth_image = sitk.GetImageFromArray(task.map_labels(sitk.GetArrayFromImage(reference)).astype(np.int16))
    truth_image.CopyInformation(reference)
    predicted_image.CopyInformation(reference)
    metrics = evaluate_labels(predicted_image, truth_image, range(1, len(task.class_names) + 1))
    return metrics, predicted_image, warnings, seconds


def class_volumes(labels: sitk.Image, count: int) -> np.ndarray:
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    return np.bincount(sitk.GetArrayViewFromImage(labels).ravel().astype(np.int64), minlength=count + 1)[1:count + 1] * voxel_ml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--subjects", type=Path, required=True, help="folder of held-out subject folders")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-repeats", action="store_true")
    parser.add_argument("--scanner-like", action="store_true", help="also judge the noisy, biased whole-head variant")
    args = parser.parse_args()
    model = load_model(args.model)
    names = get_task(TASK).class_names
    args.out.mkdir(parents=True, exist_ok=True)
    rows, consistency = [], []
    subjects = sorted(p for p in args.subjects.iterdir() if (p / "t1.nii.gz").exists() and not p.name.endswith("_head"))
    for subject in subjects:
        rng = np.random.default_rng([args.seed, len(subject.name)])
        reference = read_image(subject / "aseg.nii.gz", check_values=False)
        head_file = subject.parent / f"{subject.name}_head" / "t1.nii.gz"
        head = read_image(head_file) if head_file.exists() else None
        variants = {"skull-stripped": (read_image(subject / "t1.nii.gz"), reference)}
        if head is not None:
            variants["whole head"] = (head, reference)
            if args.scanner_like:
                variants["scanner-like head"] = (scanner_like(head, rng), reference)
        variants["3 mm"] = thick_slices(head if head is not None else variants["skull-stripped"][0], reference)
        volumes = {}
        for variant, (image, truth) in variants.items():
            metrics, predicted, warnings, seconds = score(model, image, truth, args.device)
            volumes[variant] = class_volumes(predicted, len(names))
            if variant == "whole head":
                reference_classes = sitk.GetImageFromArray(get_task(TASK).map_labels(sitk.GetArrayFromImage(truth)))
                reference_classes.CopyInformation(truth)
                save_overlay_png(image, predicted, class_colors(get_task(TASK)), args.out / f"{subject.name}_whole_head.png",
                                 title=f"{subject.name}, whole head (held out)", reference=reference_classes)
            for label, values in metrics.items():
                rows.append({"subject": subject.name, "input": variant, "class": names[label - 1],
                             "dice": round(values["dice"], 4), "hd95_mm": round(values["hd95_mm"], 2),
                             "seconds": round(seconds, 1), "warnings": len(warnings)})
            print(f"{subject.name} {variant}: mean Dice {np.mean([v['dice'] for v in metrics.values()]):.3f} "
                  f"({seconds:.0f} s){' warnings: ' + '; '.join(warnings) if warnings else ''}", flush=True)
        if not args.skip_repeats:
            base = head if head is not None else variants["skull-stripped"][0]
            scans = [volumes["whole head" if head is not None else "skull-stripped"]]
            for rotate in (True, False):
                classes, _ = segment_classes(model, repeat_scan(base, rng, rotate), args.device)
                scans.append(class_volumes(classes, len(names)))
            scans = np.stack(scans)
            variation = 100 * scans.std(axis=0, ddof=1) / np.maximum(scans.mean(axis=0), 1e-6)
            consistency.append({"subject": subject.name, **{n: round(float(v), 2) for n, v in zip(names, variation)}})
            print(f"{subject.name} volume CV %: {dict(zip(names, np.round(variation, 2)))}", flush=True)
    with open(args.out / "per_case.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "consistency.json").write_text(json.dumps(consistency, indent=2), encoding="utf-8")
    (args.out / "summary.md").write_text(summary(rows, consistency, names), encoding="utf-8")
    print(summary(rows, consistency, names))


def summary(rows: list[dict], consistency: list[dict], names) -> str:
    inputs = list(dict.fromkeys(row["input"] for row in rows))
    lines = ["| input | " + " | ".join(names) + " | mean |", "|---" * (len(names) + 2) + "|"]
    for variant in inputs:
        chosen = [row for row in rows if row["input"] == variant]
        per_class = [np.mean([r["dice"] for r in chosen if r["class"] == name]) for name in names]
        lines.append(f"| {variant} (Dice) | " + " | ".join(f"{v:.3f}" for v in per_class) + f" | {np.mean(per_class):.3f} |")
        hd = [np.nanmean([r["hd95_mm"] for r in chosen if r["class"] == name]) for name in names]
        lines.append(f"| {variant} (HD95 mm) | " + " | ".join(f"{v:.1f}" for v in hd) + f" | {np.mean(hd):.1f} |")
    if consistency:
        cv = [np.mean([c[name] for c in consistency]) for name in names]
        lines.append("| repeat-scan volume CV % | " + " | ".join(f"{v:.2f}" for v in cv) + f" | {np.mean(cv):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
