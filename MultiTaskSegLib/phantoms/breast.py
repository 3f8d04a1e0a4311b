"""T1-weighted breast MRI (no fat suppression) with the pectoral muscle labelled 1.

Axial slices of a prone patient: the anterior half of the thorax as an elliptic cylinder with its
layers from the skin inwards (subcutaneous fat, pectoralis major, a thin fat plane, ribs with
intercostal muscle, then lungs and the heart in the mediastinum), and two breasts in front of it,
bright fat with darker fibroglandular tissue of random density. The pectoralis major is a curved
band on the chest wall that fades out at the sternum, laterally and below its inferior border.
The anatomy frame is LPS with its origin at the front of the chest at nipple height.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .common import (
    SMALL_MAX_SIDE,
    Scene,
    displacement_field,
    elliptic_cylinder,
    ellipsoid,
    oblique_grid,
    random_rotation,
    random_spacing,
    rician_noise,
    smooth_min,
    smooth_noise,
    smoothstep,
)

PECTORAL_MUSCLE = 1


def _rotation_z(degrees: float) -> np.ndarray:
    angle = np.radians(degrees)
    return np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])


def _rotation_x(degrees: float) -> np.ndarray:
    angle = np.radians(degrees)
    return np.array([[1.0, 0.0, 0.0], [0.0, np.cos(angle), -np.sin(angle)], [0.0, np.sin(angle), np.cos(angle)]])


def generate(rng: np.random.Generator, small: bool) -> tuple[sitk.Image, sitk.Image]:
    # A small body is under a quarter of a real one, its layers (muscle, fat) kept a few voxels thick.
    scale = rng.uniform(0.22, 0.25) if small else rng.uniform(0.92, 1.08)

    def thick(full: tuple[float, float], reduced: tuple[float, float]) -> float:
        return rng.uniform(*(reduced if small else full))

    thorax_semi = np.array([150.0, 105.0]) * scale * rng.uniform(0.93, 1.07, 2)
    thorax_center_y = thorax_semi[1] - 5.0 * scale
    breasts = []
    for side in (-1.0, 1.0):
        offset = rng.uniform(80.0, 100.0) * scale
        surface_y = thorax_center_y - thorax_semi[1] * np.sqrt(max(1.0 - (offset / thorax_semi[0]) ** 2, 0.05))
        semi = np.array([rng.uniform(55, 75), rng.uniform(45, 105), rng.uniform(50, 70)]) * scale
        orientation = _rotation_z(side * rng.uniform(5.0, 20.0)) @ _rotation_x(rng.uniform(-10.0, 5.0))
        center = np.array([side * offset, surface_y + 0.1 * semi[1], rng.uniform(-15.0, 10.0) * scale])
        breasts.append((center, semi, orientation))
    front = min(c[1] - s[1] for c, s, _ in breasts) - 10.0 * scale
    back = thorax_center_y + 0.25 * thorax_semi[1]
    top = max(c[2] + s[2] for c, s, _ in breasts) + 15.0 * scale
    bottom = min(c[2] - s[2] for c, s, _ in breasts) - 15.0 * scale

    # Acquisition: axial slices, thicker than the in-plane pixels; slightly oblique at times.
    spacing = random_spacing(rng, (1.2, 1.35), (1.35, 1.7))
    body_tilt = random_rotation(rng, 4.0)
    anatomy_center = rng.uniform(-30.0, 30.0, 3)
    roi_center = np.array([0.0, (front + back) / 2, (top + bottom) / 2])
    roi_half = np.array([thorax_semi[0] + 8.0 * scale, (back - front) / 2, (top - bottom) / 2])
    grid = oblique_grid(
        rng,
        anatomy_center + body_tilt @ roi_center,
        np.abs(body_tilt) @ roi_half,
        spacing,
        max_tilt_degrees=10.0,
        max_side=SMALL_MAX_SIDE if small else None,
        margin_mm=1.0 if small else 4.0,
        shift_mm=1.0 if small else 5.0,
    )
    displacement = displacement_field(rng, grid, 20.0 if small else 60.0, 1.0 if small else 4.0)
    scene = Scene(grid, anatomy_center, body_tilt, displacement)
    x, y, z = scene.coords()

    fat = 1.0
    muscle = rng.uniform(0.22, 0.32)
    intensity = {
        "fibroglandular": rng.uniform(0.30, 0.45),
        "pectoral": muscle,
        "intercostal": muscle * rng.uniform(0.9, 1.1),
        "bone": rng.uniform(0.40, 0.55),
        "lung": rng.uniform(0.02, 0.05),
        "heart": rng.uniform(0.22, 0.35),
        "mediastinal_fat": rng.uniform(0.85, 0.95),
        "skin": rng.uniform(0.45, 0.6),
    }

    # Body outline: the thorax and the breasts with soft folds where they meet.
    thorax = elliptic_cylinder(x, y, (0.0, thorax_center_y), thorax_semi)
    body = thorax
    breast_shapes = []
    for center, semi, orientation in breasts:
        breast = ellipsoid(x, y, z, center, semi, orientation)
        breast_shapes.append(breast)
        body = smooth_min(body, breast, 18.0 * scale)
        tip = center + orientation @ np.array([0.0, -semi[1], 0.0])
        nipple_semi = np.maximum(np.array([6.0, 5.0, 6.0]) * scale, 1.2)
        box = scene.box(tip - nipple_semi, tip + nipple_semi)
        if box is not None:
            bx, by, bz = scene.coords(box)
            np.minimum(body[box], ellipsoid(bx, by, bz, tip, nipple_semi), out=body[box])
    scene.paint(body, fat)
    skin = 1.0 if small else 1.5

    # Fibroglandular tissue: textured, denser behind the nipple, kept off the skin and the chest wall.
    texture_mm = 3.5 if small else 7.0
    texture = smooth_noise(rng, grid, texture_mm)
    threshold = rng.uniform(-0.2, 1.2)  # higher: fattier breast
    subcutaneous = thick((6.0, 10.0), (1.5, 2.5))
    retromammary = thick((4.0, 10.0), (1.2, 2.0))
    depth = -thorax
    for breast, (_, semi, _) in zip(breast_shapes, breasts):
        centrality = np.clip(-breast / np.float32(semi.min()), 0.0, 1.0)
        textured = (threshold - texture - 1.5 * centrality) * np.float32(texture_mm / 4)
        glands = np.maximum(np.maximum(breast + subcutaneous, depth + retromammary), textured)
        scene.paint(glands, intensity["fibroglandular"])
    del breast_shapes

    # Chest wall layers, by depth below the thorax surface.
    front_fat = thick((3.0, 8.0), (1.3, 2.0))
    front_fat = np.maximum(front_fat + (1.0 if small else 2.0) * smooth_noise(rng, grid, 25.0 if small else 80.0), 1.0)
    across = np.abs(x) / np.float32(scale)  # full-scale millimetres from the midline
    up = z / np.float32(scale)
    inferior_border = rng.uniform(-75.0, -50.0) + 0.35 * across
    profile = (
        smoothstep(12.0, 40.0, across)
        * (1.0 - 0.6 * smoothstep(120.0, 165.0, across))
        * smoothstep(inferior_border, inferior_border + 30.0, up)
        * (1.0 + 0.4 * smoothstep(-10.0, 60.0, up))
        * (1.0 - smoothstep(-0.6, -0.3, (y - np.float32(thorax_center_y)) / np.float32(thorax_semi[1])))
    )
    variation = 1.0 + 0.15 * smooth_noise(rng, grid, 30.0 if small else 90.0)
    muscle_thickness = thick((8.0, 14.0), (4.5, 6.5)) * profile * variation
    del profile, inferior_border, up, variation
    pectoral = np.abs(depth - (front_fat + muscle_thickness / 2)) - muscle_thickness / 2
    scene.paint(pectoral, intensity["pectoral"], PECTORAL_MUSCLE)
    del pectoral
    wall_start = front_fat + np.maximum(muscle_thickness, 0.0) + (1.2 if small else 2.0)
    wall_thickness = thick((12.0, 18.0), (4.0, 5.0))
    scene.paint(wall_start - depth, intensity["intercostal"])
    rib_period = 28.0 * scale if not small else rng.uniform(7.0, 8.5)
    rib_phase = (z + 0.3 * np.abs(x) + np.float32(rng.uniform(0, rib_period))) / np.float32(rib_period)
    across_rib = np.abs(rib_phase - np.round(rib_phase)) * np.float32(rib_period)
    from_wall_middle = np.abs(depth - wall_start - wall_thickness / 2)
    ribs = np.maximum(across_rib - 0.3 * rib_period, from_wall_middle - 0.3 * wall_thickness)
    sternum = np.maximum(np.abs(x) - 14.0 * scale, from_wall_middle - 0.35 * wall_thickness)
    scene.paint(np.minimum(ribs, sternum), intensity["bone"])
    del ribs, sternum, rib_phase, across_rib, across, from_wall_middle
    mediastinum_center = (0.0, thorax_center_y - 10.0 * scale, 0.0)
    mediastinum = ellipsoid(x, y, z, mediastinum_center, np.array([28.0, 60.0, 400.0]) * scale)
    heart_semi = np.array([60.0, 48.0, 55.0]) * scale * rng.uniform(0.9, 1.1)
    heart = ellipsoid(x, y, z, np.array([20.0, thorax_center_y / scale - 5.0, -20.0]) * scale, heart_semi)
    lungs = np.maximum(wall_start + wall_thickness - depth, -np.minimum(mediastinum, heart))
    scene.paint(lungs, intensity["lung"])
    scene.paint(np.maximum(mediastinum, wall_start + wall_thickness - depth), intensity["mediastinal_fat"])
    scene.paint(heart, intensity["heart"])
    del lungs, mediastinum, heart, depth, wall_start, front_fat, muscle_thickness
    scene.paint(np.abs(body + skin / 2) - skin / 2, intensity["skin"])

    # Image formation: receive coils at the breasts (the back darker), bias field, Rician noise.
    coil = np.exp(-np.maximum(y - np.float32(front), 0.0) / np.float32(rng.uniform(150.0, 300.0) * scale))
    bias = np.exp(rng.uniform(0.15, 0.3) * smooth_noise(rng, grid, 40.0 if small else 120.0))
    fat_level = rng.uniform(200.0, 800.0)
    image = scene.image * coil * bias * np.float32(fat_level)
    image = rician_noise(rng, image, rng.uniform(0.01, 0.03) * fat_level)
    return grid.image(image.astype(np.float32)), grid.image(scene.labels)
