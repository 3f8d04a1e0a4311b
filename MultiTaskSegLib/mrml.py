"""MRML-level work: a scalar volume node in, a segmentation node ready for hand correction out.

This is the one place of the library that knows MRML. It needs only the MRML libraries, so it runs
in 3D Slicer, in ``Slicer --no-main-window --python-script`` and headless on a scene from the
``slicer-core`` wheel (CI, batch scripts). The Slicer module calls these functions; it adds no
segmentation logic of its own.

Geometry: a volume node keeps its voxels in (k, j, i) order and its geometry in the IJK-to-RAS
matrix; SimpleITK images use LPS. :func:`image_from_volume_node` and :func:`volume_node_from_image`
convert between the two exactly (oblique directions, anisotropic spacing, any scalar type), so the
segmentation lands on the source volume's own grid voxel for voxel. A parent transform of the
volume is not applied to the voxels: the segmentation is put under the same transform instead, and
labels go in and out in the volume's own frame (the frame of its IJK-to-RAS matrix), so the
segments sit on the volume wherever the transform, linear or not, moves it.

Writing never destroys the user's work: only segments tagged with the same model, task and class
are replaced, and only while their voxels are as written (a segment corrected by hand is refused
unless the caller says ``existing="replace_edited"``, as the module does once the user agreed);
every other segment is left as it was, and :meth:`SegmentationWrite.undo` restores
the segmentation as it was before the write and removes the uncertainty volume made with it (the
scene's own undo stack is fed as well when the scene has undo switched on).
:func:`write_segmentation` is the one write path: the console call :func:`segment_volume_node`, the
module's Apply (:mod:`MultiTaskSegLib.mrml_run`) and its Undo all go through it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import SimpleITK as sitk

from .architectures.base import CancelCheck, ProgressCallback
from .errors import CancelledError, InputError
from .imageio import check_image
from .inference import SegmentationResult, check_input_against_model, resolve_tasks, segment_image
from .segments import ANATOMY_CONTEXT, TAG_PREFIX, SegmentDescription, describe_segments

if TYPE_CHECKING:
    from .model_files import SegmentationModel
    from .tasks import Task

#: Node reference from a segmentation node to the probability/uncertainty volume made with it.
UNCERTAINTY_REFERENCE_ROLE = "MultiTaskSegUncertainty"
#: Segment tags that identify what produced a segment; a new result replaces segments that match all three.
IDENTITY_TAGS = (f"{TAG_PREFIX}Model", f"{TAG_PREFIX}Task", f"{TAG_PREFIX}Class")
#: Segment tag: a digest of the voxels as written, so later hand edits are recognised.
VOXELS_TAG = f"{TAG_PREFIX}VoxelDigest"
#: How an existing node's earlier segments of the same model, task and class are treated.
EXISTING_MODES = ("replace", "replace_edited", "add")
#: Node attribute holding the warnings of the run that last wrote into a segmentation node.
WARNINGS_ATTRIBUTE = f"{TAG_PREFIX}Warnings"
UNCERTAINTY_KINDS = ("entropy", "max_probability")

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


# ---------------------------------------------------------------------------------------------
# Volume node <-> SimpleITK image


def ijk_to_ras(volume_node) -> np.ndarray:
    """The node's 4x4 IJK-to-RAS matrix as a numpy array."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def ijk_to_ras_of_image(image: sitk.Image) -> np.ndarray:
    """The IJK-to-RAS matrix of a SimpleITK image (ITK stores LPS)."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = _LPS_FROM_RAS @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = _LPS_FROM_RAS @ np.asarray(image.GetOrigin(), dtype=float)
    return matrix


def _vtk_matrix(array: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row, column]))
    return matrix


def _describe_node(node) -> str:
    return f"volume '{node.GetName()}'" if node.GetName() else "the input volume"


def image_from_volume_node(volume_node, to_frame: np.ndarray | None = None) -> sitk.Image:
    """A copy of the node's voxels as a SimpleITK image with the node's exact geometry (LPS).

    The geometry is that of the node's own frame, or, with ``to_frame`` (a 4x4 RAS matrix from that
    frame to another), of that other frame. The copy is independent of MRML, so it may be handed to
    a worker thread or process.
    """
    from vtk.util import numpy_support

    if volume_node is None:
        raise InputError("no input volume: select a scalar volume to segment")
    where = _describe_node(volume_node)
    image_data = volume_node.GetImageData()
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        raise InputError(f"{where} has no voxels loaded; load the image again")
    components = image_data.GetNumberOfScalarComponents()
    if components != 1:
        raise InputError(
            f"{where} has {components} components per voxel; choose one channel "
            "(for example with the Vector to Scalar Volume module)"
        )
    dimensions = image_data.GetDimensions()
    voxels = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())
    array = np.array(voxels, copy=True).reshape(tuple(reversed(dimensions)))
    matrix = ijk_to_ras(volume_node) if to_frame is None else to_frame @ ijk_to_ras(volume_node)
    axes = _LPS_FROM_RAS @ matrix[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise InputError(f"{where} has a zero voxel spacing in its IJK-to-RAS matrix; fix the volume's geometry")
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in _LPS_FROM_RAS @ matrix[:3, 3]])
    image.SetDirection([float(d) for d in (axes / spacing).ravel()])
    return image


def volume_node_from_image(image: sitk.Image, scene, name: str = "", node_class: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node in ``scene`` holding a copy of ``image`` with its geometry."""
    from vtk.util import numpy_support
    import vtk

    array = sitk.GetArrayFromImage(image)
    components = image.GetNumberOfComponentsPerPixel()
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(*image.GetSize())
    scalars = numpy_support.numpy_to_vtk(array.reshape(-1, components), deep=True)
    image_data.GetPointData().SetScalars(scalars)
    node = scene.AddNewNodeByClass(node_class, name)
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras_of_image(image)))
    node.SetAndObserveImageData(image_data)
    node.CreateDefaultDisplayNodes()
    return node


def input_warnings(volume_node, model: "SegmentationModel", tasks: Sequence[str] | None = None) -> list[str]:
    """What does not fit the model card (modality, spacing); raises InputError for unusable input.

    Unusable input is a missing volume, several components per voxel, a 2-D image or a constant one.
    """
    image = image_from_volume_node(volume_node)
    check_image(image, _describe_node(volume_node))
    return check_input_against_model(model, image, resolve_tasks(model, tasks))


# ---------------------------------------------------------------------------------------------
# Segment metadata


def ensure_segmentation_converters() -> None:
    """Register the labelmap/surface conversion rules that the Slicer application registers at start.

    ``slicer-core`` has the rules but no application to register them; without them a segmentation
    cannot hold binary labelmaps.
    """
    import slicer

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    registered = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for rule_class in (
        slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
        slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
        slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule,
        slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule,
    ):
        if rule_class.__name__ not in registered:
            factory.RegisterConverterRule(rule_class())


def _code(triplet: Sequence[str] | None) -> str:
    scheme, value, meaning = triplet if triplet else ("", "", "")
    return f"{scheme}^{value}^{meaning}"


def terminology_entry_string(terminology: dict) -> str:
    """Slicer's serialised terminology entry (the segment tag ``TerminologyEntry``).

    ``terminology`` is the slicerio form that :func:`~MultiTaskSegLib.segments.describe_segments`
    gives. The string is ``context~category~type~typeModifier~anatomicContext~region~regionModifier``
    with each code written ``scheme^value^meaning``, as ``vtkSlicerTerminologiesModuleLogic`` reads it.
    """
    return "~".join(
        [
            terminology.get("contextName", ""),
            _code(terminology.get("category")),
            _code(terminology.get("type")),
            _code(terminology.get("typeModifier")),
            terminology.get("anatomicContextName", ANATOMY_CONTEXT),
            _code(terminology.get("anatomicRegion")),
            _code(terminology.get("anatomicRegionModifier")),
        ]
    )


def _segment_ids(segmentation) -> list[str]:
    return [segmentation.GetNthSegmentID(index) for index in range(segmentation.GetNumberOfSegments())]


def _identity(segment) -> tuple[str, ...] | None:
    values = []
    for tag in IDENTITY_TAGS:
        found, value = _get_tag(segment, tag)
        if not found:
            return None
        values.append(value)
    return tuple(values)


def _get_tag(segment, tag: str) -> tuple[bool, str]:
    import vtk

    holder = vtk.reference("")
    found = segment.GetTag(tag, holder)
    return bool(found), str(holder)


def _description_identity(description: SegmentDescription) -> tuple[str, ...]:
    return tuple(description.tags[tag] for tag in IDENTITY_TAGS)


def segments_replaced_by(result: SegmentationResult, segmentation_node) -> list[str]:
    """Names of the segments of ``segmentation_node`` that writing ``result`` would replace."""
    if segmentation_node is None:
        return []
    segmentation = segmentation_node.GetSegmentation()
    produced = {_description_identity(d) for d in describe_segments(result)}
    return [
        segmentation.GetSegment(segment_id).GetName()
        for segment_id in _segment_ids(segmentation)
        if _identity(segmentation.GetSegment(segment_id)) in produced
    ]


def _apply_description(segment, description: SegmentDescription) -> None:
    segment.SetName(description.name)
    segment.SetColor(*description.color)
    segment.SetNameAutoGenerated(False)
    segment.SetColorAutoGenerated(False)
    for tag, value in description.tags.items():
        segment.SetTag(tag, value)
    if description.terminology:
        segment.SetTag(segment.GetTerminologyEntryTagName(), terminology_entry_string(description.terminology))


# ---------------------------------------------------------------------------------------------
# Writing a result into a segmentation node


def _source_representation(segmentation) -> str:
    """The representation a segmentation's segments are edited in (``Master`` before Slicer 5.4)."""
    return (getattr(segmentation, "GetSourceRepresentationName", None) or segmentation.GetMasterRepresentationName)()


def _fingerprint(segmentation) -> tuple:
    """Changes whenever a segment is added, removed, renamed or its voxels are edited."""
    state = []
    for segment_id in _segment_ids(segmentation):
        segment = segmentation.GetSegment(segment_id)
        labelmap = segment.GetRepresentation(_source_representation(segmentation))
        scalars = labelmap.GetPointData().GetScalars() if labelmap is not None else None
        state.append((segment_id, segment.GetName(), segment.GetMTime(),
                      labelmap.GetMTime() if labelmap is not None else 0, scalars.GetMTime() if scalars else 0))
    return tuple(state)


@dataclass
class SegmentationWrite:
    """What one write changed, so it can be undone."""

    segmentation_node: object
    segment_ids: list[str]
    replaced_names: list[str] = field(default_factory=list)
    created_node: bool = False
    _history: object = None
    _after: tuple = ()
    uncertainty_node: object = None  # the uncertainty volume written with the segments, if any

    def undo(self) -> None:
        """Restore the segmentation as it was before the write (remove the node if the write made it)
        and remove the uncertainty volume written with it.

        Refused once the segmentation was edited after the write, so that undoing a result never
        throws away corrections made since.
        """
        if self._history is None and not self.created_node:
            raise InputError("this result was already undone")
        if self._after and _fingerprint(self.segmentation_node.GetSegmentation()) != self._after:
            raise InputError(
                f"segmentation '{self.segmentation_node.GetName()}' was edited after the result was written; "
                "undo those edits in the Segment Editor first, or delete the unwanted segments by hand"
            )
        if self.created_node:
            scene = self.segmentation_node.GetScene()
            if scene is not None:
                scene.RemoveNode(self.segmentation_node)
            self.created_node = False
        elif self._history.IsRestorePreviousStateAvailable():
            self._history.RestorePreviousState()
        self._history = None
        if self.uncertainty_node is not None and self.uncertainty_node.GetScene() is not None:
            self.uncertainty_node.GetScene().RemoveNode(self.uncertainty_node)
        self.uncertainty_node = None


def new_segmentation_node(volume_node, name: str = ""):
    """An empty segmentation node on ``volume_node``'s geometry, under the same parent transform."""
    ensure_segmentation_converters()
    scene = volume_node.GetScene()
    if scene is None:
        raise InputError(f"{_describe_node(volume_node)} is not in a scene; add it to the scene first")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{volume_node.GetName()} segmentation")
    node.CreateDefaultDisplayNodes()
    # Transform first: Slicer maps the volume's geometry into the segmentation's parent frame, so set
    # after it the geometry stays the volume's own instead of being transformed twice.
    node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    return node


def _labelmap_node(labels: np.ndarray, volume_node):
    """A labelmap node outside the scene, on the volume's grid (image data at the origin, unit spacing)."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    image_data = vtk.vtkImageData()
    image_data.SetDimensions(*reversed(labels.shape))
    image_data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(labels.ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    node = slicer.vtkMRMLLabelMapVolumeNode()
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras(volume_node)))
    node.SetAndObserveImageData(image_data)
    return node


def check_labelmap_segmentation(segmentation_node) -> None:
    """Slicer imports labels only into a segmentation whose source representation is a labelmap."""
    import slicer

    source = _source_representation(segmentation_node.GetSegmentation())
    if source != slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName():
        raise InputError(
            f"segmentation '{segmentation_node.GetName()}' keeps its segments as '{source}' (for example imported "
            "from STL or OBJ), and labels can only be written into a labelmap segmentation; write into a new "
            "segmentation, or make 'Binary labelmap' its source representation (Segmentations module) first"
        )


def _import_in_volume_frame(labelmap_node, volume_node, segmentation_node, segment_ids) -> None:
    """Import labels expressed in the volume's own (untransformed) frame.

    Slicer maps an imported labelmap from its node's frame into the segmentation's frame. The
    labels share the volume's IJK-to-RAS matrix, so the labelmap node is put, for the import only,
    under the volume's parent transform: the mapping is then the identity when the segmentation
    sits under the same transform, and the right one when it sits elsewhere.
    """
    import slicer

    scene = segmentation_node.GetScene()
    transform_id = volume_node.GetTransformNodeID()
    if transform_id and scene is not None:
        labelmap_node.SetHideFromEditors(True)
        scene.AddNode(labelmap_node)
        labelmap_node.SetAndObserveTransformNodeID(transform_id)
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
            labelmap_node, segmentation_node, segment_ids
        ):
            raise RuntimeError(f"Slicer could not import the labels into segmentation '{segmentation_node.GetName()}'")
    finally:
        if labelmap_node.GetScene() is not None:
            labelmap_node.GetScene().RemoveNode(labelmap_node)


def on_volume_grid(image: sitk.Image, volume_node) -> bool:
    """Whether ``image`` lies on ``volume_node``'s voxels: same dimensions and IJK-to-RAS matrix."""
    data = volume_node.GetImageData()
    return (data is not None and tuple(data.GetDimensions()) == tuple(image.GetSize())
            and np.allclose(ijk_to_ras_of_image(image), ijk_to_ras(volume_node), atol=1e-4))


def _check_labels_fit_volume(result: SegmentationResult, volume_node) -> None:
    """The result must have been computed on this volume's grid: same size and IJK-to-RAS matrix."""
    size = tuple(reversed(volume_node.GetImageData().GetDimensions()))
    labels_size = tuple(reversed(result.labels.GetSize()))
    if size != labels_size:
        raise InputError(
            f"the result has {'x'.join(map(str, labels_size))} voxels but {_describe_node(volume_node)} has "
            f"{'x'.join(map(str, size))}; segment this volume again"
        )
    if not on_volume_grid(result.labels, volume_node):
        raise InputError(
            f"the result was computed on another grid (spacing, origin or orientation) than {_describe_node(volume_node)}; "
            "segment this volume again"
        )


def write_segmentation(
    result: SegmentationResult,
    volume_node,
    segmentation_node=None,
    existing: str = "replace",
    uncertainty: str | None = None,
) -> SegmentationWrite:
    """Write ``result`` (computed from ``volume_node``) as one segment per class.

    ``segmentation_node`` None makes a new node. In an existing node, segments made earlier by the
    same model for the same task and class are replaced (``existing="replace"``) unless they were
    edited since they were written, which raises :class:`InputError` naming them
    (``existing="replace_edited"`` replaces them anyway), or kept next to the new ones
    (``existing="add"``); all other segments stay untouched. ``uncertainty`` (one of
    :data:`UNCERTAINTY_KINDS`) adds an uncertainty volume too, referenced from the segmentation node
    under :data:`UNCERTAINTY_REFERENCE_ROLE`. Any failure restores the node.
    """
    import slicer

    if existing not in EXISTING_MODES:
        raise InputError(f"existing must be one of {', '.join(EXISTING_MODES)}, got {existing!r}")
    if uncertainty is not None:
        _check_uncertainty_kind(uncertainty)
    ensure_segmentation_converters()
    _check_labels_fit_volume(result, volume_node)
    if segmentation_node is not None:
        check_labelmap_segmentation(segmentation_node)
    if existing == "replace" and segmentation_node is not None:
        edited = edited_segments_replaced_by(result, segmentation_node)
        if edited:
            raise InputError(
                f"segment(s) {', '.join(edited)} of '{segmentation_node.GetName()}' were edited by hand after "
                "MultiTaskSeg wrote them; nothing was written. Use existing='add' to keep them beside the new "
                "result, or existing='replace_edited' to replace them anyway"
            )
    descriptions = describe_segments(result)
    created = segmentation_node is None
    if created:
        segmentation_node = new_segmentation_node(volume_node, f"{volume_node.GetName()} {result.model.name}")
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    history = slicer.vtkSegmentationHistory()
    history.SetSegmentation(segmentation)
    history.SaveState()
    scene = segmentation_node.GetScene()
    if scene is not None and scene.GetUndoFlag():
        segmentation_node.SetUndoEnabled(True)
        scene.SaveStateForUndo()
    replaced_names = segments_replaced_by(result, segmentation_node) if existing != "add" else []
    uncertainty_node = None
    try:
        segment_ids = _replace_segments(result, volume_node, segmentation_node, descriptions, existing)
        segmentation_node.SetAttribute(WARNINGS_ATTRIBUTE, "\n".join(result.warnings))
        if uncertainty is not None:
            uncertainty_node = add_uncertainty_volume(result, volume_node, uncertainty)
            segmentation_node.SetNodeReferenceID(UNCERTAINTY_REFERENCE_ROLE, uncertainty_node.GetID())
    except BaseException:
        if uncertainty_node is not None and uncertainty_node.GetScene() is not None:
            uncertainty_node.GetScene().RemoveNode(uncertainty_node)
        if created:
            segmentation_node.GetScene().RemoveNode(segmentation_node)
        else:
            history.RestorePreviousState()
        raise
    return SegmentationWrite(segmentation_node, segment_ids, replaced_names, created, None if created else history,
                             _fingerprint(segmentation), uncertainty_node)


def _replace_segments(result, volume_node, segmentation_node, descriptions, existing) -> list[str]:
    import slicer
    import vtk

    segmentation = segmentation_node.GetSegmentation()
    old_ids = {}
    for segment_id in _segment_ids(segmentation):
        identity = _identity(segmentation.GetSegment(segment_id))
        if identity is not None:
            old_ids.setdefault(identity, segment_id)
    segment_ids, label_lookup = [], np.zeros(256, dtype=np.uint8)
    for position, description in enumerate(descriptions, start=1):
        old_id = old_ids.get(_description_identity(description)) if existing != "add" else None
        if old_id is not None:  # the new segment takes the old one's place and ID
            current = _segment_ids(segmentation)
            following = current[current.index(old_id) + 1:]
            insert_before = following[0] if following else ""
            segmentation.RemoveSegment(old_id)
            segment_id = old_id
        else:
            insert_before = ""
            segment_id = description.segment_id
            if segmentation.GetSegment(segment_id) is not None:
                segment_id = segmentation.GenerateUniqueSegmentID(description.segment_id)
        segment = slicer.vtkSegment()
        _apply_description(segment, description)
        segmentation.AddSegment(segment, segment_id, insert_before)
        segment_ids.append(segment_id)
        label_lookup[description.label] = position
    labels = label_lookup[sitk.GetArrayViewFromImage(result.labels)]
    ids = vtk.vtkStringArray()
    for segment_id in segment_ids:
        ids.InsertNextValue(segment_id)
    _import_in_volume_frame(_labelmap_node(labels, volume_node), volume_node, segmentation_node, ids)
    for segment_id, description in zip(segment_ids, descriptions):
        _apply_description(segmentation.GetSegment(segment_id), description)
        segmentation.GetSegment(segment_id).SetTag(VOXELS_TAG, segment_digest(segmentation_node, segment_id))
    return segment_ids


def segment_digest(segmentation_node, segment_id: str) -> str:
    """A digest of one segment's voxels: the index box of its set voxels and the mask inside it.

    The layer's extent is left out: Slicer pads or crops a shared labelmap for reasons that change no
    voxel (a sibling segment edited, a scene saved with "crop to minimum extent" and read back)."""
    return _segment_digests(segmentation_node, segment_id)[0]


def _segment_digests(segmentation_node, segment_id: str) -> tuple[str, str]:
    """The digest, and the one written before 2026-12-03 (layer extent and whole mask), still
    accepted so that segments of scenes saved then are not taken for edited ones."""
    import hashlib

    import slicer
    from vtk.util import numpy_support

    labelmap = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    extent = np.asarray(labelmap.GetExtent(), np.int64)
    scalars = labelmap.GetPointData().GetScalars()
    mask = numpy_support.vtk_to_numpy(scalars) > 0 if scalars is not None else np.zeros(0, bool)
    legacy = hashlib.sha256(extent.tobytes())
    legacy.update(np.packbits(mask).tobytes())
    digest = hashlib.sha256(b"set-voxels")
    if mask.any():
        volume = mask.reshape(extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
        where = np.nonzero(volume)
        low, high = [int(w.min()) for w in where], [int(w.max()) + 1 for w in where]
        box = volume[low[0]:high[0], low[1]:high[1], low[2]:high[2]]
        digest.update((np.asarray([*low, *high], np.int64) + np.tile(extent[[4, 2, 0]], 2)).tobytes())
        digest.update(np.packbits(box).tobytes())
    return digest.hexdigest()[:32], legacy.hexdigest()[:32]


def edited_segments_replaced_by(result: SegmentationResult, segmentation_node) -> list[str]:
    """Names of the segments that ``result`` would replace but whose voxels changed since they were
    written (or whose writing is unknown: no digest)."""
    segmentation = segmentation_node.GetSegmentation()
    produced = {_description_identity(d) for d in describe_segments(result)}
    edited = []
    for segment_id in _segment_ids(segmentation):
        segment = segmentation.GetSegment(segment_id)
        if _identity(segment) not in produced:
            continue
        found, written = _get_tag(segment, VOXELS_TAG)
        if not found or written not in _segment_digests(segmentation_node, segment_id):
            edited.append(segment.GetName())
    return edited


def _volume_to_segmentation_frame(volume_node, segmentation_node) -> np.ndarray:
    """4x4 matrix from the volume's own frame to the segmentation's own frame (their parent transforms).

    Identity when both sit under the same transform, as the segmentations made here do, whether
    that transform is linear or not; a non-linear transform between different parents is refused.
    """
    return _frame_between(volume_node, segmentation_node)


def _frame_between(source_node, target_node) -> np.ndarray:
    """4x4 RAS matrix from ``source_node``'s own frame to ``target_node``'s (their parent transforms)."""
    import slicer
    import vtk

    source, target = source_node.GetParentTransformNode(), target_node.GetParentTransformNode()
    if source is target:
        return np.eye(4)
    matrix = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(source, target, matrix):
        raise InputError(
            f"{_describe_node(target_node)} and {_describe_node(source_node)} sit under different "
            "transforms with a non-linear part between them; put both under the same transform, or harden it"
        )
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def channel_images(volume_node, channel_nodes: Sequence = ()) -> list[sitk.Image]:
    """The volume and the further channels of a multi-channel task, all in the volume's own frame:
    a FLAIR placed by a registration transform is read where that transform puts it."""
    images = [image_from_volume_node(volume_node)]
    for node in channel_nodes:
        if node is None:
            raise InputError("a channel volume is missing: select one volume per channel of the task")
        images.append(image_from_volume_node(node, _frame_between(node, volume_node)))
    return images


def labels_from_segmentation(segmentation_node, volume_node, segment_ids: Sequence[str], label_values: Sequence[int] | None = None) -> np.ndarray:
    """The segments as one label array (k, j, i) on ``volume_node``'s grid.

    The n-th segment gets ``label_values[n]`` (default n + 1); where segments overlap, the later one wins.
    Segments kept as closed surfaces (imported from STL) are converted first, as Slicer's export does.
    """
    import slicer
    import vtk
    from vtk.util import numpy_support

    if not segmentation_node.GetSegmentation().CreateRepresentation(
            slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()):
        raise InputError(f"the segments of segmentation '{segmentation_node.GetName()}' cannot be converted to a "
                         "labelmap; make 'Binary labelmap' its source representation (Segmentations module) first")
    if volume_node.GetImageData() is None:
        raise InputError(f"{_describe_node(volume_node)} has no voxels loaded; load the image again")
    geometry = slicer.vtkOrientedImageData()
    geometry.SetExtent(volume_node.GetImageData().GetExtent())
    geometry.SetImageToWorldMatrix(_vtk_matrix(_volume_to_segmentation_frame(volume_node, segmentation_node) @ ijk_to_ras(volume_node)))
    ids = vtk.vtkStringArray()
    values = vtk.vtkIntArray()
    for position, segment_id in enumerate(segment_ids):
        ids.InsertNextValue(segment_id)
        values.InsertNextValue(int(label_values[position]) if label_values is not None else position + 1)
    merged = slicer.vtkOrientedImageData()
    if not segmentation_node.GenerateMergedLabelmapForAllSegments(
        merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, geometry, ids, values
    ):
        raise RuntimeError(f"could not make a label map of segmentation '{segmentation_node.GetName()}'")
    array = numpy_support.vtk_to_numpy(merged.GetPointData().GetScalars())
    return np.array(array, copy=True).reshape(tuple(reversed(merged.GetDimensions())))


# ---------------------------------------------------------------------------------------------
# Probability / uncertainty volume


def _check_uncertainty_kind(kind: str) -> None:
    if kind not in UNCERTAINTY_KINDS:
        raise InputError(f"uncertainty kind must be one of {', '.join(UNCERTAINTY_KINDS)}, got {kind!r}")


def uncertainty_array(result: SegmentationResult, kind: str = "entropy") -> np.ndarray:
    """Per voxel: normalised entropy of the class probabilities (0 = certain, 1 = uniform), or the
    largest foreground probability (``kind="max_probability"``)."""
    if result.probabilities is None:
        raise InputError("the result has no probabilities; segment with with_probabilities=True")
    _check_uncertainty_kind(kind)
    probabilities = sitk.GetArrayViewFromImage(result.probabilities)  # (z, y, x, labels)
    if kind == "max_probability":
        return probabilities[..., 1:].max(axis=-1).astype(np.float32)
    clipped = np.clip(probabilities, 1e-12, 1.0)
    entropy = -(clipped * np.log(clipped)).sum(axis=-1)
    return (entropy / np.log(probabilities.shape[-1])).astype(np.float32)


def add_uncertainty_volume(result: SegmentationResult, volume_node, kind: str = "entropy", name: str = ""):
    """A scalar volume on the source grid that shows where the model is unsure (to guide correction)."""
    values = sitk.GetImageFromArray(uncertainty_array(result, kind))
    values.CopyInformation(result.labels)
    label = "uncertainty" if kind == "entropy" else "foreground probability"
    node = volume_node_from_image(values, volume_node.GetScene(), name or f"{volume_node.GetName()} {result.model.name} {label}")
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras(volume_node)))
    node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    display = node.GetDisplayNode()
    if display is not None:
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
    return node


# ---------------------------------------------------------------------------------------------
# One call


def segment_volume_node(
    volume_node,
    model: "str | os.PathLike | SegmentationModel" = "",
    tasks: Sequence[str] | None = None,
    device: str = "auto",
    segmentation_node=None,
    with_probabilities: bool = False,
    progress: ProgressCallback | None = None,
    cancelled: CancelCheck | None = None,
    existing: str = "replace",
    uncertainty: str = "entropy",
    channel_nodes: Sequence = (),
):
    """Segment ``volume_node`` with ``model`` (bundled name, folder, .zip, or a loaded model).

    Returns the segmentation node (new unless ``segmentation_node`` is given). With
    ``with_probabilities`` an uncertainty volume is added too and referenced from the segmentation
    node under :data:`UNCERTAINTY_REFERENCE_ROLE`. When ``cancelled()`` turns true nothing is written
    and ``CancelledError`` is raised. A multi-channel task takes its further channels (e.g. FLAIR
    after contrast T1) as ``channel_nodes``, in the task's order; the segments lie on ``volume_node``.
    """
    from .model_files import as_model

    report = progress or (lambda fraction, stage: None)
    if segmentation_node is not None:
        check_labelmap_segmentation(segmentation_node)  # before minutes of inference, not after
    model = as_model(model, report)
    images = channel_images(volume_node, channel_nodes)
    result = segment_image(
        model, images, tasks, device, with_probabilities,
        progress=lambda fraction, stage: report(0.95 * fraction, stage), cancelled=cancelled,
    )
    for warning in result.warnings:
        logging.warning("MultiTaskSeg: %s", warning)
    if cancelled is not None and cancelled():
        raise CancelledError("segmentation cancelled; nothing was written")
    report(0.95, "writing segments")
    written = write_segmentation(result, volume_node, segmentation_node, existing,
                                 uncertainty if with_probabilities else None)
    report(1.0, "done")
    return written.segmentation_node


# ---------------------------------------------------------------------------------------------
# Corrected cases for fine-tuning


def segments_of_task(segmentation_node, task) -> dict[int, list[str]]:
    """class index (1..K) -> ids of the segments that hold it: segments this extension wrote (their
    task and class tags) and segments the user named after the class."""
    segmentation = segmentation_node.GetSegmentation()
    found: dict[int, list[str]] = {}
    for segment_id in _segment_ids(segmentation):
        segment = segmentation.GetSegment(segment_id)
        has_task, tagged_task = _get_tag(segment, f"{TAG_PREFIX}Task")
        if has_task and tagged_task != task.name:
            continue  # this extension's segment of another task
        has_class, tagged_class = _get_tag(segment, f"{TAG_PREFIX}Class")
        name = tagged_class if has_class else segment.GetName()
        if name in task.class_names:
            found.setdefault(task.class_names.index(name) + 1, []).append(segment_id)
    return found


def store_corrected_case(volume_node, segmentation_node, task: "str | Task", folder, case_name: str = "",
                         channel_nodes: Sequence = ()):
    """Store the volume and its (corrected) segmentation as a training case of ``task`` under
    ``folder`` (``folder/TASK/CASE``), labels in the task's own values, for ``multitaskseg finetune``.

    ``task`` is a model's task (``model.label_space.task(name)``: its definition, registered or not)
    or the name of a registered task; :func:`store_corrected_cases` stores a model's tasks by name.
    Returns the case folder. Segments are matched to classes by the tags this extension writes, or
    by name; classes without a segment are background. Nothing is stored when no segment matches.
    Without ``case_name`` the case is named after the volume, numbered (``_2``, ``_3``...) when that
    name is taken (DICOM series names repeat from patient to patient); a given name is never reused.
    """
    from .finetuning import store_case

    task = _registered_task(task) if isinstance(task, str) else task
    images = channel_images(volume_node, channel_nodes)  # first: it says what is wrong with a volume without voxels
    [by_class] = _segments_by_class(segmentation_node, [task])
    classes = _corrected_classes(volume_node, segmentation_node, by_class)
    return store_case(folder, task, case_name or _new_case_name(Path(folder) / task.name, volume_node.GetName()),
                      images, classes)


def store_corrected_cases(volume_node, segmentation_node, model: "str | os.PathLike | SegmentationModel",
                          tasks: Sequence[str], folder, channel_nodes: Sequence = ()) -> list[Path]:
    """The module's *Add to training cases*: one case per task in ``tasks`` (the ticked tasks of
    ``model``), each under ``folder/TASK/`` and named after the volume; returns the case folders.

    The tasks are the model's own definitions (its classes and label values), so a model whose
    task no file registers stores its corrections as well. Everything is checked before the first
    case is written: tasks of different modalities (one scan is either MR or CT), or a task with no
    segment in the segmentation, are refused and nothing is stored.
    """
    from .finetuning import case_labels, store_case, stored_file_names
    from .model_files import as_model

    chosen = [as_model(model).label_space.task(name) for name in dict.fromkeys(tasks)]
    if not chosen:
        raise InputError("no task given: tick the task(s) whose corrections to store")
    if len({task.modality for task in chosen}) > 1:
        listed = ", ".join(f"{task.name} ({task.modality})" for task in chosen)
        raise InputError(f"tasks {listed} are ticked together, but one scan is either MR or CT and would be stored "
                         "as a case of each; tick only the task(s) of this scan's modality; nothing was stored")
    segments = _segments_by_class(segmentation_node, chosen)
    images = channel_images(volume_node, channel_nodes)
    cases = [(task, _corrected_classes(volume_node, segmentation_node, by_class))
             for task, by_class in zip(chosen, segments)]
    for task, classes in cases:  # refuse what cannot be stored before the first case is written
        case_labels(task, images, classes)
        stored_file_names(task)
    return [store_case(folder, task, _new_case_name(Path(folder) / task.name, volume_node.GetName()), images, classes)
            for task, classes in cases]


def _registered_task(name: str) -> "Task":
    from .tasks import TASK_PATH_VARIABLE, get_task, list_tasks

    if name not in {task.name for task in list_tasks()}:
        raise InputError(f"task {name!r} is not registered; pass the model's own task (model.label_space.task({name!r})), "
                         f"use store_corrected_cases with the model, or put the task's file on {TASK_PATH_VARIABLE}")
    return get_task(name)


def _segments_by_class(segmentation_node, tasks: Sequence["Task"]) -> list[dict[int, list[str]]]:
    """Each task's segments by class index (:func:`segments_of_task`); a task without any is refused, by name."""
    found = [segments_of_task(segmentation_node, task) for task in tasks]
    missing = [task for task, by_class in zip(tasks, found) if not by_class]
    if missing:
        raise InputError(
            f"segmentation '{segmentation_node.GetName()}' has no segment of task {', '.join(t.name for t in missing)} "
            f"(classes: {', '.join(name for t in missing for name in t.class_names)}); apply the model to it first, "
            "or untick that task; nothing was stored"
        )
    return found


def _corrected_classes(volume_node, segmentation_node, by_class: dict[int, list[str]]) -> np.ndarray:
    """The class indices (0 background, 1..K) that a task's segments (``by_class``) give, on the volume's grid."""
    ids = [segment_id for index in sorted(by_class) for segment_id in by_class[index]]
    values = [index for index in sorted(by_class) for _ in by_class[index]]
    return labels_from_segmentation(segmentation_node, volume_node, ids, values).astype(np.int32)


def _new_case_name(task_folder: Path, volume_name: str) -> str:
    from .finetuning import portable_folder_name

    first = "".join(c if c.isalnum() or c in "-_" else "_" for c in volume_name) or "case"
    if not portable_folder_name(first):  # e.g. a volume named "con" or "COM1"
        first = f"case_{first}"
    name, number = first, 1
    while (task_folder / name).exists():
        number += 1
        name = f"{first}_{number}"
    return name
