"""segment_image: background outside the foreground, warnings from the model card, device choice."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import make_tiny_model

from MultiTaskSegLib.errors import InputError
from MultiTaskSegLib.inference import choose_device, label_decision, segment_image
from MultiTaskSegLib.preprocessing import undecided_box


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(["breast_mri", "cardiac_cta"], seed=11, varied=True)


def mr_scan(spacing=(1.3, 1.3, 1.3)) -> sitk.Image:
    rng = np.random.default_rng(0)
    array = (rng.random((12, 14, 16)) * 300 + 10).astype(np.float32)
    array[:, :, :5] = 0  # air / outside the body: no sample of any training set
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    return image


def test_voxels_outside_the_foreground_are_background(model):
    result = segment_image(model, mr_scan(), tasks=["breast_mri"], device="cpu")
    labels = sitk.GetArrayViewFromImage(result.labels)
    assert (labels[:, :, :4] == 0).all()  # a voxel from the boundary on, resampling blends


def test_a_ct_scan_for_an_mr_task_and_a_far_spacing_give_warnings(model):
    ct = sitk.GetImageFromArray(np.where(np.arange(12 * 14 * 16).reshape(12, 14, 16) % 3, 40.0, -1000.0).astype(np.float32))
    ct.SetSpacing((1.3, 1.3, 1.3))
    result = segment_image(model, ct, tasks=["breast_mri"], device="cpu")
    assert any("looks CT" in warning for warning in result.warnings)
    coarse = segment_image(model, mr_scan(spacing=(1.3, 1.3, 6.0)), tasks=["breast_mri"], device="cpu")
    assert any("far from the model's working spacing" in warning for warning in coarse.warnings)
    assert not segment_image(model, mr_scan(), tasks=["breast_mri"], device="cpu").warnings


def test_cpu_results_are_deterministic(model):
    first = segment_image(model, mr_scan(), device="cpu", with_probabilities=True)
    second = segment_image(model, mr_scan(), device="cpu", with_probabilities=True)
    assert np.array_equal(sitk.GetArrayViewFromImage(first.probabilities), sitk.GetArrayViewFromImage(second.probabilities))


def mirrored(image: sitk.Image) -> sitk.Image:
    flipped = sitk.GetImageFromArray(sitk.GetArrayFromImage(image)[:, :, ::-1].copy())
    flipped.CopyInformation(image)
    return flipped


def test_test_time_mirroring_segments_a_mirrored_scan_as_the_mirror_of_the_scan(model):
    scan = mr_scan()  # air on one side only: the scan is not its own mirror

    def probabilities(image, **options):
        result = segment_image(model, image, device="cpu", with_probabilities=True, **options)  # all classes
        return sitk.GetArrayFromImage(result.probabilities), sitk.GetArrayFromImage(result.labels)

    plain, plain_labels = probabilities(scan)
    plain_of_mirror, _ = probabilities(mirrored(scan))
    assert not np.allclose(plain_of_mirror, plain[:, :, ::-1], atol=1e-3)  # the untrained network is not symmetric
    both, labels = probabilities(scan, mirror=True)
    both_of_mirror, labels_of_mirror = probabilities(mirrored(scan), mirror=True)
    np.testing.assert_allclose(both_of_mirror, both[:, :, ::-1], atol=1e-6)
    assert np.array_equal(labels_of_mirror, labels[:, :, ::-1])
    np.testing.assert_allclose(both, (plain + plain_of_mirror[:, :, ::-1]) / 2, atol=1e-6)  # the mean of the two

    carded = make_tiny_model(["breast_mri", "cardiac_cta"], seed=11, varied=True)
    carded.card["test_time_mirroring"] = True  # the model's own setting applies unless the caller says otherwise
    by_card = segment_image(carded, scan, device="cpu", with_probabilities=True)
    assert np.array_equal(sitk.GetArrayFromImage(by_card.probabilities), both)
    overruled = segment_image(carded, scan, device="cpu", with_probabilities=True, mirror=False)
    assert np.array_equal(sitk.GetArrayFromImage(overruled.probabilities), plain)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_asking_for_cuda_without_a_gpu_says_so():
    with pytest.raises(InputError, match="no CUDA GPU; use --device cpu or auto"):
        choose_device("cuda")
    assert choose_device("auto").type == "cpu"


def test_a_binary_task_is_thresholded_at_the_models_operating_point(model):
    # labels kept: background (0), pectoral muscle (1), coronary artery (2); four voxels
    probabilities = np.array([[0.4, 0.05, 0.3, 0.2],
                              [0.1, 0.05, 0.6, 0.0],
                              [0.5, 0.90, 0.1, 0.8]])
    kept = np.array([0, 1, 2])
    model.card = {}
    assert label_decision(probabilities, kept, model).tolist() == [2, 2, 1, 2]
    model.card = {"operating_points": {"cardiac_cta": 0.85}}
    try:
        assert label_decision(probabilities, kept, model).tolist() == [0, 2, 1, 0]
    finally:
        model.card = {}


def test_an_operating_point_below_one_half_widens_the_class_as_validation_chose_it(model):
    # the trainer picks the point on p_class / (p_class + p_background); the decision must use the same
    probabilities = np.array([[0.62, 0.70, 0.20, 0.30],   # background
                              [0.00, 0.00, 0.50, 0.00],   # pectoral muscle (another task)
                              [0.38, 0.30, 0.30, 0.70]])  # coronary artery, operating point 0.35
    kept = np.array([0, 1, 2])
    model.card = {"operating_points": {"cardiac_cta": 0.35}}
    try:
        # 0.38 / 1.00 passes (arg-max alone said background); 0.30 / 1.00 does not; in the third voxel
        # the artery passes against background (0.3 / 0.5) but the muscle is likelier
        assert label_decision(probabilities, kept, model).tolist() == [2, 0, 1, 2]
    finally:
        model.card = {}


def test_only_voxels_that_are_surely_background_skip_the_decision():
    probabilities = np.zeros((3, 10, 12, 14), np.float32)
    probabilities[0] = 1.0
    assert undecided_box(probabilities) is None  # nothing but background: nothing to decide
    probabilities[:, 2:5, 3:9, 7] = [[[0.2]], [[0.5]], [[0.3]]]
    probabilities[0, 8, 11, 0] = 0.9999  # one voxel barely unsure widens the box to it
    probabilities[1, 8, 11, 0] = 0.0001
    box = undecided_box(probabilities)
    assert box == (slice(2, 9), slice(3, 12), slice(0, 8))
    outside = np.ones(probabilities.shape[1:], bool)
    outside[box] = False
    assert (np.argmax(probabilities, axis=0)[outside] == 0).all()


def test_a_spacing_that_shrinks_the_scan_below_two_working_voxels_is_refused(model):
    # a header in metres: 16 x 14 x 12 voxels of 0.01 "mm" become one working voxel, segmented as empty
    with pytest.raises(InputError, match="1 x 1 x 1 voxels.*check the image spacing in its header"):
        segment_image(model, mr_scan(spacing=(0.01, 0.01, 0.01)), tasks=["breast_mri"], device="cpu")


def test_a_scan_whose_segmentation_would_not_fit_in_memory_is_refused_before_work(model, tmp_path, monkeypatch):
    # read_image lets a scan through when one float32 copy fits in a quarter of the memory, but
    # segmenting holds every label's probabilities on the working grid (here 8x the scan's voxels)
    from MultiTaskSegLib import imageio, inference

    scan = sitk.GetImageFromArray(np.random.default_rng(0).integers(10, 300, (40, 40, 40), dtype=np.int16))
    scan.SetSpacing((2.6, 2.6, 2.6))
    path = imageio.write_image(scan, tmp_path / "scan.nrrd")
    for module in (imageio, inference):
        monkeypatch.setattr(module, "available_memory_bytes", lambda: 2 * 2**20, raising=False)
    image = imageio.read_image(path)
    with pytest.raises(InputError, match=r"needs about .* GiB of memory .* GiB .* available; crop"):
        segment_image(model, image, tasks=["breast_mri"], device="cpu")


def test_a_label_map_given_as_the_scan_is_warned_about(model):
    labels = np.zeros((12, 14, 16), np.uint8)
    labels[3:8, 4:9, 5:12] = 1
    labels[6:9, 2:5, 2:6] = 2
    label_map = sitk.GetImageFromArray(labels)
    label_map.SetSpacing((1.3, 1.3, 1.3))
    warnings = segment_image(model, label_map, tasks=["breast_mri"], device="cpu").warnings
    assert any("only 3 distinct values (0, 1, 2): it looks like a label map or mask" in w for w in warnings), warnings
    eight_bit_scan = sitk.Cast(sitk.RescaleIntensity(mr_scan(), 0, 255), sitk.sitkUInt8)  # 8 bits: still ~200 levels
    assert not segment_image(model, eight_bit_scan, tasks=["breast_mri"], device="cpu").warnings


def limb_ct(shape=(12, 24, 24)) -> sitk.Image:
    """A CT cropped inside a thigh, as the sarcoma model card asks: muscle in a ring of fat, no air."""
    rng = np.random.default_rng(0)
    _, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    radius = np.hypot(yy - shape[1] / 2, xx - shape[2] / 2)
    hounsfield = np.where(radius < shape[1] / 3, 45.0, -100.0) + rng.normal(0, 10, shape)
    image = sitk.GetImageFromArray(hounsfield.astype(np.int16))
    image.SetSpacing((0.45, 0.45, 0.45))
    return image


def test_a_ct_cropped_inside_the_body_is_not_taken_for_an_mr(model):
    warnings = segment_image(model, limb_ct(), tasks=["cardiac_cta"], device="cpu").warnings
    assert not any("looks MR-like" in w for w in warnings), warnings
    mr = mr_scan(spacing=(0.45, 0.45, 0.45))
    assert any("looks MR-like" in w for w in segment_image(model, mr, tasks=["cardiac_cta"], device="cpu").warnings)


def test_a_ct_stored_without_its_offset_gets_a_warning_that_says_to_subtract_1024(model):
    hounsfield = limb_ct()
    unshifted = sitk.Cast(hounsfield + 1024, sitk.sitkUInt16)  # as some exporters write CT: air at 0, water at 1024
    unshifted.CopyInformation(hounsfield)
    warnings = segment_image(model, unshifted, tasks=["cardiac_cta"], device="cpu").warnings
    assert any("without its -1024 HU offset" in w and "subtract 1024" in w for w in warnings), warnings
