"""PIRL's NCE loss against the paper's formula written out pair by pair, with its gradients."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_cli.pretext.losses.nce_bank import nce_bank

TEMPERATURE = 0.5


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a, b) / torch.sqrt(torch.dot(a, a) * torch.dot(b, b))


def reference_term(anchor, bank, indices, negatives, temperature, partition) -> torch.Tensor:
    """mean_i [-log h(a_i, m_i) - sum_n log(1 - h(a_i, m_n))], h = e/(e + N/|D|), e = exp(s/T)/Z."""
    noise = negatives.shape[1] / bank.shape[0]

    def h(a, m):
        e = torch.exp(cosine(a, m) / temperature) / partition
        return e / (e + noise)

    total = torch.zeros((), dtype=anchor.dtype)
    for i in range(anchor.shape[0]):
        total = total - torch.log(h(anchor[i], bank[indices[i]]))
        for n in negatives[i].tolist():
            total = total - torch.log(1 - h(anchor[i], bank[n]))
    return total / anchor.shape[0]


def random_inputs(batch=3, bank_size=10, dim=4, count=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, dim, generator=generator, dtype=torch.float64, requires_grad=True)
    transformed = torch.randn(batch, dim, generator=generator, dtype=torch.float64, requires_grad=True)
    bank = torch.nn.functional.normalize(torch.randn(bank_size, dim, generator=generator, dtype=torch.float64), dim=1)
    indices = torch.tensor([1, 4, 7])[:batch]
    negatives = torch.randint(0, bank_size, (batch, count), generator=generator)
    return image, transformed, bank, indices, negatives


@pytest.mark.parametrize(("weight", "partition"), [(0.5, 1.0), (0.3, 12.5)])
def test_value_and_gradients_match_the_paper_formula(weight, partition):
    image, transformed, bank, indices, negatives = random_inputs()
    loss = nce_bank(image, transformed, bank, indices, negatives, TEMPERATURE, weight=weight, partition=partition)
    reference = weight * reference_term(transformed, bank, indices, negatives, TEMPERATURE, partition) + (
        1 - weight) * reference_term(image, bank, indices, negatives, TEMPERATURE, partition)
    torch.testing.assert_close(loss, reference)
    for mine, theirs in zip(torch.autograd.grad(loss, (image, transformed)),
                            torch.autograd.grad(reference, (image, transformed))):
        torch.testing.assert_close(mine, theirs)


def test_the_bank_takes_no_gradient_and_the_loss_stays_finite_at_low_temperature():
    image, transformed, bank, indices, negatives = random_inputs()
    bank.requires_grad_()
    loss = nce_bank(image * 100, transformed, bank, indices, negatives, 0.01)
    loss.backward()
    assert math.isfinite(loss.item()) and bank.grad is None


def test_a_pull_towards_the_memory_row_lowers_the_loss():
    image, transformed, bank, indices, negatives = random_inputs()
    aligned = nce_bank(bank[indices], bank[indices], bank, indices, negatives, TEMPERATURE)
    assert aligned < nce_bank(image, transformed, bank, indices, negatives, TEMPERATURE)


def test_bad_inputs_are_explained():
    image, transformed, bank, indices, negatives = random_inputs()
    with pytest.raises(ValueError, match="lambda"):
        nce_bank(image, transformed, bank, indices, negatives, TEMPERATURE, weight=1.5)
    with pytest.raises(ValueError, match="one D"):
        nce_bank(image, transformed, bank[:, :2], indices, negatives, TEMPERATURE)
    with pytest.raises(ValueError, match="sample_negatives"):
        nce_bank(image, transformed, bank, indices, negatives[:, :0], TEMPERATURE)
    with pytest.raises(ValueError, match="temperature"):
        nce_bank(image, transformed, bank, indices, negatives, 0.0)


def test_both_ways_of_reading_negatives_agree():
    """nce_bank reads negatives through (B, |D|) similarities for small banks and (B, N, D) rows for large ones."""
    import ssl_cli.pretext.losses.nce_bank as module

    generator = torch.Generator().manual_seed(3)
    bank = torch.nn.functional.normalize(torch.randn(50, 8, generator=generator), dim=1)
    image, transformed = torch.randn(4, 8, generator=generator), torch.randn(4, 8, generator=generator)
    indices = torch.tensor([0, 5, 9, 30])
    negatives = torch.randint(0, 50, (4, 3), generator=generator)  # N * D = 24 < 50 rows: the (B, N, D) branch
    many = torch.randint(0, 50, (4, 10), generator=generator)  # N * D = 80 >= 50: the similarity-matrix branch
    for drawn in (negatives, many):
        got = module.nce_bank(image, transformed, bank, indices, drawn, 0.07, 0.5, 2.0)
        want = 0.5 * module.noise_contrastive(transformed, bank[indices], bank[drawn], 0.07, drawn.shape[1] / 50, 2.0) \
            + 0.5 * module.noise_contrastive(image, bank[indices], bank[drawn], 0.07, drawn.shape[1] / 50, 2.0)
        torch.testing.assert_close(got, want)
