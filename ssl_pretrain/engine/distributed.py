"""torch.distributed for many GPUs and nodes: process group, rank-0-only work, synchronised BatchNorm.

A run launched by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``) joins a process group: NCCL when the ranks train on CUDA
GPUs, gloo otherwise. Without those variables everything here is a no-op for one process.

What the training loop gets from here:

* ``DistInfo``: rank, world size and the device of this rank;
* ``main_first``: run something (prepare the run folder) on rank 0 and re-raise its one-line
  error on every rank, so a refused run never leaves the other ranks waiting;
* ``mean_over_ranks``: the loss every rank logs and checks for divergence;
* ``convert_sync_batchnorm``: BatchNorm over the global batch - torch's ``SyncBatchNorm`` on
  GPUs, ``GlobalBatchNorm`` (below, two all-reduces per layer) on CPUs, where torch's refuses.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("ssl_pretrain")

T = TypeVar("T")

# A rank waits this long for the others (rank 0 may be writing a checkpoint or running the kNN
# monitor while they wait at the next all-reduce); torch's NCCL default is 10 minutes.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job; ``world_size == 1`` for a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started_here: bool = False
    """True when ``init_distributed`` created the process group (and so must destroy it)."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_distributed() -> bool:
    """True inside a job started by ``torchrun`` (or any launcher setting the same variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def wants_cuda(device_setting: str) -> bool:
    return device_setting.startswith("cuda") or (device_setting == "auto" and torch.cuda.is_available())


def init_distributed(device_setting: str = "auto") -> tuple[DistInfo, Optional[torch.device]]:
    """Join the process group of a ``torchrun`` job (NCCL on CUDA, gloo on CPU).

    Returns:
        ``(info, device)``; ``device`` is ``cuda:LOCAL_RANK`` for a CUDA job and None when the
        caller should resolve ``device_setting`` itself (single process, or CPU ranks).

    Raises:
        RuntimeError: torchrun's variables are incomplete or the rendezvous fails (one line).
    """
    if dist.is_available() and dist.is_initialized():  # the caller set it up (e.g. a test)
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local) if dist.get_backend() == "nccl" else None
        return DistInfo(rank, world, local, started_here=False), device
    if not launched_distributed():
        return DistInfo(), None
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = wants_cuda(device_setting)
    if cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but this node has {torch.cuda.device_count()} GPUs: "
                               "pass --nproc-per-node no larger than the GPU count")
        torch.cuda.set_device(local)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local, started_here=True)
    if info.is_main:
        log.info("distributed: %d ranks (%s)", info.world_size, backend)
    return info, torch.device("cuda", local) if cuda else None


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if ``init_distributed`` created it."""
    if info.started_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def main_first(info: DistInfo, action: Callable[[], T]) -> Optional[T]:
    """Run ``action`` on rank 0 only; if it raises, raise the same one-line error on every rank.

    Returns:
        ``action()``'s value on rank 0, None elsewhere.
    """
    if not info.enabled:
        return action()
    outcome: list = [None]
    result = None
    if info.is_main:
        try:
            result = action()
        except Exception as error:  # re-raised below, after the others have heard of it
            outcome = [(type(error), str(error))]
            dist.broadcast_object_list(outcome, src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        error_type, message = outcome[0]
        try:
            raise error_type(message)
        except TypeError:  # an error class that takes other arguments
            raise RuntimeError(message) from None
    return result


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a scalar over ranks (the global batch's loss); the value itself for one rank."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / info.world_size


def min_over_ranks(value: int, info: DistInfo, device: torch.device) -> int:
    if not info.enabled:
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def max_over_ranks(value: float, info: DistInfo, device: torch.device) -> float:
    """The largest of a float over ranks (the budget clock: every rank must see the same time)."""
    if not info.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def gather_skipped(skipped: dict[str, str], info: DistInfo) -> dict[str, str]:
    """Every rank's unreadable files, merged (each rank reads only its shard of each batch)."""
    if not info.enabled:
        return skipped
    everyone: list = [None] * info.world_size
    dist.all_gather_object(everyone, skipped)
    merged: dict[str, str] = {}
    for part in everyone:
        merged.update(part)
    return merged


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    return _AllReduceSum.apply(tensor, group)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the batches of all ranks, on any device.

    torch's ``SyncBatchNorm`` only runs on GPUs. This one computes the global mean and then the
    global variance with two autograd-aware all-reduces, so gradients
    flow back to every rank's inputs exactly as for one BatchNorm over the whole batch. State-dict
    keys are BatchNorm's, so checkpoints and exported backbones load into plain models.

    Its collectives run in a process group of their own: in the backward pass they would
    otherwise interleave with DistributedDataParallel's asynchronous gradient all-reduces on the
    default group, and ranks could pair up different tensors.
    """

    group = None

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0] + list(range(2, input.dim()))
        shape = [1, input.shape[1]] + [1] * (input.dim() - 2)
        count = torch.tensor([input.numel() / input.shape[1]], device=input.device, dtype=input.dtype)
        total = all_reduce_sum(torch.cat([input.sum(dims), count]), self.group)
        n = total[-1].detach()
        mean = total[:-1] / n
        centred = input - mean.view(shape)
        var = all_reduce_sum(centred.pow(2).sum(dims), self.group) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                            else self.momentum)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * n / max(float(n) - 1, 1.0), momentum)
        output = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        return output


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer of ``module`` computes its statistics over the global batch.

    Parameters and buffers are kept (the same tensors), so call this before building the
    optimiser or loading a checkpoint, as with torch's ``convert_sync_batchnorm``.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if dist.is_initialized() and GlobalBatchNorm.group is None:
        GlobalBatchNorm.group = dist.new_group(backend="gloo")  # every rank gets here in the same order
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module


def unwrap(model: nn.Module) -> nn.Module:
    """The model under ``DistributedDataParallel`` and ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


__all__ = ["DistInfo", "init_distributed", "shutdown", "barrier", "main_first", "mean_over_ranks",
           "min_over_ranks", "gather_skipped", "GlobalBatchNorm", "convert_sync_batchnorm", "unwrap",
           "launched_distributed"]
