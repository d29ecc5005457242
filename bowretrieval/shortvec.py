"""Short image vectors from multiple vocabularies, and their exhaustive search with query expansion.

``ShortVectorEncoder``: MultiVocabulary BoW (sparse, concatenated) -> joint PCA-whitening -> D'
(128) L2-normalised float32 vector (Jegou & Chum ECCV 2012; Radenovic, Jegou & Chum ICMR 2015).
An image without features has an all-zero BoW row; its short vector is defined as all zeros
(not the whitened mean), so it scores 0 against everything and the index ranks it last.

``ShortVectorIndex``: faiss inner-product search over the short vectors (exact, or product-quantised
storage for large collections), with average query expansion and alpha-QE (Radenovic, Tolias & Chum
2018): q' = normalise(q + sum_{i <= nQE} max(q.x_i, 0)^alpha x_i); alpha = 0 is plain AQE.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from .errors import DataError, IndexFormatError, NotFittedError
from .multivocab import MultiVocabulary, load_states, save_states
from .whitening import PCAWhitening

INDEX_FORMAT = "bowretrieval.shortvec/1"


def _faiss():
    import faiss

    return faiss


class ShortVectorEncoder:
    """Vocabulary bundle + joint PCA-whitening; saved and loaded as one .npz file.

    bundle: a MultiVocabulary (fitted, or fitted by ``fit``). n_components: D' (default: the bundle
    config's short_dims). method: PCA method ('auto', 'dual', 'primal').
    """

    def __init__(self, bundle: MultiVocabulary, n_components: int | None = None, method: str = "auto"):
        self.bundle = bundle
        self.n_components = n_components
        self.method = method

    def fit(self, train_images, progress: bool = False, fit_bundle: bool | None = None) -> "ShortVectorEncoder":
        """Learn the bundle (unless already fitted) and the whitening on ``train_images`` descriptors."""
        if fit_bundle is None:
            fit_bundle = getattr(self.bundle, "vocabularies_", None) is None
        train_images = list(train_images)
        if fit_bundle:
            self.bundle.fit(train_images, progress=progress)
        X = self.bundle.transform(train_images, progress=progress, desc="BoW of training images")
        return self.fit_bow(X)

    def fit_bow(self, X) -> "ShortVectorEncoder":
        """Learn the whitening from precomputed concatenated BoW rows (n, bundle.dim)."""
        X = X[np.asarray(abs(X).sum(axis=1)).ravel() > 0]  # empty training images carry no information
        k = self.n_components or self.bundle.config.short_dims
        self.whitening_ = PCAWhitening(k, method=self.method, seed=self.bundle.config.seed).fit(X)
        return self

    def _check_fitted(self):
        if getattr(self, "whitening_", None) is None:
            raise NotFittedError("ShortVectorEncoder is not fitted: call fit(train_images) or ShortVectorEncoder.load")

    @property
    def dim(self) -> int:
        self._check_fitted()
        return int(self.whitening_.components_.shape[0])

    def transform_bow(self, X) -> np.ndarray:
        """Short vectors (n, D') of concatenated BoW rows; all-zero rows give all-zero vectors."""
        self._check_fitted()
        Y = self.whitening_.transform(X)
        empty = np.asarray(abs(X).sum(axis=1)).ravel() == 0
        Y[empty] = 0.0
        return Y

    def transform(self, images, progress: bool = False) -> np.ndarray:
        """Short vectors (n_images, D') float32 of per-image descriptor arrays."""
        self._check_fitted()
        return self.transform_bow(self.bundle.transform(images, progress=progress))

    def save(self, path) -> str:
        self._check_fitted()
        w = self.whitening_.state_dict()
        return save_states(path, bundle=self.bundle.state_dict(),
                           whitening={"arrays": {k: v for k, v in w.items() if k != "meta"}, "meta": w["meta"]})

    @classmethod
    def load(cls, path, threads: int = 0) -> "ShortVectorEncoder":
        states = load_states(path)
        bundle = MultiVocabulary.from_state(states["bundle"], os.fspath(path), threads) if "bundle" in states else None
        if bundle is None or "whitening" not in states:
            raise DataError(f"{path}: holds no {'bundle' if bundle is None else 'whitening'}; build the encoder with "
                            "`bowr vocab build CONFIG` (a bundle config)")
        st = dict(states["whitening"]["arrays"], meta=states["whitening"]["meta"])
        self = cls(bundle, method=st["meta"]["params"]["method"])
        self.whitening_ = PCAWhitening.from_state(st, os.fspath(path))
        self.n_components = self.whitening_.n_components
        if self.whitening_.dim_in != bundle.dim:
            raise DataError(f"{path}: whitening input dimension {self.whitening_.dim_in} != bundle dimension "
                            f"{bundle.dim}; rebuild the encoder")
        return self


def expand_queries(Q, X, ranks, sims, alpha: float = 3.0, nqe: int = 50) -> np.ndarray:
    """alpha-QE: q' = normalise(q + sum_{i<nqe} max(s_i, 0)^alpha x_{r_i}); alpha 0 gives average QE.

    Q (nq, d) queries, X (n, d) database vectors, ranks/sims (nq, >= nqe) from the first search."""
    Q = np.asarray(Q, np.float32)
    nqe = int(min(nqe, ranks.shape[1]))
    if nqe <= 0:
        return Q.copy()
    top = ranks[:, :nqe]
    w = np.maximum(sims[:, :nqe].astype(np.float64), 0.0)
    w = w ** alpha if alpha != 0 else np.ones_like(w)
    w[top < 0] = 0.0
    Xn = np.asarray(X, np.float32)
    out = Q.astype(np.float64) + np.einsum("qk,qkd->qd", w, Xn[np.maximum(top, 0)].astype(np.float64))
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    out[np.linalg.norm(Q, axis=1) == 0] = 0.0  # a query without features stays empty
    return out.astype(np.float32)


class ShortVectorIndex:
    """Exhaustive inner-product search over L2-normalised short vectors (faiss).

    storage: 'float32' (IndexFlatIP, exact) or 'pq' (IndexPQ, pq_m sub-quantisers of pq_bits bits:
    pq_m * pq_bits / 8 bytes per image). qe_alpha / nqe: default query expansion for ``search(qe=True)``.
    """

    def __init__(self, storage: str = "float32", pq_m: int = 16, pq_bits: int = 8,
                 qe_alpha: float = 3.0, nqe: int = 50, threads: int = 0):
        self.storage = storage
        self.pq_m = int(pq_m)
        self.pq_bits = int(pq_bits)
        self.qe_alpha = float(qe_alpha)
        self.nqe = int(nqe)
        self.threads = int(threads)

    def fit(self, vectors, train=None) -> "ShortVectorIndex":
        """Index database vectors (n, d); ``train``: vectors to learn the PQ codebooks on (default: vectors)."""
        faiss = _faiss()
        V = self._check(vectors, "database vectors")
        n, d = V.shape
        if self.threads > 0:
            faiss.omp_set_num_threads(self.threads)
        if self.storage == "float32":
            index = faiss.IndexFlatIP(d)
        elif self.storage == "pq":
            if d % self.pq_m:
                raise DataError(f"pq_m={self.pq_m} must divide the vector dimension {d}")
            T = V if train is None else self._check(train, "PQ training vectors", d)
            if len(T) < 2 ** self.pq_bits:
                raise DataError(f"{len(T)} vectors cannot train {2 ** self.pq_bits} centroids per sub-quantiser; "
                                "give more training vectors or lower pq_bits")
            index = faiss.IndexPQ(d, self.pq_m, self.pq_bits, faiss.METRIC_INNER_PRODUCT)
            index.train(T)
        else:
            raise DataError(f"storage must be 'float32' or 'pq', got {self.storage!r}")
        index.add(V)
        self.index_ = index
        self.empty_ = np.linalg.norm(V, axis=1) == 0
        self.n_images_ = n
        self.dim_ = d
        return self

    @staticmethod
    def _check(V, what, dim=None):
        V = np.asarray(V)
        if V.ndim != 2:
            raise DataError(f"{what}: expected a 2-D array (n, d), got shape {V.shape}")
        if dim is not None and V.shape[1] != dim:
            raise DataError(f"{what}: dimension {V.shape[1]} does not match the index's {dim}; "
                            "encode with the same encoder")
        V = np.ascontiguousarray(V, dtype=np.float32)
        if V.size and not np.isfinite(V).all():
            raise DataError(f"{what}: contain NaN or Inf")
        return V

    @property
    def bytes_per_image(self) -> float:
        """Storage of one image's vector in the index (codes only, excluding ids and names)."""
        self._check_fitted()
        if self.storage == "pq":
            return float(self.index_.code_size)
        return 4.0 * self.dim_

    def _check_fitted(self):
        if getattr(self, "index_", None) is None:
            raise NotFittedError("ShortVectorIndex is empty: call fit(vectors) or ShortVectorIndex.load(path)")

    def database_vectors(self) -> np.ndarray:
        """The stored vectors (reconstructed from codes for PQ storage)."""
        self._check_fitted()
        return self.index_.reconstruct_n(0, self.n_images_)

    def _raw_search(self, Q, k):
        n_empty = int(self.empty_.sum())
        # fetch enough results that pushing images without features back leaves k real ones in front
        sims, ids = self.index_.search(Q, min(k + n_empty, self.n_images_))
        if n_empty:
            # images without features rank last whatever their (zero) score
            e = np.zeros_like(sims, dtype=bool)
            valid = ids >= 0
            e[valid] = self.empty_[ids[valid]]
            sims = np.where(e, -np.inf, sims)
            order = np.argsort(-sims, axis=1, kind="stable")
            ids, sims = np.take_along_axis(ids, order, 1), np.take_along_axis(sims, order, 1)
        return ids[:, :k].astype(np.int64), sims[:, :k]

    def search(self, queries, top: int | None = None, qe: bool = False, alpha: float | None = None,
               nqe: int | None = None):
        """Ranked database ids (nq, top or all) and scores, best first; ``qe`` applies alpha-QE."""
        self._check_fitted()
        Q = self._check(queries, "query vectors", self.dim_)
        if self.threads > 0:
            _faiss().omp_set_num_threads(self.threads)
        n = self.n_images_
        k = n if top is None else min(int(top), n)
        if qe:
            alpha = self.qe_alpha if alpha is None else float(alpha)
            nqe = self.nqe if nqe is None else int(nqe)
            ids, sims = self._raw_search(Q, min(max(nqe, 1), n) if nqe > 0 else 1)
            ok = np.isfinite(sims)
            ids = np.where(ok, ids, -1)
            Q = expand_queries(Q, self.database_vectors(), ids, np.where(ok, sims, 0.0), alpha, nqe)
        ids, sims = self._raw_search(Q, k)
        return ids, sims

    # -- persistence: a directory, written atomically --------------------------------------------
    def save(self, path, names=None, extra: dict | None = None) -> str:
        self._check_fitted()
        faiss = _faiss()
        path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-shortvec-", dir=parent)
        try:
            faiss.write_index(self.index_, os.path.join(tmp, "vectors.faiss"))
            np.save(os.path.join(tmp, "empty.npy"), self.empty_)
            man = dict(format=INDEX_FORMAT, storage=self.storage, pq_m=self.pq_m, pq_bits=self.pq_bits,
                       qe_alpha=self.qe_alpha, nqe=self.nqe, n_images=self.n_images_, dim=self.dim_,
                       names=list(names) if names is not None else None, extra=extra or {})
            with open(os.path.join(tmp, "manifest.json"), "w") as fh:
                json.dump(man, fh)
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path, threads: int = 0) -> "ShortVectorIndex":
        faiss = _faiss()
        path = os.fspath(path)
        try:
            with open(os.path.join(path, "manifest.json")) as fh:
                man = json.load(fh)
        except (OSError, ValueError) as exc:
            raise IndexFormatError(f"{path}: no readable manifest.json ({exc}); build it with `bowr shortvec build`") from exc
        if man.get("format") != INDEX_FORMAT:
            raise IndexFormatError(f"{path}: format {man.get('format')!r} is not {INDEX_FORMAT!r}; rebuild it")
        self = cls(man["storage"], man["pq_m"], man["pq_bits"], man["qe_alpha"], man["nqe"], threads)
        try:
            self.index_ = faiss.read_index(os.path.join(path, "vectors.faiss"))
            self.empty_ = np.load(os.path.join(path, "empty.npy"))
        except (RuntimeError, OSError, ValueError) as exc:
            raise IndexFormatError(f"{path}: damaged index files ({exc}); rebuild it") from exc
        self.n_images_, self.dim_ = int(man["n_images"]), int(man["dim"])
        if self.index_.ntotal != self.n_images_ or len(self.empty_) != self.n_images_:
            raise IndexFormatError(f"{path}: stored vectors disagree with the manifest; rebuild it")
        self.names_ = man.get("names")
        self.extra_ = man.get("extra", {})
        return self
