"""One Apply of the module, headless on real MRML: inputs frozen at start, written onto them at the end."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is needed for the MRML tests")

from MultiTaskSegLib import background, mrml, mrml_run  # noqa: E402
from MultiTaskSegLib.errors import InputError  # noqa: E402
from MultiTaskSegLib.inference import segment_image  # noqa: E402
from conftest import make_tiny_model  # noqa: E402
from test_mrml import oblique_image, surface_segmentation  # noqa: E402

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(["brain_t1_mri", "breast_mri"], seed=7, varied=True)


@pytest.fixture
def scene():
    mrml.ensure_segmentation_converters()
    return slicer.vtkMRMLScene()


def finished_run(scene, model, **settings) -> tuple[mrml_run.SegmentationRun, object]:
    volume = mrml.volume_node_from_image(oblique_image(), scene, "chosen at Apply")
    run = mrml_run.start_run(volume, model, device="cpu", **settings)
    assert run.wait(TIMEOUT).state == background.SUCCEEDED
    return run, volume


def test_the_result_lands_on_the_volume_chosen_at_start_even_if_another_is_selected(scene, model):
    run, chosen = finished_run(scene, model)
    same_size = oblique_image()
    same_size.SetOrigin((100.0, 0.0, 0.0))
    mrml.volume_node_from_image(same_size, scene, "selected during the run")
    written, _, _ = run.write()
    node = written.segmentation_node
    assert node.GetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole()) == chosen.GetID()
    expected = segment_image(model, mrml.image_from_volume_node(chosen), device="cpu").labels
    exported = mrml.labels_from_segmentation(node, chosen, written.segment_ids)
    assert np.array_equal(exported > 0, sitk.GetArrayFromImage(expected) > 0)


def test_a_volume_whose_geometry_changed_during_the_run_gets_nothing(scene, model):
    run, chosen = finished_run(scene, model)
    chosen.SetSpacing(2.0, 2.0, 2.0)
    with pytest.raises(InputError, match="changed its size, spacing"):
        run.write()
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0


def test_a_volume_removed_during_the_run_gets_nothing(scene, model):
    run, chosen = finished_run(scene, model)
    scene.RemoveNode(chosen)
    with pytest.raises(InputError, match="removed from the scene"):
        run.write()


def test_the_uncertainty_setting_is_the_one_chosen_at_start(scene, model):
    run, _ = finished_run(scene, model, with_uncertainty=False)
    with pytest.raises(AttributeError):
        run.inputs.with_uncertainty = True  # frozen: a tick during the run changes nothing
    written, uncertainty, _ = run.write()
    assert uncertainty is None
    assert not written.segmentation_node.GetNodeReferenceID(mrml.UNCERTAINTY_REFERENCE_ROLE)


def test_the_uncertainty_volume_chosen_at_start_is_written_and_undone_with_the_segments(scene, model):
    run, _ = finished_run(scene, model, with_uncertainty=True, uncertainty_kind="max_probability")
    written, uncertainty, _ = run.write()
    assert uncertainty is written.uncertainty_node and "foreground probability" in uncertainty.GetName()
    assert written.segmentation_node.GetNodeReferenceID(mrml.UNCERTAINTY_REFERENCE_ROLE) == uncertainty.GetID()
    segmentation_id, uncertainty_id = written.segmentation_node.GetID(), uncertainty.GetID()
    written.undo()  # the module's Undo button
    assert scene.GetNodeByID(segmentation_id) is None and scene.GetNodeByID(uncertainty_id) is None


def test_a_segmentation_deleted_during_the_run_gives_a_new_one(scene, model):
    volume = mrml.volume_node_from_image(oblique_image(), scene, "volume")
    target = mrml.new_segmentation_node(volume, "target")
    run = mrml_run.start_run(volume, model, device="cpu", segmentation_node=target)
    run.wait(TIMEOUT)
    scene.RemoveNode(target)
    written, _, _ = run.write()
    assert written.segmentation_node is not target and written.segmentation_node.GetScene() is scene


def test_labels_computed_on_another_grid_of_the_same_size_are_refused(scene, model):
    volume = mrml.volume_node_from_image(oblique_image(), scene, "volume")
    other = oblique_image()
    other.SetOrigin((0.0, 0.0, 0.0))
    result = segment_image(model, other, device="cpu")
    with pytest.raises(InputError, match="another grid"):
        mrml.write_segmentation(result, volume)


def test_a_segmentation_of_surfaces_is_refused_before_the_run_starts(scene, model):
    volume = mrml.volume_node_from_image(oblique_image(), scene, "chosen at Apply")
    with pytest.raises(InputError, match="Binary labelmap"):
        mrml_run.start_run(volume, model, device="cpu", segmentation_node=surface_segmentation(volume))
