"""Running a segmentation off the GUI thread, so 3D Slicer stays responsive.

A job is started from the GUI thread and polled (the Slicer module polls with a ``QTimer``):
:meth:`poll` gives the state, the progress fraction and the current stage. :meth:`cancel` stops the
work; nothing is half-written because a job never touches MRML: it returns a
:class:`~MultiTaskSegLib.inference.SegmentationResult`, and the caller writes it into the scene on the
GUI thread after success (:func:`MultiTaskSegLib.mrml.write_segmentation`).

Two runners share that interface:

* :class:`ThreadJob` runs ``segment_image`` in a worker thread (PyTorch releases the GIL while it
  computes). It needs nothing but this library; headless scripts and tests use it.
* :class:`SubprocessJob` runs it in a separate Python process (``python -m
  MultiTaskSegLib.background``), which keeps the GUI fluid even where the embedding application
  holds the GIL, and which a cancel ends at once. Slicer runs it with its ``PythonSlicer``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import SimpleITK as sitk

from .errors import CancelledError, InputError

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"
#: Work done by a job: ``work(progress, cancelled)`` returns the result or raises.
Work = Callable[[Callable[[float, str], None], Callable[[], bool]], Any]


@dataclass(frozen=True)
class JobStatus:
    """A snapshot of a job, safe to read from the GUI thread."""

    state: str = RUNNING
    fraction: float = 0.0
    stage: str = "starting"
    error: str = ""

    @property
    def finished(self) -> bool:
        return self.state != RUNNING

    @property
    def percent(self) -> int:
        return int(round(100 * self.fraction))


class BackgroundJob:
    """What every runner offers: start, poll, cancel, wait, and the result after success."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status = JobStatus()
        self._cancel = threading.Event()
        self._result: Any = None
        self._exception: BaseException | None = None

    def poll(self) -> JobStatus:
        with self._lock:
            return self._status

    def cancel(self) -> None:
        """Ask the work to stop; the state becomes ``cancelled`` once it has."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def wait(self, timeout: float | None = None) -> JobStatus:
        raise NotImplementedError

    @property
    def result(self) -> Any:
        """The work's return value; raises the work's error when it failed or was cancelled."""
        status = self.poll()
        if status.state == SUCCEEDED:
            return self._result
        if self._exception is not None:
            raise self._exception
        if status.state == CANCELLED:
            raise CancelledError("the segmentation was cancelled; nothing was written")
        raise RuntimeError(f"the job has not finished (state {status.state})")

    def _report(self, fraction: float, stage: str) -> None:
        with self._lock:
            if self._status.state == RUNNING:
                fraction = min(1.0, max(self._status.fraction, float(fraction)))
                self._status = replace(self._status, fraction=fraction, stage=stage)

    def _finish(self, state: str, result: Any = None, exception: BaseException | None = None) -> None:
        self._result, self._exception = result, exception
        with self._lock:
            fraction = 1.0 if state == SUCCEEDED else self._status.fraction
            stage = {SUCCEEDED: "done", CANCELLED: "cancelled", FAILED: "failed"}[state]
            self._status = JobStatus(state, fraction, stage, str(exception) if exception and state == FAILED else "")


class ThreadJob(BackgroundJob):
    """``work(progress, cancelled)`` in a daemon worker thread."""

    def __init__(self, work: Work, name: str = "MultiTaskSeg segmentation") -> None:
        super().__init__()
        self._work = work
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "ThreadJob":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            result = self._work(self._report, self._cancel.is_set)
        except CancelledError as error:
            self._finish(CANCELLED, exception=error)
        except BaseException as error:  # reported to the GUI thread, never lost in the worker
            self._finish(CANCELLED if self._cancel.is_set() else FAILED, exception=error)
        else:
            self._finish(CANCELLED if self._cancel.is_set() else SUCCEEDED, result=result)

    def wait(self, timeout: float | None = None) -> JobStatus:
        self._thread.join(timeout)
        return self.poll()


def segment_in_thread(
    model,
    image: sitk.Image,
    tasks: Sequence[str] | None = None,
    device: str = "auto",
    with_probabilities: bool = False,
    max_block_voxels: int | None = None,
) -> ThreadJob:
    """Start ``segment_image`` on a copy-independent image in a worker thread.

    ``model`` is a loaded :class:`~MultiTaskSegLib.model_files.SegmentationModel` or anything
    :func:`~MultiTaskSegLib.model_files.load_model` accepts (then it is loaded in the worker).
    """
    from .inference import segment_image
    from .model_files import SegmentationModel, load_model

    def work(progress, cancelled):
        loaded = model
        if not isinstance(loaded, SegmentationModel):
            progress(0.0, "loading the model")
            loaded = load_model(loaded)
        return segment_image(loaded, image, tasks, device, with_probabilities, progress, cancelled, max_block_voxels)

    return ThreadJob(work).start()


# ---------------------------------------------------------------------------------------------
# Subprocess runner

_RESULT_FILE = "result.json"
_LABELS_FILE = "labels.nrrd"
_PROBABILITIES_FILE = "probabilities.nrrd"


class SubprocessJob(BackgroundJob):
    """``segment_image`` in a child Python process that reports progress as JSON lines.

    The image travels through a temporary folder (removed when the job ends); the child loads the
    model from its folder or archive. ``python`` is the interpreter to run (``PythonSlicer`` inside
    Slicer); it must be able to import torch, SimpleITK and this library. ``environment`` is the
    child's environment (default: this process's; Slicer passes its startup environment), to which
    the library's folder is added on ``PYTHONPATH``.
    """

    def __init__(
        self,
        model,
        image: sitk.Image,
        tasks: Sequence[str] | None = None,
        device: str = "auto",
        with_probabilities: bool = False,
        python: str | os.PathLike | None = None,
        environment: dict[str, str] | None = None,
    ) -> None:
        from .model_files import SegmentationModel, load_model

        super().__init__()
        self.model = model if isinstance(model, SegmentationModel) else load_model(model)
        if self.model.path is None:
            raise InputError("the model has not been saved to a folder or .zip; save it before segmenting in a subprocess")
        self._folder = Path(tempfile.mkdtemp(prefix="multitaskseg-"))
        sitk.WriteImage(image, str(self._folder / "input.nrrd"), useCompression=False)
        library_parent = str(Path(__file__).resolve().parent.parent)
        environment = dict(os.environ if environment is None else environment)
        environment["PYTHONPATH"] = os.pathsep.join(p for p in (library_parent, environment.get("PYTHONPATH", "")) if p)
        command = [str(python or sys.executable), "-m", "MultiTaskSegLib.background",
                   "--model", str(self.model.path), "--image", str(self._folder / "input.nrrd"),
                   "--output", str(self._folder), "--device", device]
        if tasks:
            command += ["--tasks", *tasks]
        if with_probabilities:
            command.append("--probabilities")
        hidden_console = {}
        if os.name == "nt":  # no console window flashing up beside Slicer
            hidden_console["startupinfo"] = subprocess.STARTUPINFO(dwFlags=subprocess.STARTF_USESHOWWINDOW, wShowWindow=0)
        self._process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment, text=True, bufsize=1,
            **hidden_console,
        )
        self._stderr: list[str] = []
        self._reader = threading.Thread(target=self._read, name="MultiTaskSeg subprocess reader", daemon=True)
        self._reader.start()

    def cancel(self) -> None:
        super().cancel()
        if self._process.poll() is None:
            self._process.terminate()

    def wait(self, timeout: float | None = None) -> JobStatus:
        self._reader.join(timeout)
        return self.poll()

    def _read(self) -> None:
        drain = threading.Thread(target=lambda: self._stderr.extend(self._process.stderr), daemon=True)
        drain.start()
        error = ""
        for line in self._process.stdout:
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "fraction" in message:
                self._report(message["fraction"], message.get("stage", ""))
            error = message.get("error", error)
        code = self._process.wait()
        drain.join()
        try:
            if self._cancel.is_set():
                self._finish(CANCELLED, exception=CancelledError("the segmentation was cancelled; nothing was written"))
            elif code != 0:
                detail = error or "".join(self._stderr[-20:]).strip() or f"exit status {code}"
                exception_type = InputError if error else RuntimeError
                self._finish(FAILED, exception=exception_type(detail))
            else:
                self._finish(SUCCEEDED, result=self._load_result())
        except BaseException as problem:
            self._finish(FAILED, exception=problem)
        finally:
            shutil.rmtree(self._folder, ignore_errors=True)

    def _load_result(self):
        from .inference import SegmentationResult

        metadata = json.loads((self._folder / _RESULT_FILE).read_text(encoding="utf-8"))
        probabilities = None
        if (self._folder / _PROBABILITIES_FILE).is_file():
            probabilities = sitk.ReadImage(str(self._folder / _PROBABILITIES_FILE))
        return SegmentationResult(
            labels=sitk.ReadImage(str(self._folder / _LABELS_FILE)),
            model=self.model,
            tasks=tuple(metadata["tasks"]),
            device=metadata["device"],
            probabilities=probabilities,
            warnings=list(metadata["warnings"]),
            created=metadata["created"],
        )


def _emit(message: dict) -> None:
    print(json.dumps(message), flush=True)


def worker_main(argv: Sequence[str] | None = None) -> int:
    """The child side of :class:`SubprocessJob`."""
    parser = argparse.ArgumentParser(description="MultiTaskSeg segmentation worker (used by the Slicer module)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--tasks", nargs="+")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--probabilities", action="store_true")
    args = parser.parse_args(argv)
    try:
        from .inference import segment_image
        from .model_files import load_model

        _emit({"fraction": 0.0, "stage": "loading the model"})
        model = load_model(args.model)
        image = sitk.ReadImage(args.image)
        result = segment_image(model, image, args.tasks, args.device, args.probabilities,
                               progress=lambda fraction, stage: _emit({"fraction": fraction, "stage": stage}))
        output = Path(args.output)
        sitk.WriteImage(result.labels, str(output / _LABELS_FILE), useCompression=False)
        if result.probabilities is not None:
            sitk.WriteImage(result.probabilities, str(output / _PROBABILITIES_FILE), useCompression=False)
        metadata = {"tasks": list(result.tasks), "device": result.device, "warnings": result.warnings,
                    "created": result.created}
        (output / _RESULT_FILE).write_text(json.dumps(metadata), encoding="utf-8")
    except InputError as error:
        _emit({"error": str(error)})
        return 2
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
