"""How well scores order things: pairwise accuracy and ROC AUC (ties count ½)."""

from __future__ import annotations

import torch


def pairwise_accuracy(better: torch.Tensor, worse: torch.Tensor) -> float:
    """Share of `(P,)` pairs scored `better > worse`, ties counting ½; NaN without pairs."""
    if better.numel() == 0:
        return float("nan")
    return float((better > worse).float().mean() + 0.5 * (better == worse).float().mean())


def roc_auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Probability that a random positive `(P,)` outscores a random negative `(N,)`; NaN if either is empty."""
    if positive.numel() == 0 or negative.numel() == 0:
        return float("nan")
    return pairwise_accuracy(*torch.cartesian_prod(positive.flatten(), negative.flatten()).unbind(1))
