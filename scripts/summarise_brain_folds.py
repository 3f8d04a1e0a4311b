"""Combine the held-out evaluations of the cross-validation folds into README tables and model-card fields.

    .venv/bin/python scripts/summarise_brain_folds.py runs/brain/fold1/evaluation runs/brain/fold2/evaluation \\
        --card runs/brain/card.json

Every subject is held out by exactly one fold, so the pooled rows are cross-validated results.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from MultiTaskSegLib.tasks import get_task

CLASSES = get_task("brain_t1_mri").class_names
SHORT = ("WM", "cortical GM", "BG + thalami", "ventricles", "cerebellum", "brain stem")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("evaluations", nargs="+", type=Path)
    parser.add_argument("--card", type=Path, help="write the model-card fields here")
    args = parser.parse_args()
    rows, consistency = [], []
    for folder in args.evaluations:
        with open(folder / "per_case.csv", encoding="utf-8") as handle:
            rows += list(csv.DictReader(handle))
        if (folder / "consistency.json").exists():
            consistency += json.loads((folder / "consistency.json").read_text(encoding="utf-8"))
    inputs = list(dict.fromkeys(row["input"] for row in rows))
    subjects = sorted({row["subject"] for row in rows})
    print(f"{len(subjects)} held-out subjects: {', '.join(subjects)}\n")
    print("| input | metric | " + " | ".join(SHORT) + " | mean |")
    print("|---|---|" + "---|" * (len(SHORT) + 1))
    card_dice, card_hd = {}, {}
    for variant in inputs:
        chosen = [row for row in rows if row["input"] == variant]
        dice = [float(np.mean([float(r["dice"]) for r in chosen if r["class"] == name])) for name in CLASSES]
        hd = [float(np.nanmean([float(r["hd95_mm"]) for r in chosen if r["class"] == name])) for name in CLASSES]
        print(f"| {variant} | Dice | " + " | ".join(f"{v:.3f}" for v in dice) + f" | **{np.mean(dice):.3f}** |")
        print(f"| {variant} | HD95 mm | " + " | ".join(f"{v:.1f}" for v in hd) + f" | {np.mean(hd):.1f} |")
        card_dice[variant] = {name: round(v, 3) for name, v in zip(CLASSES, dice)} | {"mean": round(float(np.mean(dice)), 3)}
        card_hd[variant] = {name: round(v, 2) for name, v in zip(CLASSES, hd)}
    if consistency:
        cv = [float(np.mean([c[name] for c in consistency])) for name in CLASSES]
        print("| simulated repeat scans | volume CV % | " + " | ".join(f"{v:.2f}" for v in cv) + f" | {np.mean(cv):.2f} |")
    print("\n| subject | " + " | ".join(inputs) + " |")
    print("|---|" + "---|" * len(inputs))
    for subject in subjects:
        means = []
        for variant in inputs:
            values = [float(r["dice"]) for r in rows if r["subject"] == subject and r["input"] == variant]
            means.append(f"{np.mean(values):.3f}" if values else "–")
        print(f"| {subject} | " + " | ".join(means) + " |")
    if args.card:
        card = {"cross_validated_dice": card_dice, "cross_validated_hd95_mm": card_hd,
                "cross_validated_subjects": subjects}
        if consistency:
            card["simulated_repeat_volume_cv_percent"] = {name: round(v, 2) for name, v in zip(CLASSES, cv)}
        args.card.write_text(json.dumps(card, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
