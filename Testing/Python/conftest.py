"""Shared fixtures: the real data in ../shared/data (skipped, saying so, when absent) and torch threads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent; these tests need ../shared/data beside the project")
    return SHARED_DATA


def write_tiny_dataset(root: Path, cases: int = 3, size: int = 14) -> Path:
    """Tiny labelled cases for two tasks on disk, in the layout ``ROOT/TASK/CASE/image+label``.

    breast_mri: an MR volume with a bright slab (class 1); cardiac_cta: a CT volume (air at -1000 HU,
    tissue at 40 HU) with a contrast-filled tube at 400 HU (class 1). Spacing equals each task's
    working spacing so no resampling enlarges them.
    """
    import numpy as np
    import SimpleITK as sitk

    from MultiTaskSegLib.tasks import get_task

    for task_number, task in enumerate(("breast_mri", "cardiac_cta")):
        spacing = get_task(task).working_spacing_mm
        for number in range(cases):
            rng = np.random.default_rng([task_number, number])
            zz, yy, xx = np.mgrid[:size, :size, :size]
            label = np.zeros((size, size, size), np.uint8)
            if task == "breast_mri":
                start = 4 + number % 3
                label[:, start:start + 3, 2:-2] = 1
                image = 100 + 20 * (label == 0) * (yy < size - 2) + rng.normal(0, 3, label.shape)
                image[:, size - 2:] = 0  # air behind the body
                image[label == 1] = 40 + rng.normal(0, 3, int(label.sum()))
            else:
                centre = size / 2 + (number % 3) - 1
                label[((yy - centre) ** 2 + (xx - centre) ** 2) <= 3] = 1
                image = np.where((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 2.2) ** 2, 40.0, -1000.0)
                image = image + rng.normal(0, 10, label.shape)
                image[label == 1] = 400 + rng.normal(0, 10, int(label.sum()))
            folder = root / task / f"case_{number:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for array, name in ((image.astype(np.float32), "image.nii.gz"), (label, "label.nii.gz")):
                item = sitk.GetImageFromArray(array)
                item.SetSpacing((spacing,) * 3)
                sitk.WriteImage(item, str(folder / name))
    return root


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    return write_tiny_dataset(tmp_path / "data")


TINY_TRIPLANAR = {"layers": 2, "channels": 4, "hidden_features": 8}


def make_tiny_model(tasks, seed: int = 0, varied: bool = False, name: str = "tiny-triplanar"):
    """An untrained tiny triplanar model; ``varied`` scales its weights up so its labels vary in space."""
    from MultiTaskSegLib.model_files import SegmentationModel
    from MultiTaskSegLib.tasks import LabelSpace

    torch.manual_seed(seed)
    model = SegmentationModel.create(name, "triplanar", LabelSpace.from_names(tasks), **TINY_TRIPLANAR)
    if varied:
        with torch.no_grad():
            for parameter in model.architecture.network.parameters():
                parameter.normal_(0.0, 1.0)
    return model


def train_small_multiplanar(tmp_path: Path, arguments: dict):
    """A ``unet2d_multiplanar`` model with ``arguments`` trained 2 steps on one small brain phantom,
    saved and loaded again: (trained model, loaded model, the phantom's image)."""
    import SimpleITK as sitk

    from MultiTaskSegLib.model_files import load_model, save_model
    from MultiTaskSegLib.phantoms import generate_case
    from MultiTaskSegLib.training import TrainingConfig, train

    image, label = generate_case("brain_t1_mri", seed=1, size="small")
    case = tmp_path / "data" / "case1"
    case.mkdir(parents=True)
    sitk.WriteImage(image, str(case / "image.nii.gz"))
    sitk.WriteImage(label, str(case / "label.nii.gz"))
    config = TrainingConfig(tasks=["brain_t1_mri"], architecture="unet2d_multiplanar", arguments=arguments,
                            batch_size=4, steps=2, validate_every=2, validation_fraction=0.0, device="cpu",
                            data={"brain_t1_mri": str(tmp_path / "data")})
    model = train(config, tmp_path / "run", log=lambda message: None)
    save_model(model, tmp_path / "saved")
    return model, load_model(tmp_path / "saved"), image


#: The columns of an evaluation's ``per_case.csv`` as ``scripts/evaluate_tumour.py`` writes it.
EVALUATION_FIELDS = ["case", "task", "region", "dice", "hd95_mm", "seconds", "warnings", "confusion_percent"]


def write_evaluation(folder, dice_by_case):
    """An evaluation folder as evaluate_tumour.py writes it (the columns the scripts read)."""
    import csv

    folder.mkdir(parents=True)
    with open(folder / "per_case.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(EVALUATION_FIELDS)
        for case, value in dice_by_case.items():
            writer.writerow([case, "sarcoma_t1_mri", "Sarcoma", value, 5.0, 1.0, 0, "nan"])
    return folder
