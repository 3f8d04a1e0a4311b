"""Training throughput of the triplanar network: one patch triple per voxel versus grid cubes.

With ``grid=1`` every sampled voxel is learnt from its own three patches (the paper's scheme).
With ``grid=g`` each sampled voxel brings the g x g x g cube around it, classified from 3 g enlarged
slices: the network computes the same thing per voxel, but neighbours share their convolutions.
Throughput counts voxels with a loss term per second (sampling, forward, backward, Adam step),
for the paper-size network and a smaller one, in float32 and with the default ``mixed_precision``
(bfloat16 autocast where the device has bfloat16 arithmetic), all in the same run.

    .venv/bin/python benchmarks/bench_triplanar_training.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MultiTaskSegLib.sampling import PreparedCase
from MultiTaskSegLib.architectures.triplanar import TriplanarArchitecture
from MultiTaskSegLib.inferers import bfloat16_ready
from MultiTaskSegLib.sampling import BalancedVoxelSampler


def synthetic_cases(size: int) -> list[PreparedCase]:
    """Two tasks on noise volumes: task a labels bright voxels, task b dark ones."""
    rng = np.random.default_rng(0)
    cases = []
    for task, label, sign in (("a", 1, 1.0), ("b", 2, -1.0)):
        image = rng.normal(size=(size, size, size)).astype(np.float32)
        labels = np.where(sign * image > 1.0, label, 0).astype(np.int16)
        cases.append(PreparedCase(task, task, image, labels, np.ones(image.shape, dtype=bool)))
    return cases


def throughput(
    network_arguments: dict,
    grid: int,
    batch_size: int,
    steps: int,
    sampler: BalancedVoxelSampler,
    device: torch.device,
    mixed_precision: bool = True,
    warm_up: int = 2,
) -> tuple[float, float, float]:
    """(seconds per step, CPU seconds per step, labelled voxels per second) after ``warm_up`` untimed steps.

    The first steps pay for kernel selection and for growing the allocator's pools."""
    torch.manual_seed(0)
    architecture = TriplanarArchitecture(3, ("a", "b"), grid=grid, mixed_precision=mixed_precision, **network_arguments)
    architecture.network.to(device).train()
    optimizer = architecture.make_optimizer()
    rng = np.random.default_rng(0)
    voxels = 0.0
    for number in range(warm_up + steps):
        if number == warm_up:
            start, start_cpu, voxels = time.perf_counter(), time.process_time(), 0.0
        step = architecture.training_step(architecture.sample_batch(sampler, batch_size, rng), device)
        optimizer.zero_grad()
        step.loss.backward()
        optimizer.step()
        voxels += step.parts["voxels"]  # reading it synchronises a GPU
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    return seconds / steps, cpu_seconds / steps, voxels / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="grids 1 and 3 only, two timed steps each")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--grids", default=None, help="comma-separated grid sides (default 1,3,4; quick 1,3)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per setting (default 3, quick 2)")
    parser.add_argument(
        "--paper-batch",
        type=int,
        default=None,
        help="sampled voxels per step for the paper-size network (default 16 on CPU to bound memory, 210 on CUDA)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    arguments = parser.parse_args()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    device = torch.device(arguments.device)
    grids = [int(g) for g in (arguments.grids or ("1,3" if arguments.quick else "1,3,4")).split(",")]
    steps = arguments.steps or (2 if arguments.quick else 3)
    paper_batch = arguments.paper_batch or (210 if device.type == "cuda" else 16)
    sampler = BalancedVoxelSampler(synthetic_cases(48), {"a": [1], "b": [2]})
    settings = [
        ("paper (25 layers, 32 kernels)", {}, paper_batch),
        ("small (8 layers, 16 kernels, 64 FC)", {"layers": 8, "channels": 16, "hidden_features": 64}, 210),
    ]
    print(f"device: {device}, torch threads: {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}, steps: {steps}")
    print("voxels/s counts voxels with a loss term per wall-clock second (CPU s/step: process CPU time)")
    precision = "bfloat16" if bfloat16_ready(device) else "float32 (no bfloat16 arithmetic here)"
    header = ("network", "grid", "batch", "precision", "s/step", "CPU s/step", "voxels/s", "vs grid 1", "vs float32")
    print("{:38s} {:>4s} {:>5s} {:>9s} {:>8s} {:>10s} {:>10s} {:>9s} {:>10s}".format(*header))
    for title, network_arguments, batch_size in settings:
        baseline = None
        for grid in grids:
            float32_rate = None
            for mixed in (False, True):
                seconds, cpu_seconds, rate = throughput(network_arguments, grid, batch_size, steps, sampler, device, mixed)
                baseline = baseline or (rate if grid == 1 else None)
                float32_rate = float32_rate or rate
                ratio = f"{rate / baseline:8.1f}x" if baseline else "        -"
                print(f"{title:38s} {grid:4d} {batch_size:5d} {precision[:9] if mixed else 'float32':>9s} {seconds:8.2f} "
                      f"{cpu_seconds:10.2f} {rate:10.1f} {ratio} {rate / float32_rate:9.2f}x")


if __name__ == "__main__":
    main()
