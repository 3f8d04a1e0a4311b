"""What the module's widget decides, without Qt: what Apply, Cancel and Add to training cases do
with the chosen inputs, which tasks the task list shows and which of them are checked.

The widget shows and forwards; this class decides, on the parameter node (the one place the
choices live, saved with the scene) and a logic described by :class:`SegmentationLogic`, so it is
tested with a mock logic and no Slicer application (Testing/Python/test_module_controller.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from MultiTaskSegLib.errors import InputError

from .model_card import further_channels, task_names

try:  # Slicer's translation of the messages the user reads; slicer-core and plain Python have none
    from slicer.i18n import tr as _
except ImportError:
    def _(text: str) -> str:
        return text

#: How the parameter node holds the checked tasks (one string, so a scene stores it as it is).
TASK_SEPARATOR = ","

#: What :meth:`ModuleController.apply` did.
STARTED, DECLINED, CANCELLED = "started", "declined", "cancelled"


@runtime_checkable
class SegmentationLogic(Protocol):
    """What the widget needs from ``MultiTaskSegLogic``."""

    @property
    def running(self) -> bool: ...

    def modelCard(self, source: str) -> dict: ...

    def installDependencies(self, ask: bool = True) -> None: ...

    def inputWarnings(self, volumeNode, model: str, tasks) -> list: ...

    def start(self, volumeNode, model: str, tasks, device: str = "auto", segmentationNode=None,
              withUncertainty: bool = False, uncertaintyKind: str = "entropy", channelNodes=()) -> None: ...

    def cancel(self) -> None: ...

    def addTrainingCases(self, volumeNode, segmentationNode, model: str, tasks, folder: str, channelNodes=()) -> list: ...


class Parameters(Protocol):
    """The fields of ``MultiTaskSegParameterNode`` (the GUI state) that Apply reads."""

    inputVolume: Any
    model: str
    tasks: str
    device: str
    outputSegmentation: Any
    createUncertaintyVolume: bool
    uncertaintyKind: str


@dataclass(frozen=True)
class TaskList:
    """The task list as shown for ``model``: each of its tasks with its check mark, and the channels
    the model reads after the input volume (one volume selector each)."""

    model: str
    tasks: list[tuple[str, bool]]
    channels: list[str]


class ModuleController:
    """The widget's decisions on ``parameters`` (None while the scene closes) with ``logic``."""

    def __init__(self, logic: SegmentationLogic, parameters: Parameters | None = None) -> None:
        self.logic = logic
        self.parameters = parameters

    def card(self) -> dict:
        """The chosen model's card; {} when none is chosen or it cannot be read."""
        return self.logic.modelCard(self.parameters.model)

    # Tasks

    def select_model(self, source: str) -> None:
        """Choose a model. Another model starts with all its tasks checked; choosing the model that
        is already chosen keeps the user's check marks."""
        if source == self.parameters.model:
            return
        self.parameters.model = source
        self.parameters.tasks = TASK_SEPARATOR.join(task_names(self.logic.modelCard(source)))

    def check_tasks(self, names: Sequence[str]) -> None:
        """The user checked exactly ``names``."""
        self.parameters.tasks = TASK_SEPARATOR.join(names)

    def checked_tasks(self) -> list[str]:
        """The chosen model's tasks that are checked, in the model's order."""
        chosen = set(self.parameters.tasks.split(TASK_SEPARATOR))
        return [name for name in task_names(self.card()) if name in chosen]

    def task_list(self) -> TaskList:
        card = self.card()
        chosen = set(self.checked_tasks())
        return TaskList(self.parameters.model, [(name, name in chosen) for name in task_names(card)],
                        further_channels(card))

    # Apply and Cancel

    def missing_input(self, channel_nodes: Sequence = ()) -> str:
        """What must be chosen before Apply can start, or "" when nothing is missing."""
        parameters = self.parameters
        if not parameters.inputVolume:
            return _("No input volume: choose the volume to segment.")
        card = self.card()
        if not card:
            return _("No model: choose a model, add a model folder or install the bundled models.")
        if not self.checked_tasks():
            return _("No task checked: check at least one task of the model.")
        channels = further_channels(card)
        nodes = list(channel_nodes)
        unchosen = [channel for index, channel in enumerate(channels) if index >= len(nodes) or not nodes[index]]
        if unchosen:
            return _("No {channels} volume: this model reads it after the input volume; choose it.").format(
                channels=", ".join(unchosen))
        return ""

    def can_apply(self, channel_nodes: Sequence = ()) -> bool:
        """Whether the Apply button does something: cancel the running segmentation or start one."""
        return self.logic.running or not self.missing_input(channel_nodes)

    def apply(self, channel_nodes: Sequence = (), confirm_warnings: Callable[[list], bool] = lambda warnings: True) -> str:
        """The Apply button: cancels the running segmentation (CANCELLED); else checks the choices,
        installs missing packages, asks ``confirm_warnings`` when the input does not fit the model
        card (DECLINED when the user says no) and starts the chosen model on the checked tasks (STARTED).

        Raises :class:`InputError` saying what is missing; nothing is started then.
        """
        if self.cancel():
            return CANCELLED
        problem = self.missing_input(channel_nodes)
        if problem:
            raise InputError(problem)
        parameters = self.parameters
        self.logic.installDependencies()
        tasks = self.checked_tasks()
        warnings = self.logic.inputWarnings(parameters.inputVolume, parameters.model, tasks)
        if warnings and not confirm_warnings(warnings):
            return DECLINED
        self.logic.start(parameters.inputVolume, parameters.model, tasks, parameters.device,
                         parameters.outputSegmentation, parameters.createUncertaintyVolume,
                         parameters.uncertaintyKind, list(channel_nodes))
        return STARTED

    def cancel(self) -> bool:
        """Cancel the running segmentation; False (and nothing done) when none runs."""
        if not self.logic.running:
            return False
        self.logic.cancel()
        return True

    # Learning from corrections

    def add_training_cases(self, folder: str, channel_nodes: Sequence = ()) -> list:
        """The Add to training cases button: the input volume and its corrected segmentation stored as
        one case per checked task (a model of two tasks, both applied, gives two cases); returns the
        case folders. Raises :class:`InputError` saying what is missing; nothing is stored then."""
        parameters = self.parameters
        tasks = self.checked_tasks()
        if not (parameters.inputVolume and parameters.outputSegmentation and tasks):
            raise InputError(_("Choose the input volume, the corrected output segmentation and a task first."))
        if not folder:
            raise InputError(_("Choose a training cases folder first."))
        return self.logic.addTrainingCases(parameters.inputVolume, parameters.outputSegmentation, parameters.model,
                                           tasks, folder, list(channel_nodes))
