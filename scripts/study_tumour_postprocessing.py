"""How the choice of threshold and of the kept region changes held-out tumour Dice, from saved
probabilities (no network run): which post-processing a one-tumour task should have.

Reads evaluation folders written by ``evaluate_tumour.py --save-probabilities`` (one-class tasks:
the sarcoma crops) and scores, per case, every pair of

* threshold: the model's operating point (chosen on its 3-5 validation patients) or a fixed value;
* region rule: ``all`` (nothing removed), ``largest`` (the largest 26-connected region, the
  current setting), ``central`` (the region nearest the centre of the crop: the intended input is
  a crop around the tumour, so a large region at its edge is more likely muscle or fat) or
  ``unsure`` (the largest region, except that a scan whose highest probability stays below 0.9 gets
  the region of probability >= 0.1 around its most probable voxel: the task option
  ``[unsure_region]``, :data:`UNSURE_RULE`).

    .venv/bin/python scripts/study_tumour_postprocessing.py runs/tumour/fold2/mr/evaluation_p \\
        --out runs/tumour/postprocessing_mr.md

Given each fold's evaluation once as one pass and once with test-time mirroring (as
``run_sarcoma_folds.py`` writes them), the report ends with every setting (threshold, region rule,
mirroring) against the bundled models' current one (their operating point, largest region, one pass): the mean Dice
over all folds' cases, the paired difference with a 95 % bootstrap interval, and the difference
per fold (per model), so a setting that helps on one fold only shows as such.

    .venv/bin/python scripts/study_tumour_postprocessing.py runs/tumour/fold*/mr/evaluation_*mirror \
        --out runs/tumour/settings_mr.md

Choosing a rule on the patients it is then judged on is optimistic; the report says which folds
it saw, so a rule picked on some folds can be checked on others.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from compare_multitask import bootstrap_interval
from MultiTaskSegLib.datasets import find_cases, read_label
from MultiTaskSegLib.evaluation import dice
from MultiTaskSegLib.postprocessing import connected_regions, unsure_region
from MultiTaskSegLib.tasks import UnsureRegion, get_task

RULES = ("all", "largest", "central", "unsure")
#: The ``unsure`` rule's levels, fixed (2026-12-03) on fold 3's scale0.7-1.4 MR network before the other
#: folds were scored with it.
UNSURE_RULE = UnsureRegion(confident=0.9, threshold=0.1)
#: Down to 0.1: the CT networks are under-confident (fold 3's operating point is 0.1).
FIXED_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
#: The baseline every setting is paired with: threshold, region rule, mirroring (the bundled sarcoma
#: models' setting from 0.2.0 until sarcoma-mr 0.2.1 added the unsure rule; sarcoma-ct's still).
CURRENT_SETTING = ("operating point", "largest", False)


def distance_to_centre_mm(numbered: np.ndarray, count: int, spacing_zyx: np.ndarray) -> np.ndarray:
    """For regions 1..count, the distance in mm from the crop's centre to the region's nearest voxel."""
    centre = (np.array(numbered.shape) - 1) / 2.0
    coordinates = np.argwhere(numbered > 0)
    distances = np.sqrt((((coordinates - centre) * spacing_zyx) ** 2).sum(axis=1))
    owners = numbered[tuple(coordinates.T)]
    nearest = np.full(count + 1, np.inf)
    np.minimum.at(nearest, owners, distances)
    return nearest[1:]


def apply_rule(mask: np.ndarray, rule: str, spacing_zyx: np.ndarray, probabilities: np.ndarray | None = None,
               unsure: UnsureRegion = UNSURE_RULE) -> np.ndarray:
    """``mask`` (the probabilities at a threshold) after the region ``rule``; ``unsure`` needs the
    probabilities, and takes the levels of ``unsure``."""
    if rule == "unsure":
        region = unsure_region(probabilities, unsure)
        if region is not None:
            return region
        rule = "largest"
    if rule == "all" or not mask.any():
        return mask
    numbered = connected_regions(mask)
    count = int(numbered.max())
    if rule == "largest":
        return numbered == 1
    nearest = distance_to_centre_mm(numbered, count, spacing_zyx)
    return numbered == int(np.argmin(nearest)) + 1  # ties go to the larger region (lower number)


def study(folder: Path) -> list[dict]:
    meta = json.loads((folder / "probabilities.json").read_text(encoding="utf-8"))
    task = get_task(meta["task"])
    operating_point = meta["operating_point"] if meta["operating_point"] is not None else 0.5
    rows = []
    for case in find_cases(task, Path(meta["cases"])):
        image = sitk.ReadImage(str(folder / f"{case.name}_probabilities.nii.gz"))
        probabilities = sitk.GetArrayFromImage(image)
        reference = task.map_labels(sitk.GetArrayFromImage(read_label(case.label, image, folder / f"{case.name}_probabilities.nii.gz"))) > 0
        spacing = np.array(image.GetSpacing())[::-1]
        for name, threshold in [("operating point", operating_point), *((f"{t:.1f}", t) for t in FIXED_THRESHOLDS)]:
            mask = probabilities >= threshold
            for rule in RULES:
                kept = apply_rule(mask, rule, spacing, probabilities)
                value = dice(kept, reference) if kept.any() or reference.any() else 1.0
                rows.append({"fold": folder.as_posix(), "model": meta["model"], "mirror": bool(meta.get("mirror", False)),
                             "task": task.name, "case": case.name, "threshold": name, "rule": rule, "dice": float(value)})
    return rows


def report(rows: list[dict], folders: list[Path]) -> str:
    thresholds = list(dict.fromkeys(row["threshold"] for row in rows))
    cases = sorted({(row["fold"], row["mirror"], row["case"]) for row in rows})
    # A scan evaluated once in one pass and once mirrored is one scan judged two ways, not two cases.
    scans = {(row["model"], row["task"], row["case"]) for row in rows}
    lines = [f"Held-out scans: {len(scans)} ({len({case for _, _, case in scans})} patients) from "
             f"{', '.join(f.as_posix() for f in folders)}", "",
             "| threshold | mirroring | " + " | ".join(f"{rule}: mean Dice (cases < 0.1)" for rule in RULES) + " |",
             "|---|---|" + "---|" * len(RULES)]
    for mirror in sorted({row["mirror"] for row in rows}):
        for threshold in thresholds:
            cells = []
            for rule in RULES:
                values = np.array([row["dice"] for row in rows
                                   if row["threshold"] == threshold and row["rule"] == rule and row["mirror"] == mirror])
                cells.append(f"{values.mean():.3f} ({int((values < 0.1).sum())})")
            lines.append(f"| {threshold} | {'yes' if mirror else 'no'} | " + " | ".join(cells) + " |")
    lines += ["", "Per case at the operating point (Dice):", "",
              "| evaluation | mirroring | case | " + " | ".join(RULES) + " |", "|---|---|---|" + "---|" * len(RULES)]
    for fold, mirror, case in cases:
        values = {row["rule"]: row["dice"] for row in rows
                  if row["fold"] == fold and row["case"] == case and row["threshold"] == "operating point"}
        lines.append(f"| {'/'.join(Path(fold).parts[-3:-1])} | {'yes' if mirror else 'no'} | {case} | "
                     + " | ".join(f"{values[r]:.3f}" for r in RULES) + " |")
    return "\n".join(lines + settings_against_current(rows)) + "\n"


def settings_against_current(rows: list[dict]) -> list[str]:
    """Lines comparing every setting with :data:`CURRENT_SETTING` on the scans that have both, pooled
    over models (folds) and tasks (one model's MR and CT scans of a patient are two scans, resampled
    together by the bootstrap); empty when the current setting was not evaluated."""
    scores = {(row["threshold"], row["rule"], row["mirror"], row["model"], row["task"], row["case"]): row["dice"]
              for row in rows}
    current = {key[3:]: value for key, value in scores.items() if key[:3] == CURRENT_SETTING}
    if not current:
        return []
    settings = sorted({key[:3] for key in scores}, key=lambda s: (s[2], s[0] != "operating point", s[0], RULES.index(s[1])))
    models = sorted({model for model, _, _ in current})
    patients = [case for _, _, case in sorted(current)]
    lines = ["", f"Every setting against the current one (threshold {CURRENT_SETTING[0]}, {CURRENT_SETTING[1]} region, "
             f"one pass), paired per scan over {len(current)} scans of {len(set(patients))} patients, "
             f"{len(models)} model(s):", "",
             "| threshold | region | mirroring | mean Dice | paired difference (95 % bootstrap interval) | better / worse | "
             "difference per model |", "|---|---|---|---|---|---|---|"]
    cases = sorted(current)
    before = np.array([current[case] for case in cases])
    owners = np.array([model for model, _, _ in cases])
    for setting in settings:
        if any(setting + case not in scores for case in cases):
            continue
        after = np.array([scores[setting + case] for case in cases])
        differences = after - before
        low, high = bootstrap_interval(differences, patients=patients)
        per_model = [differences[owners == model].mean() for model in models]
        lines.append(f"| {setting[0]} | {setting[1]} | {'yes' if setting[2] else 'no'} | {after.mean():.3f} | "
                     f"{differences.mean():+.3f} ({low:+.3f} to {high:+.3f}) | "
                     f"{int((differences > 0.01).sum())} / {int((differences < -0.01).sum())} | "
                     + ", ".join(f"{value:+.3f}" for value in per_model) + " |")
    lines += ["", "Models, in the order of the last column: " + ", ".join(models)]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("evaluations", nargs="+", type=Path, help="folders written with --save-probabilities")
    parser.add_argument("--out", type=Path, required=True, help="the report (markdown)")
    args = parser.parse_args()
    rows = [row for folder in args.evaluations for row in study(folder)]
    text = report(rows, args.evaluations)
    args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
