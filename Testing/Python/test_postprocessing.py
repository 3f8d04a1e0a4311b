"""Keeping the largest connected region of a task that expects one lesion per scan, and the region
segmented where the network is nowhere sure of a tumour that the crop holds."""

from __future__ import annotations

import dataclasses

import numpy as np
import SimpleITK as sitk

from MultiTaskSegLib.postprocessing import keep_largest_region, keep_largest_regions, segment_unsure_regions
from MultiTaskSegLib.tasks import LabelSpace, UnsureRegion, get_task


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


# -- a crop around one tumour where the network is nowhere sure ------------------------------------

def _unsure_sarcoma_space(confident: float = 0.9, threshold: float = 0.1) -> LabelSpace:
    task = dataclasses.replace(get_task("sarcoma_t1_mri"), unsure_region=UnsureRegion(confident, threshold))
    return LabelSpace((task,))


def _probabilities(tumour: np.ndarray) -> np.ndarray:
    """Background and one class, summing to one."""
    return np.stack([1.0 - tumour, tumour]).astype(np.float32)


def test_a_scan_the_network_is_unsure_of_gets_the_region_around_its_most_probable_voxel():
    space = _unsure_sarcoma_space()
    tumour = np.zeros((12, 20, 20), np.float32)
    tumour[3:9, 5:15, 5:15] = 0.2  # the tumour, which the network finds only faintly
    tumour[5:7, 9:11, 9:11] = 0.6  # its most probable part: all that passes an operating point of 0.35
    tumour[10:12, 0:3, 0:3] = 0.15  # an unrelated faint island (above 0.1 too)
    labels = (tumour >= 0.35).astype(np.uint8)
    warnings = segment_unsure_regions(labels, _probabilities(tumour), np.array([0, 1]), _grid(labels.shape), space,
                                      ["sarcoma_t1_mri"])
    expected = np.zeros_like(labels)
    expected[3:9, 5:15, 5:15] = 1
    np.testing.assert_array_equal(labels, expected)  # grown to the faint tumour, the island left out
    assert len(warnings) == 1 and "unsure" in warnings[0] and "0.60 < 0.9" in warnings[0]
    assert f"{6 * 10 * 10 * 2.0 / 1000:.1f} ml" in warnings[0]


def test_a_sure_scan_and_a_task_without_the_rule_are_untouched():
    tumour = np.zeros((12, 20, 20), np.float32)
    tumour[3:9, 5:15, 5:15] = 0.2
    tumour[5:7, 9:11, 9:11] = 0.95  # sure somewhere: the operating point's result stands
    labels = (tumour >= 0.35).astype(np.uint8)
    before = labels.copy()
    assert segment_unsure_regions(labels, _probabilities(tumour), np.array([0, 1]), _grid(labels.shape),
                                  _unsure_sarcoma_space(), ["sarcoma_t1_mri"]) == []
    np.testing.assert_array_equal(labels, before)
    tumour[5:7, 9:11, 9:11] = 0.6
    plain = LabelSpace.from_names(["sarcoma_ct"])
    assert plain.task("sarcoma_ct").unsure_region is None
    assert segment_unsure_regions(labels, _probabilities(tumour), np.array([0, 1]), _grid(labels.shape), plain,
                                  ["sarcoma_ct"]) == []
    np.testing.assert_array_equal(labels, before)


def test_the_unsure_region_takes_no_voxel_of_another_task_and_nothing_faint_stays_empty():
    space = LabelSpace((dataclasses.replace(get_task("sarcoma_t1_mri"), unsure_region=UnsureRegion(0.9, 0.1)),
                        get_task("sarcoma_ct")))
    mr_class, ct_class = space.indices_for_task("sarcoma_t1_mri")[0], space.indices_for_task("sarcoma_ct")[0]
    mr = np.zeros((8, 10, 10), np.float32)
    mr[2:6, 2:8, 2:8] = 0.3
    mr[3, 4, 4] = 0.5
    ct = np.zeros_like(mr)
    ct[2:6, 2:8, 6:8] = 0.6  # the other task's class holds part of the faint region
    probabilities = np.stack([1.0 - mr - ct, mr, ct]).astype(np.float32)
    labels = np.zeros(mr.shape, np.uint8)
    labels[ct > 0] = ct_class
    segment_unsure_regions(labels, probabilities, np.array([0, mr_class, ct_class]), _grid(labels.shape), space,
                           ["sarcoma_t1_mri", "sarcoma_ct"])
    assert (labels == ct_class).sum() == 4 * 6 * 2  # kept
    assert (labels == mr_class).sum() == 4 * 6 * 4  # the faint region (p / (p + background) >= 0.1) elsewhere
    nothing = np.full((1, 4, 4, 4), 0.05, np.float32)
    empty = np.zeros((4, 4, 4), np.uint8)
    assert segment_unsure_regions(empty, np.concatenate([1 - nothing, nothing]), np.array([0, 1]), _grid(empty.shape),
                                  _unsure_sarcoma_space(), ["sarcoma_t1_mri"]) == []
    assert not empty.any()
