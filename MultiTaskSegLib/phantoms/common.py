"""Building blocks shared by the phantom generators.

A phantom is drawn analytically. Every structure is a signed distance in millimetres (negative
inside) in an *anatomy frame* (LPS: x to the patient's left, y posterior, z superior), evaluated at
the voxel centres of an oblique grid. Painting a structure blends its intensity in over one voxel
width around its surface, which is the partial volume of a voxel cut by a locally flat boundary,
and gives its label to the voxels whose centres lie inside it, the majority of such a voxel.

Smooth random fields (shape deformation, bias field, tissue texture) are cubic
B-splines through random control values, resampled by SimpleITK: first onto a coarse copy of the
grid, then linearly onto the grid itself, which keeps them cheap on full-size grids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk

#: Scaled-down anatomy for tests and demos (at most SMALL_MAX_SIDE voxels a side), or near real scans.
SIZES = ("small", "full")
SMALL_MAX_SIDE = 64

Box = tuple[slice, slice, slice]
EVERYWHERE: Box = (slice(None), slice(None), slice(None))


@dataclass(frozen=True)
class Grid:
    """A voxel grid in SimpleITK's terms; ``size`` and ``spacing`` are ordered i, j, k (x, y, z)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # row-major 3x3; column c is the world direction of index axis c

    @property
    def shape(self) -> tuple[int, int, int]:
        """The numpy shape (k, j, i) of arrays on this grid."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.array(self.direction, dtype=np.float64).reshape(3, 3)

    def image(self, array: np.ndarray) -> sitk.Image:
        """A SimpleITK image of ``array`` (numpy order) carrying this grid's geometry."""
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def reference(self) -> sitk.Image:
        return self.image(np.zeros(self.shape, dtype=np.uint8))


def random_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """A rotation about a uniformly random axis by an angle drawn uniformly in +-max_degrees."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.uniform(-max_degrees, max_degrees))
    cross = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + math.sin(angle) * cross + (1.0 - math.cos(angle)) * cross @ cross


def oblique_grid(
    rng: np.random.Generator,
    center: Sequence[float],
    half_extent: Sequence[float],
    spacing: Sequence[float],
    max_tilt_degrees: float,
    axial_probability: float = 0.25,
    max_side: int | None = None,
    margin_mm: float = 4.0,
    shift_mm: float = 0.0,
) -> Grid:
    """A grid covering the world box ``center +- half_extent`` (mm), its axes tilted at random.

    With ``axial_probability`` the direction stays the identity (a plain axial acquisition);
    otherwise it is rotated by up to ``max_tilt_degrees``. ``max_side`` caps the voxels per side
    (the box is then cropped about its centre); ``shift_mm`` moves the grid off centre at random.
    """
    if rng.random() < axial_probability:
        direction = np.eye(3)
    else:
        direction = random_rotation(rng, max_tilt_degrees)
    spacing_array = np.asarray(spacing, dtype=np.float64)
    covered = np.abs(direction).T @ np.asarray(half_extent, dtype=np.float64) + margin_mm
    size = np.ceil(2.0 * covered / spacing_array).astype(int) + 1
    if max_side is not None:
        size = np.minimum(size, max_side)
    grid_center = np.asarray(center, dtype=np.float64) + rng.uniform(-shift_mm, shift_mm, 3)
    origin = grid_center - direction @ (spacing_array * (size - 1) / 2.0)
    return Grid(
        size=tuple(int(n) for n in size),
        spacing=tuple(float(s) for s in spacing_array),
        origin=tuple(float(o) for o in origin),
        direction=tuple(float(d) for d in direction.ravel()),
    )


def smooth_noise(rng: np.random.Generator, grid: Grid, feature_mm: float) -> np.ndarray:
    """A smooth random field on ``grid`` with zero mean and unit standard deviation (float32).

    ``feature_mm`` is the control-point spacing of the B-spline: features about that size and larger.
    """
    direction = grid.direction_matrix
    spacing = np.array(grid.spacing)
    extent = (np.array(grid.size) - 1) * spacing
    coarse_spacing = np.maximum(spacing, feature_mm / 4.0)
    coarse_size = np.ceil(extent / coarse_spacing).astype(int) + 2
    control_size = np.ceil(extent / feature_mm).astype(int) + 6
    control_origin = np.array(grid.origin) - direction @ np.full(3, 2.5 * feature_mm)
    values = rng.standard_normal(tuple(control_size[::-1])).astype(np.float32)
    control = _image_like(sitk.GetImageFromArray(values), (feature_mm,) * 3, control_origin, grid.direction)
    coarse_reference = _image_like(
        sitk.Image([int(n) for n in coarse_size], sitk.sitkUInt8), coarse_spacing, grid.origin, grid.direction
    )
    coarse = sitk.Resample(
        control, coarse_reference, sitk.Transform(), sitk.sitkBSplineResamplerOrder3, 0.0, sitk.sitkFloat32
    )
    field = sitk.GetArrayFromImage(coarse)
    field -= field.mean()
    field /= max(float(field.std()), 1e-6)
    return _upsample(field, coarse, grid.reference())


def _image_like(image: sitk.Image, spacing, origin, direction) -> sitk.Image:
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection([float(d) for d in direction])
    return image


def _upsample(array: np.ndarray, geometry: sitk.Image, reference: sitk.Image) -> np.ndarray:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(geometry)
    fine = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(fine)


def displacement_field(
    rng: np.random.Generator, grid: Grid, feature_mm: float, amplitude_mm: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A smooth random displacement (three components, mm) that bends every shape of a case alike."""
    if amplitude_mm <= 0:
        return None
    return tuple(amplitude_mm * smooth_noise(rng, grid, feature_mm) for _ in range(3))  # type: ignore[return-value]


class Scene:
    """Voxel-centre coordinates in the anatomy frame, and the image and labels painted so far.

    A voxel at world point p sits at ``rotation.T @ (p - center) + displacement`` in the anatomy
    frame, so ``rotation`` turns the anatomy in the world (a tilted head) independently of the
    grid's own direction (an oblique acquisition).
    """

    def __init__(
        self,
        grid: Grid,
        center: Sequence[float],
        rotation: np.ndarray | None = None,
        displacement: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        background: float = 0.0,
    ):
        rotation = np.eye(3) if rotation is None else rotation
        self.grid = grid
        self.rotation = rotation
        self.center = np.asarray(center, dtype=np.float64)
        self.index_to_anatomy = rotation.T @ grid.direction_matrix @ np.diag(grid.spacing)
        self.offset = rotation.T @ (np.array(grid.origin) - np.asarray(center, dtype=np.float64))
        k, j, i = (np.arange(n, dtype=np.float32) for n in grid.shape)
        k, j, i = k[:, None, None], j[None, :, None], i[None, None, :]
        matrix = self.index_to_anatomy
        coordinates = []
        for row in range(3):
            m0, m1, m2 = (np.float32(v) for v in matrix[row])
            axis = np.broadcast_to(m0 * i + m1 * j + m2 * k + np.float32(self.offset[row]), grid.shape)
            coordinates.append(axis + displacement[row] if displacement is not None else np.ascontiguousarray(axis))
        self.x, self.y, self.z = coordinates
        self.max_displacement = 0.0 if displacement is None else float(max(np.abs(d).max() for d in displacement))
        self.edge_mm = float(np.mean(grid.spacing))
        self.image = np.full(grid.shape, background, dtype=np.float32)
        self.labels = np.zeros(grid.shape, dtype=np.uint16)

    def box(self, low: Sequence[float], high: Sequence[float]) -> Box | None:
        """The index box holding every voxel whose anatomy coordinates lie in [low, high] (None if empty)."""
        pad = self.max_displacement + 2.0 * self.edge_mm
        low = np.asarray(low, dtype=np.float64) - pad
        high = np.asarray(high, dtype=np.float64) + pad
        corners = np.array(np.meshgrid(*zip(low, high), indexing="ij")).reshape(3, -1)
        indices = np.linalg.solve(self.index_to_anatomy, corners - self.offset[:, None])
        first = np.maximum(np.floor(indices.min(axis=1)).astype(int), 0)
        last = np.minimum(np.ceil(indices.max(axis=1)).astype(int) + 1, np.array(self.grid.size))
        if np.any(last <= first):
            return None
        return (slice(first[2], last[2]), slice(first[1], last[1]), slice(first[0], last[0]))

    def resample(self, values: np.ndarray, origin: Sequence[float], spacing: Sequence[float]) -> np.ndarray:
        """Sample (linearly) a field given on an axis-aligned grid of the anatomy frame at the voxels.

        ``values`` is in numpy order (z, y, x); the displacement of the shapes is not applied to it.
        """
        image = sitk.GetImageFromArray(values.astype(np.float32))
        image.SetOrigin([float(o) for o in origin])
        image.SetSpacing([float(s) for s in spacing])
        world_to_anatomy = sitk.AffineTransform(3)
        world_to_anatomy.SetMatrix([float(v) for v in self.rotation.T.ravel()])
        world_to_anatomy.SetTranslation([float(v) for v in -self.rotation.T @ self.center])
        sampled = sitk.Resample(image, self.grid.reference(), world_to_anatomy, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        return sitk.GetArrayFromImage(sampled)

    def coords(self, box: Box = EVERYWHERE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.x[box], self.y[box], self.z[box]

    def paint(
        self, sd: np.ndarray, value: float | np.ndarray, label: int | np.ndarray | None = None, box: Box = EVERYWHERE
    ) -> None:
        """Blend ``value`` in where ``sd`` < 0 (soft over one voxel) and give those voxels ``label``."""
        weight = np.clip(0.5 - sd / self.edge_mm, 0.0, 1.0)
        image = self.image[box]
        image += weight * (value - image)
        if label is not None:
            inside = sd < 0
            labels = self.labels[box]
            labels[inside] = label[inside] if isinstance(label, np.ndarray) else label

    def polyline(self, points: np.ndarray, radii: np.ndarray, sd: np.ndarray | None = None) -> np.ndarray:
        """Signed distance of a tube along ``points`` (n x 3, anatomy frame) with radii tapering per point.

        Each segment is evaluated only in its own index box; ``sd`` (grid shaped) is updated in place
        when given, so a tree of vessels accumulates into one field.
        """
        if sd is None:
            sd = np.full(self.grid.shape, 1e3, dtype=np.float32)
        points = np.asarray(points, dtype=np.float64)
        radii = np.asarray(radii, dtype=np.float64)
        for start, end, r_start, r_end in zip(points[:-1], points[1:], radii[:-1], radii[1:]):
            reach = max(r_start, r_end)
            box = self.box(np.minimum(start, end) - reach, np.maximum(start, end) + reach)
            if box is None:
                continue
            x, y, z = self.coords(box)
            ax, ay, az = (float(v) for v in end - start)
            length_squared = max(ax * ax + ay * ay + az * az, 1e-12)
            dx, dy, dz = x - float(start[0]), y - float(start[1]), z - float(start[2])
            t = np.clip((dx * ax + dy * ay + dz * az) / length_squared, 0.0, 1.0)
            distance = np.sqrt((dx - t * ax) ** 2 + (dy - t * ay) ** 2 + (dz - t * az) ** 2)
            segment = distance - (float(r_start) + t * float(r_end - r_start))
            np.minimum(sd[box], segment, out=sd[box])
        return sd


# ---------------------------------------------------------------------------------------------
# Signed distances (mm, negative inside); approximate away from the surface, exact enough on it.


def ellipsoid(
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    center: Sequence[float],
    semi_axes: Sequence[float],
    rotation: np.ndarray | None = None,
) -> np.ndarray:
    """Distance to an ellipsoid measured along the ray from its centre; ``rotation`` columns are its axes."""
    dx, dy, dz = x - np.float32(center[0]), y - np.float32(center[1]), z - np.float32(center[2])
    if rotation is not None:
        r = rotation.astype(np.float32)
        dx, dy, dz = (
            r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz,
            r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz,
            r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz,
        )
    a, b, c = (np.float32(s) for s in semi_axes)
    radius = np.sqrt(dx * dx + dy * dy + dz * dz)
    normalised = np.sqrt((dx / a) ** 2 + (dy / b) ** 2 + (dz / c) ** 2)
    return (normalised - 1.0) * radius / np.maximum(normalised, 1e-6)


def elliptic_cylinder(
    a: np.ndarray, b: np.ndarray, center: Sequence[float], semi_axes: Sequence[float]
) -> np.ndarray:
    """Distance to an ellipse in the plane of coordinates ``a``, ``b`` (a cylinder along the third)."""
    da, db = a - np.float32(center[0]), b - np.float32(center[1])
    radius = np.sqrt(da * da + db * db)
    normalised = np.sqrt((da / np.float32(semi_axes[0])) ** 2 + (db / np.float32(semi_axes[1])) ** 2)
    return (normalised - 1.0) * radius / np.maximum(normalised, 1e-6)


def smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Union of two shapes with a fillet of about ``k`` mm where their surfaces meet."""
    h = np.maximum(k - np.abs(a - b), 0.0) / k
    return np.minimum(a, b) - h * h * (k / 4.0)


def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def left_right(x: np.ndarray, left: int, right: int) -> np.ndarray:
    """FreeSurfer-style label by hemisphere: anatomy x > 0 is the patient's left."""
    return np.where(x > 0, np.uint16(left), np.uint16(right))


# ---------------------------------------------------------------------------------------------
# Image formation


def rician_noise(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise: MR noise, never negative."""
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    return np.sqrt(real * real + imaginary * imaginary)


def correlated_noise(rng: np.random.Generator, grid: Grid, sigma: float) -> np.ndarray:
    """Gaussian noise of standard deviation ``sigma``, correlated in-plane like a CT reconstruction kernel.

    A [1, 2, 1] filter along i and j: neighbouring pixels correlate by about 0.4.
    """
    noise = rng.standard_normal(grid.shape, dtype=np.float32)
    for axis in (1, 2):
        before = [slice(None)] * 3
        after = [slice(None)] * 3
        before[axis], after[axis] = slice(None, -1), slice(1, None)
        smoothed = 2.0 * noise
        smoothed[tuple(after)] += noise[tuple(before)]
        smoothed[tuple(before)] += noise[tuple(after)]
        noise = smoothed
    return noise * np.float32(sigma / max(float(noise[::2, ::2, ::2].std()), 1e-6))


def random_spacing(
    rng: np.random.Generator, in_plane: tuple[float, float], slice_: tuple[float, float]
) -> tuple[float, float, float]:
    """In-plane spacing shared by x and y, slice spacing along z, each uniform in its range."""
    pixel = rng.uniform(*in_plane)
    return (pixel, pixel, rng.uniform(*slice_))
