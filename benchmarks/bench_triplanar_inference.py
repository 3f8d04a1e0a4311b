"""Dense versus patch-wise prediction with the paper-size triplanar network, on the same voxels.

Dense prediction classifies a whole volume block by block from its axial, coronal and sagittal
slices; patch-wise prediction runs the network on three 51x51 patches per voxel (timed on a random
subset of voxels and extrapolated per voxel). Both use the same weights, so the benchmark also
reports how far apart their probabilities are on the subset.

    .venv/bin/python benchmarks/bench_triplanar_inference.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MultiTaskSegLib.architectures.triplanar import (
    DEFAULT_BLOCK_VOXELS,
    pad_volume,
    predict_volume,
    predict_voxels_patchwise,
)
from MultiTaskSegLib.networks.triplanar import TriplanarNetwork


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small volume and few patch-wise voxels")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, help="volume side in voxels (default 64, quick 40; 160 on CUDA)")
    parser.add_argument("--voxels", type=int, help="voxels predicted patch-wise (default 64, quick 16; 1024 on CUDA)")
    parser.add_argument("--labels", type=int, default=9, help="label space size (9 = the paper's three tasks)")
    parser.add_argument("--max-block-voxels", type=int, default=DEFAULT_BLOCK_VOXELS)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    arguments = parser.parse_args()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    device = torch.device(arguments.device)
    on_gpu = device.type == "cuda"
    size = arguments.size or (40 if arguments.quick else 160 if on_gpu else 64)
    subset = arguments.voxels or (16 if arguments.quick else 1024 if on_gpu else 64)

    torch.manual_seed(0)
    network = TriplanarNetwork(arguments.labels).to(device).eval()
    rng = np.random.default_rng(0)
    image = rng.normal(size=(size, size, size)).astype(np.float32)
    coords = np.stack([rng.integers(0, size, subset) for _ in range(3)], axis=1)
    padded = pad_volume(image, network.margin)

    # Warm-up (kernel selection, allocator) outside the timings.
    predict_volume(network, image[:16, :16, :16], device)
    predict_voxels_patchwise(network, padded, coords[:2])

    synchronize(device)
    start = time.perf_counter()
    dense = predict_volume(network, image, device, max_block_voxels=arguments.max_block_voxels)
    dense_seconds = time.perf_counter() - start

    start = time.perf_counter()
    patchwise = predict_voxels_patchwise(network, padded, coords, batch_size=256 if on_gpu else 32)
    synchronize(device)
    patchwise_seconds = time.perf_counter() - start

    difference = np.abs(dense[:, coords[:, 0], coords[:, 1], coords[:, 2]].T - patchwise).max()
    dense_rate = image.size / dense_seconds
    patchwise_rate = subset / patchwise_seconds
    precision = " (float16 autocast for dense)" if on_gpu else ""
    print(f"device: {device}{precision}, torch threads: {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    print(f"network: paper size (25 layers, 32 kernels, 51x51 patches, 192 FC), {arguments.labels} labels")
    print(f"volume: {size}^3 = {image.size} voxels, blocks of at most {arguments.max_block_voxels} voxels")
    print(f"dense:      {dense_seconds:8.2f} s  {dense_rate:12.0f} voxels/s")
    print(f"patch-wise: {patchwise_seconds:8.2f} s  {patchwise_rate:12.1f} voxels/s  ({subset} voxels)")
    print(f"speed-up (dense / patch-wise voxels per second): {dense_rate / patchwise_rate:.0f}x")
    print(f"max |dense - patch-wise| probability on the subset: {difference:.2e}")
    print(f"estimated dense time for a 256^3 volume: {256**3 / dense_rate:.0f} s")
    if on_gpu:
        print(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        print(f"peak resident memory of this process: {peak:.2f} GiB")


if __name__ == "__main__":
    main()
