"""Does a result look like the training data? Warnings instead of confident nonsense.

A network always answers, even for a scan it was never made for (a CT given to an MR model, a knee
given to a brain model, a few slices through the skull). The cheapest sign that the answer is
nonsense is the size of what it found: the trainer stores, per class, the range of volumes in its
training cases, and a result whose class volume falls far outside that range gets a warning that
says which class and what was expected.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

#: A volume below ``LOW_FACTOR`` x the smallest, or above ``HIGH_FACTOR`` x the largest training volume is implausible.
LOW_FACTOR = 0.5
HIGH_FACTOR = 1.5
CARD_KEY = "class_volumes_ml"


def training_volume_ranges(cases, label_space) -> dict[str, dict[str, list[float]]]:
    """Per task and class, the [smallest, largest] volume in mL over the training cases of that task
    (prepared cases, whose voxels have their task's working spacing)."""
    ranges: dict[str, dict[str, list[float]]] = {}
    for case in cases:
        voxel_ml = float(label_space.task(case.task).working_spacing_mm) ** 3 / 1000.0
        counts = np.bincount(case.labels.ravel().astype(np.int64), minlength=len(label_space))
        for index in label_space.indices_for_task(case.task):
            name = label_space.entries[index].class_spec.name
            volume = float(counts[index]) * voxel_ml
            low, high = ranges.setdefault(case.task, {}).get(name, [volume, volume])
            ranges[case.task][name] = [round(min(low, volume), 2), round(max(high, volume), 2)]
    return ranges


def implausible_volumes(labels: sitk.Image, label_space, tasks: Sequence[str],
                        ranges: Mapping[str, Mapping[str, Sequence[float]]]) -> list[str]:
    """Warnings for requested classes whose volume in ``labels`` (label-space indices) lies outside
    the training range widened by :data:`LOW_FACTOR`/:data:`HIGH_FACTOR`."""
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel().astype(np.int64), minlength=len(label_space))
    warnings = []
    for task in tasks:
        if not label_space.task(task).check_volumes:
            continue
        expected = ranges.get(task, {})
        odd = []
        for index in label_space.indices_for_task(task):
            name = label_space.entries[index].class_spec.name
            if name not in expected:
                continue
            low, high = expected[name]
            volume = float(counts[index]) * voxel_ml
            if volume < LOW_FACTOR * low or volume > HIGH_FACTOR * high:
                odd.append(f"{name} {volume:.1f} mL (training: {low:.1f}-{high:.1f} mL)")
        if odd:
            warnings.append(
                f"the result for {task} does not look like the training data: {'; '.join(odd)}. The scan may be of "
                "another modality or body part, or its field of view may not hold these structures; check it "
                "before use"
            )
    return warnings
