"""Sinkhorn-Knopp against entry-by-entry references, its marginals, the blocked float32 equipartition against the
float64 one, and 2 gloo ranks against one."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ssl_cli.pretext.losses.sinkhorn import equipartition, equipartition_labels, sinkhorn
from ssl_cli.train.distributed import ProcessGroup


def reference_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """SwAV's `distributed_sinkhorn` for one process, one float at a time (no max shift)."""
    batch, prototypes = scores.shape
    q = [[math.exp(scores[b, k].item() / epsilon) for b in range(batch)] for k in range(prototypes)]
    total = sum(sum(row) for row in q)
    q = [[value / total for value in row] for row in q]
    for _ in range(iterations):
        for k in range(prototypes):
            row_sum = sum(q[k])
            q[k] = [value / row_sum / prototypes for value in q[k]]
        for b in range(batch):
            column_sum = sum(q[k][b] for k in range(prototypes))
            for k in range(prototypes):
                q[k][b] = q[k][b] / column_sum / batch
    return torch.tensor([[q[k][b] * batch for k in range(prototypes)] for b in range(batch)], dtype=torch.float64)


def reference_equipartition(log_probs: torch.Tensor, lam: float, rounds: int) -> torch.Tensor:
    """SeLa's `optimize_L_sk` in exp space, one float at a time, rows then rescaled to sum to 1."""
    samples, clusters = log_probs.shape
    p = [[math.exp(lam * log_probs[n, k].item()) for k in range(clusters)] for n in range(samples)]
    row_scale, column_scale = [1.0] * samples, [1.0] * clusters
    for _ in range(rounds):
        row_scale = [1 / samples / sum(p[n][k] * column_scale[k] for k in range(clusters)) for n in range(samples)]
        column_scale = [1 / clusters / sum(p[n][k] * row_scale[n] for n in range(samples)) for k in range(clusters)]
    q = [[p[n][k] * column_scale[k] for k in range(clusters)] for n in range(samples)]
    return torch.tensor([[value / sum(row) for value in row] for row in q], dtype=torch.float64)


def cosine_scores(batch: int, prototypes: int, seed: int, dim: int = 16) -> torch.Tensor:
    """(batch, prototypes) dot products of unit features with unit prototypes, as SwAV scores them."""
    generator = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=1)
    centres = F.normalize(torch.randn(prototypes, dim, generator=generator, dtype=torch.float64), dim=1)
    return features @ centres.T


def test_sinkhorn_matches_the_reference():
    scores = cosine_scores(7, 5, seed=0)
    for epsilon, iterations in [(0.05, 3), (0.3, 1), (0.1, 10)]:
        torch.testing.assert_close(sinkhorn(scores, epsilon, iterations), reference_sinkhorn(scores, epsilon, iterations))


def test_sinkhorn_is_float32_or_float64_detached_and_shift_invariant():
    scores = cosine_scores(6, 4, seed=1).requires_grad_()
    codes = sinkhorn(scores)
    assert codes.dtype == torch.float64 and not codes.requires_grad
    assert sinkhorn(scores.detach().half()).dtype == torch.float32
    # Far beyond exp's range at epsilon 0.05, yet the same codes: the max is subtracted first.
    torch.testing.assert_close(sinkhorn(scores.detach() + 1000.0), codes)


def test_sinkhorn_marginals_become_uniform():
    batch, prototypes = 64, 8
    codes = sinkhorn(cosine_scores(batch, prototypes, seed=2), iterations=50)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(batch, dtype=torch.float64))
    prototype_totals = codes.sum(dim=0)
    assert (prototype_totals / (batch / prototypes) - 1).abs().max() < 1e-3


def test_equipartition_matches_the_reference():
    generator = torch.Generator().manual_seed(3)
    log_probs = F.log_softmax(torch.randn(12, 3, generator=generator, dtype=torch.float64), dim=1)
    ours = equipartition(log_probs, lam=3.0, tolerance=1e-12)
    torch.testing.assert_close(ours, reference_equipartition(log_probs, 3.0, rounds=300))


def test_equipartition_balances_clusters_that_argmax_would_leave_empty():
    samples, clusters = 400, 5
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(samples, clusters, generator=generator, dtype=torch.float64)
    logits[:, 0] += 8.0  # every sample prefers cluster 0
    logits[:, 4] -= 1000.0  # exp(25 * log p) underflows to 0 for the whole column
    log_probs = F.log_softmax(logits, dim=1)
    soft = equipartition(log_probs)
    assert soft.dtype == torch.float64 and torch.isfinite(soft).all()
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(samples, dtype=torch.float64))
    assert (soft.sum(dim=0) / (samples / clusters) - 1).abs().max() < 1e-3

    labels = equipartition_labels(log_probs)
    assert labels.dtype == torch.int64 and labels.shape == (samples,)
    assert torch.equal(labels, soft.argmax(dim=1))
    assert log_probs.argmax(dim=1).unique().tolist() == [0]
    assert labels.unique().tolist() == list(range(clusters))


def test_exp_space_gives_the_labels_of_log_space_where_both_converge():
    """The fast path (exp space, SeLa's own) against the log-space iteration on the same stopping rule."""
    from ssl_cli.pretext.losses import sinkhorn as module

    torch.manual_seed(0)
    log_probs = F.log_softmax(torch.randn(3000, 30) * 2, dim=1).double()
    shifted = log_probs * 25.0
    shifted -= shifted.max(dim=1, keepdim=True).values
    slow = module._equipartition_log(shifted.clone(), 1000, 1e-6)
    fast = equipartition(log_probs, 25.0, 1000, 1e-6)
    assert torch.equal(fast.argmax(dim=1), slow.argmax(dim=1))
    assert torch.allclose(fast, slow, atol=1e-10)
    assert torch.allclose(fast.sum(dim=0), torch.full((30,), 100.0, dtype=torch.float64), rtol=1e-4)


def test_a_range_beyond_exp_falls_back_to_log_space(monkeypatch):
    """A cluster every sample rates hundreds of nats below its best underflows exp: log space still balances it."""
    from ssl_cli.pretext.losses import sinkhorn as module

    calls = []
    for name in ("_equipartition_log", "_labels_log_space"):  # the reference's and the blocked solver's
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, real=real, name=name: calls.append(name) or real(*args))
    torch.manual_seed(0)
    log_probs = torch.randn(40, 4, dtype=torch.float64)
    log_probs[:, 3] -= 40.0  # x lam 25 = -1000: exp underflows to 0
    labels = equipartition_labels(log_probs, 25.0)
    reference = equipartition(log_probs, 25.0).argmax(dim=1)
    assert calls == ["_labels_log_space", "_equipartition_log"]  # both took the log-space path
    assert torch.bincount(labels, minlength=4).min() >= 5  # cluster 3, which argmax alone never picks, is used
    assert torch.equal(labels, reference)


@pytest.mark.parametrize("scale, column_shift", [(2.0, 0.0), (6.0, 0.0), (1.0, -40.0)])
def test_blocked_float32_labels_equal_the_float64_reference(scale, column_shift, monkeypatch):
    """Blocks of 64 rows (the last one short: 600 rows), float32 storage: the labels of the whole float64 matrix.
    Scale 2 converges, 6 runs out of rounds, a column shifted by -40 (x lam = -1000) takes the log space."""
    from ssl_cli.pretext.losses import sinkhorn as module

    monkeypatch.setattr(module, "_LABEL_BLOCK_ELEMENTS", {"cpu": 64 * 12, "cuda": 64 * 12})
    torch.manual_seed(0)
    log_probs = F.log_softmax(torch.randn(600, 12) * scale, dim=1)
    log_probs[:, -1] += column_shift
    reference = equipartition(log_probs.double(), 25.0, 300, 1e-6)
    top = reference.topk(2, dim=1).values
    assert (top[:, 0] / top[:, 1]).min() > 1.001  # margins far above float32 rounding: equal labels expected
    given = log_probs.clone()
    labels = equipartition_labels(given, 25.0, 300, 1e-6)
    assert torch.equal(given, log_probs)  # not overwritten unless asked
    assert torch.equal(labels, reference.argmax(dim=1))
    assert torch.equal(equipartition_labels(given, 25.0, 300, 1e-6, overwrite=True), labels)
    assert not torch.equal(given, log_probs)  # its storage now holds the transport


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        sinkhorn(torch.zeros(5))
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        sinkhorn(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        sinkhorn(torch.zeros(2, 3), epsilon=0.0)
    with pytest.raises(ValueError, match="at least 1 iteration"):
        sinkhorn(torch.zeros(2, 3), iterations=0)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        equipartition(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="NaN"):
        equipartition(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="row of -inf"):
        equipartition(torch.tensor([[0.0, 0.0], [-math.inf, -math.inf]]))
    with pytest.raises(ValueError, match="lambda must be > 0"):
        equipartition(torch.zeros(2, 3), lam=0.0)


# --- two gloo ranks, as torchrun runs them -----------------------------------------------------

WORLD, EPSILON, ITERATIONS = 2, 0.05, 3
ROWS = [3, 5]  # unequal on purpose: B_total is summed over the ranks, not W * B
# (log-probabilities, lambda) in exp space and, with a column 40 nats down, in log space
LABELLED = [(F.log_softmax(torch.randn(40, 5, generator=torch.Generator().manual_seed(6)) * 2, dim=1), 25.0),
            (F.log_softmax(torch.randn(40, 5, generator=torch.Generator().manual_seed(7)), dim=1)
             - torch.tensor([0.0, 0.0, 0.0, 0.0, 40.0]), 25.0)]


def _rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        scores = cosine_scores(sum(ROWS), 6, seed=5)
        start = sum(ROWS[:rank])
        group = ProcessGroup(rank, WORLD, rank)
        codes = sinkhorn(scores[start:start + ROWS[rank]], EPSILON, ITERATIONS, group)
        shares = [range(13), range(13, 40)]  # unequal: N is summed over the ranks
        labels = [equipartition_labels(log_probs[shares[rank]], lam, 100, group=group) for log_probs, lam in LABELLED]
        torch.save((codes, labels), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_reproduce_the_single_process_codes(tmp_path: Path):
    # fork, not spawn: the children inherit the imported torch instead of paying ~5 s each to import it
    mp.start_processes(_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="fork")
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert [codes.shape[0] for codes, _ in per_rank] == ROWS
    whole = sinkhorn(cosine_scores(sum(ROWS), 6, seed=5), EPSILON, ITERATIONS)
    torch.testing.assert_close(torch.cat([codes for codes, _ in per_rank]), whole)
    # the equipartition over both ranks' rows gives the labels of one process holding all 40
    for case, (log_probs, lam) in enumerate(LABELLED):
        alone = equipartition_labels(log_probs, lam, 100)
        assert torch.equal(torch.cat([labels[case] for _, labels in per_rank]), alone), case
        assert torch.bincount(alone, minlength=5).min() >= 4  # balanced, the shifted column included
