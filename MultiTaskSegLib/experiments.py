"""The seven training experiments of Moeskops et al.: each task alone, each pair, all three.

Every experiment trains the same architecture for the same number of mini-batches *per task*
(the paper's budget: a network with three tasks gets three times the mini-batches, each balanced
over its tasks), then the runner draws one figure like the paper's Figure 2 (a panel per class,
a line per experiment) and writes a results table with the final Dice per class and the task
confusion of every multi-task network.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import prepare_case
from .learning_curve import LearningCurve, plot_curves
from .tasks import PAPER_TASKS
from .training import TrainingConfig, collect_cases, train
from .inference import choose_device, label_decision
from .preprocessing import background_outside
from .evaluation import task_confusion

#: The row of a multi-class task's mean Dice over its classes.
TASK_MEAN = "mean over classes"
#: The table reports the mean Dice of the last validations: a single validation of a short run is noisy.
LAST_VALIDATIONS = 3

EXPERIMENTS = {
    "1": ("brain_t1_mri",),
    "2": ("breast_mri",),
    "3": ("cardiac_cta",),
    "4": ("brain_t1_mri", "breast_mri"),
    "5": ("brain_t1_mri", "cardiac_cta"),
    "6": ("breast_mri", "cardiac_cta"),
    "7": PAPER_TASKS,
}


def experiment_label(number: str) -> str:
    short = {"brain_t1_mri": "brain", "breast_mri": "breast", "cardiac_cta": "cardiac"}
    return f"{number}: " + "+".join(short[t] for t in EXPERIMENTS[number])


def confusion_on_validation(model, config: TrainingConfig, device) -> dict[str, dict[str, float]]:
    """Median share (%) of voxels per validation scan given a class of another task, per task.

    Two decisions over all the model's classes: ``labels`` as the tool assigns them when no task
    is chosen (arg-max, a binary task's class only above its operating point, as Moeskops et al.
    threshold the breast and cardiac outputs) and the plain ``argmax`` of the softmax.
    """
    space = model.label_space
    _, validation = collect_cases(config)
    model.architecture.network.eval()
    shares: dict[str, dict[str, list[float]]] = {task: {"labels": [], "argmax": []} for task in config.tasks}
    every_class = np.arange(len(space))
    for files in validation:
        case = prepare_case(files, space)
        probabilities = background_outside(model.architecture.predict_probabilities(case.image, device), case.foreground)
        alien = [i for i in range(1, len(space)) if i not in space.indices_for_task(case.task)]
        shares[case.task]["labels"].append(task_confusion(label_decision(probabilities, every_class, model), alien))
        shares[case.task]["argmax"].append(task_confusion(np.argmax(probabilities, axis=0), alien))
    return {task: {decision: float(np.median(values)) for decision, values in by_decision.items()}
            for task, by_decision in shares.items() if by_decision["labels"]}


def run_paper_experiments(data: Path, out: Path, architecture: str = "triplanar", arguments: dict[str, Any] | None = None,
                          steps: int = 2000, batch_size: int = 210, validate_every: int = 250, seed: int = 0,
                          device: str = "auto", experiments: tuple[str, ...] = tuple(EXPERIMENTS),
                          validation_fraction: float = 0.2) -> list[dict]:
    """Train the experiments (resuming finished or interrupted ones), then draw and tabulate them.

    ``steps`` and ``validate_every`` count mini-batches per task.
    """
    out.mkdir(parents=True, exist_ok=True)
    curves, rows = {}, []
    for number in experiments:
        tasks = EXPERIMENTS[number]
        config = TrainingConfig(
            tasks=list(tasks), architecture=architecture, arguments=dict(arguments or {}), batch_size=batch_size,
            steps=steps * len(tasks), validate_every=validate_every * len(tasks), seed=seed, device=device,
            validation_fraction=validation_fraction,
            model_name=f"experiment{number}", data={task: str(data / task) for task in tasks},
        )
        run = out / f"experiment{number}"
        print(f"experiment {experiment_label(number)}: {config.steps} mini-batches of {batch_size}")
        model = train(config, run)
        curve = LearningCurve(run)
        # Plot against mini-batches per task so experiments share one axis, as in the paper.
        curves[experiment_label(number)] = {step // len(tasks): values for step, values in curve.mean_dice().items()}
        confusion = confusion_on_validation(model, config, choose_device(device)) if len(tasks) > 1 else {}
        validations = curve.mean_dice()
        last = sorted(validations)[-LAST_VALIDATIONS:]
        for (task, cls), value in validations[last[-1]].items():
            shares = confusion.get(task, {})
            rows.append({"experiment": experiment_label(number), "task": task, "class": cls,
                         "dice": round(float(np.mean([validations[step][(task, cls)] for step in last])), 4),
                         "dice_final": round(value, 4),
                         "task_confusion_percent": round(shares["labels"], 6) if shares else "",
                         "task_confusion_argmax_percent": round(shares["argmax"], 6) if shares else ""})
    plot_curves(curves, out / "learning_curves.png")
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(results_markdown(rows), encoding="utf-8")
    print(results_markdown(rows))
    return rows


def results_markdown(rows: list[dict]) -> str:
    """Validation Dice per class (rows) and experiment (columns), plus multi-task minus single-task.

    Each cell is the mean over the last ``LAST_VALIDATIONS`` validations of the run; a task with
    several classes gets one more row, its mean over them.
    """
    experiments = list(dict.fromkeys(row["experiment"] for row in rows))
    value = {(row["experiment"], row["task"], row["class"]): row["dice"] for row in rows}
    classes = []
    for task in dict.fromkeys(row["task"] for row in rows):
        names = list(dict.fromkeys(row["class"] for row in rows if row["task"] == task))
        classes += [(task, name) for name in names]
        if len(names) > 1:  # a task's mean over its classes: the "per task" comparison
            for experiment in experiments:
                if all((experiment, task, name) in value for name in names):
                    value[(experiment, task, TASK_MEAN)] = float(np.mean([value[(experiment, task, n)] for n in names]))
            classes.append((task, TASK_MEAN))
    single = {task: experiment_label(n) for n, tasks in EXPERIMENTS.items() if len(tasks) == 1 for task in tasks}
    lines = ["| task | class | " + " | ".join(experiments) + " | all three − single |",
             "|---" * (len(experiments) + 3) + "|"]
    for task, cls in classes:
        cells = [f"{value[(e, task, cls)]:.3f}" if (e, task, cls) in value else "" for e in experiments]
        all_three = value.get((experiment_label("7"), task, cls))
        alone = value.get((single.get(task, ""), task, cls))
        difference = f"{all_three - alone:+.3f}" if all_three is not None and alone is not None else ""
        lines.append(f"| {task} | {cls} | " + " | ".join(cells) + f" | {difference} |")
    confusion = {(row["experiment"], row["task"]): (row["task_confusion_percent"], row.get("task_confusion_argmax_percent"))
                 for row in rows if row["task_confusion_percent"] != ""}
    if confusion:
        lines += ["", "| experiment | task | median task confusion (% voxels), tool's labels | same, plain arg-max |",
                  "|---|---|---|---|"]
        lines += [f"| {e} | {t} | {v:.5f} | " + (f"{a:.5f}" if a not in (None, "") else "") + " |"
                  for (e, t), (v, a) in confusion.items()]
    return "\n".join(lines) + "\n"
