"""``multitaskseg batch``: one model over many scans; resumable, shared between machines, with metrics.

**Inputs** are a folder (its image files and its sub-folders holding one DICOM series each), a glob
pattern (``'scans/**/*.nii.gz'``), or a CSV file with an ``image`` column and optional ``reference``
and ``case`` columns (relative paths are relative to the CSV file). A multi-channel task (e.g.
``brats_glioma_t1c_flair``) takes its first channel from ``image`` and each further one from the
column named after it (``FLAIR``); ``--channel`` picks the volume of 4-D files once for every file,
or once per channel in the task's order (``--channel 0 --channel 1`` when ``image`` and ``FLAIR``
name one 4-D file holding both). Every input is a *case*, named
by the CSV's ``case`` column or after its file (``scans/p01.nii.gz`` -> ``p01``); when two files
share a name, by their path below the inputs' common folder (``a/scan.nii.gz`` -> ``a_scan``). A
case's output is ``OUTPUT/<case>.seg.nrrd`` (names, colours, terminology) or ``OUTPUT/<case>.nii.gz``
(label-space values).

**Resuming**: every file is written under a temporary name and renamed once complete, so a file
under its final name is always whole. A case whose files exist is skipped; temporaries that a
killed run left behind are removed when the case's shard runs again.

**Sharding**: ``--shard i/N`` (``i`` counts from 0 to N-1, like ``$SLURM_ARRAY_TASK_ID`` with
``--array=0-(N-1)``) takes the cases whose position in the list sorted by case name is ``i``
modulo ``N``: shards are disjoint, together hold every case, differ in size by at most one, and
depend only on the list of inputs, so N machines given the same inputs can share one output folder.

**References and metrics**: a case's reference is the CSV's ``reference`` or the file named after
the case in ``--reference-dir`` (any image suffix), on the scan's own grid. When the run covers one
task (one ``--tasks``, or a model of one task) reference values are that task's source labels
(e.g. BraTS 1-4) and are mapped to its classes; with several tasks they are read as label-space
values, as a ``.nii.gz`` output holds them. Dice and HD95 per class are kept beside each output
(``<case>.metrics.json``, written before the output) and gathered into ``metrics.csv`` over every
listed case, so with shards the last one to finish writes the complete table.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Sequence, TextIO

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .evaluation import evaluate_labels
from .geometry import same_geometry
from .imageio import IMAGE_SUFFIXES, channels_per_input, is_image_path, read_image, read_images
from .inference import SegmentationResult, resolve_tasks, segment_image
from .model_files import SegmentationModel, load_model
from .segments import write_result
from .tasks import LabelSpace

OUTPUT_FORMATS = ("seg.nrrd", "nii.gz")
METRICS_TABLE = "metrics.csv"
METRICS_FIELDS = ["case", "task", "class", "label", "dice", "hd95_mm"]
#: Geometry (mm) within which a reference counts as being on the scan's grid.
REFERENCE_GRID_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class BatchCase:
    """One input scan, the name its outputs take, and its reference labels if any."""

    name: str
    image: Path
    reference: Path | None = None
    channels: tuple[tuple[str, Path], ...] = ()  # further channels of a multi-channel task: (column, file)


@dataclass
class BatchSummary:
    """What one ``batch`` run did; ``failed`` maps a case to what went wrong."""

    cases: int
    segmented: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


# ---------------------------------------------------------------------------------------------
# Listing the inputs


def strip_image_suffix(name: str) -> str:
    """``p01.nii.gz`` -> ``p01`` (the longest image suffix is removed)."""
    lowered = name.lower()
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if lowered.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_dicom_series_folder(folder: Path) -> bool:
    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def _is_scan(path: Path) -> bool:
    """An image file or DICOM series folder to segment (not a hidden temporary, not a segmentation)."""
    if path.name.startswith(".") or path.name.lower().endswith(".seg.nrrd"):
        return False
    if path.is_dir():
        return is_dicom_series_folder(path)
    return path.is_file() and is_image_path(path)


def images_in_folder(folder: Path) -> list[Path]:
    images = [path for path in sorted(folder.iterdir()) if _is_scan(path)]
    if not images:
        raise InputError(
            f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)}) and no DICOM series folders; "
            "give a folder of scans, a glob pattern such as 'scans/*/image.nii.gz', or a CSV file"
        )
    return images


def images_matching(pattern: str) -> list[Path]:
    images = [path for path in sorted(Path(p) for p in glob.glob(pattern, recursive=True)) if _is_scan(path)]
    if not images:
        raise InputError(
            f"no image file or DICOM series folder matches {pattern!r}; give a folder of scans, "
            "a glob pattern such as 'scans/*.nii.gz' (quoted, so the shell leaves it alone), or a CSV file"
        )
    return images


def case_names(images: Sequence[Path]) -> list[str]:
    """Each image's file name without its suffix; when two coincide, every image's path below the
    images' common folder, with ``_`` for the folder separators."""
    names = [strip_image_suffix(image.name) for image in images]
    if len(set(names)) == len(names):
        return names
    absolute = [image.absolute() for image in images]
    root = Path(os.path.commonpath([image.parent for image in absolute]))
    return [strip_image_suffix(str(image.relative_to(root))).replace(os.sep, "_") for image in absolute]


def cases_from_csv(table: Path) -> list[BatchCase]:
    """Rows ``image[,reference][,case]``; relative paths are taken from the CSV file's folder."""
    try:
        with open(table, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [name.strip() for name in reader.fieldnames or []]
            rows = [{key.strip(): (value or "").strip() for key, value in row.items() if key} for row in reader]
    except UnicodeDecodeError as error:
        raise InputError(f"{table} is not UTF-8 text (byte {error.start}); save it as 'CSV UTF-8' "
                         "(in Excel: Save As, CSV UTF-8) and run again") from None
    if "image" not in columns:
        raise InputError(f"{table} needs an 'image' column (optionally 'reference' and 'case'); "
                         f"its columns are {columns}")
    if not rows:
        raise InputError(f"{table} lists no images")
    for line, row in enumerate(rows, start=2):
        if not row["image"]:
            raise InputError(f"{table}, line {line}: the 'image' cell is empty")
    images = [table.parent / row["image"] for row in rows]
    derived = case_names(images)
    extra = [column for column in columns if column not in ("image", "reference", "case")]
    return [
        BatchCase(row.get("case") or name, image, table.parent / row["reference"] if row.get("reference") else None,
                  tuple((column, table.parent / row[column]) for column in extra if row.get(column)))
        for row, image, name in zip(rows, images, derived)
    ]


def check_case_names(cases: Sequence[BatchCase]) -> None:
    """Case names become file names: unique, not hidden, no folder separators."""
    seen: dict[str, Path] = {}
    for case in cases:
        if not case.name or case.name.startswith(".") or "/" in case.name or "\\" in case.name:
            raise InputError(f"case name {case.name!r} of {case.image} cannot be a file name; "
                             "use letters, digits, '-' and '_' (the CSV's 'case' column)")
        if case.name in seen:
            raise InputError(f"two inputs are both named case {case.name!r} ({seen[case.name]} and {case.image}); "
                             "give them distinct names in a CSV 'case' column")
        seen[case.name] = case.image


def list_cases(source: str | os.PathLike) -> list[BatchCase]:
    """The cases of a folder, a glob pattern or a CSV file, sorted by name."""
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".csv":
        cases = cases_from_csv(path)
    else:
        images = images_in_folder(path) if path.is_dir() else images_matching(str(source))
        cases = [BatchCase(name, image) for name, image in zip(case_names(images), images)]
    check_case_names(cases)
    return sorted(cases, key=lambda case: case.name)


def attach_references(cases: Sequence[BatchCase], reference_dir: str | os.PathLike | None) -> list[BatchCase]:
    """Give each case without a reference the file named after it in ``reference_dir``, if there is one."""
    if reference_dir is None:
        return list(cases)
    folder = Path(reference_dir)
    if not folder.is_dir():
        raise InputError(f"reference folder {folder} does not exist")
    by_name: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and is_image_path(path) and not path.name.startswith("."):
            by_name.setdefault(strip_image_suffix(path.name), path)
    return [case if case.reference else replace(case, reference=by_name.get(case.name)) for case in cases]


# ---------------------------------------------------------------------------------------------
# Sharding


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> (i, N), with shards counted from 0."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise InputError(f"--shard takes i/N, e.g. 0/4 for the first of four shards; got {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise InputError(f"--shard {text}: shards count from 0, so i must be 0 to N-1 with N >= 1")
    return index, count


def select_shard(cases: Sequence[BatchCase], index: int, count: int) -> list[BatchCase]:
    """The cases at positions ``index``, ``index + count``, ... of the list sorted by name."""
    ordered = sorted(cases, key=lambda case: case.name)
    return [case for position, case in enumerate(ordered) if position % count == index]


# ---------------------------------------------------------------------------------------------
# Files of a case


def output_path(folder: Path, case: BatchCase, output_format: str) -> Path:
    return folder / f"{case.name}.{output_format}"


def metrics_path(folder: Path, case: BatchCase) -> Path:
    return folder / f"{case.name}.metrics.json"


def case_files(folder: Path, case: BatchCase, output_format: str) -> list[Path]:
    """The files a finished case has: its output, and its metrics when it has a reference."""
    files = [output_path(folder, case, output_format)]
    if case.reference is not None:
        files.append(metrics_path(folder, case))
    return files


def is_done(folder: Path, case: BatchCase, output_format: str) -> bool:
    return all(path.is_file() for path in case_files(folder, case, output_format))


def remove_stale_temporaries(folder: Path, case: BatchCase, output_format: str) -> None:
    """Delete what an interrupted write of this case's files left (``.<file name>.*``)."""
    for path in case_files(folder, case, output_format):
        for temporary in folder.glob(f".{glob.escape(path.name)}.*"):
            temporary.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> Path:
    """Write to a temporary beside ``path``, then rename: ``path`` is never half-written.

    The temporary is opened like any new file (not with ``mkstemp``, which makes it private to the
    user), so shards on a cluster can read each other's results.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.partial")
    try:
        with open(temporary, "x", encoding="utf-8", newline="") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------
# Metrics


def reference_in_label_space(values: np.ndarray, label_space: LabelSpace, tasks: Sequence[str]) -> np.ndarray:
    """A reference's values as label-space indices: a single task's source labels are mapped to its
    classes; with several tasks the values already are label-space indices."""
    if len(tasks) != 1:
        return values
    task = label_space.task(tasks[0])
    return label_space.to_model_labels(task.name, task.map_labels(values))


def read_reference(path: Path, result: SegmentationResult) -> sitk.Image:
    """The reference labels in the model's label space, on the grid of ``result``."""
    reference = read_image(path, check_values=False)
    if not same_geometry(reference, result.labels, REFERENCE_GRID_TOLERANCE_MM):
        raise InputError(
            f"reference {path} is not on the scan's grid (size {reference.GetSize()} vs {result.labels.GetSize()}, "
            "or spacing, origin or direction differ); give the reference on the scan's own grid"
        )
    values = reference_in_label_space(sitk.GetArrayFromImage(reference), result.model.label_space, result.tasks)
    labels = sitk.GetImageFromArray(values.astype(np.int16))
    labels.CopyInformation(result.labels)
    return labels


def case_metrics(case_name: str, reference_path: Path, result: SegmentationResult) -> list[dict]:
    """Dice and HD95 (mm; None where undefined) of every class of the run's tasks, for one case."""
    reference = read_reference(reference_path, result)
    entries = result.model.label_space.entries
    rows = []
    for label, scores in evaluate_labels(result.labels, reference, result.label_indices[1:]).items():
        rows.append({
            "case": case_name, "task": entries[label].task, "class": entries[label].class_spec.name, "label": label,
            "dice": scores["dice"], "hd95_mm": None if math.isnan(scores["hd95_mm"]) else scores["hd95_mm"],
        })
    return rows


def write_metrics_table(folder: Path, cases: Sequence[BatchCase]) -> Path | None:
    """``metrics.csv`` from the metrics of every listed case that has them (``nan``: HD95 undefined)."""
    rows = []
    for case in cases:
        path = metrics_path(folder, case)
        if path.is_file():
            rows += json.loads(path.read_text(encoding="utf-8"))
    if not rows:
        return None
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=METRICS_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "hd95_mm": "nan" if row["hd95_mm"] is None else row["hd95_mm"]})
    return write_text_atomically(folder / METRICS_TABLE, table.getvalue())


# ---------------------------------------------------------------------------------------------
# One case


def process_case(model: SegmentationModel, case: BatchCase, folder: Path, output_format: str,
                 tasks: Sequence[str], device: str, channels: Sequence[int | None]) -> list[str]:
    """Segment one case and write its files (metrics first, output last); returns the warnings.

    ``channels``: as for :func:`read_images`, one per channel of the task (image first)."""
    images = read_images(channel_files(model, case, tasks), channels, task_channels(model, tasks))
    result = segment_image(model, images, tasks=tasks, device=device)
    if case.reference is not None:
        metrics = json.dumps(case_metrics(case.name, case.reference, result), indent=1)
        write_text_atomically(metrics_path(folder, case), metrics)
    write_result(result, output_path(folder, case, output_format))
    return result.warnings


def channel_files(model: SegmentationModel, case: BatchCase, tasks: Sequence[str]) -> list[Path]:
    """The case's image, then one file per further channel of the task, from the CSV columns named
    after the channels (case-insensitive)."""
    task_names = tasks or model.label_space.task_names
    channels = model.label_space.task(task_names[0]).channels
    columns = {column.lower(): path for column, path in case.channels}
    missing = [name for name in channels[1:] if name.lower() not in columns]
    if missing:
        raise InputError(f"task {task_names[0]} reads {', '.join(channels)}; case {case.name} has no "
                         f"{', '.join(missing)} image: give the inputs as a CSV with columns image, "
                         f"{', '.join(channels[1:])}")
    return [case.image, *(columns[name.lower()] for name in channels[1:])]


def task_channels(model: SegmentationModel, tasks: Sequence[str]) -> str:
    """The channels a case's files are read for, in messages: "the 2 channels of TASK (T1c, FLAIR)"."""
    task = model.label_space.task((tasks or model.label_space.task_names)[0])
    count = len(task.channels)
    return f"the {count} channel{'s' if count > 1 else ''} of {task.name} ({', '.join(task.channels)})"


def describe_error(error: Exception) -> str:
    """An input error says what to do already; anything else is named by its type."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return message if isinstance(error, InputError) else f"{type(error).__name__}: {message}"


# ---------------------------------------------------------------------------------------------
# Progress


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class ProgressBar:
    """A plain-text bar on ``stream``: cases finished, elapsed time and the estimated time left.

    On a terminal the bar is redrawn in place; elsewhere (a log file, a cluster job's output) each
    update is one line.
    """

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 24) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.width = width
        self.finished = 0
        self.started = time.monotonic()
        self.in_place = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.drawn = 0

    def line(self, latest: str) -> str:
        elapsed = time.monotonic() - self.started
        filled = self.width * self.finished // max(self.total, 1)
        left = _clock(elapsed / self.finished * (self.total - self.finished)) if self.finished else "?"
        return (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.finished}/{self.total} cases  "
                f"elapsed {_clock(elapsed)}  ETA {left}  {latest}")

    def advance(self, latest: str) -> None:
        self.finished += 1
        self._draw(self.line(latest))

    def note(self, message: str) -> None:
        """A message on its own line (a warning, a failed case), the bar staying below it."""
        if self.in_place and self.drawn:
            self.stream.write("\r" + " " * self.drawn + "\r")
            self.drawn = 0
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.in_place and self.drawn:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, text: str) -> None:
        if self.in_place:
            self.stream.write("\r" + text.ljust(self.drawn))
            self.drawn = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


# ---------------------------------------------------------------------------------------------
# The run


def summary_path(folder: Path, index: int, count: int) -> Path:
    return folder / ("batch_summary.json" if count == 1 else f"batch_summary.shard-{index}-of-{count}.json")


#: Written into the output folder by the first run: what its results were made with.
BATCH_IDENTITY_FILE = ".multitaskseg-batch.json"


def check_output_folder(folder: Path, cases: Sequence[BatchCase]) -> None:
    """The output folder must not hold the inputs (scans, further channels, references), under any
    name (a symbolic link included): an output of the same name would replace a reference."""
    for case in cases:
        for kind, path in (("input scans", case.image), ("reference label maps", case.reference),
                           *(("input channels", channel) for _, channel in case.channels)):
            if path is not None and path.resolve().parent == folder.resolve():
                raise InputError(f"the output folder {folder} holds {kind} ({path.name}, ...); choose another "
                                 "--output so the batch never takes them for its outputs or writes over them")


def check_same_batch(folder: Path, model: SegmentationModel, tasks: Sequence[str], output_format: str,
                     cases: Sequence[BatchCase], channels: Sequence[int | None] = ()) -> None:
    """A rerun into a folder resumes only the same batch: the same weights, tasks, format and channels
    picked from 4-D files (``channels``, one per channel of the task). Otherwise the earlier results
    would be counted as done and the summary would name a model that made none, or a volume the rerun
    did not ask for. A folder no batch wrote that already holds a case's output name is refused: those
    are the user's files."""
    identity = {"model": model.name, "weights_sha256": model.weights_sha256, "tasks": list(tasks), "format": output_format,
                "channels": list(channels)}
    path = folder / BATCH_IDENTITY_FILE
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        stored.setdefault("channels", identity["channels"])  # written before channels were recorded: not known
        if stored != identity:
            raise InputError(
                f"the output folder {folder} holds results of another batch (model {stored.get('model')}, tasks "
                f"{', '.join(stored.get('tasks', []))}, format {stored.get('format')}, channel(s) "
                f"{', '.join('none' if pick is None else str(pick) for pick in stored['channels'])}); use another "
                "--output, or the same model, tasks, format and --channel to resume it"
            )
        return
    taken = [output for output in (output_path(folder, case, output_format) for case in cases) if output.exists()]
    if taken:
        raise InputError(f"the output folder {folder} already holds {taken[0].name} (and {len(taken) - 1} more "
                         "output names), not written by a batch; choose an empty or new --output")
    write_text_atomically(path, json.dumps(identity, indent=2))


def run_batch(
    model_source: str | os.PathLike,
    inputs: str | os.PathLike,
    output: str | os.PathLike,
    tasks: Sequence[str] | None = None,
    output_format: str = "seg.nrrd",
    reference_dir: str | os.PathLike | None = None,
    shard: str | None = None,
    device: str = "auto",
    channels: Sequence[int | None] = (),
    stream: TextIO | None = None,
) -> BatchSummary:
    """Segment every case of ``inputs`` (this shard's share) into ``output``; see the module docstring.

    ``channels`` picks the volume of 4-D or multi-component files: one for every file, or one per
    channel of the task in its order (None: a file holding a single volume). Progress goes to
    ``stream`` (standard error by default).
    """
    stream = stream or sys.stderr
    if output_format not in OUTPUT_FORMATS:
        raise InputError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    folder = Path(output)
    every_case = attach_references(list_cases(inputs), reference_dir)
    check_output_folder(folder, every_case)
    index, count = parse_shard(shard) if shard else (0, 1)
    cases = select_shard(every_case, index, count)
    model = load_model(model_source)
    tasks = resolve_tasks(model, tasks)
    picks = channels_per_input(channels, len(model.label_space.task(tasks[0]).channels), task_channels(model, tasks))
    folder.mkdir(parents=True, exist_ok=True)
    check_same_batch(folder, model, tasks, output_format, every_case, picks)

    summary = BatchSummary(cases=len(cases))
    for case in cases:
        remove_stale_temporaries(folder, case, output_format)
    done = {case.name for case in cases if is_done(folder, case, output_format)}
    todo = [case for case in cases if case.name not in done]
    summary.skipped = sorted(done)
    shard_text = f" (shard {index}/{count} of {len(every_case)})" if count > 1 else ""
    stream.write(f"{len(cases)} cases{shard_text}: {len(summary.skipped)} already done, {len(todo)} to segment "
                 f"with {model.name} ({', '.join(tasks)})\n")

    started = time.monotonic()
    segment_cases(model, todo, folder, output_format, tasks, device, channels, summary, stream)
    summary.seconds = round(time.monotonic() - started, 2)

    metrics = write_metrics_table(folder, every_case) if any(case.reference for case in every_case) else None
    write_summary(summary_path(folder, index, count), summary, model, tasks, output_format, inputs, shard, metrics)
    return summary


def segment_cases(model: SegmentationModel, cases: Sequence[BatchCase], folder: Path, output_format: str,
                  tasks: Sequence[str], device: str, channels: Sequence[int | None], summary: BatchSummary,
                  stream: TextIO) -> None:
    """Segment ``cases`` one after the other under a progress bar, noting each outcome in ``summary``."""
    progress = ProgressBar(len(cases), stream)
    for case in cases:
        try:
            for warning in process_case(model, case, folder, output_format, tasks, device, channels):
                progress.note(f"warning: {case.name}: {warning}")
        except Exception as error:  # one bad case must not stop the others; it is reported and counted
            summary.failed[case.name] = describe_error(error)
            progress.note(f"failed: {case.name} ({case.image}): {summary.failed[case.name]}")
            progress.advance(f"{case.name} failed")
        else:
            summary.segmented.append(case.name)
            progress.advance(f"{case.name} done")
    progress.close()


def write_summary(path: Path, summary: BatchSummary, model: SegmentationModel, tasks: Sequence[str],
                  output_format: str, inputs, shard: str | None, metrics: Path | None) -> Path:
    record = {
        "model": model.name, "weights_sha256": model.weights_sha256, "tasks": list(tasks), "format": output_format,
        "input": str(inputs), "shard": shard, "cases": summary.cases, "segmented": summary.segmented,
        "skipped": summary.skipped, "failed": summary.failed, "seconds": summary.seconds,
        "metrics": metrics.name if metrics else None,
    }
    return write_text_atomically(path, json.dumps(record, indent=2))


def summary_line(summary: BatchSummary, folder: Path) -> str:
    line = (f"batch: {len(summary.segmented)} segmented, {len(summary.skipped)} already done, "
            f"{len(summary.failed)} failed of {summary.cases} cases in {_clock(summary.seconds)}; "
            f"outputs in {folder}")
    if summary.failed:
        line += "\nfailed cases (fix them and run the same command again; finished cases are skipped):"
        line += "".join(f"\n  {name}: {message}" for name, message in summary.failed.items())
    return line
