"""Phantom data for the paper's three tasks: deterministic, every class present, modality-true intensities,
varied geometry, the on-disk layout, and the overlay PNG used to look at them."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import SimpleITK as sitk

from MultiTaskSegLib.errors import InputError
from MultiTaskSegLib.overlay import class_colors, save_overlay_png
from MultiTaskSegLib.phantoms import PHANTOM_TASKS, generate_case, write_phantoms
from MultiTaskSegLib.tasks import PAPER_TASKS, get_task

SEEDS = (0, 1, 2, 3)


@lru_cache(maxsize=None)
def small_case(task: str, seed: int, case: int = 0) -> tuple[sitk.Image, sitk.Image]:
    return generate_case(task, seed, "small", case=case)


def arrays(case: tuple[sitk.Image, sitk.Image]) -> tuple[np.ndarray, np.ndarray]:
    image, labels = case
    return sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(labels)


def geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def test_phantoms_cover_the_paper_tasks():
    assert PHANTOM_TASKS == PAPER_TASKS


@pytest.mark.parametrize("task", PHANTOM_TASKS)
def test_same_seed_gives_identical_case(task):
    first = generate_case(task, 7, "small")
    again = generate_case(task, 7, "small")
    for a, b in zip(first, again):
        assert geometry(a) == geometry(b)
        assert np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))


@pytest.mark.parametrize("task", PHANTOM_TASKS)
def test_different_seed_or_case_gives_different_case(task):
    image, _ = arrays(small_case(task, 0))
    for other in (small_case(task, 1), small_case(task, 0, case=1)):
        other_image, _ = arrays(other)
        assert other_image.shape != image.shape or not np.array_equal(other_image, image)


@pytest.mark.parametrize("task", PHANTOM_TASKS)
def test_image_and_labels_share_one_small_grid(task):
    for seed in SEEDS:
        image, labels = small_case(task, seed)
        assert geometry(image) == geometry(labels)
        assert image.GetPixelID() == sitk.sitkFloat32 and labels.GetPixelID() == sitk.sitkUInt16
        assert max(image.GetSize()) <= 64


@pytest.mark.parametrize("task", PHANTOM_TASKS)
def test_labels_map_to_every_class_of_the_task(task):
    registry_task = get_task(task)
    for seed in SEEDS:
        _, labels = arrays(small_case(task, seed))
        classes = registry_task.map_labels(labels)
        # Every source value the phantom writes is one the task knows.
        assert np.array_equal(classes > 0, labels > 0)
        counts = np.bincount(classes.ravel(), minlength=len(registry_task.classes) + 1)
        assert np.all(counts[1:] >= 100), f"{task} seed {seed}: class voxel counts {counts[1:]}"


def test_brain_tissue_volumes_are_plausible():
    for seed in SEEDS:
        _, labels = arrays(small_case("brain_t1_mri", seed))
        counts = np.bincount(get_task("brain_t1_mri").map_labels(labels).ravel(), minlength=7)[1:]
        fractions = counts / counts.sum()
        white_matter, cortex, deep_grey, ventricles, cerebellum, brain_stem = fractions
        assert 0.2 < white_matter < 0.6 and 0.2 < cortex < 0.7
        assert 0.01 < deep_grey < 0.1 and 0.005 < ventricles < 0.1
        assert 0.05 < cerebellum < 0.25 and 0.005 < brain_stem < 0.1
        # Both hemispheres are labelled with FreeSurfer's left and right values.
        assert {2, 41, 3, 42, 4, 43, 7, 46, 8, 47}.issubset(set(np.unique(labels)))


def test_breast_and_cardiac_volumes_are_plausible():
    for seed in SEEDS:
        _, breast_labels = arrays(small_case("breast_mri", seed))
        assert 0.005 < (breast_labels == 1).mean() < 0.15
        _, cardiac_labels = arrays(small_case("cardiac_cta", seed))
        assert 0.0005 < (cardiac_labels == 1).mean() < 0.02


@pytest.mark.parametrize("task", ("brain_t1_mri", "breast_mri"))
def test_mr_phantoms_are_non_negative_with_tissue_contrast(task):
    for seed in SEEDS:
        image, labels = arrays(small_case(task, seed))
        assert image.min() >= 0.0 and image.max() > 0.0
    image, labels = arrays(small_case("brain_t1_mri", 0))
    white_matter = np.median(image[np.isin(labels, (2, 41))])
    cortex = np.median(image[np.isin(labels, (3, 42))])
    ventricles = np.median(image[np.isin(labels, (4, 43))])
    assert white_matter > cortex > ventricles > 0
    image, labels = arrays(small_case("breast_mri", 0))
    assert np.median(image[labels == 1]) < 0.6 * np.percentile(image, 99)  # the muscle is darker than fat


def test_ct_phantom_has_air_and_contrast_filled_coronaries():
    for seed in SEEDS:
        image, labels = arrays(small_case("cardiac_cta", seed))
        assert np.count_nonzero(np.abs(image + 1000.0) < 60.0) > 50  # air at about -1000 HU
        assert image.min() >= -1024.0
        coronary = image[labels == 1]
        assert np.percentile(coronary, 75) > 200.0 and np.median(coronary) > 150.0
        assert np.median(image[image > -500]) < 200.0  # most soft tissue is not contrast


def test_geometry_varies_between_cases():
    for task in PHANTOM_TASKS:
        images = [small_case(task, seed)[0] for seed in SEEDS] + [small_case(task, 0, case=c)[0] for c in (1, 2, 3)]
        spacings = np.array([image.GetSpacing() for image in images])
        directions = np.array([image.GetDirection() for image in images])
        assert any(s.max() / s.min() > 1.1 for s in spacings), f"{task}: never anisotropic"
        assert any(not np.allclose(d, np.eye(3).ravel()) for d in directions), f"{task}: never oblique"
        assert len({image.GetSize() for image in images}) > 1, f"{task}: always the same size"
        working = get_task(task).working_spacing_mm
        assert np.all(spacings.min(axis=1) > 0.8 * working) and np.all(spacings.max(axis=1) < 2.0 * working)


@pytest.mark.slow
def test_full_brain_approaches_a_real_scan():
    image, labels = generate_case("brain_t1_mri", 0, "full")
    assert min(image.GetSize()) >= 140 and max(image.GetSize()) <= 260
    classes = get_task("brain_t1_mri").map_labels(sitk.GetArrayViewFromImage(labels))
    volumes_ml = np.bincount(classes.ravel(), minlength=7)[1:] * np.prod(image.GetSpacing()) / 1000.0
    assert 800.0 < volumes_ml.sum() < 1800.0  # an adult brain
    assert np.all(volumes_ml > 1.0)


def test_write_phantoms_lays_out_task_and_case_folders(tmp_path):
    folders = write_phantoms(tmp_path / "few", cases=1, seed=3, tasks=("breast_mri", "cardiac_cta"))
    assert folders == [tmp_path / "few" / "breast_mri" / "case_000", tmp_path / "few" / "cardiac_cta" / "case_000"]
    for folder in folders:
        image = sitk.ReadImage(str(folder / "image.nii.gz"))
        labels = sitk.ReadImage(str(folder / "label.nii.gz"))
        assert image.GetSize() == labels.GetSize()
        assert np.allclose(image.GetDirection(), labels.GetDirection(), atol=1e-5)
        assert np.allclose(image.GetSpacing(), labels.GetSpacing())
        assert labels.GetPixelID() == sitk.sitkUInt16


def test_a_case_does_not_depend_on_how_many_cases_are_written(tmp_path):
    write_phantoms(tmp_path / "two", cases=2, seed=5, tasks=PHANTOM_TASKS)
    write_phantoms(tmp_path / "three", cases=3, seed=5, tasks=("cardiac_cta",))
    assert (tmp_path / "three" / "cardiac_cta" / "case_002" / "label.nii.gz").is_file()
    assert not (tmp_path / "two" / "cardiac_cta" / "case_002").exists()
    for name in ("image.nii.gz", "label.nii.gz"):
        two = sitk.ReadImage(str(tmp_path / "two" / "cardiac_cta" / "case_001" / name))
        three = sitk.ReadImage(str(tmp_path / "three" / "cardiac_cta" / "case_001" / name))
        assert np.array_equal(sitk.GetArrayViewFromImage(two), sitk.GetArrayViewFromImage(three))
    expected, _ = generate_case("brain_t1_mri", 5, "small", case=1)
    written = sitk.ReadImage(str(tmp_path / "two" / "brain_t1_mri" / "case_001" / "image.nii.gz"))
    assert np.array_equal(sitk.GetArrayViewFromImage(written), sitk.GetArrayViewFromImage(expected))


def test_existing_cases_are_refused_before_anything_is_written_unless_overwrite(tmp_path):
    write_phantoms(tmp_path, cases=1, seed=3, tasks=("cardiac_cta",))
    corrected = tmp_path / "cardiac_cta" / "case_000" / "label.nii.gz"
    corrected.write_bytes(b"someone's corrected labels")
    with pytest.raises(InputError, match="already holds 2 of the case files .*--overwrite"):
        write_phantoms(tmp_path, cases=2, seed=3, tasks=("breast_mri", "cardiac_cta"))
    assert corrected.read_bytes() == b"someone's corrected labels"
    assert not (tmp_path / "breast_mri").exists()  # nothing written before the refusal
    write_phantoms(tmp_path, cases=1, seed=3, tasks=("cardiac_cta",), overwrite=True)
    assert sitk.ReadImage(str(corrected)).GetPixelID() == sitk.sitkUInt16


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: generate_case("liver_ct", 0), "no phantom for task 'liver_ct'"),
        (lambda: generate_case("brain_t1_mri", 0, size="huge"), "size must be one of small, full"),
        (lambda: generate_case("brain_t1_mri", -1), "seed must be an integer"),
        (lambda: write_phantoms("unused", cases=0), "cases must be an integer of at least 1"),
        (lambda: write_phantoms("unused", tasks=("breast_mri", "lung")), "no phantom for task 'lung'"),
    ],
)
def test_bad_requests_say_what_is_wrong(call, message):
    with pytest.raises(InputError, match=message):
        call()


def test_overlay_png_shows_labels_alone_or_beside_a_reference(tmp_path):
    task = get_task("cardiac_cta")
    image, labels = small_case("cardiac_cta", 1)
    single = save_overlay_png(image, labels, class_colors(task), tmp_path / "single.png", title="cardiac")
    prediction = sitk.BinaryDilate(labels, [1, 1, 1])
    paired = save_overlay_png(
        image, prediction, class_colors(task), tmp_path / "sub" / "paired.png", reference=labels, window=(-300, 900)
    )
    for path in (single, paired):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    single_height, single_width = imread(single).shape[:2]
    paired_height, paired_width = imread(paired).shape[:2]
    assert paired_height > 1.5 * single_height  # reference above, prediction below


def test_overlay_rejects_a_multi_channel_image(tmp_path):
    image, labels = small_case("breast_mri", 0)
    two_channels = sitk.Compose(image, image)
    with pytest.raises(InputError, match="choose one channel"):
        save_overlay_png(two_channels, labels, {}, tmp_path / "x.png")
