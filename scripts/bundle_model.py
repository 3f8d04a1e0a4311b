"""Copy a trained model into Resources/Models under the name the demo, tests and Slicer use.

    .venv/bin/python scripts/bundle_model.py runs/experiments/experiment7/model triplanar-phantoms

The weights are unchanged (same SHA-256); the model's name in ``model.json`` is set and, for a
model whose card lacks them (trained before the trainer chose them), the binary tasks' operating
points are chosen on the run's validation cases and the training volume ranges (for the
implausible-result warning) are measured on its training cases, as the trainer now does at the end
of a run. ``--card FILE.json`` merges more card fields (intended input, cross-validated results).
``--refresh-tasks`` takes the tasks' settings that do not change what the network learnt (e.g.
``check_volumes``) from the current task definitions; classes, label values, channels, spacing
and normalisation must be those the model was trained with. ``--ensemble-with RUN2/model ...``
bundles the mean of the models' probabilities (``multitaskseg ensemble``); the first model's run
gives the training volume ranges, the operating points are the members' mean.
``--working-spacing TASK=MM`` makes the bundled model segment TASK on another grid than it trained
on (a finer one where that was measured to find small structures better: ``evaluate_tumour.py
--working-spacing`` on the recipe's fold networks first); ``--rechoose-operating-points`` then chooses
the operating points again on the run's validation cases on that grid.
"""

import argparse
import json
from dataclasses import replace
from pathlib import Path

from MultiTaskSegLib.datasets import prepare_case
from MultiTaskSegLib.ensembles import assemble_ensemble
from MultiTaskSegLib.inference import choose_device
from MultiTaskSegLib.model_catalog import BUNDLED_MODEL_DIR
from MultiTaskSegLib.model_files import load_model, save_model
from MultiTaskSegLib.plausibility import CARD_KEY, training_volume_ranges
from MultiTaskSegLib.tasks import LabelSpace, get_task, parse_working_spacings
from MultiTaskSegLib.training import TrainingConfig, collect_cases, operating_points_on_working_grid, validation_dice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a trained model folder, RUN/model, beside RUN/config.json")
    parser.add_argument("name", help="the bundled model's name")
    parser.add_argument("--card", type=Path, help="JSON file of card fields to add or replace")
    parser.add_argument("--refresh-tasks", action="store_true", help="take check_volumes etc. from the task files")
    parser.add_argument("--version", help="the bundled model's version (default: the trained model's)")
    parser.add_argument("--working-spacing", nargs="+", default=[], metavar="TASK=MM",
                        help="segment TASK on this working grid instead of the one it trained on (e.g. finer, "
                             "measured first with evaluate_tumour.py --working-spacing); the training grid stays in "
                             "the provenance")
    parser.add_argument("--rechoose-operating-points", action="store_true",
                        help="choose the operating points again on the run's validation cases, on the grids the model "
                             "segments on (with --working-spacing: a point chosen on the training grid does not carry over)")
    parser.add_argument("--ensemble-with", nargs="+", type=Path, default=[], metavar="MODEL",
                        help="more trained models of the same recipe: bundle the ensemble of all")
    args = parser.parse_args()
    model = load_model(args.model)
    if args.ensemble_with:
        model = assemble_ensemble([model, *args.ensemble_with])
    if args.refresh_tasks:
        model.label_space = refreshed(model.label_space)
    model.label_space = model.label_space.with_working_spacing(parse_working_spacings(args.working_spacing))
    before = model.weights_sha256  # empty for an ensemble assembled here: its file is new
    config = TrainingConfig(**json.loads((args.model.parent / "config.json").read_text(encoding="utf-8")))
    training, validation = collect_cases(config)
    if CARD_KEY not in model.card:
        prepared = (prepare_case(files, model.label_space) for files in training)
        model.card[CARD_KEY] = training_volume_ranges(prepared, model.label_space)
    if args.card:
        model.card.update(json.loads(args.card.read_text(encoding="utf-8")))
    if args.rechoose_operating_points:
        model.card["operating_points"] = operating_points_on_working_grid(model, config, choose_device("cpu"))
    elif "operating_points" not in model.card:
        cases = [prepare_case(files, model.label_space) for files in validation]
        model.card["operating_points"] = validation_dice(model, cases, choose_device("cpu"))[1]
    model.name = args.name
    model.version = args.version or model.version
    path = save_model(model, BUNDLED_MODEL_DIR / args.name)
    assert model.weights_sha256 == before or not before, "bundling must not change the weights"
    print(f"bundled {args.model} as {path} (weights SHA-256 {model.weights_sha256[:16]}…, "
          f"operating points {model.card['operating_points']})")


def refreshed(label_space: LabelSpace) -> LabelSpace:
    """The label space with each task's current definition, which must agree on what the network learnt;
    the working spacing stays the model's (a run may have chosen its own: ``train --working-spacing``)."""
    tasks = []
    for stored in label_space.tasks:
        current = get_task(stored.name)
        learnt = ("classes", "label_values", "channels", "normalization", "normalization_parameters")
        changed = [field for field in learnt if getattr(current, field) != getattr(stored, field)]
        if changed:
            raise SystemExit(f"task {stored.name} changed in what the model learnt ({', '.join(changed)}); retrain instead")
        tasks.append(replace(current, working_spacing_mm=stored.working_spacing_mm))
    return LabelSpace(tuple(tasks))


if __name__ == "__main__":
    main()
