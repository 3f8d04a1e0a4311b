"""Run the sarcoma models' cross-validation (the README's fold recipe) to the end, resumably.

For each fold: the MR network (3,000 mini-batches), its held-out evaluation, the CT network started
from it (3,000 more), its evaluation. Every evaluation is done once as one pass and once with
test-time mirroring, with probabilities saved, so ``study_tumour_postprocessing.py`` can rescore
any threshold afterwards. The one-pass evaluations (the figures that decide) and the final models
come first; the mirrored evaluations (three times the inference) last. On two CPU cores without
AVX-512 a fold takes about three and a half hours, longer than a session: run it again and it picks
up where it stopped (a training run from its last checkpoint, at most ten minutes back; a finished
step is skipped).

    python scripts/run_sarcoma_folds.py --root runs/tumour --folds 1 3 2 --threads 2 [--sampling cases]

``--seed 1`` trains the same recipe with another seed into ``mr_cases_seed1`` (other initial weights,
mini-batches and validation patients; the held-out patients stay the fold's); ``--ensemble 0 1``
then assembles each fold's seed-0 and seed-1 networks (``multitaskseg ensemble``, into
``mr_cases_ensemble0-1``) and evaluates the ensemble. ``--steps mr`` runs the MR networks only; ``--final`` then trains the bundled models' recipe on every
patient (``ROOT/all``, no evaluation: nobody is left out). ``--sampling cases`` runs the recipe with
per-case sampling (``train --sampling cases``) into ``mr_cases`` and ``ct_from_mr_cases`` beside
the default recipe's ``mr`` and ``ct_from_mr``.

``--variant NAME --train-arg KEY=VALUE ...`` (or ``--working-spacing MM``) trains one step (``--steps mr`` or ``--steps ct_from_mr``)
with changed trainer arguments (``train --arg``) into ``..._NAME``, evaluated on the same held-out
patients, so it pairs with the recipe: e.g. a CT network with wider scale augmentation, still started
from the recipe's MR network of its fold:

    python scripts/run_sarcoma_folds.py --sampling cases --folds 3 --steps ct_from_mr --variant scale0.7-1.4 \
        --train-arg 'augmentation={"scale_low": 0.7, "scale_high": 1.4}' --no-mirrored-evaluations

Each evaluation's per-patient table is also copied to ``docs/results/sarcoma/`` (``--record``) as
``FOLD_RUN_EVALUATION.csv``: commit it, as ``runs/`` stays on the machine and a later session may not
get that machine (the CT-by-cases folds of 2026-12-02 were lost so).

The folds must exist (``prepare_tumour_data.py``). Data paths are given to the trainer as absolute
paths, so a run resumes only from the same checkout folder.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from MultiTaskSegLib.sampling import SAMPLING_CHOICES

#: The fold recipe of docs/tumour_models.md (sarcoma-mr; sarcoma-ct the same from the MR network).
RECIPE = ["--arch", "unet2d_multiplanar", "--arg", "patch_size=[160,160]", "--arg", "whole_slice_inference=true",
          "--batch-size", "16", "--validate-every", "1000", "--validation-fraction", "0.15"]
#: The recipe's mini-batches (one cosine cycle); another count is a variant (``--mini-batches``).
RECIPE_MINI_BATCHES = 3000
MODALITIES = {"mr": ("sarcoma_t1_mri", "sarcoma-mr"), "ct_from_mr": ("sarcoma_ct", "sarcoma-ct")}


def run(command: list[str], threads: int) -> None:
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})


@dataclass(frozen=True)
class Recipe:
    """Which networks of the fold recipe a run trains and judges: the sampling, the seed (or an
    ensemble's label such as ``ensemble0-1``), and a named variant with its ``train --arg`` values."""

    sampling: str
    seed: int | str = 0
    variant: str = ""
    train_arguments: tuple[str, ...] = ()
    mini_batches: int = RECIPE_MINI_BATCHES
    working_spacing_mm: float | None = None

    def folder(self, step: str) -> str:
        """``mr``, ``mr_cases``, ``mr_cases_seed1``, ``mr_cases_ensemble0-1``, ``ct_from_mr_cases_scale0.7-1.4``."""
        name = step if self.sampling == SAMPLING_CHOICES[0] else f"{step}_{self.sampling}"
        if isinstance(self.seed, str):
            name = f"{name}_{self.seed}"
        elif self.seed != 0:
            name = f"{name}_seed{self.seed}"
        return f"{name}_{self.variant}" if self.variant else name

    def without_variant(self) -> Recipe:
        """The recipe this one changes: a CT variant still starts from the recipe's MR network."""
        return Recipe(self.sampling, self.seed)


def train(fold: Path, step: str, recipe: Recipe, threads: int, device: str = "cpu",
          checkpoint_minutes: float | None = None) -> None:
    """Train the fold's network of ``step`` unless finished (resuming from a checkpoint); a CT network
    starts from the MR network of the recipe's seed, without its variant."""
    task, name = MODALITIES[step]
    out = fold / recipe.folder(step)
    if not (out / "model" / "model.json").exists():
        command = [sys.executable, "-m", "MultiTaskSegLib.cli", "train", "--tasks", task,
                   "--data", f"{task}={fold / 'train' / task}", "--out", str(out), "--name", name, *RECIPE,
                   "--arg", f"steps_per_epoch={recipe.mini_batches}", "--steps", str(recipe.mini_batches),
                   "--device", device, "--sampling", recipe.sampling, "--seed", str(recipe.seed)]
        for argument in recipe.train_arguments:
            command += ["--arg", argument]
        if recipe.working_spacing_mm:
            command += ["--working-spacing", f"{task}={recipe.working_spacing_mm}"]
        if step == "ct_from_mr":
            command += ["--init-from", str(fold / recipe.without_variant().folder("mr") / "model")]
        if checkpoint_minutes is not None:
            command += ["--checkpoint-minutes", str(checkpoint_minutes)]
        run(command, threads)


def assemble(fold: Path, step: str, sampling: str, seeds: list[int]) -> Recipe:
    """The ensemble of the seeds' networks (``multitaskseg ensemble``), as a recipe to evaluate."""
    ensemble = Recipe(sampling, "ensemble" + "-".join(str(seed) for seed in seeds))
    out = fold / ensemble.folder(step) / "model"
    if not (out / "model.json").exists():
        run([sys.executable, "-m", "MultiTaskSegLib.cli", "ensemble", "--models",
             *(str(fold / Recipe(sampling, seed).folder(step) / "model") for seed in seeds),
             "--out", str(out), "--name", MODALITIES[step][1]], 1)
    return ensemble


def evaluate(fold: Path, step: str, recipe: Recipe, mirror: str, record: Path, threads: int, device: str = "cpu") -> None:
    """Judge the fold's network on its held-out patients; the per-patient table is also copied to
    ``record`` (a folder in the repository), as the run folders do not outlive the machine."""
    task = MODALITIES[step][0]
    out = fold / recipe.folder(step) / f"evaluation_{mirror}"
    if not (out / "per_case.csv").exists():
        run([sys.executable, str(Path(__file__).with_name("evaluate_tumour.py")), "--model", str(out.parent / "model"),
            "--cases", str(fold / "held_out" / task), "--task", task, "--out", str(out), "--refresh-tasks",
            "--save-probabilities", f"--{mirror}", "--device", device], threads)
    record.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "per_case.csv", record / f"{fold.name}_{out.parent.name}_{out.name}.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("runs/tumour"), help="written by prepare_tumour_data.py")
    parser.add_argument("--folds", nargs="*", type=int, default=[1, 2, 3],
                        help="none with --final: only the final networks (e.g. trained beside the folds' on a GPU)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sampling", choices=SAMPLING_CHOICES, default=SAMPLING_CHOICES[0], help="train --sampling")
    parser.add_argument("--steps", nargs="+", choices=tuple(MODALITIES), default=list(MODALITIES),
                        help="which networks: the MR one, the CT one (started from the fold's MR network), or both")
    parser.add_argument("--seed", type=int, default=0, help="train --seed; other than 0 the folders end in _seedN")
    parser.add_argument("--ensemble", nargs="+", type=int, metavar="SEED",
                        help="then assemble each fold's networks of these seeds (trained before) and evaluate the ensemble")
    parser.add_argument("--variant", default="", help="a name for changed trainer arguments (--train-arg): "
                        "the run folders end in _NAME; one step at a time")
    parser.add_argument("--train-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="with --variant: one more train --arg (repeatable)")
    parser.add_argument("--mini-batches", type=int, default=RECIPE_MINI_BATCHES,
                        help="train --steps (one cosine cycle); another count than the recipe's is a --variant "
                             "(e.g. longer training on a GPU)")
    parser.add_argument("--working-spacing", type=float, metavar="MM",
                        help="with --variant: train --working-spacing for the step's task (its task file's otherwise)")
    parser.add_argument("--device", default="cpu", help="train and evaluate on this device (cpu, cuda)")
    parser.add_argument("--mirrored-evaluations", action=argparse.BooleanOptionalAction, default=True,
                        help="end with every evaluation once more with test-time mirroring (informational: "
                             "within +-0.02 Dice of one pass per fold so far; study_tumour_postprocessing.py pairs them)")
    parser.add_argument("--record", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "results" / "sarcoma",
                        help="where each evaluation's per-patient table is copied, to commit (default: %(default)s)")
    parser.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                        help="judge each network on its fold's held-out patients; --no-evaluate only trains "
                             "(on a lent GPU, to judge here afterwards: the same command again evaluates)")
    parser.add_argument("--checkpoint-minutes", type=float, metavar="M",
                        help="train --checkpoint-minutes (10 otherwise): shorter on a lent GPU, whose call may be cut")
    parser.add_argument("--final", action="store_true",
                        help="then train the same networks on every patient (ROOT/all/train): the models to bundle")
    args = parser.parse_args()
    changed = bool(args.train_arg) or args.mini_batches != RECIPE_MINI_BATCHES or args.working_spacing is not None
    if bool(args.variant) != changed:
        parser.error("--variant NAME goes with --train-arg KEY=VALUE, --mini-batches N or --working-spacing MM: "
                     "name what the variant changes")
    if args.mini_batches < 1:
        parser.error(f"--mini-batches {args.mini_batches}: give a positive count")
    if args.variant and (len(args.steps) != 1 or args.ensemble):
        parser.error("a --variant trains one step (--steps mr or --steps ct_from_mr) and no --ensemble: "
                     "a CT variant starts from the recipe's MR network, so an MR variant would not feed it")
    if args.variant and not re.fullmatch(r"[A-Za-z0-9._-]+", args.variant):
        parser.error(f"--variant {args.variant!r}: use letters, digits, '.', '-' or '_' (it names folders)")
    if not args.folds and not args.final:
        parser.error("--folds names no fold: give fold numbers, or --final to train only the final networks")
    folds = [(args.root / f"fold{number}").resolve() for number in args.folds]
    for fold in folds:
        if not (fold / "fold.json").exists():
            parser.error(f"{fold} is not a fold; run scripts/prepare_tumour_data.py first")
    recipe = Recipe(args.sampling, args.seed, args.variant, tuple(args.train_arg), args.mini_batches, args.working_spacing)
    for fold in folds:
        for step in args.steps:
            train(fold, step, recipe, args.threads, args.device, args.checkpoint_minutes)
            if not args.evaluate:
                continue
            evaluate(fold, step, recipe, "no-mirror", args.record, args.threads, args.device)
            if args.ensemble:
                ensemble = assemble(fold, step, args.sampling, args.ensemble)
                evaluate(fold, step, ensemble, "no-mirror", args.record, args.threads)
    if args.final:
        for step in args.steps:
            train((args.root / "all").resolve(), step, recipe, args.threads, args.device, args.checkpoint_minutes)
    for fold in folds if args.mirrored_evaluations and args.evaluate else []:
        for step in args.steps:
            evaluate(fold, step, recipe, "mirror", args.record, args.threads, args.device)
    print("finished", flush=True)


if __name__ == "__main__":
    main()
