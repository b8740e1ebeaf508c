"""Balanced soft assignments by Sinkhorn-Knopp: SwAV's online codes and SeLa's equipartition.

Both turn scores of N samples against K clusters into an assignment Q (N, K) whose clusters are
used equally, by finding row and column scalings u (N), v (K) of P_nk = exp(s_nk / epsilon):

    Q_nk = u_n P_nk v_k,   sum_k Q_nk = 1/N (every sample),   sum_n Q_nk = 1/K (every cluster),

i.e. the entropy-regularised optimal transport of the scores onto the uniform marginals. The
fixed point is reached by alternately normalising rows and columns (Sinkhorn-Knopp).

`sinkhorn` is SwAV's online version (Caron et al. 2020, `distributed_sinkhorn` in the released
code): a few iterations (3) on each batch of prototype scores, epsilon = 0.05, run without
gradient, the codes then serving as targets of the swapped prediction (see `swav.py`). Under
torchrun the batch is the concatenation of every rank's rows: the total sum and each prototype's
row sum are all-reduced, so every rank gets exactly its own rows of the single-process result.

`equipartition` is SeLa's self-labelling step (Asano et al. 2020): on the whole dataset's
log-probabilities, P = exp(lambda * log p) with lambda = 25, iterated to convergence, the
labels being the row-wise argmax of Q. It holds the whole (N, K) matrix in float64 and is the
reference; `equipartition_labels`, what `ssl pretext --task sela` runs, gives its labels from one
(n, K) float32 matrix of this rank's rows, iterated in row blocks, with the column sums summed
over the torchrun ranks.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ssl_cli.train.distributed import ProcessGroup, all_reduce_sum, on_backend_device

# Rows per block when `equipartition` reduces its (N, K) matrix: about 4M float64 (32 MB) per
# temporary, so the working memory beyond the matrix itself stays small whatever N is.
_BLOCK_ELEMENTS = 1 << 22
# Entries per float64 block of `equipartition_labels`: 8 MB on a CPU (it stays in cache between the
# two products a block takes part in), 256 MB on a GPU (fewer kernel launches per round).
_LABEL_BLOCK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 25}


def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3,
             group: ProcessGroup | None = None) -> torch.Tensor:
    """(B, K) prototype scores of this rank's samples -> (B, K) codes, each row summing to 1.

    With Q = exp(scores / epsilon)^T (K, B_total), B_total the batch summed over ranks:
    Q /= sum(Q); then `iterations` times: each prototype row /= its sum and /= K, each sample
    column /= its sum and /= B_total; finally Q *= B_total, so every sample's codes sum to 1 and
    (as the iterations converge) every prototype receives B_total / K of the mass.

    scores: any dtype; computed in float64 if given float64, else float32 (half precision would
    overflow exp), and returned in that dtype, detached (no gradient flows through codes).
    epsilon: the entropy regularisation; smaller gives sharper codes (SwAV: 0.05).
    iterations: Sinkhorn-Knopp rounds (SwAV: 3); at least 1, so the columns are normalised.
    group: the torchrun process group; None or an inactive group is one process. Every rank must
    call with the same K, epsilon and iterations; batch sizes may differ between ranks.

    Stability: scores / epsilon is shifted by its maximum before exp. A constant shift cancels
    in the first normalisation, but it must be the same constant on every rank, so under torchrun
    the maximum is all-reduced with MAX (one extra scalar collective) rather than taken per rank.
    """
    _check_scores(scores)
    if epsilon <= 0:
        raise ValueError(f"Sinkhorn epsilon must be > 0, got {epsilon}; SwAV uses 0.05.")
    if iterations < 1:
        raise ValueError(f"Sinkhorn needs at least 1 iteration, got {iterations}; SwAV uses 3.")
    group = group or ProcessGroup()
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        logits = scores.detach().to(dtype) / epsilon
        shift = logits.max()
        if group.active:
            dist.all_reduce(shift, op=dist.ReduceOp.MAX)
        codes = torch.exp(logits - shift).T  # (K, B)
        prototypes = codes.shape[0]
        total_batch = int(all_reduce_sum(torch.tensor(codes.shape[1], device=codes.device), group).item())

        codes /= all_reduce_sum(codes.sum(), group)
        for _ in range(iterations):
            codes /= all_reduce_sum(codes.sum(dim=1, keepdim=True), group)
            codes /= prototypes
            codes /= codes.sum(dim=0, keepdim=True)
            codes /= total_batch
        codes *= total_batch
        return codes.T


def equipartition(log_probs: torch.Tensor, lam: float = 25.0, iterations: int = 1000,
                  tolerance: float = 1e-6) -> torch.Tensor:
    """(N, K) log-probabilities of the whole dataset -> (N, K) float64 soft labels, rows summing to 1.

    SeLa's optimal transport with equal cluster sizes: P = exp(lam * log_probs), scaled
    alternately so each sample's row sums to 1/N and each cluster's column to 1/K. It stops
    when, just after a column scaling, every row sum is within `tolerance` of 1/N relatively
    (max_n |N sum_k Q_nk - 1| < tolerance), or after `iterations` rounds. The result is Q with
    each row rescaled to sum to 1, so each cluster's column sums to about N/K.

    log_probs: any float dtype, finite or -inf (a zero probability); a per-row constant cancels,
    so logits work as well as log-softmax outputs. lam: SeLa's lambda (25 in the paper); larger
    gives harder labels and slower convergence.

    Computed in float64, in exp space as SeLa's own code does (each round is two matrix-vector
    products: 20x-30x faster than log space on 20,000 x 100), after shifting every row and then
    every column so that its largest entry is exp(0) = 1: no row or column can underflow to all
    zeros. Where the shifted entries still span more than float64's exponent range (a cluster
    that every sample rates 28 / lam nats or more below its best), it falls back to the same
    iteration in log space, which is exact at any range but computes an exp per entry per round.
    Memory: one (N, K) float64 matrix (8 N K bytes: 800 MB at N K = 1e8); the log-space path adds
    blocks of ~32 MB.
    """
    _check_log_probs(log_probs, lam, iterations, tolerance)
    log_transport = log_probs.detach().to(torch.float64) * lam  # (N, K), log P
    log_transport -= log_transport.max(dim=1, keepdim=True).values  # a row constant cancels in the row scaling
    column_peak = log_transport.max(dim=0).values  # <= 0; likewise a column constant in the column scaling
    if column_peak.min() < -_EXP_RANGE:
        return _equipartition_log(log_transport, iterations, tolerance)
    log_transport -= column_peak
    return _equipartition_exp(log_transport.exp_(), iterations, tolerance)


# Shifted log entries down to -_EXP_RANGE keep exp (and the scalings built from it) well inside
# float64's range (exp(-708) is its smallest normal number).
_EXP_RANGE = 600.0


def _equipartition_exp(transport: torch.Tensor, iterations: int, tolerance: float) -> torch.Tensor:
    """(N, K) P = exp(shifted lam * log p), every row and column holding a 1 -> (N, K) rows summing to 1."""
    samples, clusters = transport.shape
    row_scale = (1.0 / samples) / transport.sum(dim=1)
    column_scale = torch.ones(clusters, dtype=transport.dtype, device=transport.device)
    for _ in range(iterations):
        column_scale = (1.0 / clusters) / (transport.T @ row_scale)
        row_sums = transport @ column_scale
        # The row sums the column scaling left, relative to 1/N: zero at the fixed point.
        error = (row_scale * row_sums * samples - 1).abs().max()
        row_scale = (1.0 / samples) / row_sums
        if error < tolerance:
            break
    # Rows rescaled to sum to 1: the row scaling drops out, leaving the column scaling.
    transport *= column_scale
    transport /= transport.sum(dim=1, keepdim=True)
    return transport


def _equipartition_log(log_transport: torch.Tensor, iterations: int, tolerance: float) -> torch.Tensor:
    """The same iteration on log P (N, K) float64, for entries beyond exp's range; the matrix becomes the result."""
    samples, clusters = log_transport.shape
    log_column_scale = torch.zeros(clusters, dtype=torch.float64, device=log_transport.device)
    log_row_scale = -math.log(samples) - _row_logsumexp(log_transport, log_column_scale)
    for _ in range(iterations):
        log_column_scale = -math.log(clusters) - _column_logsumexp(log_transport, log_row_scale)
        row_logsumexp = _row_logsumexp(log_transport, log_column_scale)
        error = (log_row_scale + row_logsumexp + math.log(samples)).exp().sub(1).abs().max()
        log_row_scale = -math.log(samples) - row_logsumexp
        if error < tolerance:
            break
    log_transport += log_column_scale
    log_transport -= _row_logsumexp(log_transport, torch.zeros_like(log_column_scale))[:, None]
    return log_transport.exp_()


def equipartition_labels(log_probs: torch.Tensor, lam: float = 25.0, iterations: int = 1000,
                         tolerance: float = 1e-6, group: ProcessGroup | None = None,
                         overwrite: bool = False) -> torch.Tensor:
    """(n, K) log-probabilities of this rank's rows -> (n,) int64 pseudo-labels: the row-wise argmax of the
    equipartition of every rank's rows together (all N rows without torchrun), in bounded memory.

    The transport, stopping rule and labels of `equipartition(...).argmax(1)`, which holds every row in
    float64 (see there for lam, iterations, tolerance and the exp/log-space choice), computed on one (n, K)
    float32 matrix: P = exp(lam log p - row max - column max) in exp space, or its log in log space, the
    entries computed in float64 and rounded once to float32. Each round is one pass over the matrix in row
    blocks converted to float64 (a block's row sums under the new column scaling, its new row scalings, then
    its share of the next column sums), with the (n,) and (K,) scaling vectors in float64. Labels may differ
    from the reference where two clusters are within float32 rounding (about 1e-7 relatively) of each other.

    group: the torchrun process group; each rank passes its own rows (the counts may differ, even be 0) and
    the same K and options; the column maxima, column sums and stopping error are all-reduced (two small
    collectives a round), so every rank stops at the same round with the same column scaling.
    overwrite: the matrix may take `log_probs`'s own storage when it is float32 and contiguous (no second
    (n, K) copy); `log_probs` then holds P afterwards.

    Memory: the (n, K) float32 matrix (4 n K bytes; a copy unless `overwrite`), two float64 blocks of at most
    _LABEL_BLOCK_ELEMENTS entries, and float64 vectors of n and K entries.
    """
    group = group or ProcessGroup()
    _check_options(log_probs, lam, iterations, tolerance)
    rows, clusters = log_probs.shape
    block = max(1, _LABEL_BLOCK_ELEMENTS["cuda" if log_probs.device.type == "cuda" else "cpu"] // clusters)
    starts = range(0, rows, block)
    in_place = overwrite and log_probs.dtype == torch.float32 and log_probs.is_contiguous()
    matrix = log_probs.detach() if in_place else torch.empty((rows, clusters), dtype=torch.float32,
                                                             device=log_probs.device)
    row_peak = torch.empty(rows, dtype=torch.float64, device=log_probs.device)
    column_peak = torch.full((clusters,), -math.inf, dtype=torch.float64, device=log_probs.device)
    problem = torch.zeros(3, dtype=torch.float64, device=log_probs.device)  # NaN, +inf, a row of -inf
    for start in starts:
        scaled = log_probs[start:start + block].detach().to(torch.float64) * lam
        problem[0] += scaled.isnan().sum()
        problem[1] += (scaled == math.inf).sum()
        row_peak[start:start + block] = scaled.max(dim=1).values
        problem[2] += (row_peak[start:start + block] == -math.inf).sum()
        column_peak = torch.maximum(column_peak, (scaled - row_peak[start:start + block, None]).max(dim=0).values)
    samples = int(_all_reduce(torch.tensor(float(rows), dtype=torch.float64), dist.ReduceOp.SUM, group).item())
    _raise_problem(_all_reduce(problem, dist.ReduceOp.SUM, group), samples)
    column_peak = _all_reduce(column_peak, dist.ReduceOp.MAX, group)
    log_space = bool(column_peak.min() < -_EXP_RANGE_FLOAT32)
    for start in starts:  # the scaled block is a copy: writing it over log_probs's own rows is safe
        shifted = log_probs[start:start + block].detach().to(torch.float64) * lam - row_peak[start:start + block, None]
        matrix[start:start + block] = shifted if log_space else (shifted - column_peak).exp_()
    del row_peak
    if log_space:
        log_column_scale = _labels_log_space(matrix, samples, iterations, tolerance, block, group)
        return torch.cat([(matrix[start:start + block].double() + log_column_scale).argmax(dim=1) for start in starts]
                         or [torch.empty(0, dtype=torch.int64, device=matrix.device)])
    column_scale = _labels_exp_space(matrix, samples, iterations, tolerance, block, group)
    return torch.cat([(matrix[start:start + block].double() * column_scale).argmax(dim=1) for start in starts]
                     or [torch.empty(0, dtype=torch.int64, device=matrix.device)])


# exp space in float32 keeps every entry of P = exp(shifted) below exp(80) = 5.5e34 (float32 ends at
# exp(88.7)); with every column's largest entry 1, a column keeps its entries down to exp(-87) of it
# (float32's smallest normal number), those below counting as 0.
_EXP_RANGE_FLOAT32 = 80.0


def _labels_exp_space(matrix: torch.Tensor, samples: int, iterations: int, tolerance: float, block: int,
                      group: ProcessGroup) -> torch.Tensor:
    """(n, K) float32 P, every column's maximum over the ranks 1 -> the (K,) float64 column scaling at the stop."""
    rows, clusters = matrix.shape
    row_scale = torch.empty(rows, dtype=torch.float64, device=matrix.device)
    column_sums = torch.zeros(clusters, dtype=torch.float64, device=matrix.device)
    for start in range(0, rows, block):
        part = matrix[start:start + block].double()
        row_scale[start:start + block] = (1.0 / samples) / part.sum(dim=1)
        column_sums += part.T @ row_scale[start:start + block]
    column_sums = _all_reduce(column_sums, dist.ReduceOp.SUM, group)
    for _ in range(iterations):
        column_scale = (1.0 / clusters) / column_sums
        column_sums = torch.zeros_like(column_sums)
        error = torch.zeros((), dtype=torch.float64, device=matrix.device)
        for start in range(0, rows, block):
            part = matrix[start:start + block].double()
            row_sums = part @ column_scale
            # the row sums the column scaling left, relative to 1/N: zero at the fixed point
            error = torch.maximum(error, (row_scale[start:start + block] * row_sums * samples - 1).abs().max())
            row_scale[start:start + block] = (1.0 / samples) / row_sums
            column_sums += part.T @ row_scale[start:start + block]  # the next round's, from the new row scaling
        column_sums = _all_reduce(column_sums, dist.ReduceOp.SUM, group)
        if _all_reduce(error, dist.ReduceOp.MAX, group) < tolerance:
            break
    return column_scale


def _labels_log_space(matrix: torch.Tensor, samples: int, iterations: int, tolerance: float, block: int,
                      group: ProcessGroup) -> torch.Tensor:
    """(n, K) float32 log P (row-shifted, -inf allowed) -> the (K,) float64 log column scaling at the stop."""
    rows, clusters = matrix.shape
    log_row_scale = torch.empty(rows, dtype=torch.float64, device=matrix.device)
    column_lse = torch.full((clusters,), -math.inf, dtype=torch.float64, device=matrix.device)
    for start in range(0, rows, block):
        part = matrix[start:start + block].double()
        log_row_scale[start:start + block] = -math.log(samples) - torch.logsumexp(part, dim=1)
        column_lse = torch.logaddexp(column_lse, torch.logsumexp(part + log_row_scale[start:start + block, None], 0))
    column_lse = _all_reduce_logsumexp(column_lse, group)
    for _ in range(iterations):
        log_column_scale = -math.log(clusters) - column_lse
        column_lse = torch.full_like(column_lse, -math.inf)
        error = torch.zeros((), dtype=torch.float64, device=matrix.device)
        for start in range(0, rows, block):
            part = matrix[start:start + block].double()
            row_lse = torch.logsumexp(part + log_column_scale, dim=1)
            error = torch.maximum(error, (log_row_scale[start:start + block] + row_lse + math.log(samples)).exp()
                                  .sub(1).abs().max())
            log_row_scale[start:start + block] = -math.log(samples) - row_lse
            column_lse = torch.logaddexp(column_lse,
                                         torch.logsumexp(part + log_row_scale[start:start + block, None], 0))
        column_lse = _all_reduce_logsumexp(column_lse, group)
        if _all_reduce(error, dist.ReduceOp.MAX, group) < tolerance:
            break
    return log_column_scale


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, group: ProcessGroup) -> torch.Tensor:
    """`tensor` reduced over the ranks with `op` (on its own device; nccl sends it from the GPU); identity alone."""
    if not group.active:
        return tensor
    wire = on_backend_device(tensor)
    dist.all_reduce(wire, op=op)
    return wire.to(tensor.device)


def _all_reduce_logsumexp(values: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """log sum over the ranks of exp(values) ((K,) float64, -inf allowed), shifted by the largest value."""
    if not group.active:
        return values
    peak = _all_reduce(values.clone(), dist.ReduceOp.MAX, group)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    return peak + _all_reduce((values - peak).exp(), dist.ReduceOp.SUM, group).log()


def _row_logsumexp(log_matrix: torch.Tensor, log_column_scale: torch.Tensor) -> torch.Tensor:
    """(N, K), (K,) -> (N,): log sum_k exp(log_matrix[n, k] + log_column_scale[k]), by row blocks."""
    block = _block_rows(log_matrix)
    return torch.cat([
        torch.logsumexp(log_matrix[start:start + block] + log_column_scale, dim=1)
        for start in range(0, log_matrix.shape[0], block)
    ])


def _column_logsumexp(log_matrix: torch.Tensor, log_row_scale: torch.Tensor) -> torch.Tensor:
    """(N, K), (N,) -> (K,): log sum_n exp(log_matrix[n, k] + log_row_scale[n]), by row blocks."""
    block = _block_rows(log_matrix)
    partial = [
        torch.logsumexp(log_matrix[start:start + block] + log_row_scale[start:start + block, None], dim=0)
        for start in range(0, log_matrix.shape[0], block)
    ]
    return torch.logsumexp(torch.stack(partial), dim=0)


def _block_rows(log_matrix: torch.Tensor) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, log_matrix.shape[1]))


def _check_scores(scores: torch.Tensor) -> None:
    if scores.ndim != 2 or scores.shape[0] < 1 or scores.shape[1] < 1:
        raise ValueError(
            f"Sinkhorn needs prototype scores as a (B, K) tensor with B, K >= 1, got "
            f"{tuple(scores.shape)}; pass the (batch, prototypes) dot products of one crop."
        )


def _check_log_probs(log_probs: torch.Tensor, lam: float, iterations: int, tolerance: float) -> None:
    _check_options(log_probs, lam, iterations, tolerance, rows_needed=1)
    _raise_problem(torch.tensor([float(torch.isnan(log_probs).any()), float((log_probs == math.inf).any()),
                                 float(torch.isinf(log_probs).all(dim=1).any())]), log_probs.shape[0])


def _raise_problem(problem: torch.Tensor, samples: int) -> None:
    """problem: counts of (NaN, +inf, rows of -inf) entries over every rank; samples: the rows of every rank."""
    if samples < 1:
        raise ValueError("Equipartition needs at least one sample on some rank; pass the dataset's log-probabilities.")
    if problem[0] > 0 or problem[1] > 0:
        raise ValueError(
            "Equipartition needs float log-probabilities without NaN or +inf; check the model's "
            "logits (a diverged head gives NaN)."
        )
    if problem[2] > 0:
        raise ValueError(
            "Equipartition needs every sample to have a finite log-probability for some cluster; "
            "a row of -inf cannot be given any label."
        )


def _check_options(log_probs: torch.Tensor, lam: float, iterations: int, tolerance: float,
                   rows_needed: int = 0) -> None:
    """The checks every rank can make alone, the same on every rank (a rank may hold 0 rows)."""
    if log_probs.ndim != 2 or log_probs.shape[0] < rows_needed or log_probs.shape[1] < 1:
        raise ValueError(
            f"Equipartition needs log-probabilities as an (N, K) tensor with N, K >= 1, got "
            f"{tuple(log_probs.shape)}; pass log_softmax of the whole dataset's cluster logits."
        )
    if not log_probs.is_floating_point():
        raise ValueError(
            "Equipartition needs float log-probabilities without NaN or +inf; check the model's "
            "logits (a diverged head gives NaN)."
        )
    if lam <= 0:
        raise ValueError(f"Equipartition lambda must be > 0, got {lam}; SeLa uses 25.")
    if iterations < 1 or tolerance <= 0:
        raise ValueError(
            f"Equipartition needs iterations >= 1 and tolerance > 0, got {iterations} and {tolerance}."
        )
