"""Random changes to 2-D training slices, so a model learns anatomy rather than one scanner.

Real scans differ from the training set in contrast, bias field, noise, resolution, head size
and pose. Each mini-batch is changed on the fly, a new draw at every step, from the trainer's
seeded random generator (so a run is reproducible and resumes exactly):

- spatial: rotation, isotropic scaling and left-right flips (the tasks here have no left/right classes);
- intensity: gamma, contrast, a smooth multiplicative bias field, Rician noise (also in the air,
  as unmasked scanner images have it);
- resolution: thick slices (1-3x the working spacing) simulated by averaging along one in-plane axis
  and interpolating back, as a 3 mm scan looks once resampled to 1 mm;
- synthesis (Billot et al., SynthSeg 2023): for cases that have a label map and no image, an image
  is drawn from the labels with a random intensity and noise level per label, then blurred.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError


@dataclass(frozen=True)
class SliceAugmentation:
    """How strongly training slices are changed; ``probability`` 0 turns every change off."""

    probability: float = 0.8
    rotation_degrees: float = 15.0
    scale_low: float = 0.85
    scale_high: float = 1.15
    flip_left_right: bool = True
    gamma_log_std: float = 0.3
    contrast_low: float = 0.75
    contrast_high: float = 1.35
    bias_field_log_std: float = 0.3
    noise_low: float = 0.0
    noise_high: float = 0.06
    low_resolution_probability: float = 0.35
    low_resolution_max_factor: float = 3.0
    synthesis_blur_max_voxels: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.probability <= 1.0 or not 0.0 <= self.low_resolution_probability <= 1.0:
            problems.append("probabilities must lie in 0..1")
        if not 0 < self.scale_low <= self.scale_high or not 0 < self.contrast_low <= self.contrast_high:
            problems.append("scale and contrast ranges must be positive with low <= high")
        if not 0 <= self.noise_low <= self.noise_high:
            problems.append("noise range must be non-negative with low <= high")
        if self.low_resolution_max_factor < 1:
            problems.append("low_resolution_max_factor must be at least 1")
        if min(self.rotation_degrees, self.gamma_log_std, self.bias_field_log_std, self.synthesis_blur_max_voxels) < 0:
            problems.append("rotation, gamma, bias and blur strengths must be non-negative")
        if problems:
            raise InputError("augmentation settings: " + "; ".join(problems))

    @classmethod
    def from_arguments(cls, values: Mapping[str, Any] | None) -> "SliceAugmentation":
        """Build from a stored dict, refusing unknown names (a typo would silently do nothing)."""
        values = dict(values or {})
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown augmentation setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    def to_arguments(self) -> dict[str, Any]:
        return asdict(self)


NO_AUGMENTATION = SliceAugmentation(probability=0.0, low_resolution_probability=0.0)


def synthesize_slices(source_labels: np.ndarray, rng: np.random.Generator, blur_max_voxels: float) -> np.ndarray:
    """Images (N, H, W) float32 drawn from label maps (N, H, W) of source label values.

    Each label of each slice gets a random mean and standard deviation (SynthSeg's Gaussian
    mixture); air (label 0) stays dark, as in every real scan. The result is blurred by a random
    Gaussian (partial volume) and scaled so that its 99.5th percentile is 1.
    """
    images = np.empty(source_labels.shape, np.float32)
    for number, labels in enumerate(source_labels):
        values, inverse = np.unique(labels, return_inverse=True)
        means = rng.uniform(0.1, 1.0, size=values.size).astype(np.float32)
        spreads = rng.uniform(0.01, 0.08, size=values.size).astype(np.float32)
        means[values == 0], spreads[values == 0] = 0.0, 0.0
        inverse = inverse.reshape(labels.shape)
        images[number] = means[inverse] + spreads[inverse] * rng.standard_normal(labels.shape).astype(np.float32)
    tensor = torch.from_numpy(np.clip(images, 0, None))[:, None]
    sigma = float(rng.uniform(0.0, blur_max_voxels))
    tensor = gaussian_blur(tensor, sigma)[:, 0]
    return scale_to_percentile(tensor, tensor > 0).numpy()


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, 1, H, W) images; ``sigma`` in pixels (0: unchanged)."""
    if sigma < 0.2:
        return images
    radius = max(1, int(math.ceil(2.5 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    images = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(images, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))


def scale_to_percentile(images: torch.Tensor, inside: torch.Tensor, percentile: float = 99.5) -> torch.Tensor:
    """Divide each image by its ``percentile`` over ``inside`` pixels (as ``mr_percentile`` does per volume)."""
    scaled = images.clone()
    for number in range(images.shape[0]):
        values = images[number][inside[number]]
        if values.numel():
            scaled[number] = images[number] / torch.quantile(values.float(), percentile / 100).clamp_min(1e-6)
    return scaled


def augment_slices(
    images: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    rng: np.random.Generator,
    settings: SliceAugmentation,
    flippable: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Change a batch of slices: images (N, 1, H, W) float, labels (N, H, W) int, valid (N, H, W) bool.

    ``flippable[i]`` says whether slice ``i``'s last axis is the left-right axis (not so for
    sagittal slices). Every random number comes from ``rng``.
    """
    count = images.shape[0]
    chosen = rng.random(count) < settings.probability
    if not chosen.any():
        return images, labels, valid
    images, labels, valid = images.clone(), labels.clone(), valid.clone()
    index = torch.from_numpy(np.flatnonzero(chosen))
    part_images, part_labels, part_valid = _spatial(images[index], labels[index], valid[index], rng, settings)
    if settings.flip_left_right and flippable is not None:
        flips = torch.from_numpy(flippable[chosen] & (rng.random(int(chosen.sum())) < 0.5))
        part_images[flips] = part_images[flips].flip(-1)
        part_labels[flips] = part_labels[flips].flip(-1)
        part_valid[flips] = part_valid[flips].flip(-1)
    part_images = _low_resolution(part_images, rng, settings)
    part_images = _intensity(part_images, rng, settings)
    images[index], labels[index], valid[index] = part_images, part_labels, part_valid
    return images, labels, valid


def _spatial(images, labels, valid, rng, settings):
    count = images.shape[0]
    angles = np.deg2rad(rng.uniform(-settings.rotation_degrees, settings.rotation_degrees, count))
    scales = rng.uniform(settings.scale_low, settings.scale_high, count)
    theta = np.zeros((count, 2, 3), np.float32)
    theta[:, 0, 0] = np.cos(angles) / scales
    theta[:, 0, 1] = -np.sin(angles) / scales
    theta[:, 1, 0] = np.sin(angles) / scales
    theta[:, 1, 1] = np.cos(angles) / scales
    grid = F.affine_grid(torch.from_numpy(theta), list(images.shape), align_corners=False)
    moved = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    stacked = torch.stack([labels.float(), valid.float()], dim=1)
    moved_masks = F.grid_sample(stacked, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return moved, moved_masks[:, 0].round().to(labels.dtype), moved_masks[:, 1] > 0.5


def _low_resolution(images, rng, settings):
    """Thick slices along one in-plane axis: box-average down by a factor of 1-3, linear back up."""
    height, width = images.shape[-2:]
    for number in np.flatnonzero(rng.random(images.shape[0]) < settings.low_resolution_probability):
        factor = rng.uniform(1.0, settings.low_resolution_max_factor)
        axis = int(rng.integers(2))
        size = [height, width]
        size[axis] = max(2, int(round(size[axis] / factor)))
        single = images[number : number + 1]
        coarse = F.interpolate(single, size=size, mode="area")
        images[number : number + 1] = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return images


def _intensity(images, rng, settings):
    count, _, height, width = images.shape
    scale = images.flatten(1).amax(dim=1).clamp_min(1e-6).view(count, 1, 1, 1)
    gammas = torch.from_numpy(np.exp(rng.normal(0.0, settings.gamma_log_std, count)).astype(np.float32))
    images = (images.clamp_min(0) / scale) ** gammas.view(count, 1, 1, 1) * scale
    coarse = torch.from_numpy(rng.normal(0.0, settings.bias_field_log_std, (count, 1, 4, 4)).astype(np.float32))
    bias = torch.exp(F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True))
    contrast = torch.from_numpy(rng.uniform(settings.contrast_low, settings.contrast_high, count).astype(np.float32))
    images = images * bias * contrast.view(count, 1, 1, 1)
    sigma = torch.from_numpy(rng.uniform(settings.noise_low, settings.noise_high, count).astype(np.float32)).view(count, 1, 1, 1)
    real = torch.from_numpy(rng.standard_normal(images.shape).astype(np.float32))
    imaginary = torch.from_numpy(rng.standard_normal(images.shape).astype(np.float32))
    return torch.sqrt((images + sigma * real) ** 2 + (sigma * imaginary) ** 2)
