"""One network for several tasks against one network per task, on the same held-out cases.

Reads the ``per_case.csv`` that ``evaluate_tumour.py`` writes (it judges brain tissues too, one
region per class) for each single-task model and for the multi-task model, pairs the cases, and
prints per task and region: the cases, both mean Dice values, the paired difference with a 95 %
bootstrap interval over cases, and the multi-task model's task confusion (share of a scan's voxels
given another task's class when the scan is segmented without naming its task).

    .venv/bin/python scripts/compare_multitask.py --single brain_t1_mri=runs/multitask/fold1/single_brain_t1_mri/evaluation ... \\
        --multi brain_t1_mri=runs/multitask/fold1/multi/evaluation_brain_t1_mri ... --out runs/multitask/fold1/comparison.md

``--names A B`` renames the two arms (e.g. ``"without position channels" "with"``) for any other
paired comparison of two models on the same cases. An arm may also be a model folder whose card
holds ``cross_validated_dice`` (a bundled one-region model, e.g. ``Resources/Models/sarcoma-mr``):
its per-patient held-out figures are paired with the other arm's patients (a fold's, or all). An arm
may also be a per-patient table itself (``docs/results/sarcoma/fold3_mr_cases_evaluation_no-mirror.csv``).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from evaluate_tumour import regions_of

BOOTSTRAP_SAMPLES = 10_000
#: keys of a card's cross_validated_dice that are not patients
SUMMARY_KEYS = ("mean", "sd", "median")


def read_rows(source: Path, task: str) -> list[dict]:
    """The rows of a per-patient table (a ``.csv`` file, as ``docs/results/sarcoma/`` keeps them), of
    an evaluation folder (its ``per_case.csv``), or ``task``'s cross-validated figures in a model card."""
    if source.suffix != ".csv":
        if not (source / "per_case.csv").is_file():
            return card_rows(source, task)
        source = source / "per_case.csv"
    if not source.is_file():
        raise SystemExit(f"{source} does not exist; give an evaluate_tumour.py per-patient table or its folder")
    with open(source, encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def card_rows(model_folder: Path, task: str) -> list[dict]:
    """Rows like evaluate_tumour.py's from a one-region model card's cross-validated per-patient figures."""
    card_file = model_folder / "model.json"
    if not card_file.exists():
        raise SystemExit(f"{model_folder} holds neither per_case.csv (evaluate_tumour.py) nor model.json")
    card = json.loads(card_file.read_text(encoding="utf-8")).get("card", {})
    figures = card.get("cross_validated_dice", {}).get(task)
    if not figures:
        raise SystemExit(f"the card of {model_folder} has no cross_validated_dice for {task}")
    regions = list(regions_of(task))
    if len(regions) != 1:
        raise SystemExit(f"{task} has {len(regions)} regions; a card's figures pair for one-region tasks only")
    rows = [{"case": case, "task": task, "region": regions[0], "dice": value}
            for case, value in figures.items() if case not in SUMMARY_KEYS]
    if not rows:
        raise SystemExit(f"the card of {model_folder} gives only summary figures for {task}, no patient to pair: "
                         "compare against the folds' evaluation folders (per_case.csv) instead")
    return rows


def bootstrap_interval(differences: np.ndarray, seed: int = 0, patients: Sequence[str] | None = None) -> tuple[float, float]:
    """95 % interval of the mean difference, resampling cases with replacement.

    ``patients`` names each case's patient where one patient has several (a sarcoma patient's MR and
    CT): patients are resampled, each with all their cases, since those are not independent.
    """
    rng = np.random.default_rng(seed)
    if patients is None:
        means = differences[rng.integers(0, len(differences), (BOOTSTRAP_SAMPLES, len(differences)))].mean(axis=1)
    else:
        names = list(dict.fromkeys(patients))  # in order of appearance: one case per patient resamples as without
        owner = np.array([names.index(patient) for patient in patients])
        sums = np.bincount(owner, weights=differences, minlength=len(names))
        counts = np.bincount(owner, minlength=len(names))
        drawn = rng.integers(0, len(names), (BOOTSTRAP_SAMPLES, len(names)))
        means = sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def by_case_and_region(rows: list[dict], arm: str) -> dict[tuple[str, str], dict]:
    """An arm's rows by (case, region); a case twice (folds that overlap, a folder given twice) is refused,
    since keeping either row would pair silently against the wrong figure or count a patient twice."""
    keyed = {}
    for row in rows:
        key = (row["case"], row["region"])
        if key in keyed:
            raise SystemExit(f"the {arm} arm of {row['task']} holds case {key[0]} ({key[1]}) twice: each held-out "
                             "case must come from one fold only; check the folders given for that arm")
        keyed[key] = row
    return keyed


def compare(single: list[dict], multi: list[dict]) -> list[str]:
    """Table lines for one task: a row per region and, with several regions, their mean per case."""
    single_rows, multi_rows = by_case_and_region(single, "first"), by_case_and_region(multi, "second")
    cases = sorted({case for case, _ in set(single_rows) & set(multi_rows)})
    if not cases:
        raise SystemExit(f"the two arms of {single[0]['task']} share no case and region: nothing to pair")
    regions = list(dict.fromkeys(row["region"] for row in single))

    def dice(rows: dict, region: str) -> np.ndarray:
        return np.array([float(rows[(case, region)]["dice"]) for case in cases])

    scores = {region: (dice(single_rows, region), dice(multi_rows, region)) for region in regions}
    if len(regions) > 1:
        scores["mean over regions"] = tuple(np.mean([pair[arm] for pair in scores.values()], axis=0) for arm in (0, 1))
    confusion = np.array([float(row.get("confusion_percent", "nan")) for row in multi])
    confusion_text = f"{np.nanmedian(confusion):.4f}" if np.isfinite(confusion).any() else "–"
    task, lines = single[0]["task"], []
    for region, (a, b) in scores.items():
        low, high = bootstrap_interval(b - a)
        lines.append(f"| `{task}` | {region} | {len(a)} | {a.mean():.3f} ± {a.std():.3f} | {b.mean():.3f} ± {b.std():.3f} | "
                     f"{(b - a).mean():+.3f} ({low:+.3f} to {high:+.3f}) | {confusion_text} |")
    return lines


def pairs_argument(values: list[str]) -> dict[str, list[Path]]:
    """TASK=FOLDER values by task; a task given several folders (e.g. one per fold) pools them."""
    parsed = {}
    for value in values:
        task, separator, folder = value.partition("=")
        if not separator:
            raise SystemExit(f"give TASK=EVALUATION_FOLDER, got {value!r}")
        parsed.setdefault(task, []).append(Path(folder))
    return parsed


def pooled_rows(folders: list[Path], task: str) -> list[dict]:
    return [row for folder in folders for row in read_rows(folder, task)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--single", nargs="+", action="extend", required=True,
                        help="TASK=FOLDER of the single-task model's evaluation (a task given twice: folds pooled)")
    parser.add_argument("--multi", nargs="+", action="extend", required=True,
                        help="TASK=FOLDER of the multi-task model's evaluation (likewise)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--names", nargs=2, default=["single-task", "multi-task"], metavar=("FIRST", "SECOND"),
                        help="names of the --single and --multi arms in the table")
    args = parser.parse_args()
    single, multi = pairs_argument(args.single), pairs_argument(args.multi)
    first, second = args.names
    lines = [f"| task | region | held-out cases | {first} Dice (mean ± sd) | {second} Dice | paired difference "
             "(mean, 95 % bootstrap interval) | task confusion (median %) |", "|---|---|---|---|---|---|---|"]
    for task in single:
        if task not in multi:
            raise SystemExit(f"task {task} has a single-task evaluation but no multi-task one")
        lines += compare(pooled_rows(single[task], task), pooled_rows(multi[task], task))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
