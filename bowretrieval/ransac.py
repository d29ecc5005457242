"""Spatial verification of tentative correspondences: fast spatial matching (Philbin et al., "Object
retrieval with large vocabularies and fast spatial matching", CVPR 2007) with local optimisation
(Chum et al., LO-RANSAC, 2003). The arithmetic runs in ``ext/ransac/fsm.c``.

Every correspondence of two affine frames (x, y, a11, a12, a21, a22) gives an affine hypothesis
A = F_db F_q^-1. Hypotheses (all, or the first ``max_hypotheses`` in the order of the matches, which
the matchers sort most distinctive first) are scored by
the number of correspondences with transfer error below ``threshold`` pixels; a hypothesis that
beats the best score is refined by least-squares affine fits on its inliers, and the best affine
model may finally be upgraded to a homography. Inliers are one to one (each feature used once) and
must be spread out (not repeated or collinear); otherwise the pair has zero inliers. The result is
deterministic and does not depend on the thread count.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._ext import ransac as _k
from .errors import DataError

KINDS = ("none", "affine", "homography")


@dataclass
class Verification:
    """The outcome of verifying one query-database pair."""

    n_inliers: int  # one-to-one inlier correspondences (0 when not verified)
    model: np.ndarray  # (3, 3) float64 query pixels -> database pixels; zeros when no model
    kind: str  # 'none', 'affine' or 'homography'
    inliers: np.ndarray  # (K, 2) int64 (query feature, database feature) indices of the inliers
    n_matches: int  # tentative correspondences that were verified
    n_hypotheses: int = 0  # hypotheses scored

    def map_points(self, xy) -> np.ndarray:
        """Map query-image points (N, 2) into the database image with the model."""
        return apply_model(self.model, xy)

    def map_points_back(self, xy) -> np.ndarray:
        """Map database-image points (N, 2) into the query image (inverse model); NaN where undefined."""
        if self.kind == "none":
            return np.full((len(np.asarray(xy)), 2), np.nan)
        return apply_model(np.linalg.inv(self.model), xy)


def apply_model(H, xy) -> np.ndarray:
    """Apply a 3x3 projective / affine map to points (N, 2); NaN for points it sends to infinity."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    p = xy @ np.asarray(H, np.float64)[:, :2].T + np.asarray(H, np.float64)[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = p[:, :2] / p[:, 2:3]
    out[~(p[:, 2] > 1e-12)] = np.nan
    return out


def _frames(f, what) -> np.ndarray:
    f = np.asarray(f)
    if f.ndim != 2 or f.shape[1] != 6:
        raise DataError(f"{what}: frames must be (N, 6) x, y, a11, a12, a21, a22; got shape {f.shape}")
    return np.ascontiguousarray(f, dtype=np.float32)


def _matches(m, nq, nd, what) -> np.ndarray:
    m = np.asarray(m)
    if m.size == 0:
        return np.zeros((0, 2), np.int64)
    if m.ndim != 2 or m.shape[1] != 2:
        raise DataError(f"{what}: matches must be (M, 2) (query feature, database feature); got shape {m.shape}")
    if not np.issubdtype(m.dtype, np.integer):
        raise DataError(f"{what}: matches must be integer feature indices, got {m.dtype}")
    m = m.astype(np.int64)
    if m[:, 0].min() < 0 or m[:, 0].max() >= nq or m[:, 1].min() < 0 or m[:, 1].max() >= nd:
        raise DataError(f"{what}: match indices out of range (query has {nq} features, database image {nd}); "
                        "were the matches computed on other features?")
    return m


class SpatialVerifier:
    """Fast spatial matching with local optimisation.

    threshold: inlier transfer error in pixels for an image whose longest side is ``reference_side``;
    with ``reference_side`` > 0 and a known database image size it scales with the image
    (``reference_side`` = 0: ``threshold`` is absolute). max_hypotheses: hypotheses scored per pair,
    the first matches in their order (0: one per correspondence). lo_iterations: least-squares re-fits per local optimisation.
    homography: try to upgrade the best affine model to a homography. max_scale / max_anisotropy:
    hypotheses changing the scale by more than this factor, or stretching one direction by more than
    this against the other, are skipped. min_inliers: fewer inliers than this count as none (>= 3).
    max_scale_change / max_angle: an inlier's own pair of frames must also agree with the model's
    local scale within this factor and its local rotation within this many degrees (0: no check);
    this removes most chance inliers between unrelated images.
    threads: pairs verified in parallel.
    """

    def __init__(self, threshold: float = 12.0, reference_side: int = 1024, max_hypotheses: int = 300,
                 lo_iterations: int = 4, homography: bool = True, max_scale: float = 10.0,
                 max_anisotropy: float = 10.0, min_inliers: int = 3, max_scale_change: float = 2.0,
                 max_angle: float = 30.0, threads: int = 1):
        self.threshold = float(threshold)
        self.reference_side = int(reference_side)
        self.max_hypotheses = int(max_hypotheses)
        self.lo_iterations = int(lo_iterations)
        self.homography = bool(homography)
        self.max_scale = float(max_scale)
        self.max_anisotropy = float(max_anisotropy)
        self.min_inliers = int(min_inliers)
        self.max_scale_change = float(max_scale_change)
        self.max_angle = float(max_angle)
        self.threads = int(threads)
        if not self.threshold > 0:
            raise DataError(f"spatial verification threshold must be > 0 pixels, got {threshold}")
        if self.max_hypotheses < 0 or self.lo_iterations < 0:
            raise DataError("max_hypotheses and lo_iterations must be >= 0")

    def threshold_for(self, db_size=None) -> float:
        """The inlier threshold in pixels for a database image of size (width, height)."""
        if db_size is None or self.reference_side <= 0:
            return self.threshold
        side = max(float(db_size[0]), float(db_size[1]))
        return self.threshold * side / self.reference_side if side > 0 else self.threshold

    def verify(self, q_frames, d_frames, matches, db_size=None) -> Verification:
        """Verify one pair: frames of both images and (M, 2) tentative matches into them."""
        return self.verify_many(q_frames, [d_frames], [matches], None if db_size is None else [db_size])[0]

    def verify_many(self, q_frames, d_frames_list, matches_list, db_sizes=None) -> list:
        """Verify one query (or one query per pair: a list of frames) against many database images,
        in parallel. Returns one ``Verification`` per database image."""
        n = len(d_frames_list)
        if len(matches_list) != n:
            raise DataError(f"{n} database images but {len(matches_list)} match arrays")
        if db_sizes is not None and len(db_sizes) != n:
            raise DataError(f"{n} database images but {len(db_sizes)} image sizes")
        per_pair_q = isinstance(q_frames, (list, tuple))
        if per_pair_q and len(q_frames) != n:
            raise DataError(f"{len(q_frames)} query frame arrays for {n} database images")
        qf_single = None if per_pair_q else _frames(q_frames, "query")
        qf_parts, df_parts, qid_parts, did_parts, mats = [], [], [], [], []
        for i in range(n):
            qf = _frames(q_frames[i], f"query of pair {i}") if per_pair_q else qf_single
            df = _frames(d_frames_list[i], f"database image {i}")
            m = _matches(matches_list[i], len(qf), len(df), f"pair {i}")
            mats.append(m)
            qf_parts.append(qf[m[:, 0]])
            df_parts.append(df[m[:, 1]])
            qid_parts.append(m[:, 0])
            did_parts.append(m[:, 1])
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum([len(m) for m in mats], out=offsets[1:])
        if offsets[-1] >= 2**31 or any(len(x) and x.max() >= 2**31 for x in qid_parts + did_parts):
            raise DataError("more than 2^31 correspondences or features in one batch; verify in smaller batches")
        cat = lambda xs, shape, dt: np.ascontiguousarray(np.concatenate(xs), dt) if xs else np.zeros(shape, dt)  # noqa: E731
        thr = np.array([self.threshold_for(None if db_sizes is None else db_sizes[i]) for i in range(n)],
                       np.float64)
        n_inl, kinds, models, mask, n_hyp = _k.verify_batch(
            cat(qf_parts, (0, 6), np.float32), cat(df_parts, (0, 6), np.float32),
            cat(qid_parts, (0,), np.int32), cat(did_parts, (0,), np.int32), offsets, thr,
            max_hypotheses=self.max_hypotheses, lo_iterations=self.lo_iterations,
            homography=self.homography, max_scale=self.max_scale, max_anisotropy=self.max_anisotropy,
            min_inliers=max(3, self.min_inliers), max_scale_change=self.max_scale_change,
            max_angle=float(np.deg2rad(self.max_angle)), threads=self.threads)
        out = []
        for i in range(n):
            sel = mask[offsets[i]:offsets[i + 1]].astype(bool)
            out.append(Verification(int(n_inl[i]), models[i], KINDS[int(kinds[i])], mats[i][sel],
                                    len(mats[i]), int(n_hyp[i])))
        return out

    def get_params(self) -> dict:
        return dict(threshold=self.threshold, reference_side=self.reference_side,
                    max_hypotheses=self.max_hypotheses, lo_iterations=self.lo_iterations,
                    homography=self.homography, max_scale=self.max_scale,
                    max_anisotropy=self.max_anisotropy, min_inliers=self.min_inliers,
                    max_scale_change=self.max_scale_change, max_angle=self.max_angle, threads=self.threads)


def verify_pair(q_frames, d_frames, matches, db_size=None, **params) -> Verification:
    """Verify one pair with a ``SpatialVerifier(**params)``."""
    return SpatialVerifier(**params).verify(q_frames, d_frames, matches, db_size)


def verify_many(q_frames, d_frames_list, matches_list, db_sizes=None, **params) -> list:
    """Verify one query against many database images with a ``SpatialVerifier(**params)``."""
    return SpatialVerifier(**params).verify_many(q_frames, d_frames_list, matches_list, db_sizes)
