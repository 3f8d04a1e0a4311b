"""Fast dense prediction of the triplanar CNN (issue 15): folded batch norm, bfloat16, bounding box.

Each speed-up must leave the result alone: folding batch norm is exact up to float32 rounding, the
bounding box is exact wherever inference keeps the network's answer, and bfloat16 keeps the labels.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from MultiTaskSegLib.architectures import triplanar
from MultiTaskSegLib.inferers import bfloat16_ready
from MultiTaskSegLib.architectures.triplanar import (
    pad_volume,
    predict_volume,
    predict_voxels_patchwise,
)
from MultiTaskSegLib.inferers import InferenceOptions
from MultiTaskSegLib.model_catalog import resolve_model_path
from MultiTaskSegLib.model_files import load_model
from MultiTaskSegLib.networks.triplanar import fold_batch_norm
from MultiTaskSegLib.preprocessing import background_outside
from test_triplanar import synthetic_two_task_cases, tiny_architecture, train_two_task_architecture

CPU = torch.device("cpu")


def every_voxel(shape: tuple[int, ...]) -> np.ndarray:
    return np.argwhere(np.ones(shape, dtype=bool))


def whole_volume_probabilities(network: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """The network on the whole volume as one block (dense prediction before the bounding box)."""
    margin = network.margin
    padded = torch.from_numpy(pad_volume(image, margin)).to(next(network.parameters()).dtype)
    depth, height, width = image.shape
    axial = padded[margin : margin + depth][None]
    coronal = padded[:, margin : margin + height].permute(1, 0, 2)[None]
    sagittal = padded[:, :, margin : margin + width].permute(2, 0, 1)[None]
    with torch.no_grad():
        return network.eval().forward_block(axial, coronal, sagittal)[0].softmax(dim=0).float().numpy()


def test_folded_batch_norm_gives_the_unfolded_probabilities_and_leaves_the_network_alone():
    architecture = tiny_architecture(layers=6, channels=12)
    network = architecture.network  # in training mode, as after a training step
    weights = {name: value.clone() for name, value in network.state_dict().items()}
    image = np.random.default_rng(3).normal(size=(9, 10, 8)).astype(np.float32)

    folded = fold_batch_norm(network)
    dense = predict_volume(network, image, CPU, mixed_precision=False)

    assert not any(isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for module in folded.modules())
    reference = predict_voxels_patchwise(network, pad_volume(image, network.margin), every_voxel(image.shape))
    np.testing.assert_allclose(dense.reshape(len(dense), -1).T, reference, atol=1e-4)
    assert network.training, "the trained network keeps its mode"
    for name, value in network.state_dict().items():
        assert torch.equal(value, weights[name]), f"{name} changed"


def test_only_voxels_near_the_foreground_are_predicted_and_exactly_as_on_the_whole_volume(monkeypatch):
    # One slice per pass, so each pass is cropped to the rectangle of its own slice.
    monkeypatch.setitem(triplanar.PASS_BYTES, "cpu", 16_000)
    architecture = tiny_architecture()
    network = architecture.network.double()
    rng = np.random.default_rng(4)
    image = np.zeros((30, 26, 28), np.float32)  # background 0, two separate foreground blobs above 0
    image[4:9, 3:8, 4:10] = rng.uniform(0.1, 1.0, size=(5, 5, 6))
    image[20:26, 17:23, 18:25] = rng.uniform(0.1, 1.0, size=(6, 6, 7))
    near = np.zeros(image.shape, bool)  # within 2 voxels of a blob
    near[2:11, 1:10, 2:12] = near[18:28, 15:25, 16:27] = True
    reports = []

    probabilities = architecture.predict_probabilities(
        image, CPU, InferenceOptions(lambda fraction, stage: reports.append(stage), None, 26 * 24 * 25))

    whole = whole_volume_probabilities(network, image)
    # Both are float64 results rounded to float32: equal up to one float32 step.
    np.testing.assert_allclose(probabilities[:, near], whole[:, near], rtol=0, atol=1e-7)
    assert (probabilities[0][~near] == 1).all() and (probabilities[1:][:, ~near] == 0).all()
    np.testing.assert_allclose(background_outside(probabilities.copy(), image > 0),
                               background_outside(whole.copy(), image > 0), rtol=0, atol=1e-7)
    assert reports == ["triplanar prediction: block 1 of 1"], "only the blobs' bounding box is tiled"


def test_bfloat16_prediction_keeps_the_float32_labels():
    architecture = train_two_task_architecture()[0]
    assert architecture.config.mixed_precision, "mixed precision is the default"
    agreement, differs = [], []
    for case in synthetic_two_task_cases(10):
        mixed = predict_volume(architecture.network, case.image, CPU)
        float32 = predict_volume(architecture.network, case.image, CPU, mixed_precision=False)
        agreement.append((mixed.argmax(axis=0) == float32.argmax(axis=0))[case.foreground].mean())
        differs.append(not np.array_equal(mixed, float32))
    assert min(agreement) >= 0.995, f"bfloat16 labels agree on {min(agreement):.2%} of the foreground only"
    if bfloat16_ready(CPU):
        assert all(differs), "this CPU has bfloat16 arithmetic, so the default prediction must use it"


def test_mixed_precision_off_predicts_in_float32_like_the_patchwise_definition():
    architecture = tiny_architecture(mixed_precision=False)
    image = np.random.default_rng(5).normal(size=(8, 9, 7)).astype(np.float32)
    probabilities = architecture.predict_probabilities(image, CPU)
    reference = predict_voxels_patchwise(architecture.network, pad_volume(image, architecture.network.margin),
                                         every_voxel(image.shape))
    np.testing.assert_allclose(probabilities.reshape(len(probabilities), -1).T, reference, atol=1e-5)


def test_a_model_file_written_before_mixed_precision_loads_with_it_on():
    card = json.loads((resolve_model_path("triplanar-phantoms") / "model.json").read_text(encoding="utf-8"))
    assert "mixed_precision" not in card["architecture"]["arguments"], "the bundled model predates the field"
    model = load_model("triplanar-phantoms")
    assert model.architecture.config.mixed_precision is True
    assert model.architecture.arguments["mixed_precision"] is True


def test_an_image_without_foreground_is_predicted_whole():
    architecture = tiny_architecture()
    probabilities = architecture.predict_probabilities(np.zeros((5, 6, 7), np.float32), CPU)
    assert probabilities.shape == (4, 5, 6, 7)
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)
    assert not (probabilities[0] == 1).all(), "no foreground: nothing to crop to, so the network runs everywhere"
