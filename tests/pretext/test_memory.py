"""MoCo's queue, PIRL's memory bank and the momentum encoder update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssl_cli.pretext.memory import FeatureQueue, MemoryBank, copy_for_momentum, momentum_update


def test_queue_starts_with_seeded_unit_rows():
    first = FeatureQueue(6, 3, generator=torch.Generator().manual_seed(0))
    again = FeatureQueue(6, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first.queue, again.queue)
    torch.testing.assert_close(first.queue.norm(dim=1), torch.ones(6))
    assert first.pointer.dtype == torch.long and first.pointer.item() == 0


def test_queue_wraps_around_like_writing_keys_one_at_a_time():
    queue = FeatureQueue(7, 2, generator=torch.Generator().manual_seed(0))
    expected = queue.queue.clone()
    pointer, written = 0, 0
    for size in (3, 5, 4, 9, 1):  # none divides 7; 9 > 7 keeps only the last 7
        keys = torch.arange(written, written + size, dtype=torch.float32)[:, None].repeat(1, 2)
        written += size
        queue.enqueue(keys.requires_grad_())
        for key in keys.detach():
            expected[pointer] = key
            pointer = (pointer + 1) % 7
        assert torch.equal(queue.queue, expected)
        assert queue.pointer.item() == pointer
    assert not queue.queue.requires_grad
    assert sorted(queue.queue[:, 0].tolist()) == list(range(written - 7, written))


def test_queue_state_dict_round_trip_restores_rows_and_pointer():
    queue = FeatureQueue(5, 3)
    queue.enqueue(torch.randn(3, 3))
    restored = FeatureQueue(5, 3)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.queue, queue.queue) and restored.pointer.item() == 3
    restored.enqueue(torch.ones(4, 3))
    assert restored.pointer.item() == 2 and torch.equal(restored.queue[[3, 4, 0, 1]], torch.ones(4, 3))


def test_queue_refuses_keys_of_another_dimension():
    with pytest.raises(ValueError, match=r"\(5, 3\) keys"):
        FeatureQueue(5, 3).enqueue(torch.zeros(2, 4))


def test_bank_update_is_a_normalised_moving_average():
    bank = MemoryBank(6, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(bank.bank.norm(dim=1), torch.ones(6))
    before = bank.bank.clone()
    indices = torch.tensor([4, 1])
    features = torch.tensor([[3.0, 0.0, 4.0], [0.0, -2.0, 0.0]], requires_grad=True)
    bank.update(indices, features, momentum=0.25)
    for row, feature in zip(indices.tolist(), features.detach()):
        mixed = 0.25 * before[row] + 0.75 * feature / feature.norm()
        torch.testing.assert_close(bank.bank[row], mixed / mixed.norm())
    untouched = [0, 2, 3, 5]
    assert torch.equal(bank.bank[untouched], before[untouched]) and not bank.bank.requires_grad
    with pytest.raises(ValueError, match="momentum"):
        bank.update(indices, features, momentum=2.0)


def test_negatives_cover_every_other_row_and_never_the_own_one():
    bank = MemoryBank(5, 2)
    indices = torch.tensor([0, 2, 4])
    negatives = bank.sample_negatives(indices, 400, generator=torch.Generator().manual_seed(0))
    assert negatives.shape == (3, 400) and negatives.dtype == torch.long
    for own, drawn in zip(indices.tolist(), negatives):
        assert set(drawn.tolist()) == set(range(5)) - {own}
    counts = torch.bincount(negatives[0], minlength=5)[1:].float()
    assert (counts / 400 - 0.25).abs().max() < 0.08  # uniform over the four other rows
    with pytest.raises(ValueError, match="at least 2 rows"):
        MemoryBank(1, 2).sample_negatives(torch.tensor([0]), 3)


def test_momentum_update_averages_parameters_and_copies_buffers():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    target = copy_for_momentum(online)
    assert all(not p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in online.parameters())
    with torch.no_grad():
        for parameter in online.parameters():
            parameter.add_(1.0)
    online(torch.randn(8, 3))  # moves the BatchNorm running statistics
    old = {name: p.clone() for name, p in target.named_parameters()}
    momentum_update(online, target, momentum=0.9)
    for name, parameter in target.named_parameters():
        torch.testing.assert_close(parameter, 0.9 * old[name] + 0.1 * dict(online.named_parameters())[name])
    for name, buffer in target.named_buffers():
        assert torch.equal(buffer, dict(online.named_buffers())[name])
    assert not any(p.requires_grad for p in target.parameters())


def test_momentum_update_refuses_different_networks():
    with pytest.raises(ValueError, match="same parameters"):
        momentum_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), 0.99)
