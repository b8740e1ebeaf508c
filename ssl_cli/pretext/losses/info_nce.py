"""InfoNCE with a queue of negatives, MoCo's loss (He et al. 2020; v2: Chen et al. 2020).

The query encoder maps one view to q (B, D); the momentum (key) encoder maps the other view to
k (B, D), the positives, with no gradient; the queue holds K keys of earlier batches (K, D), the
negatives. All three are L2-normalised here, so the caller may pass raw projections. With
temperature T the logits of query i are

    l_i = [ q_i . k_i,  q_i . queue_1, ..., q_i . queue_K ] / T        (B, 1 + K)

and the loss is the cross entropy with target 0 (the positive), averaged over the B queries:

    loss = 1/B sum_i [ -l_i0 + log sum_j exp(l_ij) ].

Keys and queue are detached here, so gradient reaches the query encoder only, as in MoCo.
Under DDP each rank computes its own B queries against the shared queue; the queue is the same
on every rank because each rank enqueues the keys of all ranks (see `FeatureQueue`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor,
             temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, D), (B, D), (K, D) -> (scalar loss, scalar top-1 accuracy).

    Accuracy: the fraction of queries whose positive has the largest logit (ties go to the
    positive, as argmax returns the first maximum); it carries no gradient.
    """
    logits = info_nce_logits(query, key, queue, temperature)
    targets = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    loss = F.cross_entropy(logits, targets)
    accuracy = (logits.detach().argmax(dim=1) == 0).float().mean()
    return loss, accuracy


def info_nce_logits(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """(B, D), (B, D), (K, D) -> (B, 1 + K) logits, the positive in column 0."""
    if query.ndim != 2 or key.shape != query.shape or queue.ndim != 2 or queue.shape[1] != query.shape[1]:
        raise ValueError(
            f"InfoNCE needs query (B, D), key (B, D) and queue (K, D) with one D, got "
            f"{tuple(query.shape)}, {tuple(key.shape)} and {tuple(queue.shape)}; the queue's "
            "dimension must be the projection head's output size."
        )
    if temperature <= 0:
        raise ValueError(f"InfoNCE temperature must be > 0, got {temperature}; MoCo uses 0.07 to 0.2.")
    query = F.normalize(query, dim=1)
    key = F.normalize(key.detach(), dim=1)
    queue = F.normalize(queue.detach(), dim=1)
    positive = (query * key).sum(dim=1, keepdim=True)
    negative = query @ queue.T
    return torch.cat([positive, negative], dim=1) / temperature
