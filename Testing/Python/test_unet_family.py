"""The U-Net family: Avetisian's factorised 3-D U-Net and the CMU-Net paper's 2-D U-Nets.

Every network here is tiny (a few channels, two poolings) so the whole file runs in seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from MultiTaskSegLib.sampling import PreparedCase
from MultiTaskSegLib.architectures.unet2d import (
    CMUNetArchitecture,
    PretrainedEncoderUNet2DArchitecture,
    UNet2DArchitecture,
    presence_targets,
)
from MultiTaskSegLib.architectures.unet3d import FactorisedUNet3DArchitecture
from MultiTaskSegLib.architectures.inputs import crop_centred
from MultiTaskSegLib.inferers import InferenceOptions, plan_axis_windows
from MultiTaskSegLib.errors import CancelledError, InputError
from MultiTaskSegLib.losses import presence_focal_loss, soft_dice_loss, soft_iou_loss
from MultiTaskSegLib.networks.blocks import FactorisedConvBlock3d, HalvingMaxPool
from MultiTaskSegLib.networks.unet_factorised import FactorisedUNet3d
from MultiTaskSegLib.sampling import BalancedVoxelSampler

CPU = torch.device("cpu")
NUM_LABELS = 3  # background, task A's cube, task B's sphere
TASKS = ("A", "B")
TINY_2D = {"channels": (4, 8, 16), "patch_size": (32, 32)}
TINY = {
    FactorisedUNet3DArchitecture: {"first_channels": 4, "depth": 2, "block_shape": (16, 16, 16)},
    CMUNetArchitecture: TINY_2D,
    UNet2DArchitecture: TINY_2D,
    PretrainedEncoderUNet2DArchitecture: dict(TINY_2D, pretrain_steps=3),
}
ALL_ARCHITECTURES = tuple(TINY)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These networks are too small to gain from threads; one thread stays fast on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_architecture(cls, **overrides):
    torch.manual_seed(0)
    return cls(NUM_LABELS, TASKS, **{**TINY[cls], **overrides})


def make_two_task_sampler() -> BalancedVoxelSampler:
    """Task A: a bright cube (label 1); task B: a dark sphere (label 2); every voxel is foreground."""
    rng = np.random.default_rng(1)
    shape = (16, 24, 24)
    cube_labels = np.zeros(shape, np.int16)
    cube_labels[4:12, 6:16, 8:18] = 1
    z, y, x = np.indices(shape)
    sphere = (z - 8) ** 2 + (y - 12) ** 2 + (x - 11) ** 2 <= 5**2
    sphere_labels = np.where(sphere, 2, 0).astype(np.int16)
    cases = [
        PreparedCase("A", "cube", (2.0 * (cube_labels == 1) + 0.1 * rng.normal(size=shape)).astype(np.float32), cube_labels, np.ones(shape, bool)),
        PreparedCase("B", "sphere", (1.0 - 2.0 * sphere + 0.1 * rng.normal(size=shape)).astype(np.float32), sphere_labels, np.ones(shape, bool)),
    ]
    return BalancedVoxelSampler(cases, {"A": [1], "B": [2]})


@pytest.fixture(scope="module")
def two_task_sampler() -> BalancedVoxelSampler:
    return make_two_task_sampler()


def train(architecture, sampler, steps: int, learning_rate: float, batch_size: int = 4) -> list[float]:
    optimizer = architecture.make_optimizer(learning_rate)
    architecture.network.train()
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        step = architecture.training_step(architecture.sample_batch(sampler, batch_size, rng), CPU)
        optimizer.zero_grad()
        step.loss.backward()
        architecture.clip_gradients()
        optimizer.step()
        losses.append(float(step.loss.detach()))
    return losses


# -- any input size ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_ARCHITECTURES, ids=lambda cls: cls.name)
def test_prediction_has_the_input_size_for_odd_sizes(cls):
    image = np.random.default_rng(0).normal(size=(13, 27, 31)).astype(np.float32)
    probabilities = make_architecture(cls).predict_probabilities(image, CPU)
    assert probabilities.shape == (NUM_LABELS, 13, 27, 31)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)


@pytest.mark.parametrize("slice_axis", [1, 2])
def test_2d_prediction_along_another_slice_axis_keeps_the_volume_layout(slice_axis):
    image = np.random.default_rng(0).normal(size=(9, 14, 20)).astype(np.float32)
    probabilities = make_architecture(UNet2DArchitecture, slice_axis=slice_axis).predict_probabilities(image, CPU)
    assert probabilities.shape == (NUM_LABELS, 9, 14, 20)


# -- the factorised block -----------------------------------------------------------------------


def test_factorised_block_uses_planar_kernels_and_fewer_weights_than_3x3x3():
    block = FactorisedConvBlock3d(8, 8)
    convolutions = [module for module in block.modules() if isinstance(module, nn.Conv3d)]
    assert len(convolutions) == 4
    for convolution in convolutions:
        assert sorted(convolution.kernel_size) == [1, 3, 3], "each kernel is flat (size 1) in exactly one axis"
    flat_axes = {convolution.kernel_size.index(1) for convolution in convolutions}
    assert flat_axes == {0, 1, 2}, "the block convolves in all three planes"
    assert all(isinstance(module, (nn.Conv3d, nn.ReLU, nn.Dropout)) for module in block)

    def weights(module):
        return sum(parameter.numel() for parameter in module.parameters())

    same_block_3x3x3 = FactorisedConvBlock3d(8, 8, plane_kernels=[(3, 3, 3)] * 4)
    unet3d_double_conv = nn.Sequential(nn.Conv3d(8, 8, 3), nn.Conv3d(8, 8, 3))
    assert weights(block) == 4 * (8 * 8 * 9 + 8)
    assert weights(block) < weights(unet3d_double_conv) < weights(same_block_3x3x3)


@pytest.mark.parametrize("shape", [(2, 3, 8, 12), (2, 3, 7, 9), (1, 2, 4, 6, 8), (1, 2, 5, 6, 8)])
def test_halving_max_pool_gives_pytorchs_max_pool_values_and_gradients(shape):
    spatial_dims = len(shape) - 2
    reference_pool = nn.functional.max_pool2d if spatial_dims == 2 else nn.functional.max_pool3d
    image = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ours_input, reference_input = image.clone().requires_grad_(), image.clone().requires_grad_()
    ours, reference = HalvingMaxPool(spatial_dims)(ours_input), reference_pool(reference_input, 2)
    assert torch.equal(ours, reference)
    weights = torch.randn(reference.shape)
    (ours * weights).sum().backward()
    (reference * weights).sum().backward()
    assert torch.equal(ours_input.grad, reference_input.grad)  # random values: no ties


def test_factorised_unet_has_paper_defaults():
    network = FactorisedUNet3d(num_labels=2)
    assert network.size_multiple == 8, "three poolings: the paper's 2^3 n image sides"
    assert network.encoder[0][0].out_channels == 30
    assert [block[0].out_channels for block in network.encoder] == [30, 60, 120, 240]
    assert network.output_dropout.p == pytest.approx(0.15)


# -- losses against hand-computed values ------------------------------------------------------

# Two voxels in a 3-label space: voxel 1 is class 1, voxel 2 is class 2 (no background voxel).
HAND_PROBABILITIES = torch.tensor([[[0.2, 0.5], [0.7, 0.1], [0.1, 0.4]]])  # (N=1, L=3, voxels=2)
HAND_LABELS = torch.tensor([[1, 2]])


def test_soft_iou_loss_matches_hand_computation_and_ignores_background_and_padding():
    # Foreground channels only: intersection 0.7 + 0.4 = 1.1; sum(y) = 2; sum(p) = 0.7 + 0.1 + 0.1 + 0.4
    # = 1.3; union = 2 + 1.3 - 1.1 = 2.2; IoU = 0.5, loss = 0.5.
    assert float(soft_iou_loss(HAND_PROBABILITIES, HAND_LABELS)) == pytest.approx(0.5, abs=1e-5)
    # A third, padded voxel (valid = 0) that predicts class 1 with certainty must not count.
    probabilities = torch.cat([HAND_PROBABILITIES, torch.tensor([[[0.0], [1.0], [0.0]]])], dim=2)
    labels = torch.tensor([[1, 2, 0]])
    assert float(soft_iou_loss(probabilities, labels, torch.tensor([[1, 1, 0]]))) == pytest.approx(0.5, abs=1e-5)
    # Counted, it adds 1 to sum(p): IoU = 1.1 / 3.2.
    assert float(soft_iou_loss(probabilities, labels)) == pytest.approx(1 - 1.1 / 3.2, abs=1e-5)


def test_soft_dice_loss_matches_hand_computation():
    # Class 1: 2 * 0.7 / (1 + 0.8) = 0.7778; class 2: 2 * 0.4 / (1 + 0.5) = 0.5333; loss = 1 - mean.
    assert float(soft_dice_loss(HAND_PROBABILITIES, HAND_LABELS)) == pytest.approx(1 - (1.4 / 1.8 + 0.8 / 1.5) / 2, abs=1e-5)
    # With background: no background voxel, 0.7 predicted -> Dice ~0; loss = 1 - (0 + 0.7778 + 0.5333) / 3.
    with_background = soft_dice_loss(HAND_PROBABILITIES, HAND_LABELS, include_background=True)
    assert float(with_background) == pytest.approx(0.562963, abs=1e-5)


def test_per_item_soft_dice_weighs_a_small_tumour_slice_as_much_as_a_large_one():
    # Two slices of 8 voxels, one class: a large tumour (6 voxels) found whole, a small one (1 voxel) missed.
    labels = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]])
    found = (labels[0] == 1).float()
    probabilities = torch.stack([torch.stack([1 - found, found]), torch.stack([torch.ones(8), torch.zeros(8)])])
    # Batch Dice: 2 * 6 / (7 + 6) = 0.923, the missed voxel is 1 of 7; per slice: (1 + 0) / 2 = 0.5.
    assert float(soft_dice_loss(probabilities, labels)) == pytest.approx(1 - 12 / 13, abs=1e-4)
    assert float(soft_dice_loss(probabilities, labels, per_item=True)) == pytest.approx(0.5, abs=1e-4)


def test_presence_focal_loss_matches_hand_computation():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 0.0]])
    present = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # -a_t (1 - p_t)^2 log p_t, a = 0.8 for present and 0.2 for absent classes:
    #   logit  0, present: 0.8 * 0.5^2 * ln 2                          = 0.138629
    #   logit  2, absent:  p_t = 1 - sigmoid(2) = 0.119203: 0.2 * 0.880797^2 * 2.126928 = 0.330016
    #   logit -1, absent:  p_t = 1 - sigmoid(-1) = 0.731059: 0.2 * 0.268941^2 * 0.313262 = 0.004532
    #   logit  0, absent:  0.2 * 0.5^2 * ln 2                          = 0.034657
    expected = (0.138629 + 0.330016 + 0.004532 + 0.034657) / 4
    assert float(presence_focal_loss(logits, present)) == pytest.approx(expected, abs=1e-5)
    assert float(presence_focal_loss(logits, present, 0.5, 0.5, gamma=0.0)) == pytest.approx(
        0.5 * float(nn.functional.binary_cross_entropy_with_logits(logits, present)), abs=1e-6
    )


# -- presence labels --------------------------------------------------------------------------


def test_presence_targets_count_only_classes_visible_in_the_crop():
    labels = np.zeros((4, 4), np.int64)
    labels[0, 0] = 1
    labels[3, 3] = 3
    inside = np.ones((4, 4), bool)
    inside[3, 3] = False  # class 3 only lies in padding outside the image
    assert presence_targets(labels, inside, num_labels=5).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert presence_targets(labels, np.ones((4, 4), bool), num_labels=5).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert presence_targets(labels, inside, num_labels=5, min_voxels=2).tolist() == [0.0, 0.0, 0.0, 0.0]


def test_cmunet_batch_presence_marks_what_the_slice_crop_shows():
    # One 1x8x40 case: class 1 at x = 2, class 2 at x = 37. A 16x16 crop centred on x = 2 shows
    # only class 1 (x 0..9 of the image); the class 2 voxel in the same slice is outside the crop.
    labels = np.zeros((1, 8, 40), np.int16)
    labels[0, 4, 2] = 1
    labels[0, 4, 37] = 2
    case = PreparedCase("A", "strip", np.zeros((1, 8, 40), np.float32), labels, np.ones((1, 8, 40), bool))
    sampler = BalancedVoxelSampler([case], {"A": [1, 2]})
    architecture = CMUNetArchitecture(NUM_LABELS, ["A"], channels=(4, 8), patch_size=(16, 16))
    batch = architecture.sample_batch(sampler, 30, np.random.default_rng(0))
    centre_labels = batch["labels"][:, 8, 8]
    for centre, present, valid in zip(centre_labels, batch["present"], batch["valid"]):
        if centre == 1:
            assert present.tolist() == [1.0, 0.0]
        elif centre == 2:
            assert present.tolist() == [0.0, 1.0]
        assert valid.sum() < 16 * 16, "the 8-row image leaves padding above and below the crop"
    assert {1, 2} <= set(centre_labels.tolist())


def test_crop_centred_pads_outside_the_image():
    crop, inside = crop_centred(np.arange(5, dtype=np.float32), [0], [4], fill=-1)
    assert crop.tolist() == [-1, -1, 0, 1]
    assert inside.tolist() == [False, False, True, True]


# -- blended block inference ------------------------------------------------------------------


def test_window_margins_only_give_context():
    """Every position gets (almost) all of its blended weight from windows in which it lies at least
    ``margin`` away from an edge towards a neighbouring window."""
    length, size, margin = 64, 32, 4
    plan = plan_axis_windows(length, size, margin, multiple=8)
    assert plan.starts[0] == 0 and plan.starts[-1] == length - size
    assert all(start % 8 == 0 for start in plan.starts), "windows stay aligned with the poolings"
    total, trusted = np.zeros(length), np.zeros(length)
    for start, weight in zip(plan.starts, plan.weights):
        total[start : start + size] += weight
        position = np.arange(size)
        far_from_inner_edges = ((position >= margin) | (start == 0)) & ((position < size - margin) | (start + size == length))
        trusted[start : start + size] += weight * far_from_inner_edges
    assert np.all(total > 0)
    np.testing.assert_allclose(trusted / total, 1.0, atol=1e-5)


def test_3d_blended_blocks_equal_a_single_pass():
    # A light network (one pooling, two planar convolutions per block) has a receptive radius of
    # 9 voxels, below the 10-voxel context margin, so blending must reproduce the single pass.
    light = {"depth": 1, "plane_kernels": [(1, 3, 3), (3, 3, 1)]}
    architecture = make_architecture(FactorisedUNet3DArchitecture, inference_margin=10, **light)
    with torch.no_grad():  # a sharper output layer, so the probabilities clearly vary in space
        architecture.network.output.weight.mul_(20)
    image = np.random.default_rng(2).normal(size=(26, 29, 31)).astype(np.float32)
    whole = architecture.predict_probabilities(image, CPU)
    assert whole.std(axis=(1, 2, 3)).min() > 0.05
    fractions = []
    blended = architecture.predict_probabilities(
        image, CPU, InferenceOptions(progress=lambda fraction, stage: fractions.append(fraction), max_block_voxels=24**3))
    assert len(fractions) - 1 >= 8, "the volume was cut into blocks along every axis"
    np.testing.assert_allclose(blended, whole, atol=1e-4)
    assert architecture.network.training, "prediction restores the training mode it found"

    no_context = make_architecture(FactorisedUNet3DArchitecture, inference_margin=0, **light)
    no_context.network.load_state_dict(architecture.network.state_dict())
    seams = no_context.predict_probabilities(image, CPU, InferenceOptions(max_block_voxels=24**3))
    assert np.abs(seams - whole).max() > 1e-2, "the comparison above would notice blocks without context"


# -- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, learning_rate",
    [(FactorisedUNet3DArchitecture, 1e-2), (CMUNetArchitecture, 1e-2), (UNet2DArchitecture, 1e-2)],
    ids=lambda value: getattr(value, "name", str(value)),
)
def test_training_steps_reduce_the_loss_on_a_two_task_problem(two_task_sampler, cls, learning_rate):
    wider = {"first_channels": 8, "block_dropout": 0.0} if cls is FactorisedUNet3DArchitecture else {}
    architecture = make_architecture(cls, **wider)
    losses = train(architecture, two_task_sampler, steps=30, learning_rate=learning_rate)
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses


def test_3d_batches_are_balanced_blocks_with_l2_on_convolutions(two_task_sampler):
    architecture = make_architecture(FactorisedUNet3DArchitecture)
    batch = architecture.sample_batch(two_task_sampler, 8, np.random.default_rng(0))
    assert batch["image"].shape == (8, 1, 16, 16, 16)
    centres = batch["labels"][:, 8, 8, 8].tolist()
    assert sorted(centres) == [0, 0, 0, 0, 1, 1, 2, 2], "two tasks x (background, class) = 2 of each"
    step = architecture.training_step(batch, CPU)
    assert step.parts["l2"] > 0
    assert step.parts["iou_loss"] + step.parts["l2"] == pytest.approx(float(step.loss.detach()), rel=1e-5)
    optimizer = architecture.make_optimizer()
    assert optimizer.defaults["lr"] == pytest.approx(7.6e-5)
    assert optimizer.defaults["betas"] == (0.9, 0.999)


def test_2d_architectures_schedule_warm_restarts_every_ten_epochs():
    architecture = make_architecture(CMUNetArchitecture)
    optimizer = architecture.make_optimizer()
    scheduler = architecture.make_scheduler(optimizer, steps_per_epoch=3)
    rates = []
    for _ in range(31):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(1e-3)
    assert rates[29] < 1e-4 and rates[30] == pytest.approx(1e-3), "restart after 10 epochs of 3 steps"
    # The trainer calls make_scheduler(optimizer): an epoch is then the architecture's own argument.
    default_epoch = make_architecture(CMUNetArchitecture, steps_per_epoch=2)
    assert default_epoch.make_scheduler(default_epoch.make_optimizer()).T_0 == 20


def test_pretrained_variant_trains_the_encoder_first_then_segmentation(two_task_sampler):
    architecture = make_architecture(PretrainedEncoderUNet2DArchitecture)
    network = architecture.network
    rng = np.random.default_rng(0)
    phases = []
    for _ in range(5):
        network.zero_grad(set_to_none=True)
        step = architecture.training_step(architecture.sample_batch(two_task_sampler, 4, rng), CPU)
        step.loss.backward()
        phases.append(step.parts["phase"])
        decoder_has_gradient = network.output.weight.grad is not None
        head_has_gradient = network.head.fc.weight.grad is not None
        assert decoder_has_gradient == (step.parts["phase"] == 2.0)
        assert head_has_gradient == (step.parts["phase"] == 1.0)
    assert phases == [1.0, 1.0, 1.0, 2.0, 2.0]

    resumed = make_architecture(PretrainedEncoderUNet2DArchitecture)
    assert resumed.pretraining
    resumed.network.load_state_dict(network.state_dict())
    assert int(resumed.network.training_steps_done) == 5 and not resumed.pretraining


# -- CMU-Net presence at inference --------------------------------------------------------------


def test_cmunet_puts_background_where_no_requested_class_is_predicted_present():
    architecture = make_architecture(CMUNetArchitecture)
    image = np.random.default_rng(0).normal(size=(3, 20, 20)).astype(np.float32)
    head = architecture.network.head.fc
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([-10.0, 10.0]))  # class 1 absent, class 2 present everywhere
    presence = architecture.presence_by_class(image, CPU)
    assert presence.shape == (NUM_LABELS,)
    assert presence[0] == 1.0 and presence[1] < 0.01 and presence[2] > 0.99

    skipped = architecture.predict_probabilities(image, CPU, InferenceOptions(requested_labels=[1]))
    np.testing.assert_allclose(skipped[0], 1.0, atol=1e-6)
    kept = architecture.predict_probabilities(image, CPU, InferenceOptions(requested_labels=[1, 2]))
    architecture.config.presence_threshold = None
    np.testing.assert_allclose(kept, architecture.predict_probabilities(image, CPU), atol=1e-6)


# -- cancellation and progress ------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_ARCHITECTURES, ids=lambda cls: cls.name)
def test_prediction_raises_when_cancelled(cls):
    architecture = make_architecture(cls)
    image = np.zeros((8, 16, 16), np.float32)
    fractions = []
    architecture.predict_probabilities(image, CPU, InferenceOptions(progress=lambda fraction, stage: fractions.append(fraction)))
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    calls = []

    def cancel_on_second_check() -> bool:
        calls.append(1)
        return len(calls) >= 2

    with pytest.raises(CancelledError):
        architecture.predict_probabilities(image, CPU, InferenceOptions(cancelled=cancel_on_second_check, max_block_voxels=8 * 8 * 8))
    assert len(calls) == 2, "cancellation is checked before every batch"


# -- model files ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_ARCHITECTURES, ids=lambda cls: cls.name)
def test_stored_arguments_rebuild_the_same_network(cls):
    architecture = make_architecture(cls)
    stored = json.loads(json.dumps(architecture.arguments))
    rebuilt = cls(NUM_LABELS, TASKS, **stored)
    assert rebuilt.arguments == architecture.arguments
    rebuilt.network.load_state_dict(architecture.network.state_dict())


def test_2d_windows_smaller_than_the_patch_keep_instance_norm_working():
    architecture = make_architecture(CMUNetArchitecture)
    image = np.random.default_rng(0).normal(size=(2, 40, 40)).astype(np.float32)
    probabilities = architecture.predict_probabilities(image, CPU, InferenceOptions(max_block_voxels=10))
    assert probabilities.shape == (NUM_LABELS, 2, 40, 40)
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)


# -- seam-free windows ---------------------------------------------------------------------------


def column_jumps(probabilities: np.ndarray) -> np.ndarray:
    """Mean absolute change of the probabilities from one column (last axis) to the next."""
    return np.abs(np.diff(probabilities, axis=-1)).mean(axis=(0, 1, 2))


def test_overlapping_gaussian_windows_leave_no_edges_where_margin_windows_do():
    """Instance norm gives each window its own statistics: on a scan whose brightness drifts across
    the field of view, windows that merely meet disagree along their borders (the straight edges
    seen on real scans); Gaussian-blended overlapping windows change no faster there than elsewhere."""
    z, y, x = np.meshgrid(*[np.linspace(0, 1, n) for n in (2, 40, 256)], indexing="ij")  # a full 256-voxel side
    image = (4 * x + 0.3 * np.sin(5 * y + 2 * z)).astype(np.float32)
    margin = 4
    seams = np.array(plan_axis_windows(256, 32, margin, multiple=4).starts[1:-1]) + margin
    old = make_architecture(UNet2DArchitecture, window_overlap=None, inference_margin=margin)
    new = make_architecture(UNet2DArchitecture)
    assert new.config.window_overlap == 0.5
    for architecture, seam_ratio in ((old, lambda r: r > 1.5), (new, lambda r: r < 1.2)):
        jumps = column_jumps(architecture.predict_probabilities(image, CPU))
        typical = np.median(jumps[8:-8])
        assert seam_ratio(jumps[seams].mean() / typical), architecture.config.window_overlap
    assert jumps[8:-8].max() < 1.8 * typical  # the blended result has no edge anywhere inside


def test_cmunet_presence_decides_per_slice_never_per_window():
    """A slice where one window sees the class present is decoded in all its windows (no blanked
    block beside a decoded one); a slice where no window does is skipped."""
    architecture = make_architecture(CMUNetArchitecture)
    image = np.zeros((2, 32, 96), np.float32)
    image[0, :, 70:90] = 5.0  # bright only in the right part of slice 0
    network = architecture.network
    seen = {}
    encode, classify = network.encode, network.classify

    def encode_and_remember(batch):
        seen["windows"] = batch
        return encode(batch)

    def present_where_bright(feature):  # class 1 present in bright windows only, class 2 never
        logits = classify(feature)
        bright = seen["windows"].amax(dim=(1, 2, 3)) > 1
        return torch.stack([torch.where(bright, 10.0, -10.0), torch.full_like(logits[:, 1], -10.0)], dim=1)

    network.encode, network.classify = encode_and_remember, present_where_bright
    probabilities = architecture.predict_probabilities(image, CPU, InferenceOptions(requested_labels=[1]))
    assert not np.any(np.all(np.isclose(probabilities[0, 0, :, :32], 1.0), axis=0))  # left windows decoded too
    np.testing.assert_allclose(probabilities[0, 1], 1.0, atol=1e-6)  # slice 1: absent in every window, skipped


def test_multiplanar_training_step_uses_per_slice_dice_when_batch_dice_is_off():
    from MultiTaskSegLib.architectures.multiplanar import MultiplanarUNet2DArchitecture

    tiny = {"channels": [4, 8], "patch_size": [16, 16], "mixed_precision": False,
            "augmentation": {"probability": 0, "low_resolution_probability": 0}}
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[0, 2:14, 2:14] = 1  # a large tumour slice
    labels[1, 7:9, 7:9] = 1  # a small one
    batch = {"image": torch.randn(2, 1, 16, 16), "labels": labels, "valid": torch.ones(2, 16, 16, dtype=torch.bool)}
    losses = {}
    for batch_dice in (True, False):
        torch.manual_seed(0)
        architecture = MultiplanarUNet2DArchitecture(2, ["sarcoma_t1_mri"], batch_dice=batch_dice, **tiny)
        with torch.no_grad():
            probabilities = torch.softmax(architecture.network(batch["image"]).float(), dim=1)
        expected = soft_dice_loss(probabilities, labels, per_item=not batch_dice)
        losses[batch_dice] = architecture.training_step(batch, torch.device("cpu")).parts["dice_loss"]
        assert losses[batch_dice] == pytest.approx(float(expected.detach()), abs=1e-5)
    assert losses[True] != pytest.approx(losses[False], abs=1e-3)


def test_multiplanar_flags_given_as_text_are_refused_not_read_as_yes():
    from MultiTaskSegLib.architectures.multiplanar import MultiplanarUNet2DArchitecture

    with pytest.raises(InputError, match="batch_dice='False'.*true or false"):
        MultiplanarUNet2DArchitecture(2, ["sarcoma_t1_mri"], batch_dice="False", channels=[4, 8], patch_size=[16, 16])
