"""PIRL's noise-contrastive estimation against a memory bank (Misra & van der Maaten 2020).

Notation of the paper: f(v_I) is the head output for image I, g(v_It) for its transformed
version I^t (e.g. the jigsaw tiles), m_I the memory-bank row of I (a moving average of past
f(v_I)), s(a, b) the cosine similarity, T the temperature, D the dataset and D_N a set of N
negative images. NCE models the probability that a pair comes from the data rather than from
the noise distribution, uniform over the dataset (1/|D| per image) with N noise draws per
positive:

    h(a, b) = exp(s(a, b)/T) / (exp(s(a, b)/T) + N/|D|)

and the loss of one image's head output a against its memory row is

    L_NCE(m_I, a) = -log h(a, m_I) - sum_{I' in D_N} log(1 - h(a, m_I'))

PIRL combines the transformed and the untransformed image's term, lambda = 0.5 in the paper:

    L = lambda L_NCE(m_I, g(v_It)) + (1 - lambda) L_NCE(m_I, f(v_I)),

averaged over the batch, summed (not averaged) over the N negatives.

What stands in for |D|: the number of rows of the bank, which holds one row per dataset image,
so `bank.shape[0]` is the dataset size; N is `negatives.shape[1]`. Since
h = sigmoid(s/T - log(N/|D|)), the loss is computed as log-sigmoids, which stay finite for any
similarity.

Partition constant: the paper writes the model's score as exp(s/T). The released
implementation (VISSL's NCEAverage, after Wu et al. 2018) divides it by a constant Z, fixed on the
first batch as Z = |D| * mean over that batch of exp(s/T) (positives and negatives), so that
exp(s/T)/Z is a probability over the dataset on average. `partition` is that Z; the default 1
is the formula as printed. Either way h = sigmoid(s/T - log Z - log(N/|D|)).

Shapes: image and transformed features (B, D'), bank (|D|, D'), indices (B,), negatives (B, N)
bank rows sampled by the caller, never the image's own row (`MemoryBank.sample_negatives`). The
bank is read without gradient; all vectors are L2-normalised here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PIRL_WEIGHT = 0.5  # the paper's lambda: the transformed and untransformed terms weigh the same


def nce_bank(image_features: torch.Tensor, transformed_features: torch.Tensor, bank: torch.Tensor,
             indices: torch.Tensor, negatives: torch.Tensor, temperature: float,
             weight: float = PIRL_WEIGHT, partition: float = 1.0, kind: str = "nce") -> torch.Tensor:
    """Scalar PIRL loss lambda L_NCE(m_I, g(v_It)) + (1 - lambda) L_NCE(m_I, f(v_I)).

    image_features f(v_I) (B, D'), transformed_features g(v_It) (B, D'), bank (|D|, D'),
    indices (B,) the images' bank rows, negatives (B, N) bank rows of other images.
    weight: lambda in [0, 1]. partition: the normaliser Z (module docstring), > 0.
    kind: "nce" (the paper's binary noise-contrastive terms) or "infonce" (each term the softmax cross
    entropy of the positive among [positive, N negatives] at the temperature, as MoCo's loss; no Z).
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"PIRL's weight lambda must lie in [0, 1], got {weight}; the paper uses 0.5.")
    if (bank.ndim != 2 or image_features.shape != transformed_features.shape
            or image_features.ndim != 2 or image_features.shape[1] != bank.shape[1]):
        raise ValueError(
            f"PIRL needs image and transformed features (B, D) and a bank (rows, D) with one D, got "
            f"{tuple(image_features.shape)}, {tuple(transformed_features.shape)} and "
            f"{tuple(bank.shape)}; size the bank with the projection head's output dimension."
        )
    batch = image_features.shape[0]
    if indices.shape != (batch,) or negatives.ndim != 2 or negatives.shape[0] != batch or negatives.shape[1] < 1:
        raise ValueError(
            f"PIRL needs indices (B,) and negatives (B, N >= 1) for B = {batch} images, got "
            f"{tuple(indices.shape)} and {tuple(negatives.shape)}; draw them with "
            "MemoryBank.sample_negatives(indices, count)."
        )
    bank = F.normalize(bank.detach(), dim=1)
    noise_ratio = negatives.shape[1] / bank.shape[0]

    def term(anchor: torch.Tensor) -> torch.Tensor:
        anchor = F.normalize(anchor, dim=1)
        positive = (anchor * bank[indices]).sum(dim=1)
        if bank.shape[0] <= negatives.shape[1] * bank.shape[1]:
            # (B, |D|) similarities to every row, then the drawn columns: less memory than (B, N, D') rows
            negative = torch.gather(anchor @ bank.T, 1, negatives)
        else:
            negative = torch.einsum("bd,bnd->bn", anchor, bank[negatives])
        if kind == "infonce":
            logits = torch.cat([positive[:, None], negative], dim=1) / temperature
            return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
        return nce_from_similarities(positive, negative, temperature, noise_ratio, partition)

    if kind not in ("nce", "infonce"):
        raise ValueError(f"PIRL's loss is nce or infonce, got {kind!r}")
    return weight * term(transformed_features) + (1.0 - weight) * term(image_features)


def nce_from_similarities(positive: torch.Tensor, negative: torch.Tensor, temperature: float, noise_ratio: float,
                          partition: float = 1.0) -> torch.Tensor:
    """Scalar mean over B of -log h(p) - sum_n log(1 - h(n)) from cosine similarities positive (B,), negative (B, N)."""
    if temperature <= 0:
        raise ValueError(f"NCE temperature must be > 0, got {temperature}; PIRL uses 0.07.")
    if noise_ratio <= 0 or partition <= 0:
        raise ValueError(f"NCE needs noise_ratio > 0 and partition > 0, got {noise_ratio} and {partition}.")
    offset = math.log(partition) + math.log(noise_ratio)
    # log h = logsigmoid(x), log(1 - h) = logsigmoid(-x)
    per_image = -F.logsigmoid(positive / temperature - offset) - F.logsigmoid(offset - negative / temperature).sum(dim=1)
    return per_image.mean()


def noise_contrastive(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                      temperature: float, noise_ratio: float, partition: float = 1.0) -> torch.Tensor:
    """Scalar mean over B of -log h(a, p) - sum_n log(1 - h(a, n_n)), one L_NCE of the paper.

    anchor (B, D'), positive (B, D'), negatives (B, N, D'), all normalised here.
    noise_ratio: N/|D|, the noise draws per positive times the noise probability of an image.
    """
    if temperature <= 0:
        raise ValueError(f"NCE temperature must be > 0, got {temperature}; PIRL uses 0.07.")
    if noise_ratio <= 0 or partition <= 0:
        raise ValueError(f"NCE needs noise_ratio > 0 and partition > 0, got {noise_ratio} and {partition}.")
    anchor = F.normalize(anchor, dim=1)
    positive = F.normalize(positive, dim=1)
    negatives = F.normalize(negatives, dim=2)
    return nce_from_similarities((anchor * positive).sum(dim=1), torch.einsum("bd,bnd->bn", anchor, negatives),
                                 temperature, noise_ratio, partition)
