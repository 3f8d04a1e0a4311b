"""The learning curve of a run: training loss per step, validation Dice per task and class.

Stored as two CSV files in the run folder (appended as training goes, trimmed on resume) and
drawn as one PNG with a panel per task, like Figure 2 of Moeskops et al.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

LOSS_FILE = "loss.csv"
CURVE_FILE = "learning_curve.csv"
CURVE_PICTURE = "learning_curve.png"
CURVE_FIELDS = ["step", "task", "class", "case", "dice"]


class LearningCurve:
    def __init__(self, run: Path):
        self.run = Path(run)

    def _append(self, name: str, fields: list[str], rows: list[dict]) -> None:
        path = self.run / name
        new = not path.exists()
        with open(path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def add_loss(self, step: int, loss: float, parts: dict[str, float]) -> None:
        row = {"step": step, "loss": f"{loss:.6f}", "parts": ";".join(f"{k}={v:.5f}" for k, v in parts.items())}
        self._append(LOSS_FILE, ["step", "loss", "parts"], [row])

    def add_validation(self, step: int, rows: list[dict]) -> None:
        self._append(CURVE_FILE, CURVE_FIELDS, [{"step": step, **row, "dice": f"{row['dice']:.5f}"} for row in rows])

    def rows(self) -> list[dict]:
        path = self.run / CURVE_FILE
        if not path.exists():
            return []
        with open(path, newline="", encoding="utf-8") as handle:
            return [{**row, "step": int(row["step"]), "dice": float(row["dice"])} for row in csv.DictReader(handle)]

    def drop_after(self, step: int) -> None:
        """Forget what an interrupted run logged after its last checkpoint."""
        for name in (LOSS_FILE, CURVE_FILE):
            path = self.run / name
            if not path.exists():
                continue
            with open(path, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                fields, kept = reader.fieldnames or [], [row for row in reader if int(row["step"]) <= step]
            with open(path, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=fields)
                writer.writeheader()
                writer.writerows(kept)

    def mean_dice(self) -> dict[int, dict[tuple[str, str], float]]:
        """step -> (task, class) -> mean Dice over validation cases."""
        grouped: dict[int, dict[tuple[str, str], list[float]]] = defaultdict(lambda: defaultdict(list))
        for row in self.rows():
            grouped[row["step"]][(row["task"], row["class"])].append(row["dice"])
        return {step: {key: float(np.mean(values)) for key, values in by_class.items()} for step, by_class in grouped.items()}

    def summary(self, step: int) -> str:
        latest = self.mean_dice().get(step, {})
        return " ".join(f"{cls}={dice:.3f}" for (_, cls), dice in latest.items())

    def final_dice(self) -> dict[str, dict[str, float]]:
        curves = self.mean_dice()
        if not curves:
            return {}
        result: dict[str, dict[str, float]] = defaultdict(dict)
        for (task, cls), dice in curves[max(curves)].items():
            result[task][cls] = round(dice, 4)
        return dict(result)

    def plot(self, path: Path | None = None, title: str = "") -> Path:
        return plot_curves({title or self.run.name: self.mean_dice()}, path or self.run / CURVE_PICTURE)


def plot_curves(runs: dict[str, dict[int, dict[tuple[str, str], float]]], path: Path) -> Path:
    """One panel per (task, class), one line per run: the layout of the paper's Figure 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({key for curves in runs.values() for by_class in curves.values() for key in by_class})
    columns = min(3, max(1, len(panels)))
    rows = max(1, -(-len(panels) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for axis, (task, cls) in zip(axes.ravel(), panels):
        for label, curves in runs.items():
            steps = sorted(step for step, by_class in curves.items() if (task, cls) in by_class)
            axis.plot(steps, [curves[step][(task, cls)] for step in steps], marker=".", label=label)
        axis.set_title(f"{cls} ({task})", fontsize=9)
        axis.set_xlabel("mini-batches")
        axis.set_ylabel("Dice")
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
    for axis in axes.ravel()[len(panels):]:
        axis.axis("off")
    if panels:
        axes.ravel()[0].legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
