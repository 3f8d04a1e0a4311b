"""Training one model on one or more tasks, with checkpoints that survive an interruption.

The loop is visible in :func:`_train`; the parts (cases, balanced sampler, architecture with its
loss and optimiser, checkpoint, learning curve) are plain objects. Under ``torchrun`` every process
runs the same loop on its share of each mini-batch (see :mod:`.distributed`) and only process 0
writes to the run folder, which holds:

- ``config.json``: what was asked for (a resumed run must ask for the same);
- ``checkpoint/``: the latest model file plus ``training_state.pt``/``.json`` (optimiser, step, RNGs);
- ``learning_curve.csv``/``.png``: per task, per class Dice on validation cases every K mini-batches;
- ``model/``: the final model file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import distributed
from .architectures import architecture_class
from .architectures.base import TrainingStep
from .datasets import CaseFiles, find_cases, prepare_case, split_cases
from .errors import InputError
from .evaluation import dice_per_class, precision_recall_curve
from .preprocessing import background_outside
from .learning_curve import LearningCurve
from .model_files import SegmentationModel, load_model, save_model
from .plausibility import CARD_KEY, training_volume_ranges
from .sampling import SAMPLING_CHOICES, BalancedVoxelSampler, PreparedCase
from .tasks import LabelSpace, get_task, working_spacing_problems

CHECKPOINT_DIR = "checkpoint"
STATE_TENSORS = "training_state.pt"
STATE_JSON = "training_state.json"


#: Settings of :class:`TrainingConfig` added after runs were made, with the value those runs had.
FIELDS_ADDED_LATER = {"init_from": None, "sampling": SAMPLING_CHOICES[0], "working_spacing_mm": {}}


@dataclass
class TrainingConfig:
    """Everything that defines a training run; stored in the run folder and in the model's provenance."""

    tasks: list[str]
    architecture: str = "triplanar"
    arguments: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 210
    steps: int = 25000
    learning_rate: float | None = None
    validate_every: int = 1000
    validation_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    model_name: str = "multitaskseg-model"
    data: dict[str, str] = field(default_factory=dict)
    #: Fine-tuning: the model to start from (``source``, ``name``, ``version``, ``weights_sha256``);
    #: its label space, architecture and weights are kept (see :mod:`~MultiTaskSegLib.finetuning`).
    parent: dict[str, str] | None = None
    #: Transfer: a model (folder, .zip or bundled name) whose weights start the new network wherever
    #: a tensor's name and shape agree (e.g. a CT network started from an MR network of the same
    #: architecture); the label space and the rest are the new run's own.
    init_from: str | None = None
    #: How a class's samples are spread over the training cases: ``"voxels"`` (in proportion to the
    #: class's volume in each case, as Moeskops et al.) or ``"cases"`` (evenly over the cases that
    #: hold it, as nnU-Net: a small tumour is seen as often as a large one).
    sampling: str = SAMPLING_CHOICES[0]
    #: Per task, a working spacing (mm) other than its task file's, as nnU-Net derives the spacing
    #: from the data: cases are resampled to it in training, and the model stores it, so inference
    #: follows. Empty: every task's own.
    working_spacing_mm: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if not self.tasks:
            problems.append("give at least one task")
        if self.steps < 1 or self.batch_size < 1 or self.validate_every < 1:
            problems.append(f"steps, batch size and validate-every must be at least 1 (got {self.steps}, "
                            f"{self.batch_size}, {self.validate_every})")
        if not 0.0 <= self.validation_fraction < 1.0:
            problems.append(f"the validation fraction must lie in 0..1 (1 excluded), got {self.validation_fraction}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            problems.append(f"the learning rate must be positive, got {self.learning_rate}")
        if self.sampling not in SAMPLING_CHOICES:
            problems.append(f"sampling must be one of {', '.join(SAMPLING_CHOICES)}, got {self.sampling!r}")
        problems += working_spacing_problems(self.working_spacing_mm, self.tasks)
        if self.working_spacing_mm and self.parent:
            problems.append("a fine-tuned model keeps its parent's working spacing; leave the working spacing out")
        if problems:
            raise InputError("training settings: " + "; ".join(problems))

    def identity(self) -> dict[str, Any]:
        """The fields a resumed run must share with the interrupted one."""
        keys = ("tasks", "architecture", "arguments", "batch_size", "learning_rate", "validation_fraction", "seed", "data",
                "parent", *FIELDS_ADDED_LATER)
        identity = {key: getattr(self, key) for key in keys}
        # A field at the value every run had before it existed is left out: older runs stay resumable.
        return {key: value for key, value in identity.items()
                if key not in FIELDS_ADDED_LATER or value != FIELDS_ADDED_LATER[key]}


def training_label_space(config: TrainingConfig) -> LabelSpace:
    """The registered tasks of the run, each at its working spacing (the run's, where it sets one)."""
    return LabelSpace.from_names(config.tasks).with_working_spacing(config.working_spacing_mm)


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def collect_cases(config: TrainingConfig, label_space: LabelSpace | None = None) -> tuple[list[CaseFiles], list[CaseFiles]]:
    """Training and validation cases of the tasks of ``label_space`` (a fine-tune's parent's, which may
    carry a task no file registers; default: the registered tasks); label-map-only cases train the
    architectures that synthesise images from labels, and are never validation cases (they have no
    real image to judge)."""
    label_maps = architecture_class(config.architecture).synthesises_images
    cases: list[CaseFiles] = []
    for task_name in config.tasks:
        if task_name not in config.data:
            raise InputError(f"no data folder given for task {task_name}")
        task = label_space.task(task_name) if label_space is not None else get_task(task_name)
        cases += find_cases(task, config.data[task_name], label_maps_only=label_maps)
    train, validation = split_cases([c for c in cases if c.image is not None], config.validation_fraction, config.seed)
    return train + [c for c in cases if c.image is None], validation


def validation_dice(model: SegmentationModel, cases: Sequence[PreparedCase],
                    device: torch.device) -> tuple[list[dict], dict[str, float]]:
    """Per task, per class Dice of each validation case on the working grid, as Moeskops et al. score it.

    Each case is restricted to its own task. Multi-class tasks take the arg-max; a binary task's
    class is thresholded at the operating point with the highest Dice over all its validation cases
    (balanced sampling over-states rare classes, so its arg-max Dice swings from one check to the
    next). Returns the rows and those operating points.
    """
    architecture = model.architecture
    architecture.network.eval()
    label_space = model.label_space
    predicted: dict[int, np.ndarray] = {}
    binary: dict[str, list[tuple[int, np.ndarray]]] = {}
    for number, case in enumerate(cases):
        probabilities = background_outside(architecture.predict_probabilities(case.image, device), case.foreground)
        indices = np.asarray((0,) + label_space.indices_for_task(case.task))
        if indices.size == 2:
            kept = probabilities[indices]
            binary.setdefault(case.task, []).append((number, kept[1] / np.clip(kept.sum(axis=0), 1e-6, None)))
        else:
            predicted[number] = indices[np.argmax(probabilities[indices], axis=0)]
    operating_points = {}
    for task, scored in binary.items():
        index = label_space.indices_for_task(task)[0]
        curve = precision_recall_curve([p for _, p in scored], [cases[n].labels == index for n, _ in scored])
        operating_points[task] = curve["best_threshold"]
        for number, probability in scored:
            predicted[number] = np.where(probability >= curve["best_threshold"], index, 0)
    rows = []
    for number, case in enumerate(cases):
        for index, value in dice_per_class(predicted[number], case.labels, label_space.indices_for_task(case.task)).items():
            rows.append({"task": case.task, "class": label_space.entries[index].class_spec.name,
                         "case": case.name, "dice": value})
    architecture.network.train()
    return rows, operating_points


def operating_points_on_working_grid(model: SegmentationModel, config: TrainingConfig, device: torch.device) -> dict[str, float]:
    """The binary tasks' operating points chosen again on the validation cases of the run ``config`` made,
    on the grids the model now segments on. A point chosen on one grid does not carry over to another: on
    a finer grid a network trained with scale augmentation calls more voxels tumour (larger volumes, lower
    precision)."""
    validation = collect_cases(config, model.label_space)[1]
    if not validation:
        raise InputError(f"the run of {config.model_name} kept no validation cases (validation fraction "
                         f"{config.validation_fraction}): there is nothing to choose an operating point on")
    cases = [prepare_case(files, model.label_space) for files in validation]
    return validation_dice(model, cases, device)[1]


def _save_checkpoint(run: Path, model: SegmentationModel, optimizer: torch.optim.Optimizer, step: int,
                     rng: np.random.Generator, config: TrainingConfig) -> None:
    """Write the checkpoint to a fresh folder, then swap it in: never a half-written checkpoint."""
    staging = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=run))
    try:
        save_model(model, staging / "model")
        torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, staging / STATE_TENSORS)
        state = {"step": step, "numpy_rng": rng.bit_generator.state, "config": config.identity()}
        (staging / STATE_JSON).write_text(json.dumps(state), encoding="utf-8")
        target = run / CHECKPOINT_DIR
        old = run / ".checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _load_checkpoint(run: Path, config: TrainingConfig, device: torch.device):
    folder = run / CHECKPOINT_DIR
    state = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    stored = json.loads(json.dumps(config.identity()))
    if state["config"] != stored:
        changed = [key for key in {**state["config"], **stored} if state["config"].get(key) != stored.get(key)]
        raise InputError(
            f"{run} holds a run with different settings ({', '.join(changed)}); "
            "use another --out folder, or the same settings to resume"
        )
    model = load_model(folder / "model", device=device)
    try:  # weights_only: a tampered file cannot run code, but must not end in a traceback either
        tensors = torch.load(folder / STATE_TENSORS, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch raise several types for a damaged or foreign file
        raise InputError(
            f"{folder / STATE_TENSORS} is damaged or not a training state this library wrote ({type(error).__name__}); "
            f"move the checkpoint folder away to start the run afresh, or use another --out folder"
        ) from None
    rng = np.random.default_rng()
    rng.bit_generator.state = state["numpy_rng"]
    return model, tensors, rng, int(state["step"])


def check_run_folder(run: Path, config: TrainingConfig) -> None:
    """Refuse a run folder whose contents training would overwrite: a folder that is not a run, a run
    with other settings, or a finished run (its model) that has no checkpoint left to resume from."""
    if not run.exists():
        return
    if not run.is_dir():
        raise InputError(f"--out {run} is a file; give a folder for the run")
    if not any(run.iterdir()):
        return
    stored_config = run / "config.json"
    if not stored_config.is_file():
        raise InputError(f"--out {run} already holds files and is not a training run; give a new or empty folder")
    if (run / CHECKPOINT_DIR).exists():
        return  # resumed; _load_checkpoint compares the settings
    try:
        stored = TrainingConfig(**json.loads(stored_config.read_text(encoding="utf-8"))).identity()
    except (json.JSONDecodeError, TypeError) as error:
        raise InputError(f"{stored_config} is not a training configuration ({error}); give another --out") from None
    if stored != json.loads(json.dumps(config.identity())):
        raise InputError(f"{run} holds a run with different settings; use another --out folder")
    if (run / "model").exists():
        raise InputError(f"{run} holds a finished run whose checkpoint is gone, so it cannot be resumed; "
                         "use another --out folder (the model there is kept)")


def train(
    config: TrainingConfig,
    run: str | os.PathLike,
    log: Callable[[str], None] = print,
    stop_after: int | None = None,
    checkpoint_minutes: float | None = 10.0,
) -> SegmentationModel:
    """Train (or resume) the run in folder ``run``; returns the final model.

    Started by ``torchrun``, every process calls this with the same arguments: ``batch_size`` is the
    global mini-batch, shared by the processes; only process 0 logs and writes to ``run``.
    ``stop_after`` ends the process after that many steps of this call without finishing the run
    (used to test resumption; a killed process behaves the same). Besides the checkpoint at every
    validation, one is written once ``checkpoint_minutes`` have passed since the last (None: only at
    validations), so a run killed between slow validations loses minutes, not hours. It does not
    change the result: a resumed run ends with the same weights.
    """
    with distributed.session(config.device) as context:
        return _train(context, config, Path(run), log if context.is_main_process else _quiet, stop_after,
                      checkpoint_minutes)


def _quiet(message: str) -> None:
    pass


def _train(context: distributed.DistributedContext, config: TrainingConfig, run: Path,
           log: Callable[[str], None], stop_after: int | None,
           checkpoint_minutes: float | None) -> SegmentationModel:
    """The loop of :func:`train`, inside its process group (a process group of one when alone)."""
    main = context.is_main_process
    if main:
        check_run_folder(run, config)
        run.mkdir(parents=True, exist_ok=True)
    device = context.device
    if config.batch_size < context.world_size:
        raise InputError(f"a mini-batch of {config.batch_size} cannot be shared by {context.world_size} processes; "
                         "use a batch size of at least the number of processes")
    set_seed(config.seed)
    parent = load_model(config.parent["source"]) if config.parent else None
    label_space = parent.label_space if parent else training_label_space(config)
    arguments = dict(config.arguments) if parent else channel_arguments(config, label_space)
    train_files, validation_files = collect_cases(config, label_space)
    log(f"{len(train_files)} training and {len(validation_files)} validation cases for {', '.join(config.tasks)}")
    train_cases = [prepare_case(files, label_space) for files in train_files]
    validation_cases = [prepare_case(files, label_space) for files in validation_files] if main else []

    curve = LearningCurve(run)
    model, optimizer, rng, step = _start_or_resume(run, config, parent, label_space, arguments, device, main, log,
                                                   _case_names(train_files + validation_files))
    if main:  # forget what was logged after the checkpoint (all of it, when a run starts again)
        curve.drop_after(step)
    architecture = model.architecture
    distributed.replicate_network(architecture.network, context)
    scheduler = _scheduler(architecture, optimizer, config.steps if parent else None, step)
    sampler = BalancedVoxelSampler(train_cases, {t: label_space.indices_for_task(t) for t in config.tasks},
                                   per_case=config.sampling == "cases")
    architecture.network.train()

    started, steps_this_call = time.perf_counter(), 0
    last_checkpoint = time.monotonic()
    operating_points = None  # those of the latest validation: the final model's, once the loop ends
    keep_best = parent is not None and bool(validation_cases)  # early stopping on the held-back case(s)
    if keep_best and step == 0:
        remember_if_best(run, model, validation_dice(model, validation_cases, device)[0], 0)
    while step < config.steps:
        batch = distributed.share_of_batch(architecture.sample_batch(sampler, config.batch_size, rng), context)
        distributed.seed_dropout(config.seed, step, context)
        result = _optimise(architecture, optimizer, scheduler, batch, device, context)
        step += 1
        steps_this_call += 1
        logged = distributed.average_values({"loss": float(result.loss.detach()), **result.parts}, context)
        loss = logged.pop("loss")
        if main:
            curve.add_loss(step, loss, logged)
        if main and (step % config.validate_every == 0 or step == config.steps):
            rows, operating_points = validation_dice(model, validation_cases, device) if validation_cases else ([], {})
            curve.add_validation(step, rows)
            model.provenance = provenance(config, step, train_files, validation_files, started, context.world_size)
            if keep_best:
                remember_if_best(run, model, rows, step)
            _save_checkpoint(run, model, optimizer, step, rng, config)
            last_checkpoint = time.monotonic()
            log(f"step {step}/{config.steps} loss {loss:.4f} " + curve.summary(step))
        elif main and checkpoint_minutes is not None and time.monotonic() - last_checkpoint >= 60 * checkpoint_minutes:
            model.provenance = provenance(config, step, train_files, validation_files, started, context.world_size)
            _save_checkpoint(run, model, optimizer, step, rng, config)
            last_checkpoint = time.monotonic()
        if stop_after is not None and steps_this_call >= stop_after:
            return model
    if main:
        model.provenance = provenance(config, step, train_files, validation_files, started, context.world_size)
        if keep_best:
            kept = restore_best(run, model)
            model.provenance["kept_step"] = kept["step"]
            model.provenance["held_back_mean_dice"] = kept["history"]
            operating_points = None  # those of the kept weights
        model.card = _final_card(model, config, parent, curve, train_cases)
        if validation_cases:
            if operating_points is None:  # resumed after the last step, or the kept weights are older
                operating_points = validation_dice(model, validation_cases, device)[1]
            model.card["operating_points"] = {**model.card.get("operating_points", {}), **operating_points}
        save_model(model, run / "model")
        curve.plot()
    return model


def _start_or_resume(run: Path, config: TrainingConfig, parent: SegmentationModel | None, label_space: LabelSpace,
                     arguments: dict, device: torch.device, main: bool, log: Callable[[str], None],
                     cases: list[str]):
    """Model, optimiser, random generator and step: the run's checkpoint's, or a fresh start's."""
    if (run / CHECKPOINT_DIR).exists():
        model, optimizer, rng, step = _resume(run, config, device)
        _check_same_cases(run, model, cases)
        if step > config.steps:
            raise InputError(f"{run} has already trained {step} mini-batches, more than --steps {config.steps}; "
                             f"ask for at least {step} (the same number re-saves its model), or use another --out")
        if main and step < config.steps:
            _keep_finished_model(run, config, step, log)
        log(f"resuming {run} at step {step}")
        return model, optimizer, rng, step
    if main:
        (run / "config.json").write_text(json.dumps(asdict(config), indent=2), encoding="utf-8")
    model = _initial_model(config, parent, label_space, arguments)
    model.architecture.network.to(device)
    return model, model.architecture.make_optimizer(config.learning_rate), np.random.default_rng(config.seed), 0


def _case_names(files: Sequence[CaseFiles]) -> list[str]:
    return sorted(f"{case.task}/{case.name}" for case in files)


def trained_cases(provenance: dict) -> list[str]:
    """The ``TASK/CASE`` names a model's provenance says it trained and validated on, sorted."""
    return sorted(provenance.get("training_cases", []) + provenance.get("validation_cases", []))


def _check_same_cases(run: Path, checkpoint: SegmentationModel, cases: list[str]) -> None:
    """A run resumes only on the cases it started with: a finished run would return its old weights
    named as trained on the new cases (a fine-tune on replaced corrections), an interrupted one would mix them."""
    before = trained_cases(checkpoint.provenance)
    if before and before != cases:
        added, removed = sorted(set(cases) - set(before)), sorted(set(before) - set(cases))
        raise InputError(f"the cases under --data changed since {run} was started (added: {', '.join(added) or 'none'}; "
                         f"gone: {', '.join(removed) or 'none'}); use another --out folder for a run on the cases as they are now")


def _keep_finished_model(run: Path, config: TrainingConfig, step: int, log: Callable[[str], None]) -> None:
    """Training a finished run further: its model moves to ``model_stepN`` (the extended run writes
    ``model`` anew) and ``config.json`` records the new number of steps, so nothing is lost unsaid."""
    finished = run / "model"
    if not finished.exists():
        return  # an interrupted run, resumed
    kept = run / f"model_step{step}"
    if kept.exists():
        raise InputError(f"{run} holds both {finished.name} and {kept.name}; move one away to train it further")
    os.replace(finished, kept)
    stored = json.loads((run / "config.json").read_text(encoding="utf-8"))
    (run / "config.json").write_text(json.dumps({**stored, "steps": config.steps}, indent=2), encoding="utf-8")
    log(f"training the finished run {run} further, from {step} to {config.steps} mini-batches; "
        f"its {step}-step model is kept in {kept}")


def _scheduler(architecture, optimizer: torch.optim.Optimizer, steps_per_epoch: int | None, step: int):
    """The architecture's learning-rate schedule, if it has one, advanced to ``step``; a fine-tune
    (``steps_per_epoch``: its own steps) anneals over its run, not over the parent's."""
    scheduler = architecture.make_scheduler(optimizer, steps_per_epoch)
    if scheduler is None:
        return None
    for _ in range(step):
        scheduler.step()
    return scheduler


def _optimise(architecture, optimizer, scheduler, batch, device: torch.device, context) -> TrainingStep:
    """One optimiser step on ``batch`` (gradients averaged over the process group)."""
    result = architecture.training_step(batch, device)
    optimizer.zero_grad(set_to_none=True)
    result.loss.backward()
    distributed.average_gradients(architecture.network.parameters(), context)
    architecture.clip_gradients()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return result


def _resume(run: Path, config: TrainingConfig, device: torch.device):
    """Model, optimiser, random generator and step of the run's checkpoint; torch's RNG restored."""
    model, tensors, rng, step = _load_checkpoint(run, config, device)
    optimizer = model.architecture.make_optimizer(config.learning_rate)
    optimizer.load_state_dict(tensors["optimizer"])
    torch.set_rng_state(tensors["torch_rng"])
    return model, optimizer, rng, step


def _initial_model(config: TrainingConfig, parent: SegmentationModel | None, label_space: LabelSpace,
                   arguments: dict) -> SegmentationModel:
    """A new network, or for a fine-tune the parent itself under the new model's name."""
    if parent is None:
        model = SegmentationModel.create(config.model_name, config.architecture, label_space, **arguments)
        if config.init_from:
            initialise_from(model, load_model(config.init_from))
        return model
    parent.name, parent.version, parent.path = config.model_name, f"{parent.version}+finetuned", None
    return parent


def initialise_from(model: SegmentationModel, source: SegmentationModel) -> None:
    """Copy ``source``'s weights into ``model`` wherever a tensor's name and shape agree (and where the
    architecture can widen them: see ``weights_from``). Refuses a source that shares no tensor
    (another architecture or size)."""
    if source.architecture.name != model.architecture.name:
        raise InputError(f"cannot start a {model.architecture.name} network from {source.name}, a "
                         f"{source.architecture.name} network; pick a model of the same architecture")
    copied = model.architecture.weights_from(source.architecture)
    if not copied:
        raise InputError(f"{source.name} shares no weights with the new network (different size or channels); "
                         "train from scratch or pick a model with the same architecture arguments")
    model.architecture.network.load_state_dict(copied, strict=False)


def _final_card(model: SegmentationModel, config: TrainingConfig, parent: SegmentationModel | None,
                curve: LearningCurve, train_cases) -> dict[str, Any]:
    """A new model's card; a fine-tune keeps its parent's (less the parent's own results) and names it."""
    if parent is None:
        return {**model_card(model, curve), CARD_KEY: training_volume_ranges(train_cases, model.label_space)}
    card = {key: value for key, value in model.card.items()
            if not key.startswith("cross_validated") and key != "simulated_repeat_volume_cv_percent"}
    return {**card, **model_card(model, curve), "fine_tuned_from": dict(config.parent)}


BEST_DIR = "best"


def remember_if_best(run: Path, model: SegmentationModel, rows: list[dict], step: int) -> None:
    """Keep the weights with the highest mean Dice on the held-back cases (step 0: the parent's)."""
    score = float(np.mean([row["dice"] for row in rows])) if rows else 0.0
    record_path = run / BEST_DIR / "best.json"
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.exists() else {"score": -1.0, "history": {}}
    record["history"][str(step)] = round(score, 4)
    if score > record["score"]:
        save_model(model, run / BEST_DIR / "model")
        record.update(score=score, step=step)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1), encoding="utf-8")


def restore_best(run: Path, model: SegmentationModel) -> dict:
    """Put the best remembered weights into ``model``; returns the record (step, score, history)."""
    record = json.loads((run / BEST_DIR / "best.json").read_text(encoding="utf-8"))
    best = load_model(run / BEST_DIR / "model")
    model.architecture.network.load_state_dict(best.architecture.network.state_dict())
    return record


def channel_arguments(config: TrainingConfig, label_space: LabelSpace) -> dict:
    """The architecture arguments, with ``in_channels`` set from the tasks' channels. One network
    reads one kind of input: tasks with different channel counts cannot share it."""
    counts = {name: len(label_space.task(name).channels) for name in config.tasks}
    if len(set(counts.values())) > 1:
        raise InputError(f"the tasks read different numbers of images ({', '.join(f'{k}: {v}' for k, v in counts.items())}); "
                         "train tasks with the same channels together")
    count = next(iter(counts.values()))
    if count == 1:
        return dict(config.arguments)
    if not architecture_class(config.architecture).reads_channels:
        raise InputError(f"architecture {config.architecture} reads one image; task(s) {', '.join(config.tasks)} read "
                         f"{count} channels: use --arch unet2d_multiplanar")
    return {**config.arguments, "in_channels": count}


def provenance(config: TrainingConfig, step: int, train_files, validation_files, started: float,
               processes: int = 1) -> dict[str, Any]:
    return {
        "config": asdict(config),
        "steps_done": step,
        "processes": processes,
        "training_cases": [f"{c.task}/{c.name}" for c in train_files],
        "validation_cases": [f"{c.task}/{c.name}" for c in validation_files],
        "seconds_this_session": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
    }


def model_card(model: SegmentationModel, curve: LearningCurve) -> dict[str, Any]:
    """What a user needs to judge the model: tasks, intended input and validation Dice."""
    return {
        "description": f"{model.architecture.summary} trained on {', '.join(model.label_space.task_names)}",
        "intended_input": {
            task.name: f"{task.modality}, {task.anatomy}; resampled to {task.working_spacing_mm} mm"
            for task in model.label_space.tasks
        },
        "validation_dice": curve.final_dice(),
    }
