"""What each produced segment is called, coloured and tagged, and writing results to disk.

The same descriptions feed the ``.seg.nrrd`` writer and the MRML segmentation node, so a file
written by ``multitaskseg segment`` and a node made in Slicer carry the same names, colours,
terminology and provenance tags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .imageio import write_image
from .inference import SegmentationResult
from .tasks import ClassSpec

TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMY_CONTEXT = "Anatomic codes - DICOM master list"
TAG_PREFIX = "MultiTaskSeg."


@dataclass(frozen=True)
class SegmentDescription:
    """One segment of a result: its label value in the result's label map and how to present it."""

    label: int
    segment_id: str
    name: str
    color: tuple[float, float, float]
    terminology: dict | None
    tags: dict[str, str]


def terminology_dict(spec: ClassSpec) -> dict | None:
    """The class's terminology in slicerio's dict form (Slicer's TerminologyEntry tag fields)."""
    if spec.terminology is None:
        return None
    entry = {
        "contextName": TERMINOLOGY_CONTEXT,
        "category": [spec.terminology.category.scheme, spec.terminology.category.value, spec.terminology.category.meaning],
        "type": [spec.terminology.type.scheme, spec.terminology.type.value, spec.terminology.type.meaning],
    }
    if spec.terminology.region is not None:
        region = spec.terminology.region
        entry["anatomicContextName"] = ANATOMY_CONTEXT
        entry["anatomicRegion"] = [region.scheme, region.value, region.meaning]
    return entry


def provenance_tags(result: SegmentationResult) -> dict[str, str]:
    """Tags that let a reader trace a segment back to the model and run that made it."""
    model = result.model
    return {
        f"{TAG_PREFIX}Model": model.name,
        f"{TAG_PREFIX}ModelVersion": model.version,
        f"{TAG_PREFIX}WeightsSHA256": model.weights_sha256,
        f"{TAG_PREFIX}Tasks": ",".join(result.tasks),
        f"{TAG_PREFIX}Device": result.device,
        f"{TAG_PREFIX}Date": result.created,
    }


def describe_segments(result: SegmentationResult) -> list[SegmentDescription]:
    """One description per class of the requested tasks, in label-space order."""
    entries = result.model.label_space.entries
    common = provenance_tags(result)
    descriptions = []
    for index in result.label_indices[1:]:
        entry = entries[index]
        segment_id = f"{entry.task}.{entry.class_spec.name}".replace(" ", "_")
        tags = {**common, f"{TAG_PREFIX}Task": str(entry.task), f"{TAG_PREFIX}Class": entry.class_spec.name}
        descriptions.append(SegmentDescription(index, segment_id, entry.class_spec.name, entry.class_spec.color,
                                               terminology_dict(entry.class_spec), tags))
    return descriptions


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """The 4x4 matrix from voxel (i, j, k) to physical LPS millimetres (ITK's convention)."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def write_seg_nrrd(result: SegmentationResult, path: Path) -> Path:
    """A Slicer segmentation file (readable by Slicer and slicerio) with names, colours, terminology, tags."""
    import slicerio

    labels = sitk.GetArrayViewFromImage(result.labels).transpose(2, 1, 0)  # (z, y, x) -> (i, j, k)
    segmentation = slicerio.create_segmentation(labels.shape, ijk_to_lps(result.labels))
    for description in describe_segments(result):
        segment = {"id": description.segment_id, "name": description.name, "color": list(description.color),
                   "tags": description.tags}
        if description.terminology:
            segment["terminology"] = description.terminology
        slicerio.add_segment(segmentation, labels == description.label, segment)
    temporary = path.with_name(f".{path.name}.partial.seg.nrrd")
    try:
        slicerio.write_segmentation(str(temporary), segmentation)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


OUTPUT_SUFFIXES = (".seg.nrrd", ".nii", ".nii.gz", ".nrrd", ".mha")


def check_outputs(inputs: Sequence[str | os.PathLike], output: str | os.PathLike,
                  probabilities: str | os.PathLike | None = None, overwrite: bool = False) -> None:
    """Refuse, before any work, output names that would overwrite an input or each other, or that no
    writer knows: the user's scan must never be replaced by a label map. An existing output file
    (a reference label map of the same name, say) is replaced only when ``overwrite`` says so."""
    targets = {"--output": Path(output)}
    if probabilities is not None:
        targets["--probabilities"] = Path(probabilities)
    for option, target in targets.items():
        if not any(target.name.endswith(suffix) for suffix in OUTPUT_SUFFIXES):  # ITK's writers know lower case only
            raise InputError(f"{option} {target}: use a .seg.nrrd, .nii.gz, .nii, .nrrd or .mha file name (lower case)")
        for source in inputs:
            if Path(source).exists() and target.exists() and Path(source).resolve() == target.resolve():
                raise InputError(f"{option} {target} is the input scan; choose another file name so the scan is kept")
        if target.exists() and not overwrite:
            raise InputError(f"{option} {target} exists; choose a new file name, or add --overwrite to replace it")
    if probabilities is not None and Path(output).resolve() == Path(probabilities).resolve():
        raise InputError("--output and --probabilities name the same file; give them different names")


def write_result(result: SegmentationResult, output: str | os.PathLike, probabilities: str | os.PathLike | None = None) -> Path:
    """``.seg.nrrd`` keeps names and colours; other formats (NIfTI, NRRD, MHA) get the plain label map."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.name.endswith(".seg.nrrd"):
        write_seg_nrrd(result, output)
    elif any(output.name.endswith(s) for s in OUTPUT_SUFFIXES):
        write_image(result.labels, output)
    else:
        raise InputError(f"cannot write {output}: use a .seg.nrrd, .nii.gz, .nrrd or .mha file name")
    if probabilities is not None:
        if result.probabilities is None:
            raise InputError("probabilities were not computed; segment with with_probabilities=True")
        write_image(result.probabilities, probabilities)
    return output
