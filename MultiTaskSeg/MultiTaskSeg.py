"""MultiTaskSeg: segment the loaded volume with a multi-task model, ready for hand correction.

Module metadata, a widget that only wires widgets to a parameter node and leaves the decisions to
``MultiTaskSegSlicer.controller`` (tested without Slicer), a logic that delegates to
``MultiTaskSegLib.mrml_run`` and ``MultiTaskSegLib.mrml`` (where every MRML node is written), and the self-test.
"""

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import ctk
import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = Path(__file__).resolve().parent
if not (MODULE_DIR / "MultiTaskSegLib").is_dir() and (MODULE_DIR.parent / "MultiTaskSegLib").is_dir():
    # Running from the source tree: the library and Resources sit beside the module folder.
    sys.path.insert(0, str(MODULE_DIR.parent))

from MultiTaskSegSlicer.controller import STARTED, ModuleController  # noqa: E402
from MultiTaskSegSlicer.dependencies import ensure_dependencies, missing_packages  # noqa: E402
from MultiTaskSegSlicer.model_card import model_card_html  # noqa: E402

#: Slicer 5.10 is the first Slicer with Python 3.10+, which the library needs (Slicer 5.8 has Python 3.9).
MINIMUM_PYTHON = (3, 10)
UNSUPPORTED_MESSAGE = (
    "MultiTaskSeg needs Slicer 5.10 or later (Python {needed}); this Slicer runs Python {found}. "
    "Install a newer Slicer to use this module."
).format(needed=".".join(map(str, MINIMUM_PYTHON)), found=".".join(map(str, sys.version_info[:3])))
SUPPORTED = sys.version_info >= MINIMUM_PYTHON

DEVICES = ["auto", "cpu", "cuda"]
UNCERTAINTY_KINDS = ["entropy", "max_probability"]


def resourcePath(relativePath: str) -> str:
    """A file of Resources/, installed beside the module or, in the source tree, one folder up."""
    for root in (MODULE_DIR, MODULE_DIR.parent):
        candidate = root / "Resources" / relativePath
        if candidate.exists():
            return str(candidate)
    return str(MODULE_DIR / "Resources" / relativePath)


#
# MultiTaskSeg
#


class MultiTaskSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MultiTaskSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MultiTaskSeg developers"]
        self.parent.helpText = ("" if SUPPORTED else f"<p><b>{UNSUPPORTED_MESSAGE}</b></p>") + _(
            "Segments the selected volume with one multi-task deep network and writes one segment per class "
            "(name, colour, SNOMED CT terminology) into a segmentation, ready for correction in the Segment Editor."
            "<p><b>What the models can do:</b> each model segments the tasks listed on its model card (for example "
            "brain tissues in T1 MRI, the pectoral muscle in breast MRI, coronary arteries in cardiac CTA) in images "
            "like those it was trained on. Any geometry, spacing and scalar type is accepted; the result is on the "
            "input's own grid. Only the segments this model made before are replaced; other segments are kept.</p>"
            "<p><b>What they cannot do:</b> they know only their tasks and modalities. Other anatomy, another "
            "modality (an MR model on CT), very different spacing, 2-D images or multi-channel volumes give warnings "
            "or errors, not meaningful results. The bundled brain model was trained on a few real FreeSurfer "
            "subjects and synthetic images; the phantom models demonstrate the method. None is "
            "<b>for clinical use</b>; check every result.</p>"
            "<p>Please cite: P. Moeskops et al., <i>Deep learning for multi-task medical image segmentation in "
            "multiple modalities</i>, MICCAI 2016; for the U-Net models also M. Avetisian, <i>Volumetric medical "
            "image segmentation with deep convolutional neural networks</i>, and A. Moseley, A. Wang, "
            "A. A. Z. Imran, <i>Context-aware multitasking for medical image segmentation</i>.</p>"
            "<p>Python: <code>MultiTaskSegLib.mrml.segment_volume_node(volumeNode, model=...)</code>.</p>"
        )
        self.parent.acknowledgementText = _(
            "Built on 3D Slicer, PyTorch (through the SlicerPyTorch extension) and SimpleITK. The module layout "
            "follows Slicer's scripted-module template and SlicerNNUNet."
        )


#
# MultiTaskSegParameterNode
#


@parameterNodeWrapper
class MultiTaskSegParameterNode:
    """The GUI state, saved with the scene.

    model: a bundled model's name (so a scene survives a Slicer update, whose install folder differs),
    or a user's model folder. tasks: the checked tasks, comma-separated; the task list only shows them.
    """

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    model: str = ""
    tasks: str = ""
    device: Annotated[str, Choice(DEVICES)] = "auto"
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    createUncertaintyVolume: bool = False
    uncertaintyKind: Annotated[str, Choice(UNCERTAINTY_KINDS)] = "entropy"


#
# MultiTaskSegWidget
#


class MultiTaskSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.controller = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pollTimer = None
        self._tasksShownFor = None  # (model, its tasks) the task list and channel selectors were built for
        self._channelSelectors = []  # one volume selector per further channel of the model's tasks

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        if not SUPPORTED:
            label = qt.QLabel(UNSUPPORTED_MESSAGE)
            label.wordWrap = True
            self.layout.addWidget(label)
            return
        uiWidget = slicer.util.loadUI(resourcePath("UI/MultiTaskSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MultiTaskSegLogic()
        self.controller = ModuleController(self.logic)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(200)
        self._pollTimer.connect("timeout()", self.onPoll)
        self.ui.progressBar.setVisible(False)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.addModelButton.connect("clicked(bool)", self.onAddModelFolder)
        self.ui.taskListWidget.connect("itemChanged(QListWidgetItem*)", self.onTasksChanged)
        self.ui.segmentEditorButton.connect("clicked(bool)", self.onEditInSegmentEditor)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        slicer.app.connect("aboutToQuit()", self.onApplicationQuit)
        self._addCorrectionsSection()
        self.initializeParameterNode()

    def _addCorrectionsSection(self) -> None:
        """Learn from corrections: store corrected cases, fine-tune the model on them in the background."""
        section = ctk.ctkCollapsibleButton()
        section.text = _("Learn from corrections")
        section.collapsed = True
        form = qt.QFormLayout(section)
        self.casesFolderEdit = ctk.ctkPathLineEdit()
        self.casesFolderEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.casesFolderEdit.settingKey = "MultiTaskSeg/TrainingCasesFolder"
        self.casesFolderEdit.toolTip = _("Where corrected cases are stored (FOLDER/TASK/CASE) and fine-tunes run")
        form.addRow(_("Training cases folder:"), self.casesFolderEdit)
        self.addCaseButton = qt.QPushButton(_("Add to training cases"))
        self.addCaseButton.toolTip = _("Store the input volume and the output segmentation, as corrected, as one case for each checked task")
        self.fineTuneButton = qt.QPushButton(_("Fine-tune"))
        self.fineTuneButton.toolTip = _("Fine-tune the selected model on the stored cases; the new model is added beside it")
        self.fineTuneStatus = qt.QLabel()
        self.fineTuneStatus.wordWrap = True
        for widget in (self.addCaseButton, self.fineTuneButton, self.fineTuneStatus):
            form.addRow(widget)
        self.layout.addWidget(section)
        self.addCaseButton.connect("clicked(bool)", self.onAddTrainingCase)
        self.fineTuneButton.connect("clicked(bool)", self.onFineTune)
        self._fineTuneTimer = qt.QTimer()
        self._fineTuneTimer.setInterval(500)
        self._fineTuneTimer.connect("timeout()", self.onFineTunePoll)

    def onAddTrainingCase(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The case could not be stored."), waitCursor=True):
            folders = self.controller.add_training_cases(self.casesFolderEdit.currentPath, self._channelNodes())
            self.casesFolderEdit.addCurrentPathToHistory()
            self.fineTuneStatus.text = _("Stored {folders}").format(folders=", ".join(str(folder) for folder in folders))

    def onFineTune(self) -> None:
        if self.logic.fineTuning:
            self.logic.cancelFineTune()
            return
        with slicer.util.tryWithErrorDisplay(_("Fine-tuning could not start."), waitCursor=True):
            self.logic.startFineTune(self._parameterNode.model, self.casesFolderEdit.currentPath, self._parameterNode.device)
            self.fineTuneButton.text = _("Cancel fine-tuning")
            self._fineTuneTimer.start()

    def onFineTunePoll(self) -> None:
        status = self.logic.fineTuneStatus()
        self.fineTuneStatus.text = _("Fine-tuning: {percent}% ({stage})").format(percent=status.percent, stage=status.stage)
        if not status.finished:
            return
        self._fineTuneTimer.stop()
        self.fineTuneButton.text = _("Fine-tune")
        if status.state == "succeeded":
            path, summary = self.logic.finishFineTune()
            self.fineTuneStatus.text = summary
            self._selectModel(str(path))  # the new model beside its parent; choosing the parent goes back
            self._fillModels()
        elif status.state == "cancelled":
            self.fineTuneStatus.text = _("Fine-tuning cancelled; starting it again resumes it.")
        else:
            self.fineTuneStatus.text = _("Fine-tuning failed: ") + status.error

    def cleanup(self) -> None:
        if self.logic is None:
            return
        self.logic.cancel()
        self.logic.cancelFineTune()
        self._pollTimer.stop()
        self._fineTuneTimer.stop()
        self.removeObservers()
        slicer.app.disconnect("aboutToQuit()", self.onApplicationQuit)  # a reloaded module's old widget must go

    def onApplicationQuit(self) -> None:
        """No worker may outlive Slicer: stop it and remove its temporary files."""
        self.logic.shutdown()

    def enter(self) -> None:
        if self.logic is not None:
            self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)

    def onSceneStartClose(self, caller, event) -> None:
        if self.controller.cancel():  # its volume is about to go: the result would have nowhere to land
            self.ui.statusLabel.text = _("The scene was closed; the running segmentation was cancelled.")
        self.logic.forgetLastResult()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        self._fillModels()

    def setParameterNode(self, inputParameterNode: Optional[MultiTaskSegParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
        self._parameterNode = inputParameterNode
        self.controller.parameters = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
            self._updateGUI()

    # Wiring of the widgets that have no automatic parameter connection (model list, task list).

    def _fillModels(self) -> None:
        if not self._parameterNode:
            return
        try:
            models = self.logic.availableModels(self._parameterNode.model)
        except Exception as error:  # never hide why the list is empty
            logging.exception("MultiTaskSeg: cannot list the models")
            self.ui.statusLabel.text = _("Cannot list the models: ") + str(error)
            models = {}
        with _SignalsBlocked(self.ui.modelComboBox):
            self.ui.modelComboBox.clear()
            for name, source in models.items():
                self.ui.modelComboBox.addItem(name, source)
        if not self._parameterNode.model and models:
            self._selectModel(next(iter(models.values())))
        self._updateGUI()

    def _selectModel(self, source: str) -> None:
        with slicer.util.NodeModify(self._parameterNode):  # one GUI update for the model and its tasks
            self.controller.select_model(source)

    def _updateGUI(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        if not parameters:
            return
        index = self.ui.modelComboBox.findData(parameters.model)
        with _SignalsBlocked(self.ui.modelComboBox):
            self.ui.modelComboBox.setCurrentIndex(index)
        card = self.controller.card()
        self.ui.modelCardBrowser.setHtml(model_card_html(card, self.logic.modelPath(parameters.model)) if card else
                                         _("No model selected: add a model folder or install the bundled models."))
        taskList = self.controller.task_list()
        names = [name for name, checked in taskList.tasks]
        with _SignalsBlocked(self.ui.taskListWidget):
            if self._tasksShownFor != (taskList.model, names):  # rebuilt for another model, never inside itemChanged
                self.ui.taskListWidget.clear()
                for name in names:
                    item = qt.QListWidgetItem(name)
                    item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                    self.ui.taskListWidget.addItem(item)
                self._showChannelSelectors(taskList.channels)
                self._tasksShownFor = (taskList.model, names)  # only once the rebuild succeeded
            for row, (name, checked) in enumerate(taskList.tasks):
                self.ui.taskListWidget.item(row).setCheckState(qt.Qt.Checked if checked else qt.Qt.Unchecked)
        running = self.logic.running
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = self.controller.can_apply(self._channelNodes())
        self.ui.segmentEditorButton.enabled = bool(parameters.outputSegmentation) and not running
        self.ui.undoButton.enabled = self.logic.canUndo and not running

    def _showChannelSelectors(self, channels: list) -> None:
        """One volume selector per channel the model reads after the input volume (e.g. FLAIR)."""
        form = self.ui.inputVolumeSelector.parentWidget().layout()
        for _label, selector in self._channelSelectors:
            form.removeRow(selector)  # deletes the label and the selector, and the row with them
        self._channelSelectors = []
        row = _formRow(form, self.ui.inputVolumeSelector) + 1
        for offset, channel in enumerate(channels):
            label = qt.QLabel(_("{channel} volume:").format(channel=channel))
            selector = slicer.qMRMLNodeComboBox()
            selector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
            selector.noneEnabled = True
            selector.addEnabled = selector.removeEnabled = False
            selector.setMRMLScene(slicer.mrmlScene)
            selector.setCurrentNode(None)
            selector.toolTip = _("The {channel} image of the same patient and study (a registration transform is followed)").format(channel=channel)
            selector.connect("currentNodeChanged(vtkMRMLNode*)", lambda node: self._updateGUI())
            form.insertRow(row + offset, label, selector)
            self._channelSelectors.append((label, selector))

    def _channelNodes(self) -> list:
        return [selector.currentNode() for _, selector in self._channelSelectors]

    def onModelSelected(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._selectModel(self.ui.modelComboBox.itemData(index))

    def onAddModelFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(self.parent, _("Choose a model folder"))
        if folder and self._parameterNode:
            self._selectModel(folder)
            self._fillModels()

    def onTasksChanged(self, item=None) -> None:
        if self._parameterNode:
            widget = self.ui.taskListWidget
            self.controller.check_tasks([widget.item(row).text() for row in range(widget.count)
                                         if widget.item(row).checkState() == qt.Qt.Checked])

    # Running

    def onApplyButton(self) -> None:
        try:  # tryWithErrorDisplay shows the error and raises it again: the buttons are updated either way
            with slicer.util.tryWithErrorDisplay(_("Segmentation could not start."), waitCursor=True):
                if self.controller.apply(self._channelNodes(), self._confirmWarnings) == STARTED:
                    self.ui.statusLabel.text = ""
                    self.ui.progressBar.setVisible(True)
                    self._pollTimer.start()
        finally:
            self._updateGUI()

    @staticmethod
    def _confirmWarnings(warnings: list) -> bool:
        return slicer.util.confirmOkCancelDisplay(
            _("The input does not match the model card:") + "\n\n- " + "\n- ".join(warnings) + "\n\n" + _("Segment anyway?"),
            windowTitle="MultiTaskSeg",
        )

    def onPoll(self) -> None:
        status = self.logic.poll()
        self.ui.progressBar.value = status.percent
        self.ui.progressBar.format = f"%p% {status.stage}"
        if not status.finished:
            return
        self._pollTimer.stop()
        self.ui.progressBar.setVisible(False)
        try:
            if status.state == "succeeded":
                with slicer.util.tryWithErrorDisplay(_("The result could not be written."), waitCursor=True):
                    self._writeResult()
            elif status.state == "cancelled":
                self.ui.statusLabel.text = _("Cancelled; nothing was written.")
            else:
                slicer.util.errorDisplay(_("Segmentation failed: ") + status.error, windowTitle="MultiTaskSeg")
        finally:
            self.logic.finishRun()
            self._updateGUI()

    def _writeResult(self) -> None:
        parameters = self._parameterNode
        existing = "replace"
        replaced = self.logic.segmentsReplaced()
        if replaced:
            edited = self.logic.editedSegments()
            question = _("Replace the segments this model made before ({names})? No keeps them and adds new ones.").format(
                names=", ".join(replaced))
            if edited:
                question += "\n\n" + _("Corrected by hand since: {names}. Yes discards those corrections.").format(
                    names=", ".join(edited))
            answer = qt.QMessageBox.question(
                slicer.util.mainWindow(), "MultiTaskSeg",
                question,
                qt.QMessageBox.Yes | qt.QMessageBox.No | qt.QMessageBox.Cancel,
            )
            if answer == qt.QMessageBox.Cancel:
                self.ui.statusLabel.text = _("Result discarded; nothing was written.")
                return
            existing = "replace_edited" if answer == qt.QMessageBox.Yes else "add"  # the user chose
        written, warnings = self.logic.writeResult(existing)
        if parameters is not None:
            parameters.outputSegmentation = written.segmentation_node
        self.ui.statusLabel.text = _("Wrote {count} segments.").format(count=len(written.segment_ids)) + "".join(
            "\n" + _("Warning: ") + warning for warning in warnings)

    def onUndo(self) -> None:
        try:
            with slicer.util.tryWithErrorDisplay(_("The last result cannot be undone.")):
                self.logic.undoLastResult()
                self.ui.statusLabel.text = _("The last result was undone.")
        finally:
            self._updateGUI()

    def onEditInSegmentEditor(self) -> None:
        segmentationNode, volumeNode = self._parameterNode.outputSegmentation, self._parameterNode.inputVolume
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentationNode)
        setSource = getattr(editor, "setSourceVolumeNode", None) or editor.setMasterVolumeNode
        setSource(volumeNode)


def _formRow(form, widget) -> int:
    """The row of ``form`` whose field is ``widget``. (PythonQt does not wrap QFormLayout's
    getWidgetPosition, whose answers are pointer arguments; rowCount and itemAt it wraps.)"""
    for row in range(form.rowCount()):
        item = form.itemAt(row, qt.QFormLayout.FieldRole)
        if item is not None and item.widget() == widget:
            return row
    raise RuntimeError(f"{widget.objectName} is not a field of the Inputs form; the module's .ui file was changed")


class _SignalsBlocked:
    """Keep a widget quiet while the GUI is updated from the parameter node."""

    def __init__(self, widget) -> None:
        self.widget = widget

    def __enter__(self):
        self.previous = self.widget.blockSignals(True)

    def __exit__(self, *exception) -> None:
        self.widget.blockSignals(self.previous)


#
# MultiTaskSegLogic
#


class MultiTaskSegLogic(ScriptedLoadableModuleLogic):
    """Runs segmentations for the widget and for Python scripts; the work lives in MultiTaskSegLib.

    One call from the Python console: ``MultiTaskSegLogic().process(volumeNode, "model name")``.
    """

    def __init__(self) -> None:
        from MultiTaskSegLib.model_catalog import ModelCardCache

        ScriptedLoadableModuleLogic.__init__(self)
        self._models = {}
        self._cards = ModelCardCache()
        self._run = None
        self._lastWrite = None
        self._fineTune = None

    def getParameterNode(self):
        return MultiTaskSegParameterNode(super().getParameterNode())

    def installDependencies(self, ask: bool = True) -> None:
        """PyTorch through the PyTorch extension, the rest with pip; asks first, every time one is missing."""
        ensure_dependencies(ask)

    def availableModels(self, extra: str = "") -> dict:
        """Display name -> model source: bundled models by name, plus ``extra`` (a user's model folder).

        Reads only ``model.json`` files, so the list appears before PyTorch is installed.
        """
        from MultiTaskSegLib.model_catalog import bundled_models

        models = {name: name for name in bundled_models()}
        # A bundled model's path from an older Slicer no longer exists: its name above stands for it.
        stale = not Path(extra).exists() and Path(extra).name.removesuffix(".zip") in models
        if extra and extra not in models and not stale:
            models[Path(extra).name] = extra
        return models

    def modelPath(self, source: str):
        from MultiTaskSegLib.model_catalog import resolve_model_path

        try:
            return resolve_model_path(source)
        except Exception:
            return None

    def modelCard(self, source: str) -> dict:
        """The model's metadata (tasks, classes, card) without loading weights; {} when unreadable.
        Read once while the same model is asked for (the widget asks on every parameter change)."""
        return self._cards.card(source)

    def loadModel(self, source: str):
        from MultiTaskSegLib.model_files import load_model, resolve_model_path

        key = str(resolve_model_path(source))
        if key not in self._models:
            self._models[key] = load_model(key)
        return self._models[key]

    def inputWarnings(self, volumeNode, model: str, tasks) -> list:
        from MultiTaskSegLib import mrml

        return mrml.input_warnings(volumeNode, self.loadModel(model), tasks or None)

    def start(self, volumeNode, model: str, tasks, device: str = "auto", segmentationNode=None,
              withUncertainty: bool = False, uncertaintyKind: str = "entropy", channelNodes=()) -> None:
        """Freeze the inputs and segment them off the GUI thread (a PythonSlicer process, else a thread)."""
        from MultiTaskSegLib import mrml_run

        python = shutil.which("PythonSlicer")
        self._run = mrml_run.start_run(
            volumeNode, self.loadModel(model), tasks or (), device, segmentationNode, withUncertainty, uncertaintyKind,
            python=python, environment=slicer.util.startupEnvironment() if python else None,
            channel_nodes=channelNodes,
        )

    @property
    def running(self) -> bool:
        return self._run is not None and self._run.running

    def poll(self):
        return self._run.poll()

    def cancel(self) -> None:
        if self._run is not None:
            self._run.cancel()

    def shutdown(self) -> None:
        """End every worker at once (application exit)."""
        from MultiTaskSegLib import background

        background.end_all_jobs()

    def finishRun(self) -> None:
        """Forget the finished run (its result was written, discarded or never came)."""
        self._run = None

    def segmentsReplaced(self) -> list:
        return self._run.segments_replaced()

    def editedSegments(self) -> list:
        return self._run.edited_segments()

    def writeResult(self, existing: str = "replace"):
        """Write the finished run onto the inputs frozen at its start; returns the write (for undo) and warnings."""
        self._lastWrite, _uncertaintyNode, warnings = self._run.write(existing)  # undoing the write removes it too
        return self._lastWrite, warnings

    @property
    def canUndo(self) -> bool:
        return self._lastWrite is not None

    def forgetLastResult(self) -> None:
        """The scene is closing: the last result's nodes go with it, so there is nothing left to undo."""
        self._lastWrite = None

    def undoLastResult(self) -> None:
        """Restore the segmentation as it was before the last result and remove its uncertainty volume;
        refused after later edits."""
        if self._lastWrite is not None:
            self._lastWrite.undo()
        self._lastWrite = None

    # Learning from corrections

    def addTrainingCases(self, volumeNode, segmentationNode, model: str, tasks, folder: str, channelNodes=()) -> list:
        """Store the volume and its corrected segmentation as one training case per task of ``model``
        under ``folder`` (in the model's own task definitions, registered or not); returns the case folders."""
        from MultiTaskSegLib import mrml

        return mrml.store_corrected_cases(volumeNode, segmentationNode, self.loadModel(model), tasks, folder,
                                          channel_nodes=channelNodes)

    def startFineTune(self, model: str, folder: str, device: str = "auto") -> None:
        """Fine-tune ``model`` on the cases under ``folder`` in a PythonSlicer process; the run goes to
        ``folder/finetunes/MODEL-finetuned`` (started again on the same cases, an interrupted run resumes;
        after a finished one, or once more cases were stored, a new run ``MODEL-finetuned-2``... trains on all)."""
        from MultiTaskSegLib.finetuning import finetune_run_folder, start_finetune

        if not folder:
            raise ValueError(_("Choose a training cases folder first."))
        parent = self.loadModel(model)
        python = shutil.which("PythonSlicer")
        out = finetune_run_folder(folder, parent)
        self._fineTune = start_finetune(parent.path, folder, out, device=device, python=python,
                                        environment=slicer.util.startupEnvironment() if python else None,
                                        name=out.name)

    @property
    def fineTuning(self) -> bool:
        return self._fineTune is not None and not self._fineTune.poll().finished

    def fineTuneStatus(self):
        return self._fineTune.poll()

    def cancelFineTune(self) -> None:
        if self._fineTune is not None:
            self._fineTune.cancel()

    def finishFineTune(self):
        """The new model's folder and a line on the held-back case: the parent's Dice and the kept weights'."""
        from MultiTaskSegLib.model_catalog import read_model_card

        path = self._fineTune.result
        self._fineTune = None
        self._cards.forget()  # the model folder may be one whose card was read before (an interrupted run, resumed)
        provenance = read_model_card(path).get("provenance", {})
        history = provenance.get("held_back_mean_dice")
        if history:
            kept = str(provenance.get("kept_step"))
            summary = _("New model {path}: held-back case mean Dice {before:.3f} before, {after:.3f} after (step {step}).").format(
                path=path, before=history.get("0", float("nan")), after=history.get(kept, float("nan")), step=kept)
        else:
            summary = _("New model {path} (one case: nothing held back to judge it; check it on your next scan).").format(path=path)
        return path, summary

    def process(self, volumeNode, model: str, tasks=None, device: str = "auto", segmentationNode=None,
                withProbabilities: bool = False, channelNodes=()):
        """Segment synchronously (Python console, scripts, tests); returns the segmentation node.
        ``channelNodes``: the further channels of a multi-channel task (e.g. FLAIR), in its order."""
        from MultiTaskSegLib import mrml

        return mrml.segment_volume_node(volumeNode, self.loadModel(model), tasks, device, segmentationNode,
                                        withProbabilities, channel_nodes=channelNodes)


#
# MultiTaskSegTest
#


class MultiTaskSegTest(ScriptedLoadableModuleTest):
    """Runs in Slicer: a phantom is segmented with the bundled model, through the logic and the widget."""

    MINIMUM_MEAN_DICE = 0.5

    def setUp(self):
        """Skips (ctest runs the test_* methods, not runTest) where the packages are missing, e.g. on the
        Extensions Index build machines: a test never installs them."""
        missing = missing_packages()
        if missing:
            self.skipTest(f"{', '.join(missing)} not installed: MultiTaskSeg's self-test is skipped")
        slicer.mrmlScene.Clear()

    def runTest(self):
        if missing_packages():  # Reload and Test reports skipTest as an error
            self.delayDisplay("PyTorch or another package is not installed: MultiTaskSeg's self-test is skipped")
            return
        self.setUp()
        self.test_logic_segments_a_phantom()
        self.setUp()
        self.test_apply_button_segments_a_phantom()

    def _phantom(self):
        from MultiTaskSegLib import mrml
        from MultiTaskSegLib.model_catalog import bundled_models, read_model_card

        models = bundled_models()
        if not models:
            self.skipTest("no bundled model in Resources/Models")
        name = "triplanar-phantoms" if "triplanar-phantoms" in models else next(iter(models))
        path = models[name]
        task = read_model_card(path)["tasks"][0]["name"]
        try:
            from MultiTaskSegLib.phantoms import generate_case
        except ImportError:
            self.skipTest("MultiTaskSegLib.phantoms.generate_case is not available")
        image, label = generate_case(task, seed=2024, size="small")
        volumeNode = mrml.volume_node_from_image(image, slicer.mrmlScene, f"{task} phantom")
        return name, task, volumeNode, label

    def _assertDice(self, segmentationNode, volumeNode, task, label):
        import numpy as np
        import SimpleITK as sitk

        from MultiTaskSegLib import mrml
        from MultiTaskSegLib.tasks import get_task

        segmentation = segmentationNode.GetSegmentation()
        expected = get_task(task).map_labels(sitk.GetArrayFromImage(label))
        scores = []
        for position, className in enumerate(get_task(task).class_names, start=1):
            segmentId = segmentation.GetSegmentIdBySegmentName(className)
            self.assertTrue(segmentId, f"no segment named {className}")
            found = mrml.labels_from_segmentation(segmentationNode, volumeNode, [segmentId]) > 0
            truth = expected == position
            scores.append(2 * np.logical_and(found, truth).sum() / max(1, found.sum() + truth.sum()))
        self.delayDisplay(f"Dice per class: {', '.join(f'{s:.2f}' for s in scores)}")
        self.assertGreater(float(np.mean(scores)), self.MINIMUM_MEAN_DICE)

    def test_logic_segments_a_phantom(self):
        self.delayDisplay("Segmenting a phantom through the logic")
        model, task, volumeNode, label = self._phantom()
        segmentationNode = MultiTaskSegLogic().process(volumeNode, model, tasks=[task], device="cpu")
        self._assertDice(segmentationNode, volumeNode, task, label)
        self.delayDisplay("Test passed")

    def test_apply_button_segments_a_phantom(self):
        self.delayDisplay("Segmenting a phantom with the Apply button")
        model, task, volumeNode, label = self._phantom()
        slicer.util.selectModule("MultiTaskSeg")  # entered, the widget takes up a parameter node again after setUp
        widget = slicer.util.getModuleWidget("MultiTaskSeg")
        parameters = widget.logic.getParameterNode()
        parameters.inputVolume = volumeNode
        parameters.model = widget.logic.availableModels()[model]
        parameters.tasks = task
        parameters.device = "cpu"
        parameters.outputSegmentation = None
        widget.ui.applyButton.click()
        # In testing mode error popups are not shown: say here, not later with an empty status, that Apply failed.
        self.assertTrue(widget.logic.running or widget._pollTimer.isActive() or parameters.outputSegmentation,
                        "Apply did not start a segmentation; the Python console shows why")
        deadline = time.monotonic() + 600
        while (widget.logic.running or widget._pollTimer.isActive()) and time.monotonic() < deadline:
            slicer.app.processEvents()
        self.assertFalse(widget.logic.running, "the segmentation did not finish within 10 minutes")
        segmentationNode = parameters.outputSegmentation
        self.assertIsNotNone(segmentationNode, widget.ui.statusLabel.text)
        self._assertDice(segmentationNode, volumeNode, task, label)
        self.delayDisplay("Test passed")
