"""The ``multitaskseg`` command as a user runs it: segment, models, tasks, phantoms, errors."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from conftest import make_tiny_model

from MultiTaskSegLib.cli import main
from MultiTaskSegLib.geometry import same_geometry
from MultiTaskSegLib.model_catalog import MODEL_PATH_VARIABLE
from MultiTaskSegLib.model_files import save_model

TASKS = ["breast_mri", "cardiac_cta"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_model(make_tiny_model(TASKS, seed=5, varied=True), tmp_path_factory.mktemp("models") / "tiny-triplanar")


@pytest.fixture
def scan(tmp_path):
    """An oblique, anisotropic MR-like scan."""
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray((rng.random((9, 17, 13)) * 200 + 1).astype(np.float32))
    image.SetSpacing((1.1, 1.3, 2.2))
    image.SetOrigin((10.0, -5.0, 3.0))
    image.SetDirection(sitk.VersorTransform((0.2, 1.0, 0.1), 0.5).GetMatrix())
    path = tmp_path / "scan.nrrd"
    sitk.WriteImage(image, str(path))
    return path, image


def test_segment_writes_a_seg_nrrd_with_names_colours_and_terminology(tmp_path, model_path, scan):
    path, image = scan
    output = tmp_path / "result.seg.nrrd"
    assert main(["segment", "--model", str(model_path), "--input", str(path), "--output", str(output),
                 "--device", "cpu"]) == 0
    segmentation = slicerio.read_segmentation(str(output))
    names = [segment["name"] for segment in segmentation["segments"]]
    assert names == ["Pectoral muscle", "Coronary artery"]
    pectoral = segmentation["segments"][0]
    assert pectoral["color"] == pytest.approx([0.753, 0.408, 0.345])
    assert pectoral["terminology"]["type"][0] == "SCT"
    assert pectoral["tags"]["MultiTaskSeg.Model"] == "tiny-triplanar"
    assert segmentation["voxels"].shape == image.GetSize()


def test_segment_to_nifti_keeps_the_exact_input_grid_and_only_the_requested_task(tmp_path, model_path, scan):
    path, image = scan
    output = tmp_path / "labels.nii.gz"
    probabilities = tmp_path / "probabilities.nrrd"
    assert main(["segment", "--model", str(model_path), "--input", str(path), "--output", str(output),
                 "--tasks", "cardiac_cta", "--probabilities", str(probabilities), "--device", "cpu"]) == 0
    labels = sitk.ReadImage(str(output))
    assert same_geometry(labels, image, tolerance=1e-5)
    assert set(np.unique(sitk.GetArrayViewFromImage(labels))) <= {0, 2}  # background and coronary artery only
    vector = sitk.ReadImage(str(probabilities))
    assert vector.GetNumberOfComponentsPerPixel() == 2
    assert np.allclose(sitk.GetArrayViewFromImage(vector).sum(axis=-1), 1.0, atol=1e-4)


def test_segment_reports_bad_input_and_unknown_tasks_with_exit_code_2(tmp_path, model_path, scan, capsys):
    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(16, dtype=np.float32).reshape(4, 4)), str(flat))
    assert main(["segment", "--model", str(model_path), "--input", str(flat), "--output", str(tmp_path / "o.nii.gz")]) == 2
    assert "2-D image" in capsys.readouterr().err
    path, _ = scan
    assert main(["segment", "--model", str(model_path), "--input", str(path), "--output", str(tmp_path / "o.nii.gz"),
                 "--tasks", "brain_t1_mri"]) == 2
    assert "does not segment task(s) brain_t1_mri" in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()


def test_models_lists_name_architecture_and_tasks_first(monkeypatch, model_path, capsys):
    monkeypatch.setenv(MODEL_PATH_VARIABLE, str(model_path.parent))
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    line = next(line for line in lines if line.startswith("tiny-triplanar"))
    assert "architecture=triplanar" in line and "tasks=breast_mri,cardiac_cta" in line


def test_a_model_on_the_model_path_is_found_by_name(tmp_path, monkeypatch, model_path, scan):
    monkeypatch.setenv(MODEL_PATH_VARIABLE, str(model_path.parent))
    path, _ = scan
    assert main(["segment", "--model", "tiny-triplanar", "--input", str(path),
                 "--output", str(tmp_path / "by_name.nii.gz"), "--device", "cpu"]) == 0


def test_tasks_and_phantoms_commands(tmp_path, capsys):
    assert main(["tasks"]) == 0
    assert "brain_t1_mri" in capsys.readouterr().out
    assert main(["phantoms", "--out", str(tmp_path), "--cases", "1", "--tasks", "breast_mri"]) == 0
    assert (tmp_path / "breast_mri" / "case_000" / "image.nii.gz").exists()
    assert main(["phantoms", "--out", str(tmp_path), "--tasks", "lungs"]) == 2
    capsys.readouterr()
    assert main(["phantoms", "--out", str(tmp_path), "--cases", "1", "--tasks", "breast_mri"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["phantoms", "--out", str(tmp_path), "--cases", "1", "--tasks", "breast_mri", "--overwrite"]) == 0


@pytest.mark.parametrize("option", ["--output", "--probabilities"])
def test_segment_never_writes_over_the_input_scan(tmp_path, model_path, scan, capsys, option):
    path, _ = scan
    before = path.read_bytes()
    outputs = {"--output": str(tmp_path / "labels.nrrd"), "--probabilities": str(tmp_path / "p.nrrd")}
    outputs[option] = str(path)
    arguments = ["segment", "--model", str(model_path), "--input", str(path), "--device", "cpu"]
    for name, value in outputs.items():
        arguments += [name, value]
    assert main(arguments) == 2
    assert "is the input scan" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_an_existing_output_is_replaced_only_with_overwrite(tmp_path, model_path, scan, capsys):
    """E.g. --output case/label.nii.gz beside case/image.nii.gz: the hand-made label stays unless asked."""
    path, _ = scan
    output = tmp_path / "label.nii.gz"
    output.write_bytes(b"the user's reference")
    arguments = ["segment", "--model", str(model_path), "--input", str(path), "--output", str(output), "--device", "cpu"]
    assert main(arguments) == 2
    assert "exists; choose a new file name, or add --overwrite" in capsys.readouterr().err
    assert output.read_bytes() == b"the user's reference"
    assert main(arguments + ["--overwrite"]) == 0
    assert sitk.ReadImage(str(output)).GetSize() == sitk.ReadImage(str(path)).GetSize()


def test_an_output_name_no_writer_knows_is_refused_before_segmenting(tmp_path, model_path, scan, capsys):
    path, _ = scan
    assert main(["segment", "--model", str(model_path), "--input", str(path), "--output", str(tmp_path / "l.mhd"),
                 "--device", "cpu"]) == 2
    assert ".seg.nrrd" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.mhd")) and not list(tmp_path.glob(".*"))
    assert main(["segment", "--model", str(model_path), "--input", str(path), "--output", str(tmp_path / "l.NII.GZ"),
                 "--device", "cpu"]) == 2  # refused before segmenting, not after (ITK writes lower-case names only)
    assert "(lower case)" in capsys.readouterr().err


def test_train_refuses_a_folder_that_is_not_a_run_and_keeps_its_files(tmp_path, tiny_dataset, capsys):
    out = tmp_path / "my_results"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    (out / "model").mkdir()
    arguments = ["train", "--tasks", "breast_mri", "--data", str(tiny_dataset), "--out", str(out), "--steps", "2",
                 "--arg", "layers=2", "--arg", "channels=4", "--arg", "hidden_features=8", "--batch-size", "4",
                 "--validate-every", "2", "--device", "cpu"]
    assert main(arguments) == 2
    assert "is not a training run" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["model", "notes.txt"]


def test_a_negative_checkpoint_interval_is_refused_before_training(tmp_path, tiny_dataset, capsys):
    out = tmp_path / "run"
    assert main(["train", "--tasks", "breast_mri", "--data", str(tiny_dataset), "--out", str(out), "--steps", "2",
                 "--checkpoint-minutes", "-5", "--device", "cpu"]) == 2
    assert "--checkpoint-minutes -5.0 is negative" in capsys.readouterr().err
    assert not out.exists()


def test_train_sampling_by_cases_is_recorded_in_the_run_and_the_models_provenance(tmp_path, tiny_dataset):
    import json

    from MultiTaskSegLib.model_files import load_model

    out = tmp_path / "run"
    assert main(["train", "--tasks", "breast_mri", "--data", str(tiny_dataset), "--out", str(out), "--steps", "1",
                 "--arg", "layers=2", "--arg", "channels=4", "--arg", "hidden_features=8", "--batch-size", "4",
                 "--validate-every", "1", "--device", "cpu", "--sampling", "cases"]) == 0
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["sampling"] == "cases"
    assert load_model(out / "model").provenance["config"]["sampling"] == "cases"


def test_segment_mirror_averages_the_scan_and_its_mirror_and_is_off_by_default(tmp_path, model_path, scan):
    from MultiTaskSegLib.inference import segment_image
    from MultiTaskSegLib.model_files import load_model

    path, _ = scan
    written = {}
    for option in ([], ["--mirror"], ["--no-mirror"]):
        probabilities = tmp_path / f"p{len(written)}.nrrd"
        assert main(["segment", "--model", str(model_path), "--input", str(path), "--output", str(tmp_path / f"l{len(written)}.nii.gz"),
                     "--probabilities", str(probabilities), "--device", "cpu", *option]) == 0
        written[" ".join(option)] = sitk.GetArrayFromImage(sitk.ReadImage(str(probabilities)))
    expected = segment_image(load_model(model_path), sitk.ReadImage(str(path)), device="cpu", with_probabilities=True,
                             mirror=True)
    assert np.array_equal(written["--mirror"], sitk.GetArrayFromImage(expected.probabilities))
    assert np.array_equal(written[""], written["--no-mirror"])  # the model's card does not ask for it
    assert not np.allclose(written[""], written["--mirror"], atol=1e-3)


def test_train_refuses_to_redo_a_finished_run_whose_checkpoint_is_gone(tmp_path, tiny_dataset, capsys):
    import shutil

    out = tmp_path / "run"
    arguments = ["train", "--tasks", "breast_mri", "--data", str(tiny_dataset), "--out", str(out), "--steps", "2",
                 "--arg", "layers=2", "--arg", "channels=4", "--arg", "hidden_features=8", "--batch-size", "4",
                 "--validate-every", "2", "--device", "cpu"]
    assert main(arguments) == 0
    shutil.rmtree(out / "checkpoint")
    weights = (out / "model" / "weights.safetensors").read_bytes()
    assert main(arguments[:-2] + ["--seed", "3", "--device", "cpu"]) == 2
    assert "different settings" in capsys.readouterr().err
    assert main(arguments) == 2
    assert "finished run" in capsys.readouterr().err
    assert (out / "model" / "weights.safetensors").read_bytes() == weights


def test_models_lists_the_good_models_when_one_on_the_model_path_is_broken(tmp_path, model_path, monkeypatch, capsys):
    import shutil

    folder = tmp_path / "models"
    shutil.copytree(model_path, folder / "good")
    (folder / "broken").mkdir()
    (folder / "broken" / "model.json").write_text("[1, 2]", encoding="utf-8")
    monkeypatch.setenv(MODEL_PATH_VARIABLE, str(folder))
    assert main(["models"]) == 2
    captured = capsys.readouterr()
    assert "good\tarchitecture=triplanar" in captured.out
    assert "broken\tunreadable" in captured.err


def test_a_bad_architecture_argument_value_is_an_error_not_a_traceback(tmp_path, tiny_dataset, capsys):
    out = tmp_path / "run"
    code = main(["train", "--tasks", "breast_mri", "--data", str(tiny_dataset), "--out", str(out), "--steps", "1",
                 "--arch", "cmunet", "--arg", "patch_size=7", "--device", "cpu"])
    error = capsys.readouterr().err
    assert code == 2
    assert "bad argument" in error and "patch_size=[128,128]" in error and "Traceback" not in error


def test_a_full_disk_while_writing_the_segmentation_is_an_error_and_keeps_the_input(tmp_path, model_path, scan,
                                                                                     monkeypatch, capsys):
    path, _ = scan
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise RuntimeError("ITK ERROR: ImageIO: No space left on device")

    monkeypatch.setattr(sitk, "WriteImage", disk_full)
    output = tmp_path / "labels.nii.gz"
    code = main(["segment", "--model", str(model_path), "--input", str(path), "--output", str(output), "--device", "cpu"])
    error = capsys.readouterr().err
    assert code == 2
    assert "No space left on device" in error and "free space" in error and "Traceback" not in error
    assert not output.exists() and not list(tmp_path.glob(".labels*"))
    assert path.read_bytes() == before


def test_a_model_card_with_an_operating_point_that_is_not_a_number_is_refused(tmp_path, model_path, scan, capsys):
    import json
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(model_path, copy)
    metadata = json.loads((copy / "model.json").read_text())
    metadata["card"]["operating_points"] = {"cardiac_cta": "0.5"}
    (copy / "model.json").write_text(json.dumps(metadata))
    code = main(["segment", "--model", str(copy), "--input", str(scan[0]), "--output", str(tmp_path / "l.nii.gz"),
                 "--device", "cpu"])
    assert code == 2
    assert "operating_points are not numbers" in capsys.readouterr().err


def test_a_damaged_training_state_is_an_error_that_says_how_to_start_afresh(tmp_path, tiny_dataset, capsys):
    import pickle

    out = tmp_path / "run"
    arguments = ["train", "--tasks", "breast_mri", "--data", str(tiny_dataset), "--out", str(out), "--steps", "2",
                 "--arg", "layers=2", "--arg", "channels=4", "--arg", "hidden_features=8", "--batch-size", "4",
                 "--validate-every", "2", "--device", "cpu"]
    assert main(arguments) == 0  # a run with a checkpoint that a second call resumes from
    capsys.readouterr()
    state = out / "checkpoint" / "training_state.pt"
    assert state.exists()
    state.write_bytes(pickle.dumps(print))  # a pickle that would call a function if unpickled unsafely
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert "damaged or not a training state" in error and "Traceback" not in error


def test_repeated_data_options_add_up_instead_of_replacing_each_other():
    """``--data a=X --data b=Y`` (one option per task) means both, as ``--data a=X b=Y`` does."""
    from MultiTaskSegLib.cli import build_parser

    for command in ("train", "finetune"):
        extra = ["--tasks", "breast_mri", "cardiac_cta"] if command == "train" else ["--model", "brain-t1"]
        parsed = build_parser().parse_args([command, *extra, "--data", "breast_mri=A", "--data", "cardiac_cta=B", "--out", "run"])
        assert parsed.data == ["breast_mri=A", "cardiac_cta=B"]


def test_running_out_of_memory_is_an_error_that_says_what_to_do_not_a_traceback(tmp_path, model_path, scan, capsys,
                                                                                 monkeypatch):
    import MultiTaskSegLib.inference as inference

    def allocate(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(inference, "prepare_image", allocate)
    code = main(["segment", "--model", str(model_path), "--input", str(scan[0]), "--output", str(tmp_path / "out.nii.gz")])
    assert code == 2
    assert "ran out of memory; crop the image" in capsys.readouterr().err
    assert not (tmp_path / "out.nii.gz").exists()


def test_evaluate_refuses_a_reference_label_on_another_grid_than_its_scan(tmp_path, tiny_dataset, capsys):
    model = save_model(make_tiny_model(["breast_mri"], seed=2), tmp_path / "model")
    label_path = tiny_dataset / "breast_mri" / "case_001" / "label.nii.gz"
    label = sitk.ReadImage(str(label_path))
    label.SetOrigin((0.0, 0.0, 20.0))  # a label exported from another crop of the scan
    sitk.WriteImage(label, str(label_path))
    code = main(["evaluate", "--model", str(model), "--data", f"breast_mri={tiny_dataset / 'breast_mri'}",
                 "--out", str(tmp_path / "evaluation"), "--device", "cpu"])
    assert code == 2
    error = capsys.readouterr().err
    assert "case_001/label.nii.gz" in error and "is not on the grid of image" in error


def test_a_channel_given_once_picks_that_volume_of_a_4d_input(tmp_path, model_path, scan, capsys):
    path, image = scan
    series = tmp_path / "series.nrrd"
    # volume 0 is constant, refused if picked: the tiny model segments image * 0.5 as it segments image
    sitk.WriteImage(sitk.JoinSeries([image * 0, image]), str(series))
    assert main(["segment", "--model", str(model_path), "--input", str(path), "--output", str(tmp_path / "scan.nii.gz"),
                 "--device", "cpu"]) == 0
    assert main(["segment", "--model", str(model_path), "--input", str(series), "--channel", "1",
                 "--output", str(tmp_path / "picked.nii.gz"), "--device", "cpu"]) == 0
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "picked.nii.gz"))),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "scan.nii.gz"))))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["segment", "--model", str(model_path), "--input", str(series), "--channel", "second",
              "--output", str(tmp_path / "o.nii.gz")])
    assert "a channel number (0, 1, ...) or none, got 'second'" in capsys.readouterr().err


def test_an_error_after_the_progress_started_is_printed_on_its_own_line(tmp_path, model_path, capsys):
    values = np.zeros((9, 17, 13), np.float32)
    values[2:7, 4:12, 3:10] = 5.0  # an MR foreground of one value: refused while normalising, after progress began
    path = tmp_path / "flat_foreground.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
    code = main(["segment", "--model", str(model_path), "--input", str(path), "--output", str(tmp_path / "o.nii.gz"),
                 "--tasks", "breast_mri", "--device", "cpu"])
    assert code == 2
    error = capsys.readouterr().err
    assert "preprocessing" in error  # the progress line was drawn
    assert "\nmultitaskseg segment: error: the image foreground is constant" in error
