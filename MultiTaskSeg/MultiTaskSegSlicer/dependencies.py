"""Installing MultiTaskSeg's Python dependencies inside 3D Slicer, the way Slicer users expect.

PyTorch comes through the PyTorch extension (``PyTorchUtils``), which picks the build that fits the
computer's GPU; the other packages come through ``slicer.util.pip_install``. Nothing is installed
without asking; the question comes on every Apply while something is missing, so declining once is
no dead end. There is no connectivity probe of our own (a proxy or mirror that pip can use would
fail it): when pip fails, the message says how to install offline.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

#: The packages are ``[project] dependencies`` of this file, the one list of them. It lies beside the
#: ``MultiTaskSegLib`` folder in the source tree, and the extension installs it there too.
PYPROJECT = "pyproject.toml"
#: Installed through the PyTorch extension, which picks the build for the computer's GPU, never with pip.
TORCH = "torch"


class DependencyError(RuntimeError):
    """A dependency is missing and was not (or could not be) installed; the message says what to do."""


def _pyproject_path() -> Path:
    library = importlib.util.find_spec("MultiTaskSegLib")  # found, not imported: that would need the packages
    if library is None or not library.submodule_search_locations:
        raise DependencyError("MultiTaskSegLib cannot be found; reinstall the MultiTaskSeg extension.")
    return Path(list(library.submodule_search_locations)[0]).parent / PYPROJECT


def _parse_toml(text: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise DependencyError("MultiTaskSeg needs Python 3.11 or later, or the tomli package: "
                                  "run  PythonSlicer -m pip install tomli  and restart Slicer.") from None
    return tomllib.loads(text)


def _requirement_class():
    try:
        from packaging.requirements import Requirement
    except ModuleNotFoundError:  # every Python with pip has it vendored
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def needed(pyproject: Path | None = None) -> list:
    """What the library needs besides PyTorch on this Python (``packaging`` requirements), from
    ``[project] dependencies`` of ``pyproject.toml``. The distribution names are the import names."""
    path = pyproject or _pyproject_path()
    try:
        declared = _parse_toml(path.read_text(encoding="utf-8"))["project"]["dependencies"]
    except (OSError, KeyError) as error:
        raise DependencyError(f"MultiTaskSeg's list of packages cannot be read from {path} ({error}); "
                              "reinstall the MultiTaskSeg extension.") from None
    Requirement = _requirement_class()
    return [requirement for requirement in map(Requirement, declared)
            if requirement.name != TORCH and (requirement.marker is None or requirement.marker.evaluate())]


def _pip_argument(requirement) -> str:
    return f"{requirement.name}{requirement.specifier}"  # no marker: pip_install splits its argument at spaces


def missing_requirements() -> list[str]:
    """pip requirements of the packages that cannot be imported (PyTorch excluded)."""
    return [_pip_argument(requirement) for requirement in needed() if importlib.util.find_spec(requirement.name) is None]


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def missing_packages() -> list[str]:
    """Names of the packages that cannot be imported, PyTorch included (for messages)."""
    return (["PyTorch"] if not torch_installed() else []) + [requirement.split(">")[0] for requirement in missing_requirements()]


def _offline_message(packages: list[str]) -> str:
    return (
        f"MultiTaskSeg needs {', '.join(packages)}, and installing them failed (no connection to the package "
        "index, or a proxy pip is not set up for?). Connect and press Apply again, or install offline: download "
        "the wheels on a connected computer and run  PythonSlicer -m pip install <wheel files>."
    )


def _install_torch() -> None:
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise DependencyError(
            "MultiTaskSeg needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, "
            "restart Slicer, then press Apply again."
        ) from None
    logic = PyTorchUtils.PyTorchUtilsLogic()
    if logic.torchInstalled():
        return
    try:
        # installTorch raises when light-the-torch or pip fails (slicer.util._executePythonModule raises
        # CalledProcessError); it answers None only when its own confirmation, not asked here, is declined.
        torch = logic.installTorch(askConfirmation=False)
    except Exception as error:
        raise DependencyError(f"{_offline_message(['PyTorch'])} ({error}; see the Python console)") from None
    if torch is None:
        raise DependencyError("PyTorch could not be installed; see the Python console for the pip output.")


def _testing(slicer) -> bool:
    """Whether Slicer runs its tests (``--testing``), where a confirmation answers itself with yes."""
    app = getattr(slicer, "app", None)
    return bool(app is not None and app.testingEnabled())


def ensure_dependencies(ask: bool = True) -> None:
    """Install what is missing after the user agrees; raises DependencyError when it stays missing."""
    import slicer

    missing = missing_requirements()
    packages = missing_packages()
    if not packages:
        return
    if _testing(slicer):
        raise DependencyError(f"{', '.join(packages)} not installed, and tests never install packages "
                              "(nothing is downloaded at run time); install them before testing.")
    question = (
        f"MultiTaskSeg needs these Python packages, which are not installed yet: {', '.join(packages)}.\n\n"
        "Install them now? This downloads several hundred megabytes for PyTorch and may take a few minutes."
    )
    if ask and not slicer.util.confirmOkCancelDisplay(question, windowTitle="MultiTaskSeg"):
        raise DependencyError(f"{', '.join(packages)} not installed; MultiTaskSeg cannot segment without them.")
    if not torch_installed():
        _install_torch()
    for requirement in missing:
        try:
            slicer.util.pip_install(requirement)
        except Exception as error:  # pip reports failures as CalledProcessError and friends
            raise DependencyError(f"{_offline_message(packages)} ({error}; see the Python console)") from None
    importlib.invalidate_caches()  # finders cache folder listings: packages pip just added would look missing
    still_missing = missing_packages()
    if still_missing:
        raise DependencyError(f"{', '.join(still_missing)} still cannot be imported; restart Slicer and try again.")
