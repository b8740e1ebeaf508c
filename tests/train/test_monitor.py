"""The online kNN monitor's vote: weighted cosine neighbours, memory and queries kept apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_cli.errors import UserError
from ssl_cli.train.monitor import KnnMonitor, knn_top1


def test_knn_top1_on_separable_and_on_shuffled_labels():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=generator) * 5
    labels = torch.arange(3).repeat_interleave(20)
    features = centres[labels] + torch.randn(60, 16, generator=generator)
    memory, queries = slice(0, None, 2), slice(1, None, 2)
    assert knn_top1(features[memory], labels[memory], features[queries], labels[queries], k=5) == 1.0
    shuffled = labels[torch.randperm(60, generator=generator)]
    assert knn_top1(features[memory], shuffled[memory], features[queries], labels[queries], k=5) < 0.7


def test_knn_top1_weights_close_neighbours_more():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.05]])  # one very close neighbour of class 0 outweighs two far ones of class 1
    assert knn_top1(memory, labels, query, torch.tensor([0]), k=3, temperature=0.07) == 1.0
    assert knn_top1(memory, labels, query, torch.tensor([0]), k=3, temperature=100.0) == 0.0


def test_monitor_refuses_unlabelled_images(toy_dir, tmp_path):
    from ssl_cli.data.sources import open_source

    unlabelled = tmp_path / "flat"
    unlabelled.mkdir()
    for path in sorted(toy_dir.rglob("*.png"))[:8]:
        (unlabelled / f"{path.parent.name}-{path.name}").write_bytes(path.read_bytes())
    with pytest.raises(UserError, match="labelled images"):
        KnnMonitor.from_source(open_source(str(unlabelled)), 32, (0.5,) * 3, (0.5,) * 3, every=1)
    monitor = KnnMonitor.from_source(open_source(str(toy_dir)), 32, (0.5,) * 3, (0.5,) * 3, every=3)
    assert monitor.images.shape == (96, 3, 32, 32) and set(np.unique(monitor.labels.numpy())) == {0, 1, 2, 3}
    assert [monitor.due(epoch, 5) for epoch in range(1, 6)] == [False, False, True, False, True]


def test_monitor_labels_follow_the_images_it_keeps(toy_dir, monkeypatch):
    """A subset (over MAX_MONITOR_IMAGES) or unlabelled rows: each kept image keeps its own label."""
    import ssl_cli.train.monitor as module
    from ssl_cli.data.sources import open_source
    from ssl_cli.data.resized import to_uint8

    source = open_source(str(toy_dir))
    monkeypatch.setattr(module, "MAX_MONITOR_IMAGES", 10)
    monitor = KnnMonitor.from_source(source, 32, (0.5,) * 3, (0.5,) * 3, every=1, seed=3)
    assert len(monitor.images) == 10
    for image, label in zip(monitor.images, monitor.labels):
        row = next(i for i in range(len(source)) if torch.equal(to_uint8(source.load(i), 32), image))
        assert source.targets[row] == int(label)
