"""The module widget's decisions (Apply, Cancel, the task list) with a mock logic, no Slicer application.

The widget in MultiTaskSeg.py only shows and forwards; ``MultiTaskSegSlicer.controller`` decides, on a
parameter node and a logic described by the ``SegmentationLogic`` protocol. The mock below
implements that protocol; the static checks at the end keep the protocol, the module's logic and its
parameter node in step.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from MultiTaskSegLib.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
MODULE_FILE = ROOT / "MultiTaskSeg" / "MultiTaskSeg.py"

sys.path.insert(0, str(ROOT / "MultiTaskSeg"))  # as Slicer finds the module's helpers
try:
    from MultiTaskSegSlicer.controller import (  # noqa: E402
        CANCELLED,
        DECLINED,
        STARTED,
        ModuleController,
        Parameters as ParametersRead,
        SegmentationLogic,
    )
finally:
    sys.path.remove(str(ROOT / "MultiTaskSeg"))

BRAIN_AND_BREAST = {"name": "two-tasks", "tasks": [{"name": "brain_t1_mri"}, {"name": "breast_mri"}]}
GLIOMA = {"name": "glioma", "tasks": [{"name": "brats_glioma_t1c_flair", "channels": ["T1c", "FLAIR"]}]}
CARDS = {"two-tasks": BRAIN_AND_BREAST, "glioma": GLIOMA}


class MockLogic:
    """The logic as the widget sees it: cards by model source, a run that starts and can be cancelled."""

    def __init__(self, warnings=()) -> None:
        self.running = False
        self.warnings = list(warnings)
        self.installs = 0
        self.started: list[dict] = []
        self.cancels = 0
        self.stored: list[dict] = []

    def modelCard(self, source: str) -> dict:
        return CARDS.get(source, {})

    def installDependencies(self, ask: bool = True) -> None:
        self.installs += 1

    def inputWarnings(self, volumeNode, model: str, tasks) -> list:
        return list(self.warnings)

    def start(self, volumeNode, model: str, tasks, device: str = "auto", segmentationNode=None,
              withUncertainty: bool = False, uncertaintyKind: str = "entropy", channelNodes=()) -> None:
        self.started.append({"volume": volumeNode, "model": model, "tasks": list(tasks), "device": device,
                             "segmentation": segmentationNode, "uncertainty": withUncertainty,
                             "kind": uncertaintyKind, "channels": list(channelNodes)})
        self.running = True

    def cancel(self) -> None:
        self.cancels += 1
        self.running = False

    def addTrainingCases(self, volumeNode, segmentationNode, model: str, tasks, folder: str, channelNodes=()) -> list:
        self.stored.append({"volume": volumeNode, "segmentation": segmentationNode, "model": model, "tasks": list(tasks),
                            "folder": folder, "channels": list(channelNodes)})
        return [f"{folder}/{task}/case" for task in tasks]


@dataclass
class Parameters:
    """The fields of MultiTaskSegParameterNode, with its defaults (checked below)."""

    inputVolume: object = None
    model: str = ""
    tasks: str = ""
    device: str = "auto"
    outputSegmentation: object = None
    createUncertaintyVolume: bool = False
    uncertaintyKind: str = "entropy"


@pytest.fixture
def logic() -> MockLogic:
    return MockLogic()


@pytest.fixture
def controller(logic) -> ModuleController:
    controller = ModuleController(logic, Parameters(inputVolume="T1 volume"))
    controller.select_model("two-tasks")
    return controller


# ---------------------------------------------------------------------------------------------
# Apply and Cancel


def test_apply_starts_a_run_of_the_chosen_model_on_the_checked_tasks(controller, logic):
    controller.check_tasks(["breast_mri"])
    controller.parameters.device = "cpu"
    controller.parameters.createUncertaintyVolume = True
    assert controller.apply() == STARTED
    assert logic.installs == 1
    assert logic.started == [{"volume": "T1 volume", "model": "two-tasks", "tasks": ["breast_mri"], "device": "cpu",
                              "segmentation": None, "uncertainty": True, "kind": "entropy", "channels": []}]


def test_apply_gives_the_checked_tasks_in_the_models_order(controller, logic):
    controller.check_tasks(["breast_mri", "brain_t1_mri"])
    controller.apply()
    assert logic.started[0]["tasks"] == ["brain_t1_mri", "breast_mri"]


@pytest.mark.parametrize("change, message", [
    ({"tasks": ""}, "No task checked"),
    ({"tasks": "a_task_the_model_lacks"}, "No task checked"),
    ({"inputVolume": None}, "No input volume"),
    ({"model": "deleted-model"}, "No model"),
])
def test_apply_without_a_volume_a_model_or_a_checked_task_says_so_and_starts_nothing(controller, logic, change, message):
    for name, value in change.items():
        setattr(controller.parameters, name, value)
    assert not controller.can_apply()
    with pytest.raises(InputError, match=message):
        controller.apply()
    assert logic.started == [] and logic.installs == 0


def test_a_multi_channel_model_needs_a_volume_for_each_further_channel(controller, logic):
    controller.select_model("glioma")
    assert controller.task_list().channels == ["FLAIR"]
    assert not controller.can_apply([None])
    with pytest.raises(InputError, match="No FLAIR volume"):
        controller.apply([None])
    assert logic.started == []
    assert controller.apply(["FLAIR volume"]) == STARTED
    assert logic.started[0]["channels"] == ["FLAIR volume"]


def test_input_warnings_are_asked_about_and_a_no_starts_nothing():
    logic = MockLogic(warnings=["the input looks like CT; the model expects MR"])
    controller = ModuleController(logic, Parameters(inputVolume="volume"))
    controller.select_model("two-tasks")
    asked = []
    assert controller.apply(confirm_warnings=lambda warnings: asked.append(warnings) or False) == DECLINED
    assert asked == [["the input looks like CT; the model expects MR"]] and logic.started == []
    assert controller.apply(confirm_warnings=lambda warnings: True) == STARTED


def test_cancel_cancels_a_running_segmentation_and_does_nothing_when_none_runs(controller, logic):
    assert controller.cancel() is False and logic.cancels == 0
    controller.apply()
    assert controller.cancel() is True and logic.cancels == 1 and not logic.running
    assert controller.cancel() is False and logic.cancels == 1


def test_apply_while_running_cancels_and_starts_nothing_new(controller, logic):
    controller.apply()
    controller.parameters.inputVolume = None  # Cancel stays possible whatever is selected meanwhile
    assert controller.can_apply()
    assert controller.apply() == CANCELLED
    assert logic.cancels == 1 and len(logic.started) == 1


# ---------------------------------------------------------------------------------------------
# Add to training cases


def test_add_to_training_cases_stores_a_case_for_every_checked_task(controller, logic):
    controller.parameters.outputSegmentation = "corrected segmentation"
    controller.check_tasks(["breast_mri", "brain_t1_mri"])  # both applied, both corrected
    assert controller.add_training_cases("cases") == ["cases/brain_t1_mri/case", "cases/breast_mri/case"]
    assert logic.stored == [{"volume": "T1 volume", "segmentation": "corrected segmentation", "model": "two-tasks",
                             "tasks": ["brain_t1_mri", "breast_mri"], "folder": "cases", "channels": []}]


@pytest.mark.parametrize("change, folder, message", [
    ({"outputSegmentation": None}, "cases", "corrected output segmentation"),
    ({"tasks": ""}, "cases", "and a task first"),
    ({}, "", "training cases folder"),
])
def test_add_to_training_cases_without_a_segmentation_a_task_or_a_folder_says_so_and_stores_nothing(
        controller, logic, change, folder, message):
    controller.parameters.outputSegmentation = "corrected segmentation"
    for name, value in change.items():
        setattr(controller.parameters, name, value)
    with pytest.raises(InputError, match=message):
        controller.add_training_cases(folder)
    assert logic.stored == []


# ---------------------------------------------------------------------------------------------
# The task list


def test_the_task_list_shows_the_models_tasks_all_checked_for_a_newly_chosen_model(controller):
    shown = controller.task_list()
    assert shown.model == "two-tasks"
    assert shown.tasks == [("brain_t1_mri", True), ("breast_mri", True)]
    assert shown.channels == []


def test_the_users_check_marks_stay_while_the_model_does_not_change(controller):
    controller.check_tasks(["breast_mri"])
    controller.select_model("two-tasks")  # chosen again, e.g. after adding the same model folder
    assert controller.task_list().tasks == [("brain_t1_mri", False), ("breast_mri", True)]
    assert controller.checked_tasks() == ["breast_mri"]
    controller.select_model("glioma")
    assert controller.task_list().tasks == [("brats_glioma_t1c_flair", True)]


def test_no_model_shows_no_tasks(logic):
    controller = ModuleController(logic, Parameters(inputVolume="volume"))
    assert controller.task_list().tasks == [] and controller.checked_tasks() == []


# ---------------------------------------------------------------------------------------------
# The protocol, the module's logic and its parameter node agree


def module_classes() -> dict[str, ast.ClassDef]:
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def test_the_mock_and_the_modules_logic_provide_everything_the_protocol_names():
    assert isinstance(MockLogic(), SegmentationLogic)
    wanted = {name for name in vars(SegmentationLogic) if not name.startswith("_")}
    logic = module_classes()["MultiTaskSegLogic"]
    provided = {node.name for node in logic.body if isinstance(node, ast.FunctionDef)}
    assert wanted <= provided, f"MultiTaskSegLogic lacks {sorted(wanted - provided)}"


def test_the_parameters_apply_reads_are_fields_of_the_modules_parameter_node():
    node = module_classes()["MultiTaskSegParameterNode"]
    fields = {item.target.id: ast.literal_eval(item.value) if item.value else None
              for item in node.body if isinstance(item, ast.AnnAssign)}
    read = set(ParametersRead.__annotations__)
    assert read <= set(fields)
    defaults = Parameters()
    for name in read:
        assert getattr(defaults, name) == fields[name], name
