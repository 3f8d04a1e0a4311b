"""Skull-stripped T1 brain MRI with the six tissues of Moeskops et al. 2017, in FreeSurfer aseg labels.

The cerebrum is a deformed ellipsoid with temporal lobes. Its cortex is a grey-matter ribbon of
constant thickness around every CSF space: the outer surface, sulci (the zero sheets of a smooth
random field, cut in to a limited depth) and the interhemispheric fissure down to the corpus
callosum, so white matter forms folded gyral cores. Deep grey matter and ventricles sit centrally,
the cerebellum (cortex folded into folia around a white-matter core) posterior-inferiorly behind
the brain stem. The anatomy frame is LPS with its origin near the centre of the cerebrum.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .common import (
    SMALL_MAX_SIDE,
    Scene,
    displacement_field,
    ellipsoid,
    left_right,
    oblique_grid,
    random_rotation,
    rician_noise,
    smooth_min,
    smooth_noise,
)

# FreeSurfer aseg values: (left, right) pairs, single values for midline structures.
WHITE_MATTER = (2, 41)
CORTEX = (3, 42)
LATERAL_VENTRICLE = (4, 43)
CEREBELLUM_WHITE_MATTER = (7, 46)
CEREBELLUM_CORTEX = (8, 47)
THALAMUS = (10, 49)
CAUDATE = (11, 50)
PUTAMEN = (12, 51)
PALLIDUM = (13, 52)
VENTRAL_DC = (28, 60)
THIRD_VENTRICLE = 14
FOURTH_VENTRICLE = 15
BRAIN_STEM = 16


def generate(rng: np.random.Generator, small: bool) -> tuple[sitk.Image, sitk.Image]:
    # A small brain is about a third of a real one, but tissue layers keep (nearly) their real
    # thickness so that every class stays several voxels thick.
    scale = rng.uniform(0.30, 0.33) if small else rng.uniform(0.88, 1.0)

    def at(*position: float) -> np.ndarray:
        return np.array(position) * scale

    def sized(*semi_axes: float, floor: float = 1.7) -> tuple[float, ...]:
        return tuple(max(s * scale, floor if small else 0.0) for s in semi_axes)

    # Acquisition: near 1 mm voxels, often one axis coarser; the head tilted, the grid oblique.
    spacing = [rng.uniform(0.95, 1.05)] * 3
    if rng.random() < 0.6:
        spacing[int(rng.integers(3))] *= rng.uniform(1.15, 1.3)
    head_tilt = random_rotation(rng, 5.0 if small else 8.0)
    anatomy_center = rng.uniform(-20.0, 20.0, 3)
    # Field of view: the whole brain; a small one may lose the lower medulla.
    z_low = -60.0 if small else -80.0
    roi_center = at(0.0, -1.0, (z_low + 61.0) / 2)
    roi_half = at(72.0, 88.0, (61.0 - z_low) / 2)
    grid = oblique_grid(
        rng,
        anatomy_center + head_tilt @ roi_center,
        np.abs(head_tilt) @ roi_half,
        spacing,
        max_tilt_degrees=8.0 if small else 15.0,
        max_side=SMALL_MAX_SIDE if small else None,
        margin_mm=1.0 if small else 5.0,
        shift_mm=0.5 if small else 3.0,
    )
    displacement = displacement_field(rng, grid, 15.0 if small else 40.0, 1.0 if small else 3.0)
    scene = Scene(grid, anatomy_center, head_tilt, displacement)
    x, y, z = scene.coords()

    def labels_lr(pair: tuple[int, int], box=None) -> np.ndarray:
        return left_right(x if box is None else scene.x[box], *pair)

    # Tissue properties of this case.
    cortex_thickness = rng.uniform(2.2, 2.6) if small else rng.uniform(2.4, 3.0)
    sulcus_spacing = rng.uniform(9.0, 11.0) if small else rng.uniform(10.0, 13.0)
    sulcus_depth = rng.uniform(2.5, 3.5) if small else rng.uniform(12.0, 18.0)
    sulcus_half_width = 0.6 if small else 0.5
    fissure_half_width = 0.7 if small else 1.0
    csf_rim = 1.0 if small else 1.5
    tentorium_gap = 1.2 if small else 2.0
    ventricle_size = rng.uniform(0.85, 1.6)
    stretch = rng.uniform(0.95, 1.05, 3)
    intensity = {
        "wm": 1.0,
        "gm": rng.uniform(0.58, 0.68),
        "csf": rng.uniform(0.12, 0.22),
        "thalamus": rng.uniform(0.80, 0.86),
        "caudate": rng.uniform(0.68, 0.74),
        "putamen": rng.uniform(0.72, 0.78),
        "pallidum": rng.uniform(0.84, 0.90),
        "ventral_dc": rng.uniform(0.86, 0.92),
        "brain_stem": rng.uniform(0.86, 0.94),
        "cerebellum_wm": rng.uniform(0.90, 0.97),
    }
    intensity["cerebellum_gm"] = intensity["gm"] - 0.02

    # Outer shapes.
    cerebrum_semi = at(68.0, 84.0, 58.0) * stretch
    hemispheres = ellipsoid(x, y, z, (0.0, 0.0, 0.0), cerebrum_semi)
    for side in (-1.0, 1.0):
        temporal = ellipsoid(x, y, z, at(44.0 * side, -6.0, -24.0), at(24.0, 40.0, 22.0))
        hemispheres = smooth_min(hemispheres, temporal, 8.0 * scale)
    cerebellum_center = at(0.0, 52.0, -44.0)
    cerebellum_semi = at(54.0, 32.0, 26.0) * stretch
    cerebellum = ellipsoid(x, y, z, cerebellum_center, cerebellum_semi)
    stem_points = np.array([at(0, 8, -8), at(0, 14, -34), at(0, 20, -58), at(0, 23, -78)])
    stem_radii = np.array([sized(10.0)[0], sized(13.0)[0], sized(9.0)[0], sized(8.0)[0]])
    brain_stem = scene.polyline(stem_points, stem_radii)
    lower_stem = scene.polyline(
        np.array([at(0, 16, -40), *stem_points[2:]]), np.array([sized(12.0)[0], *stem_radii[2:]]) + tentorium_gap
    )
    cerebrum = np.maximum(hemispheres, -(cerebellum - tentorium_gap))
    np.maximum(cerebrum, -lower_stem, out=cerebrum)
    del hemispheres, lower_stem

    # Skull-stripped brain: the brain and a thin rim of CSF; nothing outside.
    brain_mask = np.minimum(np.minimum(cerebrum, cerebellum), brain_stem) - csf_rim
    scene.paint(brain_mask, intensity["csf"])
    support = brain_mask < scene.edge_mm / 2

    # Cerebral cortex: a ribbon of constant thickness around the outside, the sulci and the fissure.
    sulcal_distance = _radial_sulci(rng, scene, cerebrum_semi + 10.0 * scale, sulcus_spacing, 1.0 if small else 2.0)
    # The corpus callosum arches under the fissure; in front of and behind it the fissure goes through.
    callosum_y, callosum_half_length, callosum_top = -2.0 * scale, 36.0 * scale, 26.0 * scale
    fissure_floor = callosum_top * (1.0 - ((y - callosum_y) / callosum_half_length) ** 2)
    fissure = np.maximum(np.abs(x) - fissure_half_width, fissure_floor - z)
    del fissure_floor
    # Sulci cut in from the outer and the medial surface alike.
    depth = np.minimum(-cerebrum, fissure)
    sulci = np.maximum(np.abs(sulcal_distance) - sulcus_half_width, depth - sulcus_depth)
    # No sulci near the centre, where the sheets would crowd (around the brain stem's cistern).
    central = np.sqrt((x / cerebrum_semi[0]) ** 2 + (y / cerebrum_semi[1]) ** 2 + (z / cerebrum_semi[2]) ** 2)
    np.maximum(sulci, (0.55 - central) * np.float32(np.mean(cerebrum_semi)), out=sulci)
    del central, sulcal_distance
    tissue = np.maximum(np.maximum(cerebrum, -sulci), -fissure)
    del sulci, fissure, depth
    scene.paint(tissue, intensity["gm"], labels_lr(CORTEX))
    scene.paint(tissue + cortex_thickness, intensity["wm"], labels_lr(WHITE_MATTER))
    del tissue, cerebrum

    # Deep grey matter, then the ventricles beside and between it.
    for side in (-1.0, 1.0):
        for center, semi, value, pair in (
            (at(25.0 * side, -4.0, 0.0), sized(6.5, 19.0, 11.0), "putamen", PUTAMEN),
            (at(18.0 * side, -3.0, -1.0), sized(3.5, 9.0, 6.0, floor=1.5), "pallidum", PALLIDUM),
            (at(10.0 * side, 4.0, -10.0), sized(7.0, 10.0, 5.0), "ventral_dc", VENTRAL_DC),
            (at(11.0 * side, 9.0, 2.0), sized(10.0, 17.0, 11.0), "thalamus", THALAMUS),
        ):
            box = scene.box(np.array(center) - semi, np.array(center) + semi)
            bx, by, bz = scene.coords(box)
            scene.paint(ellipsoid(bx, by, bz, center, semi), intensity[value], labels_lr(pair, box), box)
        caudate = scene.polyline(
            np.array([at(17.0 * side, -17.0, 10.0), at(19.0 * side, 0.0, 17.0), at(21.0 * side, 16.0, 18.0)]),
            np.array([sized(7.5)[0], sized(4.5, floor=1.5)[0], sized(2.5, floor=1.2)[0]]),
        )
        scene.paint(caudate, intensity["caudate"], labels_lr(CAUDATE))

    def ventricle_radius(radius: float, floor: float = 1.7) -> float:
        return max(radius * scale * ventricle_size, floor if small else 1.0)

    for side in (-1.0, 1.0):
        lateral = scene.polyline(
            np.array([at(9.0 * side, -30.0, 10.0), at(10.0 * side, -18.0, 14.0), at(11.0 * side, 0.0, 17.0),
                      at(14.0 * side, 18.0, 16.0), at(19.0 * side, 30.0, 10.0), at(16.0 * side, 44.0, 6.0)]),
            np.array([ventricle_radius(3.5), ventricle_radius(5.0), ventricle_radius(5.5),
                      ventricle_radius(5.0), ventricle_radius(6.0), ventricle_radius(2.5, 1.2)]),
        )
        scene.polyline(
            np.array([at(19.0 * side, 30.0, 10.0), at(28.0 * side, 22.0, -6.0), at(31.0 * side, 6.0, -18.0)]),
            np.array([ventricle_radius(5.0), ventricle_radius(3.5, 1.2), ventricle_radius(2.5, 1.0)]),
            sd=lateral,
        )
        scene.paint(lateral, intensity["csf"], labels_lr(LATERAL_VENTRICLE))
    third_center = at(0.0, 4.0, 1.0)
    third_semi = (max(1.6 * scale * ventricle_size, 1.2), *sized(12.0, 9.0))
    scene.paint(ellipsoid(x, y, z, third_center, third_semi), intensity["csf"], THIRD_VENTRICLE)

    # Cerebellum: folia are sheets fanning out from its centre in the sagittal plane, cut in from the
    # surface; the cortex is a ribbon around them and the white matter the branching core.
    folium_spacing = 3.0 if small else 4.5
    folium_depth = 3.5 if small else 0.55 * min(cerebellum_semi[1:])
    cerebellar_cortex_thickness = 1.9 if small else 2.5
    box = scene.box(cerebellum_center - cerebellum_semi, cerebellum_center + cerebellum_semi)
    bx, by, bz = scene.coords(box)
    sagittal_y, sagittal_z = by - np.float32(cerebellum_center[1]), bz - np.float32(cerebellum_center[2])
    mean_radius = float(np.mean(cerebellum_semi[1:]))
    sheets = max(round(2 * np.pi * mean_radius / folium_spacing), 6)
    wiggle = 0.8 * smooth_noise(rng, grid, 12.0 if small else 20.0)[box]
    phase = np.arctan2(sagittal_z, sagittal_y) * np.float32(sheets / (2 * np.pi)) + wiggle
    sheet = np.round(phase)
    sheet_distance = np.abs(phase - sheet) * np.hypot(sagittal_y, sagittal_z) * np.float32(2 * np.pi / sheets)
    # Deep fissures alternate with shallow ones at random, so the white matter branches like a tree.
    depths = (folium_depth * rng.uniform(0.3, 1.0, sheets)).astype(np.float32)
    sheet_depth = depths[np.mod(sheet, sheets).astype(np.intp)]
    fissures = np.maximum(sheet_distance - (0.4 if small else 0.5), -cerebellum[box] - sheet_depth)
    cerebellar_tissue = np.maximum(cerebellum[box], -fissures)
    del fissures, sheet_distance, sheet_depth, sheet, phase, wiggle
    scene.paint(cerebellar_tissue, intensity["cerebellum_gm"], labels_lr(CEREBELLUM_CORTEX, box), box)
    scene.paint(
        cerebellar_tissue + cerebellar_cortex_thickness,
        intensity["cerebellum_wm"],
        labels_lr(CEREBELLUM_WHITE_MATTER, box),
        box,
    )
    scene.paint(brain_stem, intensity["brain_stem"], BRAIN_STEM)
    fourth_center, fourth_semi = at(0.0, 27.0, -42.0), sized(6.0, 3.0, 7.0, floor=1.3)
    box = scene.box(fourth_center - np.array(fourth_semi), fourth_center + np.array(fourth_semi))
    bx, by, bz = scene.coords(box)
    scene.paint(ellipsoid(bx, by, bz, fourth_center, fourth_semi), intensity["csf"], FOURTH_VENTRICLE, box)

    # Image formation: smooth multiplicative bias, Rician noise, zero outside the stripped brain.
    bias = np.exp(rng.uniform(0.05, 0.2) * smooth_noise(rng, grid, 35.0 if small else 90.0))
    white_matter_level = rng.uniform(80.0, 140.0)
    image = scene.image * bias * np.float32(white_matter_level)
    image = rician_noise(rng, image, rng.uniform(0.015, 0.045) * white_matter_level)
    image[~support] = 0.0
    labels = scene.labels
    labels[~support] = 0
    return grid.image(image.astype(np.float32)), grid.image(labels)


def _radial_sulci(
    rng: np.random.Generator, scene: Scene, half_extent: np.ndarray, spacing_mm: float, sample_mm: float
) -> np.ndarray:
    """Signed distance (mm) to sulcal sheets that radiate from the centre of the cerebrum.

    The sheets are the zero set of a band-limited random field that depends on direction only
    (a sum of plane waves over a sphere), so they meet the brain surface about perpendicularly,
    like sulci, and lie about ``spacing_mm`` apart on it. Computed on a coarse grid of the
    anatomy frame and sampled linearly; the signed value is near linear across a sheet.
    """
    axes = [np.arange(-h, h + sample_mm, sample_mm, dtype=np.float32) for h in half_extent]
    grid = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij", sparse=True)[::-1]
    # Bend the sheets: take directions from smoothly displaced points.
    bend_waves = rng.standard_normal((3, 6, 3)) * (2 * np.pi / (3.0 * spacing_mm))
    bend_phases = rng.uniform(0.0, 2 * np.pi, (3, 6))
    x, y, z = (
        grid[axis]
        + np.float32(0.35 * spacing_mm / np.sqrt(6))
        * sum(np.cos(sum(np.float32(w) * g for w, g in zip(wave, grid)) + np.float32(phase))
              for wave, phase in zip(bend_waves[axis], bend_phases[axis]))
        for axis in range(3)
    )
    radius = np.sqrt(x * x + y * y + z * z) + np.float32(1e-3)
    directions = (x / radius, y / radius, z / radius)
    sphere_radius = float(np.mean(half_extent))
    waves = rng.standard_normal((24, 3))
    waves *= (2 * np.pi / (2.0 * spacing_mm)) * sphere_radius / np.linalg.norm(waves, axis=1, keepdims=True)
    phases = rng.uniform(0.0, 2 * np.pi, len(waves))
    amplitudes = rng.standard_normal(len(waves))
    field = np.zeros(radius.shape, dtype=np.float32)
    gradient = [np.zeros(radius.shape, dtype=np.float32) for _ in range(3)]
    for wave, phase, amplitude in zip(waves, phases, amplitudes):
        argument = sum(np.float32(w) * d for w, d in zip(wave, directions)) + np.float32(phase)
        field += np.float32(amplitude) * np.cos(argument)
        slope = np.float32(-amplitude) * np.sin(argument)
        for axis in range(3):
            gradient[axis] += slope * np.float32(wave[axis])
    # Only the part of the gradient along the sphere matters; per unit of arc at this radius.
    radial = sum(g * d for g, d in zip(gradient, directions))
    tangential = np.sqrt(sum((g - radial * d) ** 2 for g, d in zip(gradient, directions)))
    distance = field / np.maximum(tangential, np.float32(1e-3)) * radius
    origin = [float(axis[0]) for axis in axes]
    return scene.resample(distance, origin, (sample_mm,) * 3)
