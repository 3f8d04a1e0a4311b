"""Installing MultiTaskSeg's Python dependencies inside 3D Slicer, the way Slicer users expect.

PyTorch comes through the PyTorch extension (``PyTorchUtils``), which picks the build that fits the
computer's GPU; the other packages come through ``slicer.util.pip_install``. Nothing is installed
without asking; the question comes on every Apply while something is missing, so declining once is
no dead end. There is no connectivity probe of our own (a proxy or mirror that pip can use would
fail it): when pip fails, the message says how to install offline.
"""

from __future__ import annotations

import importlib.util
import sys

#: Python module name -> pip requirement, for what the library needs besides PyTorch.
REQUIREMENTS = {
    "safetensors": "safetensors>=0.4",
    "SimpleITK": "SimpleITK>=2.3",
    "numpy": "numpy>=1.24",
}
if sys.version_info < (3, 11):
    REQUIREMENTS["tomli"] = "tomli>=2.0"


class DependencyError(RuntimeError):
    """A dependency is missing and was not (or could not be) installed; the message says what to do."""


def missing_requirements() -> list[str]:
    """pip requirements of the packages that cannot be imported (PyTorch excluded)."""
    return [requirement for module, requirement in REQUIREMENTS.items() if importlib.util.find_spec(module) is None]


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


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
    if not logic.torchInstalled() and logic.installTorch(askConfirmation=False) is None:
        raise DependencyError("PyTorch could not be installed; see the Python console for the pip output.")


def ensure_dependencies(ask: bool = True) -> None:
    """Install what is missing after the user agrees; raises DependencyError when it stays missing."""
    import slicer

    missing = missing_requirements()
    packages = (["PyTorch"] if not torch_installed() else []) + [r.split(">")[0] for r in missing]
    if not packages:
        return
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
    still_missing = missing_requirements() + ([] if torch_installed() else ["PyTorch"])
    if still_missing:
        raise DependencyError(f"{', '.join(still_missing)} still cannot be imported; restart Slicer and try again.")
