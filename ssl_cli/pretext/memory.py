"""State the contrastive methods carry between steps: MoCo's queue, PIRL's bank, momentum encoders.

All of it lives in registered buffers, so a checkpoint's state_dict restores it exactly, and none
of it takes gradient: rows are written from detached features.

Under DDP every rank must hold the same queue and bank. The caller therefore gathers the new keys
(and, for the bank, their dataset indices) from all ranks first, with
`ssl_cli.train.distributed.all_gather_no_grad`, and every rank writes the same rows.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def _random_unit_rows(rows: int, dim: int, generator: torch.Generator | None) -> torch.Tensor:
    """(rows, dim) Gaussian rows scaled to unit length: uniform directions on the sphere."""
    if rows < 1 or dim < 1:
        raise ValueError(f"a feature store needs at least one row and one dimension, got ({rows}, {dim}).")
    return F.normalize(torch.randn(rows, dim, generator=generator), dim=1)


class FeatureQueue(nn.Module):
    """MoCo's first-in first-out queue of K keys: buffers `queue` (K, D) and `pointer` ().

    Starts with random unit rows (drawn from `generator`, or torch's global RNG without one),
    which stand in as negatives until K real keys have been written. `pointer` is the next row
    to overwrite. Under DDP, enqueue the keys of every rank (gathered in rank order), so every
    rank's queue stays identical.
    """

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None):
        super().__init__()
        self.register_buffer("queue", _random_unit_rows(size, dim, generator))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write keys (B, D) at the pointer, wrapping around, and advance it by B (mod K).

        Same result as writing the keys one at a time: B need not divide K, and with B > K
        only the last K keys survive. Keys are stored detached, as given (losses normalise).
        """
        size, dim = self.queue.shape
        if keys.ndim != 2 or keys.shape[1] != dim:
            raise ValueError(
                f"the queue holds ({size}, {dim}) keys, got keys of shape {tuple(keys.shape)}; "
                "enqueue the key encoder's projections, flattened to (B, D)."
            )
        keys = keys.detach()
        count = keys.shape[0]
        start = int(self.pointer)
        rows = (start + torch.arange(count, device=self.queue.device)) % size
        if count > size:
            keys, rows = keys[-size:], rows[-size:]
        self.queue[rows] = keys.to(self.queue.dtype)
        self.pointer.fill_((start + count) % size)


class MemoryBank(nn.Module):
    """PIRL's memory bank: buffer `bank` (N, D), one L2-normalised row per dataset image.

    Rows start as random unit vectors (from `generator`, or torch's global RNG) and follow an
    exponential moving average of the image's features as the image is seen (`update`).
    """

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None):
        super().__init__()
        self.register_buffer("bank", _random_unit_rows(size, dim, generator))

    @torch.no_grad()
    def update(self, indices: torch.Tensor, features: torch.Tensor, momentum: float) -> None:
        """bank[i] = normalise(m * bank[i] + (1 - m) * normalise(f)) for indices (B,), features (B, D).

        Indices must be distinct within a call (a batch of a sampler is); under DDP gather indices
        and features of every rank first. Features are read detached.
        """
        size, dim = self.bank.shape
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"memory-bank momentum must lie in [0, 1], got {momentum}; PIRL uses 0.5.")
        if indices.ndim != 1 or features.shape != (indices.shape[0], dim):
            raise ValueError(
                f"the bank holds ({size}, {dim}) rows; update it with indices (B,) and features (B, {dim}), "
                f"got {tuple(indices.shape)} and {tuple(features.shape)}."
            )
        new = F.normalize(features.detach().to(self.bank.dtype), dim=1)
        mixed = momentum * self.bank[indices] + (1.0 - momentum) * new
        self.bank[indices] = F.normalize(mixed, dim=1)

    def sample_negatives(self, indices: torch.Tensor, count: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """indices (B,) -> (B, count) bank rows drawn uniformly, with replacement, never the own row.

        Draws from the N - 1 other rows: r uniform in [0, N - 1), shifted up by one where r >= own.
        `generator` must live on the bank's device (CPU generator for a CPU bank).
        """
        size = self.bank.shape[0]
        if size < 2:
            raise ValueError(f"negatives need a bank of at least 2 rows (the own row is excluded), got {size}.")
        if count < 1 or indices.ndim != 1:
            raise ValueError(f"sample_negatives needs indices (B,) and count >= 1, got {tuple(indices.shape)} and {count}.")
        draws = torch.randint(0, size - 1, (indices.shape[0], count), generator=generator, device=self.bank.device)
        own = indices.to(self.bank.device).unsqueeze(1)
        return draws + (draws >= own).long()


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """target <- m * target + (1 - m) * online for every parameter; buffers copied as they are.

    The MoCo/BYOL key encoder update. Buffers (BatchNorm running statistics, counters) are copied
    from the online network rather than averaged. Both modules must have the same structure.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}; MoCo uses 0.999, BYOL 0.996 upwards.")
    online_parameters, target_parameters = dict(online.named_parameters()), dict(target.named_parameters())
    online_buffers, target_buffers = dict(online.named_buffers()), dict(target.named_buffers())
    if online_parameters.keys() != target_parameters.keys() or online_buffers.keys() != target_buffers.keys():
        raise ValueError(
            "momentum_update needs the online and target networks to have the same parameters and "
            f"buffers; they differ in {sorted(online_parameters.keys() ^ target_parameters.keys())} "
            f"{sorted(online_buffers.keys() ^ target_buffers.keys())}. Build the target with copy_for_momentum."
        )
    for name, parameter in target_parameters.items():
        parameter.mul_(momentum).add_(online_parameters[name].detach(), alpha=1.0 - momentum)
    for name, buffer in target_buffers.items():
        buffer.copy_(online_buffers[name])


def copy_for_momentum(module: nn.Module) -> nn.Module:
    """A deep copy of `module` with requires_grad False everywhere: the momentum (target) encoder."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target
