"""Context slices (FastSurfer's thick-slice input): the 2-D network reads the slices on either side
of the one it segments, in training and at inference alike."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MultiTaskSegLib.architectures.multiplanar import MultiplanarUNet2DArchitecture
from MultiTaskSegLib.errors import InputError
from MultiTaskSegLib.inference import segment_image
from MultiTaskSegLib.sampling import BalancedVoxelSampler, PreparedCase

from conftest import train_small_multiplanar

TINY = {"channels": [4, 8], "patch_size": [16, 16], "mixed_precision": False, "whole_slice_inference": True,
        "augmentation": {"probability": 0, "low_resolution_probability": 0}}


def _slice_numbered_case(shape=(6, 7, 8)) -> PreparedCase:
    """Every voxel holds 1 + its index along each axis, coded so that the slice it lies in can be read back."""
    z, y, x = np.meshgrid(*(np.arange(side) for side in shape), indexing="ij")
    image = (1 + z + 100 * (1 + y) + 10_000 * (1 + x)).astype(np.float32)
    return PreparedCase("sarcoma_t1_mri", "numbered", image, np.ones(shape, np.int16), np.ones(shape, bool))


@pytest.mark.parametrize("seed", range(4))
def test_training_slices_hold_their_neighbours_and_zero_beyond_the_volume(seed):
    architecture = MultiplanarUNet2DArchitecture(2, ["sarcoma_t1_mri"], context_slices=2, **TINY)
    assert architecture.network_channels == 5
    case = _slice_numbered_case()
    sampler = BalancedVoxelSampler([case], {"sarcoma_t1_mri": (1,)})
    batch = architecture.sample_batch(sampler, 8, np.random.default_rng(seed))["image"].numpy()
    assert batch.shape == (8, 5, 16, 16)
    for item in batch:
        centre = item[2]
        inside = centre != 0
        # The segmented slice is one plane of the volume: one of the three codes is constant over it.
        codes = [(centre[inside] // 10 ** (2 * axis) % 100) for axis in range(3)]
        axis = next(axis for axis, code in enumerate(codes) if np.unique(code).size == 1)
        index = int(codes[axis][0]) - 1
        for offset in (-2, -1, 1, 2):
            neighbour = item[2 + offset]
            if 0 <= index + offset < case.image.shape[axis]:
                np.testing.assert_array_equal(neighbour[inside], centre[inside] + offset * 10 ** (2 * axis))
            else:
                assert not neighbour.any()


def test_inference_slabs_are_the_training_slices_of_the_same_position():
    architecture = MultiplanarUNet2DArchitecture(2, ["sarcoma_t1_mri"], context_slices=1, position_channels=True, **TINY)
    case = _slice_numbered_case()
    stack = np.concatenate([case.image[None], np.full((3, *case.image.shape), 7.0, np.float32)])  # image, 3 positions
    box = (slice(0, 6), slice(2, 5), slice(1, 8))
    for axis in range(3):
        slabs = architecture._slabs(stack, box, axis)
        assert slabs.shape == (3 + 3, 6, 3, 7)
        centre = case.image[box]
        np.testing.assert_array_equal(slabs[1], centre)
        np.testing.assert_array_equal(slabs[3:], 7.0)
        for channel, offset in ((0, -1), (2, 1)):
            shifted = np.take(case.image, np.clip(np.arange(case.image.shape[axis]) + offset, 0, case.image.shape[axis] - 1), axis=axis)
            expected = shifted[box].copy()
            beyond = np.arange(box[axis].start, box[axis].stop) + offset
            outside = (beyond < 0) | (beyond >= case.image.shape[axis])
            np.moveaxis(expected, axis, 0)[outside] = 0
            np.testing.assert_array_equal(slabs[channel], expected)


def test_a_context_network_started_from_a_plain_one_predicts_as_it_does():
    """``train --init-from``: the first convolution is widened with zero weights on the further slices,
    so the new network starts where its source is; that also shows the slabs reach the network in the
    order training gives them (the centre slice in the middle)."""
    torch.manual_seed(0)
    plain = MultiplanarUNet2DArchitecture(2, ["sarcoma_t1_mri"], **TINY)
    context = MultiplanarUNet2DArchitecture(2, ["sarcoma_t1_mri"], context_slices=2, **TINY)
    weights = context.weights_from(plain)
    assert weights.keys() == context.network.state_dict().keys()
    context.network.load_state_dict(weights)
    volume = np.random.default_rng(1).random((12, 20, 18)).astype(np.float32) + 0.1
    expected = plain.predict_probabilities(volume, torch.device("cpu"))
    np.testing.assert_allclose(context.predict_probabilities(volume, torch.device("cpu")), expected, atol=1e-5)
    context.config.locate_stride = plain.config.locate_stride = 3  # the locating pass reads slabs too
    np.testing.assert_allclose(context.predict_probabilities(volume, torch.device("cpu")),
                               plain.predict_probabilities(volume, torch.device("cpu")), atol=1e-5)
    wider = MultiplanarUNet2DArchitecture(2, ["sarcoma_t1_mri"], context_slices=3, **TINY)
    wider.network.load_state_dict(wider.weights_from(context))  # 5 slices -> 7: the shared 5 kept
    np.testing.assert_allclose(wider.predict_probabilities(volume, torch.device("cpu")), expected, atol=1e-5)


def test_context_slices_refuse_label_map_only_cases_and_negative_counts():
    with pytest.raises(InputError, match="context_slices"):
        MultiplanarUNet2DArchitecture(2, ["sarcoma_t1_mri"], context_slices=-1, **TINY)
    labels = np.ones((6, 7, 8), np.int16)
    synthetic = PreparedCase("sarcoma_t1_mri", "labels only", None, labels, np.ones(labels.shape, bool),
                             {"source_labels": labels})
    architecture = MultiplanarUNet2DArchitecture(2, ["sarcoma_t1_mri"], context_slices=1, **TINY)
    sampler = BalancedVoxelSampler([synthetic], {"sarcoma_t1_mri": (1,)})
    with pytest.raises(InputError, match="label-map-only"):
        architecture.sample_batch(sampler, 2, np.random.default_rng(0))


def test_a_model_with_context_slices_trains_saves_loads_and_segments(tmp_path):
    _, loaded, image = train_small_multiplanar(tmp_path, {**TINY, "patch_size": [32, 32], "context_slices": 3})
    assert loaded.architecture.config.context_slices == 3
    assert loaded.architecture.network_channels == 7
    result = segment_image(loaded, image, device="cpu")
    assert sitk.GetArrayViewFromImage(result.labels).shape == sitk.GetArrayViewFromImage(image).shape
