"""A PNG of an image with its labels: the middle axial, coronal and sagittal slices.

Slices are resampled onto world-aligned planes through the centre of the image's bounding box
with square pixels, so oblique grids and anisotropic voxels show with the right shape and
orientation: axial and coronal in radiological convention (the patient's right on the left),
sagittal with anterior on the left, superior up. Uses matplotlib's Agg canvas directly, so it
never touches pyplot's global state or needs a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .tasks import Task

#: Longest side of a displayed slice in pixels; finer grids are shown at this resolution.
MAX_PIXELS = 512
PLANES = ("Axial", "Coronal", "Sagittal")


def class_colors(task: Task) -> dict[int, tuple[float, float, float]]:
    """The task's class colours keyed by class index (1..K), for labels already mapped by the task."""
    return {index + 1: spec.color for index, spec in enumerate(task.classes)}


def save_overlay_png(
    image: sitk.Image,
    labels: sitk.Image,
    colors: Mapping[int, tuple[float, float, float]],
    path: Path,
    title: str = "",
    reference: sitk.Image | None = None,
    window: tuple[float, float] | None = None,
    opacity: float = 0.5,
) -> Path:
    """Write one PNG with the three middle slices; with ``reference``, reference and labels side by side.

    ``colors`` maps label values to RGB in 0..1; values without a colour get one from a fixed palette.
    ``window`` is the displayed intensity range (default: the 0.5 and 99.5 percentiles).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("the overlay needs a 3D single-channel image; choose one channel or volume first")
    rows = [("Labels" if reference is None else "Prediction", labels)]
    if reference is not None:
        rows.insert(0, ("Reference", reference))
    for name, label_image in rows:
        if label_image.GetDimension() != 3:
            raise InputError(f"the {name.lower()} image must be 3D like the intensity image")
    if window is None:
        values = sitk.GetArrayViewFromImage(image)
        step = max(1, round((values.size / 2_000_000) ** (1 / 3)))
        window = tuple(float(v) for v in np.percentile(values[::step, ::step, ::step], (0.5, 99.5)))
    low, high = window
    high = high if high > low else low + 1.0

    planes = [_plane_grid(image, plane) for plane in PLANES]
    slices = [_sample(image, plane, sitk.sitkLinear) for plane in planes]
    widths = [s.shape[1] for s in slices]
    heights = [s.shape[0] for s in slices]
    figure_height = 3.2 * len(rows)
    figure_width = figure_height / len(rows) * sum(w / max(heights) for w in widths) + 0.6
    figure = Figure(figsize=(max(figure_width, 6.0), figure_height + (0.4 if title else 0.0)), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), 3, squeeze=False, gridspec_kw={"width_ratios": widths})
    for row, (row_name, label_image) in enumerate(rows):
        for column, (plane_name, plane, gray) in enumerate(zip(PLANES, planes, slices)):
            label_slice = _sample(label_image, plane, sitk.sitkNearestNeighbor).astype(np.int64)
            axis = axes[row][column]
            axis.imshow(gray, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            axis.imshow(_colorise(label_slice, colors, opacity), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(plane_name, fontsize=9)
            if column == 0 and len(rows) > 1:
                axis.set_ylabel(row_name, fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _plane_grid(image: sitk.Image, plane: str) -> sitk.Image:
    """A one-voxel-thick, world-aligned reference image through the centre of ``image``'s extent."""
    size = np.array(image.GetSize())
    corners = [
        image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
        for corner in np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in size], indexing="ij")).reshape(3, -1).T
    ]
    low, high = np.min(corners, axis=0), np.max(corners, axis=0)
    center = (low + high) / 2
    normal = {"Axial": 2, "Coronal": 1, "Sagittal": 0}[plane]
    in_plane = [axis for axis in range(3) if axis != normal]
    pixel = max(min(image.GetSpacing()), float(np.max((high - low)[in_plane])) / MAX_PIXELS)
    grid_size = [1, 1, 1]
    origin = list(center)
    for axis in in_plane:
        grid_size[axis] = max(int(np.ceil((high[axis] - low[axis]) / pixel)), 1)
        origin[axis] = low[axis] + pixel / 2
    reference = sitk.Image(grid_size, sitk.sitkUInt8)
    reference.SetSpacing([pixel] * 3)
    reference.SetOrigin([float(o) for o in origin])
    return reference


def _sample(image: sitk.Image, plane: sitk.Image, interpolator: int) -> np.ndarray:
    """The image on a plane grid as a 2D array oriented for display (see the module docstring)."""
    pixel_type = sitk.sitkFloat32 if interpolator == sitk.sitkLinear else sitk.sitkInt32
    default = float(np.min(sitk.GetArrayViewFromImage(image))) if interpolator == sitk.sitkLinear else 0.0
    resampled = sitk.Resample(sitk.Cast(image, pixel_type), plane, sitk.Transform(), interpolator, default, pixel_type)
    array = sitk.GetArrayFromImage(resampled)  # (z, y, x) with one of them of length 1
    size = plane.GetSize()
    if size[2] == 1:  # axial: rows anterior to posterior, columns right to left
        return array[0]
    if size[1] == 1:  # coronal: rows superior to inferior, columns right to left
        return array[::-1, 0, :]
    return array[::-1, :, 0]  # sagittal: rows superior to inferior, columns anterior to posterior


def _colorise(labels: np.ndarray, colors: Mapping[int, tuple[float, float, float]], opacity: float) -> np.ndarray:
    from matplotlib import colormaps

    palette = colormaps["tab20"]
    rgba = np.zeros((*labels.shape, 4), dtype=np.float32)
    for number, value in enumerate(np.unique(labels[labels != 0])):
        color = colors.get(int(value), palette(number % 20)[:3])
        rgba[labels == value] = (*color, opacity)
    return rgba
