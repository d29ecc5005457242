"""Tentative correspondences between a query and a database image, the input of spatial verification.

- From visual words (Philbin et al. 2007): every pair of a query and a database feature assigned to
  a common word, with multiple assignment on either side. A word shared by many features on both
  sides (a burst: repeated structures, foliage) makes ``n_q * n_db`` pairs that carry almost no
  geometric evidence and dominate the cost; words giving more than ``burst_limit`` pairs are left
  out. A pair reached through several words is kept once.
- From descriptors: nearest neighbours with Lowe's ratio test (optionally mutual).

Matches are (M, 2) int64 arrays of (query feature, database feature) indices, ordered with the most
distinctive first (primary assignments before secondary ones, then rare words before common ones).
"""
from __future__ import annotations

import numpy as np

from .errors import DataError


def _words2d(words, what) -> np.ndarray:
    w = np.asarray(words)
    if w.ndim == 1:
        w = w[:, None]
    if w.ndim != 2:
        raise DataError(f"{what}: word assignments must be (N,) or (N, k), got shape {w.shape}")
    if w.size and not np.issubdtype(w.dtype, np.integer):
        raise DataError(f"{what}: word ids must be integers, got {w.dtype}")
    return w.astype(np.int64, copy=False)


def _flat(w):
    n, k = w.shape
    return w.reshape(-1), np.repeat(np.arange(n, dtype=np.int64), k), np.tile(np.arange(k, dtype=np.int64), n)


class WordMatcher:
    """Tentative matches of one query (word assignments (Nq, kq)) against database images.

    burst_limit: words making more than this many pairs in one image pair are skipped (0: no limit).
    The query side is prepared once (entries sorted by word, a dense word -> run table), so each
    database image costs a few vectorised passes over its own entries.
    """

    def __init__(self, q_words, burst_limit: int = 64):
        self.burst_limit = int(burst_limit)
        qw = _words2d(q_words, "query")
        self.n_query_ = qw.shape[0]
        flat, feat, rank = _flat(qw)
        valid = flat >= 0  # negative ids: no assignment
        flat, feat, rank = flat[valid], feat[valid], rank[valid]
        order = np.argsort(flat, kind="stable")
        self._w, self._f, self._r = flat[order], feat[order], rank[order]
        n = int(self._w.max()) + 1 if self._w.size else 0
        self._start = np.zeros(n, np.int64)
        self._count = np.zeros(n, np.int64)
        if self._w.size:
            uw, st, cnt = np.unique(self._w, return_index=True, return_counts=True)
            self._start[uw], self._count[uw] = st, cnt

    def match(self, d_words) -> np.ndarray:
        """(M, 2) int64 (query feature, database feature) pairs sharing a word, one per pair."""
        dw = _words2d(d_words, "database image")
        n = len(self._count)
        if dw.shape[0] == 0 or n == 0:
            return np.zeros((0, 2), np.int64)
        dflat, dfeat, drank = _flat(dw)
        hit = (dflat >= 0) & (dflat < n)
        hit[hit] = self._count[dflat[hit]] > 0
        dflat, dfeat, drank = dflat[hit], dfeat[hit], drank[hit]
        if not len(dflat):
            return np.zeros((0, 2), np.int64)
        qcnt = self._count[dflat]
        pairs_w = qcnt * np.bincount(dflat, minlength=n)[dflat]
        if self.burst_limit > 0:
            keep = pairs_w <= self.burst_limit
            dflat, dfeat, drank, qcnt, pairs_w = dflat[keep], dfeat[keep], drank[keep], qcnt[keep], pairs_w[keep]
        total = int(qcnt.sum())
        if total == 0:
            return np.zeros((0, 2), np.int64)
        rep = np.repeat(np.arange(len(dfeat)), qcnt)
        qidx = self._start[dflat][rep] + (np.arange(total) - np.repeat(np.cumsum(qcnt) - qcnt, qcnt))
        qi, di = self._f[qidx], dfeat[rep]
        # most distinctive first: primary assignments, then rare words (hypotheses are taken in
        # this order), then by feature for determinism
        rank = self._r[qidx] + drank[rep]
        order = np.lexsort((di, qi, pairs_w[rep], rank))
        qi, di = qi[order], di[order]
        if dw.shape[1] > 1:  # database multiple assignment: a pair may be reached through several words
            # keep its first (best) occurrence
            _, first = np.unique(qi * dw.shape[0] + di, return_index=True)
            first.sort()
            qi, di = qi[first], di[first]
        return np.stack([qi, di], axis=1)


def word_matches(q_words, d_words, burst_limit: int = 64) -> np.ndarray:
    """Tentative matches of two images from their word assignments ((N,) or (N, k) multiple assignment)."""
    return WordMatcher(q_words, burst_limit).match(d_words)


def descriptor_matches(q_desc, d_desc, ratio: float = 0.8, mutual: bool = False) -> np.ndarray:
    """Nearest-neighbour matches (query -> database) passing Lowe's ratio test ``d1 < ratio * d2``
    (Euclidean), optionally also mutual nearest neighbours; ordered by distance ratio, best first."""
    q = np.asarray(q_desc, np.float32)
    d = np.asarray(d_desc, np.float32)
    if q.ndim != 2 or d.ndim != 2 or (q.size and d.size and q.shape[1] != d.shape[1]):
        raise DataError(f"descriptors must be (N, D) with equal D; got {q.shape} and {d.shape}")
    if len(q) == 0 or len(d) < 2:
        return np.zeros((0, 2), np.int64)
    d2 = (q * q).sum(1)[:, None] - 2.0 * q @ d.T + (d * d).sum(1)[None, :]
    np.maximum(d2, 0, out=d2)
    nn2 = np.argpartition(d2, 1, axis=1)[:, :2]
    v = np.take_along_axis(d2, nn2, axis=1)
    swap = v[:, 1] < v[:, 0]
    nn2[swap] = nn2[swap][:, ::-1]
    v[swap] = v[swap][:, ::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.sqrt(v[:, 0]) / np.sqrt(v[:, 1])
    ok = r < ratio
    if mutual:
        back = np.argmin(d2, axis=0)
        ok &= back[nn2[:, 0]] == np.arange(len(q))
    qi = np.nonzero(ok)[0]
    qi = qi[np.argsort(r[qi], kind="stable")]
    return np.stack([qi, nn2[qi, 0]], axis=1).astype(np.int64)
