"""Draw what the brain model trains on: real, whole-head and label-synthesised slices after augmentation.

    .venv/bin/python scripts/augmentation_figure.py --cases runs/brain/fold1/train/brain_t1_mri/fstd-sub-06 \\
        runs/brain/fold1/train/brain_t1_mri/fstd-sub-06_head runs/brain/fold1/train/brain_t1_mri/synth_training_seg_01 \\
        --out docs/figures/brain_augmentation.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from MultiTaskSegLib.architectures.multiplanar import PLANE_NAMES, MultiplanarUNet2DArchitecture  # noqa: E402
from MultiTaskSegLib.datasets import find_cases, prepare_case  # noqa: E402
from MultiTaskSegLib.overlay import class_colors  # noqa: E402
from MultiTaskSegLib.sampling import BalancedVoxelSampler  # noqa: E402
from MultiTaskSegLib.tasks import LabelSpace, get_task  # noqa: E402

TASK = "brain_t1_mri"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", type=Path, required=True, help="case folders (image + label, or label only)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-case", type=int, default=4)
    args = parser.parse_args()
    task, label_space = get_task(TASK), LabelSpace.from_names([TASK])
    architecture = MultiplanarUNet2DArchitecture(len(label_space), [TASK], patch_size=(128, 128))
    colours = class_colors(task)
    figure, axes = plt.subplots(len(args.cases), args.per_case * 2, figsize=(2 * args.per_case * 2, 2.1 * len(args.cases)))
    for row, folder in enumerate(args.cases):
        files = find_cases(task, folder, label_maps_only=True)[0]
        case = prepare_case(files, label_space)
        sampler = BalancedVoxelSampler([case], {TASK: label_space.indices_for_task(TASK)})
        rng = np.random.default_rng([args.seed, row])
        batch = architecture.sample_batch(sampler, args.per_case, rng)
        kind = "label map only (synthesised)" if case.image is None else folder.name
        for column in range(args.per_case):
            image = batch["image"][column, 0].numpy()
            labels = batch["labels"][column].numpy()
            overlay = np.zeros((*labels.shape, 4))
            for index, colour in colours.items():
                overlay[labels == index] = (*colour, 0.55)
            axes[row, 2 * column].imshow(image, cmap="gray", vmin=0, vmax=max(1e-3, float(np.percentile(image, 99.5))))
            axes[row, 2 * column + 1].imshow(image, cmap="gray", vmin=0, vmax=max(1e-3, float(np.percentile(image, 99.5))))
            axes[row, 2 * column + 1].imshow(overlay)
        axes[row, 0].set_title(kind, fontsize=8, loc="left")
    for axis in axes.ravel():
        axis.axis("off")
    figure.suptitle(f"Training slices after augmentation (planes drawn at random from {', '.join(PLANE_NAMES)})", fontsize=9)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
