"""What a model needs to segment real scans: anatomical orientation, augmentation, label synthesis,
the multi-planar U-Net, percentile normalisation, and warnings for results unlike the training data."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MultiTaskSegLib.preprocessing import nonzero_box
from MultiTaskSegLib.architectures.multiplanar import MultiplanarUNet2DArchitecture
from MultiTaskSegLib.augmentation import NO_AUGMENTATION, SliceAugmentation, augment_slices, synthesize_slices
from MultiTaskSegLib.preprocessing import check_working_grid_size
from MultiTaskSegLib.errors import InputError
from MultiTaskSegLib.geometry import working_grid
from MultiTaskSegLib.inferers import InferenceOptions
from MultiTaskSegLib.inference import segment_image
from MultiTaskSegLib.model_files import SegmentationModel
from MultiTaskSegLib.normalization import normalize
from MultiTaskSegLib.phantoms import generate_case
from MultiTaskSegLib.plausibility import CARD_KEY, implausible_volumes
from MultiTaskSegLib.tasks import LabelSpace, get_task
from MultiTaskSegLib.training import TrainingConfig, train
from conftest import make_tiny_model

TINY_MULTIPLANAR = {"channels": [4, 8], "patch_size": [32, 32], "mixed_precision": False}


def brain_phantom() -> sitk.Image:
    image, _ = generate_case("brain_t1_mri", seed=3, size="small")
    return image


# ---------------------------------------------------------------------------------------------
# Orientation


@pytest.mark.parametrize("orientation", ["RAS", "LIA", "PIR", "SPL"])
def test_the_same_scan_stored_in_another_orientation_gets_the_same_labels(orientation):
    image = brain_phantom()
    model = make_tiny_model(["brain_t1_mri"], seed=11, varied=True)
    reference = sitk.GetArrayFromImage(segment_image(model, image, device="cpu").labels)
    stored = sitk.DICOMOrient(image, orientation)
    assert stored.GetDirection() != pytest.approx(image.GetDirection())
    labels = segment_image(model, stored, device="cpu").labels
    back = sitk.GetArrayFromImage(sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor))
    assert len(np.unique(reference)) > 2, "the test model should give varied labels"
    assert np.mean(back == reference) > 0.999


def test_working_grids_are_in_lps_order_whatever_the_file_stores():
    image = sitk.DICOMOrient(brain_phantom(), "LIA")
    grid = working_grid(image, 1.0)
    assert np.allclose(np.abs(np.asarray(grid.GetDirection()).reshape(3, 3)), np.eye(3), atol=0.5)
    assert np.all(np.diag(np.asarray(grid.GetDirection()).reshape(3, 3)) > 0)


# ---------------------------------------------------------------------------------------------
# Augmentation and synthesis


def striped_batch(count: int = 6, size: int = 48):
    labels = np.zeros((count, size, size), np.int64)
    labels[:, 10:30, 8:40] = 1
    labels[:, 18:24, 16:26] = 2
    images = torch.from_numpy(labels[:, None].astype(np.float32) + 1.0)
    return images, torch.from_numpy(labels), torch.ones((count, size, size), dtype=torch.bool)


def test_augmentation_is_reproducible_with_a_seed_and_differs_between_seeds():
    images, labels, valid = striped_batch()
    settings = SliceAugmentation(probability=1.0)
    flippable = np.array([True, False] * 3)
    first = augment_slices(images, labels, valid, np.random.default_rng(4), settings, flippable)
    again = augment_slices(images, labels, valid, np.random.default_rng(4), settings, flippable)
    other = augment_slices(images, labels, valid, np.random.default_rng(5), settings, flippable)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0], images)


def test_spatial_augmentation_moves_labels_with_the_image():
    images, labels, valid = striped_batch()
    settings = SliceAugmentation(probability=1.0, gamma_log_std=0, contrast_low=1, contrast_high=1, bias_field_log_std=0,
                                 noise_high=0, low_resolution_probability=0)
    moved, moved_labels, moved_valid = augment_slices(images, labels, valid, np.random.default_rng(0), settings)
    assert not torch.equal(moved_labels, labels)
    assert not moved_valid.all(), "rotated corners come from outside the crop and must not count"
    agreement = (moved[:, 0].round() - 1 == moved_labels)[moved_valid].float().mean()
    assert agreement > 0.97


def test_no_augmentation_leaves_the_batch_alone():
    images, labels, valid = striped_batch()
    result = augment_slices(images, labels, valid, np.random.default_rng(0), NO_AUGMENTATION)
    assert all(torch.equal(a, b) for a, b in zip(result, (images, labels, valid)))


def test_unknown_augmentation_settings_are_refused():
    with pytest.raises(InputError, match="unknown augmentation setting"):
        SliceAugmentation.from_arguments({"rotation_degree": 10})
    with pytest.raises(InputError, match="probabilities"):
        SliceAugmentation(probability=1.5)


def test_synthesised_images_give_each_label_its_own_contrast_and_keep_air_dark():
    labels = np.zeros((4, 40, 40), np.int16)
    labels[:, 5:35, 5:35] = 502  # scalp
    labels[:, 10:30, 10:30] = 2  # white matter
    labels[:, 15:25, 15:25] = 4  # ventricle
    first = synthesize_slices(labels, np.random.default_rng(1), blur_max_voxels=0.0)
    again = synthesize_slices(labels, np.random.default_rng(1), blur_max_voxels=0.0)
    assert np.array_equal(first, again)
    for image, label in zip(first, labels):
        means = [image[label == value].mean() for value in (502, 2, 4)]
        spread = max(image[label == value].std() for value in (502, 2, 4))
        assert np.all(image[label == 0] == 0)
        assert min(abs(a - b) for a, b in ((means[0], means[1]), (means[1], means[2]))) > 0 or spread > 0
    contrasts = [first[i][labels[i] == 2].mean() / first[i][labels[i] == 4].mean() for i in range(4)]
    assert np.std(contrasts) > 0.05, "contrast between tissues should change from draw to draw"


# ---------------------------------------------------------------------------------------------
# Multi-planar U-Net


def test_multiplanar_prediction_averages_the_three_planes_and_leaves_air_as_background():
    torch.manual_seed(0)
    architecture = MultiplanarUNet2DArchitecture(3, ["brain_t1_mri"], **TINY_MULTIPLANAR)
    volume = np.zeros((20, 24, 28), np.float32)
    volume[4:16, 5:20, 6:22] = np.random.default_rng(0).random((12, 15, 16)) + 0.5
    probabilities = architecture.predict_probabilities(volume, torch.device("cpu"))
    assert probabilities.shape == (3, *volume.shape)
    assert np.allclose(probabilities.sum(axis=0), 1.0, atol=1e-4)
    box = nonzero_box(volume, architecture.config.crop_margin)
    outside = np.ones(volume.shape, bool)
    outside[box] = False
    assert np.all(probabilities[0][outside] == 1.0)
    single = MultiplanarUNet2DArchitecture(3, ["brain_t1_mri"], planes=[0], **TINY_MULTIPLANAR)
    single.network.load_state_dict(architecture.network.state_dict())
    assert not np.allclose(single.predict_probabilities(volume, torch.device("cpu")), probabilities)


@pytest.mark.parametrize("argument", ["locate_stride", "locate_margin"])
def test_a_negative_locating_setting_is_refused_naming_it(argument):
    with pytest.raises(InputError, match=argument):
        MultiplanarUNet2DArchitecture(3, ["brain_t1_mri"], **TINY_MULTIPLANAR, **{argument: -1})


def test_locating_with_nothing_found_predicts_the_whole_non_zero_box():
    """An untrained network may find nothing on the sparse slices: then nothing is cut away."""
    torch.manual_seed(0)
    volume = np.zeros((20, 24, 28), np.float32)
    volume[4:16, 5:20, 6:22] = np.random.default_rng(0).random((12, 15, 16)) + 0.5
    plain = MultiplanarUNet2DArchitecture(3, ["brain_t1_mri"], **TINY_MULTIPLANAR)
    locating = MultiplanarUNet2DArchitecture(3, ["brain_t1_mri"], locate_stride=3, **TINY_MULTIPLANAR)
    locating.network.load_state_dict(plain.network.state_dict())
    with torch.no_grad():  # a network that calls everything background
        plain.network.output.bias.copy_(torch.tensor([50.0, 0.0, 0.0]))
        locating.network.output.bias.copy_(torch.tensor([50.0, 0.0, 0.0]))
    box = nonzero_box(volume, plain.config.crop_margin)
    with torch.inference_mode():
        assert locating._locate(volume[None], box, torch.device("cpu"), InferenceOptions()) == box
    assert np.array_equal(locating.predict_probabilities(volume, torch.device("cpu")), plain.predict_probabilities(volume, torch.device("cpu")))


def test_training_uses_label_maps_without_images_through_synthesis(tmp_path):
    image, label = generate_case("brain_t1_mri", seed=1, size="small")
    real = tmp_path / "data" / "brain_t1_mri" / "real"
    synthetic = tmp_path / "data" / "brain_t1_mri" / "label_map_only"
    for folder in (real, synthetic):
        folder.mkdir(parents=True)
        sitk.WriteImage(label, str(folder / "label.nii.gz"))
    sitk.WriteImage(image, str(real / "image.nii.gz"))
    config = TrainingConfig(tasks=["brain_t1_mri"], architecture="unet2d_multiplanar", arguments=TINY_MULTIPLANAR,
                            batch_size=4, steps=3, validate_every=3, validation_fraction=0.0, device="cpu",
                            data={"brain_t1_mri": str(tmp_path / "data" / "brain_t1_mri")})
    model = train(config, tmp_path / "run", log=lambda message: None)
    assert model.provenance["training_cases"] == ["brain_t1_mri/real", "brain_t1_mri/label_map_only"]
    ranges = model.card[CARD_KEY]["brain_t1_mri"]
    assert set(ranges) == set(get_task("brain_t1_mri").class_names)
    assert all(low <= high for low, high in ranges.values())


# ---------------------------------------------------------------------------------------------
# Normalisation and plausibility


def test_percentile_normalisation_ignores_the_scanner_scale_and_keeps_background_zero():
    task = get_task("brain_t1_mri")
    assert task.normalization == "mr_percentile"
    image = sitk.GetArrayFromImage(brain_phantom())
    first, scaled = normalize(image, task), normalize(image * 7.5, task)
    assert np.allclose(first, scaled, atol=1e-5)
    assert np.all(first[image == 0] == 0) and first.max() <= 2.0


def test_a_result_unlike_the_training_data_is_warned_about():
    model = make_tiny_model(["brain_t1_mri"], seed=11, varied=True)
    result = segment_image(model, brain_phantom(), device="cpu")
    volumes = np.bincount(sitk.GetArrayViewFromImage(result.labels).ravel(), minlength=7) * np.prod(
        result.labels.GetSpacing()) / 1000
    names = get_task("brain_t1_mri").class_names
    fitting = {"brain_t1_mri": {name: [volumes[i + 1], volumes[i + 1]] for i, name in enumerate(names)}}
    assert implausible_volumes(result.labels, model.label_space, ["brain_t1_mri"], fitting) == []
    brain_sized = {"brain_t1_mri": {name: [400.0, 600.0] for name in names}}
    warnings = implausible_volumes(result.labels, model.label_space, ["brain_t1_mri"], brain_sized)
    assert len(warnings) == 1 and "White matter" in warnings[0] and "400.0-600.0 mL" in warnings[0]
    model.card[CARD_KEY] = brain_sized
    assert any("does not look like the training data" in w for w in segment_image(model, brain_phantom(), device="cpu").warnings)


def test_a_grid_too_large_for_memory_is_refused_before_allocation():
    image = sitk.Image([45, 64, 48], sitk.sitkUInt8)
    image.SetSpacing((20.0, 20.0, 20.0))
    with pytest.raises(InputError, match="check the image spacing"):
        check_working_grid_size(image, 1.0)


def test_label_space_of_the_multiplanar_model_round_trips_through_a_model_file(tmp_path):
    from MultiTaskSegLib.model_files import load_model, save_model

    model = SegmentationModel.create("tiny", "unet2d_multiplanar", LabelSpace.from_names(["brain_t1_mri"]),
                                     **TINY_MULTIPLANAR, augmentation={"rotation_degrees": 5.0})
    loaded = load_model(save_model(model, tmp_path / "tiny"))
    assert loaded.architecture.config.slice_augmentation.rotation_degrees == 5.0
    assert loaded.architecture.config.planes == (0, 1, 2)
