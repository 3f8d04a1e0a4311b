"""The task registry, label spaces, declarative task files and the FreeSurfer label conventions."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from MultiTaskSegLib import tasks
from MultiTaskSegLib.errors import InputError
from MultiTaskSegLib.tasks import PAPER_TASKS, LabelSpace, get_task, load_task_file

BRAIN_CLASSES = ("White matter", "Cortical grey matter", "Basal ganglia and thalami", "Ventricular CSF",
                 "Cerebellum", "Brain stem")


def test_paper_and_real_data_tasks_are_registered():
    names = {task.name for task in tasks.list_tasks()}
    assert set(PAPER_TASKS) <= names
    assert {"brats_glioma_t1c", "sarcoma_t1_mri", "sarcoma_ct"} <= names
    assert get_task("brain_t1_mri").class_names == BRAIN_CLASSES
    assert get_task("cardiac_cta").modality == "CT" and get_task("breast_mri").modality == "MR"


def test_every_class_has_a_colour_and_a_coded_terminology():
    schemes = []
    for task in tasks.list_tasks():
        for spec in task.classes:
            assert len(spec.color) == 3 and all(0 <= c <= 1 for c in spec.color)
            assert spec.terminology is not None and spec.terminology.type.value.isdigit()
            schemes.append(spec.terminology.type.scheme)
    # SNOMED CT wherever it has a code; Slicer's anatomy list uses FMA for subcortical grey matter.
    assert set(schemes) <= {"SCT", "FMA"} and schemes.count("FMA") <= 1


def test_paper_label_space_has_a_shared_background_and_nine_outputs():
    space = LabelSpace.from_names(PAPER_TASKS)
    assert len(space) == 9  # the paper's largest output layer
    assert space.entries[0].task is None
    assert space.indices_for_task("brain_t1_mri") == (1, 2, 3, 4, 5, 6)
    assert space.indices_for_task("breast_mri") == (7,)
    assert space.indices_for_task("cardiac_cta") == (8,)
    shifted = space.to_model_labels("cardiac_cta", np.array([0, 1, 0], np.uint8))
    assert shifted.tolist() == [0, 8, 0]


def test_label_space_refuses_duplicate_and_unknown_tasks():
    with pytest.raises(InputError, match="listed twice"):
        LabelSpace.from_names(["breast_mri", "breast_mri"])
    with pytest.raises(InputError, match="unknown task 'lungs'"):
        LabelSpace.from_names(["lungs"])


def test_label_space_survives_a_json_round_trip():
    space = LabelSpace.from_names(["brain_t1_mri", "sarcoma_ct"])
    again = LabelSpace.from_json(space.to_json())
    assert again == space


def _aseg_to_convention(aseg: np.ndarray, convention: str, rng: np.random.Generator) -> np.ndarray:
    """Relabel the cortex the way aparc+aseg / aparc.a2009s+aseg do (one parcel value per voxel)."""
    if convention == "aseg":
        return aseg
    left, right = ((1000, 1035), (2000, 2035)) if convention == "aparc+aseg" else ((11100, 11175), (12100, 12175))
    relabelled = aseg.astype(np.int32).copy()
    for hemisphere, (low, high) in ((3, left), (42, right)):
        where = aseg == hemisphere
        relabelled[where] = rng.integers(low, high + 1, size=int(where.sum()))
    return relabelled


@pytest.mark.parametrize("convention", ["aseg", "aparc+aseg", "aparc.a2009s+aseg"])
@pytest.mark.parametrize("subject", ["bert", "vxm"])
def test_freesurfer_conventions_map_to_the_same_six_tissues(shared_data, subject, convention):
    aseg = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "brain_aseg" / subject / "aseg.nii.gz")))
    task = get_task("brain_t1_mri")
    reference = task.map_labels(aseg)
    mapped = task.map_labels(_aseg_to_convention(aseg, convention, np.random.default_rng(0)))
    assert np.array_equal(mapped, reference)
    assert set(np.unique(mapped)) == set(range(7))  # all six tissues and background
    # Cortex (3/42) becomes cortical grey matter, cerebral white matter (2/41) white matter.
    assert (mapped[np.isin(aseg, (3, 42))] == 2).all()
    assert (mapped[np.isin(aseg, (2, 41))] == 1).all()
    # Extracerebral CSF (24) is background; every brain-stem voxel (16) is brain stem.
    assert (mapped[aseg == 24] == 0).all() and (mapped[aseg == 16] == 6).all()


def test_freesurfer_labelled_brain_voxels_are_almost_all_mapped(shared_data):
    aseg = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "brain_aseg" / "bert" / "aseg.nii.gz")))
    mapped = get_task("brain_t1_mri").map_labels(aseg)
    unmapped = np.unique(aseg[(aseg > 0) & (mapped == 0)])
    # Only non-tissue labels stay background: extracerebral CSF, vessels, optic structures.
    assert set(unmapped.tolist()) <= {24, 30, 62, 80, 85}


def test_non_integer_label_image_is_refused():
    with pytest.raises(InputError, match="non-integer"):
        get_task("breast_mri").map_labels(np.array([0.0, 0.5, 1.0]))


def test_user_task_file_adds_a_task_without_code(tmp_path, monkeypatch):
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    (folder / "liver.toml").write_text(
        """
name = "liver_ct"
modality = "CT"
anatomy = "Abdomen"
working_spacing_mm = 1.5
[normalization]
scheme = "ct_window"
low = -100.0
high = 250.0
[files]
image = ["volume.nrrd"]
label = ["segmentation.nrrd"]
[[classes]]
name = "Liver"
color = [0.8, 0.4, 0.3]
labels = [1, "5-7"]
category = ["SCT", "123037004", "Anatomical Structure"]
type = ["SCT", "10200004", "Liver"]
""",
        encoding="utf-8",
    )
    monkeypatch.setenv(tasks.TASK_PATH_VARIABLE, str(folder))
    tasks.reload_registry()
    try:
        liver = get_task("liver_ct")
        assert liver.label_values[0] == {1, 5, 6, 7}
        assert liver.map_labels(np.array([0, 1, 2, 6])).tolist() == [0, 1, 0, 1]
        assert liver.image_files == ("volume.nrrd",) and liver.working_spacing_mm == 1.5
        assert LabelSpace.from_names(["brain_t1_mri", "liver_ct"]).indices_for_task("liver_ct") == (7,)
    finally:
        monkeypatch.delenv(tasks.TASK_PATH_VARIABLE)
        tasks.reload_registry()


#: A one-tumour task: the one kind that may have an unsure region.
_ONE_TUMOUR = 'name = "x"\nmodality = "MR"\nlargest_component = true\n[[classes]]\nname="a"\ncolor=[1,0,0]\nlabels=[1]\n'


def test_the_unsure_region_rule_survives_a_model_file_round_trip(tmp_path):
    path = tmp_path / "task.toml"
    path.write_text(_ONE_TUMOUR + "[unsure_region]\nconfident = 0.9\nthreshold = 0.1\n", encoding="utf-8")
    task = load_task_file(path)
    assert task.unsure_region == tasks.UnsureRegion(confident=0.9, threshold=0.1)
    assert tasks.task_from_dict(json.loads(json.dumps(tasks.task_to_dict(task))), "model.json") == task
    assert "unsure_region" not in tasks.task_to_dict(get_task("brain_t1_mri"))


@pytest.mark.parametrize(
    "text, message",
    [
        ('name = "x"\nmodality = "PET"\n[[classes]]\nname="a"\ncolor=[1,0,0]\nlabels=[1]', "modality must be one of"),
        ('name = "x"\nmodality = "CT"\n[[classes]]\nname="a"\ncolor=[2,0,0]\nlabels=[1]', "color must be three numbers"),
        ('name = "x"\nmodality = "CT"\n[[classes]]\nname="a"\ncolor=[1,0,0]\nlabels=["9-3"]', "ends before it starts"),
        ('name = "x"\nmodality = "CT"\n[[classes]]\nname="a"\ncolor=[1,0,0]\nlabels=[1]\n'
         '[[classes]]\nname="b"\ncolor=[1,0,0]\nlabels=[1]', "given to both"),
        ('name = "x"\n[[classes]]', "missing required key 'modality'"),
        ("name = ", "not valid TOML"),
        (_ONE_TUMOUR + "[unsure_region]\nconfident = 0.9\nthreshold = 0.9", "threshold must be below confident"),
        (_ONE_TUMOUR + "[unsure_region]\nconfident = 1.5\nthreshold = 0.1", "between 0 and 1"),
        (_ONE_TUMOUR + "[unsure_region]\nconfident = 0.9", "missing required key 'threshold'"),
        (_ONE_TUMOUR.replace("largest_component = true", "") + "[unsure_region]\nconfident = 0.9\nthreshold = 0.1",
         "needs largest_component = true"),
        (_ONE_TUMOUR + '[[classes]]\nname="b"\ncolor=[1,0,0]\nlabels=[2]\n[unsure_region]\nconfident = 0.9\nthreshold = 0.1',
         "one class"),
    ],
)
def test_bad_task_files_get_clear_errors(tmp_path, text, message):
    path = tmp_path / "task.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        load_task_file(path)


def test_refreshed_tasks_keep_the_models_working_spacing_and_refuse_a_changed_class():
    import sys
    from dataclasses import replace

    from conftest import PROJECT_ROOT

    sys.path.insert(0, str(PROJECT_ROOT / "scripts"))
    from bundle_model import refreshed

    current = get_task("sarcoma_ct")
    trained = LabelSpace((replace(current, working_spacing_mm=1.0, largest_component=not current.largest_component),))
    refreshed_task = refreshed(trained).task("sarcoma_ct")
    assert refreshed_task.working_spacing_mm == 1.0  # what the network learnt at
    assert refreshed_task.largest_component == current.largest_component  # post-processing: the task file's
    other_classes = LabelSpace((replace(current, label_values=(frozenset({2}),)),))
    with pytest.raises(SystemExit, match="label_values"):
        refreshed(other_classes)
