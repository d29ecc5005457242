"""Exact k-nearest-word search, several times faster than a flat (BLAS) search on AVX-512 VNNI CPUs.

``ExactKnn(centroids).search(X, k)`` returns what a flat L2 search returns: the k nearest words of every
descriptor, nearest first, with exact squared distances (ties broken by the lower word index).
It avoids most of the dense product: a lower bound of every word's distance comes from int8 dot
products over the first ``screen_dims`` coordinates of the words' PCA basis (AVX-512 VNNI), and exact
distances are computed only for words whose bound does not rule them out. The bound is rigorous
(projection and quantisation errors are accounted for, with a margin for float rounding), so the
answer does not depend on the data; only the speed does. See ext/knn/knn_core.c.

On CPUs without AVX-512 VNNI ``available()`` is False and ``Vocabulary`` keeps its faiss flat search.
"""
from __future__ import annotations

import numpy as np

from ._ext import knn as _knn

MAX_K = int(_knn.MAX_K)
BLOCK = int(_knn.BLOCK)


def available() -> bool:
    """True when this CPU runs the int8 screen (AVX-512 VNNI)."""
    return bool(_knn.cpu_supported())


class ExactKnn:
    """Exact nearest-word search over fixed ``centroids`` (K, D) float32.

    screen_dims: PCA coordinates used by the int8 screen (rounded up to a multiple of 4, at most D
    rounded up), or "auto": the fewest (a multiple of 8, 32 to 64) that hold 96% of the words'
    variance (48 for a SIFT vocabulary, 64 for a Hessian-Affine one; fewer dimensions screen faster
    but rule out fewer words). threads: parallel chunks of descriptors.
    """

    AUTO_VARIANCE = 0.96

    def __init__(self, centroids, screen_dims="auto", threads: int = 1):
        C = np.ascontiguousarray(centroids, dtype=np.float32)
        if C.ndim != 2 or C.shape[0] < 1 or not np.isfinite(C).all():
            raise ValueError("centroids must be a finite (K, D) array with K >= 1")
        K, D = C.shape
        C64 = C.astype(np.float64)
        self.mean = C64.mean(0)
        # orthonormal basis of the words' principal axes, largest variance first (zero columns when P > D)
        Z = C64 - self.mean
        evals, evecs = np.linalg.eigh(Z.T @ Z)
        if screen_dims == "auto":
            ev = np.maximum(evals[::-1], 0)
            frac = np.cumsum(ev) / ev.sum() if ev.sum() > 0 else np.ones(D)
            screen_dims = next((p for p in range(32, 65, 8) if p >= D or frac[p - 1] >= self.AUTO_VARIANCE), 64)
        P = int(min(max(4, -(-int(screen_dims) // 4) * 4), -(-D // 4) * 4))
        self.centroids, self.threads, self.screen_dims = C, int(threads), P
        basis = np.zeros((D, P))
        m = min(P, D)
        basis[:, :m] = evecs[:, ::-1][:, :m]
        self.basis = basis.astype(np.float32)
        self.mean32 = self.mean.astype(np.float32)
        cp = (C64 - self.mean) @ basis                       # (K, P) projected words
        amax = float(np.abs(cp).max())
        self.c_scale = 127.0 / amax if amax > 0 else 1.0
        codes = np.clip(np.rint(cp * self.c_scale), -127, 127)
        deq = codes / self.c_scale
        self.c_err = float(np.sqrt(((cp - deq) ** 2).sum(1)).max())
        K16 = -(-K // BLOCK) * BLOCK
        cnorm = np.full(K16, 1e30, np.float32)
        cnorm[:K] = (deq ** 2).sum(1)
        padded = np.full((K16, P), 128, np.uint8)   # codes + 128 as unsigned bytes
        padded[:K] = (codes + 128).astype(np.uint8)
        # [K16/16][P/4][16][4]: one 64-byte load holds 4 coordinates of 16 words
        self.packed = np.ascontiguousarray(padded.reshape(K16 // BLOCK, BLOCK, P // 4, 4).transpose(0, 2, 1, 3)).ravel()
        self.cnorm = cnorm
        self.n_exact_ = 0

    def project(self, X) -> np.ndarray:
        return np.ascontiguousarray((X - self.mean32) @ self.basis, dtype=np.float32)

    def search(self, X, k: int = 1, simd: bool = True):
        """(squared distances (N, k) float32, word ids (N, k) int32), nearest first.

        ``X``: finite float32 (N, D) (checked by the caller, e.g. ``Vocabulary.assign``)."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"descriptors must be (N, {self.centroids.shape[1]}), got {X.shape}")
        k = int(k)
        if not 1 <= k <= min(MAX_K, len(self.centroids)):
            raise ValueError(f"k={k} must be between 1 and min(number of words, {MAX_K})")
        ids, dist, n_exact = _knn.search(X, self.project(X), self.packed, self.cnorm,
                                         float(self.c_scale), float(self.c_err), self.centroids, k,
                                         threads=max(self.threads, 1), simd=simd)
        self.n_exact_ = n_exact
        return dist, ids
