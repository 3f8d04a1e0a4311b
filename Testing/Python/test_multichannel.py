"""Multi-channel tasks: a glioma read from contrast T1 and FLAIR together, end to end.

Training, the CLI with one ``--input`` per channel, channel images on other grids (resampled onto
the first) and channels that do not overlap (refused).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MultiTaskSegLib.cli import main
from MultiTaskSegLib.datasets import find_cases, prepare_case
from MultiTaskSegLib.errors import InputError
from MultiTaskSegLib.inference import segment_image
from MultiTaskSegLib.model_files import load_model
from MultiTaskSegLib.tasks import LabelSpace, get_task

TASK = "brats_glioma_t1c_flair"
SHAPE = (16, 20, 20)
TINY = ["--arch", "unet2d_multiplanar", "--arg", "channels=[4,8,16]", "--arg", "patch_size=[16,16]",
        "--arg", "mixed_precision=false"]


def glioma_case(folder: Path, seed: int, spacing=(1.0, 1.0, 1.0)) -> Path:
    """Oedema (label 2) bright on FLAIR only; enhancing tumour (label 4) bright on T1c only."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(SHAPE, np.uint8)
    labels[4:12, 5:15, 5:15] = 2
    labels[6:10, 8:12, 8:12] = 4
    t1c = 100 + 5 * rng.standard_normal(SHAPE) + 80 * (labels == 4)
    flair = 100 + 5 * rng.standard_normal(SHAPE) + 80 * (labels == 2)
    folder.mkdir(parents=True, exist_ok=True)
    for name, values in (("t1c", t1c), ("flair", flair), ("label", labels), ("brainmask", np.ones(SHAPE, np.uint8))):
        image = sitk.GetImageFromArray(values.astype(np.uint8 if name in ("label", "brainmask") else np.float32))
        image.SetSpacing(spacing)
        sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("glioma")
    for number in range(3):
        glioma_case(root / "data" / f"case{number}", seed=number)
    torch.set_num_threads(1)
    code = main(["train", "--tasks", TASK, "--data", f"{TASK}={root / 'data'}", "--out", str(root / "run"),
                 "--steps", "3", "--batch-size", "4", "--validate-every", "3", "--device", "cpu", *TINY])
    assert code == 0
    return root


def test_a_case_of_a_multi_channel_task_is_prepared_as_a_channel_stack(tmp_path):
    case_folder = glioma_case(tmp_path / "case", seed=0)
    files = find_cases(get_task(TASK), case_folder)[0]
    assert files.image.name == "t1c.nii.gz" and [p.name for p in files.channel_images] == ["flair.nii.gz"]
    case = prepare_case(files, LabelSpace.from_names([TASK]))
    assert case.image.shape == (2, *SHAPE) and case.labels.shape == SHAPE
    oedema = case.labels == 2
    assert case.image[1][oedema].mean() > case.image[1][~oedema & (case.labels == 0)].mean() + 1  # FLAIR bright


def test_a_case_without_its_flair_image_is_refused_with_the_channel_named(tmp_path):
    case_folder = glioma_case(tmp_path / "case", seed=0)
    (case_folder / "flair.nii.gz").unlink()
    with pytest.raises(InputError, match="no FLAIR image"):
        find_cases(get_task(TASK), case_folder)


def test_the_trained_model_reads_both_channels_and_writes_on_the_first_grid(trained, tmp_path, capsys):
    model = load_model(trained / "run" / "model")
    assert model.architecture.config.in_channels == 2
    case = trained / "data" / "case0"
    output = tmp_path / "labels.nii.gz"
    assert main(["segment", "--model", str(trained / "run" / "model"), "--input", str(case / "t1c.nii.gz"),
                 "--input", str(case / "flair.nii.gz"), "--output", str(output), "--device", "cpu"]) == 0
    labels = sitk.ReadImage(str(output))
    assert labels.GetSize() == sitk.ReadImage(str(case / "t1c.nii.gz")).GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(labels))) <= {0, 1, 2, 3, 4}
    # The second channel is read: a FLAIR with other content changes the probabilities (a mere
    # scaling would not: each channel is z-scored on its own).
    t1c, flair = (sitk.ReadImage(str(case / f"{name}.nii.gz")) for name in ("t1c", "flair"))
    first = sitk.GetArrayFromImage(segment_image(model, [t1c, flair], device="cpu", with_probabilities=True).probabilities)
    other = sitk.GetImageFromArray(sitk.GetArrayFromImage(t1c)[::-1].copy())  # T1c's values, not the same image
    other.CopyInformation(t1c)
    second = sitk.GetArrayFromImage(segment_image(model, [t1c, other], device="cpu", with_probabilities=True).probabilities)
    assert np.abs(first - second).max() > 1e-3


def test_one_input_for_a_two_channel_model_is_an_error_that_names_the_channels(trained, tmp_path, capsys):
    case = trained / "data" / "case0"
    code = main(["segment", "--model", str(trained / "run" / "model"), "--input", str(case / "t1c.nii.gz"),
                 "--output", str(tmp_path / "labels.nii.gz"), "--device", "cpu"])
    assert code == 2
    assert "--input T1c --input FLAIR" in capsys.readouterr().err
    assert not (tmp_path / "labels.nii.gz").exists()


def test_the_same_scan_given_for_two_channels_is_refused_with_both_named(trained, tmp_path, capsys):
    t1c = trained / "data" / "case0" / "t1c.nii.gz"
    code = main(["segment", "--model", str(trained / "run" / "model"), "--input", str(t1c), "--input", str(t1c),
                 "--output", str(tmp_path / "labels.nii.gz"), "--device", "cpu"])
    assert code == 2
    assert "the T1c and FLAIR inputs are the same image" in capsys.readouterr().err
    assert not (tmp_path / "labels.nii.gz").exists()


def test_a_channel_on_another_grid_is_resampled_onto_the_first(trained):
    model = load_model(trained / "run" / "model")
    case = trained / "data" / "case0"
    t1c, flair = (sitk.ReadImage(str(case / f"{name}.nii.gz")) for name in ("t1c", "flair"))
    coarse = sitk.Resample(flair, [s // 2 for s in flair.GetSize()], sitk.Transform(), sitk.sitkLinear,
                           flair.GetOrigin(), [2 * s for s in flair.GetSpacing()], flair.GetDirection())
    result = segment_image(model, [t1c, coarse], device="cpu")
    assert result.labels.GetSize() == t1c.GetSize() and result.labels.GetSpacing() == t1c.GetSpacing()


def test_channels_that_do_not_overlap_are_refused(trained):
    model = load_model(trained / "run" / "model")
    case = trained / "data" / "case0"
    t1c, flair = (sitk.ReadImage(str(case / f"{name}.nii.gz")) for name in ("t1c", "flair"))
    flair.SetOrigin((500.0, 0.0, 0.0))  # another patient's or study's position
    with pytest.raises(InputError, match="covers 0% .*do not overlap.*register FLAIR to T1c"):
        segment_image(model, [t1c, flair], device="cpu")


def test_a_single_channel_architecture_refuses_a_multi_channel_task(tmp_path, capsys):
    for number in range(2):
        glioma_case(tmp_path / "data" / f"case{number}", seed=number)
    code = main(["train", "--tasks", TASK, "--data", f"{TASK}={tmp_path / 'data'}", "--out", str(tmp_path / "run"),
                 "--steps", "1", "--arch", "cmunet", "--device", "cpu"])
    assert code == 2
    assert "use --arch unet2d_multiplanar" in capsys.readouterr().err


# -- in Slicer: one volume node per channel ------------------------------------------------------


def load_volume_node(scene, path: Path):
    """A volume node read by Slicer's own storage node, as File > Add Data does."""
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", path.name.split(".")[0])
    assert storage.ReadData(node)
    return node


def test_a_flair_placed_by_a_registration_transform_is_read_where_the_transform_puts_it(trained, tmp_path):
    slicer = pytest.importorskip("slicer", reason="slicer-core is needed for the MRML tests")
    import vtk

    from MultiTaskSegLib import mrml

    case = trained / "data" / "case0"
    flair = sitk.ReadImage(str(case / "flair.nii.gz"))
    moved = sitk.Image(flair)
    moved.SetOrigin([o + d for o, d in zip(flair.GetOrigin(), (30.0, 0.0, 0.0))])  # 30 mm to the left (LPS x)
    sitk.WriteImage(moved, str(tmp_path / "flair_moved.nrrd"))
    mrml.ensure_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    t1c_node = load_volume_node(scene, case / "t1c.nii.gz")
    flair_node = load_volume_node(scene, tmp_path / "flair_moved.nrrd")
    unregistered = mrml.channel_images(t1c_node, [flair_node])[1]
    assert np.allclose(unregistered.GetOrigin(), moved.GetOrigin(), atol=1e-4)
    registration = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "FLAIR to T1c")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 30.0)  # RAS x = -LPS x: moves the FLAIR back onto the T1c
    registration.SetMatrixTransformToParent(matrix)
    flair_node.SetAndObserveTransformNodeID(registration.GetID())
    registered = mrml.channel_images(t1c_node, [flair_node])[1]
    assert np.allclose(registered.GetOrigin(), flair.GetOrigin(), atol=1e-4)

    model = load_model(trained / "run" / "model")
    node = mrml.segment_volume_node(t1c_node, model, device="cpu", channel_nodes=[flair_node])
    expected = segment_image(model, [sitk.ReadImage(str(case / "t1c.nii.gz")), flair], device="cpu")
    ids = [node.GetSegmentation().GetNthSegmentID(i) for i in range(node.GetSegmentation().GetNumberOfSegments())]
    labels = mrml.labels_from_segmentation(node, t1c_node, ids)
    assert np.count_nonzero(labels) == np.count_nonzero(sitk.GetArrayViewFromImage(expected.labels))


def test_a_missing_channel_volume_in_slicer_is_an_error(trained):
    slicer = pytest.importorskip("slicer", reason="slicer-core is needed for the MRML tests")

    from MultiTaskSegLib import mrml

    scene = slicer.vtkMRMLScene()
    t1c_node = load_volume_node(scene, trained / "data" / "case0" / "t1c.nii.gz")
    model = load_model(trained / "run" / "model")
    with pytest.raises(InputError, match="reads 2 image"):
        mrml.segment_volume_node(t1c_node, model, device="cpu")
    with pytest.raises(InputError, match="one volume per channel"):
        mrml.segment_volume_node(t1c_node, model, device="cpu", channel_nodes=[None])


def test_batch_reads_further_channels_from_csv_columns_named_after_them(trained, tmp_path, capsys):
    import csv

    table = tmp_path / "cases.csv"
    with open(table, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "image", "FLAIR", "reference"])
        for number in range(2):
            case = trained / "data" / f"case{number}"
            writer.writerow([f"p{number}", case / "t1c.nii.gz", case / "flair.nii.gz", case / "label.nii.gz"])
    output = tmp_path / "out"
    assert main(["batch", "--model", str(trained / "run" / "model"), "--input", str(table), "--output", str(output),
                 "--format", "nii.gz", "--device", "cpu"]) == 0
    assert sorted(p.name for p in output.glob("p*.nii.gz")) == ["p0.nii.gz", "p1.nii.gz"]
    assert (output / "metrics.csv").exists()

    folder_of_t1c_only = tmp_path / "t1c_only"
    folder_of_t1c_only.mkdir()
    (folder_of_t1c_only / "p0.nii.gz").symlink_to(trained / "data" / "case0" / "t1c.nii.gz")
    capsys.readouterr()
    assert main(["batch", "--model", str(trained / "run" / "model"), "--input", str(folder_of_t1c_only),
                 "--output", str(tmp_path / "out2"), "--device", "cpu"]) == 1
    assert "columns image, FLAIR" in capsys.readouterr().err


# -- channels of 4-D files: which channel of which input -----------------------------------------


def series_of_both(case: Path, folder: Path) -> Path:
    """One 4-D file holding T1c then FLAIR, as some converters write a study."""
    volumes = [sitk.ReadImage(str(case / f"{name}.nii.gz")) for name in ("t1c", "flair")]
    path = folder / "t1c_flair.nii.gz"
    sitk.WriteImage(sitk.JoinSeries(volumes), str(path))
    return path


def segment_cli(model: Path, output: Path, *arguments: str) -> int:
    return main(["segment", "--model", str(model), *arguments, "--output", str(output), "--device", "cpu"])


def test_each_input_takes_its_own_channel_in_order_none_for_a_file_of_one_volume(trained, tmp_path):
    case = trained / "data" / "case0"
    model = trained / "run" / "model"
    both = series_of_both(case, tmp_path)
    assert segment_cli(model, tmp_path / "expected.nii.gz", "--input", str(case / "t1c.nii.gz"),
                       "--input", str(case / "flair.nii.gz")) == 0
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "expected.nii.gz")))
    assert segment_cli(model, tmp_path / "from_one_file.nii.gz", "--input", str(both), "--channel", "0",
                       "--input", str(both), "--channel", "1") == 0
    assert segment_cli(model, tmp_path / "mixed.nii.gz", "--input", str(both), "--channel", "0",
                       "--input", str(case / "flair.nii.gz"), "--channel", "none") == 0
    for name in ("from_one_file", "mixed"):
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{name}.nii.gz"))), expected)


def test_channels_that_do_not_match_the_inputs_are_refused_with_what_to_do(trained, tmp_path, capsys):
    case = trained / "data" / "case0"
    model = trained / "run" / "model"
    both = series_of_both(case, tmp_path)
    output = tmp_path / "labels.nii.gz"
    assert segment_cli(model, output, "--input", str(both), "--input", str(case / "flair.nii.gz"),
                       "--channel", "0", "--channel", "1", "--channel", "1") == 2
    assert "--channel is given 3 times for 2 inputs" in capsys.readouterr().err
    # Given once, a channel applies to every input: a file of one volume has no channel 1.
    assert segment_cli(model, output, "--input", str(both), "--input", str(case / "flair.nii.gz"), "--channel", "1") == 2
    error = capsys.readouterr().err
    assert "flair.nii.gz' holds a single volume" in error and "give one --channel per input, in order" in error
    assert segment_cli(model, output, "--input", str(both), "--channel", "0",
                       "--input", str(case / "flair.nii.gz"), "--channel", "2") == 2
    assert "flair.nii.gz' holds a single volume; channel must be 0 or none, got 2" in capsys.readouterr().err
    assert not output.exists()


def test_batch_takes_one_channel_per_channel_of_the_task_in_its_order(trained, tmp_path, capsys):
    import csv

    case = trained / "data" / "case0"
    model = trained / "run" / "model"
    both = series_of_both(case, tmp_path)
    table = tmp_path / "cases.csv"
    with open(table, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["case", "image", "FLAIR"], ["p0", both, both]])
    assert main(["batch", "--model", str(model), "--input", str(table), "--output", str(tmp_path / "out"),
                 "--format", "nii.gz", "--device", "cpu", "--channel", "0", "--channel", "1"]) == 0
    assert segment_cli(model, tmp_path / "expected.nii.gz", "--input", str(case / "t1c.nii.gz"),
                       "--input", str(case / "flair.nii.gz")) == 0
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "p0.nii.gz"))),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "expected.nii.gz"))))
    capsys.readouterr()
    assert main(["batch", "--model", str(model), "--input", str(table), "--output", str(tmp_path / "out2"),
                 "--device", "cpu", "--channel", "0", "--channel", "1", "--channel", "1"]) == 2
    assert "--channel is given 3 times for the 2 channels of brats_glioma_t1c_flair (T1c, FLAIR)" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def test_a_flair_under_a_shearing_affine_registration_is_resampled_not_refused(trained, tmp_path):
    """A sheared first volume is refused (the networks work on its grid); a further channel is only
    resampled onto the first one's grid in physical space, which an affine registration's shear survives."""
    slicer = pytest.importorskip("slicer", reason="slicer-core is needed for the MRML tests")
    import vtk

    from MultiTaskSegLib import mrml

    case = trained / "data" / "case0"
    scene = slicer.vtkMRMLScene()
    t1c_node = load_volume_node(scene, case / "t1c.nii.gz")
    flair_node = load_volume_node(scene, case / "flair.nii.gz")
    shear = np.eye(4)
    shear[0, 1] = 0.05  # RAS: x moves with y, as an affine registration may leave it
    registration = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "FLAIR to T1c (affine)")
    registration.SetMatrixTransformToParent(mrml._vtk_matrix(shear))
    flair_node.SetAndObserveTransformNodeID(registration.GetID())
    images = mrml.channel_images(t1c_node, [flair_node])
    direction = np.asarray(images[1].GetDirection()).reshape(3, 3)
    assert np.abs(direction.T @ direction - np.eye(3)).max() > 1e-3  # the FLAIR's grid in the T1c frame is sheared

    model = load_model(trained / "run" / "model")
    t1c, flair = (sitk.ReadImage(str(case / f"{name}.nii.gz")) for name in ("t1c", "flair"))
    to_flair = sitk.AffineTransform(3)  # T1c (parent) point -> FLAIR point, in LPS
    lps = np.diag([-1.0, -1.0, 1.0])
    to_flair.SetMatrix((lps @ np.linalg.inv(shear[:3, :3]) @ lps).ravel().tolist())
    resampled = sitk.Resample(flair, t1c, to_flair, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    expected = segment_image(model, [t1c, resampled], device="cpu", with_probabilities=True)
    result = segment_image(model, images, device="cpu", with_probabilities=True)
    assert np.allclose(sitk.GetArrayViewFromImage(result.probabilities),
                       sitk.GetArrayViewFromImage(expected.probabilities), atol=1e-4)
    assert mrml.segment_volume_node(t1c_node, model, device="cpu", channel_nodes=[flair_node]) is not None


def test_a_sheared_flair_file_is_resampled_onto_the_t1c_and_a_sheared_t1c_file_refused(trained, tmp_path, capsys):
    """The command line as the Slicer module: a further channel whose grid is sheared (an NRRD written
    after an affine registration) is resampled in physical space; the first channel, whose grid the
    networks work on, must not be sheared."""
    case = trained / "data" / "case0"
    t1c, flair = (sitk.ReadImage(str(case / f"{name}.nii.gz")) for name in ("t1c", "flair"))
    direction = np.eye(3)
    direction[0, 1] = 0.05  # axes no longer perpendicular
    sheared = sitk.Image(flair)
    sheared.SetDirection(direction.ravel().tolist())
    sitk.WriteImage(sheared, str(tmp_path / "flair_sheared.nrrd"))
    sheared_t1c = sitk.Image(t1c)
    sheared_t1c.SetDirection(direction.ravel().tolist())
    sitk.WriteImage(sheared_t1c, str(tmp_path / "t1c_sheared.nrrd"))
    model = trained / "run" / "model"

    assert segment_cli(model, tmp_path / "out.nii.gz", "--input", str(case / "t1c.nii.gz"), "--input",
                       str(tmp_path / "flair_sheared.nrrd"), "--probabilities", str(tmp_path / "p.nii.gz")) == 0
    resampled = sitk.Resample(sitk.ReadImage(str(tmp_path / "flair_sheared.nrrd")), t1c, sitk.Transform(),
                              sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    expected = segment_image(load_model(model), [t1c, resampled], device="cpu", with_probabilities=True)
    assert np.allclose(sitk.GetArrayViewFromImage(sitk.ReadImage(str(tmp_path / "p.nii.gz"))),
                       sitk.GetArrayViewFromImage(expected.probabilities), atol=1e-4)

    assert segment_cli(model, tmp_path / "refused.nii.gz", "--input", str(tmp_path / "t1c_sheared.nrrd"),
                       "--input", str(case / "flair.nii.gz")) == 2
    assert "perpendicular" in capsys.readouterr().err
    assert not (tmp_path / "refused.nii.gz").exists()
