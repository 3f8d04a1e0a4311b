"""Position channels: a network for crops around a structure is told where each voxel lies in the crop."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MultiTaskSegLib.architectures.inputs import crop_centred
from MultiTaskSegLib.architectures.multiplanar import MultiplanarUNet2DArchitecture, slice_positions, volume_positions
from MultiTaskSegLib.inference import segment_image

from conftest import train_small_multiplanar

TINY = {"channels": [4, 8], "patch_size": [32, 32], "mixed_precision": False, "whole_slice_inference": True}


def test_distances_are_zero_at_the_centre_and_one_at_the_corners():
    distances = volume_positions((5, 7, 9))
    assert distances.shape == (3, 5, 7, 9)
    np.testing.assert_allclose(distances[:, 2, 3, 4], 0.0)
    np.testing.assert_allclose(distances[:, 0, 0, 0], 1.0)
    np.testing.assert_allclose(distances[:, -1, -1, -1], 1.0)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("position", [(3, 4, 5), (0, 0, 10), (6, 8, 0)])
def test_training_crops_get_the_distances_the_whole_volume_has_there(axis, position):
    """A crop reaching past the volume's edge is as the whole-volume channels cut the same way."""
    shape, size = (7, 9, 11), (12, 10)
    whole = volume_positions(shape)
    crop = slice_positions(shape, position, axis, size)
    centre = np.delete(np.array(position), axis)
    for channel in range(3):
        expected, inside = crop_centred(np.take(whole[channel], position[axis], axis=axis), centre, size)
        np.testing.assert_allclose(crop[channel][inside], expected[inside], atol=1e-6)
    assert crop.max() > 1.0  # past the edge the distance grows on, it is not cut to the padding's 0


def _content_placed(offset: tuple[int, int, int]) -> np.ndarray:
    volume = np.zeros((40, 44, 48), np.float32)
    content = np.random.default_rng(0).random((8, 10, 12)).astype(np.float32) + 0.5
    z, y, x = offset
    volume[z:z + 8, y:y + 10, x:x + 12] = content
    return volume


def _probabilities_at_content(architecture, offset) -> np.ndarray:
    z, y, x = offset
    probabilities = architecture.predict_probabilities(_content_placed(offset), torch.device("cpu"))
    return probabilities[:, z:z + 8, y:y + 10, x:x + 12]


def test_only_a_network_with_position_channels_sees_where_the_content_sits_in_the_volume():
    torch.manual_seed(0)
    plain = MultiplanarUNet2DArchitecture(2, ["sarcoma_t1_mri"], **TINY)
    torch.manual_seed(0)
    told = MultiplanarUNet2DArchitecture(2, ["sarcoma_t1_mri"], position_channels=True, **TINY)
    assert told.network_channels == plain.network_channels + 3
    centred, off_centre = (16, 17, 18), (9, 10, 11)  # both 8+ voxels (the crop margin) from the edges
    np.testing.assert_allclose(_probabilities_at_content(plain, centred), _probabilities_at_content(plain, off_centre), atol=1e-5)
    assert not np.allclose(_probabilities_at_content(told, centred), _probabilities_at_content(told, off_centre), atol=1e-3)


def test_a_model_with_position_channels_trains_saves_loads_and_segments(tmp_path):
    model, loaded, image = train_small_multiplanar(tmp_path, {**TINY, "position_channels": True})
    assert loaded.architecture.config.position_channels
    assert loaded.architecture.network.state_dict().keys() == model.architecture.network.state_dict().keys()
    result = segment_image(loaded, image, device="cpu")
    assert sitk.GetArrayViewFromImage(result.labels).shape == sitk.GetArrayViewFromImage(image).shape
