"""NT-Xent, SimCLR's normalised temperature-scaled cross entropy (Chen et al. 2020).

Two views of B images are projected to z1, z2 (B, D). Stack them as u = normalise([z1; z2])
(2B, D), one unit row per view; the similarity of rows i and j is s_ij = u_i . u_j / T. Row i's
positive p(i) is the other view of the same image (i + B for i < B, i - B otherwise); every
other row except i itself is a negative. The loss is the cross entropy over the 2B rows,

    loss = 1/(2B) sum_i [ -s_{i,p(i)} + log sum_{j != i} exp(s_ij) ],

i.e. softmax cross entropy on the (2B, 2B) similarity matrix with the diagonal masked out and
target p(i).

Distributed (W ranks, B images each, equal B on every rank): the negatives are the views of
every rank. `gather_views` collects both views of all ranks with `all_gather_with_grad`, in rank
order, so the columns are exactly those of the single process that sees the concatenated batch
(W*B images, 2WB rows); this rank keeps only its own 2B rows. Its loss L_r is the mean over those
rows, so

  * value: mean_r L_r equals the single-process loss (each rank holds 2B of the 2WB rows);
  * gradient: the single-process loss is L = (1/W) sum_r L_r. The gather's backward sums over
    ranks the gradient every L_s sends to this rank's views, so backward of L_r on rank r yields
    sum_s dL_s/dz_r = W * dL/dz_r, and each rank's parameter gradient is that pushed through its
    own encoder. DDP averages parameter gradients over the W ranks, which divides by W again:
    (1/W) sum_r sum_s dL_s/dz_r dz_r/dtheta = dL/dtheta, the single-process gradient. So the
    per-rank loss is L_r as is, with no scaling by W. (A gather whose backward kept only this
    rank's own gradient would drop the terms the other ranks' losses send to this rank's views,
    and no rescaling of L_r would bring them back.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ssl_cli.train.distributed import ProcessGroup, all_gather_with_grad


class GatheredViews(NamedTuple):
    """Both views of every rank's batch in rank order, and where this rank's images start.

    z1, z2: (W*B, D), rows offset..offset+B-1 being this rank's own z1, z2.
    """

    z1: torch.Tensor
    z2: torch.Tensor
    offset: int


def gather_views(z1: torch.Tensor, z2: torch.Tensor, group: ProcessGroup) -> GatheredViews:
    """(B, D), (B, D) on each rank -> both views of all ranks, with gradient (one collective).

    Without an active process group the result is this rank's own views at offset 0, which
    `nt_xent` treats exactly like `gathered=None`.
    """
    _check_views(z1, z2)
    if not group.active:
        return GatheredViews(z1, z2, 0)
    batch, dim = z1.shape
    everything = all_gather_with_grad(torch.cat([z1, z2]), group)  # (W*2B, D): r0 z1, r0 z2, r1 z1...
    per_rank = everything.reshape(group.world, 2, batch, dim)
    return GatheredViews(
        per_rank[:, 0].reshape(group.world * batch, dim),
        per_rank[:, 1].reshape(group.world * batch, dim),
        group.rank * batch,
    )


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float,
            gathered: GatheredViews | None = None) -> torch.Tensor:
    """Scalar NT-Xent of this rank's 2B rows against all columns.

    z1, z2: (B, D) projections of the two views, any norm (normalised here).
    gathered: `gather_views(z1, z2, group)` under torch.distributed, None for one process.
    Returns the mean over this rank's 2B rows; see the module docstring for why the mean over
    ranks and DDP's gradient averaging then reproduce the single-process loss and gradient.
    """
    logits, positives = similarity_logits(z1, z2, temperature, gathered)
    return F.cross_entropy(logits, positives)


def nt_xent_accuracy(z1: torch.Tensor, z2: torch.Tensor,
                     gathered: GatheredViews | None = None) -> torch.Tensor:
    """Scalar fraction of this rank's 2B rows whose positive is the most similar other row.

    Same inputs as `nt_xent`; no gradient. Ties count for the positive only if it comes first.
    """
    with torch.no_grad():
        logits, positives = similarity_logits(z1, z2, 1.0, gathered)
        return (logits.argmax(dim=1) == positives).float().mean()


def similarity_logits(z1: torch.Tensor, z2: torch.Tensor, temperature: float,
                      gathered: GatheredViews | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, D), (B, D) -> logits (2B, 2N) with self-similarity at -inf, positive columns (2B,).

    N = B for one process, W*B with `gathered`. Rows are this rank's [z1; z2]; columns are
    [all z1; all z2] in rank order, so row i < B is column offset + i, row B + i is column
    N + offset + i, and each row's positive is the other view of the same image.
    """
    _check_views(z1, z2)
    if temperature <= 0:
        raise ValueError(f"NT-Xent temperature must be > 0, got {temperature}; SimCLR uses 0.1 to 0.5.")
    batch = z1.shape[0]
    rows = F.normalize(torch.cat([z1, z2]), dim=1)
    if gathered is None:
        columns, total, offset = rows, batch, 0
    else:
        _check_gathered(z1, gathered)
        columns = F.normalize(torch.cat([gathered.z1, gathered.z2]), dim=1)
        total, offset = gathered.z1.shape[0], gathered.offset
    logits = rows @ columns.T / temperature
    own = torch.arange(batch, device=z1.device) + offset
    self_columns = torch.cat([own, own + total])
    positives = torch.cat([own + total, own])
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[torch.arange(2 * batch, device=z1.device), self_columns] = True
    return logits.masked_fill(is_self, float("-inf")), positives


def _check_views(z1: torch.Tensor, z2: torch.Tensor) -> None:
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"NT-Xent needs the two views' projections as (B, D) tensors of one shape, got "
            f"{tuple(z1.shape)} and {tuple(z2.shape)}; flatten the projection head's output."
        )
    if z1.shape[0] < 1:
        raise ValueError("NT-Xent needs at least one image per batch, got an empty batch.")


def _check_gathered(z1: torch.Tensor, gathered: GatheredViews) -> None:
    batch, dim = z1.shape
    total = gathered.z1.shape[0]
    if (gathered.z1.shape != gathered.z2.shape or gathered.z1.ndim != 2 or gathered.z1.shape[1] != dim
            or total % batch or not 0 <= gathered.offset <= total - batch):
        raise ValueError(
            f"gathered views {tuple(gathered.z1.shape)} / {tuple(gathered.z2.shape)} at offset "
            f"{gathered.offset} do not hold this rank's ({batch}, {dim}) views; build them with "
            "gather_views(z1, z2, group), which needs the same batch size on every rank."
        )
