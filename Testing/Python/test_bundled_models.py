"""The models shipped in Resources/Models load, list themselves and segment held-out phantoms."""

import numpy as np
import pytest
import SimpleITK as sitk

from MultiTaskSegLib.architectures import architecture_names
from MultiTaskSegLib.evaluation import dice_per_class
from MultiTaskSegLib.inference import segment_image
from MultiTaskSegLib.model_files import bundled_models, load_model, read_model_card
from MultiTaskSegLib.phantoms import generate_case
from MultiTaskSegLib.tasks import PAPER_TASKS, get_task

EXPECTED = {"triplanar-phantoms": "triplanar", "cmunet-phantoms": "cmunet"}
#: Held-out: the bundled models were trained on phantoms of seed 0; the demo uses seed 1000.
HELD_OUT_SEED = 1000


def test_the_triplanar_and_a_u_net_family_model_are_bundled():
    models = bundled_models()
    for name, architecture in EXPECTED.items():
        assert name in models, f"{name} missing from Resources/Models"
        card = read_model_card(models[name])
        assert card["architecture"]["name"] == architecture in architecture_names()
        assert [task["name"] for task in card["tasks"]] == list(PAPER_TASKS)
        assert card["card"]["validation_dice"], "the model card carries its validation figures"


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("task", PAPER_TASKS)
def test_bundled_model_segments_a_held_out_phantom(name, task):
    model = load_model(bundled_models()[name])
    image, label = generate_case(task, seed=HELD_OUT_SEED, size="small")
    result = segment_image(model, image, tasks=[task], device="cpu")
    reference = model.label_space.to_model_labels(task, get_task(task).map_labels(sitk.GetArrayFromImage(label)))
    indices = model.label_space.indices_for_task(task)
    scores = dice_per_class(sitk.GetArrayViewFromImage(result.labels), reference, indices)
    # Loose floors: this guards against a broken model file or pipeline, not a quality claim.
    assert np.mean(list(scores.values())) > 0.3, scores
    assert set(np.unique(sitk.GetArrayViewFromImage(result.labels))) <= {0, *indices}


def test_the_presence_head_tells_which_requested_structures_are_absent():
    model = load_model(bundled_models()["cmunet-phantoms"])
    image, _ = generate_case("breast_mri", seed=HELD_OUT_SEED, size="small")
    warnings = segment_image(model, image, tasks=None, device="cpu").warnings
    absent = {warning.split(" (")[0] for warning in warnings if "seems absent" in warning}
    assert absent == set(get_task("brain_t1_mri").class_names) | {"Coronary artery"}


BRAIN_MODEL = "brain-t1"


def test_models_that_segment_whole_slices_learnt_from_large_slices():
    """Whole slices seen by a network trained on small crops cost the brain model 0.017 mean Dice
    (its instance norm saw less context in training); a fine-tune on 192² crops recovered it. A
    bundled model that runs whole slices must have learnt from crops of at least 160² (1 mm brain
    or 1.5 mm sarcoma crop: most of a slice)."""
    whole = {}
    for name, folder in bundled_models().items():
        arguments = read_model_card(folder)["architecture"]["arguments"]
        if arguments.get("whole_slice_inference"):
            whole[name] = min(arguments["patch_size"])
    assert BRAIN_MODEL in whole and "sarcoma-ct" in whole, sorted(whole)
    assert all(side >= 160 for side in whole.values()), whole


def test_the_default_brain_model_card_states_its_data_intended_input_and_cross_validated_results():
    card = read_model_card(bundled_models()[BRAIN_MODEL])
    assert [task["name"] for task in card["tasks"]] == ["brain_t1_mri"]
    details = card["card"]
    assert "not for clinical use" in details["description"].lower()
    assert "whole head" in details["intended_input"]["brain_t1_mri"] and "3 mm" in details["intended_input"]["brain_t1_mri"]
    assert set(details["cross_validated_dice"]) >= {"skull-stripped", "whole head", "3 mm"}
    assert details["class_volumes_ml"]["brain_t1_mri"]["White matter"][0] > 100


def test_the_brain_model_warns_when_the_scan_is_not_a_brain():
    model = load_model(bundled_models()[BRAIN_MODEL])
    image, _ = generate_case("breast_mri", seed=HELD_OUT_SEED, size="small")
    warnings = segment_image(model, image, tasks=["brain_t1_mri"], device="cpu").warnings
    assert any("does not look like the training data" in warning for warning in warnings), warnings


@pytest.mark.slow
def test_the_brain_model_segments_a_real_subject_it_never_saw(shared_data):
    """bert (FreeSurfer's sample subject) was held out of the bundled model's training (fold 1)."""
    from MultiTaskSegLib.imageio import read_image

    model = load_model(bundled_models()[BRAIN_MODEL])
    assert "brain_t1_mri/bert" not in model.provenance["training_cases"]
    folder = shared_data / "brain_aseg" / "bert"
    result = segment_image(model, read_image(folder / "t1.nii.gz"), tasks=["brain_t1_mri"], device="cpu")
    reference = get_task("brain_t1_mri").map_labels(sitk.GetArrayFromImage(read_image(folder / "aseg.nii.gz", check_values=False)))
    scores = dice_per_class(sitk.GetArrayViewFromImage(result.labels), reference, range(1, 7))
    assert np.mean(list(scores.values())) > 0.8, scores
    assert not any("does not look like the training data" in warning for warning in result.warnings)


def test_the_brain_model_segments_only_around_the_located_brain_of_a_whole_head_scan(shared_data, monkeypatch):
    """brain-t1 first finds the brain on every 4th axial slice, then runs its three planes there only:
    as accurate as three planes over the whole head, for less work. (The labels are not identical:
    windows start elsewhere, and instance norm sees other crops.)"""
    from MultiTaskSegLib.architectures.multiplanar import MultiplanarUNet2DArchitecture
    from MultiTaskSegLib.imageio import read_image

    model = load_model(bundled_models()[BRAIN_MODEL])
    assert model.architecture.config.locate_stride == 4
    crop = (slice(16, 240),) * 3
    head = read_image(shared_data / "brain_fs" / "fstd-sub-01" / "t1_head.nii.gz")[crop]
    aseg = read_image(shared_data / "brain_fs" / "fstd-sub-01" / "aseg.nii.gz", check_values=False)[crop]
    truth = get_task("brain_t1_mri").map_labels(sitk.GetArrayFromImage(aseg))
    passes = []
    add_probabilities = MultiplanarUNet2DArchitecture._add_probabilities

    def recorded(self, out, image, *args, **kwargs):
        passes.append(image.shape[1:])
        return add_probabilities(self, out, image, *args, **kwargs)

    monkeypatch.setattr(MultiplanarUNet2DArchitecture, "_add_probabilities", recorded)
    located = sitk.GetArrayFromImage(segment_image(model, head, ["brain_t1_mri"], device="cpu").labels)
    model.architecture.config.locate_stride = 0
    everywhere = sitk.GetArrayFromImage(segment_image(model, head, ["brain_t1_mri"], device="cpu").labels)
    sparse, *planes, whole = passes[:5]
    assert len(passes) == 7 and sparse[0] == -(-whole[0] // 4), "the first pass reads every 4th axial slice"
    assert all(plane == planes[0] for plane in planes) and np.prod(planes[0]) < 0.8 * np.prod(whole)
    scores = {name: dice_per_class(labels, truth, range(1, 7)) for name, labels in (("located", located), ("everywhere", everywhere))}
    assert np.mean(list(scores["located"].values())) >= np.mean(list(scores["everywhere"].values())) - 0.005, scores
    assert all(scores["located"][label] >= scores["everywhere"][label] - 0.01 for label in range(1, 7)), scores
