"""Training: deterministic with a seed, resumable after an interruption, with a learning curve."""

import csv
import json

import pytest
import torch

from MultiTaskSegLib.errors import InputError
from MultiTaskSegLib.model_files import load_model
from MultiTaskSegLib.training import TrainingConfig, train

TINY = {"layers": 2, "channels": 4, "hidden_features": 8, "grid": 2}


def config(data, **changes) -> TrainingConfig:
    settings = dict(tasks=["breast_mri", "cardiac_cta"], architecture="triplanar", arguments=dict(TINY),
                    batch_size=12, steps=6, validate_every=2, validation_fraction=0.34, seed=3, device="cpu",
                    learning_rate=0.01, data={t: str(data / t) for t in ("breast_mri", "cardiac_cta")})
    settings.update(changes)
    return TrainingConfig(**settings)


def quiet(message: str) -> None:
    pass


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path, tiny_dataset):
    straight = train(config(tiny_dataset), tmp_path / "straight", log=quiet)
    interrupted = tmp_path / "interrupted"
    train(config(tiny_dataset), interrupted, log=quiet, stop_after=3)  # checkpoint at 2, step 3 is lost
    assert json.loads((interrupted / "checkpoint" / "training_state.json").read_text())["step"] == 2
    assert not (interrupted / "model").exists()
    resumed = train(config(tiny_dataset), interrupted, log=quiet)
    assert resumed.weights_sha256 == straight.weights_sha256
    steps = [int(row["step"]) for row in csv.DictReader(open(interrupted / "loss.csv"))]
    assert steps == [1, 2, 3, 4, 5, 6]  # the lost step was logged once, after resuming


def test_a_timed_checkpoint_between_validations_keeps_the_steps_and_not_the_result(tmp_path, tiny_dataset):
    once = config(tiny_dataset, validate_every=6)  # the only validation checkpoint is the last step's
    straight = train(once, tmp_path / "straight", log=quiet)
    interrupted = tmp_path / "interrupted"
    train(once, interrupted, log=quiet, stop_after=4, checkpoint_minutes=None)
    assert not (interrupted / "checkpoint").exists()  # without timed checkpoints, four steps are lost
    train(once, interrupted, log=quiet, stop_after=4, checkpoint_minutes=0)  # starts afresh, checkpoints each step
    assert json.loads((interrupted / "checkpoint" / "training_state.json").read_text())["step"] == 4
    resumed = train(once, interrupted, log=quiet)
    assert resumed.weights_sha256 == straight.weights_sha256
    assert [int(row["step"]) for row in csv.DictReader(open(interrupted / "loss.csv"))] == [1, 2, 3, 4, 5, 6]


def test_the_same_seed_gives_the_same_model_and_another_seed_does_not(tmp_path, tiny_dataset):
    first = train(config(tiny_dataset, steps=2), tmp_path / "a", log=quiet)
    second = train(config(tiny_dataset, steps=2), tmp_path / "b", log=quiet)
    third = train(config(tiny_dataset, steps=2, seed=4), tmp_path / "c", log=quiet)
    assert first.weights_sha256 == second.weights_sha256 != third.weights_sha256


def test_learning_curve_has_dice_per_task_and_class_at_every_validation(tmp_path, tiny_dataset):
    run = tmp_path / "run"
    train(config(tiny_dataset), run, log=quiet)
    rows = list(csv.DictReader(open(run / "learning_curve.csv")))
    assert {int(r["step"]) for r in rows} == {2, 4, 6}
    assert {(r["task"], r["class"]) for r in rows} == {("breast_mri", "Pectoral muscle"),
                                                        ("cardiac_cta", "Coronary artery")}
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    assert (run / "learning_curve.png").stat().st_size > 1000
    model = load_model(run / "model")
    assert model.provenance["steps_done"] == 6
    assert set(model.card["validation_dice"]) == {"breast_mri", "cardiac_cta"}
    operating_points = model.card["operating_points"]  # both tasks are binary: thresholds chosen on validation
    assert set(operating_points) == {"breast_mri", "cardiac_cta"} and all(0 < t < 1 for t in operating_points.values())


def test_resuming_with_other_settings_is_refused(tmp_path, tiny_dataset):
    run = tmp_path / "run"
    train(config(tiny_dataset), run, log=quiet, stop_after=2)
    with pytest.raises(InputError, match="different settings \\(batch_size\\)"):
        train(config(tiny_dataset, batch_size=24), run, log=quiet)


def test_training_a_finished_run_further_keeps_its_model_and_fewer_steps_are_refused(tmp_path, tiny_dataset):
    run = tmp_path / "run"
    first = train(config(tiny_dataset, steps=4), run, log=quiet)
    with pytest.raises(InputError, match="already trained 4 mini-batches, more than --steps 2"):
        train(config(tiny_dataset, steps=2), run, log=quiet)
    extended = train(config(tiny_dataset, steps=6), run, log=quiet)
    assert load_model(run / "model_step4").weights_sha256 == first.weights_sha256  # kept, not overwritten
    assert load_model(run / "model").weights_sha256 == extended.weights_sha256 != first.weights_sha256
    assert extended.provenance["steps_done"] == 6
    assert json.loads((run / "config.json").read_text())["steps"] == 6
    again = train(config(tiny_dataset, steps=6), run, log=quiet)  # the same command once more: the same model
    assert again.weights_sha256 == extended.weights_sha256 and not (run / "model_step6").exists()


def test_sampling_by_cases_trains_another_network_and_a_run_resumes_only_with_its_own_sampling(tmp_path, tiny_dataset):
    by_voxels = train(config(tiny_dataset, steps=2), tmp_path / "voxels", log=quiet)
    run = tmp_path / "cases"
    train(config(tiny_dataset, sampling="cases"), run, log=quiet, stop_after=2)
    with pytest.raises(InputError, match="different settings \\(sampling\\)"):
        train(config(tiny_dataset), run, log=quiet)
    by_cases = train(config(tiny_dataset, sampling="cases", steps=2), tmp_path / "cases_short", log=quiet)
    assert by_cases.weights_sha256 != by_voxels.weights_sha256
    assert json.loads((run / "config.json").read_text())["sampling"] == "cases"


def test_a_working_spacing_chosen_for_the_run_is_trained_at_stored_in_the_model_and_segmented_at(tmp_path, tiny_dataset):
    import SimpleITK as sitk

    from MultiTaskSegLib.datasets import find_cases, prepare_case
    from MultiTaskSegLib.inference import segment_image
    from MultiTaskSegLib.tasks import get_task
    from MultiTaskSegLib.training import training_label_space

    own = get_task("breast_mri").working_spacing_mm
    chosen = config(tiny_dataset, working_spacing_mm={"breast_mri": own * 2}, steps=2)
    label_space = training_label_space(chosen)
    assert label_space.task("breast_mri").working_spacing_mm == own * 2
    assert label_space.task("cardiac_cta") == get_task("cardiac_cta")
    case = prepare_case(find_cases(get_task("breast_mri"), tiny_dataset / "breast_mri")[0], label_space)
    assert case.extra["grid"].GetSpacing() == (own * 2,) * 3 and case.image.shape == (7, 7, 7)  # 14 voxels, halved

    model = train(chosen, tmp_path / "run", log=quiet)
    loaded = load_model(tmp_path / "run" / "model")
    assert loaded.label_space.task("breast_mri").working_spacing_mm == own * 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["working_spacing_mm"] == {"breast_mri": own * 2}
    image = sitk.ReadImage(str(tiny_dataset / "breast_mri" / "case_000" / "image.nii.gz"))
    labels = segment_image(loaded, image, ["breast_mri"]).labels
    assert labels.GetSize() == image.GetSize() and labels.GetSpacing() == image.GetSpacing()
    assert model.weights_sha256 != train(config(tiny_dataset, steps=2), tmp_path / "own", log=quiet).weights_sha256
    with pytest.raises(InputError, match="different settings \\(working_spacing_mm\\)"):
        train(config(tiny_dataset, steps=2), tmp_path / "run", log=quiet)


def test_binary_tasks_are_scored_at_the_operating_point_with_the_best_dice_over_validation(tiny_dataset):
    import numpy as np
    import torch
    from conftest import make_tiny_model

    from MultiTaskSegLib.datasets import find_cases, prepare_case
    from MultiTaskSegLib.evaluation import dice
    from MultiTaskSegLib.preprocessing import background_outside
    from MultiTaskSegLib.tasks import get_task
    from MultiTaskSegLib.training import validation_dice

    model = make_tiny_model(["breast_mri", "cardiac_cta"], varied=True)
    cases = [prepare_case(files, model.label_space) for task in ("breast_mri", "cardiac_cta")
             for files in find_cases(get_task(task), tiny_dataset / task)]
    rows, operating_points = validation_dice(model, cases, torch.device("cpu"))
    cardiac = [case for case in cases if case.task == "cardiac_cta"]
    coronary = model.label_space.indices_for_task("cardiac_cta")[0]
    ratios = []
    for case in cardiac:
        p = background_outside(model.architecture.predict_probabilities(case.image, torch.device("cpu")), case.foreground)
        ratios.append(p[coronary] / np.clip(p[0] + p[coronary], 1e-6, None))

    def pooled_dice(threshold):
        return dice(np.concatenate([(r >= threshold).ravel() for r in ratios]),
                    np.concatenate([(c.labels == coronary).ravel() for c in cardiac]))

    chosen = operating_points["cardiac_cta"]
    assert all(pooled_dice(chosen) >= pooled_dice(t) - 1e-9 for t in (0.05, 0.3, 0.5, 0.7, 0.9, 0.99))
    for case, ratio in zip(cardiac, ratios):
        row = next(r for r in rows if r["case"] == case.name and r["task"] == "cardiac_cta")
        assert row["dice"] == pytest.approx(dice(ratio >= chosen, case.labels == coronary))


def test_binary_labels_stored_as_255_are_refused_with_the_values_the_task_reads(tmp_path):
    import numpy as np
    import SimpleITK as sitk

    from MultiTaskSegLib.datasets import find_cases, prepare_case
    from MultiTaskSegLib.errors import InputError
    from MultiTaskSegLib.tasks import LabelSpace, get_task

    folder = tmp_path / "breast_mri" / "case"
    folder.mkdir(parents=True)
    image = np.random.default_rng(0).random((8, 10, 12)).astype(np.float32) + 1
    label = np.zeros(image.shape, np.uint8)
    label[2:5, 3:6, 4:8] = 255
    for array, name in ((image, "image.nii.gz"), (label, "label.nii.gz")):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(folder / name))
    (case,) = find_cases(get_task("breast_mri"), tmp_path / "breast_mri")
    with pytest.raises(InputError, match="holds the values 0, 255.*Pectoral muscle: 1"):
        prepare_case(case, LabelSpace.from_names(["breast_mri"]))


@pytest.mark.parametrize("settings", [{"validation_fraction": 1.5}, {"steps": -5}, {"batch_size": 0},
                                      {"validate_every": 0}, {"learning_rate": -1.0}, {"sampling": "slices"},
                                      {"working_spacing_mm": {"cardiac_cta": 1.0}}, {"working_spacing_mm": {"breast_mri": 0}},
                                      {"working_spacing_mm": {"breast_mri": "fine"}}])
def test_impossible_training_settings_are_refused(settings):
    from MultiTaskSegLib.errors import InputError
    from MultiTaskSegLib.training import TrainingConfig

    with pytest.raises(InputError, match="training settings"):
        TrainingConfig(tasks=["breast_mri"], **settings)


def test_a_run_started_from_another_models_weights_begins_with_them(tmp_path, tiny_dataset):
    """Transfer (``--init-from``): a network for other tasks (here one task instead of two) starts
    from a trained model's weights wherever names and shapes agree; the label space is its own."""
    source = train(config(tiny_dataset, steps=2), tmp_path / "source", log=quiet)
    one_task = dict(tasks=["breast_mri"], steps=1, learning_rate=1e-12, validation_fraction=0.0)
    started = train(config(tiny_dataset, **one_task, init_from=str(tmp_path / "source" / "model")),
                    tmp_path / "started", log=quiet)
    scratch = train(config(tiny_dataset, **one_task), tmp_path / "scratch", log=quiet)
    source_weights = source.architecture.network.state_dict()
    started_weights = started.architecture.network.state_dict()
    first_layer = "features.blocks.0.0.weight"
    assert torch.allclose(started_weights[first_layer], source_weights[first_layer], atol=1e-6)
    assert not torch.allclose(scratch.architecture.network.state_dict()[first_layer], source_weights[first_layer])
    assert started.label_space.task_names == ("breast_mri",)
    assert json.loads((tmp_path / "started" / "config.json").read_text())["init_from"].endswith("model")


def test_starting_from_a_model_of_another_architecture_is_refused(tmp_path, tiny_dataset):
    train(config(tiny_dataset, steps=1), tmp_path / "source", log=quiet)
    other = config(tiny_dataset, architecture="unet2d", arguments={"channels": [4, 8], "patch_size": [16, 16]},
                   steps=1, init_from=str(tmp_path / "source" / "model"))
    with pytest.raises(InputError, match="same architecture"):
        train(other, tmp_path / "other", log=quiet)


def _batch_for(architecture) -> dict:
    """A fixed batch with learnable labels (bright voxels are class 1) in the architecture's layout."""
    from MultiTaskSegLib.architectures.triplanar import PLANES

    generator = torch.Generator().manual_seed(0)
    if architecture.name == "triplanar":
        side = 3 + 2 * architecture.network.margin
        batch = {plane: torch.randn(6, 3, side, side, generator=generator) for plane in PLANES}
        centre = slice(architecture.network.margin, architecture.network.margin + 3)
        labels = (batch["axial"][:, :, centre, centre] > 0).long()  # (blocks, z, y, x) of the centre voxels
        return {**batch, "labels": labels, "groups": labels.clone()}
    image = torch.randn(4, 1, 32, 32, generator=generator)
    labels = (image[:, 0] > 0).long()
    return {"image": image, "labels": labels, "valid": torch.ones_like(labels, dtype=torch.bool),
            "present": torch.ones(4, 1)}


@pytest.mark.parametrize("name, arguments", [
    ("triplanar", {"layers": 4, "channels": 8, "hidden_features": 16, "dropout": 0.0}),
    ("cmunet", {"channels": [8, 16], "patch_size": [32, 32]}),
    ("unet2d_multiplanar", {"channels": [8, 16], "patch_size": [32, 32]}),
])
def test_a_few_training_steps_in_bfloat16_stay_close_to_float32(name, arguments):
    """mixed_precision trains under bfloat16 autocast on capable hardware: faster, and the losses
    and weights of the first steps follow the float32 run closely."""
    from MultiTaskSegLib.architectures import architecture_class
    from MultiTaskSegLib.inferers import bfloat16_ready

    if not bfloat16_ready(torch.device("cpu")):
        pytest.skip("this CPU has no bfloat16 arithmetic (AVX-512 BF16 or AMX): mixed precision trains in float32 here")
    runs = {}
    for mixed in (False, True):
        torch.manual_seed(0)
        architecture = architecture_class(name)(2, ["breast_mri"], mixed_precision=mixed, **arguments)
        optimiser = architecture.make_optimizer(1e-3)
        losses = []
        for _ in range(5):
            step = architecture.training_step(_batch_for(architecture), torch.device("cpu"))
            optimiser.zero_grad()
            step.loss.backward()
            optimiser.step()
            losses.append(float(step.loss.detach()))
        runs[mixed] = (losses, torch.cat([p.detach().flatten() for p in architecture.network.parameters()]))
    (float32_losses, float32_weights), (bfloat16_losses, bfloat16_weights) = runs[False], runs[True]
    assert float32_losses != bfloat16_losses, "the bfloat16 run must differ: autocast was not active"
    assert all(abs(b - f) <= 0.03 * abs(f) + 1e-3 for f, b in zip(float32_losses, bfloat16_losses)), (float32_losses, bfloat16_losses)
    assert bfloat16_losses[-1] < bfloat16_losses[0], "bfloat16 training learns"
    moved = (bfloat16_weights - float32_weights).norm() / float32_weights.norm()
    assert moved < 0.02, f"weights drifted {moved:.3%} from the float32 run"
