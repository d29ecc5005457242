"""PCA-SIFT: SIFT (or a power-law variant) projected onto its principal components.

Used by the multiple-vocabulary methods (mPCA-SIFT vocabularies, Jegou & Chum 2012): the projection
to 80 / 64 / 48 / 32 dimensions is learned on an independent training set and saved with its
parameters, so a vocabulary learned on projected descriptors can be used later on new images.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .descriptors import VARIANTS, transform
from .errors import ConfigError, DataError, NotFittedError
from .npzio import json_array, save_npz_atomic

COMMON_DIMS = (80, 64, 48, 32)
FORMAT = "bowretrieval.pcasift/1"


class PCASift:
    """PCA projection of SIFT descriptors.

    dim: output dimension (1..128; 80/64/48/32 are the usual ones). variant / beta: descriptor
    variant applied before the projection ('sift', 'rootsift', 'power' with beta). whiten: divide
    each component by the square root of its variance. normalize: L2-normalise the projections.
    """

    def __init__(self, dim: int = 64, variant: str = "rootsift", beta: float = 0.5, whiten: bool = False,
                 normalize: bool = True):
        if not isinstance(dim, (int, np.integer)) or not 1 <= int(dim) <= 128:
            raise ConfigError(f"pcasift.dim must be an integer in 1..128 (usually one of {COMMON_DIMS}), got {dim!r}")
        if variant not in VARIANTS:
            raise ConfigError(f"pcasift.variant must be one of {VARIANTS}, got {variant!r}")
        self.dim = int(dim)
        self.variant = variant
        self.beta = float(beta)
        self.whiten = bool(whiten)
        self.normalize = bool(normalize)

    def get_params(self) -> dict:
        return dict(dim=self.dim, variant=self.variant, beta=self.beta, whiten=self.whiten,
                    normalize=self.normalize)

    def _prepare(self, X, what) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim < 2 or X.shape[-1] != 128:
            raise DataError(f"{what}: expected SIFT descriptors (..., 128), got shape {X.shape}")
        return transform(X.reshape(-1, 128), self.variant, self.beta).astype(np.float64)

    def fit(self, X) -> "PCASift":
        """Learn mean and principal axes from training descriptors (N, 128) or (N, R, 128)."""
        Z = self._prepare(X, "PCASift.fit")
        if len(Z) <= self.dim:
            raise DataError(f"PCASift.fit: {len(Z)} training descriptors cannot give {self.dim} components; "
                            "train on more images")
        self.mean_ = Z.mean(axis=0)
        Z -= self.mean_
        cov = Z.T @ Z / (len(Z) - 1)
        evals, evecs = np.linalg.eigh(cov)
        order = np.argsort(evals)[::-1][: self.dim]
        comps = evecs[:, order].T
        # fix each axis' sign (largest entry positive) so that refits give identical projections
        signs = np.sign(comps[np.arange(self.dim), np.abs(comps).argmax(axis=1)])
        signs[signs == 0] = 1.0
        self.components_ = (comps * signs[:, None]).astype(np.float32)
        self.explained_variance_ = np.maximum(evals[order], 0.0).astype(np.float32)
        self.explained_variance_ratio_ = (self.explained_variance_ / max(float(evals.sum()), 1e-30)).astype(np.float32)
        self.mean_ = self.mean_.astype(np.float32)
        self.n_training_ = int(len(Z))
        return self

    def _check_fitted(self):
        if not hasattr(self, "components_"):
            raise NotFittedError("PCASift is not fitted; call fit(training descriptors) or PCASift.load(path)")

    def transform(self, X) -> np.ndarray:
        """Project descriptors: (N, 128) -> (N, dim), (N, R, 128) -> (N, R, dim); float32."""
        self._check_fitted()
        shape = np.shape(X)
        Z = self._prepare(X, "PCASift.transform").astype(np.float32)
        Y = (Z - self.mean_) @ self.components_.T
        if self.whiten:
            Y /= np.sqrt(self.explained_variance_ + 1e-12)
        if self.normalize:
            Y /= np.linalg.norm(Y, axis=1, keepdims=True) + 1e-12
        return np.ascontiguousarray(Y.reshape(*shape[:-1], self.dim), dtype=np.float32)

    def fit_transform(self, X) -> np.ndarray:
        return self.fit(X).transform(X)

    def save(self, path) -> str:
        """Write ``path`` (.npz) atomically: mean, axes, variances and the parameters as JSON."""
        self._check_fitted()
        path = os.fspath(path)
        if not path.endswith(".npz"):
            path += ".npz"
        meta = dict(params=self.get_params(), n_training=self.n_training_, format=FORMAT)
        return save_npz_atomic(path, mean=self.mean_, components=self.components_, variance=self.explained_variance_,
                               variance_ratio=self.explained_variance_ratio_, meta=json_array(meta))

    @classmethod
    def load(cls, path) -> "PCASift":
        path = os.fspath(path)
        if not os.path.exists(path) and os.path.exists(path + ".npz"):
            path += ".npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("format") != FORMAT:
                    raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
                obj = cls(**meta["params"])
                obj.mean_ = z["mean"].astype(np.float32)
                obj.components_ = z["components"].astype(np.float32)
                obj.explained_variance_ = z["variance"].astype(np.float32)
                obj.explained_variance_ratio_ = z["variance_ratio"].astype(np.float32)
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"{path}: not a PCA-SIFT projection file ({exc}); refit it with PCASift.fit and save") from exc
        obj.n_training_ = meta.get("n_training")
        return obj
