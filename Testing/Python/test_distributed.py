"""Distributed data-parallel training on the CPU: two Gloo processes take the step of the global batch.

The two processes are started once per module (starting Python with PyTorch twice is the slow part)
and do all the distributed work the tests then check. The network is the tiny triplanar one with
``grid=1`` and no dropout, and the batch (8) holds 2 tasks x 2 classes x 2 processes: every share then
holds the same number of voxels per class, so the loss normalised over each share is the loss of the
global batch, and no dropout mask is drawn per process (see MultiTaskSegLib/distributed.py).
"""

from __future__ import annotations

import csv
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_tiny_dataset
from torch import multiprocessing

from MultiTaskSegLib import distributed
from MultiTaskSegLib.datasets import prepare_case
from MultiTaskSegLib.model_files import SegmentationModel, load_model
from MultiTaskSegLib.sampling import BalancedVoxelSampler
from MultiTaskSegLib.tasks import LabelSpace
from MultiTaskSegLib.training import TrainingConfig, collect_cases, set_seed, train

EXACT = {"layers": 2, "channels": 4, "hidden_features": 8, "grid": 1, "dropout": 0.0,
         "mixed_precision": False}  # float32: the distributed step must equal the single one to rounding
PROCESSES = 2
WORKER_TIME_LIMIT_S = 180


def config(data: Path, **changes) -> TrainingConfig:
    settings = dict(tasks=["breast_mri", "cardiac_cta"], architecture="triplanar", arguments=dict(EXACT),
                    batch_size=8, steps=1, validate_every=2, validation_fraction=0.34, seed=3, device="cpu",
                    learning_rate=0.01, data={t: str(data / t) for t in ("breast_mri", "cardiac_cta")})
    settings.update(changes)
    return TrainingConfig(**settings)


def quiet(message: str) -> None:
    pass


def gradients_of_one_step(settings: TrainingConfig,
                          context: distributed.DistributedContext) -> dict[str, torch.Tensor]:
    """The gradients one training step leaves, built from the same parts as ``train``."""
    set_seed(settings.seed)
    label_space = LabelSpace.from_names(settings.tasks)
    train_files, _ = collect_cases(settings)
    sampler = BalancedVoxelSampler([prepare_case(files, label_space) for files in train_files],
                                   {task: label_space.indices_for_task(task) for task in settings.tasks})
    model = SegmentationModel.create("one-step", settings.architecture, label_space, **settings.arguments)
    network = model.architecture.network
    distributed.replicate_network(network, context)
    batch = model.architecture.sample_batch(sampler, settings.batch_size, np.random.default_rng(settings.seed))
    model.architecture.training_step(distributed.share_of_batch(batch, context), context.device).loss.backward()
    distributed.average_gradients(network.parameters(), context)
    return {name: parameter.grad.clone() for name, parameter in network.named_parameters()}


def record_writes_under(folder: Path, log: list[str]) -> None:
    """Note every file-system change under ``folder`` that this process makes (Python audit events)."""
    root = str(folder)
    changing = {"os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "shutil.copyfile"}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event: str, arguments: tuple) -> None:
        if event == "open":
            path, mode, flags = arguments
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & write_flags)
        elif event in changing:
            path, writes = arguments[0], True
        else:
            return
        if writes and isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(root):
            log.append(f"{event} {os.fspath(path)}")

    sys.addaudithook(hook)


def run_as_process(rank: int, ports: list[int], data: Path, runs: Path, reports: Path) -> None:
    """One of the two processes, set up as torchrun sets one up."""
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(PROCESSES))
    torch.set_num_threads(1)
    writes: list[str] = []
    if rank != 0:
        record_writes_under(runs, writes)
    ports = iter(ports)

    os.environ["MASTER_PORT"] = str(next(ports))
    with distributed.session("cpu") as context:
        gradients = gradients_of_one_step(config(data), context)
    if rank == 0:
        torch.save(gradients, reports / "gradients.pt")

    os.environ["MASTER_PORT"] = str(next(ports))
    train(config(data), runs / "one_step", log=quiet)

    resumable = config(data, steps=4)
    os.environ["MASTER_PORT"] = str(next(ports))
    train(resumable, runs / "resumed", log=quiet, stop_after=3)  # checkpoint at 2, step 3 is lost
    if rank == 0:
        state = json.loads((runs / "resumed" / "checkpoint" / "training_state.json").read_text())
        (reports / "interrupted_at.txt").write_text(str(state["step"]))
    os.environ["MASTER_PORT"] = str(next(ports))
    train(resumable, runs / "resumed", log=quiet)
    os.environ["MASTER_PORT"] = str(next(ports))
    train(config(data, arguments={**EXACT, "mixed_precision": True}), runs / "bfloat16", log=quiet)
    (reports / f"writes_of_process_{rank}.json").write_text(json.dumps(writes))


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for each in sockets:
        each.bind(("127.0.0.1", 0))
    ports = [each.getsockname()[1] for each in sockets]
    for each in sockets:
        each.close()
    return ports


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    folders = {"data": write_tiny_dataset(root / "data"), "runs": root / "runs", "reports": root / "reports",
               "single": root / "single"}
    folders["runs"].mkdir()
    folders["reports"].mkdir()
    processes = multiprocessing.start_processes(
        run_as_process, args=(free_ports(5), folders["data"], folders["runs"], folders["reports"]),
        nprocs=PROCESSES, join=False, start_method="spawn",
    )
    deadline = time.monotonic() + WORKER_TIME_LIMIT_S
    while not processes.join(timeout=2):
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail(f"the two training processes did not finish within {WORKER_TIME_LIMIT_S} s")
    return folders


def naming(name: str):
    """An assert_close message that says which tensor differs."""
    return lambda detail: f"{name}: {detail}"


def assert_same_weights(first: SegmentationModel, second: SegmentationModel, tolerance: float) -> None:
    expected = first.architecture.network.state_dict()
    actual = second.architecture.network.state_dict()
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=tolerance, msg=naming(name))


def test_one_distributed_step_has_the_gradients_of_the_global_batch(two_processes):
    alone = gradients_of_one_step(config(two_processes["data"]), distributed.DistributedContext())
    shared = torch.load(two_processes["reports"] / "gradients.pt", weights_only=True)
    assert shared.keys() == alone.keys()
    for name in alone:
        torch.testing.assert_close(shared[name], alone[name], rtol=1e-4, atol=1e-6, msg=naming(name))


def test_one_distributed_step_gives_the_weights_of_one_single_process_step(two_processes):
    alone = train(config(two_processes["data"]), two_processes["single"] / "one_step", log=quiet)
    shared = load_model(two_processes["runs"] / "one_step" / "model")
    assert_same_weights(alone, shared, tolerance=1e-6)  # batch-norm running statistics included
    assert shared.provenance["processes"] == PROCESSES


def test_distributed_training_runs_under_bfloat16_autocast_and_lands_near_the_single_process_step(two_processes):
    """Batch norm pools its statistics in float32 whatever the autocast type."""
    settings = config(two_processes["data"], arguments={**EXACT, "mixed_precision": True})
    alone = train(settings, two_processes["single"] / "bfloat16", log=quiet)
    shared = load_model(two_processes["runs"] / "bfloat16" / "model")
    assert_same_weights(alone, shared, tolerance=1e-2)


def test_only_process_0_writes_the_run(two_processes):
    assert json.loads((two_processes["reports"] / "writes_of_process_1.json").read_text()) == []
    assert (two_processes["runs"] / "one_step" / "model").is_dir()
    assert (two_processes["runs"] / "one_step" / "learning_curve.csv").is_file()


def test_an_interrupted_distributed_run_resumes_to_the_single_process_result(two_processes):
    run = two_processes["runs"] / "resumed"
    assert (two_processes["reports"] / "interrupted_at.txt").read_text() == "2"
    with open(run / "loss.csv", newline="") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle)]
    assert steps == [1, 2, 3, 4]  # the lost step was logged once, after resuming
    alone = train(config(two_processes["data"], steps=4), two_processes["single"] / "resumed", log=quiet)
    shared = load_model(run / "model")
    assert shared.provenance["steps_done"] == 4
    assert_same_weights(alone, shared, tolerance=1e-5)


def test_a_batch_is_shared_by_taking_every_nth_sample():
    batch = {"labels": torch.arange(10), "origins": torch.arange(30).reshape(10, 3)}
    shares = [distributed.share_of_batch(batch, distributed.DistributedContext(rank, 3)) for rank in range(3)]
    assert [share["labels"].tolist() for share in shares] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert shares[1]["origins"].tolist() == [[3, 4, 5], [12, 13, 14], [21, 22, 23]]
    alone = distributed.DistributedContext()
    assert distributed.share_of_batch(batch, alone) is batch


def test_inconsistent_torchrun_variables_are_refused():
    from MultiTaskSegLib.errors import InputError

    assert distributed.ranks_from_environment({}) == (0, 1, 0)
    assert distributed.ranks_from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    with pytest.raises(InputError, match="do not fit together"):
        distributed.ranks_from_environment({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(InputError, match="whole numbers"):
        distributed.ranks_from_environment({"RANK": "one", "WORLD_SIZE": "2"})
