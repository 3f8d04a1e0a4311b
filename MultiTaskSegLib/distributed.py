"""Data-parallel training over the processes ``torchrun`` starts: one per GPU (NCCL) or several on CPUs (Gloo).

torchrun gives every process ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; a process started without them trains alone, exactly as before. Every process
builds the same sampler with the same seed and so draws the same *global* mini-batch, then keeps
every N-th sample (:func:`share_of_batch`): the sampler lists a batch grouped by task and class, so
every share keeps the batch's balance over tasks and classes. Gradients are averaged over the
processes after ``backward`` (:func:`average_gradients`), so the optimiser step is the same
everywhere and the copies of the network stay equal. Only process 0 writes files.

Why not ``DistributedDataParallel``: an architecture runs its network through its own methods
(``forward_block`` for the triplanar CNN), not through ``forward``, which is the only way DDP sees a
pass; and the batch norm below communicates during the forward and backward passes, which would
interleave with DDP's background gradient all-reduces. One all-reduce of all gradients after
``backward`` is the same arithmetic as DDP (a mean over processes), keeps every collective in the
same order on every process, and costs little for networks of this size.

Batch norm: in training, batch norm normalises with the statistics of the mini-batch, so with
statistics per process a distributed step would not be the step of the global batch. The
network's batch-norm layers are replaced by :class:`GlobalBatchNorm`, which pools the statistics of
all processes: on GPUs it is ``torch.nn.SyncBatchNorm``; on CPUs, where PyTorch refuses that
("SyncBatchNorm expected input tensor to be on GPU"), it pools them with differentiable
all-reduces over Gloo. Weights, buffers and model files are those of ordinary batch norm.

What stays per process: a loss that normalises over the batch is computed over each share (the
triplanar loss gives every class the same weight *within the share*, so a distributed step equals
the global step when every share holds the same number of labelled voxels per class, e.g. with
``grid=1`` and a batch size divisible by processes x classes), and each process draws its own
dropout masks.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .errors import InputError
from .inference import choose_device

#: How long a process waits in a collective: the others wait while process 0 validates and writes a
#: checkpoint, which on whole volumes can take longer than PyTorch's default (10 min with NCCL).
COLLECTIVE_TIMEOUT = timedelta(hours=1)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0


def ranks_from_environment(environment: Mapping[str, str] = os.environ) -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) for a process started alone."""
    try:
        world_size = int(environment.get("WORLD_SIZE", "1"))
        rank = int(environment.get("RANK", "0"))
        local_rank = int(environment.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise InputError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers; start distributed training with torchrun"
        ) from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise InputError(
            f"RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank} do not fit together; "
            "start distributed training with torchrun"
        )
    return rank, world_size, local_rank


def is_main_process() -> bool:
    """True in a process started alone and in process 0 of a distributed run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return ranks_from_environment()[0] == 0


def _process_device(requested: str, local_rank: int) -> torch.device:
    """One GPU per process on a node (``cuda:LOCAL_RANK``); the CPU for every process otherwise."""
    device = choose_device(requested)
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise InputError(
            f"process with LOCAL_RANK={local_rank} needs a GPU of its own but this node has "
            f"{torch.cuda.device_count()}; start at most that many processes per node (--nproc_per_node)"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[DistributedContext]:
    """The process group for one training run: NCCL on GPUs, Gloo on CPUs; nothing when alone.

    A group that is already initialised is used as it is and left open; one started here is
    closed on the way out, after a barrier so that no process leaves before process 0 has
    written the run's files.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = ranks_from_environment()[2] if "LOCAL_RANK" in os.environ else rank
    else:
        rank, world_size, local_rank = ranks_from_environment()
    if world_size == 1:
        yield DistributedContext(device=choose_device(device))
        return
    process_device = _process_device(device, local_rank)
    started_here = not dist.is_initialized()
    if started_here:
        # torch._dynamo, which the first optimiser imports, keeps references to a default process group
        # that exists when it is imported, so the group would outlive destroy_process_group and its Gloo
        # threads could release tensors while the interpreter shuts down, which aborts the process
        # ("terminate called without an active exception", seen with torch 2.13). Import it first.
        import torch._dynamo  # noqa: F401

        backend = "nccl" if process_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    try:
        yield DistributedContext(rank, world_size, local_rank, process_device)
        dist.barrier(device_ids=[process_device.index] if process_device.type == "cuda" else None)
    finally:
        if started_here:
            dist.destroy_process_group()


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the sum of the processes' gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        total = gradient.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=ctx.group)
        return total, None


class GlobalBatchNorm(nn.SyncBatchNorm):
    """Batch norm whose training statistics are those of the global batch, on GPUs and CPUs alike."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        pooled = self.training and dist.is_available() and dist.is_initialized() and input.device.type == "cpu"
        if not pooled or dist.get_world_size(self.process_group) == 1:
            return super().forward(input)
        return self._forward_pooled_on_cpu(input)

    def _forward_pooled_on_cpu(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        dtype, input = input.dtype, input.float()  # statistics in float32, also under bfloat16 autocast
        group = self.process_group  # None: the default group
        reduced = [0, *range(2, input.dim())]
        per_channel = (1, -1) + (1,) * (input.dim() - 2)
        local_count = input.new_tensor([input.numel() // input.shape[1]])
        totals = _SumOverProcesses.apply(torch.cat([input.sum(reduced), local_count]), group)
        count = totals[-1].detach()
        mean = totals[:-1] / count
        centred = input - mean.reshape(per_channel)
        variance = _SumOverProcesses.apply(centred.square().sum(reduced), group) / count
        output = centred * torch.rsqrt(variance + self.eps).reshape(per_channel)
        if self.affine:
            output = output * self.weight.reshape(per_channel) + self.bias.reshape(per_channel)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            with torch.no_grad():
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(variance * count / (count - 1), factor)
        return output.to(dtype)


def pool_batch_norm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm1d/2d/3d replaced by :class:`GlobalBatchNorm` sharing its
    parameters and buffers (an optimiser made before keeps working); the others are returned as they are."""
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        pooled = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats)
        if module.affine:
            pooled.weight, pooled.bias = module.weight, module.bias
        pooled.running_mean, pooled.running_var = module.running_mean, module.running_var
        pooled.num_batches_tracked = module.num_batches_tracked
        pooled.train(module.training)
        return pooled
    for name, child in module.named_children():
        module.add_module(name, pool_batch_norm(child))
    return module


def replicate_network(network: nn.Module, context: DistributedContext) -> None:
    """Prepare ``network`` (in place) for a distributed run: batch norm pooled over the processes,
    parameters and buffers copied from process 0 so every copy starts equal."""
    if not context.is_distributed:
        return
    pool_batch_norm(network)
    with torch.no_grad():
        for tensor in [*network.parameters(), *network.buffers()]:
            dist.broadcast(tensor, src=0)


def share_of_batch(batch: Mapping[str, torch.Tensor], context: DistributedContext) -> Mapping[str, torch.Tensor]:
    """This process's samples of a global batch: rows rank, rank + N, rank + 2N, ...

    Every tensor of the batch holds one row per sample. Taking every N-th row rather than a
    contiguous block keeps the batch's grouping by task and class in every share.
    """
    if not context.is_distributed:
        return batch
    lengths = {key: len(value) for key, value in batch.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"cannot split a batch whose tensors hold different numbers of samples: {lengths}")
    return {key: value[context.rank :: context.world_size].contiguous() for key, value in batch.items()}


def average_gradients(parameters: Iterable[nn.Parameter], context: DistributedContext) -> None:
    """Replace every gradient by its mean over the processes (one all-reduce per dtype).

    A parameter without a gradient counts as a zero gradient, so every process reduces the same
    tensors even if a pass left a parameter unused on one of them.
    """
    if not context.is_distributed:
        return
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for parameter in parameters:
        if parameter.requires_grad:
            by_dtype.setdefault(parameter.dtype, []).append(parameter)
    for group in by_dtype.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
        dist.all_reduce(flat)
        flat /= context.world_size
        for parameter, gradient in zip(group, flat.split([p.numel() for p in group])):
            parameter.grad = gradient.view_as(parameter)


def average_values(values: Mapping[str, float], context: DistributedContext) -> dict[str, float]:
    """The mean of each logged number over the processes (for the loss curve)."""
    if not context.is_distributed:
        return dict(values)
    totals = torch.tensor(list(values.values()), dtype=torch.float64, device=context.device)
    dist.all_reduce(totals)
    return dict(zip(values, (totals / context.world_size).tolist()))


def seed_dropout(seed: int, step: int, context: DistributedContext) -> None:
    """Give each process its own reproducible random stream for this step (dropout masks).

    Without it every process would draw the same masks for its share; seeding by (seed, step,
    rank) also makes a resumed distributed run draw what the uninterrupted one would have.
    """
    if context.is_distributed:
        torch.manual_seed(int(np.random.SeedSequence([seed, step, context.rank]).generate_state(1)[0]))
