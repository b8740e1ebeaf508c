"""Which unlabelled images a student learns from, and with which targets (Noisy Student's filter).

The teacher predicts without augmentation; its logits become probabilities (softened by a
temperature), images below a confidence threshold are dropped, and `balance` keeps at most the N
most confident images per class while repeating the images of short classes up to N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssl_cli.errors import UserError


@dataclass(frozen=True)
class Selection:
    """indices (M,) rows of the unlabelled set (repeats allowed), hard (M,) int64 labels,
    soft (M, C) float32 target distributions, confidence (M,) float32 = the top probability."""

    indices: np.ndarray
    hard: np.ndarray
    soft: np.ndarray
    confidence: np.ndarray


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N, C) logits -> (N, C) float32 softmax(logits / T); rows sum to one."""
    if temperature <= 0:
        raise UserError(f"--temperature must be > 0, got {temperature}")
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def select(probs: np.ndarray, threshold: float = 0.0, balance: int | None = None) -> Selection:
    """(N, C) teacher probabilities -> the pseudo-labelled images a student trains on.

    threshold: keep images whose top probability is >= threshold (in [0, 1]).
    balance: per class, keep the `balance` most confident images; a class with fewer is repeated
        (most confident first, cyclically) up to `balance`, as Noisy Student duplicates images.
    """
    if not 0.0 <= threshold <= 1.0:
        raise UserError(f"--threshold must be in [0, 1], got {threshold}")
    if balance is not None and balance < 1:
        raise UserError(f"--balance must be at least 1, got {balance}")
    confidence = probs.max(axis=1)
    hard = probs.argmax(axis=1).astype(np.int64)
    kept = np.flatnonzero(confidence >= threshold)
    if balance is not None:
        chosen = []
        for label in range(probs.shape[1]):
            members = kept[hard[kept] == label]
            if len(members) == 0:
                continue
            ranked = members[np.argsort(-confidence[members], kind="stable")]
            chosen.append(np.resize(ranked, balance))  # np.resize repeats cyclically when short
        kept = np.concatenate(chosen) if chosen else np.empty(0, dtype=np.int64)
    return Selection(kept.astype(np.int64), hard[kept], probs[kept].astype(np.float32),
                     confidence[kept].astype(np.float32))
