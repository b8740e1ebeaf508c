"""DeepCluster's and SeLa's labelling under 2 gloo ranks: each rank embeds only its contiguous share of the
images, and every rank ends with the labels one process makes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ssl_cli.pretext.clustering.deepcluster import DeepClusterTask
from ssl_cli.pretext.clustering.sela import SeLaTask
from ssl_cli.train.distributed import ProcessGroup, all_gather_rows, row_share

WORLD, IMAGES, SIDE = 2, 45, 8  # 45 images: shares of 23 and 22 rows
CASES = {"deepcluster-torch": lambda: DeepClusterTask(SIDE, k=4, pca_dim=6, hidden_dim=16, niter=5, backend="torch"),
         "sela": lambda: SeLaTask(SIDE, k=4, heads=2, hidden_dim=16, sinkhorn_iterations=200)}
if importlib.util.find_spec("faiss") is not None:  # an optional extra
    CASES["deepcluster-faiss"] = lambda: DeepClusterTask(SIDE, k=4, pca_dim=6, hidden_dim=16, niter=5, backend="faiss")


class Images(torch.utils.data.Dataset):
    """IMAGES seeded uint8 (3, SIDE, SIDE) images in memory, noting which rows were read."""

    in_memory = True

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (IMAGES, 3, SIDE, SIDE), generator=generator, dtype=torch.uint8)
        self.read: list[int] = []

    def __len__(self) -> int:
        return IMAGES

    def __getitem__(self, index: int):
        self.read.append(int(index))
        return self.images[index], 0, index, True


class Network(nn.Module):
    """A small trunk and the task's head, the same weights in every process (seed 0)."""

    def __init__(self, task):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = task.build_head((8, SIDE, SIDE))


def labelled(case: str) -> tuple[torch.Tensor, list[int]]:
    """(the head's labels after one labelling, the image rows this process read)."""
    task = CASES[case]()
    task.images, task.size_of_dataset = Images(), IMAGES
    network = Network(task)
    task.relabel(network, 0, None)
    return network.head.labels.clone(), task.images.read


def _rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        group = ProcessGroup(rank, WORLD, rank)
        results = {case: labelled(case) for case in CASES}
        rows = all_gather_rows(torch.arange(rank * 3, dtype=torch.float32).reshape(rank, 3) + rank, group)
        torch.save({"results": results, "gathered": rows}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    # fork, not spawn: the children inherit the imported torch instead of paying ~5 s each to import it
    mp.start_processes(_rank_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, start_method="fork")
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES))
def test_each_rank_embeds_its_share_and_gets_the_single_process_labels(case, ranks):
    alone, read_alone = labelled(case)
    assert sorted(read_alone) == list(range(IMAGES))
    for rank, result in enumerate(ranks):
        labels, read = result["results"][case]
        share = row_share(IMAGES, ProcessGroup(rank, WORLD, rank))
        assert sorted(read) == list(share), rank  # its own rows, each once
        assert torch.equal(labels, alone), (rank, json.dumps((labels.tolist(), alone.tolist())))
    assert all(len(row.unique()) == 4 for row in alone.reshape(-1, IMAGES))  # every cluster used: not a trivial labelling


def test_rows_gathered_from_unequal_shares_come_in_rank_order(ranks):
    """Rank 0 gives no rows, rank 1 one row of 3: both get rank 1's row."""
    for result in ranks:
        assert torch.equal(result["gathered"], torch.tensor([[1.0, 2.0, 3.0]]))
