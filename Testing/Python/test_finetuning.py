"""Fine-tuning on corrected cases: provenance, resumption, the held-back guard, refusals, and the
Slicer side storing a corrected case against real MRML (slicer-core)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import TINY_TRIPLANAR, make_tiny_model, write_tiny_dataset

from MultiTaskSegLib.cli import main
from MultiTaskSegLib.errors import InputError
from MultiTaskSegLib.finetuning import finetune, finetune_config, store_case
from MultiTaskSegLib.model_files import SegmentationModel, load_model, save_model
from MultiTaskSegLib.tasks import LabelSpace, Task, get_task, task_from_dict
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


def test_a_task_naming_its_files_by_patterns_stores_plain_names_that_are_found_again(tmp_path):
    """A user task may list only glob patterns (``*_t1.nii.gz``); a stored case must not be written to a
    file literally named ``*_t1.nii.gz``, and the fine-tune must find it."""
    import dataclasses

    from MultiTaskSegLib.datasets import find_cases

    task = dataclasses.replace(get_task("brain_t1_mri"), image_files=("*_t1.nii.gz",),
                               label_files=("sub-??_aseg.nii.gz",))
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((4, 5, 6)).astype(np.float32) + 1)
    classes = np.zeros((4, 5, 6), np.int32)
    classes[1, 1:3, 1:3] = 1
    folder = store_case(tmp_path / "cases", task, "bert", image, classes)
    assert sorted(p.name for p in folder.iterdir()) == ["case_t1.nii.gz", "sub-xx_aseg.nii.gz"]
    [found] = find_cases(task, tmp_path / "cases" / task.name)
    assert (found.image.name, found.label.name) == ("case_t1.nii.gz", "sub-xx_aseg.nii.gz")
    unusable = dataclasses.replace(task, image_files=("[!x]*.nii.gz",))
    with pytest.raises(InputError, match="add a plain file name"):
        store_case(tmp_path / "cases", unusable, "other", image, classes)
    assert not (tmp_path / "cases" / task.name / "other").exists()


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


# ---------------------------------------------------------------------------------------------
# A model's own tasks, and several tasks at once, through what the module's buttons run


def user_task(name: str, labels: list[int], class_name: str = "Forearm muscle") -> Task:
    """A task from a user's task file, known to its model only: the file is not on MULTITASKSEG_TASK_PATH."""
    return task_from_dict({"name": name, "modality": "MR", "working_spacing_mm": 1.3,
                           "classes": [{"name": class_name, "color": [0.8, 0.3, 0.3], "labels": labels}]},
                          where=f"task file {name}.toml")


def model_of(tasks: list[Task], folder: Path) -> Path:
    """An untrained tiny model of ``tasks`` (its label space carries their definitions), saved to ``folder``."""
    import torch

    torch.manual_seed(5)
    return save_model(SegmentationModel.create(folder.name, "triplanar", LabelSpace(tuple(tasks)), **TINY_TRIPLANAR), folder)


@pytest.fixture
def scene():
    slicer = pytest.importorskip("slicer", reason="slicer-core is needed for the MRML tests")
    return slicer.vtkMRMLScene()


def segmented_scan(scene, model, tasks=None):
    """A scan ('patient 7', a bright box in noise) segmented by ``model`` as the module's Apply does."""
    from MultiTaskSegLib import mrml

    mrml.ensure_segmentation_converters()
    values = 100.0 + np.random.default_rng(7).normal(0, 5, (10, 12, 14)).astype(np.float32)
    values[3:7, 4:8, 5:9] += 300.0
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((1.3, 1.3, 1.3))
    volume = mrml.volume_node_from_image(image, scene, "patient 7")
    return volume, mrml.segment_volume_node(volume, load_model(model), tasks, device="cpu")


def correct(segmentation_node, volume, segment_id: str, mask: np.ndarray) -> None:
    """The user's correction in the Segment Editor: the segment's voxels become ``mask``."""
    import vtk

    from MultiTaskSegLib import mrml

    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    mrml._import_in_volume_frame(mrml._labelmap_node(mask.astype(np.uint8), volume), volume, segmentation_node, ids)


def box(z: slice, y: slice, x: slice) -> np.ndarray:
    mask = np.zeros((10, 12, 14), bool)
    mask[z, y, x] = True
    return mask


@pytest.mark.parametrize("task, stored_value", [
    (user_task("forearm_muscle_mri", [5, 6]), 5),  # a task of the user's own, not registered
    (user_task("breast_mri", [3], "Pectoral muscle"), 3),  # the model's definition of a registered task differs
], ids=["unregistered task", "registered name, the model's own label values"])
def test_a_models_own_task_is_stored_in_its_label_values_and_fine_tuned_on(tmp_path, scene, task, stored_value):
    from MultiTaskSegLib import mrml
    from MultiTaskSegLib.finetuning import finetune_run_folder

    parent = model_of([task], tmp_path / "models" / "mine")
    volume, segmentation_node = segmented_scan(scene, parent)
    correction = box(slice(3, 7), slice(4, 8), slice(5, 9))
    correct(segmentation_node, volume, f"{task.name}.{task.class_names[0].replace(' ', '_')}", correction)
    # the Add to training cases button
    [folder] = mrml.store_corrected_cases(volume, segmentation_node, load_model(parent), [task.name], tmp_path / "cases")
    assert folder == tmp_path / "cases" / task.name / "patient_7"
    stored = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "label.nii.gz")))
    assert np.array_equal(stored, np.where(correction, stored_value, 0))
    # the Fine-tune button (its child process runs this command), and the command with TASK=FOLDER
    out = finetune_run_folder(tmp_path / "cases", load_model(parent))
    for data, run in ((str(tmp_path / "cases"), out), (f"{task.name}={tmp_path / 'cases' / task.name}", tmp_path / "run")):
        assert main(["finetune", "--model", str(parent), "--data", data, "--out", str(run), "--steps", "2",
                     "--batch-size", "4", "--device", "cpu"]) == 0
        model = load_model(run / "model")
        assert model.provenance["training_cases"] == [f"{task.name}/patient_7"]
        assert model.label_space == load_model(parent).label_space


def test_every_ticked_task_is_stored_as_its_own_case(tmp_path, scene):
    from MultiTaskSegLib import mrml

    forearm, elbow = user_task("forearm_muscle_mri", [5]), user_task("elbow_mri", [1, 2], "Elbow joint")
    parent = model_of([forearm, elbow], tmp_path / "models" / "arm")
    volume, segmentation_node = segmented_scan(scene, parent)  # both tasks applied to one segmentation
    corrections = [(forearm, box(slice(3, 7), slice(4, 8), slice(5, 9))), (elbow, box(slice(1, 3), slice(1, 5), slice(2, 6)))]
    for task, mask in corrections:
        correct(segmentation_node, volume, f"{task.name}.{task.class_names[0].replace(' ', '_')}", mask)
    folders = mrml.store_corrected_cases(volume, segmentation_node, load_model(parent), ["forearm_muscle_mri", "elbow_mri"],
                                         tmp_path / "cases")
    assert folders == [tmp_path / "cases" / "forearm_muscle_mri" / "patient_7", tmp_path / "cases" / "elbow_mri" / "patient_7"]
    for folder, (task, mask) in zip(folders, corrections):
        stored = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "label.nii.gz")))
        assert np.array_equal(task.map_labels(stored), mask.astype(np.uint8)), task.name
        assert (folder / "image.nii.gz").is_file()


def test_ticked_tasks_of_other_modalities_or_without_segments_are_refused_and_nothing_is_stored(tmp_path, scene, parent):
    from MultiTaskSegLib import mrml

    volume, segmentation_node = segmented_scan(scene, parent)  # breast_mri (MR) and cardiac_cta (CT)
    with pytest.raises(InputError, match=r"breast_mri \(MR\), cardiac_cta \(CT\) are ticked together.*tick only"):
        mrml.store_corrected_cases(volume, segmentation_node, load_model(parent), TASKS, tmp_path / "cases")
    assert not (tmp_path / "cases").exists()
    mr_only = model_of([get_task("breast_mri"), get_task("sarcoma_t1_mri")], tmp_path / "models" / "mr")
    volume, segmentation_node = segmented_scan(scene, mr_only, ["breast_mri"])  # sarcoma_t1_mri was not applied
    with pytest.raises(InputError, match="no segment of task sarcoma_t1_mri.*nothing was stored"):
        mrml.store_corrected_cases(volume, segmentation_node, load_model(mr_only), ["breast_mri", "sarcoma_t1_mri"],
                                   tmp_path / "cases")
    assert not (tmp_path / "cases").exists()


def test_a_class_without_a_label_value_to_store_is_refused_before_anything_is_stored(tmp_path):
    task = user_task("forearm_muscle_mri", [0])  # 0 is the background of every label map
    image = sitk.GetImageFromArray(np.ones((4, 5, 6), np.float32))
    classes = np.zeros((4, 5, 6), np.int32)
    classes[1:3, 1:3, 1:3] = 1
    with pytest.raises(InputError, match="class 'Forearm muscle' of task forearm_muscle_mri has no label value or counts 0"):
        store_case(tmp_path / "cases", task, "patient", image, classes)
    assert not (tmp_path / "cases").exists()


def test_a_ticked_task_whose_files_cannot_be_named_is_refused_before_any_case_is_stored(tmp_path, scene):
    """Storing two ticked tasks checks both before writing: a second task that names its files only by
    a pattern no plain name matches must not leave the first task's case stored alone."""
    import dataclasses

    from MultiTaskSegLib import mrml

    forearm = user_task("forearm_muscle_mri", [5])
    elbow = dataclasses.replace(user_task("elbow_mri", [1, 2], "Elbow joint"), image_files=("[!x]*_t1.nii.gz",))
    parent = model_of([forearm, elbow], tmp_path / "models" / "arm")
    volume, segmentation_node = segmented_scan(scene, parent)
    with pytest.raises(InputError, match="add a plain file name"):
        mrml.store_corrected_cases(volume, segmentation_node, load_model(parent), ["forearm_muscle_mri", "elbow_mri"],
                                   tmp_path / "cases")
    assert not (tmp_path / "cases").exists()


def test_storing_a_case_of_a_volume_without_voxels_says_to_load_it_again(tmp_path, scene):
    """A volume node whose image data is gone (a failed load) is refused with what to do, not a traceback."""
    from MultiTaskSegLib import mrml

    task = user_task("forearm_muscle_mri", [5])
    volume, segmentation_node = segmented_scan(scene, model_of([task], tmp_path / "models" / "mine"))
    volume.SetAndObserveImageData(None)
    with pytest.raises(InputError, match="has no voxels loaded; load the image again"):
        mrml.store_corrected_case(volume, segmentation_node, task, tmp_path / "cases")
    assert not (tmp_path / "cases").exists()


def test_case_names_windows_cannot_create_are_refused_or_renamed(tmp_path, scene):
    """A folder of stored cases is shared between machines: a case named 'CON' or 'a:b' could not be
    copied to Windows. Given directly such a name is refused; a volume named so is stored under another."""
    from MultiTaskSegLib import mrml

    task = user_task("forearm_muscle_mri", [5])
    image = sitk.GetImageFromArray(np.ones((4, 5, 6), np.float32))
    classes = np.zeros((4, 5, 6), np.int32)
    classes[1:3, 1:3, 1:3] = 1
    for name in ("CON", "com1.scan", "a:b", "scan?", "trailing."):
        with pytest.raises(InputError, match="cannot be a folder name on every system"):
            store_case(tmp_path / "cases", task, name, image, classes)
    assert not (tmp_path / "cases").exists()
    volume, segmentation_node = segmented_scan(scene, model_of([task], tmp_path / "models" / "mine"))
    volume.SetName("con")
    [stored] = mrml.store_corrected_cases(volume, segmentation_node, load_model(tmp_path / "models" / "mine"),
                                          [task.name], tmp_path / "cases")
    assert stored.name == "case_con"


def test_a_cases_folder_whose_path_holds_an_equals_sign_is_fine_tuned_on_as_a_root(tmp_path, parent):
    """The module's Fine-tune passes its cases folder as --data ROOT; a folder such as
    'runs/lr=0.1/cases' must not be read as TASK=FOLDER (task 'runs/lr')."""
    cases = write_tiny_dataset(tmp_path / "lr=0.1" / "cases", cases=1)
    assert main(["finetune", "--model", str(parent), "--data", str(cases), "--out", str(tmp_path / "run"),
                 "--steps", "2", "--batch-size", "4", "--device", "cpu"]) == 0
    assert sorted(load_model(tmp_path / "run" / "model").provenance["training_cases"]) == [
        "breast_mri/case_000", "cardiac_cta/case_000"]


def test_a_stored_case_whose_image_pattern_would_find_the_label_file_is_refused(tmp_path):
    """A task whose image pattern also matches its label's name ('*.nii.gz' beside 'aseg.nii.gz') would
    store a case the fine-tune reads with the label map as its image; it is refused before writing."""
    import dataclasses

    from MultiTaskSegLib.datasets import find_cases

    task = dataclasses.replace(get_task("brain_t1_mri"), image_files=("*.nii.gz",), label_files=("aseg.nii.gz",))
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((4, 5, 6)).astype(np.float32) + 1)
    classes = np.zeros((4, 5, 6), np.int32)
    classes[1, 1:3, 1:3] = 1
    with pytest.raises(InputError, match=r"image pattern '\*\.nii\.gz' would find aseg\.nii\.gz .*plain file name first under \[files\] image"):
        store_case(tmp_path / "cases", task, "bert", image, classes)
    assert not (tmp_path / "cases").exists()
    plain = dataclasses.replace(task, image_files=("t1.nii.gz", "*.nii.gz"))  # a plain name looked for first: found again
    [found] = find_cases(plain, store_case(tmp_path / "cases", plain, "bert", image, classes))
    assert (found.image.name, found.label.name) == ("t1.nii.gz", "aseg.nii.gz")
    same = dataclasses.replace(task, image_files=("*_t1.nii.gz",), label_files=("case_t1.nii.gz",))
    with pytest.raises(InputError, match=r"gives two of its files the same name \(case_t1.nii.gz, case_t1.nii.gz\)"):
        store_case(tmp_path / "other", same, "bert", image, classes)
    assert not (tmp_path / "other").exists()
