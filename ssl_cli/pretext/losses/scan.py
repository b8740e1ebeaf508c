"""SCAN's two losses (Van Gansbeke et al. 2020, "SCAN: Learning to Classify Images without Labels").

Clustering step. A clustering head gives an anchor image and one of its mined nearest neighbours
logits over K clusters, anchor_logits and neighbour_logits (B, K); p_a = softmax(anchor_logits),
p_n = softmax(neighbour_logits). Neighbours should land in the same cluster, confidently, while
the clusters stay in use:

    consistency = -1/B sum_b log <p_a[b], p_n[b]>                  (dot product clamped at 1e-7)
    entropy     = -sum_k pbar_k log pbar_k,  pbar = 1/B sum_b p_a[b]  (log's argument clamped at 1e-8)
    total       = consistency - entropy_weight * entropy           (entropy_weight 5 in the paper)

The entropy is at most log K, reached when the batch uses every cluster equally; maximising it
keeps the head from putting every image in one cluster.

Self-labelling step. A weakly augmented view's confident predictions (max probability above
0.99) become pseudo-labels for a strongly augmented view of the same image, with the cross
entropy weighted per class by the inverse frequency of that class among the confident rows
(the released code's `apply_class_balancing`), so the already dominant clusters do not grow
further.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONSISTENCY_FLOOR = 1e-7
ENTROPY_FLOOR = 1e-8


def scan_loss(anchor_logits: torch.Tensor, neighbour_logits: torch.Tensor,
              entropy_weight: float = 5.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, K) anchor and neighbour logits -> (total, consistency, entropy), three scalars.

    The entropy is returned positive (the quantity maximised), total = consistency -
    entropy_weight * entropy. Gradient flows through both anchors and neighbours, as in SCAN.
    """
    _check_pair(anchor_logits, neighbour_logits, "anchor", "neighbour")
    anchor_probs = F.softmax(anchor_logits, dim=1)
    neighbour_probs = F.softmax(neighbour_logits, dim=1)
    agreement = (anchor_probs * neighbour_probs).sum(dim=1)
    consistency = -agreement.clamp_min(CONSISTENCY_FLOOR).log().mean()
    mean_probs = anchor_probs.mean(dim=0)
    entropy = -(mean_probs * mean_probs.clamp_min(ENTROPY_FLOOR).log()).sum()
    return consistency - entropy_weight * entropy, consistency, entropy


def self_label_loss(weak_logits: torch.Tensor, strong_logits: torch.Tensor,
                    threshold: float = 0.99) -> tuple[torch.Tensor, int]:
    """(B, K) weak-view and strong-view logits -> (scalar loss, number of confident rows).

    Rows whose weak-view max probability exceeds `threshold` are confident; their targets are
    the weak view's argmax (no gradient). The loss is F.cross_entropy of the strong view's logits
    on those rows with class weights n / (m * count_c), n confident rows, m distinct targets,
    count_c rows with target c: the weighted mean sum_b w_{y_b} l_b / sum_b w_{y_b}. (SCAN's
    weights are n / count_c; the weighted mean does not depend on the common factor 1/m, which
    only makes the weights average 1 over the classes present.) With no confident row the loss
    is a zero still attached to strong_logits' graph, so backward runs on every step.
    """
    _check_pair(weak_logits, strong_logits, "weak-view", "strong-view")
    if not 0 <= threshold < 1:
        raise ValueError(f"SCAN's confidence threshold must be in [0, 1), got {threshold}; the paper uses 0.99.")
    with torch.no_grad():
        confidence, targets = F.softmax(weak_logits.detach(), dim=1).max(dim=1)
        confident = confidence > threshold
        targets = targets[confident]
    count = int(targets.shape[0])
    if count == 0:
        return strong_logits.sum() * 0, 0
    classes, class_counts = torch.unique(targets, return_counts=True)
    weights = strong_logits.new_ones(strong_logits.shape[1])
    weights[classes] = count / (len(classes) * class_counts.to(weights.dtype))
    return F.cross_entropy(strong_logits[confident], targets, weight=weights), count


def _check_pair(first: torch.Tensor, second: torch.Tensor, first_name: str, second_name: str) -> None:
    if first.ndim != 2 or first.shape != second.shape or first.shape[0] < 1 or first.shape[1] < 2:
        raise ValueError(
            f"SCAN needs {first_name} and {second_name} logits as (B, K) tensors of one shape with "
            f"B >= 1 and K >= 2 clusters, got {tuple(first.shape)} and {tuple(second.shape)}; pass "
            "the clustering head's output for both views of the same images."
        )
