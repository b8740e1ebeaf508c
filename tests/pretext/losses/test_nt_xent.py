"""NT-Xent against a row-by-row reference, and the 2-rank gloo run against one process."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ssl_cli.pretext.losses.nt_xent import GatheredViews, gather_views, nt_xent, nt_xent_accuracy
from ssl_cli.train.distributed import ProcessGroup, all_gather_no_grad, all_gather_with_grad

TEMPERATURE = 0.3


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The paper's l(i, j) summed over both orders of every pair, one row at a time."""
    views = list(z1) + list(z2)
    unit = [v / torch.sqrt((v * v).sum()) for v in views]
    count, batch = len(unit), z1.shape[0]
    total = torch.zeros((), dtype=z1.dtype)
    for i in range(count):
        positive = (i + batch) % count
        scores = [torch.dot(unit[i], unit[j]) / temperature for j in range(count) if j != i]
        total = total - torch.dot(unit[i], unit[positive]) / temperature + torch.log(sum(torch.exp(s) for s in scores))
    return total / count


def reference_accuracy(z1: torch.Tensor, z2: torch.Tensor) -> float:
    views = torch.cat([z1, z2])
    count, batch = views.shape[0], z1.shape[0]
    hits = 0
    for i in range(count):
        best, best_similarity = None, -math.inf
        for j in range(count):
            similarity = torch.nn.functional.cosine_similarity(views[i], views[j], dim=0).item()
            if j != i and similarity > best_similarity:
                best, best_similarity = j, similarity
        hits += best == (i + batch) % count
    return hits / count


def random_views(batch: int = 5, dim: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    z1 = (torch.randn(batch, dim, generator=generator, dtype=torch.float64) * 3).requires_grad_()
    z2 = (torch.randn(batch, dim, generator=generator, dtype=torch.float64) * 3).requires_grad_()
    return z1, z2


def test_value_and_gradients_match_the_reference():
    z1, z2 = random_views()
    ours = nt_xent(z1, z2, TEMPERATURE)
    reference = reference_nt_xent(z1, z2, TEMPERATURE)
    torch.testing.assert_close(ours, reference)
    for mine, theirs in zip(torch.autograd.grad(ours, (z1, z2)), torch.autograd.grad(reference, (z1, z2))):
        torch.testing.assert_close(mine, theirs)


def test_accuracy_matches_the_reference_and_perfect_views_score_one():
    z1, z2 = random_views(batch=8, dim=3, seed=1)
    assert nt_xent_accuracy(z1, z2).item() == pytest.approx(reference_accuracy(z1, z2))
    assert nt_xent_accuracy(z1, z1 * 2).item() == 1.0


def test_inactive_group_gathers_nothing():
    z1, z2 = random_views()
    gathered = gather_views(z1, z2, ProcessGroup())
    assert gathered.z1 is z1 and gathered.offset == 0
    torch.testing.assert_close(nt_xent(z1, z2, TEMPERATURE, gathered), nt_xent(z1, z2, TEMPERATURE))
    assert all_gather_with_grad(z1, ProcessGroup()) is z1
    assert torch.equal(all_gather_no_grad(z1, ProcessGroup()), z1)


def test_rank_slices_average_to_the_whole_batch_loss():
    """Rows split as 3 ranks would hold them, columns all gathered: the mean is the full loss."""
    z1, z2 = random_views(batch=6)
    whole = nt_xent(z1, z2, TEMPERATURE)
    per_rank = [
        nt_xent(z1[r * 2:(r + 1) * 2], z2[r * 2:(r + 1) * 2], TEMPERATURE, GatheredViews(z1, z2, r * 2))
        for r in range(3)
    ]
    torch.testing.assert_close(torch.stack(per_rank).mean(), whole)


def test_bad_inputs_are_explained():
    z1, z2 = random_views()
    with pytest.raises(ValueError, match="one shape"):
        nt_xent(z1, z2[:3], TEMPERATURE)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        nt_xent(z1, z2, 0.0)
    with pytest.raises(ValueError, match="gather_views"):
        nt_xent(z1, z2, TEMPERATURE, GatheredViews(z1, z2, 3))


# --- two gloo ranks, as DDP runs them ---------------------------------------------------------

WORLD, PER_RANK, IN_DIM, OUT_DIM = 2, 3, 6, 4


def _inputs_and_encoder() -> tuple[torch.Tensor, torch.Tensor, nn.Linear]:
    """The whole batch's two views (WORLD*PER_RANK, IN_DIM) and one encoder, same on every process."""
    torch.manual_seed(0)
    x1 = torch.randn(WORLD * PER_RANK, IN_DIM, dtype=torch.float64)
    x2 = torch.randn(WORLD * PER_RANK, IN_DIM, dtype=torch.float64)
    return x1, x2, nn.Linear(IN_DIM, OUT_DIM).double()


def _rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        group = ProcessGroup(rank, WORLD, rank)
        x1, x2, encoder = _inputs_and_encoder()
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        x1, x2 = x1[mine].clone().requires_grad_(), x2[mine].clone().requires_grad_()
        model = DistributedDataParallel(encoder)
        z1, z2 = model(torch.cat([x1, x2])).chunk(2)
        gathered = gather_views(z1, z2, group)
        loss = nt_xent(z1, z2, TEMPERATURE, gathered)
        loss.backward()  # DDP averages the parameter gradients over the ranks
        torch.save(
            {
                "loss": loss.detach(),
                "accuracy": nt_xent_accuracy(z1, z2, gathered),
                "weight_grad": encoder.weight.grad,
                "bias_grad": encoder.bias.grad,
                "x1_grad": x1.grad,
                "x2_grad": x2.grad,
                "gathered_ranks": all_gather_no_grad(torch.full((2,), float(rank)), group),
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_reproduce_the_single_process_loss_and_gradients(tmp_path: Path):
    # fork, not spawn: the children inherit the imported torch instead of paying ~5 s each to import it
    mp.start_processes(_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    x1, x2, encoder = _inputs_and_encoder()
    x1.requires_grad_()
    x2.requires_grad_()
    z1, z2 = encoder(torch.cat([x1, x2])).chunk(2)
    loss = nt_xent(z1, z2, TEMPERATURE)
    weight_grad, bias_grad, x1_grad, x2_grad = torch.autograd.grad(loss, (encoder.weight, encoder.bias, x1, x2))

    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), loss.detach())
    torch.testing.assert_close(torch.stack([r["accuracy"] for r in ranks]).mean(), nt_xent_accuracy(z1, z2))
    for rank in ranks:  # DDP's averaged parameter gradient is the single-process one, on every rank
        torch.testing.assert_close(rank["weight_grad"], weight_grad)
        torch.testing.assert_close(rank["bias_grad"], bias_grad)
    # Each rank's own inputs get sum_s dL_s/dx_r = WORLD * dL/dx_r; averaged as DDP would, they match.
    torch.testing.assert_close(torch.cat([r["x1_grad"] for r in ranks]) / WORLD, x1_grad)
    torch.testing.assert_close(torch.cat([r["x2_grad"] for r in ranks]) / WORLD, x2_grad)
    assert ranks[1]["gathered_ranks"].tolist() == [0.0, 0.0, 1.0, 1.0]
