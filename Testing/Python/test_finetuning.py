"""Fine-tuning on corrected cases: provenance, resumption, the held-back guard, refusals, and the
Slicer side storing a corrected case against real MRML (slicer-core)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_tiny_model, write_tiny_dataset

from MultiTaskSegLib.cli import main
from MultiTaskSegLib.errors import InputError
from MultiTaskSegLib.finetuning import finetune, finetune_config, store_case
from MultiTaskSegLib.model_files import load_model, save_model
from MultiTaskSegLib.tasks import get_task
from MultiTaskSegLib.training import train

TASKS = ["breast_mri", "cardiac_cta"]


def quiet(message: str) -> None:
    pass


@pytest.fixture
def parent(tmp_path):
    return save_model(make_tiny_model(TASKS, seed=3, name="parent"), tmp_path / "models" / "parent")


def test_the_fine_tuned_model_names_its_parent_and_cases_and_leaves_the_parent_alone(tmp_path, parent, capsys):
    data = write_tiny_dataset(tmp_path / "corrected", cases=3)
    before = {path.name: path.read_bytes() for path in parent.iterdir()}
    code = main(["finetune", "--model", str(parent), "--data", f"breast_mri={data / 'breast_mri'}",
                 "--out", str(tmp_path / "run"), "--steps", "4", "--batch-size", "4", "--device", "cpu"])
    assert code == 0
    assert "fine-tuned from parent" in capsys.readouterr().out
    metadata = json.loads((tmp_path / "run" / "model" / "model.json").read_text())
    parent_metadata = json.loads((parent / "model.json").read_text())
    assert metadata["provenance"]["config"]["parent"]["weights_sha256"] == parent_metadata["weights_sha256"]
    assert metadata["card"]["fine_tuned_from"]["name"] == "parent"
    assert metadata["name"] == "parent-finetuned" and metadata["version"].endswith("+finetuned")
    assert metadata["tasks"] == parent_metadata["tasks"]  # the whole label space is kept
    cases = metadata["provenance"]["training_cases"] + metadata["provenance"]["validation_cases"]
    assert sorted(cases) == ["breast_mri/case_000", "breast_mri/case_001", "breast_mri/case_002"]
    assert {path.name: path.read_bytes() for path in parent.iterdir()} == before


def test_with_two_cases_one_is_held_back_and_the_best_weights_including_the_parents_are_kept(tmp_path, parent):
    data = write_tiny_dataset(tmp_path / "corrected", cases=2)
    model = finetune(parent, {"breast_mri": data / "breast_mri"}, tmp_path / "run", steps=4, batch_size=4,
                     validate_every=2, device="cpu")
    record = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    assert set(record["history"]) == {"0", "2", "4"}  # the parent (step 0) competes too
    assert model.provenance["kept_step"] == record["step"]
    assert len(model.provenance["validation_cases"]) == 1
    kept = load_model(tmp_path / "run" / "model")
    chosen = load_model(tmp_path / "run" / "best" / "model")
    for name, tensor in kept.architecture.network.state_dict().items():
        assert np.array_equal(tensor.numpy(), chosen.architecture.network.state_dict()[name].numpy()), name


def test_an_interrupted_fine_tune_resumes_and_ends_where_an_uninterrupted_one_does(tmp_path, parent):
    data = {"breast_mri": write_tiny_dataset(tmp_path / "corrected", cases=3) / "breast_mri"}
    whole = finetune(parent, data, tmp_path / "whole", steps=4, batch_size=4, validate_every=2, device="cpu")
    config = finetune_config(load_model(parent), data, steps=4, batch_size=4, validate_every=2, device="cpu")
    train(config, tmp_path / "resumed", log=quiet, stop_after=2)
    messages = []
    resumed = train(config, tmp_path / "resumed", log=messages.append)
    assert any("resuming" in message for message in messages)
    assert resumed.provenance["steps_done"] == whole.provenance["steps_done"] == 4
    for name, tensor in whole.architecture.network.state_dict().items():
        assert np.allclose(tensor.numpy(), resumed.architecture.network.state_dict()[name].numpy(), atol=1e-6), name


def test_a_fine_tune_run_again_on_other_cases_is_refused_not_returned_with_its_old_weights(tmp_path, parent):
    made = write_tiny_dataset(tmp_path / "made", cases=2) / "breast_mri"
    cases = tmp_path / "cases" / "breast_mri"
    shutil.copytree(made / "case_000", cases / "case_000")
    command = ["finetune", "--model", str(parent), "--data", f"breast_mri={cases}", "--out", str(tmp_path / "run"),
               "--steps", "2", "--batch-size", "4", "--device", "cpu"]
    assert main(command) == 0
    first = (tmp_path / "run" / "model" / "model.json").read_bytes()
    shutil.rmtree(cases / "case_000")  # one correction replaced by another: as many cases as before
    shutil.copytree(made / "case_001", cases / "case_001")
    assert main(command) == 2
    assert (tmp_path / "run" / "model" / "model.json").read_bytes() == first  # not relabelled as trained on case_001


def test_cases_whose_labels_are_not_the_tasks_values_are_refused(tmp_path, parent):
    data = write_tiny_dataset(tmp_path / "corrected", cases=2)
    label_path = data / "breast_mri" / "case_000" / "label.nii.gz"
    label = sitk.ReadImage(str(label_path))
    sitk.WriteImage(label * 7, str(label_path))  # a label map in another label space
    with pytest.raises(InputError, match=r"values \[7\] that are no class of task breast_mri"):
        finetune_config(load_model(parent), {"breast_mri": data / "breast_mri"}, device="cpu")
    with pytest.raises(InputError, match="does not segment task"):
        finetune_config(load_model(parent), {"brain_t1_mri": data / "breast_mri"}, device="cpu")


def test_a_stored_case_holds_the_tasks_source_values_and_is_never_overwritten(tmp_path):
    task = get_task("brain_t1_mri")
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((4, 5, 6)).astype(np.float32) + 1)
    classes = np.zeros((4, 5, 6), np.int32)
    classes[1, 1:3, 1:3] = 1  # white matter
    classes[2, 2:4, 2:4] = 6  # brain stem
    folder = store_case(tmp_path / "cases", task, "bert", image, classes)
    stored = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "label.nii.gz")))
    assert set(np.unique(stored)) == {0, 2, 16}  # FreeSurfer: 2 cerebral white matter, 16 brain stem
    assert np.array_equal(task.map_labels(stored), classes)
    with pytest.raises(InputError, match="already holds a stored case"):
        store_case(tmp_path / "cases", task, "bert", image, classes)


def test_the_slicer_logic_stores_a_corrected_segmentation_as_a_training_case(tmp_path, parent):
    slicer = pytest.importorskip("slicer", reason="slicer-core is needed for the MRML tests")

    from MultiTaskSegLib import mrml

    mrml.ensure_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    values = np.full((10, 12, 14), 100.0, np.float32)
    values[3:7, 4:8, 5:9] = 400.0
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((1.3, 1.3, 1.3))
    path = tmp_path / "patient.nrrd"
    sitk.WriteImage(image, str(path))
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "patient 7")
    assert storage.ReadData(volume)
    segmentation_node = mrml.segment_volume_node(volume, load_model(parent), tasks=["breast_mri"], device="cpu")
    segmentation = segmentation_node.GetSegmentation()
    muscle_id = segmentation.GetNthSegmentID(0)
    corrected = np.zeros(values.shape, np.uint8)
    corrected[3:7, 4:8, 5:9] = 1  # the user's correction: exactly the bright box
    labelmap = mrml._labelmap_node(corrected, volume)
    segmentation.RemoveSegment(muscle_id)
    slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node)
    segmentation.GetNthSegment(0).SetName("Pectoral muscle")  # a segment the user made, named after the class
    folder = mrml.store_corrected_case(volume, segmentation_node, "breast_mri", tmp_path / "cases")
    assert folder == tmp_path / "cases" / "breast_mri" / "patient_7"
    stored = sitk.ReadImage(str(folder / "label.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(stored), corrected)
    assert np.allclose(stored.GetSpacing(), (1.3, 1.3, 1.3))
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "image.nii.gz"))), values)
    with pytest.raises(InputError, match="no segment of task cardiac_cta"):
        mrml.store_corrected_case(volume, segmentation_node, "cardiac_cta", tmp_path / "cases")


def test_volumes_of_the_same_name_are_stored_as_separate_cases_and_none_is_overwritten(tmp_path):
    slicer = pytest.importorskip("slicer", reason="slicer-core is needed for the MRML tests")

    from MultiTaskSegLib import mrml

    mrml.ensure_segmentation_converters()
    stored = []
    for patient in range(2):  # DICOM series names repeat from patient to patient
        scene = slicer.vtkMRMLScene()
        values = np.full((6, 7, 8), 100.0 + patient, np.float32)
        volume = mrml.volume_node_from_image(sitk.GetImageFromArray(values), scene, "3: T1 MPRAGE")
        segmentation_node = mrml.new_segmentation_node(volume)
        corrected = np.zeros(values.shape, np.uint8)
        corrected[2:4, 2:5, 1 + patient:6] = 1
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
            mrml._labelmap_node(corrected, volume), segmentation_node)
        segmentation_node.GetSegmentation().GetNthSegment(0).SetName("Pectoral muscle")
        stored.append(mrml.store_corrected_case(volume, segmentation_node, "breast_mri", tmp_path / "cases"))
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(stored[-1] / "label.nii.gz"))), corrected)
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(stored[-1] / "image.nii.gz"))), values)
    assert [folder.name for folder in stored] == ["3__T1_MPRAGE", "3__T1_MPRAGE_2"]
    with pytest.raises(InputError, match="already holds a stored case"):  # a name the caller gives is never reused
        mrml.store_corrected_case(volume, segmentation_node, "breast_mri", tmp_path / "cases", case_name="3__T1_MPRAGE")


def test_a_correction_kept_as_closed_surfaces_is_stored_as_its_labelmap(tmp_path):
    slicer = pytest.importorskip("slicer", reason="slicer-core is needed for the MRML tests")
    import vtk

    from MultiTaskSegLib import mrml

    mrml.ensure_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    volume = mrml.volume_node_from_image(sitk.GetImageFromArray(np.zeros((20, 20, 20), np.float32)), scene, "patient")
    segmentation_node = mrml.new_segmentation_node(volume, "imported from STL")
    surface = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    segmentation_node.GetSegmentation().SetSourceRepresentationName(surface)
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(-10.0, -10.0, 10.0)  # RAS of voxel (10, 10, 10): ITK's LPS origin 0, unit spacing
    sphere.SetRadius(5.0)
    sphere.SetThetaResolution(64)
    sphere.SetPhiResolution(64)
    sphere.Update()
    segment = slicer.vtkSegment()
    segment.SetName("Pectoral muscle")
    segment.AddRepresentation(surface, sphere.GetOutput())
    segmentation_node.GetSegmentation().AddSegment(segment)
    folder = mrml.store_corrected_case(volume, segmentation_node, "breast_mri", tmp_path / "cases")
    stored = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "label.nii.gz"))) > 0
    z, y, x = np.mgrid[:20, :20, :20]
    inside = (x - 10) ** 2 + (y - 10) ** 2 + (z - 10) ** 2 <= 25
    assert 2 * (stored & inside).sum() / (stored.sum() + inside.sum()) > 0.9


def test_a_fine_tune_in_a_child_process_reports_progress_and_gives_the_new_model(tmp_path, parent):
    from MultiTaskSegLib.finetuning import start_finetune

    data = write_tiny_dataset(tmp_path / "cases", cases=2)
    job = start_finetune(parent, data, tmp_path / "run", steps=4, device="cpu")
    status = job.wait(120)
    assert status.state == "succeeded", status.error
    assert job.result == tmp_path / "run" / "model"
    assert load_model(job.result).provenance["config"]["parent"]["name"] == "parent"


def test_fine_tuning_again_after_storing_another_case_trains_on_all_cases_and_keeps_the_first_model(tmp_path, parent):
    from MultiTaskSegLib.finetuning import finetune_run_folder, start_finetune

    made = write_tiny_dataset(tmp_path / "made", cases=2) / "breast_mri"
    cases = tmp_path / "cases"

    def press_fine_tune() -> Path:  # what the module's Fine-tune button runs
        out = finetune_run_folder(cases, load_model(parent))
        status = start_finetune(parent, cases, out, steps=2, device="cpu", name=out.name).wait(120)
        assert status.state == "succeeded", status.error
        return out / "model"

    shutil.copytree(made / "case_000", cases / "breast_mri" / "case_000")
    first = press_fine_tune()
    first_files = {path.name: path.read_bytes() for path in first.iterdir()}
    shutil.copytree(made / "case_001", cases / "breast_mri" / "case_001")
    second = press_fine_tune()
    assert first == cases / "finetunes" / "parent-finetuned" / "model"
    assert second == cases / "finetunes" / "parent-finetuned-2" / "model"
    assert {path.name: path.read_bytes() for path in first.iterdir()} == first_files
    model = load_model(second)
    assert model.name == "parent-finetuned-2"
    assert sorted(model.provenance["training_cases"] + model.provenance["validation_cases"]) == [
        "breast_mri/case_000", "breast_mri/case_001"]


def test_a_fine_tune_cancelled_then_started_after_storing_another_case_trains_on_all_cases(tmp_path, parent):
    from MultiTaskSegLib.finetuning import finetune_run_folder, start_finetune

    made = write_tiny_dataset(tmp_path / "made", cases=3) / "breast_mri"
    cases = tmp_path / "cases"
    for stored in ("case_000", "case_001"):
        shutil.copytree(made / stored, cases / "breast_mri" / stored)
    interrupted = finetune_run_folder(cases, load_model(parent))
    config = finetune_config(load_model(parent), {"breast_mri": cases / "breast_mri"}, steps=8, device="cpu",
                             name=interrupted.name)
    train(config, interrupted, log=quiet, stop_after=2)  # cancelled after its first checkpoint
    assert finetune_run_folder(cases, load_model(parent)) == interrupted  # the same cases: it resumes
    shutil.copytree(made / "case_002", cases / "breast_mri" / "case_002")
    out = finetune_run_folder(cases, load_model(parent))
    status = start_finetune(parent, cases, out, steps=8, device="cpu", name=out.name).wait(120)
    assert status.state == "succeeded", status.error
    model = load_model(out / "model")
    assert len(model.provenance["training_cases"] + model.provenance["validation_cases"]) == 3
    assert (interrupted / "checkpoint").is_dir()  # the interrupted run is left as it was


def test_a_cancelled_fine_tune_stops_and_can_be_resumed(tmp_path, parent):
    from MultiTaskSegLib.finetuning import start_finetune

    data = write_tiny_dataset(tmp_path / "cases", cases=2)
    job = start_finetune(parent, data, tmp_path / "run", steps=100000, device="cpu")
    job.cancel()
    assert job.wait(60).state == "cancelled"
    assert not (tmp_path / "run" / "model").exists()
