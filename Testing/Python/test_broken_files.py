"""Broken image files, generated the way disks, transfers and hand-edited headers break them.

Every variant must be either read as a sound volume (positive spacing, a real grid, the announced
voxels) or refused with :class:`InputError` naming the problem, and never make the reader allocate
what a lying header asks for. Reading runs in a child process whose peak memory is measured.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MultiTaskSegLib.cli import main as cli_main

SHAPE = (10, 12, 14)  # (z, y, x)


def sound_image() -> sitk.Image:
    values = (np.random.default_rng(0).random(SHAPE) * 100 + 1).astype(np.float32)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.9, 1.1, 2.5))
    return image


def nrrd_with_header(text_header: str, data: bytes, path: Path) -> Path:
    path.write_bytes(text_header.encode() + b"\n" + data)
    return path


def raw_nrrd_header(sizes: str = "14 12 10", directions: str = "(0.9,0,0) (0,1.1,0) (0,0,2.5)", encoding: str = "raw") -> str:
    return ("NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\n"
            f"sizes: {sizes}\nspace directions: {directions}\nkinds: domain domain domain\n"
            f"endian: little\nencoding: {encoding}\nspace origin: (0,0,0)\n")


def broken_files(folder: Path) -> dict[str, Path]:
    """name -> file; a few are sound and must be read."""
    image = sound_image()
    voxels = sitk.GetArrayFromImage(image).tobytes()
    files: dict[str, Path] = {}
    for suffix, compress in ((".nii", False), (".nii.gz", True), (".nrrd", False), (".nrrd", True), (".mha", False), (".mha", True)):
        key = f"{suffix.strip('.')}{'-gz' if compress and suffix != '.nii.gz' else ''}"
        whole = folder / f"sound-{key}{suffix}"
        sitk.WriteImage(image, str(whole), useCompression=compress)
        files[f"sound {key}"] = whole
        data = whole.read_bytes()
        for kept in (0.05, 0.5, 0.97):
            cut = folder / f"cut{int(kept * 100)}-{key}{suffix}"
            cut.write_bytes(data[: max(1, int(len(data) * kept))])
            files[f"{key} cut to {kept:.0%}"] = cut
    nan = sitk.GetArrayFromImage(image)
    nan[3, 4, 5] = np.nan
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        path = folder / f"nan{suffix}"
        nan_image = sitk.GetImageFromArray(nan)
        nan_image.CopyInformation(image)
        sitk.WriteImage(nan_image, str(path))
        files[f"NaN voxel {suffix}"] = path
    files["nrrd 900-cubed header over 1 kB"] = nrrd_with_header(raw_nrrd_header("900 900 900"), b"\0" * 1000, folder / "huge.nrrd")
    files["nrrd gzip 900-cubed header over 1 kB"] = nrrd_with_header(
        raw_nrrd_header("900 900 900", encoding="gzip"), gzip.compress(b"\0" * 1000), folder / "huge-gz.nrrd")
    files["nrrd zero spacing"] = nrrd_with_header(raw_nrrd_header(directions="(0,0,0) (0,1.1,0) (0,0,2.5)"), voxels, folder / "zero.nrrd")
    files["nrrd singular direction"] = nrrd_with_header(raw_nrrd_header(directions="(1,0,0) (1,0,0) (0,0,2.5)"), voxels, folder / "singular.nrrd")
    files["nrrd flipped axis (sound)"] = nrrd_with_header(raw_nrrd_header(directions="(-0.9,0,0) (0,1.1,0) (0,0,2.5)"), voxels, folder / "flipped.nrrd")
    files["nrrd sizes larger than data"] = nrrd_with_header(raw_nrrd_header("14 12 20"), voxels, folder / "short.nrrd")
    nifti = (folder / "sound-nii.nii").read_bytes()
    for name, spacing in (("zero", 0.0), ("negative", -1.0), ("nan", float("nan"))):
        header = bytearray(nifti)
        header[80:84] = np.float32(spacing).tobytes()  # pixdim[1]
        path = folder / f"spacing-{name}.nii"
        path.write_bytes(bytes(header))
        files[f"nii {name} spacing"] = path
    header = bytearray(nifti)
    header[42:44] = np.int16(400).tobytes()  # dim[1]: a size larger than the data
    files["nii size larger than data"] = folder / "large-dim.nii"
    files["nii size larger than data"].write_bytes(bytes(header))
    return files


CHILD = """
import json, sys
from MultiTaskSegLib.errors import InputError
from MultiTaskSegLib.imageio import read_image
outcome = {}
for name, path in json.loads(sys.argv[1]).items():
    try:
        image = read_image(path)
        outcome[name] = ["read", list(image.GetSize()), list(image.GetSpacing())]
    except InputError as error:
        outcome[name] = ["refused", str(error)]
    except Exception as error:
        outcome[name] = ["crashed", f"{type(error).__name__}: {error}"]
# VmHWM is this process's own peak (ru_maxrss would carry the forking parent's over exec).
peak = [line for line in open("/proc/self/status") if line.startswith("VmHWM")]
outcome["peak_mib"] = int(peak[0].split()[1]) / 1024 if peak else 0.0
print(json.dumps(outcome))
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    files = broken_files(tmp_path_factory.mktemp("broken"))
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps({k: str(v) for k, v in files.items()})],
                          capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_every_broken_file_is_read_soundly_or_refused_cleanly(outcomes):
    crashed = {name: result for name, result in outcomes.items() if name != "peak_mib" and result[0] == "crashed"}
    assert not crashed
    for name, result in outcomes.items():
        if name == "peak_mib" or result[0] != "read":
            continue
        size, spacing = result[1], result[2]
        assert size == [14, 12, 10], name  # never a volume padded out with invented voxels
        assert all(s > 0 for s in spacing), name


def test_sound_files_are_read_and_damaged_ones_refused_with_the_reason(outcomes):
    for name, result in outcomes.items():
        if name == "peak_mib":
            continue
        if name.startswith("sound") or "(sound)" in name:
            assert result[0] == "read", (name, result)
        else:
            assert result[0] == "refused", (name, result)
            assert re.search(r"truncated|damaged|NaN|spacing|singular|not an image", result[1]), (name, result[1])
            assert "again" in result[1] or "fix" in result[1], (name, result[1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="the peak memory is read from /proc (Linux)")
def test_a_lying_header_does_not_make_the_reader_allocate_what_it_announces(outcomes):
    assert outcomes["peak_mib"] < 600  # a 900-cubed float volume would take 2.7 GiB


def test_the_cli_refuses_a_damaged_nrrd_with_exit_code_2_and_no_traceback(tmp_path, capsys):
    path = nrrd_with_header(raw_nrrd_header("900 900 900"), b"\0" * 1000, tmp_path / "huge.nrrd")
    code = cli_main(["segment", "--model", "cmunet-phantoms", "--input", str(path),
                     "--output", str(tmp_path / "out.nii.gz"), "--tasks", "brain_t1_mri"])
    error = capsys.readouterr().err
    assert code == 2
    assert "truncated" in error and "Traceback" not in error
    assert not (tmp_path / "out.nii.gz").exists()
