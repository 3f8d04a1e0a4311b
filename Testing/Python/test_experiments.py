"""The paper's experiment runner: same budget per task, one figure, a table with the multi-task gap."""

import csv

from conftest import TINY_TRIPLANAR

from MultiTaskSegLib.experiments import experiment_label, results_markdown, run_paper_experiments


def test_runner_trains_each_experiment_with_the_same_budget_per_task(tmp_path, tiny_dataset):
    out = tmp_path / "experiments"
    rows = run_paper_experiments(tiny_dataset, out, arguments={**TINY_TRIPLANAR, "grid": 2}, steps=4,
                                 batch_size=12, validate_every=2, device="cpu", experiments=("2", "3", "6"))
    assert (out / "learning_curves.png").stat().st_size > 1000
    steps = {run: max(int(r["step"]) for r in csv.DictReader(open(out / run / "loss.csv")))
             for run in ("experiment2", "experiment3", "experiment6")}
    assert steps == {"experiment2": 4, "experiment3": 4, "experiment6": 8}  # two tasks: twice the mini-batches
    pair = [r for r in rows if r["experiment"] == experiment_label("6")]
    assert {r["task"] for r in pair} == {"breast_mri", "cardiac_cta"}
    assert all(isinstance(r["task_confusion_percent"], float) and isinstance(r["task_confusion_argmax_percent"], float)
               for r in pair)
    table = (out / "results.md").read_text()
    assert "| breast_mri | Pectoral muscle |" in table and "median task confusion" in table


def test_table_reports_all_three_minus_single_task():
    rows = [
        {"experiment": experiment_label("2"), "task": "breast_mri", "class": "Pectoral muscle", "dice": 0.80,
         "task_confusion_percent": ""},
        {"experiment": experiment_label("7"), "task": "breast_mri", "class": "Pectoral muscle", "dice": 0.79,
         "task_confusion_percent": 0.0001, "task_confusion_argmax_percent": 0.002},
    ]
    table = results_markdown(rows)
    assert "| breast_mri | Pectoral muscle | 0.800 | 0.790 | -0.010 |" in table
    assert "| 7: brain+breast+cardiac | breast_mri | 0.00010 | 0.00200 |" in table


def test_table_adds_the_mean_over_a_multi_class_tasks_classes():
    rows = [{"experiment": experiment_label(number), "task": "brain_t1_mri", "class": name, "dice": dice,
             "task_confusion_percent": ""}
            for number, values in (("1", (0.8, 0.6)), ("7", (0.9, 0.6)))
            for name, dice in zip(("White matter", "Brain stem"), values)]
    table = results_markdown(rows)
    assert "| brain_t1_mri | mean over classes | 0.700 | 0.750 | +0.050 |" in table
