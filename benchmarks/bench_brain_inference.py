"""End-to-end ``segment`` of a real 256³ T1 with the bundled brain model: float32 against bfloat16.

Each setting runs in a fresh process (so its peak memory is its own) through ``segment_image``, the
call behind ``multitaskseg segment``; the float32 run is the baseline measured in the same call.
The labels of the two settings are compared (Dice per class), since bfloat16 must not change them.

    .venv/bin/python benchmarks/bench_brain_inference.py [--input T1.nii.gz] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = ROOT.parent / "shared" / "data" / "brain_fs" / "fstd-sub-01" / "t1_head.nii.gz"

CHILD = """
import json, resource, sys, time, torch
import SimpleITK as sitk
sys.path.insert(0, {root!r})
from MultiTaskSegLib.imageio import read_image
from MultiTaskSegLib.inference import segment_image
from MultiTaskSegLib.model_files import load_model
torch.set_num_threads({threads})
model = load_model({model!r})
model.architecture.config.mixed_precision = {mixed}
image = read_image({input!r})
started = time.perf_counter()
result = segment_image(model, image, ["brain_t1_mri"], device="cpu")
seconds = time.perf_counter() - started
sitk.WriteImage(result.labels, {output!r})
# VmHWM is this process's own peak; ru_maxrss can carry a forking parent's over exec.
status = [line for line in open("/proc/self/status")] if sys.platform.startswith("linux") else []
peak = [int(line.split()[1]) for line in status if line.startswith("VmHWM")]
print(json.dumps({{"seconds": seconds, "peak_gib": (peak[0] if peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 2**20}}))
"""


def run(model: str, image: Path, mixed: bool, threads: int, output: Path) -> dict:
    code = CHILD.format(root=str(ROOT), threads=threads, model=model, mixed=mixed, input=str(image), output=str(output))
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(finished.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="brain-t1")
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not args.input.exists():
        sys.exit(f"{args.input} is absent: give --input, a T1 scan (the default lies in ../shared/data)")
    with tempfile.TemporaryDirectory() as folder:
        outputs = {mixed: Path(folder) / f"labels_{mixed}.nii.gz" for mixed in (False, True)}
        timings = {mixed: run(args.model, args.input, mixed, args.threads, outputs[mixed]) for mixed in (False, True)}
        fp32, bf16 = (sitk.GetArrayFromImage(sitk.ReadImage(str(outputs[m]))) for m in (False, True))
    size = "x".join(map(str, sitk.ReadImage(str(args.input)).GetSize()))
    print(f"{args.input.name} ({size}), model {args.model}, {args.threads} threads")
    for mixed, name in ((False, "float32 (baseline)"), (True, "bfloat16 autocast")):
        timing = timings[mixed]
        print(f"  {name:20s} {timing['seconds']:7.1f} s  peak {timing['peak_gib']:.2f} GiB  "
              f"speed-up {timings[False]['seconds'] / timing['seconds']:.2f}x")
    dice = []
    for label in range(1, int(max(fp32.max(), bf16.max())) + 1):
        a, b = fp32 == label, bf16 == label
        dice.append(2 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b)))
    print("  label agreement float32 vs bfloat16, Dice per class: " + ", ".join(f"{d:.4f}" for d in dice))


if __name__ == "__main__":
    main()
