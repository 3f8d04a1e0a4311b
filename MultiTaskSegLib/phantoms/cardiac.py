"""Contrast-enhanced cardiac CT angiography, in Hounsfield units, with the coronary arteries labelled 1.

The heart is built in its own frame (u anterior, v to the patient's left, w along the long axis
from the base to the apex): ventricles and atria as clipped ellipsoids meeting at the
atrioventricular groove, interventricular grooves, four contrast-filled chambers, the aortic root
and pulmonary trunk, all wrapped in epicardial fat in the mediastinum between the lungs. The
coronary arteries (left main, LAD with diagonals, circumflex with marginals, RCA with the
posterior descending artery) are tapering, tortuous tubes in the fat on the myocardial surface,
following the grooves; as bright as the blood pool, and the only labelled structure. Airways
bring air at -1000 HU into every field of view. The anatomy frame is LPS with its origin at the
centre of the heart's base.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .common import (
    SMALL_MAX_SIDE,
    Scene,
    correlated_noise,
    elliptic_cylinder,
    ellipsoid,
    oblique_grid,
    random_rotation,
    random_spacing,
    smooth_min,
    smooth_noise,
)

CORONARY_ARTERY = 1
AIR = -1000.0


class _Heart:
    """Heart geometry in the heart frame; every size in mm, already scaled for this case."""

    def __init__(self, rng: np.random.Generator, scale: float, small: bool):
        self.scale = scale
        apex = random_rotation(rng, 12.0) @ np.array([0.55, -0.45, -0.70])
        apex /= np.linalg.norm(apex)
        anterior = np.array([0.0, -1.0, 0.0]) - np.dot([0.0, -1.0, 0.0], apex) * apex
        anterior /= np.linalg.norm(anterior)
        left = np.cross(apex, anterior)
        if left[0] < 0:
            left = -left
        self.axes = np.column_stack([anterior, left, apex])  # heart (u, v, w) -> anatomy
        self.length = 85.0 * scale * rng.uniform(0.9, 1.1)
        self.radius = 45.0 * scale * rng.uniform(0.9, 1.1)

        def floor(value: float, least: float) -> float:  # keeps small hearts' walls a few voxels thick
            return max(value, least) if small else value

        self.groove_depth = 0.05
        self.anterior_groove = np.radians(rng.uniform(18.0, 32.0))
        self.posterior_groove = np.radians(rng.uniform(-165.0, -150.0))
        self.epicardial_fat = 1.3 if small else rng.uniform(1.5, 4.0) * scale
        self.septum = floor(0.2 * self.radius, 1.6)
        self.right_wall = floor(0.09 * self.radius, 1.0)
        self.atrial_wall = floor(2.5 * scale, 0.9)

    def outline(self) -> np.ndarray:
        """Points (heart frame) on the ventricles and atria, with their epicardial fat."""
        theta, phi = np.meshgrid(np.linspace(0.0, np.pi, 13), np.linspace(-np.pi, np.pi, 24), indexing="ij")
        sphere = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], -1).reshape(-1, 3)
        fat = 1.5 * self.epicardial_fat
        r = self.radius
        ventricles = sphere * (np.array([r, 0.92 * r, self.length]) + fat)
        ventricles = ventricles[ventricles[:, 2] > -3.0 * self.scale]
        atria = sphere * (np.array([0.8 * r, 0.95 * r, 32.0 * self.scale]) + fat) + [-0.25 * r, 0.0, -20.0 * self.scale]
        return np.vstack([ventricles, atria[atria[:, 2] < 2.0 * self.scale]])

    @staticmethod
    def around(distance: float, degrees: float, w: float) -> tuple[float, float, float]:
        """The heart-frame point ``distance`` from the long axis at angle ``degrees`` (0 anterior, 90 left)."""
        angle = np.radians(degrees)
        return (distance * np.cos(angle), distance * np.sin(angle), w)

    def to_anatomy(self, points: np.ndarray) -> np.ndarray:
        return points @ self.axes.T

    def frame(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a = self.axes.astype(np.float32)
        return tuple(a[0, c] * x + a[1, c] * y + a[2, c] * z for c in range(3))  # type: ignore[return-value]

    def _indentation(self, cos_phi, sin_phi):
        """1 less the depth of the interventricular grooves (von Mises bumps about 0.2 rad wide)."""
        factor = 1.0
        for groove in (self.anterior_groove, self.posterior_groove):
            cos_difference = cos_phi * np.float32(np.cos(groove)) + sin_phi * np.float32(np.sin(groove))
            factor = factor - self.groove_depth * np.exp((cos_difference - 1.0) * 25.0)
        return factor

    def ventricles(self, u, v, w, grooves: bool = True):
        semi = (self.radius, 0.92 * self.radius, self.length)
        if grooves:
            around = np.sqrt(u * u + v * v) + np.float32(1e-6)
            factor = self._indentation(u / around, v / around)
            u, v = u / factor, v / factor  # scaling the coordinates scales the shape by ``factor``
        return np.maximum(ellipsoid(u, v, w, (0.0, 0.0, 0.0), semi), -(w + 3.0 * self.scale))

    def atria(self, u, v, w):
        r = self.radius
        shape = ellipsoid(u, v, w, (-0.25 * r, 0.0, -20.0 * self.scale), (0.8 * r, 0.95 * r, 32.0 * self.scale))
        return np.maximum(shape, w - 2.0 * self.scale)

    def surface_point(self, w: np.ndarray, phi: np.ndarray, lift: np.ndarray) -> np.ndarray:
        """Points ``lift`` mm outside the (grooved) ventricular surface at height w and angle phi."""
        rho = np.sqrt(np.clip(1.0 - (w / self.length) ** 2, 0.0025, 1.0))
        factor = self._indentation(np.cos(phi), np.sin(phi))
        semi_u, semi_v = self.radius * factor, 0.92 * self.radius * factor
        u, v = semi_u * rho * np.cos(phi), semi_v * rho * np.sin(phi)
        normal = np.stack([u / semi_u**2, v / semi_v**2, w / self.length**2], axis=-1)
        normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
        return np.stack([u, v, w], axis=-1) + normal * lift[:, None]


def generate(rng: np.random.Generator, small: bool) -> tuple[sitk.Image, sitk.Image]:
    # A small heart is a fifth of a real one; the coronaries stay at least ~2 voxels across.
    scale = rng.uniform(0.19, 0.21) if small else rng.uniform(0.92, 1.08)
    heart = _Heart(rng, scale, small)
    r, length = heart.radius, heart.length

    blood = rng.uniform(300.0, 500.0)
    intensity = {
        "air": AIR,
        "lung": rng.uniform(-870.0, -820.0),
        "fat": rng.uniform(-110.0, -80.0),
        "muscle": rng.uniform(40.0, 60.0),
        "bone": rng.uniform(400.0, 700.0),
        "myocardium": rng.uniform(50.0, 100.0),
        "left_blood": blood,
        "right_blood": blood * rng.uniform(0.5, 0.85),
        "coronary": blood * rng.uniform(0.85, 1.0),
        "pericardium": rng.uniform(20.0, 40.0),
    }

    # Great vessels and airways in the anatomy frame.
    root = heart.to_anatomy(np.array([0.12 * r, -0.08 * r, -10.0 * scale]))
    aorta_points = np.array(
        [heart.to_anatomy(np.array([0.12 * r, -0.08 * r, 6.0 * scale])), root,
         root + np.array([-8.0, -5.0, 45.0]) * scale, root + np.array([-8.0, 0.0, 75.0]) * scale]
    )
    aorta_radii = np.array([11.0, 15.0, 14.0, 14.0]) * scale
    outflow = heart.to_anatomy(np.array([0.5 * r, -0.2 * r, 0.0]))
    pulmonary_points = np.array(
        [heart.to_anatomy(np.array([0.35 * r, -0.3 * r, 12.0 * scale])), outflow,
         outflow + np.array([12.0, 5.0, 25.0]) * scale, outflow + np.array([30.0, 40.0, 45.0]) * scale]
    )
    pulmonary_radii = np.array([10.0, 12.0, 12.0, 11.0]) * scale
    descending = np.array([[22.0, 58.0, -120.0], [22.0, 58.0, 120.0]]) * scale
    carina = np.array([-5.0, 28.0, 50.0]) * scale
    airway_tree = [  # trachea, left and right main bronchus: offsets from the carina and radii
        ([[0.0, -6.0, 80.0], [0.0, 0.0, 0.0]], [9.0, 8.0]),
        ([[0.0, 0.0, 0.0], [40.0, 8.0, -18.0], [75.0, 15.0, -35.0]], [6.5, 6.0, 5.0]),
        ([[0.0, 0.0, 0.0], [-40.0, 3.0, -12.0], [-70.0, 8.0, -30.0]], [7.5, 7.0, 5.5]),
    ]
    airway_tree = [(carina + np.array(points) * scale, np.array(radii) * scale) for points, radii in airway_tree]
    airway_floor = 1.2 if small else 0.0

    # Field of view: the heart with its fat and the carina, as cardiac CTA reconstructs it.
    extent = np.vstack([heart.to_anatomy(heart.outline()), carina[None, :] + 6.0 * scale])
    low, high = extent.min(axis=0), extent.max(axis=0)
    spacing = random_spacing(rng, (0.4, 0.5), (0.45, 0.9))
    patient_tilt = random_rotation(rng, 5.0)
    anatomy_center = rng.uniform(-30.0, 30.0, 3)
    grid = oblique_grid(
        rng,
        anatomy_center + patient_tilt @ ((low + high) / 2),
        np.abs(patient_tilt) @ ((high - low) / 2),
        spacing,
        max_tilt_degrees=10.0,
        max_side=SMALL_MAX_SIDE if small else None,
        margin_mm=0.5 if small else 2.0,
        shift_mm=1.0 if small else 5.0,
    )
    scene = Scene(grid, anatomy_center, patient_tilt, background=intensity["air"])
    x, y, z = scene.coords()

    # Thorax: fat, a muscle layer with ribs and the sternum, then lungs around the mediastinum.
    thorax_center = (-5.0 * scale, 20.0 * scale * rng.uniform(0.9, 1.1))
    thorax = elliptic_cylinder(x, y, thorax_center, np.array([150.0, 105.0]) * scale)
    depth = -thorax
    scene.paint(thorax, intensity["fat"])
    subcutaneous = rng.uniform(4.0, 12.0) * scale if not small else 1.2
    muscle_layer = max(8.0 * scale, 1.5)
    wall_end = subcutaneous + muscle_layer + max(12.0 * scale, 2.0)
    scene.paint(subcutaneous - depth, intensity["muscle"])
    rib_period = 30.0 * scale
    rib_phase = (z + 0.4 * np.abs(x) + np.float32(rng.uniform(0, rib_period))) / np.float32(rib_period)
    ribs = np.maximum(
        np.abs(rib_phase - np.round(rib_phase)) * np.float32(rib_period) - 0.25 * rib_period,
        np.abs(depth - (subcutaneous + muscle_layer + 0.5 * (wall_end - subcutaneous - muscle_layer)))
        - 0.3 * (wall_end - subcutaneous - muscle_layer),
    )
    sternum = np.maximum(np.abs(x - np.float32(thorax_center[0])) - 15.0 * scale,
                         np.abs(depth - (subcutaneous + muscle_layer)) - max(6.0 * scale, 1.0))
    scene.paint(np.minimum(ribs, sternum), intensity["bone"])
    del ribs, sternum, rib_phase
    aorta_lumen = scene.polyline(aorta_points, aorta_radii)
    pulmonary_lumen = scene.polyline(pulmonary_points, pulmonary_radii)
    descending_lumen = scene.polyline(descending, np.full(2, 11.0 * scale))
    vessels = np.minimum(np.minimum(aorta_lumen, pulmonary_lumen), descending_lumen)

    heart_box = scene.box(extent.min(axis=0) - 6.0 * scale, extent.max(axis=0) + 6.0 * scale)
    hu, hv, hw = heart.frame(*scene.coords(heart_box))
    ventricles = heart.ventricles(hu, hv, hw)
    atria = heart.atria(hu, hv, hw)
    sac = np.full(grid.shape, 1e3, dtype=np.float32)
    sac[heart_box] = smooth_min(heart.ventricles(hu, hv, hw, grooves=False), atria, 12.0 * scale) - heart.epicardial_fat
    column = elliptic_cylinder(x, y, (thorax_center[0], 30.0 * scale), np.array([28.0, 45.0]) * scale)
    mediastinum = smooth_min(smooth_min(sac, vessels - 3.0 * scale, 10.0 * scale), column, 10.0 * scale)
    lung_texture = 25.0 * smooth_noise(rng, grid, 3.0 if small else 8.0)
    scene.paint(np.maximum(wall_end - depth, -mediastinum), intensity["lung"] + lung_texture)
    del lung_texture, depth, thorax, column
    scene.paint(np.maximum(mediastinum, -sac), intensity["fat"])
    del mediastinum
    for points, radii in airway_tree:
        radii = np.maximum(radii, airway_floor)
        scene.paint(scene.polyline(points, radii + max(1.5 * scale, 0.5)), intensity["muscle"])
    for points, radii in airway_tree:
        scene.paint(scene.polyline(points, np.maximum(radii, airway_floor)), intensity["air"])

    # The heart: pericardium, myocardium, chambers, then the great vessels leaving it.
    scene.paint(np.abs(sac[heart_box]) - 0.4 * scene.edge_mm, intensity["pericardium"], box=heart_box)
    del sac
    myocardium = np.minimum(ventricles, atria)
    scene.paint(myocardium, intensity["myocardium"], box=heart_box)
    left_cavity = np.maximum(
        ellipsoid(hu, hv, hw, heart.around(0.25 * r, 115.0, 0.06 * length), (0.48 * r, 0.48 * r, 0.74 * length)),
        -(hw + 1.0 * scale),
    )
    right_cavity = np.maximum.reduce([
        ellipsoid(hu, hv, hw, heart.around(0.38 * r, -65.0, 0.04 * length), (0.5 * r, 0.72 * r, 0.62 * length)),
        -(left_cavity - heart.septum),
        ventricles + heart.right_wall,
        -(hw + 1.0 * scale),
    ])
    left_atrium = np.maximum.reduce([
        ellipsoid(hu, hv, hw, (-0.42 * r, 0.2 * r, -24.0 * scale), (0.45 * r, 0.55 * r, 22.0 * scale)),
        atria + heart.atrial_wall,
        hw + 3.0 * scale,
    ])
    right_atrium = np.maximum.reduce([
        ellipsoid(hu, hv, hw, (0.0, -0.55 * r, -22.0 * scale), (0.45 * r, 0.4 * r, 22.0 * scale)),
        atria + heart.atrial_wall,
        hw + 3.0 * scale,
        -(left_atrium - heart.atrial_wall),
    ])
    del ventricles, atria, myocardium, hu, hv, hw
    for cavity, value in ((left_cavity, "left_blood"), (right_cavity, "right_blood"),
                          (left_atrium, "left_blood"), (right_atrium, "right_blood")):
        scene.paint(cavity, intensity[value], box=heart_box)
    del left_cavity, right_cavity, left_atrium, right_atrium
    scene.paint(pulmonary_lumen, intensity["right_blood"])
    scene.paint(np.minimum(aorta_lumen, descending_lumen), intensity["left_blood"])
    del pulmonary_lumen, descending_lumen, vessels

    # Coronary arteries, everywhere outside the aortic lumen they leave from.
    coronaries = np.full(grid.shape, 1e3, dtype=np.float32)
    for points, radii in _coronary_tree(rng, heart, small):
        scene.polyline(points, radii, sd=coronaries)
    np.maximum(coronaries, -aorta_lumen, out=coronaries)
    scene.paint(coronaries, intensity["coronary"], CORONARY_ARTERY)
    del coronaries, aorta_lumen

    image = scene.image + correlated_noise(rng, grid, rng.uniform(15.0, 35.0))
    np.clip(image, -1024.0, 3071.0, out=image)
    return grid.image(image.astype(np.float32)), grid.image(scene.labels)


def _coronary_tree(rng: np.random.Generator, heart: _Heart, small: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Centre lines (anatomy frame, n x 3) and radii of the coronary arteries of one heart."""
    scale, r, length = heart.scale, heart.radius, heart.length
    radius_scale = (0.45 if small else 1.0) * rng.uniform(0.85, 1.1)
    least = 0.5  # mm: a small case's thinnest artery is still about two voxels across
    step = max(0.35, 1.5 * scale) if small else 1.5 * scale
    tortuosity = rng.uniform(1.0, 3.0) * scale * (1.6 if small else 1.0)
    gap = 0.15 if small else 0.2 * scale

    def along_surface(w0, w1, phi0, phi1, r0, r1, groove=False):
        """A tortuous path over the ventricles from (w0, phi0) to (w1, phi1): its w, phi, points and radii."""
        count = max(int(np.hypot(w1 - w0, (phi1 - phi0) * r) / step), 8)
        t = np.linspace(0.0, 1.0, count)
        slow, fast = 2 * np.pi * rng.uniform(2.0, 6.0) * t, 2 * np.pi * rng.uniform(5.0, 9.0) * t
        phases = rng.uniform(0.0, 2 * np.pi, 4)
        envelope = tortuosity * np.sin(np.pi * t) ** 0.5  # the ends stay where they were asked to be
        wiggles = [envelope * (np.sin(slow + phases[k]) + 0.25 * np.sin(fast + phases[k + 1])) for k in (0, 2)]
        w = w0 + (w1 - w0) * t + wiggles[0] * (0.4 if groove else 1.0)  # arteries in a groove stay in it
        phi = phi0 + (phi1 - phi0) * t + wiggles[1] / r
        radii = np.maximum(np.linspace(r0, r1, count) * radius_scale, least)
        return w, phi, heart.surface_point(w, phi, radii + gap), radii

    vessels: list[tuple[np.ndarray, np.ndarray]] = []

    def add(points, radii, start=None, start_radius=None):
        if start is not None:
            points, radii = np.vstack([start, points]), np.concatenate([[start_radius], radii])
        vessels.append((points, radii))

    def branches(parent, positions, dw, dphi):
        """Side branches leaving ``parent`` at fractions ``positions`` of its length, then running (dw, dphi)."""
        w, phi, points, radii = parent
        for position in positions:
            i = int(position * (len(w) - 1))
            end_w = min(w[i] + dw(), 0.9 * length)
            _, _, branch_points, branch_radii = along_surface(w[i], end_w, phi[i], phi[i] + dphi(),
                                                              0.6 * radii[i] / radius_scale, 0.5)
            add(branch_points, branch_radii, points[i], branch_radii[0])

    groove_w = 0.015 * length
    left_dominant = rng.random() < 0.15
    crux = heart.posterior_groove
    root = np.array([0.12 * r, -0.08 * r, -8.0 * scale])

    # Left main from the left coronary sinus to the AV groove, then the LAD down the anterior
    # interventricular groove and the circumflex around the left AV groove.
    left_sinus = root + 14.0 * scale * np.array([-0.3, 1.0, 0.0]) / np.hypot(0.3, 1.0)
    phi_left_main = np.radians(rng.uniform(35.0, 55.0))
    lad = along_surface(groove_w, 0.97 * length, phi_left_main, heart.anterior_groove, 1.7, 0.55)
    bifurcation = lad[2][0]
    add(np.linspace(left_sinus, bifurcation, 6), np.maximum(np.linspace(2.0, 1.8, 6) * radius_scale, least))
    add(lad[2], lad[3])
    circumflex_end = crux + 2 * np.pi if left_dominant else np.radians(rng.uniform(130.0, 190.0))
    circumflex = along_surface(groove_w, groove_w, phi_left_main, circumflex_end, 1.5, 0.6, groove=True)
    add(circumflex[2], circumflex[3], bifurcation, circumflex[3][0])

    # Right coronary from the right sinus around the right AV groove; the posterior descending
    # artery comes from whichever artery reaches the crux.
    right_sinus = root + 14.0 * scale * np.array([1.0, -0.6, 0.0]) / np.hypot(1.0, 0.6)
    rca_end = np.radians(-100.0) if left_dominant else crux
    rca = along_surface(groove_w, groove_w, np.radians(-35.0), rca_end, 1.8, 1.0, groove=True)
    add(rca[2], rca[3], right_sinus, rca[3][0])
    dominant = circumflex if left_dominant else rca
    pda = along_surface(dominant[0][-1], rng.uniform(0.55, 0.75) * length, dominant[1][-1], dominant[1][-1], 1.0, 0.5)
    add(pda[2], pda[3], dominant[2][-1], dominant[3][-1])

    # Side branches: diagonals off the LAD, obtuse marginals off the circumflex, an acute marginal off the RCA.
    branches(lad, np.sort(rng.uniform(0.12, 0.55, rng.integers(1, 4))),
             lambda: rng.uniform(0.25, 0.4) * length, lambda: np.radians(rng.uniform(35.0, 60.0)))
    branches(circumflex, np.sort(rng.uniform(0.3, 0.85, rng.integers(1, 3))),
             lambda: rng.uniform(0.4, 0.6) * length, lambda: np.radians(rng.uniform(-10.0, 15.0)))
    branches(rca, [rng.uniform(0.3, 0.6)], lambda: 0.45 * length, lambda: np.radians(rng.uniform(-10.0, 10.0)))
    return [(heart.to_anatomy(points), radii) for points, radii in vessels]
