"""MoCo's InfoNCE against a query-by-query reference: value, gradients, accuracy, detached keys."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_cli.pretext.losses.info_nce import info_nce

TEMPERATURE = 0.2


def unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / math.sqrt(sum(value * value for value in vector.tolist()))


def reference_info_nce(query, key, queue, temperature) -> tuple[torch.Tensor, float]:
    """-log exp(q.k/T) / (exp(q.k/T) + sum_j exp(q.queue_j/T)), averaged over queries."""
    total, hits = torch.zeros((), dtype=query.dtype), 0
    negatives = [unit(row.detach()) for row in queue]
    for q_raw, k_raw in zip(query, key):
        q = q_raw / torch.sqrt((q_raw * q_raw).sum())
        positive = torch.dot(q, unit(k_raw.detach())) / temperature
        negative = [torch.dot(q, n) / temperature for n in negatives]
        total = total - torch.log(torch.exp(positive) / (torch.exp(positive) + sum(torch.exp(s) for s in negative)))
        hits += all(positive.item() >= s.item() for s in negative)
    return total / query.shape[0], hits / query.shape[0]


def random_inputs(batch=4, queue_size=9, dim=5, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def leaf(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * 2).requires_grad_()

    return leaf(batch, dim), leaf(batch, dim), leaf(queue_size, dim)


def test_value_gradient_and_accuracy_match_the_reference():
    query, key, queue = random_inputs()
    loss, accuracy = info_nce(query, key, queue, TEMPERATURE)
    reference, reference_accuracy = reference_info_nce(query, key, queue, TEMPERATURE)
    torch.testing.assert_close(loss, reference)
    assert accuracy.item() == pytest.approx(reference_accuracy)
    torch.testing.assert_close(torch.autograd.grad(loss, query)[0], torch.autograd.grad(reference, query)[0])


def test_gradient_reaches_the_query_only():
    query, key, queue = random_inputs()
    loss, _ = info_nce(query, key, queue, TEMPERATURE)
    loss.backward()
    assert query.grad is not None and key.grad is None and queue.grad is None


def test_accuracy_counts_queries_whose_positive_ranks_first():
    query = torch.eye(3) * 5  # three orthogonal directions
    key = query.clone()
    queue = torch.tensor([[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    assert info_nce(query, key, queue, TEMPERATURE)[1].item() == 1.0
    wrong_key = torch.stack([query[1], query[1], query[2]])  # query 0's positive is orthogonal to it
    assert info_nce(query, wrong_key, queue, TEMPERATURE)[1].item() == pytest.approx(2 / 3)


def test_bad_shapes_and_temperature_are_explained():
    query, key, queue = random_inputs()
    with pytest.raises(ValueError, match="one D"):
        info_nce(query, key, queue[:, :3], TEMPERATURE)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        info_nce(query, key, queue, -1.0)
