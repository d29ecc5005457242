"""Pairwise verification for mining: descriptor matching plus epipolar (fundamental-matrix) RANSAC.

Tentative correspondences are mutual nearest neighbours under Lowe's ratio test on RootSIFT; the
epipolar model is fitted with OpenCV's USAC (MAGSAC++). A pair counts as verified with at least
``min_inliers`` inliers. The backend is behind this one module so the package's own RANSAC
(``bowretrieval.ransac``) can replace OpenCV without touching the mining code.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from bowretrieval.errors import ConfigError


@dataclass
class PairGeometry:
    """Result of verifying one image pair: raw matches, inlier matches (feature indices) and F."""

    matches: np.ndarray  # (M, 2) int32 tentative correspondences
    inliers: np.ndarray  # (K, 2) int32 subset consistent with F
    F: np.ndarray | None  # (3, 3) float64 fundamental matrix x2^T F x1 = 0, or None

    @property
    def n_inliers(self) -> int:
        return int(len(self.inliers))


def match_descriptors(d1: np.ndarray, d2: np.ndarray, ratio: float = 0.8, mutual: bool = True) -> np.ndarray:
    """(M, 2) int32 index pairs: nearest neighbours passing the ratio test (and mutual when asked).

    d1, d2: float32 (N, D) descriptors (RootSIFT: Euclidean distance = Hellinger kernel).
    """
    if len(d1) < 2 or len(d2) < 2:
        return np.zeros((0, 2), np.int32)
    d1 = np.ascontiguousarray(d1, np.float32)
    d2 = np.ascontiguousarray(d2, np.float32)
    bf = cv2.BFMatcher(cv2.NORM_L2)
    knn = bf.knnMatch(d1, d2, k=2)
    fwd = np.array([(m[0].queryIdx, m[0].trainIdx) for m in knn
                    if len(m) == 2 and m[0].distance < ratio * m[1].distance], np.int32).reshape(-1, 2)
    if not mutual or len(fwd) == 0:
        return fwd
    back = bf.match(d2, d1)
    nn21 = np.full(len(d2), -1, np.int64)
    for m in back:
        nn21[m.queryIdx] = m.trainIdx
    keep = nn21[fwd[:, 1]] == fwd[:, 0]
    return fwd[keep]


class EpipolarVerifier:
    """Verify pairs with a fundamental matrix.

    threshold: inlier distance to the epipolar line in pixels (scaled by image size / 1024 when
    ``relative``). min_inliers: inliers needed to call a pair verified. ratio: Lowe ratio.
    backend: 'opencv' (USAC MAGSAC++) or 'bowretrieval' (the package's RANSAC, when installed).
    """

    def __init__(self, threshold: float = 2.0, min_inliers: int = 20, ratio: float = 0.8,
                 confidence: float = 0.9999, max_iters: int = 5000, backend: str = "opencv", seed: int = 0):
        if backend not in ("opencv", "bowretrieval"):
            raise ConfigError(f"verify.backend must be 'opencv' or 'bowretrieval', got {backend!r}")
        if backend == "bowretrieval":
            try:
                from bowretrieval import ransac  # noqa: F401
            except ImportError as exc:
                raise ConfigError("verify.backend 'bowretrieval' needs bowretrieval.ransac, which this "
                                  "installation lacks; use backend: opencv") from exc
        self.threshold = float(threshold)
        self.min_inliers = int(min_inliers)
        self.ratio = float(ratio)
        self.confidence = float(confidence)
        self.max_iters = int(max_iters)
        self.backend = backend
        self.seed = int(seed)

    def fit_fundamental(self, x1: np.ndarray, x2: np.ndarray):
        """(F, inlier mask) for point arrays (M, 2); (None, all-False) when no model is found."""
        mask = np.zeros(len(x1), bool)
        if len(x1) < 8:
            return None, mask
        cv2.setRNGSeed(self.seed)
        F, m = cv2.findFundamentalMat(x1.astype(np.float64), x2.astype(np.float64), cv2.USAC_MAGSAC,
                                      self.threshold, self.confidence, self.max_iters)
        if F is None or m is None or F.shape != (3, 3):
            return None, mask
        return F, m.ravel().astype(bool)

    def verify(self, xy1: np.ndarray, d1: np.ndarray, xy2: np.ndarray, d2: np.ndarray) -> PairGeometry:
        """Match descriptors and fit F; inliers are returned even below ``min_inliers``."""
        matches = match_descriptors(d1, d2, self.ratio)
        if len(matches) < 8:
            return PairGeometry(matches, np.zeros((0, 2), np.int32), None)
        F, mask = self.fit_fundamental(xy1[matches[:, 0]], xy2[matches[:, 1]])
        return PairGeometry(matches, matches[mask], F)

    def is_verified(self, geom: PairGeometry) -> bool:
        return geom.n_inliers >= self.min_inliers


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
