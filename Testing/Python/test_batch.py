"""``multitaskseg batch``: inputs, sharding, resuming after a kill, failing cases, metrics."""

from __future__ import annotations

import csv
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from conftest import make_tiny_model, write_tiny_dataset

from MultiTaskSegLib.batch import (
    BATCH_IDENTITY_FILE,
    BatchCase,
    list_cases,
    parse_shard,
    reference_in_label_space,
    run_batch,
    select_shard,
)
from MultiTaskSegLib.cli import main
from MultiTaskSegLib.errors import InputError
from MultiTaskSegLib.model_files import save_model
from MultiTaskSegLib.tasks import LabelSpace

TASKS = ("breast_mri", "cardiac_cta")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return save_model(make_tiny_model(TASKS, name="tiny"), tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("dataset"))


@pytest.fixture(scope="module")
def scans(dataset, tmp_path_factory) -> Path:
    """A flat folder of the six scans (``scans/``) and their labels under the same names (``labels/``)."""
    root = tmp_path_factory.mktemp("flat")
    for folder in ("scans", "labels"):
        (root / folder).mkdir()
    for task in TASKS:
        for case in sorted((dataset / task).iterdir()):
            shutil.copy(case / "image.nii.gz", root / "scans" / f"{task}_{case.name}.nii.gz")
            shutil.copy(case / "label.nii.gz", root / "labels" / f"{task}_{case.name}.nii.gz")
    return root


def segmentations_in(folder: Path) -> list[Path]:
    """The finished outputs (pathlib's glob also matches hidden temporaries, which are not outputs)."""
    return sorted(path for path in folder.glob("*.seg.nrrd") if not path.name.startswith("."))


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def whole_segmentation(path: Path) -> bool:
    """The file reads back as a segmentation with one segment per class of the model."""
    return len(slicerio.read_segmentation(str(path))["segments"]) == 2


# ---------------------------------------------------------------------------------------------
# Inputs


def test_a_folder_gives_its_scans_and_ignores_other_files(scans, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(scans / "scans", folder)
    (folder / "notes.txt").write_text("not a scan")
    (folder / ".breast_mri_case_000.nii.gz.1234.nii.gz").write_bytes(b"a temporary")
    (folder / "earlier.seg.nrrd").write_bytes(b"a segmentation")
    cases = list_cases(folder)
    assert [case.name for case in cases] == sorted(f"{t}_case_{n:03d}" for t in TASKS for n in range(3))
    assert all(case.image.parent == folder and case.reference is None for case in cases)


def test_a_glob_names_cases_by_their_path_when_file_names_coincide(dataset):
    cases = list_cases(str(dataset / "*" / "case_00[01]" / "image.nii.gz"))
    assert [case.name for case in cases] == [f"{t}_case_00{n}_image" for t in TASKS for n in range(2)]
    with pytest.raises(InputError, match="no image file or DICOM series folder matches"):
        list_cases(str(dataset / "*" / "*.nrrd"))


def test_a_csv_gives_images_references_and_case_names(scans):
    table = scans / "cases.csv"
    table.write_text("image,reference,case\n"
                     "scans/breast_mri_case_000.nii.gz,labels/breast_mri_case_000.nii.gz,first\n"
                     "scans/cardiac_cta_case_001.nii.gz,,\n")
    first, second = list_cases(table)
    assert first == BatchCase("cardiac_cta_case_001", scans / "scans" / "cardiac_cta_case_001.nii.gz")
    assert second == BatchCase("first", scans / "scans" / "breast_mri_case_000.nii.gz",
                               scans / "labels" / "breast_mri_case_000.nii.gz")
    table.write_text("path\nscans/breast_mri_case_000.nii.gz\n")
    with pytest.raises(InputError, match="needs an 'image' column"):
        list_cases(table)


# ---------------------------------------------------------------------------------------------
# Sharding


def test_a_csv_that_is_not_utf8_is_refused_with_what_to_do(scans, tmp_path):
    table = tmp_path / "cases.csv"
    table.write_bytes("image,case\n".encode() + f"{scans / 'scans' / 'breast_mri_case_000.nii.gz'},Müller\n".encode("cp1252"))
    with pytest.raises(InputError, match="not UTF-8.*CSV UTF-8"):
        list_cases(table)


def test_shards_are_disjoint_cover_every_case_and_do_not_depend_on_the_listing_order():
    cases = [BatchCase(f"case_{n}", Path(f"case_{n}.nii.gz")) for n in range(7)]
    shards = [select_shard(cases, index, 3) for index in range(3)]
    names = [[case.name for case in shard] for shard in shards]
    assert sorted(name for shard in names for name in shard) == sorted(case.name for case in cases)  # disjoint, all
    assert [len(shard) for shard in shards] == [3, 2, 2]
    shuffled = [cases[n] for n in np.random.default_rng(0).permutation(len(cases))]
    assert [select_shard(shuffled, index, 3) for index in range(3)] == shards


@pytest.mark.parametrize("text", ["2/2", "1", "a/b", "0/0", "-1/2"])
def test_a_shard_is_i_of_n_counted_from_0(text):
    assert parse_shard("1/2") == (1, 2)
    with pytest.raises(InputError, match="shard"):
        parse_shard(text)


def test_two_shards_share_one_output_folder_and_the_last_completes_the_metrics(model_path, scans, tmp_path):
    output = tmp_path / "out"
    first = run_batch(model_path, scans / "scans", output, reference_dir=scans / "labels", shard="0/2", device="cpu")
    second = run_batch(model_path, scans / "scans", output, reference_dir=scans / "labels", shard="1/2", device="cpu")
    every = sorted(f"{t}_case_{n:03d}" for t in TASKS for n in range(3))
    assert not set(first.segmented) & set(second.segmented)
    assert sorted(first.segmented + second.segmented) == every
    assert [path.name.removesuffix(".seg.nrrd") for path in segmentations_in(output)] == every
    for index, summary in enumerate((first, second)):
        record = json.loads((output / f"batch_summary.shard-{index}-of-2.json").read_text())
        assert record["segmented"] == summary.segmented and record["failed"] == {}
    rows = read_csv(output / "metrics.csv")
    assert sorted({row["case"] for row in rows}) == every
    assert {(row["task"], row["class"]) for row in rows} == {("breast_mri", "Pectoral muscle"),
                                                            ("cardiac_cta", "Coronary artery")}


# ---------------------------------------------------------------------------------------------
# Failing cases, resuming


def test_a_corrupt_scan_is_reported_and_the_others_are_written(model_path, scans, tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("breast_mri_case_000.nii.gz", "cardiac_cta_case_000.nii.gz"):
        shutil.copy(scans / "scans" / name, folder / name)
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b this is no image")
    output = tmp_path / "out"
    code = main(["batch", "--model", str(model_path), "--input", str(folder), "--output", str(output),
                 "--device", "cpu"])
    printed = capsys.readouterr()
    assert code == 1
    assert [path.name for path in segmentations_in(output)] == ["breast_mri_case_000.seg.nrrd",
                                                                        "cardiac_cta_case_000.seg.nrrd"]
    record = json.loads((output / "batch_summary.json").read_text())
    assert list(record["failed"]) == ["broken"] and "not an image" in record["failed"]["broken"]
    assert record["segmented"] == ["breast_mri_case_000", "cardiac_cta_case_000"]
    assert "failed: broken" in printed.err and "ETA" in printed.err
    assert "2 segmented, 0 already done, 1 failed of 3 cases" in printed.out


def test_a_killed_run_leaves_only_whole_files_and_a_rerun_finishes_it(model_path, scans, tmp_path):
    output = tmp_path / "out"
    command = [sys.executable, "-m", "MultiTaskSegLib.cli", "batch", "--model", str(model_path),
               "--input", str(scans / "scans"), "--output", str(output), "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not segmentations_in(output) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the batch run ended before it could be killed"

    finished = segmentations_in(output)
    assert 1 <= len(finished) < 6
    assert all(whole_segmentation(path) for path in output.iterdir() if not path.name.startswith("."))
    unfinished = sorted({path.name.removesuffix(".nii.gz") for path in (scans / "scans").iterdir()}
                        - {path.name.removesuffix(".seg.nrrd") for path in finished})
    # A kill during a write leaves a temporary: plant one for an unfinished case.
    (output / f".{unfinished[0]}.seg.nrrd.partial.seg.nrrd").write_bytes(b"NRRD0004\n# half")
    written = {path: path.stat().st_mtime_ns for path in finished}

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert rerun.returncode == 0, rerun.stderr
    record = json.loads((output / "batch_summary.json").read_text())
    assert record["skipped"] == [path.name.removesuffix(".seg.nrrd") for path in finished]
    assert record["segmented"] == unfinished
    assert all(path.stat().st_mtime_ns == time_ns for path, time_ns in written.items())  # not written again
    assert [path.name for path in output.iterdir() if path.name.startswith(".")] == [BATCH_IDENTITY_FILE]
    assert len(segmentations_in(output)) == 6
    assert all(whole_segmentation(path) for path in segmentations_in(output))


# ---------------------------------------------------------------------------------------------
# Metrics


def test_a_single_task_s_source_labels_are_mapped_to_its_classes():
    space = LabelSpace.from_names(TASKS)
    source = np.array([0, 1, 1, 0], dtype=np.uint8)
    assert reference_in_label_space(source, space, ["cardiac_cta"]).tolist() == [0, 2, 2, 0]
    assert reference_in_label_space(source, space, list(TASKS)).tolist() == [0, 1, 1, 0]


def test_metrics_compare_with_the_reference_on_the_scan_s_grid(model_path, scans, tmp_path):
    cardiac = tmp_path / "cardiac"
    cardiac.mkdir()
    for path in (scans / "scans").glob("cardiac_cta_*"):
        shutil.copy(path, cardiac / path.name)
    first = run_batch(model_path, cardiac, tmp_path / "labels", tasks=["cardiac_cta"], output_format="nii.gz",
                      device="cpu")
    assert first.exit_code == 0
    # The model's own labels, written back as the task's source labels, must score a Dice of 1.
    references = tmp_path / "references"
    references.mkdir()
    for path in (tmp_path / "labels").glob("*.nii.gz"):
        labels = sitk.ReadImage(str(path))
        sitk.WriteImage(sitk.Cast(labels == 2, sitk.sitkUInt8), str(references / path.name))
    run_batch(model_path, cardiac, tmp_path / "again", tasks=["cardiac_cta"], output_format="nii.gz",
              reference_dir=references, device="cpu")
    rows = read_csv(tmp_path / "again" / "metrics.csv")
    assert sorted(row["case"] for row in rows) == [f"cardiac_cta_case_00{n}" for n in range(3)]
    assert {(row["task"], row["class"], row["label"]) for row in rows} == {("cardiac_cta", "Coronary artery", "2")}
    assert all(float(row["dice"]) == 1.0 for row in rows)


def test_a_reference_on_another_grid_fails_its_case(model_path, scans, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(scans / "scans" / "breast_mri_case_000.nii.gz", folder)
    references = tmp_path / "references"
    references.mkdir()
    sitk.WriteImage(sitk.Image(5, 5, 5, sitk.sitkUInt8), str(references / "breast_mri_case_000.nii.gz"))
    summary = run_batch(model_path, folder, tmp_path / "out", reference_dir=references, device="cpu")
    assert "not on the scan's grid" in summary.failed["breast_mri_case_000"]
    assert segmentations_in(tmp_path / "out") == []


def test_the_output_folder_may_not_hold_the_inputs(model_path, scans, tmp_path):
    folder = tmp_path / "scans"
    shutil.copytree(scans / "scans", folder)
    with pytest.raises(InputError, match="holds input scans"):
        run_batch(model_path, folder, folder)


def test_an_output_folder_that_links_to_the_input_folder_is_refused(model_path, scans, tmp_path):
    link = tmp_path / "results"
    link.symlink_to(scans / "scans", target_is_directory=True)
    with pytest.raises(InputError, match="holds input scans"):
        run_batch(model_path, scans / "scans", link)


def test_the_reference_folder_is_refused_as_the_output_and_its_labels_stay(model_path, scans, tmp_path):
    labels = tmp_path / "labels"
    shutil.copytree(scans / "labels", labels)
    before = {path: path.read_bytes() for path in labels.iterdir()}
    with pytest.raises(InputError, match="holds reference label maps"):
        run_batch(model_path, scans / "scans", labels, output_format="nii.gz", reference_dir=labels, device="cpu")
    assert {path: path.read_bytes() for path in labels.iterdir()} == before


def test_a_folder_no_batch_wrote_that_holds_an_output_name_is_refused(model_path, scans, tmp_path):
    """Files of the user's that carry a case's output name are neither taken as done nor replaced."""
    mine = tmp_path / "my_labels"
    shutil.copytree(scans / "labels", mine)
    before = {path: path.read_bytes() for path in mine.iterdir()}
    with pytest.raises(InputError, match="already holds .*not written by a batch"):
        run_batch(model_path, scans / "scans", mine, output_format="nii.gz", device="cpu", stream=io.StringIO())
    assert {path: path.read_bytes() for path in mine.iterdir()} == before


def test_a_rerun_with_another_model_or_tasks_does_not_take_the_earlier_results_as_its_own(model_path, scans, tmp_path):
    folder = tmp_path / "out"
    quiet = io.StringIO()
    run_batch(model_path, scans / "scans", folder, tasks=["breast_mri"], device="cpu", stream=quiet)
    written = {path: path.read_bytes() for path in segmentations_in(folder)}
    with pytest.raises(InputError, match="holds results of another batch"):
        run_batch(model_path, scans / "scans", folder, tasks=["cardiac_cta"], device="cpu", stream=quiet)
    other = save_model(make_tiny_model(TASKS, seed=9, name="other"), tmp_path / "other")
    with pytest.raises(InputError, match="model tiny"):
        run_batch(other, scans / "scans", folder, tasks=["breast_mri"], device="cpu", stream=quiet)
    assert {path: path.read_bytes() for path in segmentations_in(folder)} == written
    summary = run_batch(model_path, scans / "scans", folder, tasks=["breast_mri"], device="cpu", stream=quiet)
    assert len(summary.skipped) == len(written) and not summary.segmented


def test_a_full_disk_when_the_batch_summary_is_written_is_an_error_and_keeps_the_results(model_path, scans, tmp_path,
                                                                                          monkeypatch, capsys):
    import errno

    from MultiTaskSegLib import batch

    def disk_full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(batch, "write_summary", disk_full)
    output = tmp_path / "out"
    code = main(["batch", "--model", str(model_path), "--input", str(scans / "scans"), "--output", str(output),
                 "--device", "cpu"])
    error = capsys.readouterr().err
    assert code == 2
    assert "No space left on device" in error and "batch_summary" in error and "Traceback" not in error
    assert segmentations_in(output)  # what was segmented before is kept


def test_the_progress_bar_redraws_in_place_on_the_terminal_it_defaults_to(monkeypatch):
    """With no stream given the bar writes to stderr; when that is a terminal it redraws one line."""
    import os

    from MultiTaskSegLib.batch import ProgressBar

    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        assert ProgressBar(total=3).in_place
    os.close(leader)
    assert not ProgressBar(total=3, stream=io.StringIO()).in_place


def test_a_rerun_picking_another_channel_does_not_take_the_earlier_results_as_its_own(model_path, dataset, tmp_path):
    """A batch of 4-D files run with the wrong --channel, then again with the right one into the same
    folder, must not count the wrong channel's segmentations as done."""
    scans = tmp_path / "scans"
    scans.mkdir()
    for case in ("case_000", "case_001"):
        volumes = [sitk.ReadImage(str(dataset / "breast_mri" / name / "image.nii.gz")) for name in (case, "case_002")]
        sitk.WriteImage(sitk.JoinSeries(volumes), str(scans / f"{case}.nii.gz"))
    folder = tmp_path / "out"
    quiet = io.StringIO()
    run_batch(model_path, scans, folder, tasks=["breast_mri"], device="cpu", channels=[1], stream=quiet)
    written = {path: path.read_bytes() for path in segmentations_in(folder)}
    with pytest.raises(InputError, match="holds results of another batch.*channel"):
        run_batch(model_path, scans, folder, tasks=["breast_mri"], device="cpu", channels=[0], stream=quiet)
    assert {path: path.read_bytes() for path in segmentations_in(folder)} == written
    summary = run_batch(model_path, scans, folder, tasks=["breast_mri"], device="cpu", channels=[1], stream=quiet)
    assert len(summary.skipped) == 2 and not summary.segmented  # the same channel resumes
