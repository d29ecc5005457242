"""SIFT descriptor variants: RootSIFT, power-law SIFT, and the storage conversion.

Feature stores keep raw SIFT as uint8 (L2-normalised, clipped at 0.2, renormalised, x512, clipped
to 255); consumers turn it into the variant their vocabulary was learned on.
"""
from __future__ import annotations

import numpy as np

from .errors import DataError

VARIANTS = ("sift", "rootsift", "power")


def _as_float(desc) -> np.ndarray:
    d = np.asarray(desc)
    if d.ndim < 1 or d.shape[-1] == 0:
        raise DataError(f"descriptors must have a non-empty last dimension, got shape {d.shape}")
    d = d.astype(np.float32, copy=True)
    if not np.all(np.isfinite(d)):
        raise DataError("descriptors contain NaN or Inf")
    return d


def rootsift(desc, eps: float = 1e-12) -> np.ndarray:
    """RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise, element-wise square root.
    Euclidean distance on RootSIFT equals the Hellinger kernel on SIFT."""
    d = np.maximum(_as_float(desc), 0)
    d /= d.sum(axis=-1, keepdims=True) + eps
    return np.sqrt(d, out=d)


def power_law(desc, beta: float, eps: float = 1e-12) -> np.ndarray:
    """Power-law SIFT: component-wise x**beta then L2 (beta 0.5 after L1 is RootSIFT up to scale)."""
    d = np.maximum(_as_float(desc), 0)
    if beta != 1.0:
        np.power(d, beta, out=d)
    d /= np.linalg.norm(d, axis=-1, keepdims=True) + eps
    return d


def transform(desc, variant: str = "rootsift", beta: float = 0.5) -> np.ndarray:
    """Apply a named variant: 'sift' (L2-normalised float), 'rootsift', or 'power' (with beta)."""
    if variant == "sift":
        return power_law(desc, 1.0)
    if variant == "rootsift":
        return rootsift(desc)
    if variant == "power":
        return power_law(desc, beta)
    raise DataError(f"unknown descriptor variant {variant!r}; use one of {VARIANTS}")


def sift_to_uint8(desc) -> np.ndarray:
    """Quantise SIFT for storage: L2, clip 0.2, L2, x512, clip 255, round (the usual uint8 SIFT)."""
    d = np.maximum(_as_float(desc), 0)
    d /= np.linalg.norm(d, axis=-1, keepdims=True) + 1e-12
    np.minimum(d, 0.2, out=d)
    d /= np.linalg.norm(d, axis=-1, keepdims=True) + 1e-12
    return np.clip(np.rint(d * 512.0), 0, 255).astype(np.uint8)
