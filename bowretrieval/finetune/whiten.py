"""Post-processing of global descriptors (numpy, no torch): learned whitening (Lw), PCA-whitening (the
package's ``bowretrieval.whitening.PCAWhitening``), alpha-query-expansion. Descriptors are rows: X (N, D).

Lw (Radenovic, Tolias & Chum, TPAMI 2018, Sec. 4.1; cirtorch ``whitenlearn``): from matching pairs
(q_i, p_i), m = mean of the query vectors, Cs = mean (x_q - x_p)(x_q - x_p)^T, W = chol(Cs)^-1,
eigen-decompose W (X - m)(X - m)^T W^T = V S V^T (descending), P = V^T W, y = L2(P[:d] (x - m)).
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..errors import DataError, NotFittedError
from ..npzio import json_array, save_npz_atomic
from ..whitening import PCAWhitening


def _l2(x):
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


def _check(X, name="X"):
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0:
        raise DataError(f"{name} must be a non-empty (N, D) array of descriptors, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise DataError(f"{name} contains NaN or Inf")
    return X


class LearnedWhitening:
    """Lw from matching pairs. ``shrinkage`` a in [0, 1) regularises Cs <- (1-a) Cs + a tr(Cs)/D I, needed
    when there are fewer pairs than dimensions (0 gives the closed form exactly)."""

    def __init__(self, dim: int = 0, shrinkage: float = 0.0):
        self.dim = dim
        self.shrinkage = shrinkage

    def fit(self, X, qidxs, pidxs):
        X = _check(X)
        qidxs, pidxs = np.asarray(qidxs, dtype=np.int64), np.asarray(pidxs, dtype=np.int64)
        if qidxs.shape != pidxs.shape or qidxs.size == 0:
            raise DataError(f"Lw needs as many query as positive indices (>0), got {qidxs.size} and {pidxs.size}")
        if max(qidxs.max(), pidxs.max()) >= len(X) or min(qidxs.min(), pidxs.min()) < 0:
            raise DataError(f"Lw pair indices must lie in 0..{len(X) - 1}")
        m = X[qidxs].mean(axis=0)
        df = X[qidxs] - X[pidxs]
        cs = df.T @ df / len(df)
        if self.shrinkage:
            d = cs.shape[0]
            cs = (1.0 - self.shrinkage) * cs + self.shrinkage * np.trace(cs) / d * np.eye(d)
        try:
            L = np.linalg.cholesky(cs)
        except np.linalg.LinAlgError:
            raise DataError(f"Lw: the pair covariance is singular ({len(df)} pairs for {cs.shape[0]} dimensions); "
                            "use more training pairs or set whiten shrinkage > 0 (e.g. 0.1)") from None
        W = np.linalg.inv(L)
        Xc = (X - m) @ W.T
        evals, evecs = np.linalg.eigh(Xc.T @ Xc)
        order = np.argsort(evals)[::-1]
        self.mean_ = m
        self.projection_ = evecs[:, order].T @ W
        self.eigenvalues_ = evals[order]
        return self

    def transform(self, X):
        if not hasattr(self, "projection_"):
            raise NotFittedError("LearnedWhitening.transform called before fit")
        X = _check(X)
        d = self.dim or self.projection_.shape[0]
        return _l2((X - self.mean_) @ self.projection_[:d].T).astype(np.float32)

    def state_dict(self) -> dict:
        return {"dim": self.dim, "shrinkage": self.shrinkage, "mean_": self.mean_,
                "projection_": self.projection_, "eigenvalues_": self.eigenvalues_}


def save_whitening(path, est):
    """Write a fitted LearnedWhitening or (shared) PCAWhitening to ``path`` (.npz, no pickle)."""
    if isinstance(est, LearnedWhitening):
        st = est.state_dict()
        arrays = {k: v for k, v in st.items() if isinstance(v, np.ndarray)}
        meta = {"kind": "lw", "dim": est.dim, "shrinkage": est.shrinkage}
    else:
        st = est.state_dict()
        arrays = {k: v for k, v in st.items() if k != "meta"}
        meta = {"kind": "pcaw", "meta": st["meta"]}
    save_npz_atomic(path, meta=json_array(meta), **arrays)


def load_whitening(path):
    """Read a whitening written by ``save_whitening``."""
    path = os.fspath(path)
    try:
        z = np.load(path, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: not a whitening file written by bowr finetune eval --save-whitening ({exc})") from exc
    if meta["kind"] == "lw":
        est = LearnedWhitening(int(meta["dim"]), float(meta["shrinkage"]))
        est.mean_, est.projection_, est.eigenvalues_ = z["mean_"], z["projection_"], z["eigenvalues_"]
        return est
    return PCAWhitening.from_state({k: z[k] for k in ("mean", "components", "explained_variance")} | {"meta": meta["meta"]},
                                   path)


def rank(Q, X) -> np.ndarray:
    """Full rankings (n_db, n_queries) by descending inner product, the layout revisitop expects."""
    scores = np.asarray(X, np.float32) @ np.asarray(Q, np.float32).T
    return np.argsort(-scores, axis=0, kind="stable")


def alpha_qe(Q, X, k: int = 2, alpha: float = 3.0):
    """alpha-QE (Radenovic et al. TPAMI 2018): q' = L2(q + sum_{i<=k} (q^T x_i)^alpha x_i) over the
    top-k database vectors; k = 0 returns Q unchanged."""
    Q, X = np.asarray(Q, np.float32), np.asarray(X, np.float32)
    if k <= 0:
        return Q
    k = min(k, len(X))
    s = Q @ X.T
    top = np.argsort(-s, axis=1)[:, :k]
    w = np.clip(np.take_along_axis(s, top, axis=1), 0, None) ** alpha
    out = Q + np.einsum("qk,qkd->qd", w, X[top])
    return _l2(out).astype(np.float32)
