"""Compare the U-Net family (and the triplanar CNN) on phantoms and on the real data, over seeds.

For each data set, architecture and seed: train with the library's trainer (the seed also draws
the train/held-out split), then evaluate the held-out cases with ``evaluate_cases`` (Dice and
HD95 on the source grid). Prints and writes ``comparison.md`` with mean ± sd over seeds of the
per-case means.

    .venv/bin/python scripts/compare_architectures.py --out runs/comparison --steps 300 --seeds 0 1 2

Real data is read from ../shared/data; data sets whose folder is absent are skipped, saying so.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from MultiTaskSegLib.evaluate_run import evaluate_cases
from MultiTaskSegLib.phantoms import PHANTOM_TASKS, write_phantoms
from MultiTaskSegLib.training import TrainingConfig, collect_cases, train

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

SMALL_2D = {"channels": [8, 16, 32, 64, 128], "patch_size": [96, 96]}
ARCHITECTURES = {
    "unet2d": (SMALL_2D, 16),
    "unet2d_pretrained": (SMALL_2D, 16),
    "cmunet": (SMALL_2D, 16),
    "unet3d_factorised": ({"first_channels": 8, "depth": 3, "block_shape": [32, 32, 32], "learning_rate": 1e-3}, 4),
}


def data_sets(phantoms: Path) -> dict[str, tuple[dict[str, str], float]]:
    """name -> ({task: folder}, held-out fraction)."""
    sets = {"phantoms": ({task: str(phantoms / task) for task in PHANTOM_TASKS}, 0.2)}
    if SHARED_DATA.is_dir():
        sets["brats"] = ({"brats_glioma_t1c": str(SHARED_DATA / "brats")}, 0.25)
        sets["sarcoma_mr"] = ({"sarcoma_t1_mri": str(SHARED_DATA / "sarcoma")}, 0.25)
    else:
        print(f"{SHARED_DATA} is absent: comparing on phantoms only")
    return sets


def arguments_for(architecture: str, steps: int) -> tuple[dict, int, int]:
    """(architecture arguments, batch size, total steps) for a run of ``steps`` segmentation steps."""
    arguments, batch_size = ARCHITECTURES[architecture]
    arguments = dict(arguments)
    total = steps
    if architecture != "unet3d_factorised":
        arguments["steps_per_epoch"] = max(1, steps // 10)  # one cosine cycle over the run
    if architecture == "unet2d_pretrained":
        arguments["pretrain_steps"] = steps // 3  # the encoder phase comes on top, as in the paper
        total = steps + steps // 3
    return arguments, batch_size, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/comparison"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES))
    parser.add_argument("--data-sets", nargs="+")
    args = parser.parse_args()
    phantoms = args.out / "phantoms"
    if not phantoms.exists():
        write_phantoms(phantoms, cases=10, seed=0, size="small")
    rows = []
    for set_name, (folders, held_out) in data_sets(phantoms).items():
        if args.data_sets and set_name not in args.data_sets:
            continue
        for architecture in args.architectures:
            for seed in args.seeds:
                arguments, batch_size, total = arguments_for(architecture, args.steps)
                config = TrainingConfig(tasks=list(folders), architecture=architecture, arguments=arguments,
                                        batch_size=batch_size, steps=total, validate_every=total,
                                        validation_fraction=held_out, seed=seed, device="auto", data=folders,
                                        model_name=f"{set_name}-{architecture}-seed{seed}")
                run = args.out / set_name / architecture / f"seed{seed}"
                started = time.perf_counter()
                model = train(config, run, log=lambda message: None)
                seconds = time.perf_counter() - started
                _, held_out_cases = collect_cases(config)
                summary_file = run / "evaluation" / "summary.json"
                if not summary_file.exists():
                    evaluate_cases(model, held_out_cases, run / "evaluation")
                with open(run / "evaluation" / "metrics.csv", newline="", encoding="utf-8") as handle:
                    metrics = list(csv.DictReader(handle))
                rows.append({"data": set_name, "architecture": architecture, "seed": seed,
                             "dice": float(np.mean([float(m["dice"]) for m in metrics])),
                             "hd95_mm": float(np.nanmean([float(m["hd95_mm"]) for m in metrics])),
                             "train_seconds": round(seconds, 1)})
                print(json.dumps(rows[-1]), flush=True)
    write_table(rows, args.out / "comparison.md")


def write_table(rows: list[dict], path: Path) -> None:
    lines = ["| data | architecture | Dice (mean ± sd over seeds) | HD95 mm (mean ± sd) | seeds |", "|---|---|---|---|---|"]
    for key in dict.fromkeys((r["data"], r["architecture"]) for r in rows):
        dice = [r["dice"] for r in rows if (r["data"], r["architecture"]) == key]
        hd95 = [r["hd95_mm"] for r in rows if (r["data"], r["architecture"]) == key]
        lines.append(f"| {key[0]} | {key[1]} | {np.mean(dice):.3f} ± {np.std(dice):.3f} | "
                     f"{np.nanmean(hd95):.1f} ± {np.nanstd(hd95):.1f} | {len(dice)} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
