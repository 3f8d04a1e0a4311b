"""Segmenting off the GUI thread: progress, cancellation, errors, and the same labels as in-process."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MultiTaskSegLib import background
from MultiTaskSegLib.errors import CancelledError, InputError
from MultiTaskSegLib.inference import segment_image
from MultiTaskSegLib.model_files import SegmentationModel, load_model, save_model
from conftest import make_tiny_model

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> SegmentationModel:
    created = make_tiny_model(["breast_mri", "cardiac_cta"], seed=3, varied=True, name="tiny")
    return load_model(save_model(created, tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture
def image() -> sitk.Image:
    z, y, x = np.mgrid[:16, :20, :24]
    item = sitk.GetImageFromArray((200 + 80 * np.sin(x / 3.0) + 60 * np.cos(y / 2.5) * z / 8).astype(np.float32))
    item.SetSpacing((1.3, 1.1, 1.7))
    item.SetDirection(sitk.VersorTransform((0.0, 0.3, 1.0), 0.4).GetMatrix())
    return item


def wait_polling(job, timeout: float = TIMEOUT) -> list[background.JobStatus]:
    """Poll as the widget's QTimer does; returns every status seen."""
    seen = [job.poll()]
    deadline = time.monotonic() + timeout
    while not seen[-1].finished:
        assert time.monotonic() < deadline, f"the job did not finish within {timeout} s"
        time.sleep(0.01)
        seen.append(job.poll())
    return seen


def test_thread_job_reports_growing_progress_and_gives_the_in_process_result(model, image):
    job = background.segment_in_thread(model, image, device="cpu", with_probabilities=True)
    seen = wait_polling(job)
    assert seen[-1].state == background.SUCCEEDED and seen[-1].percent == 100
    fractions = [status.fraction for status in seen]
    assert fractions == sorted(fractions)
    assert all(status.stage for status in seen)
    expected = segment_image(model, image, device="cpu")
    assert np.array_equal(sitk.GetArrayFromImage(job.result.labels), sitk.GetArrayFromImage(expected.labels))
    assert job.result.probabilities is not None


def test_progress_never_goes_backwards_even_if_reported_so():
    seen = []

    def work(progress, cancelled):
        progress(0.6, "predicting")
        progress(0.3, "predicting block 2")
        seen.append(job.poll())
        return "done"

    job = background.ThreadJob(work)
    assert job.start().wait(TIMEOUT).state == background.SUCCEEDED
    assert (seen[0].fraction, seen[0].stage) == (0.6, "predicting block 2")
    assert job.result == "done"


def test_cancelling_a_thread_job_stops_it_and_leaves_no_result():
    started = threading.Event()

    def work(progress, cancelled):
        started.set()
        while not cancelled():
            progress(0.1, "working")
            time.sleep(0.005)
        raise CancelledError("stopped")

    job = background.ThreadJob(work).start()
    assert started.wait(TIMEOUT)
    job.cancel()
    status = job.wait(TIMEOUT)
    assert status.state == background.CANCELLED and status.stage == "cancelled"
    with pytest.raises(CancelledError):
        job.result


def test_cancelling_a_real_segmentation_before_it_predicts(model, image):
    job = background.ThreadJob(lambda progress, cancelled: segment_image(
        model, image, device="cpu", progress=progress, cancelled=lambda: True))
    assert job.start().wait(TIMEOUT).state == background.CANCELLED


def test_a_failing_job_reports_the_error_message_to_the_gui():
    def work(progress, cancelled):
        raise InputError("the input volume has 3 components per voxel; choose one channel")

    job = background.ThreadJob(work).start()
    status = job.wait(TIMEOUT)
    assert status.state == background.FAILED and "choose one channel" in status.error
    with pytest.raises(InputError):
        job.result


def test_thread_job_loads_a_model_given_by_path(model, image):
    job = background.segment_in_thread(model.path, image, tasks=["breast_mri"], device="cpu")
    assert job.wait(TIMEOUT).state == background.SUCCEEDED
    assert job.result.tasks == ("breast_mri",)


def test_subprocess_job_gives_the_same_labels_and_cleans_up(model, image):
    job = background.SubprocessJob(model, image, device="cpu", with_probabilities=True)
    folder = job.folder
    seen = wait_polling(job)
    assert seen[-1].state == background.SUCCEEDED, seen[-1].error
    expected = segment_image(model, image, device="cpu")
    assert np.array_equal(sitk.GetArrayFromImage(job.result.labels), sitk.GetArrayFromImage(expected.labels))
    assert job.result.labels.GetDirection() == pytest.approx(image.GetDirection())
    assert job.result.probabilities.GetNumberOfComponentsPerPixel() == len(model.label_space)
    assert job.result.model is model and job.result.device == "cpu"
    assert not Path(folder).exists()


def test_cancelling_a_subprocess_job_ends_the_process(model, image):
    job = background.SubprocessJob(model, image, device="cpu")
    job.cancel()
    assert job.wait(TIMEOUT).state == background.CANCELLED
    assert job._process.poll() is not None
    with pytest.raises(CancelledError):
        job.result


def test_subprocess_input_errors_come_back_as_input_errors(model, image):
    job = background.SubprocessJob(model, image, tasks=["brain_t1_mri"], device="cpu")
    status = job.wait(TIMEOUT)
    assert status.state == background.FAILED
    assert "does not segment task" in status.error
    with pytest.raises(InputError):
        job.result


@pytest.fixture
def launcher(tmp_path) -> Path:
    """A stand-in for PythonSlicer: a launcher that starts the real Python as its child and waits."""
    script = tmp_path / "PythonLauncher"
    script.write_text(f'#!/bin/sh\n"{sys.executable}" "$@"\nexit $?\n', encoding="utf-8")
    script.chmod(0o755)
    return script


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def slow_job(model, launcher) -> background.SubprocessJob:
    """A subprocess job through the launcher, caught while its worker is predicting."""
    z, y, x = np.mgrid[:72, :72, :72]
    large = sitk.GetImageFromArray((200 + 80 * np.sin(x / 3.0) + 60 * np.cos(y / 2.5) * z / 30).astype(np.float32))
    job = background.SubprocessJob(model, large, device="cpu", python=launcher, max_block_voxels=512)
    deadline = time.monotonic() + TIMEOUT
    while job.worker_pid is None or job.poll().fraction < 0.1:
        assert not job.poll().finished, job.poll().error
        assert time.monotonic() < deadline, "the worker never started predicting"
        time.sleep(0.02)
    return job


@pytest.mark.skipif(os.name == "nt", reason="the launcher stand-in is a POSIX shell script")
def test_cancel_stops_the_worker_behind_a_launcher_within_seconds_and_removes_its_files(model, launcher):
    job = slow_job(model, launcher)
    worker, folder = job.worker_pid, job.folder
    assert worker != job._process.pid, "the worker should be the launcher's child"
    cancelled_at = time.monotonic()
    job.cancel()
    status = job.wait(TIMEOUT)
    assert status.state == background.CANCELLED
    assert time.monotonic() - cancelled_at < background.CANCEL_GRACE_SECONDS
    assert not alive(worker)
    assert not folder.exists()


@pytest.mark.skipif(os.name == "nt", reason="the launcher stand-in is a POSIX shell script")
def test_killing_a_job_ends_the_launcher_and_its_worker(model, launcher):
    job = slow_job(model, launcher)
    worker = job.worker_pid
    job.kill()
    assert job.wait(TIMEOUT).state == background.CANCELLED
    deadline = time.monotonic() + 5
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(worker)
    assert not job.folder.exists()
