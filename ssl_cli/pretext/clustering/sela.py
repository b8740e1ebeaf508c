"""SeLa, self-labelling (Asano, Rupprecht & Vedaldi 2020): labels that the network predicts well and
that split the data into equal parts, found by optimal transport.

The network is the trunk, the body of DeepCluster (global pool, then Linear-BN-ReLU twice) and
`heads` linear classifiers (hidden -> k). Before the first epoch and then every `every` epochs, every
training image goes through the network in eval mode (no augmentation); for each head the (N, k)
log-probabilities are turned into labels by the equipartition transport: Q = diag(a) P^lambda diag(b)
with rows summing to 1/N and columns to 1/k, solved by Sinkhorn-Knopp
(`ssl_cli.pretext.losses.sinkhorn.equipartition_labels`), each image taking its column argmax. Between
solves, the loss is the mean over heads of the cross entropy of each head against its own labels.
The paper re-solves about 80 times over 400 ImageNet epochs (every 5 epochs); a short run on a small
set re-solves every epoch by default.

Memory: the log-probabilities are held as one (n, k) float32 matrix per head (n: the images this rank
embeds), which the solver turns into the transport in place and iterates over in row blocks; nothing else
grows with n beyond (n,) vectors. The solve runs on the network's device (on the CPU when the GPU has no
room for a head's matrix). Under torchrun each rank embeds only its share of the images, the solve sums
its column sums over the ranks, and the labels of every share are gathered, so every rank holds the same
(heads, N) labels.

The labels ((heads, N) int64), the epoch they were made for and the time the solve took are buffers of
the head (see `clustering.base`), so resume keeps them; `label_seconds` and `label_change` (the
fraction of images of head 0 whose label changed at the last solve) join the metrics file.

Options (`--task-option KEY=VALUE`): k [100], heads [1; the paper's best AlexNet used 10], lam
(lambda) [25], every [1 epoch], hidden_dim [max(512, trunk channels)], sinkhorn_iterations [1000],
sobel [false], min_scale [1.0], shift [side / 14].
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from ssl_cli.pretext.clustering.base import ClusteringTask, add_label_buffers, mlp_body
from ssl_cli.pretext.contrastive.base import check_number
from ssl_cli.pretext.heads import global_pool
from ssl_cli.pretext.losses.sinkhorn import equipartition_labels
from ssl_cli.train.distributed import ProcessGroup, all_gather_rows, current_group


class SeLaTask(ClusteringTask):
    name = "sela"
    k_noun = "equal parts"

    def __init__(self, image_size: int, k: int = 100, heads: int = 1, lam: float = 25.0, every: int = 1,
                 hidden_dim: int | None = None, sinkhorn_iterations: int = 1000, sobel: bool = False,
                 min_scale: float = 1.0, shift: float | None = None):
        super().__init__(image_size, sobel, min_scale, shift)
        check_number(self.name, "k", k, 2, 10_000_000, integer=True)
        check_number(self.name, "heads", heads, 1, 100, integer=True)
        check_number(self.name, "lam", lam, 1e-3, 1e4)
        check_number(self.name, "every", every, 1, 100_000, integer=True)
        check_number(self.name, "sinkhorn_iterations", sinkhorn_iterations, 1, 1_000_000, integer=True)
        if hidden_dim is not None:
            check_number(self.name, "hidden_dim", hidden_dim, 1, 65536, integer=True)
        self.k, self.heads, self.lam, self.every = k, heads, float(lam), every
        self.hidden_dim, self.sinkhorn_iterations = hidden_dim, sinkhorn_iterations

    def options(self) -> dict[str, Any]:
        return {"k": self.k, "heads": self.heads, "lam": self.lam, "every": self.every, "hidden_dim": self.hidden_dim,
                "sinkhorn_iterations": self.sinkhorn_iterations}

    def build_head(self, trunk_shape: tuple[int, int, int]) -> nn.Module:
        head = nn.Module()
        head.body, hidden = mlp_body(trunk_shape[0], self.hidden_dim)
        head.classifiers = nn.ModuleList(nn.Linear(hidden, self.k) for _ in range(self.heads))
        add_label_buffers(head, (self.heads, max(1, self.size_of_dataset)))
        head.register_buffer("label_change", torch.tensor(math.nan, dtype=torch.float64))
        return head

    def forward(self, trunk: Callable[[torch.Tensor], torch.Tensor], head: nn.Module,
                inputs: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (heads, B, k) logits."""
        features = head.body(global_pool(trunk(inputs)))
        return torch.stack([classifier(features) for classifier in head.classifiers])

    def objective(self, head, output, target, context):
        labels = head.labels[:, context.indices]  # (heads, B)
        logits = output.float()
        loss = torch.stack([nn.functional.cross_entropy(logits[h], labels[h]) for h in range(self.heads)]).mean()
        return loss, (logits[0].argmax(1) == labels[0]).float().mean().item()

    def due(self, epoch: int) -> bool:
        return epoch % self.every == 0

    def relabel(self, network: nn.Module, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        head = network.head
        group = current_group()

        def read(trunk_map: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (heads, B, k) log-probabilities
            features = head.body(global_pool(trunk_map))
            return torch.stack([classifier(features).float().log_softmax(1) for classifier in head.classifiers])

        rows = self.shard(group)
        log_probs = torch.empty((self.heads, len(rows), self.k), dtype=torch.float32)  # this rank's rows
        filled = 0
        for block in self.embed(network, read, rows):
            log_probs[:, filled:filled + block.shape[1]] = torch.from_numpy(block)
            filled += block.shape[1]
        device = next(network.parameters()).device
        mine = torch.stack([self.solve(log_probs[h], device, group) for h in range(self.heads)])  # (heads, n)
        del log_probs
        labels = all_gather_rows(mine.T.contiguous(), group).T.to(head.labels.device)  # (heads, N)
        if int(head.labels[0, 0]) >= 0:
            head.label_change.fill_(float((labels[0] != head.labels[0]).double().mean()))
        head.labels.copy_(labels)

    def solve(self, log_probs: torch.Tensor, device: torch.device, group: ProcessGroup) -> torch.Tensor:
        """One head's (n, k) float32 log-probabilities (overwritten) -> (n,) int64 labels on the CPU, solved on
        `device` when the matrix fits there."""
        if device.type == "cuda":
            try:
                log_probs = log_probs.to(device)
            except torch.cuda.OutOfMemoryError:
                pass  # the CPU holds it already
        labels = equipartition_labels(log_probs, self.lam, self.sinkhorn_iterations, group=group, overwrite=True)
        return labels.cpu()

    def epoch_end(self, network: nn.Module, epoch: int) -> dict[str, float]:
        head = network.head
        figures = {"label_seconds": float(head.label_seconds)}
        if not math.isnan(float(head.label_change)):
            figures["label_change"] = float(head.label_change)
        return figures
