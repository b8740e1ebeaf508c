"""SCAN's clustering and self-labelling losses against row-by-row references."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_cli.pretext.losses.scan import scan_loss, self_label_loss


def softmax_row(row: torch.Tensor) -> list[torch.Tensor]:
    exps = [torch.exp(value) for value in row]
    total = sum(exps)
    return [value / total for value in exps]


def reference_scan(anchors: torch.Tensor, neighbours: torch.Tensor,
                   entropy_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, clusters = anchors.shape
    anchor_probs = [softmax_row(anchors[b]) for b in range(batch)]
    consistency = torch.zeros((), dtype=torch.float64)
    for b in range(batch):
        neighbour_probs = softmax_row(neighbours[b])
        agreement = sum(anchor_probs[b][k] * neighbour_probs[k] for k in range(clusters))
        consistency = consistency - torch.log(torch.clamp(agreement, min=1e-7)) / batch
    entropy = torch.zeros((), dtype=torch.float64)
    for k in range(clusters):
        mean = sum(anchor_probs[b][k] for b in range(batch)) / batch
        entropy = entropy - mean * torch.log(torch.clamp(mean, min=1e-8))
    return consistency - entropy_weight * entropy, consistency, entropy


def reference_self_label(weak: torch.Tensor, strong: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """Confident rows, inverse-frequency class weights n / (m count_c), weighted mean cross entropy."""
    batch = weak.shape[0]
    targets = {}
    for b in range(batch):
        probs = [p.item() for p in softmax_row(weak[b].detach())]
        if max(probs) > threshold:
            targets[b] = probs.index(max(probs))
    counts = {c: list(targets.values()).count(c) for c in set(targets.values())}
    weighted, weight_total = torch.zeros((), dtype=torch.float64), 0.0
    for b, target in targets.items():
        weight = len(targets) / (len(counts) * counts[target])
        weighted = weighted - weight * torch.log(softmax_row(strong[b])[target])
        weight_total += weight
    return weighted / weight_total, len(targets)


def random_logits(batch: int = 6, clusters: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    first = (torch.randn(batch, clusters, generator=generator, dtype=torch.float64) * 2).requires_grad_()
    second = (torch.randn(batch, clusters, generator=generator, dtype=torch.float64) * 2).requires_grad_()
    return first, second


def test_scan_loss_values_and_gradients_match_the_reference():
    anchors, neighbours = random_logits()
    ours = scan_loss(anchors, neighbours, entropy_weight=5.0)
    reference = reference_scan(anchors, neighbours, 5.0)
    for mine, theirs in zip(ours, reference):
        torch.testing.assert_close(mine, theirs)
    for mine, theirs in zip(torch.autograd.grad(ours[0], (anchors, neighbours)),
                            torch.autograd.grad(reference[0], (anchors, neighbours))):
        torch.testing.assert_close(mine, theirs)


def test_confident_agreeing_neighbours_cost_nothing_and_a_uniform_mean_has_entropy_log_k():
    clusters = 4
    one_hot_like = 40.0 * torch.eye(clusters, dtype=torch.float64).repeat(2, 1)  # each cluster twice
    total, consistency, entropy = scan_loss(one_hot_like, one_hot_like.clone())
    assert 0 <= consistency.item() < 1e-6
    assert entropy.item() == pytest.approx(math.log(clusters), abs=1e-9)
    assert total.item() == pytest.approx(consistency.item() - 5.0 * math.log(clusters), abs=1e-9)
    # Everything in one cluster: the entropy drops to 0 and the total rises.
    collapsed = torch.zeros(8, clusters, dtype=torch.float64)
    collapsed[:, 0] = 40.0
    assert scan_loss(collapsed, collapsed)[2].item() == pytest.approx(0.0, abs=1e-9)


def test_self_label_loss_matches_the_class_balanced_reference():
    weak, strong = random_logits(batch=8, clusters=4, seed=1)
    with torch.no_grad():  # rows 0-2 confidently class 1, row 5 class 3; rows 3, 4, 6, 7 uncertain
        weak[[0, 1, 2, 5]] = 0.0
        weak[[0, 1, 2], 1] = 12.0
        weak[5, 3] = 12.0
    loss, count = self_label_loss(weak, strong, threshold=0.99)
    reference, reference_count = reference_self_label(weak, strong, 0.99)
    assert count == reference_count == 4
    torch.testing.assert_close(loss, reference)
    weak_grad, strong_grad = torch.autograd.grad(loss, (weak, strong), allow_unused=True)
    assert weak_grad is None  # the weak view only provides targets
    torch.testing.assert_close(strong_grad, torch.autograd.grad(reference, strong)[0])
    assert strong_grad[[3, 4, 6, 7]].abs().max() == 0  # uncertain rows take no part


def test_no_confident_row_gives_a_zero_that_still_backpropagates():
    weak, strong = random_logits(seed=2)
    loss, count = self_label_loss(weak * 0, strong)
    assert count == 0 and loss.item() == 0.0
    loss.backward()
    assert strong.grad is not None and strong.grad.abs().max() == 0


def test_bad_inputs_are_explained():
    anchors, neighbours = random_logits()
    with pytest.raises(ValueError, match="one shape"):
        scan_loss(anchors, neighbours[:3])
    with pytest.raises(ValueError, match="one shape"):
        self_label_loss(anchors[0], neighbours[0])
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\)"):
        self_label_loss(anchors, neighbours, threshold=1.0)
