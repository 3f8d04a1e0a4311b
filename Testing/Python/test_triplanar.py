"""The triplanar CNN of Moeskops et al. 2017: paper sizes, dense = patch-wise, grid training, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MultiTaskSegLib.architectures import triplanar
from MultiTaskSegLib.inferers import InferenceOptions
from MultiTaskSegLib.architectures.base import TrainingStep
from MultiTaskSegLib.sampling import PreparedCase
from MultiTaskSegLib.architectures.triplanar import (
    IGNORED,
    TriplanarArchitecture,
    choose_block_shape,
    iterate_blocks,
    pad_volume,
    predict_voxels_patchwise,
)
from MultiTaskSegLib.errors import CancelledError, InputError
from MultiTaskSegLib.networks.triplanar import (
    PlanarFeatureStack,
    PointwiseClassifier,
)
from MultiTaskSegLib.sampling import BalancedVoxelSampler

CPU = torch.device("cpu")
TINY = {"layers": 3, "channels": 8, "hidden_features": 16}


def randomise_batch_norm(network: torch.nn.Module, generator: torch.Generator) -> None:
    """Give batch norm non-trivial statistics and affine parameters, so eval mode is not an identity."""
    for module in network.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            size = module.num_features
            module.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(size, generator=generator) - 0.5)


def tiny_architecture(num_labels: int = 4, grid: int = 3, **overrides) -> TriplanarArchitecture:
    torch.manual_seed(0)
    architecture = TriplanarArchitecture(num_labels, ("a", "b"), grid=grid, **{**TINY, **overrides})
    randomise_batch_norm(architecture.network, torch.Generator().manual_seed(1))
    return architecture


def noise_case(task: str, shape: tuple[int, int, int], num_labels: int, seed: int) -> PreparedCase:
    rng = np.random.default_rng(seed)
    return PreparedCase(
        task=task,
        name=f"{task}{seed}",
        image=rng.normal(size=shape).astype(np.float32),
        labels=rng.integers(0, num_labels, size=shape).astype(np.int16),
        foreground=np.ones(shape, dtype=bool),
    )


def test_defaults_reproduce_the_paper_network():
    architecture = TriplanarArchitecture(9, ("brain_t1_mri", "breast_mri", "cardiac_cta"))
    network = architecture.network
    convolutions = [m for m in network.features.modules() if isinstance(m, torch.nn.Conv2d)]
    fully_connected = [m for m in network.classifier.modules() if isinstance(m, torch.nn.Conv1d)]

    assert network.patch_size == 51 and network.margin == 25
    assert len(convolutions) == 25
    assert all(c.kernel_size == (3, 3) and c.padding == (0, 0) and c.stride == (1, 1) for c in convolutions)
    assert all(c.out_channels == 32 for c in convolutions)
    assert [(m.in_channels, m.out_channels) for m in fully_connected] == [(96, 192), (192, 192), (192, 9)]
    batch_norm = 2 * (25 * 32 + 2 * 192)
    expected = 9 * 32 + 24 * 9 * 32 * 32 + 96 * 192 + 192 * 192 + 192 * 9 + 9 + batch_norm
    assert sum(p.numel() for p in network.parameters()) == expected
    with torch.no_grad():
        patches = torch.zeros(2, 1, 51, 51)
        assert network.eval()(patches, patches, patches).shape == (2, 9)
    assert architecture.arguments == {"layers": 25, "channels": 32, "hidden_features": 192, "hidden_layers": 2,
                                      "dropout": 0.5, "grid": 3, "mixed_precision": True}


def test_model_card_line_names_the_networks_own_sizes():
    paper = TriplanarArchitecture(9, ("brain_t1_mri",))
    small = TriplanarArchitecture(9, ("brain_t1_mri",), layers=12, channels=16)
    assert "25 shared 3x3 conv layers of 32 kernels on 51x51" in paper.summary
    assert "12 shared 3x3 conv layers of 16 kernels on 25x25" in small.summary


def test_building_blocks_work_on_any_input_size():
    stack = PlanarFeatureStack(layers=2, channels=5)
    assert stack(torch.zeros(3, 1, 9, 7)).shape == (3, 5, 5, 3)
    head = PointwiseClassifier(15, 4, hidden_features=6)
    assert head(torch.zeros(2, 15)).shape == (2, 4)
    assert head(torch.zeros(2, 15, 3, 4, 5)).shape == (2, 4, 3, 4, 5)
    with pytest.raises(ValueError, match="receptive field"):
        stack(torch.zeros(1, 1, 4, 9))


def test_block_tiling_caps_block_size_and_covers_the_volume():
    shape = (13, 11, 9)
    block = choose_block_shape(shape, 125)
    assert np.prod(block) <= 125
    covered = np.zeros(shape, dtype=int)
    for blocks in iterate_blocks(shape, block):
        covered[blocks] += 1
    assert (covered == 1).all()
    assert choose_block_shape((256, 256, 256), 64**3) == (64, 64, 64)


def test_dense_prediction_equals_patchwise_definition_including_borders(monkeypatch):
    # Small passes, so the stack and the classifier run on parts of each block too.
    monkeypatch.setitem(triplanar.PASS_BYTES, "cpu", 16_000)
    architecture = tiny_architecture()
    network = architecture.network.double()
    rng = np.random.default_rng(2)
    image = rng.normal(size=(13, 11, 9)).astype(np.float32)
    # Blocks of at most 5^3 voxels: several blocks, none of them fitting the volume exactly.
    probabilities = architecture.predict_probabilities(image, CPU, InferenceOptions(max_block_voxels=5 * 5 * 5))

    corners = np.array([[z, y, x] for z in (0, 12) for y in (0, 10) for x in (0, 8)])
    coords = np.concatenate([corners, np.argwhere(np.ones(image.shape))[rng.choice(image.size, 40, replace=False)]])
    reference = predict_voxels_patchwise(network, pad_volume(image, network.margin), coords)

    assert probabilities.shape == (4, 13, 11, 9) and probabilities.dtype == np.float32
    dense = probabilities[:, coords[:, 0], coords[:, 1], coords[:, 2]].T
    np.testing.assert_allclose(dense, reference, atol=1e-6)
    assert network.training, "prediction must restore the training mode it found"


def test_grid_training_forward_equals_patchwise_definition():
    architecture = tiny_architecture(grid=3)
    network = architecture.network.double()
    cases = [noise_case("a", (7, 9, 8), 4, 3), noise_case("b", (4, 6, 5), 4, 4)]
    sampler = BalancedVoxelSampler(cases, {"a": [1, 2], "b": [3]})
    batch = architecture.sample_batch(sampler, 12, np.random.default_rng(5))

    network.eval()
    with torch.no_grad():
        slices = [batch[plane].double() for plane in ("axial", "coronal", "sagittal")]
        block = network.forward_block(*slices).softmax(dim=1).numpy()
    offsets = np.argwhere(np.ones((3, 3, 3)))
    for sample, (number, origin) in enumerate(zip(batch["case_numbers"].numpy(), batch["origins"].numpy())):
        case = cases[number]
        coords = origin + offsets
        assert (coords < case.image.shape).all(), "cubes are shifted inside the volume"
        reference = predict_voxels_patchwise(network, pad_volume(case.image, network.margin), coords)
        np.testing.assert_allclose(
            block[sample][:, offsets[:, 0], offsets[:, 1], offsets[:, 2]].T, reference, atol=1e-10
        )
        np.testing.assert_array_equal(batch["labels"][sample].numpy().ravel(), case.labels[tuple(coords.T)])


def test_cube_voxels_outside_volume_or_foreground_have_no_loss_term():
    architecture = tiny_architecture(grid=3)
    case = noise_case("a", (2, 6, 6), 4, 6)
    case.foreground[:, :, :3] = False
    batch = architecture.sample_batch(BalancedVoxelSampler([case], {"a": [1, 2, 3]}), 8, np.random.default_rng(7))
    labels = batch["labels"].numpy()
    assert (labels[:, 2] == IGNORED).all(), "the third z-slice of every cube lies outside a 2-slice volume"
    for sample, origin in enumerate(batch["origins"].numpy()):
        x = origin[2] + np.arange(3)
        assert (labels[sample, :2][..., x < 3] == IGNORED).all()
        assert (labels[sample, :2][..., x >= 3] != IGNORED).all()
    assert (batch["groups"].numpy()[labels != IGNORED] == labels[labels != IGNORED]).all()  # task a is task 0


def synthetic_two_task_cases(seed: int) -> list[PreparedCase]:
    """Task a: a bright cube (label 1) in grey; task b: a dark sphere (label 2) in lighter grey."""
    rng = np.random.default_rng(seed)
    shape = (16, 16, 16)
    z, y, x = np.indices(shape)
    cases = []
    for number in range(2):
        corner = rng.integers(2, 8, size=3)
        cube = (z >= corner[0]) & (z < corner[0] + 6) & (y >= corner[1]) & (y < corner[1] + 6)
        cube &= (x >= corner[2]) & (x < corner[2] + 6)
        image = np.where(cube, 1.0, 0.3) + rng.normal(0, 0.05, shape)
        cases.append(PreparedCase("a", f"cube{number}", image.astype(np.float32), cube.astype(np.int16), image > 0))
        centre = rng.integers(5, 11, size=3)
        sphere = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= 16
        image = np.where(sphere, 0.1, 0.6) + rng.normal(0, 0.05, shape)
        cases.append(
            PreparedCase("b", f"sphere{number}", image.astype(np.float32), 2 * sphere.astype(np.int16), image > 0)
        )
    return cases


def train_two_task_architecture(steps: int = 40) -> tuple[TriplanarArchitecture, list[TrainingStep]]:
    """A tiny triplanar network trained ``steps`` mini-batches on :func:`synthetic_two_task_cases`."""
    torch.manual_seed(0)
    architecture = TriplanarArchitecture(3, ("a", "b"), grid=3, dropout=0.1, **TINY)
    sampler = BalancedVoxelSampler(synthetic_two_task_cases(8), {"a": [1], "b": [2]})
    optimizer = architecture.make_optimizer(1e-2)
    rng = np.random.default_rng(9)
    history = []
    architecture.network.train()
    for _ in range(steps):
        step = architecture.training_step(architecture.sample_batch(sampler, 24, rng), CPU)
        optimizer.zero_grad()
        step.loss.backward()
        architecture.clip_gradients()
        optimizer.step()
        history.append(step)
    return architecture, history


def test_training_learns_a_two_task_problem():
    architecture, history = train_two_task_architecture()
    losses = [float(step.loss.detach()) for step in history]
    for step in history:
        assert step.parts["voxels"] > 0.9 * 24 * 27  # a few dark voxels are below zero: not foreground

    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    for case in synthetic_two_task_cases(10):
        predicted = architecture.predict_probabilities(case.image, CPU).argmax(axis=0)
        for label in np.unique(case.labels):
            recall = (predicted[case.labels == label] == label).mean()
            assert recall > 0.9, f"{case.name}: recall of label {label} is {recall:.2f}"


def test_prediction_reports_progress_up_to_one():
    architecture = tiny_architecture()
    reports = []
    architecture.predict_probabilities(
        np.zeros((10, 10, 10), np.float32), CPU, InferenceOptions(lambda f, s: reports.append((f, s)), None, 200)
    )
    fractions = [fraction for fraction, _ in reports]
    assert len(reports) > 1 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert all(isinstance(stage, str) and stage for _, stage in reports)


def test_prediction_stops_when_cancelled():
    architecture = tiny_architecture()
    reports = []
    with pytest.raises(CancelledError):
        architecture.predict_probabilities(
            np.zeros((10, 10, 10), np.float32), CPU, InferenceOptions(lambda f, s: reports.append(f), lambda: len(reports) >= 2, 200)
        )
    assert len(reports) == 2


def test_prediction_rejects_images_that_are_not_volumes():
    with pytest.raises(InputError, match="choose one channel"):
        tiny_architecture().predict_probabilities(np.zeros((4, 4, 4, 2), np.float32), CPU)


def test_cpu_prediction_is_deterministic():
    architecture = tiny_architecture()
    image = np.random.default_rng(11).normal(size=(9, 8, 7)).astype(np.float32)
    first = architecture.predict_probabilities(image, CPU, InferenceOptions(max_block_voxels=100))
    np.testing.assert_array_equal(first, architecture.predict_probabilities(image, CPU, InferenceOptions(max_block_voxels=100)))
