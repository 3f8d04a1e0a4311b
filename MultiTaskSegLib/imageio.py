"""Reading, checking and writing volumes with SimpleITK, keeping spacing, origin and direction.

Every image enters the library through :func:`read_image` or :func:`check_image`, so bad input
(2-D, 4-D, multi-component, empty, constant, NaN/Inf, unreadable, too large) is refused once,
with a message that says what to do.
"""

from __future__ import annotations

import gzip
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

#: Refuse volumes whose float32 copy would take more than this share of the available memory.
MEMORY_SHARE = 0.25
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".seg.nrrd")


def available_memory_bytes() -> int:
    """Physical memory that is currently available (Linux /proc/meminfo; total RAM elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_size(size: tuple[int, ...], components: int, where: str) -> None:
    voxels = int(np.prod(size, dtype=np.int64)) * max(components, 1)
    needed = voxels * 4  # one float32 copy; processing needs several
    allowed = int(available_memory_bytes() * MEMORY_SHARE)
    if needed > allowed:
        raise InputError(
            f"{where} has {'x'.join(map(str, size))} voxels ({needed / 2**30:.1f} GiB as float32), more than this "
            f"machine can process ({allowed / 2**30:.1f} GiB allowed); crop or downsample it first"
        )


def _check_shape(dimension: int, components: int, size: tuple[int, ...], where: str, channel: int | None) -> None:
    if dimension < 3 or (dimension == 3 and size[2] == 1):
        kind = "a single voxel" if dimension == 3 and max(size) == 1 else (
            "a single slice, a 2-D image," if dimension == 3 else "a 2-D image")
        raise InputError(
            f"{where} is {kind} ({'x'.join(map(str, size))}); the models segment 3-D volumes, "
            "give the whole series or volume"
        )
    if dimension > 3 and channel is None:
        raise InputError(
            f"{where} is {dimension}-D ({'x'.join(map(str, size))}): it holds {size[3]} volumes; "
            "choose one channel (channel=N, or --channel N on the command line)"
        )
    if components > 1 and channel is None:
        raise InputError(
            f"{where} has {components} components per voxel; choose one channel "
            "(channel=N, or --channel N on the command line)"
        )


def read_image(path: str | os.PathLike, channel: int | None = None, check_values: bool = True) -> sitk.Image:
    """Read a 3-D scalar volume from NIfTI, NRRD, MHA or a DICOM series folder.

    ``channel`` picks one volume of a 4-D or multi-component file.
    """
    path = Path(path)
    where = f"'{path}'"
    if not path.exists():
        raise InputError(f"{where} does not exist")
    if path.is_dir():
        return _read_dicom_series(path, channel, check_values)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(
            f"{where} is not an image SimpleITK can read; give a NIfTI, NRRD, MHA file or a DICOM series folder"
        ) from None
    size = reader.GetSize()
    _check_shape(reader.GetDimension(), reader.GetNumberOfComponents(), size, where, channel)
    _check_size(size[:3], 1, where)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_voxels(path, where, check_values)
    image = reader.Execute()
    return check_image(_pick_channel(image, channel, where), where, check_values)


#: NIfTI-1 data types whose NaN and infinite values the reader would silently turn into 0.
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _check_nifti_voxels(path: Path, where: str, check_values: bool) -> None:
    """Refuse a NIfTI-1 file whose voxel data is cut short, or holds NaN/Inf voxels.

    ITK's NIfTI reader fills a truncated file's missing voxels with zeros and reads NaN as 0, so a
    damaged scan would be segmented without a word; the raw bytes tell.
    """
    try:
        with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as handle:
            data = handle.read()
    except (EOFError, OSError, zlib.error):
        raise InputError(f"{where} is truncated or its compression is damaged; copy or export the file again") from None
    if len(data) < 348:
        raise InputError(f"{where} is truncated: it is shorter than a NIfTI header; copy or export the file again")
    for order in ("<", ">"):
        if struct.unpack(order + "i", data[:4])[0] == 348:
            break
    else:
        return  # NIfTI-2 or another variant: left to the reader
    dims = struct.unpack(order + "8h", data[40:56])
    datatype, bits = struct.unpack(order + "2h", data[70:74])
    offset = int(struct.unpack(order + "f", data[108:112])[0])
    count = 1
    for side in dims[1:max(1, min(7, dims[0])) + 1]:
        count *= max(1, side)
    expected = offset + count * max(bits, 8) // 8
    if len(data) < expected:
        raise InputError(
            f"{where} is truncated: it holds {len(data) - offset} bytes of voxels where its header announces "
            f"{expected - offset}; copy or export the file again"
        )
    if check_values and datatype in _NIFTI_FLOATS:
        values = np.frombuffer(data, dtype=order + _NIFTI_FLOATS[datatype], count=count, offset=offset)
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise InputError(f"{where} has {bad} NaN or infinite voxels; fix or mask them before segmenting")


def _read_dicom_series(folder: Path, channel: int | None, check_values: bool) -> sitk.Image:
    where = f"DICOM folder '{folder}'"
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{where} holds no DICOM series; give a folder with the slices of one series")
    if len(series) > 1:
        raise InputError(
            f"{where} holds {len(series)} DICOM series ({', '.join(series)}); put each series in its own folder"
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    image = reader.Execute()
    _check_shape(image.GetDimension(), image.GetNumberOfComponentsPerPixel(), image.GetSize(), where, channel)
    return check_image(_pick_channel(image, channel, where), where, check_values)


def _pick_channel(image: sitk.Image, channel: int | None, where: str) -> sitk.Image:
    if channel is None:
        return image
    if image.GetNumberOfComponentsPerPixel() > 1:
        count = image.GetNumberOfComponentsPerPixel()
        if not 0 <= channel < count:
            raise InputError(f"{where} has {count} components; channel must be 0..{count - 1}, got {channel}")
        return sitk.VectorIndexSelectionCast(image, channel)
    if image.GetDimension() == 4:
        count = image.GetSize()[3]
        if not 0 <= channel < count:
            raise InputError(f"{where} holds {count} volumes; channel must be 0..{count - 1}, got {channel}")
        size = list(image.GetSize())
        size[3] = 0
        return sitk.Extract(image, size, [0, 0, 0, channel])
    if channel != 0:
        raise InputError(f"{where} has a single channel; channel must be 0 or left out, got {channel}")
    return image


def check_image(image: sitk.Image, where: str = "the image", check_values: bool = True) -> sitk.Image:
    """Refuse images the models cannot use; returns the image unchanged when it is fine."""
    size = image.GetSize()
    _check_shape(image.GetDimension(), image.GetNumberOfComponentsPerPixel(), size, where, None)
    if 0 in size:
        raise InputError(f"{where} is empty (size {'x'.join(map(str, size))})")
    if check_values:
        values = sitk.GetArrayViewFromImage(image)
        bad = int(np.count_nonzero(~np.isfinite(values))) if values.dtype.kind == "f" else 0
        if bad:
            raise InputError(f"{where} has {bad} NaN or infinite voxels; fix or mask them before segmenting")
        if values.min() == values.max():
            raise InputError(
                f"{where} is constant (every voxel is {values.flat[0]}); there is nothing to segment — "
                "check that the right file or series was loaded"
            )
    return image


def is_image_path(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(suffix) for suffix in IMAGE_SUFFIXES)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write atomically: a crash or Ctrl-C never leaves a half-written file under ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        sitk.WriteImage(image, temporary, useCompression=compress)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
