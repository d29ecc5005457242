"""Spatial verification of retrieval results for mining.

Tentative correspondences come from shared visual words (cheap: no descriptor matching); a
homography is fitted robustly and a pair counts as verified with at least ``min_inliers`` inliers.
Densification inside clusters is done by COLMAP's matcher with epipolar verification
(``colmap.py``). The estimator sits behind this one module so that another RANSAC can replace
OpenCV's without touching the mining code.
"""
from __future__ import annotations

import cv2
import numpy as np

from bowretrieval.errors import ConfigError


def word_correspondences(w1: np.ndarray, w2: np.ndarray, max_per_word: int = 4) -> np.ndarray:
    """(M, 2) int32 tentative correspondences: feature pairs assigned to the same visual word.

    Words occurring more than ``max_per_word`` times in either image (bursts, repeated texture)
    are skipped: they add many wrong correspondences and little evidence.
    """
    w1 = np.asarray(w1, np.int64).ravel()
    w2 = np.asarray(w2, np.int64).ravel()
    if len(w1) == 0 or len(w2) == 0:
        return np.zeros((0, 2), np.int32)
    o1, o2 = np.argsort(w1, kind="stable"), np.argsort(w2, kind="stable")
    s1, s2 = w1[o1], w2[o2]
    u1, st1, c1 = np.unique(s1, return_index=True, return_counts=True)
    u2, st2, c2 = np.unique(s2, return_index=True, return_counts=True)
    common, i1, i2 = np.intersect1d(u1, u2, assume_unique=True, return_indices=True)
    keep = (c1[i1] <= max_per_word) & (c2[i2] <= max_per_word)
    i1, i2 = i1[keep], i2[keep]
    if len(i1) == 0:
        return np.zeros((0, 2), np.int32)
    n1, n2 = c1[i1], c2[i2]
    total = n1 * n2
    # expand every word's n1 x n2 block of feature pairs without a Python loop
    word_of = np.repeat(np.arange(len(i1)), total)
    within = np.arange(total.sum()) - np.repeat(np.cumsum(total) - total, total)
    a = st1[i1][word_of] + within // n2[word_of]
    b = st2[i2][word_of] + within % n2[word_of]
    return np.stack([o1[a], o2[b]], 1).astype(np.int32)


class HomographyVerifier:
    """Spatial verification of retrieval results (Philbin et al.): a homography fitted with USAC
    (MAGSAC++) to visual-word correspondences.

    threshold: reprojection error in pixels per 1024 px of the longer image side.
    min_inliers: inliers needed to call a pair verified.
    """

    def __init__(self, threshold: float = 10.0, min_inliers: int = 20, max_per_word: int = 4,
                 max_iters: int = 2000, seed: int = 0):
        self.threshold = float(threshold)
        self.min_inliers = int(min_inliers)
        self.max_per_word = int(max_per_word)
        self.max_iters = int(max_iters)
        self.seed = int(seed)

    def inliers(self, xy1, w1, xy2, w2, side2: float = 1024.0) -> int:
        """Number of inlier correspondences of the best homography (0 when none is found)."""
        corr = word_correspondences(w1, w2, self.max_per_word)
        if len(corr) < max(8, self.min_inliers // 2):
            return 0
        cv2.setRNGSeed(self.seed)
        thr = self.threshold * float(side2) / 1024.0
        H, m = cv2.findHomography(np.asarray(xy1, np.float64)[corr[:, 0]], np.asarray(xy2, np.float64)[corr[:, 1]],
                                  cv2.USAC_MAGSAC, thr, maxIters=self.max_iters, confidence=0.999)
        if H is None or m is None:
            return 0
        # one feature may take part in several correspondences: count distinct features only
        inl = corr[m.ravel().astype(bool)]
        return int(min(len(np.unique(inl[:, 0])), len(np.unique(inl[:, 1]))))

    def inliers_many(self, f1, w1, frames, words, sizes) -> list:
        """``inliers`` of one query (frames (N, 6) or points, words) against several images."""
        xy1 = np.asarray(f1)[:, :2]
        return [self.inliers(xy1, w1, np.asarray(f)[:, :2], w, s) for f, w, s in zip(frames, words, sizes)]


class FastSpatialVerifier:
    """The package's fast spatial matching (``bowretrieval.ransac``: affine hypotheses from single
    correspondences of affine frames, local optimisation, homography upgrade, one-to-one inliers)
    on visual-word correspondences (``bowretrieval.correspondences``), batched per query.

    threshold: transfer error in pixels per 1024 px of the longer image side.
    """

    def __init__(self, threshold: float = 10.0, min_inliers: int = 20, max_per_word: int = 4, threads: int = 1):
        from bowretrieval.ransac import SpatialVerifier

        self.threshold = float(threshold)
        self.min_inliers = int(min_inliers)
        self.max_per_word = int(max_per_word)
        self._sv = SpatialVerifier(threshold=threshold, reference_side=1024, min_inliers=3, threads=threads)

    def inliers_many(self, f1, w1, frames, words, sizes) -> list:
        from bowretrieval.correspondences import WordMatcher

        wm = WordMatcher(w1, burst_limit=self.max_per_word * self.max_per_word)
        matches = [wm.match(w) for w in words]
        res = self._sv.verify_many(np.asarray(f1, np.float32), [np.asarray(f, np.float32) for f in frames],
                                   matches, [(s, s) for s in sizes])
        return [r.n_inliers for r in res]


def make_verifier(backend: str, threshold: float, min_inliers: int, max_per_word: int, seed: int = 0,
                  threads: int = 1):
    """'opencv' (HomographyVerifier) or 'bowretrieval' (FastSpatialVerifier)."""
    if backend == "opencv":
        return HomographyVerifier(threshold, min_inliers, max_per_word, seed=seed)
    if backend == "bowretrieval":
        try:
            return FastSpatialVerifier(threshold, min_inliers, max_per_word, threads)
        except ImportError as exc:
            raise ConfigError("verify.backend 'bowretrieval' needs bowretrieval.ransac, missing from this "
                              f"installation ({exc}); use verify.backend: opencv") from exc
    raise ConfigError(f"verify.backend must be 'opencv' or 'bowretrieval', got {backend!r}")
