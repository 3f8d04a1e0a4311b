"""The MRML path, headless on a real scene from slicer-core: volume node in, segmentation node out.

No MRML is faked: volumes are read by Slicer's own storage node, segmentations are real
``vtkMRMLSegmentationNode`` objects, and ``.seg.nrrd`` files are written by Slicer's storage node.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is needed for the MRML tests")
import vtk  # noqa: E402  (installed with slicer-core)

from MultiTaskSegLib import cli, mrml  # noqa: E402
from MultiTaskSegLib.errors import CancelledError, InputError  # noqa: E402
from MultiTaskSegLib.imageio import read_image  # noqa: E402
from MultiTaskSegLib.inference import segment_image  # noqa: E402
from MultiTaskSegLib.model_files import SegmentationModel, load_model, save_model, sha256_of  # noqa: E402
from MultiTaskSegLib.segments import describe_segments  # noqa: E402
from conftest import make_tiny_model  # noqa: E402

TASKS = ["brain_t1_mri", "breast_mri"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """A tiny untrained triplanar model whose weights are scaled up so its labels vary in space."""
    return save_model(make_tiny_model(TASKS, seed=7, varied=True), tmp_path_factory.mktemp("models") / "tiny-triplanar")


@pytest.fixture(scope="module")
def model(model_path) -> SegmentationModel:
    return load_model(model_path)


def oblique_image(dtype=np.int16) -> sitk.Image:
    """An MR-like volume with structure in every direction, oblique axes and anisotropic spacing."""
    z, y, x = np.mgrid[:18, :22, :26]
    values = 300 + 120 * np.sin(x / 3.0) + 90 * np.cos(y / 4.0) * z / 9.0 + 40 * ((x - 13) ** 2 + (y - 11) ** 2 < 30)
    image = sitk.GetImageFromArray(values.astype(dtype))
    image.SetSpacing((1.1, 0.8, 1.9))
    image.SetOrigin((12.5, -40.25, 7.0))
    image.SetDirection(sitk.VersorTransform((0.3, 0.5, 0.8), 0.6).GetMatrix())
    return image


@pytest.fixture
def scene():
    mrml.ensure_segmentation_converters()
    return slicer.vtkMRMLScene()


@pytest.fixture
def oblique_file(tmp_path) -> Path:
    path = tmp_path / "oblique.nrrd"
    sitk.WriteImage(oblique_image(), str(path))
    return path


def load_volume(scene, path: Path):
    """Read a file into a volume node with Slicer's own storage node, as File > Add Data does."""
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", path.name.split(".")[0])
    assert storage.ReadData(volume), f"Slicer could not read {path}"
    volume.SetAndObserveStorageNodeID(storage.GetID())
    return volume


@pytest.fixture
def volume(scene, oblique_file):
    return load_volume(scene, oblique_file)


def segment_ids(segmentation_node) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def tag(segment, name: str) -> str:
    found, value = mrml._get_tag(segment, name)
    assert found, f"segment {segment.GetName()} has no tag {name}"
    return value


def add_user_segment(segmentation_node, volume, name: str, box: tuple[slice, slice, slice]) -> str:
    """A hand-drawn segment: a box of voxels on the volume's grid."""
    from vtk.util import numpy_support

    geometry = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(volume)
    geometry.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    voxels = numpy_support.vtk_to_numpy(geometry.GetPointData().GetScalars()).reshape(
        tuple(reversed(geometry.GetDimensions())))
    voxels[:] = 0
    voxels[box] = 1
    segment_id = segmentation_node.GetSegmentation().AddEmptySegment("", name)
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        geometry, segmentation_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    return segment_id


# ---------------------------------------------------------------------------------------------
# Geometry


def test_volume_node_gives_the_file_image_with_exact_oblique_geometry(volume, oblique_file):
    expected = sitk.ReadImage(str(oblique_file))
    image = mrml.image_from_volume_node(volume)
    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(expected))
    assert image.GetPixelID() == expected.GetPixelID()
    np.testing.assert_allclose(image.GetSpacing(), expected.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(image.GetOrigin(), expected.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(image.GetDirection(), expected.GetDirection(), atol=1e-9)


def test_image_to_volume_node_gives_the_matrix_slicer_reads_from_the_file(scene, volume, oblique_file):
    made = mrml.volume_node_from_image(sitk.ReadImage(str(oblique_file)), scene, "from image")
    np.testing.assert_allclose(mrml.ijk_to_ras(made), mrml.ijk_to_ras(volume), atol=1e-9)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64])
def test_any_scalar_type_survives_the_round_trip(scene, dtype):
    image = oblique_image(dtype)
    back = mrml.image_from_volume_node(mrml.volume_node_from_image(image, scene))
    assert back.GetPixelID() == image.GetPixelID()
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))


# ---------------------------------------------------------------------------------------------
# Segmentation on the source grid


def test_segmentation_matches_segment_image_and_the_cli_voxel_for_voxel(scene, volume, oblique_file, model, model_path, tmp_path):
    segmentation_node = mrml.segment_volume_node(volume, model, device="cpu")

    direct = segment_image(model, read_image(oblique_file), device="cpu")
    cli_output = tmp_path / "cli_labels.nii.gz"
    assert cli.main(["segment", "--model", str(model_path), "--input", str(oblique_file),
                     "--output", str(cli_output), "--device", "cpu"]) == 0
    from_cli = sitk.GetArrayFromImage(sitk.ReadImage(str(cli_output)))
    expected = sitk.GetArrayFromImage(direct.labels)
    assert len(np.unique(expected)) >= 2, "the test model must give more than one label to test geometry"
    assert np.array_equal(from_cli, expected)

    descriptions = describe_segments(direct)
    found = mrml.labels_from_segmentation(segmentation_node, volume, segment_ids(segmentation_node),
                                          [d.label for d in descriptions])
    assert np.array_equal(found, expected)


def test_segment_labelmaps_sit_on_the_volume_grid(scene, volume, model):
    segmentation_node = mrml.segment_volume_node(volume, model, device="cpu")
    for segment_id in segment_ids(segmentation_node):
        labelmap = segmentation_node.GetSegmentation().GetSegment(segment_id).GetRepresentation("Binary labelmap")
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)
        image_to_world = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        np.testing.assert_allclose(image_to_world, mrml.ijk_to_ras(volume), atol=1e-9)


def test_segments_carry_names_colours_terminology_and_provenance_tags(scene, volume, model, model_path):
    segmentation_node = mrml.segment_volume_node(volume, model, device="cpu")
    segmentation = segmentation_node.GetSegmentation()
    entries = [entry for entry in model.label_space.entries[1:]]
    assert [segmentation.GetSegment(i).GetName() for i in segment_ids(segmentation_node)] == [
        entry.class_spec.name for entry in entries]
    for segment_id, entry in zip(segment_ids(segmentation_node), entries):
        segment = segmentation.GetSegment(segment_id)
        np.testing.assert_allclose(segment.GetColor(), entry.class_spec.color, atol=1e-6)
        assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()
        terminology = slicer.vtkSlicerTerminologyEntry()
        assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(
            tag(segment, "TerminologyEntry"), terminology)
        spec = entry.class_spec.terminology
        for vtk_code, code in ((terminology.GetCategoryObject(), spec.category), (terminology.GetTypeObject(), spec.type)):
            assert (vtk_code.GetCodingSchemeDesignator(), vtk_code.GetCodeValue(), vtk_code.GetCodeMeaning()) == (
                code.scheme, code.value, code.meaning)
        assert tag(segment, "MultiTaskSeg.Model") == "tiny-triplanar"
        assert tag(segment, "MultiTaskSeg.ModelVersion") == model.version
        assert tag(segment, "MultiTaskSeg.WeightsSHA256") == sha256_of(model_path / "weights.safetensors")
        assert tag(segment, "MultiTaskSeg.Tasks") == ",".join(TASKS)
        assert tag(segment, "MultiTaskSeg.Device") == "cpu"
        assert tag(segment, "MultiTaskSeg.Date")[:2] == "20"
        assert (tag(segment, "MultiTaskSeg.Task"), tag(segment, "MultiTaskSeg.Class")) == (entry.task, entry.class_spec.name)


def test_terminology_string_is_the_one_slicer_serialises():
    entry = {"contextName": "Segmentation category and type - 3D Slicer General Anatomy list",
             "category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "113305005", "Cerebellum"]}
    expected = slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        entry["contextName"], "123037004", "SCT", "Anatomical Structure", "113305005", "SCT", "Cerebellum",
        "", "", "", "Anatomic codes - DICOM master list", "", "", "", "", "", "")
    assert mrml.terminology_entry_string(entry) == expected


def test_only_requested_tasks_become_segments(scene, volume, model):
    segmentation_node = mrml.segment_volume_node(volume, model, tasks=["breast_mri"], device="cpu")
    segmentation = segmentation_node.GetSegmentation()
    assert [segmentation.GetSegment(i).GetName() for i in segment_ids(segmentation_node)] == ["Pectoral muscle"]


# ---------------------------------------------------------------------------------------------
# Never destroying the user's work


def test_writing_into_an_existing_segmentation_keeps_the_other_segments(scene, volume, model):
    segmentation_node = mrml.new_segmentation_node(volume, "user work")
    hand = add_user_segment(segmentation_node, volume, "Tumour by hand", (slice(3, 9), slice(4, 12), slice(5, 15)))
    same_name = add_user_segment(segmentation_node, volume, "White matter", (slice(10, 14), slice(2, 6), slice(2, 20)))
    before = {i: mrml.labels_from_segmentation(segmentation_node, volume, [i]) for i in (hand, same_name)}

    mrml.segment_volume_node(volume, model, device="cpu", segmentation_node=segmentation_node)
    mrml.segment_volume_node(volume, model, device="cpu", segmentation_node=segmentation_node)

    ids = segment_ids(segmentation_node)
    assert ids[:2] == [hand, same_name]
    assert len(ids) == 2 + len(model.label_space) - 1, "a second run must replace its segments, not add more"
    for segment_id, mask in before.items():
        assert np.array_equal(mrml.labels_from_segmentation(segmentation_node, volume, [segment_id]), mask)
    assert segmentation_node.GetSegmentation().GetSegment(same_name).GetName() == "White matter"


def test_add_mode_keeps_the_previous_result_beside_the_new_one(scene, volume, model):
    segmentation_node = mrml.segment_volume_node(volume, model, tasks=["breast_mri"], device="cpu")
    result = segment_image(model, mrml.image_from_volume_node(volume), ["breast_mri"], device="cpu")
    assert mrml.segments_replaced_by(result, segmentation_node) == ["Pectoral muscle"]
    written = mrml.write_segmentation(result, volume, segmentation_node, existing="add")
    assert len(segment_ids(segmentation_node)) == 2
    assert written.replaced_names == []


def paint(segmentation_node, volume, segment_id, box) -> np.ndarray:
    """The user's correction: voxels of ``box`` flipped in one segment; returns the corrected mask."""
    mask = mrml.labels_from_segmentation(segmentation_node, volume, [segment_id]).astype(np.uint8)
    mask[box] = 1 - mask[box]
    image = mrml.volume_node_from_image(sitk.GetImageFromArray(mask), volume.GetScene(), "painted")
    image.SetIJKToRASMatrix(mrml._vtk_matrix(mrml.ijk_to_ras(volume)))
    labelmap = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(image)
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        labelmap, segmentation_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    volume.GetScene().RemoveNode(image)
    return mask


def test_a_segment_corrected_by_hand_is_not_replaced_without_being_asked(scene, volume, model):
    segmentation_node = mrml.segment_volume_node(volume, model, tasks=["breast_mri"], device="cpu")
    mrml.segment_volume_node(volume, model, tasks=["breast_mri"], device="cpu", segmentation_node=segmentation_node)
    (pectoral,) = segment_ids(segmentation_node)
    corrected = paint(segmentation_node, volume, pectoral, (slice(0, 6),))
    with pytest.raises(InputError, match="edited by hand.*existing='add'"):
        mrml.segment_volume_node(volume, model, tasks=["breast_mri"], device="cpu", segmentation_node=segmentation_node)
    assert segment_ids(segmentation_node) == [pectoral]
    assert np.array_equal(mrml.labels_from_segmentation(segmentation_node, volume, [pectoral]), corrected)
    mrml.segment_volume_node(volume, model, tasks=["breast_mri"], device="cpu", segmentation_node=segmentation_node,
                             existing="add")
    assert len(segment_ids(segmentation_node)) == 2
    assert np.array_equal(mrml.labels_from_segmentation(segmentation_node, volume, [pectoral]), corrected)
    result = segment_image(model, mrml.image_from_volume_node(volume), ["breast_mri"], device="cpu")
    mrml.write_segmentation(result, volume, segmentation_node, existing="replace_edited")
    assert not np.array_equal(mrml.labels_from_segmentation(segmentation_node, volume, [pectoral]), corrected)


def test_segments_of_a_scene_saved_cropped_to_minimum_extent_are_not_taken_for_edited_ones(scene, volume, model,
                                                                                            tmp_path):
    from dataclasses import replace

    result = segment_image(model, mrml.image_from_volume_node(volume), device="cpu")
    labels = np.zeros(sitk.GetArrayViewFromImage(result.labels).shape, np.uint16)
    inside = labels[3:-3, 3:-3, 3:-3]
    inside[...] = np.asarray(result.label_indices[1:])[np.arange(inside.shape[2]) % (len(result.label_indices) - 1)]
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(result.labels)
    result = replace(result, labels=image)  # every segment set, none touching the border
    written = mrml.new_segmentation_node(volume, "result")
    mrml.write_segmentation(result, volume, written)
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "result.seg.nrrd"))
    storage.SetCropToMinimumExtent(True)  # Slicer's save option: the shared layer shrinks, no voxel changes
    assert storage.WriteData(written)
    reloaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert storage.ReadData(reloaded)
    first = segment_ids(reloaded)[0]
    assert reloaded.GetSegmentation().GetSegment(first).GetRepresentation("Binary labelmap").GetExtent()[0] == 3
    assert mrml.edited_segments_replaced_by(result, reloaded) == []
    paint(reloaded, volume, first, (slice(5, 6), slice(5, 6), slice(5, 6)))
    assert mrml.edited_segments_replaced_by(result, reloaded) == [reloaded.GetSegmentation().GetSegment(first).GetName()]


def test_segments_tagged_with_the_digest_written_before_2026_12_03_are_not_taken_for_edited_ones(scene, volume, model):
    segmentation_node = mrml.segment_volume_node(volume, model, device="cpu")
    result = segment_image(model, mrml.image_from_volume_node(volume), device="cpu")
    segmentation = segmentation_node.GetSegmentation()
    for segment_id in segment_ids(segmentation_node):
        legacy = mrml._segment_digests(segmentation_node, segment_id)[1]
        assert legacy != mrml.segment_digest(segmentation_node, segment_id)
        segmentation.GetSegment(segment_id).SetTag(mrml.VOXELS_TAG, legacy)
    assert mrml.edited_segments_replaced_by(result, segmentation_node) == []


def surface_segmentation(volume):
    """A segmentation as one imported from STL: closed surfaces as its source representation."""
    node = mrml.new_segmentation_node(volume, "from STL")
    segmentation = node.GetSegmentation()
    surface = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    segmentation.SetSourceRepresentationName(surface)
    sphere = vtk.vtkSphereSource()
    sphere.SetRadius(5.0)
    sphere.Update()
    segment = slicer.vtkSegment()
    segment.SetName("tumour from STL")
    segment.AddRepresentation(surface, sphere.GetOutput())
    segmentation.AddSegment(segment)
    return node


def test_a_segmentation_of_surfaces_is_refused_by_name_and_left_as_it_was(scene, volume, model):
    """Slicer imports labels only into a segmentation whose source representation is a labelmap."""
    node = surface_segmentation(volume)
    segmentation = node.GetSegmentation()
    with pytest.raises(InputError, match="'from STL' keeps its segments as 'Closed surface'.*Binary labelmap"):
        mrml.segment_volume_node(volume, model, tasks=["breast_mri"], device="cpu", segmentation_node=node)
    result = segment_image(model, mrml.image_from_volume_node(volume), ["breast_mri"], device="cpu")
    with pytest.raises(InputError, match="Binary labelmap"):
        mrml.write_segmentation(result, volume, node)
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == ["tumour from STL"]


def test_undo_restores_the_segmentation_as_it_was(scene, volume, model):
    segmentation_node = mrml.new_segmentation_node(volume, "user work")
    hand = add_user_segment(segmentation_node, volume, "By hand", (slice(2, 8), slice(2, 8), slice(2, 8)))
    mask = mrml.labels_from_segmentation(segmentation_node, volume, [hand])
    result = segment_image(model, mrml.image_from_volume_node(volume), device="cpu")

    written = mrml.write_segmentation(result, volume, segmentation_node)
    assert len(segment_ids(segmentation_node)) > 1
    written.undo()
    assert segment_ids(segmentation_node) == [hand]
    assert np.array_equal(mrml.labels_from_segmentation(segmentation_node, volume, [hand]), mask)


def test_undo_of_a_new_segmentation_removes_it(scene, volume, model):
    result = segment_image(model, mrml.image_from_volume_node(volume), device="cpu")
    written = mrml.write_segmentation(result, volume)
    assert scene.GetNodeByID(written.segmentation_node.GetID()) is not None
    node_id = written.segmentation_node.GetID()
    written.undo()
    assert scene.GetNodeByID(node_id) is None


def test_the_scene_undo_stack_restores_the_segmentation_when_undo_is_on(scene, volume, model):
    segmentation_node = mrml.new_segmentation_node(volume, "user work")
    hand = add_user_segment(segmentation_node, volume, "By hand", (slice(2, 8), slice(2, 8), slice(2, 8)))
    scene.SetUndoOn()
    mrml.segment_volume_node(volume, model, device="cpu", segmentation_node=segmentation_node)
    assert len(segment_ids(segmentation_node)) > 1
    scene.Undo()
    assert segment_ids(segmentation_node) == [hand]


def test_cancelling_writes_nothing(scene, volume, model):
    segmentation_node = mrml.new_segmentation_node(volume, "user work")
    hand = add_user_segment(segmentation_node, volume, "By hand", (slice(2, 8), slice(2, 8), slice(2, 8)))
    nodes_before = scene.GetNumberOfNodes()
    stages = []

    def progress(fraction, stage):
        stages.append(stage)

    with pytest.raises(CancelledError):
        mrml.segment_volume_node(volume, model, device="cpu", segmentation_node=segmentation_node,
                                 with_probabilities=True, progress=progress, cancelled=lambda: len(stages) > 2)
    with pytest.raises(CancelledError):
        mrml.segment_volume_node(volume, model, device="cpu", cancelled=lambda: True)
    assert segment_ids(segmentation_node) == [hand]
    assert scene.GetNumberOfNodes() == nodes_before


def test_a_failing_write_restores_the_segmentation(scene, volume, model, monkeypatch):
    segmentation_node = mrml.new_segmentation_node(volume, "user work")
    hand = add_user_segment(segmentation_node, volume, "By hand", (slice(2, 8), slice(2, 8), slice(2, 8)))
    result = segment_image(model, mrml.image_from_volume_node(volume), device="cpu")
    mrml.write_segmentation(result, volume, segmentation_node)
    before = segment_ids(segmentation_node)

    def fail(*args):
        raise RuntimeError("out of memory while importing")

    monkeypatch.setattr(mrml, "_labelmap_node", fail)  # fails after the old segments were removed
    with pytest.raises(RuntimeError, match="out of memory"):
        mrml.write_segmentation(result, volume, segmentation_node)
    assert segment_ids(segmentation_node) == before
    assert before[0] == hand


# ---------------------------------------------------------------------------------------------
# Files, probabilities, input checks


def test_seg_nrrd_saved_by_the_storage_node_reads_back_with_slicerio(scene, volume, oblique_file, model, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    segmentation_node = mrml.segment_volume_node(volume, model, device="cpu")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "result.seg.nrrd"))
    assert storage.WriteData(segmentation_node)

    segmentation = slicerio.read_segmentation(str(tmp_path / "result.seg.nrrd"))
    direct = segment_image(model, read_image(oblique_file), device="cpu")
    labels_ijk = sitk.GetArrayFromImage(direct.labels).transpose(2, 1, 0)
    assert [s["name"] for s in segmentation["segments"]] == [d.name for d in describe_segments(direct)]
    for segment, description in zip(segmentation["segments"], describe_segments(direct)):
        assert segment["terminology"]["type"] == description.terminology["type"]
        assert segment["terminology"]["category"] == description.terminology["category"]
        assert segment["tags"]["MultiTaskSeg.Model"] == "tiny-triplanar"
        mask = slicerio.segment_mask(segmentation, segment)
        full = np.zeros(labels_ijk.shape, bool)
        offset = segmentation.get("referenceImageExtentOffset", [0, 0, 0])
        full[offset[0]:offset[0] + mask.shape[0], offset[1]:offset[1] + mask.shape[1],
             offset[2]:offset[2] + mask.shape[2]] = mask
        assert np.array_equal(full, labels_ijk == description.label), description.name


def test_uncertainty_volume_is_on_the_source_grid_and_between_zero_and_one(scene, volume, model):
    segmentation_node = mrml.segment_volume_node(volume, model, device="cpu", with_probabilities=True)
    uncertainty = segmentation_node.GetNodeReference(mrml.UNCERTAINTY_REFERENCE_ROLE)
    assert uncertainty is not None
    np.testing.assert_allclose(mrml.ijk_to_ras(uncertainty), mrml.ijk_to_ras(volume), atol=1e-9)
    values = sitk.GetArrayFromImage(mrml.image_from_volume_node(uncertainty))
    assert values.shape == tuple(reversed(volume.GetImageData().GetDimensions()))
    assert values.min() >= 0.0 and values.max() <= 1.0 + 1e-6


def test_undo_removes_the_uncertainty_volume_written_with_the_result(scene, volume, model):
    segmentation_node = mrml.new_segmentation_node(volume, "user work")
    hand = add_user_segment(segmentation_node, volume, "By hand", (slice(2, 8), slice(2, 8), slice(2, 8)))
    result = segment_image(model, mrml.image_from_volume_node(volume), device="cpu", with_probabilities=True)
    written = mrml.write_segmentation(result, volume, segmentation_node, uncertainty="entropy")
    uncertainty_id = written.uncertainty_node.GetID()
    assert segmentation_node.GetNodeReferenceID(mrml.UNCERTAINTY_REFERENCE_ROLE) == uncertainty_id
    written.undo()
    assert scene.GetNodeByID(uncertainty_id) is None
    assert segment_ids(segmentation_node) == [hand]


def test_an_unknown_uncertainty_kind_is_refused_before_anything_is_written(scene, volume, model):
    result = segment_image(model, mrml.image_from_volume_node(volume), device="cpu", with_probabilities=True)
    nodes_before = scene.GetNumberOfNodes()
    with pytest.raises(InputError, match="uncertainty kind"):
        mrml.write_segmentation(result, volume, uncertainty="variance")
    assert scene.GetNumberOfNodes() == nodes_before


def test_uncertainty_kinds_follow_the_probabilities(volume, model):
    result = segment_image(model, mrml.image_from_volume_node(volume), device="cpu", with_probabilities=True)
    probabilities = sitk.GetArrayFromImage(result.probabilities)
    np.testing.assert_allclose(mrml.uncertainty_array(result, "max_probability"), probabilities[..., 1:].max(-1), rtol=1e-6)
    entropy = mrml.uncertainty_array(result, "entropy")
    assert np.all(entropy[probabilities.max(-1) > 0.999] < 0.01)
    with pytest.raises(InputError, match="uncertainty kind"):
        mrml.uncertainty_array(result, "variance")


def test_multi_component_and_2d_volumes_are_refused_with_what_to_do(scene, model):
    vector = sitk.Compose([oblique_image(np.float32)] * 3)
    vector_node = mrml.volume_node_from_image(vector, scene, "rgb", node_class="vtkMRMLVectorVolumeNode")
    with pytest.raises(InputError, match="3 components per voxel; choose one channel"):
        mrml.input_warnings(vector_node, model)
    flat = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(1, 30, 30)).astype(np.float32))
    with pytest.raises(InputError, match="2-D"):
        mrml.input_warnings(mrml.volume_node_from_image(flat, scene, "slice"), model)
    with pytest.raises(InputError, match="no input volume"):
        mrml.image_from_volume_node(None)


def test_input_that_does_not_fit_the_model_card_gives_warnings(scene, model):
    ct_like = oblique_image(np.float32)
    array = sitk.GetArrayFromImage(ct_like)
    array[:, :4] = -1000.0  # air in Hounsfield units: this is a CT
    coarse = sitk.GetImageFromArray(array)
    coarse.CopyInformation(ct_like)
    coarse.SetSpacing((6.0, 6.0, 6.0))
    warnings = mrml.input_warnings(mrml.volume_node_from_image(coarse, scene, "ct"), model, ["brain_t1_mri"])
    assert any("looks CT" in w for w in warnings)
    assert any("spacing" in w for w in warnings)


def shifted_and_rotated(scene):
    """A 50 mm / 15 degree linear transform, as a registration would give."""
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    matrix = vtk.vtkTransform()
    matrix.Translate(50.0, -20.0, 10.0)
    matrix.RotateWXYZ(15.0, 0.3, 0.2, 0.9)
    transform.SetMatrixTransformToParent(matrix.GetMatrix())
    return transform


def warping(scene):
    """A smooth non-linear (grid) transform of a few millimetres."""
    grid = vtk.vtkImageData()
    grid.SetOrigin(-80.0, -80.0, -80.0)
    grid.SetSpacing(20.0, 20.0, 20.0)
    grid.SetDimensions(9, 9, 9)
    grid.AllocateScalars(vtk.VTK_DOUBLE, 3)
    from vtk.util import numpy_support

    displacement = numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars())
    displacement[:] = 4.0 * np.sin(np.arange(displacement.size).reshape(displacement.shape) / 7.0)
    grid_transform = vtk.vtkGridTransform()
    grid_transform.SetDisplacementGridData(grid)
    transform = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    transform.SetAndObserveTransformToParent(grid_transform)
    return transform


def labels_exported_by_slicer(segmentation_node, segment_ids, volume) -> np.ndarray:
    """The segments on the volume's grid, as Slicer's own export makes them (it resolves transforms)."""
    from vtk.util import numpy_support

    labelmap = segmentation_node.GetScene().AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentation_node, segment_ids, labelmap, volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    data = labelmap.GetImageData()
    return numpy_support.vtk_to_numpy(data.GetPointData().GetScalars()).reshape(tuple(reversed(data.GetDimensions())))


@pytest.mark.parametrize("make_transform", [shifted_and_rotated, warping])
def test_segments_of_a_transformed_volume_coincide_with_the_labels_of_its_file(scene, volume, oblique_file, model,
                                                                               make_transform):
    transform = make_transform(scene)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    segmentation_node = mrml.segment_volume_node(volume, model, device="cpu")
    assert segmentation_node.GetTransformNodeID() == transform.GetID()
    expected = segment_image(model, read_image(oblique_file), device="cpu")
    descriptions = describe_segments(expected)
    lookup = np.zeros(256, np.uint8)
    for position, description in enumerate(descriptions, start=1):
        lookup[description.label] = position
    expected_labels = lookup[sitk.GetArrayViewFromImage(expected.labels)]
    ids = segment_ids(segmentation_node)
    exported = labels_exported_by_slicer(segmentation_node, ids, volume)
    assert exported.shape == expected_labels.shape
    for position in range(1, len(descriptions) + 1):
        mine, theirs = exported == position, expected_labels == position
        if theirs.any():
            dice = 2 * np.count_nonzero(mine & theirs) / (np.count_nonzero(mine) + np.count_nonzero(theirs))
            assert dice >= 0.99, f"segment {descriptions[position - 1].name} is off the volume: Dice {dice:.3f}"
    assert np.array_equal(mrml.labels_from_segmentation(segmentation_node, volume, ids), exported)


def test_a_new_segmentation_of_a_transformed_volume_keeps_the_volumes_own_geometry(scene, volume):
    """Under the volume's transform, the reference geometry is the volume's untransformed one (not moved twice)."""
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    untransformed = mrml.new_segmentation_node(volume, "before").GetSegmentation().GetConversionParameter(name)
    transform = shifted_and_rotated(scene)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    node = mrml.new_segmentation_node(volume, "after")
    assert node.GetTransformNodeID() == transform.GetID()
    assert node.GetSegmentation().GetConversionParameter(name) == untransformed


def test_labels_are_refused_across_a_non_linear_transform_between_volume_and_segmentation(scene, volume, model):
    segmentation_node = mrml.segment_volume_node(volume, model, device="cpu")
    volume.SetAndObserveTransformNodeID(warping(scene).GetID())
    with pytest.raises(InputError, match="non-linear"):
        mrml.labels_from_segmentation(segmentation_node, volume, segment_ids(segmentation_node))


def test_undo_is_refused_once_the_result_was_corrected_by_hand(scene, volume, model):
    segmentation_node = mrml.new_segmentation_node(volume, "user work")
    add_user_segment(segmentation_node, volume, "By hand", (slice(2, 8), slice(2, 8), slice(2, 8)))
    result = segment_image(model, mrml.image_from_volume_node(volume), device="cpu")
    written = mrml.write_segmentation(result, volume, segmentation_node)
    edited = written.segment_ids[0]
    mask = mrml.labels_from_segmentation(segmentation_node, volume, [edited]).astype(np.uint8)
    mask[:4] = 1 - mask[:4]  # the user paints and erases in the result
    image = mrml.volume_node_from_image(sitk.GetImageFromArray(mask), scene, "painted")
    image.SetIJKToRASMatrix(mrml._vtk_matrix(mrml.ijk_to_ras(volume)))
    labelmap = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(image)
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        labelmap, segmentation_node, edited, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    with pytest.raises(InputError, match="edited after the result was written"):
        written.undo()
    corrected = add_user_segment(segmentation_node, volume, "Correction", (slice(1, 3), slice(1, 3), slice(1, 3)))
    with pytest.raises(InputError, match="edited after the result was written"):
        written.undo()
    assert np.array_equal(mrml.labels_from_segmentation(segmentation_node, volume, [edited]), mask)
    assert corrected in segment_ids(segmentation_node)
    assert len(segment_ids(segmentation_node)) == 2 + len(written.segment_ids)


def test_a_volume_with_a_sheared_grid_is_refused_as_its_file_would_be(scene, model):
    """Slicer keeps an IJK-to-RAS matrix whose axes are not perpendicular (a gantry-tilted CT kept as
    acquired); the networks would see sheared anatomy, so it is refused as read_image refuses the file."""
    node = mrml.volume_node_from_image(oblique_image(), scene, "tilted")
    matrix = np.eye(4)
    matrix[:3, :3] = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.4], [0.0, 0.0, 1.0]]  # slices leaning 22 degrees
    node.SetIJKToRASMatrix(mrml._vtk_matrix(matrix))
    assert np.allclose(mrml.ijk_to_ras(node), matrix)
    with pytest.raises(InputError, match="volume 'tilted' has a direction matrix .* not perpendicular.*resample it"):
        mrml.input_warnings(node, model)
    with pytest.raises(InputError, match="not perpendicular"):
        mrml.segment_volume_node(node, model, device="cpu")
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0
