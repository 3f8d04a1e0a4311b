"""The model card as the module shows it: what the model segments, in which images, how well."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg")


def validation_figures(model_path: str | Path | None) -> list[Path]:
    """Pictures stored beside the model (learning curves, Dice tables); none for a .zip model."""
    if model_path is None or not Path(model_path).is_dir():
        return []
    return sorted(p for p in Path(model_path).iterdir() if p.suffix.lower() in FIGURE_SUFFIXES)


def task_names(card: dict[str, Any]) -> list[str]:
    return [task["name"] for task in card.get("tasks", [])]


def further_channels(card: dict[str, Any]) -> list[str]:
    """The channels a model reads after the input volume (e.g. ``["FLAIR"]`` after contrast T1):
    the module shows one volume selector for each. A model's tasks all read the same channels."""
    tasks = card.get("tasks", [])
    return [str(name) for name in tasks[0].get("channels", [])[1:]] if tasks else []


def _task_item(task: dict[str, Any], intended: dict[str, Any], dice: dict[str, Any]) -> str:
    classes = ", ".join(escape(c["name"]) for c in task.get("classes", []))
    item = (f"<li><b>{escape(task.get('title', task['name']))}</b> ({escape(task['name'])}): "
            f"{escape(task.get('modality', '?'))}, {escape(task.get('anatomy', ''))}; classes: {classes}")
    if len(task.get("channels", [])) > 1:
        item += f"<br>Reads {escape(' + '.join(map(str, task['channels'])))} (one volume each, in that order)"
    if task["name"] in intended:
        item += f"<br>Intended input: {escape(str(intended[task['name']]))}"
    elif task.get("working_spacing_mm"):
        item += f"<br>Working spacing: {task['working_spacing_mm']} mm"
    if task["name"] in dice:
        scores = ", ".join(f"{escape(name)} {value:.2f}" for name, value in dice[task["name"]].items())
        item += f"<br>Validation Dice: {scores}"
    return item + "</li>"


def architecture_text(architecture: dict[str, Any]) -> str:
    """The architecture's name; an ensemble's with its members' (``ensemble of 2 unet2d_multiplanar``)."""
    name = str(architecture.get("name", "?"))
    arguments = architecture.get("arguments", {})
    if name == "ensemble" and isinstance(arguments, dict):
        return f"ensemble of {arguments.get('members', '?')} {arguments.get('member_architecture', '?')}"
    return name


def model_card_html(card: dict[str, Any], model_path: str | Path | None = None) -> str:
    """HTML for a QTextBrowser: name, version, architecture, description, then per task its modality,
    classes, intended input and validation Dice, and links to the validation figures."""
    details = card.get("card", {})
    header = [
        f"<b>{escape(str(card.get('name', '?')))}</b> version {escape(str(card.get('version', '?')))}",
        f"Architecture: {escape(architecture_text(card.get('architecture', {})))}",
    ]
    if details.get("description"):
        header.append(escape(str(details["description"])))
    items = [_task_item(task, details.get("intended_input", {}), details.get("validation_dice", {}))
             for task in card.get("tasks", [])]
    html = "<br>".join(header) + "<ul>" + "".join(items) + "</ul>"
    figures = validation_figures(model_path)
    if figures:
        html += "Validation figures: " + ", ".join(f'<a href="{p.as_uri()}">{escape(p.name)}</a>' for p in figures)
    return html
