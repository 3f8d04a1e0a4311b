"""Segment one volume with a model: preprocessing, prediction, and the way back to the source grid.

The same call serves ``multitaskseg segment``, batch runs and the Slicer module: a SimpleITK image
in, a label map on the exact input grid out, restricted to the requested tasks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .inferers import CancelCheck, InferenceOptions, ProgressCallback
from .errors import InputError
from .geometry import resample_probabilities_onto
from .imageio import available_memory_bytes, check_image
from .model_files import SegmentationModel
from .plausibility import CARD_KEY, implausible_volumes
from .postprocessing import keep_largest_regions, segment_unsure_regions
from .preprocessing import background_outside, prepare_image, undecided_box, working_grid_sides
from .tasks import Task

#: Model-card key: true when the model segments as the mean of the scan's and its mirror's predictions.
MIRROR_KEY = "test_time_mirroring"
#: Working spacing further than this factor from the input's spacing triggers a warning.
SPACING_WARNING_FACTOR = 3.0
#: A scan has hundreds of intensity levels (an 8-bit skull-stripped T1 some 130); a label map or mask a few dozen.
LABEL_MAP_MAX_VALUES = 64


@dataclass
class SegmentationResult:
    """Labels (label-space indices) on the source grid, and what produced them."""

    labels: sitk.Image
    model: SegmentationModel
    tasks: tuple[str, ...]
    device: str
    probabilities: sitk.Image | None = None  # vector image: one component per label of ``label_indices``
    warnings: list[str] = field(default_factory=list)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%SZ"))

    @property
    def label_indices(self) -> tuple[int, ...]:
        """Background plus the label-space indices of the requested tasks' classes."""
        return (0,) + tuple(i for task in self.tasks for i in self.model.label_space.indices_for_task(task))


def choose_device(requested: str = "auto") -> torch.device:
    """``auto`` takes the GPU when there is one; ``cuda`` without a GPU is an error that says so."""
    requested = requested.lower()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu or auto")
    if requested not in ("cpu",) and not requested.startswith("cuda"):
        raise InputError(f"device must be auto, cpu or cuda, got {requested!r}")
    return torch.device(requested)


def intensity_sample(image: sitk.Image) -> np.ndarray:
    """Some 200,000 voxels spread over the whole image: enough to tell what kind of image it is."""
    values = sitk.GetArrayViewFromImage(image)
    return values.ravel()[:: max(1, values.size // 200_000)]


def looks_like_ct(image: sitk.Image) -> bool:
    """CT stores Hounsfield units, so air (-1000) or, in a crop inside the body, fat (-100) lies well
    below zero; MR intensities are not negative like that."""
    return float(np.percentile(intensity_sample(image), 1)) < -50.0


def label_map_warnings(image: sitk.Image) -> list[str]:
    """A label map or mask given as the scan (the files sit side by side) would be segmented as one."""
    sample = intensity_sample(image)
    values = np.unique(sample)
    if values.size > LABEL_MAP_MAX_VALUES or not np.array_equal(sample, np.round(sample)):
        return []
    shown = ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if values.size > 8 else "")
    return [f"the image holds only {values.size} distinct values ({shown}): it looks like a label map or mask, "
            "not a scan; give the scan itself"]


def resolve_tasks(model: SegmentationModel, tasks: Sequence[str] | None) -> tuple[str, ...]:
    if not tasks:
        return model.label_space.task_names
    unknown = [t for t in tasks if t not in model.label_space.task_names]
    if unknown:
        raise InputError(
            f"model {model.name} does not segment task(s) {', '.join(unknown)}; "
            f"it covers {', '.join(model.label_space.task_names)}"
        )
    return tuple(dict.fromkeys(tasks))


def preprocessing_task(model: SegmentationModel, image: sitk.Image, tasks: Sequence[str], warnings: list[str]) -> Task:
    """The task whose normalisation and spacing the image gets: one modality per scan."""
    requested = [model.label_space.task(name) for name in tasks]
    is_ct = looks_like_ct(image)
    matching = [task for task in requested if (task.modality == "CT") == is_ct]
    if not matching:
        modality = "CT (Hounsfield units)" if is_ct else "MR-like (no air or fat below -50 HU)"
        # Some exporters drop the rescale intercept: such a CT starts at 0 like an MR.
        unshifted = not is_ct and float(intensity_sample(image).min()) >= 0
        warnings.append(
            f"the image looks {modality} but the requested task(s) {', '.join(tasks)} expect "
            f"{'/'.join(sorted({t.modality for t in requested}))}; results may be meaningless"
            + ("; if it is a CT stored without its -1024 HU offset (air at 0, water at 1024), subtract 1024 first"
               if unshifted else "")
        )
        return requested[0]
    return matching[0]


def check_input_against_model(model: SegmentationModel, image: sitk.Image, tasks: Sequence[str]) -> list[str]:
    """Warnings for an input that does not fit the model card (modality, spacing)."""
    return preprocessing_plan(model, image, tasks)[1]


def preprocessing_plan(model: SegmentationModel, image: sitk.Image, tasks: Sequence[str]) -> tuple[Task, list[str]]:
    """The task whose preprocessing the image gets, and the warnings the model card raises."""
    warnings = label_map_warnings(image)
    task = preprocessing_task(model, image, tasks, warnings)
    spacing = np.asarray(image.GetSpacing())
    working = task.working_spacing_mm
    if spacing.max() > working * SPACING_WARNING_FACTOR or spacing.min() < working / SPACING_WARNING_FACTOR:
        warnings.append(
            f"the image spacing {tuple(round(float(s), 2) for s in spacing)} mm is far from the model's working "
            f"spacing of {working} mm for {task.name}; it will be resampled, but fine structures may be lost"
        )
    return task, warnings


def segment_image(
    model: SegmentationModel,
    image: sitk.Image | Sequence[sitk.Image],
    tasks: Sequence[str] | None = None,
    device: str = "auto",
    with_probabilities: bool = False,
    progress: ProgressCallback | None = None,
    cancelled: CancelCheck | None = None,
    max_block_voxels: int | None = None,
    mirror: bool | None = None,
) -> SegmentationResult:
    """Segment ``image`` with ``model``; labels come back on the input's exact grid.

    A multi-channel task takes one image per channel, in the task's order (e.g. T1c, FLAIR); the
    labels come back on the first one's grid. ``mirror`` averages the prediction of the scan and of
    its left-right mirror (twice the time); None: as the model card says (``test_time_mirroring``).
    """
    report = progress or (lambda fraction, stage: None)
    images = [image] if isinstance(image, sitk.Image) else list(image)
    for number, channel in enumerate(images):  # further channels are resampled onto the first: a shear is harmless
        check_image(channel, "the input volume" if len(images) == 1 else f"input {number + 1}",
                    perpendicular_axes=number == 0)
    image = images[0]
    tasks = resolve_tasks(model, tasks)
    task, warnings = preprocessing_plan(model, image, tasks)
    check_channels(model, task, images)
    requested = [index for name in tasks for index in model.label_space.indices_for_task(name)]
    # float32 volumes held at the peak, measured on the CPU (triplanar, 2-D U-Net) and rounded up: on the
    # working grid every label's probabilities (twice when mirrored), the input and the inferer's sums; on the
    # source grid the kept labels' probabilities, the decision, and the probabilities written out
    check_memory(image, task.working_spacing_mm, len(model.label_space) * (2 if mirroring(model, mirror) else 1) + 6,
                 (3 if with_probabilities else 2) * (1 + len(requested)) + 4)
    report(0.0, "preprocessing")
    working, foreground, grid = prepare_image(images, task, task.working_spacing_mm)

    def predict_part(fraction: float, stage: str) -> None:
        report(0.05 + 0.85 * fraction, stage)

    options = InferenceOptions(predict_part, cancelled, max_block_voxels, requested)
    predict = predict_mirrored if mirroring(model, mirror) else predict_with_fallback
    probabilities, used_device = predict(model, working, choose_device(device), options, warnings)
    probabilities = background_outside(probabilities, foreground)
    report(0.9, "resampling to the input grid")
    result = SegmentationResult(labels=image, model=model, tasks=tasks, device=str(used_device), warnings=warnings)
    warnings += absent_structures(model, working, used_device, result.label_indices[1:])
    kept = np.asarray(result.label_indices)
    if not np.array_equal(kept, np.arange(len(probabilities))):
        probabilities = probabilities[kept]  # only the classes asked for are resampled
    source_probabilities = resample_probabilities_onto(probabilities, grid, image)
    del probabilities
    label_array = np.zeros(source_probabilities.shape[1:], np.uint8)
    box = undecided_box(source_probabilities)
    if box is not None:
        inside = source_probabilities[(slice(None), *box)]  # a view: normalised in place
        inside /= np.clip(inside.sum(axis=0, keepdims=True), 1e-6, None)
        label_array[box] = kept[label_decision(inside, kept, model)]
        # Outside the box every voxel is sure background: the rule has nothing to find there.
        warnings += segment_unsure_regions(label_array[box], inside, kept, image, model.label_space, tasks)
    warnings += keep_largest_regions(label_array, image, model.label_space, tasks)
    labels = sitk.GetImageFromArray(label_array)
    labels.CopyInformation(image)
    result.labels = labels
    warnings += implausible_volumes(labels, model.label_space, tasks, model.card.get(CARD_KEY, {}))
    if with_probabilities:
        vector = sitk.GetImageFromArray(np.moveaxis(source_probabilities, 0, -1).astype(np.float32), isVector=True)
        vector.CopyInformation(image)
        result.probabilities = vector
    report(1.0, "done")
    return result


def check_memory(image: sitk.Image, spacing_mm: float, working_volumes: int, source_volumes: int) -> None:
    """Refuse, before anything is allocated, a segmentation that would not fit in the available memory
    (the system would kill the process, or Slicer with it): ``working_volumes`` float32 volumes on the
    working grid at ``spacing_mm`` and ``source_volumes`` on the image's grid."""
    working = working_grid_sides(image, spacing_mm)[1]
    needed = 4 * (float(np.prod(working)) * working_volumes + float(np.prod(image.GetSize(), dtype=float)) * source_volumes)
    available = available_memory_bytes()
    if needed > available:
        raise InputError(
            f"segmenting this image needs about {needed / 2**30:.3g} GiB of memory ({'x'.join(map(str, image.GetSize()))} "
            f"voxels, a {'x'.join(f'{s:.0f}' for s in working)} working grid at {spacing_mm} mm), but "
            f"{available / 2**30:.3g} GiB are available; crop the image to the region to segment, or close other programs"
        )


def check_channels(model: SegmentationModel, task: Task, images: Sequence[sitk.Image]) -> None:
    """One input per channel of the task, in its order, and no scan given for two channels (the same
    file or volume picked twice would be segmented without a word, the second contrast missing)."""
    if len(images) != len(task.channels):
        names = ", ".join(task.channels)
        raise InputError(f"model {model.name} reads {len(task.channels)} image(s) for task {task.name} ({names}), got "
                         f"{len(images)}; give one input per channel in that order "
                         f"(--input {' --input '.join(task.channels)})")
    for later in range(1, len(images)):
        for earlier in range(later):
            if _same_image(images[earlier], images[later]):
                raise InputError(f"the {task.channels[earlier]} and {task.channels[later]} inputs are the same image; "
                                 f"give each channel its own scan")


def _same_image(first: sitk.Image, second: sitk.Image) -> bool:
    return (first.GetSize() == second.GetSize() and first.GetPixelID() == second.GetPixelID()
            and np.allclose(first.GetOrigin(), second.GetOrigin()) and np.allclose(first.GetSpacing(), second.GetSpacing())
            and np.array_equal(sitk.GetArrayViewFromImage(first), sitk.GetArrayViewFromImage(second)))


def absent_structures(model: SegmentationModel, working: np.ndarray, device: torch.device,
                      indices: Sequence[int]) -> list[str]:
    """Requested classes that a presence head (CMU-Net) finds in no slice of the scan, as warnings."""
    architecture = model.architecture
    presence = architecture.presence_by_class(working, device)
    if presence is None:
        return []
    threshold = architecture.presence_threshold or 0.5
    entries = model.label_space.entries
    return [f"{entries[i].class_spec.name} ({entries[i].task}) seems absent from this scan: presence "
            f"{presence[i]:.2f} < {threshold} in every slice" for i in indices if presence[i] < threshold]


def label_decision(probabilities: np.ndarray, kept: np.ndarray, model: SegmentationModel) -> np.ndarray:
    """Arg-max over the kept labels, except that a binary task's class needs its operating point.

    Balanced sampling shows the network as many vessel as background voxels, so its probabilities
    over-state rare classes; like Moeskops et al., binary tasks are thresholded at the operating
    point chosen on validation cases (``card["operating_points"]``, written by the trainer). As the
    trainer chose it, the point applies to the class against background alone,
    ``p_class / (p_class + p_background)``: a voxel at or above it is not background (it can still go
    to another task's class), one below it is not that class. A point below 0.5 therefore widens the
    class, one above narrows it.
    """
    thresholds = model.card.get("operating_points", {})
    if not thresholds:
        return np.argmax(probabilities, axis=0)
    scores = probabilities.copy()
    background = scores[0]
    passed = np.zeros(background.shape, bool)
    for task_name, threshold in thresholds.items():
        if task_name not in model.label_space.task_names:
            continue
        for position in np.flatnonzero(np.isin(kept, model.label_space.indices_for_task(task_name))):
            channel = scores[position]
            above = channel >= threshold * np.clip(channel + probabilities[0], 1e-6, None)
            channel[~above] = 0.0
            passed |= above
    background[passed] = 0.0
    return np.argmax(scores, axis=0)


def mirroring(model: SegmentationModel, mirror: bool | None) -> bool:
    """Whether a segmentation asked for with ``mirror`` is mirrored: as asked, else as the card says."""
    return bool(model.card.get(MIRROR_KEY, False)) if mirror is None else mirror


def predict_mirrored(
    model: SegmentationModel,
    working: np.ndarray,
    device: torch.device,
    options: InferenceOptions,
    warnings: list[str],
) -> tuple[np.ndarray, torch.device]:
    """The mean of the predictions of the scan and of its left-right mirror (test-time mirroring, as
    nnU-Net does). The working grid is LPS, so its last axis runs right to left; the networks learnt
    with left-right flips, and no task here has a left or right class."""
    report = options.progress or (lambda fraction, stage: None)

    def half(offset: float) -> InferenceOptions:
        return dataclasses.replace(options, progress=lambda fraction, stage: report(offset + fraction / 2, stage))

    probabilities, used = predict_with_fallback(model, working, device, half(0.0), warnings)
    mirrored, used = predict_with_fallback(model, np.ascontiguousarray(working[..., ::-1]), used, half(0.5), warnings)
    probabilities += mirrored[..., ::-1]
    probabilities /= 2
    return probabilities, used


def predict_with_fallback(
    model: SegmentationModel,
    working: np.ndarray,
    device: torch.device,
    options: InferenceOptions,
    warnings: list[str],
) -> tuple[np.ndarray, torch.device]:
    """Predict on ``device``; when the GPU runs out of memory, retry with smaller tiles, then on the CPU."""
    network = model.architecture.network
    attempts = [(device, options)]
    if device.type == "cuda":
        smaller = dataclasses.replace(options, max_block_voxels=(options.max_block_voxels or 64**3) // 8)
        attempts += [(device, smaller), (torch.device("cpu"), options)]
    for number, (attempt_device, attempt_options) in enumerate(attempts):
        try:
            network.to(attempt_device)
            return model.architecture.predict_probabilities(working, attempt_device, attempt_options), attempt_device
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if number + 1 == len(attempts):
                raise
            following = attempts[number + 1]
            warnings.append(
                f"GPU out of memory on {attempt_device}; retrying "
                + ("with smaller tiles" if following[0].type == "cuda" else "on the CPU (slower)")
            )
    raise AssertionError("unreachable")
