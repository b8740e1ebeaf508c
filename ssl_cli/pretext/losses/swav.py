"""SwAV's swapped prediction (Caron et al. 2020, "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments").

Each of V crops of a batch of B images is encoded, L2-normalised and scored against K
L2-normalised prototypes: scores[v] (B, K), the cosine similarities z_v . c_k. The first C crops
(the two global crops in the paper) are the assignment crops: their scores, without gradient,
go through Sinkhorn-Knopp (`sinkhorn.sinkhorn`, epsilon 0.05, 3 iterations) to give codes[i]
(B, K), rows summing to 1. Every other crop must then predict crop i's code from its own scores,
with temperature T (0.1 in the paper):

    p_v = softmax(scores[v] / T)                                         (B, K)
    l(v, i) = -1/B sum_b sum_k codes[i][b, k] log p_v[b, k]
    loss = 1/C sum_{i < C} 1/(V - 1) sum_{v != i} l(v, i)

as in the released code (the loss of `main_swav.py`). Under torchrun the codes already cover the
whole batch (Sinkhorn all-reduces its sums), each rank averages over its own B images, and DDP
averages the gradients, so no further collective is needed here. A feature queue, when used,
is prepended to a crop's scores before Sinkhorn and only the last B rows of codes kept; that is
the caller's business.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def swapped_prediction(scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor],
                       temperature: float = 0.1) -> torch.Tensor:
    """V crops' (B, K) prototype scores, C <= V assignment crops' (B, K) codes -> scalar loss.

    scores[v]: crop v's cosine similarities to the prototypes, the first C crops being the ones
    codes were computed from, in the same order. codes[i]: crop i's Sinkhorn codes, detached
    here (they are targets). Gradient reaches every crop's scores, crop i's through its
    predictions of the other assignment crops' codes.
    """
    _check_crops(scores, codes, temperature)
    log_predictions = [F.log_softmax(crop / temperature, dim=1) for crop in scores]
    loss = scores[0].new_zeros(())
    for i, code in enumerate(codes):
        code = code.detach()
        predictions = [-(code * log_predictions[v]).sum(dim=1).mean() for v in range(len(scores)) if v != i]
        loss = loss + torch.stack(predictions).mean()
    return loss / len(codes)


def _check_crops(scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor], temperature: float) -> None:
    if len(scores) < 2 or not 1 <= len(codes) <= len(scores):
        raise ValueError(
            f"SwAV needs at least 2 crops' scores and between 1 and that many crops' codes, got "
            f"{len(scores)} and {len(codes)}; the codes belong to the first crops (the global ones)."
        )
    shape = tuple(scores[0].shape)
    shapes = [tuple(tensor.shape) for tensor in (*scores, *codes)]
    if len(shape) != 2 or any(other != shape for other in shapes):
        raise ValueError(
            f"SwAV needs every crop's scores and codes as (B, K) tensors of one shape, got "
            f"{shapes}; score every crop of the batch against the same prototypes."
        )
    if temperature <= 0:
        raise ValueError(f"SwAV temperature must be > 0, got {temperature}; the paper uses 0.1.")
