"""torch.distributed under torchrun, guarded so the same code runs as a single process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessGroup:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def launched_world() -> tuple[int, int]:
    """(rank, world size) torchrun gave this process; (0, 1) without torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def setup(device_type: str) -> ProcessGroup:
    """Join the process group torchrun describes in the environment; a no-op without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ProcessGroup()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), local_rank)


def teardown(group: ProcessGroup) -> None:
    if group.active and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    if group.active:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, group: ProcessGroup, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any (so all ranks stop at the same step)."""
    if not group.active:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(value, group).item() > 0)


def barrier(group: ProcessGroup) -> None:
    if group.active:
        dist.barrier()


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    The gathered tensor feeds the loss on every rank, so this rank's slice has one gradient per
    rank; its true gradient is their sum. Backward therefore all-reduces (SUM) the full (W*B, ...)
    gradient and keeps this rank's rows: what reduce-scatter does, in a call gloo supports too.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(pieces, tensor.contiguous())
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        summed = grad_output.contiguous().clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """(B, ...) on each rank -> (W*B, ...): every rank's tensor in rank order, differentiable.

    Gradients flow back to each rank's own slice, summed over the ranks whose loss used it (see
    `_AllGatherWithGrad`). Every rank must pass the same shape and must run backward, since the
    backward is a collective too. Identity without an active process group.
    """
    if not group.active:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_gather_no_grad(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """(B, ...) on each rank -> (W*B, ...) in rank order, detached (e.g. MoCo keys for the queue).

    Every rank must pass the same shape. Identity (detached) without an active process group.
    """
    tensor = tensor.detach()
    if not group.active:
        return tensor
    pieces = [torch.empty_like(tensor) for _ in range(group.world)]
    dist.all_gather(pieces, tensor.contiguous())
    return torch.cat(pieces)


def current_group() -> ProcessGroup:
    """The process group this process already joined (via `setup`), or the single-process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return ProcessGroup()
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
