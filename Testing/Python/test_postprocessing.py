"""Keeping the largest connected region of a task that expects one lesion per scan."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from MultiTaskSegLib.postprocessing import keep_largest_region, keep_largest_regions
from MultiTaskSegLib.tasks import LabelSpace, get_task


def _grid(shape, spacing=(2.0, 1.0, 1.0)) -> sitk.Image:
    image = sitk.Image(list(reversed(shape)), sitk.sitkUInt8)
    image.SetSpacing(spacing)
    return image


def test_an_island_away_from_the_tumour_is_removed_and_reported():
    space = LabelSpace.from_names(["brats_glioma_t1c"])
    assert get_task("brats_glioma_t1c").largest_component
    labels = np.zeros((20, 30, 30), np.uint8)
    oedema, core = space.indices_for_task("brats_glioma_t1c")[1:3]
    labels[5:12, 5:15, 5:15] = oedema
    labels[7:10, 8:12, 8:12] = core  # inside the oedema: one region of two classes, kept whole
    labels[15:17, 25:27, 25:27] = core  # a far island of 8 voxels
    warnings = keep_largest_regions(labels, _grid(labels.shape), space, ["brats_glioma_t1c"])
    assert labels[15:17, 25:27, 25:27].max() == 0
    assert (labels == core).sum() == 3 * 4 * 4 and (labels == oedema).sum() == 7 * 10 * 10 - 3 * 4 * 4
    assert len(warnings) == 1 and "removed 1 smaller one(s) of 0.0 ml" in warnings[0]


def test_regions_touching_at_a_corner_are_one_region_and_a_task_without_the_option_is_untouched():
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    labels[3, 3, 3] = 1  # touches the cube at a corner only
    assert keep_largest_region(labels, _grid(labels.shape), [1]) == (0, 0.0)
    space = LabelSpace.from_names(["brain_t1_mri"])
    assert not get_task("brain_t1_mri").largest_component
    brain = np.zeros((10, 10, 10), np.uint8)
    brain[1:3, 1:3, 1:3] = 1
    brain[7:9, 7:9, 7:9] = 1
    before = brain.copy()
    assert keep_largest_regions(brain, _grid(brain.shape), space, ["brain_t1_mri"]) == []
    np.testing.assert_array_equal(brain, before)


def test_the_removed_volume_is_counted_in_millilitres():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[0:5, 0:5, 0:5] = 1
    labels[8:10, 8:10, 8:10] = 1  # 8 voxels of 2 mm^3
    assert keep_largest_region(labels, _grid(labels.shape), [1]) == (1, 8 * 2.0 / 1000.0)
