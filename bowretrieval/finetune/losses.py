"""Tuple losses. A tuple's descriptors are (1 + 1 + N, D): query, positive, N negatives, L2-normalised.

Contrastive (Radenovic et al.): 1/2 ||q - p||^2 for the matching pair, 1/2 max(0, tau - ||q - n||)^2
for each non-matching pair. Triplet: max(0, tau + ||q - p||^2 - ||q - n||^2) per negative. Both are
summed over the tuple's pairs (not averaged), as in cirtorch, so the learning rate means the same.
"""
from __future__ import annotations

import torch

LOSSES = ("contrastive", "triplet")


def contrastive_loss(desc: torch.Tensor, margin: float = 0.7, eps: float = 1e-6) -> torch.Tensor:
    q = desc[0:1]
    d = (q - desc[1:]).pow(2).sum(1).add(eps).sqrt()
    pos = 0.5 * d[0].pow(2)
    neg = 0.5 * torch.clamp(margin - d[1:], min=0).pow(2).sum()
    return pos + neg


def triplet_loss(desc: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    q = desc[0:1]
    d2 = (q - desc[1:]).pow(2).sum(1)
    return torch.clamp(margin + d2[0] - d2[1:], min=0).sum()


def tuple_loss(name: str, desc: torch.Tensor, margin: float) -> torch.Tensor:
    if name == "contrastive":
        return contrastive_loss(desc, margin)
    if name == "triplet":
        return triplet_loss(desc, margin)
    from ..errors import ConfigError

    raise ConfigError(f"unknown loss {name!r}; choose contrastive or triplet")
