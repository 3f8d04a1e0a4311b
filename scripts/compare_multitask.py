"""One network for several tasks against one network per task, on the same held-out cases.

Reads the ``per_case.csv`` that ``evaluate_tumour.py`` writes (it judges brain tissues too, one
region per class) for each single-task model and for the multi-task model, pairs the cases, and
prints per task and region: the cases, both mean Dice values, the paired difference with a 95 %
bootstrap interval over cases, and the multi-task model's task confusion (share of a scan's voxels
given another task's class when the scan is segmented without naming its task).

    .venv/bin/python scripts/compare_multitask.py --single brain_t1_mri=runs/multitask/fold1/single_brain_t1_mri/evaluation ... \\
        --multi brain_t1_mri=runs/multitask/fold1/multi/evaluation_brain_t1_mri ... --out runs/multitask/fold1/comparison.md
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

BOOTSTRAP_SAMPLES = 10_000


def read_rows(folder: Path) -> list[dict]:
    with open(folder / "per_case.csv", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def bootstrap_interval(differences: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the mean difference, resampling cases with replacement."""
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, len(differences), (BOOTSTRAP_SAMPLES, len(differences)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def compare(single: list[dict], multi: list[dict]) -> list[str]:
    """Table lines for one task: a row per region and, with several regions, their mean per case."""
    def by_case(rows: list[dict]) -> dict[tuple[str, str], dict]:
        return {(row["case"], row["region"]): row for row in rows}

    single_rows, multi_rows = by_case(single), by_case(multi)
    pairs = sorted(set(single_rows) & set(multi_rows))
    regions = [region for region in dict.fromkeys(row["region"] for row in single) if any(r == region for _, r in pairs)]
    task = single[0]["task"]
    lines = []
    groups = [(region, [pair for pair in pairs if pair[1] == region]) for region in regions]
    if len(regions) > 1:
        groups.append(("mean over regions", None))
    for region, chosen in groups:
        if chosen is None:  # per case, the mean over its regions
            cases = sorted({case for case, _ in pairs})
            a = np.array([np.mean([float(single_rows[(c, r)]["dice"]) for r in regions]) for c in cases])
            b = np.array([np.mean([float(multi_rows[(c, r)]["dice"]) for r in regions]) for c in cases])
        else:
            a = np.array([float(single_rows[pair]["dice"]) for pair in chosen])
            b = np.array([float(multi_rows[pair]["dice"]) for pair in chosen])
        low, high = bootstrap_interval(b - a)
        confusion = np.array([float(row.get("confusion_percent", "nan")) for row in multi])
        confusion_text = f"{np.nanmedian(confusion):.4f}" if np.isfinite(confusion).any() else "–"
        lines.append(f"| `{task}` | {region} | {len(a)} | {a.mean():.3f} ± {a.std():.3f} | {b.mean():.3f} ± {b.std():.3f} | "
                     f"{(b - a).mean():+.3f} ({low:+.3f} to {high:+.3f}) | {confusion_text} |")
    return lines


def pairs_argument(values: list[str]) -> dict[str, Path]:
    parsed = {}
    for value in values:
        task, separator, folder = value.partition("=")
        if not separator:
            raise SystemExit(f"give TASK=EVALUATION_FOLDER, got {value!r}")
        parsed[task] = Path(folder)
    return parsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--single", nargs="+", action="extend", required=True, help="TASK=FOLDER of the single-task model's evaluation")
    parser.add_argument("--multi", nargs="+", action="extend", required=True, help="TASK=FOLDER of the multi-task model's evaluation")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    single, multi = pairs_argument(args.single), pairs_argument(args.multi)
    lines = ["| task | region | held-out cases | single-task Dice (mean ± sd) | multi-task Dice | paired difference "
             "(mean, 95 % bootstrap interval) | task confusion (median %) |", "|---|---|---|---|---|---|---|"]
    for task in single:
        if task not in multi:
            raise SystemExit(f"task {task} has a single-task evaluation but no multi-task one")
        lines += compare(read_rows(single[task]), read_rows(multi[task]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
