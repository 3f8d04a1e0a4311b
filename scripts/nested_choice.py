"""Choose among variants of a cross-validated model without choosing on the patients that judge it.

A setting picked by its mean over all held-out patients (a test grid, a post-processing rule)
flatters the figure it is picked by. Here each fold's patients are judged at the variant that
scored best on the *other* folds' held-out patients (leave one fold out), so no patient helps choose
the setting it is judged with. The nested figure is then an honest estimate of "choose the setting
by cross-validation"; the choice over all folds is the one a final model takes.

    .venv/bin/python scripts/nested_choice.py --task sarcoma_ct --reference 1.5 \\
        --variant 1.5 fold1.csv fold2.csv fold3.csv --variant 1.2 fold1_1.2.csv fold2_1.2.csv fold3_1.2.csv \\
        --out nested.md --table nested_per_patient.csv

Each ``--variant NAME TABLE...`` gives one per-patient table (or evaluation folder) per fold, in the
same fold order for every variant. Ties go to the variant listed first (list the cheaper one first).
``--table`` writes the nested per-patient figures as a table ``compare_multitask.py`` pairs.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compare_multitask import bootstrap_interval, read_rows


@dataclass
class FoldChoice:
    fold: int
    chosen: str
    #: mean Dice of each variant over the other folds' patients, by variant
    scores_elsewhere: dict[str, float]
    rows: list[dict]


def mean_dice(rows: list[dict]) -> float:
    return float(np.mean([float(row["dice"]) for row in rows]))


def check_same_patients(tables: dict[str, list[list[dict]]]) -> None:
    """Every variant must judge the same patients in each fold, or the choice compares different groups."""
    names = list(tables)
    for fold in range(len(tables[names[0]])):
        expected = sorted((row["case"], row["region"]) for row in tables[names[0]][fold])
        for name in names[1:]:
            found = sorted((row["case"], row["region"]) for row in tables[name][fold])
            if found != expected:
                raise SystemExit(f"fold {fold + 1}: variant {name} judges other patients than {names[0]} "
                                 f"({len(found)} against {len(expected)} rows); give each variant the same folds in the same order")


def choose(tables: dict[str, list[list[dict]]]) -> list[FoldChoice]:
    """Each fold's choice from the other folds' patients; ``tables[variant][fold]`` are per-patient rows."""
    counts = {len(folds) for folds in tables.values()}
    if len(counts) != 1 or counts.pop() < 2:
        raise SystemExit("give every variant one table per fold, the same number of folds (at least 2) for each")
    check_same_patients(tables)
    folds = len(next(iter(tables.values())))
    choices = []
    for fold in range(folds):
        scores = {name: mean_dice([row for other in range(folds) if other != fold for row in per_fold[other]])
                  for name, per_fold in tables.items()}
        chosen = max(scores, key=scores.get)  # the first listed of equals
        choices.append(FoldChoice(fold + 1, chosen, scores, tables[chosen][fold]))
    return choices


def overall_choice(tables: dict[str, list[list[dict]]]) -> tuple[str, dict[str, float]]:
    """The variant best over all folds' patients: what a model trained on all of them takes."""
    scores = {name: mean_dice([row for rows in per_fold for row in rows]) for name, per_fold in tables.items()}
    return max(scores, key=scores.get), scores


def report(tables: dict[str, list[list[dict]]], reference: str) -> tuple[list[str], list[dict]]:
    """Markdown lines and the nested per-patient rows."""
    choices = choose(tables)
    names = list(tables)
    lines = ["| fold | patients | " + " | ".join(f"{name} on the other folds" for name in names) +
             " | chosen | its Dice on this fold | " + f"{reference} on this fold |",
             "|---|---|" + "---|" * len(names) + "---|---|---|"]
    for choice in choices:
        reference_rows = tables[reference][choice.fold - 1]
        lines.append(f"| {choice.fold} | {len(choice.rows)} | " +
                     " | ".join(f"{choice.scores_elsewhere[name]:.3f}" for name in names) +
                     f" | {choice.chosen} | {mean_dice(choice.rows):.3f} | {mean_dice(reference_rows):.3f} |")
    nested = [row for choice in choices for row in choice.rows]
    by_case = {(row["case"], row["region"]): float(row["dice"]) for per_fold in tables[reference] for row in per_fold}
    nested_dice = np.array([float(row["dice"]) for row in nested])
    differences = nested_dice - np.array([by_case[(row["case"], row["region"])] for row in nested])
    low, high = bootstrap_interval(differences)
    final, scores = overall_choice(tables)
    lines += ["", f"Nested choice over {len(nested)} patients: **{nested_dice.mean():.3f}** ± {nested_dice.std():.3f} "
                  f"against {reference} throughout {nested_dice.mean() - differences.mean():.3f}, paired "
                  f"**{differences.mean():+.3f}** ({low:+.3f} to {high:+.3f}, 95 % bootstrap interval over patients).",
              "", "Over all folds' patients (the choice a model trained on all of them takes): " +
                  ", ".join(f"{name} {score:.3f}" for name, score in scores.items()) + f"; chosen **{final}**."]
    return lines, nested


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True)
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar=("NAME", "TABLE"),
                        help="a variant's name and its per-patient table (or evaluation folder) of each fold")
    parser.add_argument("--reference", help="the variant the nested choice is paired with (default: the first)")
    parser.add_argument("--out", type=Path, required=True, help="markdown report")
    parser.add_argument("--table", type=Path, help="the nested per-patient figures, a table compare_multitask.py pairs")
    args = parser.parse_args()
    if any(len(variant) < 3 for variant in args.variant):
        raise SystemExit("each --variant needs a name and one table per fold (at least two folds)")
    tables = {name: [[row for row in read_rows(Path(source), args.task) if row["task"] == args.task] for source in sources]
              for name, *sources in args.variant}
    if len(tables) != len(args.variant):
        raise SystemExit("two variants share a name; name each --variant differently")
    reference = args.reference or args.variant[0][0]
    if reference not in tables:
        raise SystemExit(f"--reference {reference} is not among the variants ({', '.join(tables)})")
    lines, nested = report(tables, reference)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    if args.table:
        with open(args.table, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(nested[0]))
            writer.writeheader()
            writer.writerows(nested)


if __name__ == "__main__":
    main()
