"""End-to-end ``segment`` of a real 256³ T1 with the bundled brain model, against MONAI's UNet.

Each setting runs in a fresh process (so its peak memory is its own). Ours go through
``segment_image``, the call behind ``multitaskseg segment``: float32, bfloat16 without the locating
pass, and the default (bfloat16, locating the brain on every 4th axial slice first, then whole
slices). ``--model`` times another model folder the same way (e.g. an earlier version). The labels of
each are compared with the float32 ones (Dice per class). The baselines, measured in the same run:
MONAI's 3-D UNet (16→256 channels, 2 residual units, 7 outputs) through MONAI's
``sliding_window_inference`` (96³ windows, overlap 0.25) on a random volume of the same shape, in
float32 and in bfloat16 autocast; only the network and an arg-max are timed for MONAI (no reading,
normalising or resampling), which favours MONAI. MONAI is optional (``pip install monai``).
Each setting runs ``--repeats`` times in its process; the median is reported.

    .venv/bin/python benchmarks/bench_brain_inference.py [--input T1.nii.gz] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = ROOT.parent / "shared" / "data" / "brain_fs" / "fstd-sub-01" / "t1_head.nii.gz"

PEAK = """
# VmHWM is this process's own peak; ru_maxrss can carry a forking parent's over exec.
status = [line for line in open("/proc/self/status")] if sys.platform.startswith("linux") else []
peak = [int(line.split()[1]) for line in status if line.startswith("VmHWM")]
print(json.dumps({{"seconds": seconds, "peak_gib": (peak[0] if peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 2**20}}))
"""

OURS = """
import json, resource, sys, time, torch
import SimpleITK as sitk
sys.path.insert(0, {root!r})
from MultiTaskSegLib.imageio import read_image
from MultiTaskSegLib.inference import segment_image
from MultiTaskSegLib.model_files import load_model
torch.set_num_threads({threads})
model = load_model({model!r})
config = model.architecture.config
config.mixed_precision = {mixed}
if not {locate}:
    config.locate_stride = 0
image = read_image({input!r})
times = []
for _ in range({repeats}):
    started = time.perf_counter()
    result = segment_image(model, image, ["brain_t1_mri"], device="cpu")
    times.append(time.perf_counter() - started)
seconds = sorted(times)[len(times) // 2]
sitk.WriteImage(result.labels, {output!r})
""" + PEAK

MONAI = """
import json, resource, sys, time, torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet
torch.set_num_threads({threads})
network = UNet(spatial_dims=3, in_channels=1, out_channels=7, channels=(16, 32, 64, 128, 256),
               strides=(2, 2, 2, 2), num_res_units=2).eval()
volume = torch.rand(1, 1, *{shape!r})
times = []
for _ in range({repeats}):
    started = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled={mixed}):
        labels = sliding_window_inference(volume, (96, 96, 96), 4, network, overlap=0.25).argmax(dim=1)
    times.append(time.perf_counter() - started)
seconds = sorted(times)[len(times) // 2]
""" + PEAK

#: name, code, settings; the first of ours is the float32 baseline of the label comparison.
SETTINGS = (
    ("ours, float32", OURS, {"mixed": False, "locate": True}),
    ("ours, bfloat16, no locating pass", OURS, {"mixed": True, "locate": False}),
    ("ours, default (bfloat16)", OURS, {"mixed": True, "locate": True}),
    ("MONAI UNet, float32", MONAI, {"mixed": False}),
    ("MONAI UNet, bfloat16", MONAI, {"mixed": True}),
)


def run(code: str, **values) -> dict:
    finished = subprocess.run([sys.executable, "-c", code.format(root=str(ROOT), **values)], capture_output=True, text=True)
    if finished.returncode:
        sys.exit(f"a benchmark process failed:\n{finished.stderr[-2000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def dice_per_label(reference: np.ndarray, other: np.ndarray) -> list[float]:
    return [2 * np.count_nonzero((reference == label) & (other == label))
            / max(1, np.count_nonzero(reference == label) + np.count_nonzero(other == label))
            for label in range(1, int(max(reference.max(), other.max())) + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="brain-t1")
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting; the median is reported")
    args = parser.parse_args()
    if not args.input.exists():
        sys.exit(f"{args.input} is absent: give --input, a T1 scan (the default lies in ../shared/data)")
    shape = sitk.ReadImage(str(args.input)).GetSize()[::-1]
    settings = [s for s in SETTINGS if s[1] is OURS or importlib.util.find_spec("monai") is not None]
    timings, labels = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for number, (name, code, values) in enumerate(settings):
            output = Path(folder) / f"labels_{number}.nii.gz"
            timings[name] = run(code, threads=args.threads, model=args.model, input=str(args.input), output=str(output),
                                shape=tuple(shape), repeats=args.repeats, **values)
            if code is OURS:
                labels[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(output)))
    print(f"{args.input.name} ({'x'.join(map(str, shape[::-1]))}), model {args.model}, {args.threads} threads, "
          f"median of {args.repeats} run(s)"
          + ("" if len(settings) == len(SETTINGS) else "; MONAI is not installed: no MONAI baseline"))
    monai = {name: timing["seconds"] for name, timing in timings.items() if name.startswith("MONAI")}
    baseline = settings[0][0]
    for name, timing in timings.items():
        line = (f"  {name:36s} {timing['seconds']:7.1f} s  peak {timing['peak_gib']:.2f} GiB  "
                f"{timings[baseline]['seconds'] / timing['seconds']:.2f}x of ours float32")
        if monai:
            line += "  " + ", ".join(f"{seconds / timing['seconds']:.2f}x of {name.removeprefix('MONAI UNet, ')} MONAI"
                                     for name, seconds in monai.items())
        if name in labels and name != baseline:
            line += "  labels vs float32, Dice per class " + " ".join(f"{d:.3f}" for d in dice_per_label(labels[baseline], labels[name]))
        print(line)


if __name__ == "__main__":
    main()
