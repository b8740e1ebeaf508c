"""torch.distributed under torchrun, guarded so the same code runs as a single process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ssl_cli.train.ranks import ProcessGroup, launched_world  # re-exported: distributed.ProcessGroup


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


def on_backend_device(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` where the process group's backend can send it: on this rank's GPU under nccl (which cannot send
    host memory), else unchanged. Callers move results back with `.to(original.device)`."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def all_gather_rows(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """(n_r, ...) on rank r -> (n_0 + ... + n_{W-1}, ...) on every rank, in rank order, detached, on `tensor`'s device.

    Row counts may differ between ranks (0 included); the trailing shape and the dtype must not. Each rank's rows
    are padded to the largest count for the collective, so it moves W x max(n_r) rows. Identity (detached) without
    an active process group."""
    tensor = tensor.detach()
    if not group.active:
        return tensor
    wire = on_backend_device(tensor.contiguous())
    counts = [int(count) for count in all_gather_no_grad(torch.tensor([wire.shape[0]], device=wire.device), group)]
    most = max(counts)
    if most == 0:
        return tensor[:0]
    padded = wire.new_zeros((most, *wire.shape[1:]))
    padded[: wire.shape[0]] = wire
    pieces = [torch.empty_like(padded) for _ in range(group.world)]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:count] for piece, count in zip(pieces, counts)]).to(tensor.device)


def broadcast_from_main(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Rank 0's `tensor` on every rank (each rank passes one of the same shape and dtype), on `tensor`'s device.
    Identity without an active process group."""
    if not group.active:
        return tensor
    wire = on_backend_device(tensor.contiguous())
    dist.broadcast(wire, src=0)
    return wire.to(tensor.device)


# --- rows shared across ranks (SCAN's heads and assignments, between trainings) --------------------

_joins = 0  # groups `join` made in this process: each on its own key prefix of torchrun's store


def join(device_type: str) -> ProcessGroup:
    """`setup` that may follow a `teardown` in the same process: the training loop and `ssl extract` tear
    down the group they used, and a stage that works between them (SCAN) joins again. torch's own
    re-initialisation reuses the store keys of the group before it and was seen to hang on them (1 of 4
    re-joins, 2 gloo ranks), so a re-join makes its group on a fresh key prefix of the store torchrun's
    agent keeps. A no-op while a group is joined, and without torchrun."""
    global _joins
    if launched_world()[1] > 1 and not dist.is_initialized() and \
            os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store, rank, world = next(dist.rendezvous("env://"))
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world,
                                store=dist.PrefixStore(f"ssl-cli/join-{_joins}", store))
        _joins += 1
    return setup(device_type)


def row_share(n: int, group: ProcessGroup) -> range:
    """This rank's contiguous share of `n` rows: rank r takes [r * ceil(n / W), (r + 1) * ceil(n / W)),
    the last shares shorter (or empty); all of [0, n) without an active group."""
    per = -(-n // group.world)
    return range(min(n, group.rank * per), min(n, (group.rank + 1) * per))


def gather_rows(part: torch.Tensor, n: int, group: ProcessGroup) -> torch.Tensor:
    """Each rank's `row_share(n)` rows (R_r, ...) -> all `n` rows (n, ...) in row order, on every rank.

    The parts are padded to ceil(n / W) rows and gathered straight into one (W * ceil(n / W), ...) tensor,
    so the result costs one copy of the rows (`all_gather_rows`, for counts not known in advance, holds
    two). On `part`'s device; `part` itself without an active group."""
    if not group.active:
        return part
    per = -(-n // group.world)
    padded = on_backend_device(part.new_zeros((per, *part.shape[1:])))
    padded[: len(part)] = part
    gathered = padded.new_empty((per * group.world, *part.shape[1:]))
    dist.all_gather(list(gathered.chunk(group.world)), padded)  # row blocks of one tensor: contiguous views
    return gathered[:n].to(part.device)


def gather_counts(count: int, group: ProcessGroup) -> list[int]:
    """Every rank's `count` in rank order (a record of each rank's share of the work); [count] alone
    without an active group."""
    own = torch.tensor([count], dtype=torch.int64)
    return [int(value) for value in gather_rows(own, group.world, group).tolist()]



# --- point to point, for work passed rank to rank in order (sharded PCA fit of `ssl cluster`) ------

def send_to(tensor: torch.Tensor, rank: int) -> None:
    """Send `tensor` to `rank`, which receives it with `receive_from` into a tensor of the same shape and dtype."""
    dist.send(on_backend_device(tensor.contiguous()), dst=rank)


def receive_from(like: torch.Tensor, rank: int) -> torch.Tensor:
    """What `rank` sent with `send_to`: a new tensor shaped and typed like `like`, on `like`'s device."""
    wire = on_backend_device(torch.empty_like(like))
    dist.recv(wire, src=rank)
    return wire.to(like.device)


def broadcast_from(tensor: torch.Tensor, rank: int, group: ProcessGroup) -> torch.Tensor:
    """`rank`'s `tensor` on every rank (each passes one of the same shape and dtype), on `tensor`'s device.
    Identity without an active process group."""
    if not group.active:
        return tensor
    wire = on_backend_device(tensor.contiguous())
    dist.broadcast(wire, src=rank)
    return wire.to(tensor.device)
