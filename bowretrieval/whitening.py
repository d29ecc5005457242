"""PCA-whitening of (possibly very high-dimensional, sparse) image vectors to short vectors.

Jegou & Chum, "Negative evidences and co-occurrences in image retrieval" (ECCV 2012), Sec. 3:
learn the mean mu and the top D' eigenpairs (lambda_i, p_i) of the covariance of training vectors,
then v' = diag(lambda^-1/2) P^T (v - mu), followed by L2 normalisation.

When the input dimension D exceeds the number of training vectors n (concatenated BoW vectors of
several vocabularies reach 10^4..10^6 dimensions), the covariance (D x D) is never formed: the
centred Gram matrix K = Xc Xc^T (n x n) has the same non-zero eigenvalues, its eigenvectors U give
the components P = Xc^T U diag(s^-1/2) (s the eigenvalues of K), and the top D' are found with
ARPACK's implicitly restarted Lanczos method (``scipy.sparse.linalg.eigsh``). The Gram matrix is
built from the sparse X without densifying it: K = X X^T - m 1^T - 1 m^T + |mu|^2, m = X mu.
Otherwise (D <= n) the covariance is decomposed directly.
"""
from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp
from scipy.linalg import eigh
from scipy.sparse.linalg import eigsh

from .errors import DataError, NotFittedError

FORMAT = "bowretrieval.pcawhitening/1"


def _check_matrix(X, what, dim=None):
    """CSR float64 or dense float64 (n, D) with finite values."""
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float64)
        vals = X.data
    else:
        X = np.asarray(X)
        if X.ndim != 2:
            raise DataError(f"{what}: expected a 2-D array (n, D), got shape {X.shape}")
        X = np.asarray(X, dtype=np.float64)
        vals = X
    if vals.size and not np.isfinite(vals).all():
        raise DataError(f"{what}: contains NaN or Inf; fix the vectors before PCA-whitening")
    if dim is not None and X.shape[1] != dim:
        raise DataError(f"{what}: dimension {X.shape[1]} does not match the {dim} the whitening was learned on; "
                        "encode with the same vocabulary bundle")
    return X


def _gram(X, block: int = 4096) -> np.ndarray:
    """X X^T as a dense float64 (n, n) matrix. Concatenated BoW rows are only sparse-ish (10..30%
    non-zeros with small vocabularies in the bundle), where a sparse-sparse product is several times
    slower than dense BLAS over column blocks; very sparse inputs keep the sparse product."""
    if not sp.issparse(X):
        return X @ X.T
    n, D = X.shape
    if X.nnz < 0.01 * n * D:
        return (X @ X.T).toarray()
    K = np.zeros((n, n))
    Xc = X.tocsc()
    for a in range(0, D, block):
        B = Xc[:, a:a + block].toarray()
        K += B @ B.T
    return K


class PCAWhitening:
    """PCA-whitening to ``n_components`` dimensions, then (optionally) L2 normalisation.

    method: 'auto' (dual Gram matrix + Lanczos when D > n, covariance otherwise), 'dual' or 'primal'.
    whiten: divide by sqrt(eigenvalue) (False: plain PCA projection). normalize: L2 after projecting.
    eps: eigenvalues below eps * largest are treated as that floor (avoids amplifying numerical noise).
    seed: start vector of the Lanczos iteration (results are deterministic for a seed).
    """

    def __init__(self, n_components: int = 128, method: str = "auto", whiten: bool = True,
                 normalize: bool = True, eps: float = 1e-9, seed: int = 0):
        self.n_components = int(n_components)
        self.method = method
        self.whiten = bool(whiten)
        self.normalize = bool(normalize)
        self.eps = float(eps)
        self.seed = int(seed)

    # -- learning -----------------------------------------------------------------------------
    def fit(self, X) -> "PCAWhitening":
        """Learn mean, components and eigenvalues (covariance with ddof=1) from X (n, D), dense or sparse."""
        X = _check_matrix(X, "training vectors")
        n, D = X.shape
        k = self.n_components
        if self.method not in ("auto", "dual", "primal"):
            raise DataError(f"PCAWhitening.method must be 'auto', 'dual' or 'primal', got {self.method!r}")
        if k < 1:
            raise DataError(f"n_components must be >= 1, got {k}")
        if n < k + 1:
            raise DataError(f"{n} training vectors cannot give {k} principal components (at most n - 1 = {n - 1} "
                            "are non-trivial); use more training images or a smaller n_components")
        if k > D:
            raise DataError(f"n_components {k} exceeds the input dimension {D}")
        t0 = time.time()
        mu = np.asarray(X.mean(axis=0)).ravel()
        method = self.method
        if method == "auto":
            method = "dual" if D > n else "primal"
        if method == "dual":
            vals, comps = self._fit_dual(X, mu, k)
        else:
            vals, comps = self._fit_primal(X, mu, k)
        # a fixed sign per component (largest-magnitude entry positive) makes dual and primal fits agree
        idx = np.argmax(np.abs(comps), axis=0)
        comps = comps * np.sign(comps[idx, np.arange(comps.shape[1])])[None, :]
        self.mean_ = mu.astype(np.float32)
        self.components_ = np.ascontiguousarray(comps.T, dtype=np.float32)  # (k, D) like scikit-learn
        self.explained_variance_ = vals.astype(np.float64)
        self.method_ = method
        self.n_training_ = int(n)
        self.fit_seconds_ = time.time() - t0
        return self

    def _fit_dual(self, X, mu, k):
        n = X.shape[0]
        K = _gram(X)
        m = X @ mu
        K -= m[:, None]
        K -= m[None, :]
        K += float(mu @ mu)
        K = 0.5 * (K + K.T)
        s, U = self._top_eigen(K, k)
        s_floor = np.maximum(s, self.eps * max(s[0], 1e-300))
        # components p_i = Xc^T u_i / sqrt(s_i): unit vectors in the input space
        XtU = np.asarray(X.T @ U) - np.outer(mu, U.sum(axis=0))
        P = XtU / np.sqrt(s_floor)[None, :]
        return s / (n - 1), P

    def _fit_primal(self, X, mu, k):
        n = X.shape[0]
        C = _gram(X.T.tocsr() if sp.issparse(X) else X.T)
        C -= n * np.outer(mu, mu)
        C /= (n - 1)
        C = 0.5 * (C + C.T)
        s, P = self._top_eigen(C, k)
        return s, P

    def _top_eigen(self, M, k):
        """Top-k eigenpairs of a symmetric PSD matrix, largest first; Lanczos when k is a small part."""
        d = M.shape[0]
        if k < d - 1 and d > 256:
            v0 = np.random.default_rng(self.seed).standard_normal(d)
            s, U = eigsh(M, k=k, which="LA", v0=v0, ncv=min(d, max(2 * k + 1, 20)), tol=1e-10)
        else:
            s, U = eigh(M, subset_by_index=(d - k, d - 1))
        order = np.argsort(-s)
        s, U = s[order], U[:, order]
        return np.maximum(s, 0.0), U

    # -- applying -----------------------------------------------------------------------------
    def _check_fitted(self):
        if getattr(self, "components_", None) is None:
            raise NotFittedError("PCAWhitening is not fitted: call fit(X) or load it with its vocabulary bundle")

    @property
    def dim_in(self) -> int:
        self._check_fitted()
        return int(self.components_.shape[1])

    def project(self, X) -> np.ndarray:
        """Whitened (or plain PCA) coordinates (n, D') without the final L2 normalisation."""
        self._check_fitted()
        X = _check_matrix(X, "vectors", dim=self.dim_in)
        Y = np.asarray(X @ self.components_.T.astype(np.float64)) - (self.mean_.astype(np.float64) @ self.components_.T)[None, :]
        if self.whiten:
            s = np.maximum(self.explained_variance_, self.eps * max(self.explained_variance_[0], 1e-300))
            Y /= np.sqrt(s)[None, :]
        return Y

    def transform(self, X) -> np.ndarray:
        """float32 (n, D') short vectors: project, whiten, L2 normalise (when ``normalize``)."""
        Y = self.project(X)
        if self.normalize:
            Y /= np.maximum(np.linalg.norm(Y, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(Y, dtype=np.float32)

    def fit_transform(self, X) -> np.ndarray:
        return self.fit(X).transform(X)

    # -- persistence (arrays + JSON-able params; stored inside the encoder file) ---------------
    def get_params(self) -> dict:
        return dict(n_components=self.n_components, method=self.method, whiten=self.whiten,
                    normalize=self.normalize, eps=self.eps, seed=self.seed)

    def state_dict(self) -> dict:
        self._check_fitted()
        return {"mean": self.mean_, "components": self.components_,
                "explained_variance": self.explained_variance_,
                "meta": dict(format=FORMAT, params=self.get_params(), method_=self.method_,
                             n_training=self.n_training_)}

    @classmethod
    def from_state(cls, state: dict, source="<state>") -> "PCAWhitening":
        meta = state["meta"]
        if meta.get("format") != FORMAT:
            raise DataError(f"{source}: whitening format {meta.get('format')!r} is not {FORMAT!r}; re-learn it")
        self = cls(**meta["params"])
        self.mean_ = np.asarray(state["mean"], np.float32)
        self.components_ = np.ascontiguousarray(state["components"], dtype=np.float32)
        self.explained_variance_ = np.asarray(state["explained_variance"], np.float64)
        self.method_ = meta.get("method_")
        self.n_training_ = meta.get("n_training")
        if self.components_.shape[1] != self.mean_.shape[0]:
            raise DataError(f"{source}: whitening arrays disagree in dimension; re-learn it")
        return self
