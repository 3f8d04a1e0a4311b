"""The ``multitaskseg`` command: phantoms, train, finetune, ensemble, segment, evaluate, experiments, batch, models, demo.

Each sub-command parses its arguments and calls one library function; heavy imports happen
inside the command so ``multitaskseg --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .errors import InputError
from .sampling import SAMPLING_CHOICES


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _arguments(pairs: Sequence[str]) -> dict:
    """``--arg layers=13 --arg channels=16`` -> {"layers": 13, "channels": 16}."""
    result = {}
    for pair in pairs:
        if "=" not in pair:
            raise InputError(f"--arg takes NAME=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        result[key.strip()] = _parse_value(value)
    return result


def _channel(text: str) -> int | None:
    """``--channel 2`` -> 2; ``--channel none`` -> None (an input holding a single volume)."""
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a channel number (0, 1, ...) or none, got {text!r}") from None


def command_tasks(args) -> int:
    from .tasks import list_tasks

    for task in list_tasks():
        print(f"{task.name:20s} {task.modality:3s} {task.anatomy:10s} {', '.join(task.class_names)}")
    return 0


def command_phantoms(args) -> int:
    from .phantoms import PHANTOM_TASKS, write_phantoms

    folders = write_phantoms(Path(args.out), cases=args.cases, seed=args.seed, size=args.size,
                             tasks=args.tasks or PHANTOM_TASKS, overwrite=args.overwrite)
    print(f"wrote {len(folders)} phantom cases under {args.out}")
    return 0


def command_train(args) -> int:
    from .datasets import parse_data_arguments
    from .distributed import is_main_process
    from .tasks import parse_working_spacings
    from .training import TrainingConfig, train

    if args.checkpoint_minutes < 0:
        raise InputError(f"--checkpoint-minutes {args.checkpoint_minutes} is negative; give minutes between "
                         "checkpoints, or 0 to checkpoint only at validations")
    data = {task: str(folder) for task, folder in parse_data_arguments(args.data, args.tasks).items()}
    config = TrainingConfig(
        tasks=list(args.tasks), architecture=args.arch, arguments=_arguments(args.arg), batch_size=args.batch_size,
        steps=args.steps, learning_rate=args.learning_rate, validate_every=args.validate_every,
        validation_fraction=args.validation_fraction, seed=args.seed, device=args.device,
        model_name=args.name or Path(args.out).name, data=data, init_from=args.init_from, sampling=args.sampling,
        working_spacing_mm=parse_working_spacings(args.working_spacing),
    )
    model = train(config, args.out, checkpoint_minutes=args.checkpoint_minutes or None)
    if is_main_process():  # under torchrun, process 0 wrote the model
        print(f"model written to {Path(args.out) / 'model'} (weights SHA-256 {model.weights_sha256[:16]}…)")
    return 0


def command_finetune(args) -> int:
    from .datasets import parse_data_arguments, task_folder_pair
    from .finetuning import finetune
    from .model_files import load_model

    parent = load_model(args.model)
    names = [pair[0] for pair in map(task_folder_pair, args.data) if pair] or [
        task for task in parent.label_space.task_names if any((Path(root) / task).is_dir() for root in args.data)]
    if not names:
        raise InputError(f"no cases of the model's tasks ({', '.join(parent.label_space.task_names)}) under "
                         f"{', '.join(args.data)}: give TASK=FOLDER")
    data = {task: str(folder) for task, folder in parse_data_arguments(args.data, names).items()}
    model = finetune(parent, data, args.out, steps=args.steps, learning_rate=args.learning_rate,
                     batch_size=args.batch_size, seed=args.seed, device=args.device, name=args.name)
    print(f"model written to {Path(args.out) / 'model'} (fine-tuned from {parent.name} {parent.version}, "
          f"kept step {model.provenance.get('kept_step', args.steps)})")
    return 0


def command_ensemble(args) -> int:
    from .ensembles import assemble_ensemble
    from .model_files import save_model

    out = Path(args.out)
    if out.exists():
        raise InputError(f"{out} exists; give a new folder or .zip for the ensemble (nothing is overwritten)")
    model = assemble_ensemble(args.models, name=args.name)
    save_model(model, out)
    points = model.card.get("operating_points", {})
    print(f"ensemble of {len(args.models)} {model.architecture.config.member_architecture} networks written to {out}"
          + (f" (operating points, the members' mean: {points})" if points else ""))
    return 0


class _ProgressLine:
    """``NN.N% stage`` redrawn in place on standard error; :meth:`end` closes the line, so what follows
    (a warning, an error, a traceback) starts on a line of its own rather than after the bar."""

    def __init__(self) -> None:
        self.open = False

    def __call__(self, fraction: float, stage: str) -> None:
        print(f"\r{100 * fraction:5.1f}% {stage:40s}", end="", file=sys.stderr, flush=True)
        self.open = True

    def end(self) -> None:
        if self.open:
            print(file=sys.stderr, flush=True)
            self.open = False


def command_segment(args) -> int:
    from .imageio import read_images
    from .inference import segment_image
    from .model_files import load_model
    from .segments import check_outputs, write_result

    check_outputs(args.input, args.output, args.probabilities, overwrite=args.overwrite)
    model = load_model(args.model)
    images = read_images(args.input, args.channel or ())
    progress = _ProgressLine()
    try:
        result = segment_image(model, images, tasks=args.tasks, device=args.device,
                               with_probabilities=args.probabilities is not None, progress=progress,
                               mirror=args.mirror)
    finally:
        progress.end()
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    write_result(result, args.output, args.probabilities)
    print(f"wrote {args.output} ({', '.join(result.tasks)} on {result.device})")
    return 0


def command_batch(args) -> int:
    from .batch import run_batch, summary_line

    summary = run_batch(args.model, args.input, args.output, tasks=args.tasks, output_format=args.format,
                        reference_dir=args.reference_dir, shard=args.shard, device=args.device,
                        channels=args.channel or ())
    print(summary_line(summary, Path(args.output)))
    return summary.exit_code


def command_models(args) -> int:
    """One line per model; a broken model is reported on its own line and the others still listed."""
    from .model_catalog import bundled_models, read_model_card

    models = bundled_models()
    if not models:
        print("no bundled models found", file=sys.stderr)
    broken = 0
    for name, path in models.items():
        try:
            card = read_model_card(path)
            tasks = ",".join(task["name"] for task in card["tasks"])
            architecture = card["architecture"]["name"]
        except Exception as error:  # a malformed model.json must not hide the other models
            broken += 1
            print(f"{name}\tunreadable: {error}\t{path}", file=sys.stderr)
            continue
        print(f"{name}\tarchitecture={architecture}\ttasks={tasks}\tversion={card.get('version')}\t{path}")
    return 2 if broken else 0


def command_evaluate(args) -> int:
    from .evaluate_run import evaluate_model

    evaluate_model(args.model, args.data, Path(args.out), tasks=args.tasks, device=args.device)
    return 0


def command_experiments(args) -> int:
    from .experiments import run_paper_experiments

    run_paper_experiments(Path(args.data), Path(args.out), architecture=args.arch, arguments=_arguments(args.arg),
                          steps=args.steps, batch_size=args.batch_size, validate_every=args.validate_every,
                          seed=args.seed, device=args.device, validation_fraction=args.validation_fraction,
                          experiments=tuple(args.only))
    return 0


def command_demo(args) -> int:
    from .demo import run_demo

    return run_demo(Path(args.out), device=args.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multitaskseg", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    sub = commands.add_parser("tasks", help="list the registered tasks")
    sub.set_defaults(run=command_tasks)

    sub = commands.add_parser("phantoms", help="write phantom cases (image + label) for the paper's tasks")
    sub.add_argument("--out", required=True)
    sub.add_argument("--cases", type=int, default=3)
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--size", choices=("small", "full"), default="small")
    sub.add_argument("--tasks", nargs="+")
    sub.add_argument("--overwrite", action="store_true", help="replace case files already in --out")
    sub.set_defaults(run=command_phantoms)

    sub = commands.add_parser("models", help="list the bundled models")
    sub.set_defaults(run=command_models)

    sub = commands.add_parser("demo", help="segment held-out phantoms with the bundled models")
    sub.add_argument("--out", default="demo_output")
    sub.add_argument("--device", default="auto")
    sub.set_defaults(run=command_demo)

    _add_training_commands(commands)
    _add_segmenting_commands(commands)
    return parser


def _add_training_commands(commands) -> None:
    """train, finetune, ensemble, experiments."""
    sub = commands.add_parser("train", help="train one model on one or more tasks (resumes an interrupted run)")
    sub.add_argument("--tasks", nargs="+", required=True)
    sub.add_argument("--data", nargs="+", action="extend", required=True, help="ROOT holding ROOT/TASK/CASE/..., or TASK=FOLDER pairs")
    sub.add_argument("--out", required=True, help="run folder: checkpoint, learning curve, final model")
    sub.add_argument("--arch", default="triplanar")
    sub.add_argument("--arg", action="append", default=[], help="architecture argument NAME=VALUE (repeatable)")
    sub.add_argument("--steps", type=int, default=25000)
    sub.add_argument("--batch-size", type=int, default=210)
    sub.add_argument("--learning-rate", type=float)
    sub.add_argument("--validate-every", type=int, default=1000)
    sub.add_argument("--validation-fraction", type=float, default=0.2)
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--device", default="auto")
    sub.add_argument("--name", help="model name (default: the run folder's name)")
    sub.add_argument("--init-from", metavar="MODEL",
                     help="start from this model's weights where names and shapes agree (same architecture)")
    sub.add_argument("--sampling", choices=SAMPLING_CHOICES, default=SAMPLING_CHOICES[0],
                     help="spread each class's samples over the cases in proportion to its volume (voxels, "
                          "Moeskops et al.) or evenly over the cases (cases, nnU-Net: small tumours seen as often)")
    sub.add_argument("--working-spacing", action="append", default=[], metavar="TASK=MM",
                     help="resample TASK's cases to MM instead of its task file's working spacing (repeatable); "
                          "the model stores it and segments at it")
    sub.add_argument("--checkpoint-minutes", type=float, default=10.0, metavar="M",
                     help="also checkpoint every M minutes between validations, so an interrupted run loses "
                          "at most M minutes (default 10; 0: only at validations); the result is the same")
    sub.set_defaults(run=command_train)

    sub = commands.add_parser("finetune", help="fine-tune a model on corrected cases (its own label space; resumable)")
    sub.add_argument("--model", required=True, help="the model to start from (it is not changed)")
    sub.add_argument("--data", nargs="+", action="extend", required=True, help="TASK=FOLDER pairs (or ROOT/TASK/CASE) of corrected cases")
    sub.add_argument("--out", required=True, help="run folder; the new model is OUT/model")
    sub.add_argument("--steps", type=int, default=200)
    sub.add_argument("--batch-size", type=int, default=8)
    sub.add_argument("--learning-rate", type=float, help="default: a tenth of the parent's")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--device", default="auto")
    sub.add_argument("--name", help="the new model's name (default: PARENT-finetuned)")
    sub.set_defaults(run=command_finetune)

    sub = commands.add_parser("ensemble", help="one model averaging the probabilities of trained models of one recipe")
    sub.add_argument("--models", nargs="+", required=True, help="two or more trained models (same tasks, architecture, arguments)")
    sub.add_argument("--out", required=True, help="a new model folder or .zip")
    sub.add_argument("--name", help="the ensemble's name (default: the first model's)")
    sub.set_defaults(run=command_ensemble)

    sub = commands.add_parser("experiments", help="the paper's seven training experiments, figure and table")
    sub.add_argument("--data", required=True, help="root with one folder per paper task (see `phantoms`)")
    sub.add_argument("--out", required=True)
    sub.add_argument("--arch", default="triplanar")
    sub.add_argument("--arg", action="append", default=[])
    sub.add_argument("--steps", type=int, default=2000)
    sub.add_argument("--batch-size", type=int, default=210)
    sub.add_argument("--validate-every", type=int, default=250)
    sub.add_argument("--validation-fraction", type=float, default=0.2,
                     help="share of each task's cases held out to draw the learning curves")
    sub.add_argument("--only", nargs="+", choices=list("1234567"), default=list("1234567"),
                     help="run these experiments (numbers 1-7); finished ones are reused, so separate "
                          "processes can share the seven and a last call without --only draws them all")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--device", default="auto")
    sub.set_defaults(run=command_experiments)


def _add_segmenting_commands(commands) -> None:
    """segment, batch, evaluate."""
    sub = commands.add_parser("segment", help="segment one volume; the labels come back on its exact grid")
    sub.add_argument("--model", required=True, help="model folder/.zip or a bundled model's name")
    sub.add_argument("--input", required=True, action="append",
                     help="NIfTI, NRRD, MHA file or DICOM series folder; once per channel for a multi-channel "
                          "task, in the task's order (e.g. --input t1c.nii.gz --input flair.nii.gz)")
    sub.add_argument("--output", required=True, help=".seg.nrrd (names, colours) or .nii.gz label map")
    sub.add_argument("--tasks", nargs="+")
    sub.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    sub.add_argument("--probabilities", help="also write per-class probabilities (vector image) here")
    sub.add_argument("--channel", type=_channel, action="append", metavar="N",
                     help="the channel (0, 1, ...) to use from a 4-D or multi-component input: once for every "
                          "--input, or once per --input in the same order, none for a file holding a single volume "
                          "(e.g. --input t1c_flair.nii.gz --channel 0 --input flair.nii.gz --channel none)")
    sub.add_argument("--mirror", action=argparse.BooleanOptionalAction,
                     help="average with the prediction of the left-right mirrored scan (twice the time); "
                          "default: as the model card says")
    sub.add_argument("--overwrite", action="store_true",
                     help="replace an existing --output or --probabilities file (never the input scan)")
    sub.set_defaults(run=command_segment)

    sub = commands.add_parser("batch", help="segment many scans: resumable, shardable over machines, with metrics")
    sub.add_argument("--model", required=True, help="model folder/.zip or a bundled model's name")
    sub.add_argument("--input", required=True,
                     help="folder of scans, glob pattern (quoted) or CSV with columns image[,reference][,case]")
    sub.add_argument("--output", required=True, help="folder for <case>.seg.nrrd|.nii.gz, metrics and summary")
    sub.add_argument("--tasks", nargs="+")
    sub.add_argument("--format", default="seg.nrrd", choices=("seg.nrrd", "nii.gz"))
    sub.add_argument("--reference-dir", help="reference label maps named after the cases: adds metrics.csv")
    sub.add_argument("--shard", help="i/N: this machine's share, i from 0 to N-1 (e.g. $SLURM_ARRAY_TASK_ID/N)")
    sub.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    sub.add_argument("--channel", type=_channel, action="append", metavar="N",
                     help="the channel (0, 1, ...) to use from 4-D or multi-component inputs: once for every file, "
                          "or once per channel of the task in its order (the image column, then the further "
                          "channels' columns), none for a file holding a single volume")
    sub.set_defaults(run=command_batch)

    sub = commands.add_parser("evaluate", help="Dice, HD95, precision-recall and task confusion on labelled cases")
    sub.add_argument("--model", required=True)
    sub.add_argument("--data", nargs="+", required=True)
    sub.add_argument("--out", required=True)
    sub.add_argument("--tasks", nargs="+")
    sub.add_argument("--device", default="auto")
    sub.set_defaults(run=command_evaluate)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except InputError as error:
        print(f"multitaskseg {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a read-only folder, a vanished network share
        where = f" ({error.filename})" if error.filename else ""
        print(f"multitaskseg {args.command}: error: {error.strerror or error}{where}; check that the folder exists, "
              "is writable and has free space (finished files are kept)", file=sys.stderr)
        return 2
    except MemoryError:  # numpy's allocation failures; the checks before reading and segmenting estimate, not promise
        print(f"multitaskseg {args.command}: error: ran out of memory; crop the image to the region to segment, "
              "close other programs, or use a machine with more memory (finished files are kept)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nmultitaskseg {args.command}: interrupted; finished files are kept, nothing half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
