"""Reading, checking and writing volumes with SimpleITK, keeping spacing, origin and direction.

Every image enters the library through :func:`read_image` or :func:`check_image`, so bad input
(2-D, 4-D, multi-component, empty, constant, NaN/Inf, beyond float32, unreadable, too large) is
refused once, with a message that says what to do.
"""

from __future__ import annotations

import errno
import gzip
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Sequence

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
    if dimension < 3 or (dimension == 3 and 1 in size):
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


def read_image(path: str | os.PathLike, channel: int | None = None, check_values: bool = True,
               perpendicular_axes: bool = True) -> sitk.Image:
    """Read a 3-D scalar volume from NIfTI, NRRD, MHA or a DICOM series folder.

    ``channel`` picks one volume of a 4-D or multi-component file. ``perpendicular_axes=False``
    accepts a sheared grid: a further channel, which is resampled onto the first channel's grid.
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
    except RuntimeError as error:  # the reason names e.g. a sheared NIfTI ("only supports orthonormal direction cosines")
        reason = _itk_reason(error).split("ERROR: ", 1)[-1]
        raise InputError(
            f"{where} is not an image SimpleITK can read (another format, or a damaged header: {reason}); give a "
            "NIfTI, NRRD, MHA file or a DICOM series folder, or copy or export the file again"
        ) from None
    size = reader.GetSize()
    if reader.GetDimension() == 4 and size[3] == 1 and channel is None:
        channel = 0  # a 3-D volume stored as a series of one (some NRRD and NIfTI writers)
    _check_shape(reader.GetDimension(), reader.GetNumberOfComponents(), size, where, channel)
    _check_size(size, reader.GetNumberOfComponents(), where)  # the reader loads every volume and component
    _check_geometry(reader.GetSpacing(), reader.GetDirection(), reader.GetDimension(), where, perpendicular_axes)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_voxels(path, where, check_values)
    else:
        _check_stored_bytes(path, reader, where)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        reason = _itk_reason(error)
        detail = "" if reason.startswith("Reason:") or not reason else f" ({reason})"
        raise InputError(f"{where} could not be read{detail}; the file is damaged or cut short: copy or export it again") from None
    return check_image(_pick_channel(image, channel, where), where, check_values, perpendicular_axes)


def read_images(paths: Sequence[str | os.PathLike], channels: Sequence[int | None] = (),
                inputs: str | None = None) -> list[sitk.Image]:
    """One volume from each of ``paths`` (the channels of a multi-channel task, in its order).

    ``channels`` is empty (every file holds one volume), one channel for every file, or one per
    file in order, None for a file holding one volume. ``inputs`` names the files in messages
    (default: "N inputs").
    """
    picks = channels_per_input(channels, len(paths), inputs or f"{len(paths)} inputs")
    if len(channels) == 1 and len(paths) > 1 and channels[0]:
        for path in paths:  # a file of one volume has only channel 0: the user meant another file's channel
            if volume_count(path) == 1:
                raise InputError(f"'{path}' holds a single volume, so it has no channel {channels[0]}: a --channel given once "
                                 "applies to every input; give one --channel per input, in order (none for a file "
                                 "holding a single volume)")
    # Only the first channel's grid is segmented on; further ones are resampled onto it, shear or not.
    return [read_image(path, channel=channel, perpendicular_axes=number == 0)
            for number, (path, channel) in enumerate(zip(paths, picks))]


def channels_per_input(channels: Sequence[int | None], count: int, inputs: str) -> list[int | None]:
    """The channel to pick from each of ``count`` inputs: none given, none picked; one given, the same
    from every input; else one per input, in order."""
    if not channels:
        return [None] * count
    if len(channels) == 1:
        return list(channels) * count
    if len(channels) != count:
        raise InputError(f"--channel is given {len(channels)} times for {inputs}; give it once per input, in order "
                         "(none for a file holding a single volume), or once for all")
    return list(channels)


def volume_count(path: str | os.PathLike) -> int | None:
    """How many volumes a file holds (a 4-D series' volumes, or a vector image's components), from its
    header; 1 for a DICOM series folder; None when the header cannot be read (read_image says why)."""
    path = Path(path)
    if path.is_dir():
        return 1
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    if reader.GetDimension() > 3:
        return reader.GetSize()[3]
    return max(reader.GetNumberOfComponents(), 1)


def _check_geometry(spacing, direction, dimension: int, where: str, perpendicular_axes: bool = True) -> None:
    """Zero, negative or NaN spacing and a singular direction matrix describe no real grid; axes that
    are not perpendicular (unless ``perpendicular_axes`` is False) no grid to segment on."""
    spacing = np.asarray(spacing[:3], dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"{where} has voxel spacing {tuple(spacing.tolist())} mm; every spacing must be a positive number: fix the header")
    matrix = np.asarray(direction, dtype=float).reshape(dimension, dimension)[:3, :3]
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < 1e-6:
        raise InputError(f"{where} has a singular direction matrix {np.round(matrix, 3).tolist()} (axes that are "
                         "parallel or zero); fix the header's space directions")
    # A sheared grid (a gantry-tilted CT kept as acquired) would reach the networks as sheared
    # anatomy, and ITK's NIfTI writer would put the labels on an orthogonalised grid.
    if perpendicular_axes and np.abs(matrix.T @ matrix - np.eye(3)).max() > 1e-3:
        raise InputError(f"{where} has a direction matrix {np.round(matrix, 3).tolist()} whose axes are not perpendicular "
                         "(a sheared grid, as in a gantry-tilted CT); resample it onto a grid with perpendicular axes first")


#: The most gzip/zlib can compress (a stream of one repeated byte), with room to spare.
_MAX_COMPRESSION_RATIO = 1100


def _check_stored_bytes(path: Path, reader: sitk.ImageFileReader, where: str) -> None:
    """Refuse an NRRD or MetaImage file holding fewer bytes than its header announces, before the
    reader allocates what the header asks for (a 900-cubed header over 1 kB would take gigabytes)."""
    header = _header_fields(path)
    if header is None:
        return
    data_file, header_bytes, compressed = header
    if not data_file.exists():
        raise InputError(f"{where} names a data file '{data_file}' that does not exist; keep header and data together")
    stored = data_file.stat().st_size - (header_bytes if data_file == path else 0)
    pixel = sitk.Image([1] * 3, reader.GetPixelID(), max(reader.GetNumberOfComponents(), 1))
    announced = int(np.prod(reader.GetSize(), dtype=np.int64)) * pixel.GetSizeOfPixelComponent() * max(reader.GetNumberOfComponents(), 1)
    if stored * (_MAX_COMPRESSION_RATIO if compressed else 1) < announced:
        raise InputError(f"{where} is truncated: it holds {stored} bytes of voxel data where its header announces "
                         f"{announced}{' (uncompressed)' if compressed else ''}; copy or export the file again")


def _header_fields(path: Path) -> tuple[Path, int, bool] | None:
    """(data file, header length in bytes, compressed) of an NRRD or MetaImage header; None for others."""
    name = path.name.lower()
    with open(path, "rb") as handle:
        head = handle.read(65536)
    if name.endswith((".nrrd", ".nhdr")) and head.startswith(b"NRRD"):
        end = head.find(b"\n\n")
        text = head[: end if end >= 0 else len(head)].decode("latin-1")
        fields = dict(line.split(":", 1) for line in text.splitlines()[1:] if ":" in line and not line.startswith("#"))
        fields = {key.strip().lower(): value.strip() for key, value in fields.items()}
        data = fields.get("data file", fields.get("datafile"))
        if data is not None and (" " in data or data.upper().startswith("LIST")):
            return None  # a list of data files: left to the reader
        compressed = fields.get("encoding", "raw").lower() not in ("raw", "text", "txt", "ascii")
        if fields.get("encoding", "raw").lower() in ("text", "txt", "ascii"):
            return None
        return (path.parent / data if data else path), end + 2, compressed
    if name.endswith((".mha", ".mhd")):
        marker = head.find(b"ElementDataFile")
        if marker < 0:
            return None
        line_end = head.find(b"\n", marker)
        text = head[: line_end if line_end >= 0 else len(head)].decode("latin-1")
        fields = {key.strip(): value.strip() for key, value in (line.split("=", 1) for line in text.splitlines() if "=" in line)}
        data = fields.get("ElementDataFile", "LOCAL")
        compressed = fields.get("CompressedData", "False").lower() == "true"
        if data.upper() == "LOCAL":
            return path, line_end + 1, compressed
        if data.upper().startswith("LIST") or "%" in data:
            return None
        return path.parent / data, 0, compressed
    return None


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
    pixdim = struct.unpack(order + "8f", data[76:108])[1 : min(3, max(dims[0], 1)) + 1]
    if not all(np.isfinite(pixdim)) or min(pixdim) <= 0:  # the reader would quietly make such spacings 1 mm
        raise InputError(f"{where} has voxel spacing {tuple(round(float(v), 4) for v in pixdim)} mm in its header; "
                         "every spacing must be a positive number: fix the header")
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


def _itk_reason(error: RuntimeError) -> str:
    """The last non-empty line of an ITK exception, where ITK puts its reason."""
    return next((line.strip() for line in reversed(str(error).splitlines()) if line.strip()), "")


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
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as error:
        reason = _itk_reason(error)
        raise InputError(f"{where}: a slice could not be read ({reason}); export the series again") from None
    _check_shape(image.GetDimension(), image.GetNumberOfComponentsPerPixel(), image.GetSize(), where, channel)
    _check_size(image.GetSize()[:3], 1, where)
    _check_even_slices(reader, image, where)
    return check_image(_pick_channel(image, channel, where), where, check_values)


def _check_even_slices(reader: sitk.ImageSeriesReader, image: sitk.Image, where: str) -> None:
    """ITK reads a series with a missing slice as an evenly spaced volume (only warning in its log),
    so every structure beyond the gap would be labelled out of place: refuse uneven slice positions."""
    key = "0020|0032"  # Image Position (Patient)
    count = image.GetSize()[2] if image.GetDimension() >= 3 else 1
    if count < 3 or not all(reader.HasMetaDataKey(k, key) for k in range(count)):
        return
    normal = np.asarray(image.GetDirection(), float).reshape(3, 3)[:, 2]
    positions = np.array([[float(v) for v in reader.GetMetaData(k, key).split("\\")] for k in range(count)]) @ normal
    gaps = np.diff(np.sort(positions))
    typical = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - typical)))
    if abs(gaps[worst] - typical) > max(0.01 * typical, 1e-3):
        raise InputError(f"{where}: the slices are not evenly spaced ({gaps[worst]:.2f} mm between slices {worst + 1} "
                         f"and {worst + 2}, {typical:.2f} mm elsewhere: a slice missing?); export the complete series")


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
        raise InputError(f"{where} holds a single volume; channel must be 0 or none, got {channel}")
    return image


#: The largest float32: a double beyond it becomes infinite in the models' float32 copy.
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_image(image: sitk.Image, where: str = "the image", check_values: bool = True,
                perpendicular_axes: bool = True) -> sitk.Image:
    """Refuse images the models cannot use; returns the image unchanged when it is fine.

    The grid is checked as :func:`read_image` checks a file's header, so an image that did not come
    from a file (a Slicer volume node) meets the same refusals. ``perpendicular_axes=False`` lets a
    sheared grid through, for an image that is only resampled onto another one (a further channel
    placed by an affine registration).
    """
    size = image.GetSize()
    _check_shape(image.GetDimension(), image.GetNumberOfComponentsPerPixel(), size, where, None)
    _check_geometry(image.GetSpacing(), image.GetDirection(), image.GetDimension(), where, perpendicular_axes)
    if 0 in size:
        raise InputError(f"{where} is empty (size {'x'.join(map(str, size))})")
    if check_values:
        values = sitk.GetArrayViewFromImage(image)
        bad = int(np.count_nonzero(~np.isfinite(values))) if values.dtype.kind == "f" else 0
        if bad:
            raise InputError(f"{where} has {bad} NaN or infinite voxels; fix or mask them before segmenting")
        low, high = values.min(), values.max()
        if low == high:
            raise InputError(
                f"{where} is constant (every voxel is {values.flat[0]}); there is nothing to segment — "
                "check that the right file or series was loaded"
            )
        if max(-float(low), float(high)) > _FLOAT32_MAX:  # only doubles get here: the float32 copy would be infinite
            raise InputError(
                f"{where} has values from {low:.3g} to {high:.3g}, beyond the range of the 32-bit floats the models "
                f"compute in (±{_FLOAT32_MAX:.2g}); no scan holds such values: fix the scale factor in its header "
                "(NIfTI scl_slope) or rescale the image (divide it by a power of ten) and save it again"
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
        try:
            sitk.WriteImage(image, temporary, useCompression=compress)
        except RuntimeError as error:  # ITK says "disk full" or "permission denied" as a RuntimeError
            reason = _itk_reason(error) or "write failed"
            raise OSError(errno.EIO, f"could not write the image ({reason})", str(path)) from None
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
