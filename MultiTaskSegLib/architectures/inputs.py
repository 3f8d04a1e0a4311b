"""Checks of the arrays the architectures are given and centred crops of them for training (the
bounding box of their non-zero voxels is :func:`~MultiTaskSegLib.preprocessing.nonzero_box`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputError


def crop_centred(array: np.ndarray, centre: Sequence[int], size: Sequence[int], fill: float = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``size`` box of ``array`` starting ``size // 2`` before ``centre``, and a mask of the part
    inside ``array``; the part outside is ``fill``."""
    crop = np.full(tuple(size), fill, dtype=array.dtype)
    inside = np.zeros(tuple(size), dtype=bool)
    source, target = [], []
    for middle, side, length in zip(centre, size, array.shape):
        start = int(middle) - side // 2
        low, high = max(start, 0), min(start + side, length)
        source.append(slice(low, max(low, high)))
        target.append(slice(low - start, max(low, high) - start))
    crop[tuple(target)] = array[tuple(source)]
    inside[tuple(target)] = True
    return crop, inside


def check_volume(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3:
        raise InputError(f"expected one single-channel (z, y, x) volume, got an array of shape {image.shape}; choose one channel")
    if min(image.shape) < 1:
        raise InputError(f"the volume is empty (shape {image.shape})")
    return image.astype(np.float32, copy=False)


def check_channels(image: np.ndarray, in_channels: int) -> np.ndarray:
    """``(channels, z, y, x)`` float32 from a ``(z, y, x)`` volume (one channel) or a channel stack."""
    image = np.asarray(image)
    if image.ndim == 3 and in_channels == 1:
        image = image[None]
    if image.ndim != 4 or image.shape[0] != in_channels:
        raise InputError(f"expected {in_channels} channel(s) of one (z, y, x) volume, got an array of shape {image.shape}")
    if min(image.shape[1:]) < 1:
        raise InputError(f"the volume is empty (shape {image.shape[1:]})")
    return image.astype(np.float32, copy=False)


def as_ints(values: Sequence[Any], count: int, what: str) -> tuple[int, ...]:
    values = tuple(int(value) for value in values)
    if len(values) != count or min(values) < 1:
        raise InputError(f"{what} needs {count} positive sides, got {list(values)}")
    return values

