"""Static checks of the Slicer module, which cannot run without the Slicer application.

The widget code and ``Resources/UI/MultiTaskSeg.ui`` must agree (every ``ui.<name>`` the code uses
exists in the .ui, every parameter-bound widget names a parameter of the right type), and the build
files must list files that exist. The module's pure-Python helpers are tested here too.
"""

from __future__ import annotations

import ast
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
MODULE_FILE = ROOT / "MultiTaskSeg" / "MultiTaskSeg.py"
UI_FILE = ROOT / "Resources" / "UI" / "MultiTaskSeg.ui"
PARAMETER_CLASS = "MultiTaskSegParameterNode"

#: Which .ui widget class can show which parameter type (what the parameter node wrapper connects).
WIDGETS_FOR_TYPE = {"bool": {"QCheckBox"}, "str": {"QComboBox", "QLineEdit"}}


@pytest.fixture(scope="module")
def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def ui_widgets() -> dict[str, ElementTree.Element]:
    root = ElementTree.parse(UI_FILE).getroot()
    return {widget.get("name"): widget for widget in root.iter("widget")}


def ui_names_used(tree: ast.Module) -> set[str]:
    """Every ``<anything>.ui.<name>`` attribute in the module file."""
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
    }


def parameters(tree: ast.Module) -> dict[str, str]:
    """Parameter name -> annotation source of the parameter node wrapper class."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == PARAMETER_CLASS:
            return {item.target.id: ast.unparse(item.annotation) for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError(f"{MODULE_FILE} has no class {PARAMETER_CLASS}")


def widget_property(widget: ElementTree.Element, name: str):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return prop
    return None


def test_every_widget_the_code_uses_exists_in_the_ui(module_tree, ui_widgets):
    used = ui_names_used(module_tree)
    assert used, "the static check found no ui.<name> uses; the parser no longer matches the code"
    missing = sorted(used - set(ui_widgets))
    assert not missing, f"MultiTaskSeg.py uses widgets that {UI_FILE.name} does not have: {missing}"


def test_every_parameter_bound_widget_names_a_parameter_of_a_fitting_type(module_tree, ui_widgets):
    declared = parameters(module_tree)
    bound = {}
    for name, widget in ui_widgets.items():
        prop = widget_property(widget, "SlicerParameterName")
        if prop is not None:
            bound[prop.findtext("string")] = widget
    unknown = sorted(set(bound) - set(declared))
    assert not unknown, f"{UI_FILE.name} binds widgets to parameters that {PARAMETER_CLASS} lacks: {unknown}"
    for parameter, widget in bound.items():
        annotation = declared[parameter]
        if annotation.startswith("slicer.vtkMRML"):
            assert widget.get("class") == "qMRMLNodeComboBox", parameter
            node_types = [s.text for s in widget_property(widget, "nodeTypes").iter("string")]
            assert node_types == [annotation.removeprefix("slicer.")], parameter
            continue
        base = "str" if annotation.startswith("Annotated[str") else annotation
        assert widget.get("class") in WIDGETS_FOR_TYPE[base], f"{parameter}: {annotation} shown in {widget.get('class')}"
        if widget.get("class") == "QComboBox":
            assert "Choice(" in annotation, f"{parameter}: a QComboBox needs a Choice annotation"


def test_ui_connections_and_layout_refer_to_existing_widgets(ui_widgets):
    root = ElementTree.parse(UI_FILE).getroot()
    for connection in root.iter("connection"):
        for role in ("sender", "receiver"):
            assert connection.findtext(role) in ui_widgets, f"connection {role} {connection.findtext(role)}"
    custom = {item.findtext("class") for item in root.iter("customwidget")}
    qt_classes = {w.get("class") for w in ui_widgets.values() if not w.get("class").startswith("Q")}
    assert qt_classes <= custom, f"custom widgets without a <customwidget> entry: {qt_classes - custom}"


def test_module_file_has_the_four_scripted_module_classes(module_tree):
    classes = {node.name for node in module_tree.body if isinstance(node, ast.ClassDef)}
    assert {"MultiTaskSeg", "MultiTaskSegWidget", "MultiTaskSegLogic", "MultiTaskSegTest", PARAMETER_CLASS} <= classes


def test_build_files_list_existing_files():
    module_cmake = (ROOT / "MultiTaskSeg" / "CMakeLists.txt").read_text(encoding="utf-8")
    scripts = re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", module_cmake, re.S).group(1).split()
    for script in scripts:
        assert (ROOT / "MultiTaskSeg" / script.replace("${MODULE_NAME}", "MultiTaskSeg")).is_file(), script
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top and "add_subdirectory(MultiTaskSeg)" in top
    for key in ("HOMEPAGE", "CATEGORY", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "CONTRIBUTORS"):
        assert f"set(EXTENSION_{key} " in top, key
    screenshot = re.search(r"Resources/Screenshots/[\w.-]+?\.png", top).group(0)
    assert (ROOT / screenshot).is_file()


def test_icon_is_a_128_pixel_png():
    header = (ROOT / "Resources" / "Icons" / "MultiTaskSeg.png").read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(header[16:20], "big") == 128 and int.from_bytes(header[20:24], "big") == 128


#: Qt functions PythonQt (Slicer's Qt binding) does not wrap because they answer through pointer
#: arguments; PyQt and PySide return tuples for them, so code written for those fails only in Slicer.
UNWRAPPED_BY_PYTHONQT = {"getWidgetPosition", "getItemPosition", "getLayoutPosition", "getContentsMargins"}


def test_the_module_calls_no_qt_function_that_slicers_binding_lacks(module_tree):
    called = {node.func.attr for node in ast.walk(module_tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert not called & UNWRAPPED_BY_PYTHONQT


def test_channel_selectors_go_below_the_input_volume_in_the_inputs_form():
    """The widget inserts one volume selector per further channel after the input volume's form row."""
    root = ElementTree.parse(UI_FILE).getroot()
    forms = [layout for layout in root.iter("layout") if layout.get("class") == "QFormLayout"]
    rows = [(form, item) for form in forms for item in form.findall("item")
            if item.get("column") == "1" and (widget := item.find("widget")) is not None
            and widget.get("name") == "inputVolumeSelector"]
    assert len(rows) == 1, "inputVolumeSelector must be the field of one QFormLayout row"


# ---------------------------------------------------------------------------------------------
# The module's pure-Python helpers


@pytest.fixture(scope="module")
def helpers():
    sys.path.insert(0, str(ROOT / "MultiTaskSeg"))
    try:
        from MultiTaskSegSlicer import dependencies, model_card
    finally:
        sys.path.remove(str(ROOT / "MultiTaskSeg"))
    return dependencies, model_card


def test_model_card_shows_tasks_classes_intended_input_and_validation(helpers, tmp_path):
    _, model_card = helpers
    (tmp_path / "learning_curve.png").write_bytes(b"\x89PNG")
    card = {
        "name": "paper-triplanar", "version": "1.2.0", "architecture": {"name": "triplanar"},
        "tasks": [{"name": "breast_mri", "title": "Pectoral muscle (breast MRI)", "modality": "MR", "anatomy": "Breast",
                   "working_spacing_mm": 1.3, "classes": [{"name": "Pectoral muscle"}]}],
        "card": {"description": "trained on <phantoms>", "intended_input": {"breast_mri": "MR, Breast; 1.3 mm"},
                 "validation_dice": {"breast_mri": {"Pectoral muscle": 0.912}}},
    }
    html = model_card.model_card_html(card, tmp_path)
    for text in ("paper-triplanar", "1.2.0", "triplanar", "Pectoral muscle (breast MRI)", "MR", "Pectoral muscle",
                 "MR, Breast; 1.3 mm", "0.91", "learning_curve.png", "&lt;phantoms&gt;"):
        assert text in html, text
    assert model_card.task_names(card) == ["breast_mri"]
    assert "<phantoms>" not in html


def test_an_ensembles_card_names_its_members_architecture(helpers):
    _, model_card = helpers
    card = {"name": "sarcoma", "architecture": {"name": "ensemble", "arguments": {
        "member_architecture": "unet2d_multiplanar", "member_arguments": {}, "members": 3}}}
    assert "Architecture: ensemble of 3 unet2d_multiplanar" in model_card.model_card_html(card)


def test_a_multi_channel_model_asks_for_one_volume_per_further_channel(helpers):
    from MultiTaskSegLib.tasks import get_task, task_to_dict

    _, model_card = helpers
    glioma = {"name": "glioma", "tasks": [task_to_dict(get_task("brats_glioma_t1c_flair"))]}
    brain = {"name": "brain", "tasks": [task_to_dict(get_task("brain_t1_mri"))]}
    assert model_card.further_channels(glioma) == ["FLAIR"]
    assert model_card.further_channels(brain) == [] and model_card.further_channels({}) == []
    assert "Reads T1c + FLAIR" in model_card.model_card_html(glioma)


def test_dependency_check_finds_nothing_missing_in_a_complete_environment(helpers):
    dependencies, _ = helpers
    assert dependencies.missing_requirements() == []
    assert dependencies.torch_installed()


def test_under_slicers_tests_a_missing_package_is_refused_not_installed(helpers, monkeypatch):
    """In ``--testing`` mode Slicer's confirmation answers yes by itself: the module must not download."""
    dependencies, _ = helpers
    slicer = pytest.importorskip("slicer", reason="slicer-core provides the slicer package")

    class TestingApplication:  # the one call of slicer.app that is asked (the application is not installable here)
        @staticmethod
        def testingEnabled():
            return True

    monkeypatch.setattr(slicer, "app", TestingApplication(), raising=False)
    monkeypatch.setattr(dependencies, "missing_requirements", lambda: ["numpy>=1.24"])
    monkeypatch.setattr(dependencies, "_install_torch", lambda: pytest.fail("a test must not install PyTorch"))
    with pytest.raises(dependencies.DependencyError, match="tests never install packages"):
        dependencies.ensure_dependencies(ask=True)


def test_a_failed_pytorch_download_says_how_to_install_offline(helpers, monkeypatch):
    """PyTorchUtilsLogic.installTorch raises CalledProcessError when light-the-torch or pip fails
    (it runs them through slicer.util._executePythonModule); the user must get the offline advice."""
    import subprocess
    import types

    dependencies, _ = helpers

    class FailingPyTorchUtilsLogic:
        @staticmethod
        def torchInstalled():
            return False

        def installTorch(self, askConfirmation=False):
            raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "light_the_torch", "install", "torch"])

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=FailingPyTorchUtilsLogic))
    with pytest.raises(dependencies.DependencyError, match="install offline") as raised:
        dependencies._install_torch()
    assert "PyTorch" in str(raised.value) and "light_the_torch" in str(raised.value)


def test_the_packages_the_module_installs_are_the_dependencies_of_pyproject(helpers, tmp_path, monkeypatch):
    dependencies, _ = helpers
    from packaging.requirements import Requirement

    declared = [Requirement(line) for line in tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]]
    expected = [r.name for r in declared if r.name != "torch" and (r.marker is None or r.marker.evaluate())]
    assert [r.name for r in dependencies.needed()] == expected and "numpy" in expected
    other = tmp_path / "pyproject.toml"
    other.write_text('[project]\ndependencies = ["torch>=2.2", "numpy>=1.24", "old>=1; python_version < \'3.0\'", '
                     '"a_package_nobody_installed>=2.0; python_version >= \'3.0\'"]\n', encoding="utf-8")
    assert [str(r) for r in dependencies.needed(other)] == ["numpy>=1.24", 'a_package_nobody_installed>=2.0; python_version >= "3.0"']
    monkeypatch.setattr(dependencies, "_pyproject_path", lambda: other)
    assert dependencies.missing_requirements() == ["a_package_nobody_installed>=2.0"]  # pip gets no marker
    with pytest.raises(dependencies.DependencyError, match="reinstall the MultiTaskSeg extension"):
        dependencies.needed(tmp_path / "missing.toml")


def test_the_extension_installs_pyproject_beside_the_library():
    module_cmake = (ROOT / "MultiTaskSeg" / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "${PROJECT_SOURCE_DIR}/pyproject.toml" in re.search(r"MULTITASKSEG_LIB_RESOURCES(.*?)\)", module_cmake, re.S).group(1)


def test_the_module_refuses_an_older_slicer_itself_and_the_library_supports_the_newer_ones(module_tree):
    """Slicer 5.8 has Python 3.9: the module must say it needs Slicer 5.10, not fail on an import."""
    constants = {node.targets[0].id: node.value for node in module_tree.body
                 if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    minimum = ast.literal_eval(constants["MINIMUM_PYTHON"])
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert f'requires-python = ">={minimum[0]}.{minimum[1]}"' in pyproject
    assert "Slicer 5.10" in ast.literal_eval(constants["UNSUPPORTED_MESSAGE"].func.value)
    setup = next(node for node in ast.walk(module_tree) if isinstance(node, ast.FunctionDef) and node.name == "setup")
    guard = next(node for node in setup.body if isinstance(node, ast.If))
    assert ast.unparse(guard.test) == "not SUPPORTED" and isinstance(guard.body[-1], ast.Return)
    tasks_source = (ROOT / "MultiTaskSegLib" / "tasks.py").read_text(encoding="utf-8")
    assert "import tomli as tomllib" in tasks_source and "tomli" in pyproject  # tomllib is Python 3.11+
