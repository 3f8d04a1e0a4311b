"""Does a held-out tumour's Dice follow how much it stands out from its surroundings, or its size?

Asked of the CT sarcoma model, whose misses include tumours that look like muscle: if Dice followed
the intensity contrast, work on intensities (windowing, intensity augmentation) would be the lever;
if it follows size, the lever is elsewhere. For each patient of the per-patient tables (Dice from
``evaluate_tumour.py``) it measures, on the reference mask and the scan's own grid:

- volume in ml;
- slice share: the share of the tumour's slices (the scan's own, usually axial) that it covers;
- contrast: the median intensity of the tumour minus that of a 10 mm shell around it, soft tissue
  only (intensities in ``--soft-tissue``, which leaves out fat, air and bone);
- separability: how well one voxel's intensity tells tumour from that shell, 2 × |AUC − 0.5| (0: the
  two distributions are the same; 1: they do not overlap);

and reports each one's Spearman correlation with Dice, with a two-sided permutation p-value.

    .venv/bin/python scripts/study_tumour_contrast.py \\
        docs/results/sarcoma/fold{1,2,3}_ct_from_mr_cases_scale0.7-1.4_evaluation_no-mirror.csv \\
        --cases ../shared/data/sarcoma --image CT_image.nii.gz --mask CT_mask.nii.gz \\
        --out docs/results/sarcoma/ct_contrast.md
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SHELL_MM = 10.0
VOXELS_PER_SAMPLE = 20_000


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties given their mean rank (as Spearman and Mann-Whitney need)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def separability(inside: np.ndarray, outside: np.ndarray) -> float:
    """2 × |AUC − 0.5| of telling ``inside`` from ``outside`` by value (Mann-Whitney AUC)."""
    ranks = average_ranks(np.concatenate([inside, outside]))
    auc = (ranks[: inside.size].sum() - inside.size * (inside.size - 1) / 2) / (inside.size * outside.size)
    return abs(auc - 0.5) * 2


def spearman(x: np.ndarray, y: np.ndarray, permutations: int = 20_000, seed: int = 0) -> tuple[float, float]:
    """Spearman's rho and its two-sided permutation p-value."""
    rank_x, rank_y = average_ranks(x), average_ranks(y)
    rho = np.corrcoef(rank_x, rank_y)[0, 1]
    rng = np.random.default_rng(seed)
    null = np.array([np.corrcoef(rank_x, rng.permutation(rank_y))[0, 1] for _ in range(permutations)])
    return float(rho), float((np.abs(null) >= abs(rho) - 1e-12).mean())


def measure(image_path: Path, mask_path: Path, soft_tissue: tuple[float, float], seed: int = 0) -> dict:
    """Volume, contrast and separability of one tumour against the soft tissue around it."""
    image = sitk.ReadImage(str(image_path), sitk.sitkFloat32)
    mask = sitk.Cast(sitk.ReadImage(str(mask_path)) > 0, sitk.sitkUInt8)
    radius = [max(1, round(SHELL_MM / spacing)) for spacing in mask.GetSpacing()]
    grown = sitk.GetArrayFromImage(sitk.BinaryDilate(mask, radius)) > 0
    tumour = sitk.GetArrayFromImage(mask) > 0
    values = sitk.GetArrayFromImage(image)
    low, high = soft_tissue
    inside = values[tumour]
    outside = values[grown & ~tumour]
    inside, outside = (v[(v > low) & (v < high)] for v in (inside, outside))
    if inside.size == 0 or outside.size == 0:
        raise ValueError(f"{image_path}: no soft-tissue voxels inside or around the tumour in {soft_tissue}; "
                         "check --soft-tissue against the scan's intensities")
    rng = np.random.default_rng(seed)
    sample = [rng.choice(v, min(VOXELS_PER_SAMPLE, v.size), replace=False) for v in (inside, outside)]
    tumour_slices = tumour[tumour.any(axis=(1, 2))]
    return {"volume_ml": tumour.sum() * np.prod(mask.GetSpacing()) / 1000.0,
            "slice_share": float(tumour_slices.mean()),
            "contrast": float(np.median(inside) - np.median(outside)),
            "separability": separability(*sample)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tables", nargs="+", type=Path, help="per_case.csv files of evaluate_tumour.py")
    parser.add_argument("--cases", type=Path, required=True, help="folder of CASE/ folders with image and mask")
    parser.add_argument("--image", default="CT_image.nii.gz")
    parser.add_argument("--mask", default="CT_mask.nii.gz")
    parser.add_argument("--soft-tissue", type=float, nargs=2, default=(-100.0, 200.0), metavar=("LOW", "HIGH"),
                        help="intensities counted as soft tissue (default: CT, HU)")
    parser.add_argument("--out", type=Path, required=True, help="the Markdown report")
    args = parser.parse_args()

    dice_by_case = {row["case"]: float(row["dice"]) for table in args.tables for row in csv.DictReader(table.open(encoding="utf-8"))}
    rows = []
    for case, case_dice in sorted(dice_by_case.items()):
        folder = args.cases / case
        rows.append({"case": case, "dice": case_dice,
                     **measure(folder / args.image, folder / args.mask, tuple(args.soft_tissue))})
    dice = np.array([row["dice"] for row in rows])
    lines = ["| patient | volume ml | slice share | contrast (median, tumour − 10 mm shell) | separability | Dice |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['volume_ml']:.1f} | {r['slice_share']:.2f} | {r['contrast']:+.0f} | {r['separability']:.2f} | {r['dice']:.3f} |"
              for r in rows]
    lines += ["", f"| Spearman with Dice ({len(rows)} patients) | rho | permutation p |", "|---|---|---|"]
    for name, values in (("volume", [r["volume_ml"] for r in rows]), ("slice share", [r["slice_share"] for r in rows]),
                         ("absolute contrast", [abs(r["contrast"]) for r in rows]),
                         ("separability", [r["separability"] for r in rows])):
        rho, p = spearman(np.array(values), dice)
        lines.append(f"| {name} | {rho:+.2f} | {p:.3f} |")
    report = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report, encoding="utf-8")
    sys.stdout.reconfigure(errors="replace")  # an ASCII terminal gets "?" for "−", not a crash after the work
    print(report)


if __name__ == "__main__":
    main()
