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
  holds the GIL. Slicer runs it with its ``PythonSlicer``, which is a launcher (CTK's app launcher)
  that starts the real Python as its own child: terminating the launcher would leave that child
  computing. So a cancel first asks the worker itself to stop (a file in the job's folder that
  ``segment_image``'s ``cancelled`` check looks for before every block), then, if it has not ended
  within :data:`CANCEL_GRACE_SECONDS`, kills the whole process group (tree on Windows). The job's
  temporary folder goes when the worker has gone; jobs still running when Python exits are ended.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import signal
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
#: Seconds a cancelled worker has to stop by itself before its process tree is killed.
CANCEL_GRACE_SECONDS = 5.0
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
    image: sitk.Image | Sequence[sitk.Image],
    tasks: Sequence[str] | None = None,
    device: str = "auto",
    with_probabilities: bool = False,
    max_block_voxels: int | None = None,
) -> ThreadJob:
    """Start ``segment_image`` on a copy-independent image (or one per channel) in a worker thread.

    ``model`` is a loaded :class:`~MultiTaskSegLib.model_files.SegmentationModel` or anything
    :func:`~MultiTaskSegLib.model_files.load_model` accepts (then it is loaded in the worker).
    """
    from .inference import segment_image
    from .model_files import as_model

    def work(progress, cancelled):
        loaded = as_model(model, progress)
        return segment_image(loaded, image, tasks, device, with_probabilities, progress, cancelled, max_block_voxels)

    return ThreadJob(work).start()


# ---------------------------------------------------------------------------------------------
# Subprocess runner

_RESULT_FILE = "result.json"
_CANCEL_FILE = "cancel"
_LABELS_FILE = "labels.nrrd"
_PROBABILITIES_FILE = "probabilities.nrrd"


class ChildProcessJob(BackgroundJob):
    """What the child-process runners share: start with a reader thread, kill the process tree, wait."""

    folder: Path

    def _launch(self, command: Sequence[str], environment: dict[str, str] | None) -> None:
        self._process = start_child(command, environment)
        _LIVE_JOBS.add(self)
        self._stderr: list[str] = []
        self._reader = threading.Thread(target=self._read, name=f"MultiTaskSeg {type(self).__name__} reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        raise NotImplementedError

    def _drain_stderr(self) -> threading.Thread:
        drain = threading.Thread(target=lambda: self._stderr.extend(self._process.stderr), daemon=True)
        drain.start()
        return drain

    def kill(self) -> None:
        """End the child and every process it started, at once (a worker may outlive its launcher)."""
        self._cancel.set()
        kill_process_tree(self._process)

    def wait(self, timeout: float | None = None) -> JobStatus:
        self._reader.join(timeout)
        return self.poll()


class SubprocessJob(ChildProcessJob):
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
        image: sitk.Image | Sequence[sitk.Image],
        tasks: Sequence[str] | None = None,
        device: str = "auto",
        with_probabilities: bool = False,
        python: str | os.PathLike | None = None,
        environment: dict[str, str] | None = None,
        max_block_voxels: int | None = None,
    ) -> None:
        from .model_files import as_model

        super().__init__()
        self.model = as_model(model)
        if self.model.path is None:
            raise InputError("the model has not been saved to a folder or .zip; save it before segmenting in a subprocess")
        self.folder = Path(tempfile.mkdtemp(prefix="multitaskseg-"))
        #: The process id of the Python that computes (a launcher's child), once it has reported it.
        self.worker_pid: int | None = None
        inputs = []
        for number, channel in enumerate([image] if isinstance(image, sitk.Image) else image):
            inputs.append(str(self.folder / f"input{number}.nrrd"))
            sitk.WriteImage(channel, inputs[-1], useCompression=False)
        command = [str(python or sys.executable), "-m", "MultiTaskSegLib.background",
                   "--model", str(self.model.path), "--image", *inputs,
                   "--output", str(self.folder), "--device", device, "--cancel-file", str(self.folder / _CANCEL_FILE)]
        if tasks:
            command += ["--tasks", *tasks]
        if with_probabilities:
            command.append("--probabilities")
        if max_block_voxels:
            command += ["--max-block-voxels", str(int(max_block_voxels))]
        self._launch(command, environment)

    def cancel(self) -> None:
        """Ask the worker to stop now; kill its process tree if it has not stopped after the grace time."""
        super().cancel()
        if self._process.poll() is not None:
            return
        try:
            (self.folder / _CANCEL_FILE).touch()
        except OSError:  # the folder is already gone: the worker has finished
            return
        timer = threading.Timer(CANCEL_GRACE_SECONDS, self._kill_if_running)
        timer.daemon = True
        timer.start()

    def _kill_if_running(self) -> None:
        if not self.poll().finished:
            self.kill()

    def _read(self) -> None:
        drain = self._drain_stderr()
        error = ""
        for line in self._process.stdout:
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "pid" in message:
                self.worker_pid = int(message["pid"])
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
            shutil.rmtree(self.folder, ignore_errors=True)
            _LIVE_JOBS.discard(self)

    def _load_result(self):
        from .inference import SegmentationResult

        metadata = json.loads((self.folder / _RESULT_FILE).read_text(encoding="utf-8"))
        probabilities = None
        if (self.folder / _PROBABILITIES_FILE).is_file():
            probabilities = sitk.ReadImage(str(self.folder / _PROBABILITIES_FILE))
        return SegmentationResult(
            labels=sitk.ReadImage(str(self.folder / _LABELS_FILE)),
            model=self.model,
            tasks=tuple(metadata["tasks"]),
            device=metadata["device"],
            probabilities=probabilities,
            warnings=list(metadata["warnings"]),
            created=metadata["created"],
        )


class CommandJob(ChildProcessJob):
    """A ``multitaskseg`` command (``finetune``) in a child process, progress read from its
    ``step N/M`` lines. Cancel ends its process tree at once: a training run keeps its last
    checkpoint and resumes when started again. The result is ``result`` (e.g. the new model's folder)."""

    def __init__(self, arguments: Sequence[str], result: Any = None, python: str | os.PathLike | None = None,
                 environment: dict[str, str] | None = None) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="multitaskseg-"))
        self._result = result
        self._launch([str(python or sys.executable), "-m", "MultiTaskSegLib.cli", *arguments], environment)

    def cancel(self) -> None:
        super().cancel()
        self.kill()

    def _read(self) -> None:
        drain = self._drain_stderr()
        for line in self._process.stdout:
            found = _STEP_LINE.search(line)
            if found:
                done, total = int(found.group(1)), int(found.group(2))
                self._report(done / max(total, 1), f"step {done}/{total}")
        code = self._process.wait()
        drain.join()
        try:
            if self._cancel.is_set():
                self._finish(CANCELLED, exception=CancelledError("cancelled; the run keeps its last checkpoint"))
            elif code != 0:
                detail = "".join(self._stderr[-20:]).strip() or f"exit status {code}"
                self._finish(FAILED, exception=(InputError if code == 2 else RuntimeError)(detail))
            else:
                self._finish(SUCCEEDED, result=self._result)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
            _LIVE_JOBS.discard(self)


_STEP_LINE = re.compile(r"step (\d+)/(\d+)")
def start_child(command: Sequence[str], environment: dict[str, str] | None) -> subprocess.Popen:
    """Start ``command`` with this library on its ``PYTHONPATH``, UTF-8 pipes, in its own process
    group (so a launcher's children can be ended together), without a console window on Windows."""
    library_parent = str(Path(__file__).resolve().parent.parent)
    environment = dict(os.environ if environment is None else environment)
    environment["PYTHONPATH"] = os.pathsep.join(p for p in (library_parent, environment.get("PYTHONPATH", "")) if p)
    environment["PYTHONIOENCODING"] = "utf-8"
    options: dict[str, Any] = {}
    if os.name == "nt":
        options["startupinfo"] = subprocess.STARTUPINFO(dwFlags=subprocess.STARTF_USESHOWWINDOW, wShowWindow=0)
        options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
    else:
        options["start_new_session"] = True
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment, text=True,
                            bufsize=1, encoding="utf-8", errors="replace", **options)


#: Subprocess jobs whose worker may still run; ended when this Python exits (Slicer closing).
_LIVE_JOBS: set[ChildProcessJob] = set()


def kill_process_tree(process: subprocess.Popen) -> None:
    """Kill a process started by a :class:`ChildProcessJob` and everything it started."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the group made by start_new_session
    except (ProcessLookupError, PermissionError):
        pass


@atexit.register
def end_all_jobs() -> None:
    """End every worker still running and remove its folder: no orphan keeps computing after exit."""
    for job in list(_LIVE_JOBS):
        job.kill()
        shutil.rmtree(job.folder, ignore_errors=True)
    _LIVE_JOBS.clear()


def _emit(message: dict) -> None:
    print(json.dumps(message), flush=True)


def worker_main(argv: Sequence[str] | None = None) -> int:
    """The child side of :class:`SubprocessJob`."""
    parser = argparse.ArgumentParser(description="MultiTaskSeg segmentation worker (used by the Slicer module)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--image", required=True, nargs="+", help="one image per channel of the task")
    parser.add_argument("--output", required=True)
    parser.add_argument("--tasks", nargs="+")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--probabilities", action="store_true")
    parser.add_argument("--cancel-file", help="stop as soon as this file exists")
    parser.add_argument("--max-block-voxels", type=int)
    args = parser.parse_args(argv)
    cancel_file = Path(args.cancel_file) if args.cancel_file else None
    _emit({"pid": os.getpid()})
    try:
        from .inference import segment_image
        from .model_files import load_model

        _emit({"fraction": 0.0, "stage": "loading the model"})
        model = load_model(args.model)
        images = [sitk.ReadImage(path) for path in args.image]
        result = segment_image(model, images, args.tasks, args.device, args.probabilities,
                               progress=lambda fraction, stage: _emit({"fraction": fraction, "stage": stage}),
                               cancelled=(lambda: cancel_file.exists()) if cancel_file else None,
                               max_block_voxels=args.max_block_voxels)
        output = Path(args.output)
        sitk.WriteImage(result.labels, str(output / _LABELS_FILE), useCompression=False)
        if result.probabilities is not None:
            sitk.WriteImage(result.probabilities, str(output / _PROBABILITIES_FILE), useCompression=False)
        metadata = {"tasks": list(result.tasks), "device": result.device, "warnings": result.warnings,
                    "created": result.created}
        (output / _RESULT_FILE).write_text(json.dumps(metadata), encoding="utf-8")
    except CancelledError:
        return 3
    except InputError as error:
        _emit({"error": str(error)})
        return 2
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
