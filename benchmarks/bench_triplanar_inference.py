"""Dense prediction with the paper-size triplanar network: a naive stack, the old dense path and the new one.

The volume is a ``size``^3 grid holding a brain-sized ellipsoid of tissue-like texture (three
intensity classes, smooth boundaries, noise) with zeros outside, as a skull-stripped, normalised T1
scan at 1 mm. All three methods use the same weights (random, with batch-norm statistics taken on
the volume, so the activations have the scale of a trained network):

* naive: plain PyTorch, float32, NCHW, the convolution stack with its batch norms on every whole
  slice of the zero-padded volume in each of the three planes, then the classifier;
* old dense: the dense path as it was before issue 15 (float32, batch norm unfolded, the whole
  volume in 64^3 blocks);
* new: :func:`predict_volume` with its defaults (batch norm folded, channels-last, bfloat16 on
  CPUs with bfloat16 arithmetic, 128^3 blocks in the non-zero bounding box, each pass of slices
  cropped to the rectangle of the voxels near non-zero ones).

It prints seconds and ratios, how far the labels of the new path are from the float32 ones inside
the ellipsoid (a worst case: the random network's probabilities are close to uniform, so many
voxels are near-ties) and on a brain phantom with the bundled trained triplanar model, and the
largest difference between the old dense path and the patch-wise definition on a few foreground
voxels.

The default 256^3 grid needs about 10 GB of memory: the naive stack keeps the 96 float32 features
of every voxel before it classifies them; ``--sample N`` times the naive stack and the old dense
path on N slices per plane / N blocks and scales them (minutes instead of half an hour on two cores). With ``--input T1.nii.gz`` it also times the new path on real scans (normalised for the brain task)
against the naive stack on a grid of the same shape, and ``segment_image`` end to end on them with a
paper-size model (the same network).

    .venv/bin/python benchmarks/bench_triplanar_inference.py [--size 256] [--quick] [--threads 2] [--device cuda]
        [--sample 8] [--input T1.nii.gz ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MultiTaskSegLib.architectures.triplanar import (
    BOX_MARGIN,
    DEFAULT_BLOCK_VOXELS,
    PASS_BYTES,
    _block_logits,
    choose_block_shape,
    iterate_blocks,
    pad_volume,
    predict_volume,
    predict_voxels_patchwise,
)
from MultiTaskSegLib.preprocessing import nonzero_box
from MultiTaskSegLib.inferers import bfloat16_ready
from MultiTaskSegLib.imageio import read_image
from MultiTaskSegLib.inference import segment_image
from MultiTaskSegLib.model_files import SegmentationModel, load_model
from MultiTaskSegLib.networks.triplanar import TriplanarNetwork
from MultiTaskSegLib.phantoms import generate_case
from MultiTaskSegLib.preprocessing import prepare_image
from MultiTaskSegLib.tasks import get_task

#: Semi-axes (z, y, x) of the brain ellipsoid in voxels of a 256^3 grid at 1 mm (about 130 x 170 x 140 mm).
BRAIN_SEMI_AXES = (65, 85, 70)
#: The old dense path's block: 64^3 voxels (its default cap).
OLD_BLOCK_VOXELS = 64**3


def brain_phantom(size: int, seed: int = 0) -> np.ndarray:
    """A ``size``^3 image: a textured ellipsoid scaled from a brain in a 256^3 grid, zeros outside."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 1, *(max(2, size // 12),) * 3, generator=generator)
    field = F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=False)[0, 0].numpy()
    low, high = np.quantile(field, [0.3, 0.6])
    tissue = np.where(field < low, 1, np.where(field < high, 2, 3))  # CSF-, grey- and white-like
    noise = np.random.default_rng(seed).normal(0.0, 0.04, (size,) * 3)
    axes = [(np.arange(size) - (size - 1) / 2) / (semi * size / 256) for semi in BRAIN_SEMI_AXES]
    inside = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2 <= 1.0
    intensity = np.array([0.0, 0.35, 0.65, 1.0])[tissue]
    return np.where(inside, np.clip(intensity + noise, 1e-3, None), 0.0).astype(np.float32)


def calibrated_network(labels: int, image: np.ndarray, device: torch.device) -> TriplanarNetwork:
    """The paper-size network with random weights and the batch-norm statistics of a block of ``image``."""
    torch.manual_seed(0)
    network = TriplanarNetwork(labels).to(device)
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # a plain average over the calibration block
    margin, side = network.margin, 12
    corner = [extent // 2 - side // 2 for extent in image.shape]
    padded = torch.from_numpy(pad_volume(image, margin)).to(device)
    region = padded[tuple(slice(start, start + side + 2 * margin) for start in corner)]
    network.train()
    with torch.no_grad():
        network.forward_block(region[margin : margin + side][None], region[:, margin : margin + side].permute(1, 0, 2)[None],
                              region[:, :, margin : margin + side].permute(2, 0, 1)[None])
    return network.eval()


def trained_model_agreement(device: torch.device, small: bool) -> tuple[float, float]:
    """Label agreement of the new path with its float32 version, for the bundled trained triplanar
    model (12 layers of 16 kernels) on a brain phantom of the size it was trained on."""
    model = load_model("triplanar-phantoms")
    task = model.label_space.task("brain_t1_mri")
    image, _ = generate_case("brain_t1_mri", seed=3, size="small" if small else "full")
    working, foreground, _ = prepare_image(image, task, task.working_spacing_mm)
    network = model.architecture.network
    float32 = predict_volume(network, working, device, mixed_precision=False)
    return label_agreement(float32, predict_volume(network, working, device), foreground)


def naive_probabilities(network: TriplanarNetwork, image: np.ndarray, device: torch.device) -> np.ndarray:
    """Plain PyTorch: each plane's whole slices through the stack (NCHW, float32), then the classifier."""
    margin, channels = network.margin, network.features.channels
    padded = torch.from_numpy(pad_volume(image, margin)).to(device)
    depth, height, width = image.shape
    features = np.empty((3 * channels, depth, height, width), np.float32)
    with torch.no_grad():
        for z in range(depth):
            features[:channels, z] = network.features.blocks(padded[z + margin][None, None])[0].cpu().numpy()
        for y in range(height):
            features[channels : 2 * channels, :, y] = network.features.blocks(padded[:, y + margin][None, None])[0].cpu().numpy()
        for x in range(width):
            features[2 * channels :, :, :, x] = network.features.blocks(padded[:, :, x + margin][None, None])[0].cpu().numpy()
        flat = features.reshape(3 * channels, -1)
        probabilities = np.empty((network.num_labels, flat.shape[1]), np.float32)
        for start in range(0, flat.shape[1], 2**16):
            part = torch.from_numpy(flat[:, start : start + 2**16]).to(device)[None]
            probabilities[:, start : start + 2**16] = network.classifier(part)[0].softmax(dim=0).cpu().numpy()
    return probabilities.reshape(network.num_labels, *image.shape)


def old_dense_probabilities(network: TriplanarNetwork, image: np.ndarray, device: torch.device) -> np.ndarray:
    """The dense path before issue 15: float32, batch norm unfolded, every 64^3 block of the volume."""
    padded = torch.from_numpy(pad_volume(image, network.margin)).to(device)
    pass_values = PASS_BYTES.get(device.type, PASS_BYTES["cpu"]) // padded.element_size()
    probabilities = np.empty((network.num_labels, *image.shape), np.float32)
    with torch.no_grad():
        for block in iterate_blocks(image.shape, choose_block_shape(image.shape, OLD_BLOCK_VOXELS)):
            logits = _block_logits(network, padded, block, pass_values)
            probabilities[(slice(None), *block)] = logits.float().softmax(dim=0).cpu().numpy()
    return probabilities


def real_scan(path: str) -> np.ndarray:
    """A T1 scan as inference sees it: normalised for the brain task, on its 1 mm working grid."""
    task = get_task("brain_t1_mri")
    working, _, _ = prepare_image(read_image(path), task, task.working_spacing_mm)
    return working


def time_real_scans(paths: list[str], network: TriplanarNetwork, device: torch.device, grid_shape: tuple[int, ...],
                    grid_naive_seconds: float, max_block_voxels: int) -> dict[str, float]:
    """The new path on real scans, against the naive stack on a grid of the same shape (the naive
    stack computes every slice whatever it holds, so its time depends on the grid only). Returns
    the naive seconds of each scan."""
    naive = {}
    for path in paths:
        image = real_scan(path)
        naive_seconds = grid_naive_seconds if image.shape == grid_shape else timed(
            lambda: naive_probabilities(network, image, device), device)[1]
        naive[path] = naive_seconds
        box = nonzero_box(image, BOX_MARGIN)
        box_share = np.prod([part.stop - part.start for part in box]) / image.size if box else 1.0
        print(f"{path}: working grid {'x'.join(map(str, image.shape))}, non-zero box {box_share:.1%} of it, "
              f"naive {naive_seconds:.2f} s")
        for name, mixed in (("new, float32 (mixed_precision off)", False), ("new default", True)):
            seconds = timed(lambda: predict_volume(network, image, device, max_block_voxels=max_block_voxels,
                                                   mixed_precision=mixed), device)[1]
            print(f"  {name:34s} {seconds:9.2f} s   {seconds / naive_seconds:6.3f} of naive   "
                  f"{naive_seconds / seconds:6.2f}x faster than naive")
    return naive


def time_end_to_end(naive: dict[str, float], network: TriplanarNetwork, device: torch.device) -> None:
    """``segment_image`` (what ``multitaskseg segment`` runs: reading aside, normalising, resampling,
    prediction, labels on the source grid) with a paper-size triplanar model of the paper's three
    tasks, whose network is ``network``, against the naive stack (``naive``: seconds per scan path)."""
    label_space = load_model("triplanar-phantoms").label_space
    model = SegmentationModel.create("paper-size-triplanar", "triplanar", label_space)
    if len(label_space) != network.classifier.num_labels:
        print("end to end: skipped, --labels differs from the paper's three tasks")
        return
    model.architecture.network.load_state_dict(network.state_dict())
    for path, naive_seconds in naive.items():
        image = read_image(path)
        seconds = timed(lambda: segment_image(model, image, ["brain_t1_mri"], device=str(device)), device)[1]
        print(f"{path}: segment_image end to end with the paper-size network {seconds:9.2f} s   "
              f"{seconds / naive_seconds:6.3f} of naive   {naive_seconds / seconds:6.2f}x faster than naive")


def sampled_naive_seconds(network: TriplanarNetwork, image: np.ndarray, device: torch.device, count: int) -> float:
    """The naive stack's time from ``count`` whole slices per plane and 2^16 voxels through the
    classifier, scaled to the whole grid: every slice of a plane costs the same, whatever it holds."""
    margin = network.margin
    padded = torch.from_numpy(pad_volume(image, margin)).to(device)
    seconds = 0.0
    with torch.no_grad():
        for axis, extent in enumerate(image.shape):
            chosen = range(extent // (2 * count), extent, max(1, extent // count))[:count]
            spent = timed(lambda: [network.features.blocks(padded.select(axis, index + margin)[None, None]).cpu()
                                   for index in chosen], device)[1]
            seconds += spent * extent / len(chosen)
        features = torch.randn(1, network.classifier.in_features, 2**16, device=device)
        seconds += timed(lambda: network.classifier(features).softmax(dim=1).cpu(), device)[1] * image.size / 2**16
    return seconds


def sampled_old_dense_seconds(network: TriplanarNetwork, image: np.ndarray, device: torch.device, count: int) -> float:
    """The old dense path's time from ``count`` of its 64^3 blocks, scaled by voxels to the whole grid."""
    padded = torch.from_numpy(pad_volume(image, network.margin)).to(device)
    pass_values = PASS_BYTES.get(device.type, PASS_BYTES["cpu"]) // padded.element_size()
    blocks = iterate_blocks(image.shape, choose_block_shape(image.shape, OLD_BLOCK_VOXELS))
    chosen = blocks[:: max(1, len(blocks) // count)][:count]
    with torch.no_grad():
        spent = timed(lambda: [_block_logits(network, padded, block, pass_values).float().softmax(dim=0).cpu()
                               for block in chosen], device)[1]
    return spent * image.size / sum(np.prod([part.stop - part.start for part in block]) for block in chosen)


def timed(function, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def label_agreement(reference: np.ndarray, other: np.ndarray, inside: np.ndarray) -> tuple[float, float]:
    """Share of ``inside`` voxels with the same arg-max, and the lowest Dice per label present."""
    first, second = reference.argmax(axis=0)[inside], other.argmax(axis=0)[inside]
    dices = [2 * np.sum((first == label) & (second == label)) / (np.sum(first == label) + np.sum(second == label))
             for label in np.union1d(np.unique(first), np.unique(second))]
    return float(np.mean(first == second)), float(min(dices))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 64^3 grid and a small brain phantom")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, help="side of the grid in voxels (default 256, quick 64)")
    parser.add_argument("--voxels", type=int, default=32, help="foreground voxels checked patch-wise")
    parser.add_argument("--labels", type=int, default=9, help="label space size (9 = the paper's three tasks)")
    parser.add_argument("--max-block-voxels", type=int, default=DEFAULT_BLOCK_VOXELS, help="the new path's block cap")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--sample", type=int, metavar="N",
                        help="time the naive stack on N slices per plane and the old dense path on N of its blocks, "
                             "scaled to the grid (their cost does not depend on what the slices hold); labels are then "
                             "compared with the new path in float32")
    parser.add_argument("--input", action="append", default=[], metavar="T1",
                        help="also time the new path on this T1 scan (repeatable), against the naive stack")
    arguments = parser.parse_args()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    device = torch.device(arguments.device)
    size = arguments.size or (64 if arguments.quick else 256)

    image = brain_phantom(size)
    inside = image > 0
    network = calibrated_network(arguments.labels, image, device)
    warm_up = image[size // 2 - 8 : size // 2 + 8, size // 2 - 8 : size // 2 + 8, size // 2 - 8 : size // 2 + 8]
    for method in (naive_probabilities, old_dense_probabilities, predict_volume):  # kernel choice, allocator
        method(network, warm_up, device)
    predict_volume(network, warm_up, device, mixed_precision=False)

    if arguments.sample:
        naive = old = None
        naive_seconds = sampled_naive_seconds(network, image, device, arguments.sample)
        old_seconds = sampled_old_dense_seconds(network, image, device, arguments.sample)
    else:
        naive, naive_seconds = timed(lambda: naive_probabilities(network, image, device), device)
        old, old_seconds = timed(lambda: old_dense_probabilities(network, image, device), device)
    new, new_seconds = timed(lambda: predict_volume(network, image, device, max_block_voxels=arguments.max_block_voxels), device)
    float32, float32_seconds = timed(
        lambda: predict_volume(network, image, device, max_block_voxels=arguments.max_block_voxels, mixed_precision=False),
        device)

    reference, reference_name = (float32, "new float32") if old is None else (old, "old dense float32")
    coords = np.argwhere(inside)[np.random.default_rng(1).choice(int(inside.sum()), arguments.voxels, replace=False)]
    patchwise = predict_voxels_patchwise(network, pad_volume(image, network.margin), coords)
    patchwise_difference = np.abs(reference[:, coords[:, 0], coords[:, 1], coords[:, 2]].T - patchwise).max()
    precision = {"cuda": "float16", "cpu": "bfloat16" if bfloat16_ready(device) else "float32"}.get(device.type, "float32")

    print(f"device: {device}, new path in {precision}, torch threads: {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"network: paper size (25 layers, 32 kernels, 51x51 patches, 192 FC), {arguments.labels} labels")
    print(f"volume: {size}^3 grid, ellipsoid foreground {inside.mean():.1%} of the voxels; new blocks of at most "
          f"{arguments.max_block_voxels} voxels")
    sampled = f" (timed on {arguments.sample} slices per plane / blocks, scaled)" if arguments.sample else ""
    for name, seconds in (("naive NCHW float32 whole slices", naive_seconds), ("old dense (float32, 64^3 blocks)", old_seconds),
                          ("new, float32 (mixed_precision off)", float32_seconds), (f"new default ({precision})", new_seconds)):
        print(f"{name:36s} {seconds:9.2f} s   {seconds / naive_seconds:6.3f} of naive   "
              f"{naive_seconds / seconds:6.2f}x faster than naive   {old_seconds / seconds:6.2f}x faster than old"
              f"{sampled if seconds in (naive_seconds, old_seconds) else ''}")
    for name, probabilities in (("new default", new), ("new float32", float32), ("naive", naive)):
        if probabilities is None or probabilities is reference:
            continue
        agreement, dice = label_agreement(reference, probabilities, inside)
        print(f"labels of {name} vs {reference_name} in the foreground: {agreement:.4%} agree, lowest Dice per label "
              f"{dice:.4f}, max |probability difference| {np.abs(probabilities - reference)[:, inside].max():.2e}")
    print(f"mean top probability of the random network in the foreground: {reference.max(axis=0)[inside].mean():.3f}")
    agreement, dice = trained_model_agreement(device, arguments.quick)
    print(f"bundled trained model (triplanar-phantoms) on a brain phantom, new default vs float32: {agreement:.4%} of the "
          f"foreground labels agree, lowest Dice per label {dice:.4f}")
    print(f"max |{reference_name} - patch-wise| probability on {arguments.voxels} foreground voxels: "
          f"{patchwise_difference:.2e}")
    naive_per_scan = time_real_scans(arguments.input, network, device, image.shape, naive_seconds, arguments.max_block_voxels)
    time_end_to_end(naive_per_scan, network, device)


if __name__ == "__main__":
    main()
