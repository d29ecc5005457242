"""Visual vocabularies: faiss k-means with subsampling and a seed; exact or approximate assignment.

scikit-learn style: hyper-parameters in ``__init__``; ``fit(X)`` learns ``centroids_``;
``assign(X, k)`` returns the k nearest words; ``save``/``load`` use a plain ``.npz``.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from .errors import DataError, NotFittedError
from .npzio import json_array, save_npz_atomic

EXACT_MAX_WORDS = 65536  # flat search up to here; HNSW above unless asked otherwise


def _faiss():
    import faiss  # imported lazily: it starts OpenMP threads on import

    return faiss


def check_descriptors(X, what="descriptors", dim=None) -> np.ndarray:
    """Contiguous float32 (N, D) with finite values, or a DataError that says what is wrong."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise DataError(f"{what}: expected a 2-D array (N, D), got shape {X.shape}")
    if dim is not None and X.shape[1] != dim:
        raise DataError(f"{what}: dimension {X.shape[1]} does not match the vocabulary's {dim}; "
                        "use the descriptor variant / projection the vocabulary was learned on")
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.size and not np.isfinite(X).all():
        bad = int((~np.isfinite(X).all(axis=1)).sum())
        raise DataError(f"{what}: {bad} rows contain NaN or Inf; drop them before fitting or assigning")
    return X


class Vocabulary:
    """k-means visual vocabulary.

    size: number of visual words. iterations: k-means iterations. max_points_per_centroid:
    subsample the training set to at most this many points per word. seed: random seed.
    search: 'auto' (exact up to 65,536 words, HNSW above), 'exact' or 'hnsw'.
    threads: faiss threads (0 = faiss default).
    """

    def __init__(self, size: int = 16384, iterations: int = 15, max_points_per_centroid: int = 256,
                 seed: int = 0, search: str = "auto", hnsw_m: int = 32, hnsw_ef_search: int = 128,
                 threads: int = 0):
        self.size = int(size)
        self.iterations = int(iterations)
        self.max_points_per_centroid = int(max_points_per_centroid)
        self.seed = int(seed)
        self.search = search
        self.hnsw_m = int(hnsw_m)
        self.hnsw_ef_search = int(hnsw_ef_search)
        self.threads = int(threads)
        # exact search engine: 'auto' = bowretrieval.knn (int8-screened exact search) where the CPU
        # has AVX-512 VNNI and k <= knn.MAX_K, faiss's flat search otherwise; 'faiss' forces faiss.
        # A run-time choice, not saved with the vocabulary (environment: BOWR_EXACT_KERNEL).
        self.exact_kernel = os.environ.get("BOWR_EXACT_KERNEL", "auto")
        self._index = None

    # -- learning -----------------------------------------------------------------------------
    def fit(self, X, verbose: bool = False) -> "Vocabulary":
        X = check_descriptors(X, "training descriptors")
        if self.size < 1:
            raise DataError(f"vocabulary size must be >= 1, got {self.size}")
        if X.shape[0] < self.size:
            raise DataError(f"only {X.shape[0]} training descriptors for a vocabulary of {self.size} words; "
                            "use more training images or a smaller vocabulary")
        faiss = _faiss()
        self._set_threads()
        t0 = time.time()
        km = faiss.Kmeans(X.shape[1], self.size, niter=self.iterations, seed=self.seed, verbose=verbose,
                          max_points_per_centroid=self.max_points_per_centroid, spherical=False)
        km.train(X)
        self.centroids_ = np.ascontiguousarray(km.centroids, dtype=np.float32)
        self.inertia_ = float(km.obj[-1]) if len(km.obj) else float("nan")
        self.fit_seconds_ = time.time() - t0
        self.n_training_ = int(X.shape[0])
        self._index = None
        return self

    # -- assignment ---------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        self._check_fitted()
        return int(self.centroids_.shape[1])

    @property
    def n_words(self) -> int:
        self._check_fitted()
        return int(self.centroids_.shape[0])

    def _check_fitted(self):
        if getattr(self, "centroids_", None) is None:
            raise NotFittedError("Vocabulary is not fitted: call fit(X) or Vocabulary.load(path)")

    def _set_threads(self):
        if self.threads > 0:
            _faiss().omp_set_num_threads(self.threads)

    def _uses_hnsw(self) -> bool:
        if self.search == "auto":
            return self.n_words > EXACT_MAX_WORDS
        if self.search not in ("exact", "hnsw"):
            raise DataError(f"Vocabulary.search must be 'auto', 'exact' or 'hnsw', got {self.search!r}")
        return self.search == "hnsw"

    def _get_index(self):
        if self._index is None:
            faiss = _faiss()
            d = self.dim
            if self._uses_hnsw():
                index = faiss.IndexHNSWFlat(d, self.hnsw_m)
                index.hnsw.efConstruction = 80
                index.add(self.centroids_)
                index.hnsw.efSearch = self.hnsw_ef_search
            else:
                index = faiss.IndexFlatL2(d)
                index.add(self.centroids_)
            self._index = index
        return self._index

    def _get_knn(self, k: int):
        """The int8-screened exact search (bowretrieval.knn) when it applies, else None."""
        if self.exact_kernel not in ("auto", "faiss"):
            raise DataError(f"Vocabulary.exact_kernel must be 'auto' or 'faiss', got {self.exact_kernel!r}")
        from . import knn as _knn

        if self.exact_kernel == "faiss" or k > _knn.MAX_K or not _knn.available():
            return None
        if getattr(self, "_knn", None) is None or self._knn_src is not self.centroids_:
            self._knn, self._knn_src = _knn.ExactKnn(self.centroids_), self.centroids_
        self._knn.threads = self.threads if self.threads > 0 else (os.cpu_count() or 1)
        return self._knn

    def assign(self, X, k: int = 1, return_distances: bool = False):
        """Indices (N, k) int32 of the k nearest words (multiple assignment), nearest first."""
        self._check_fitted()
        X = check_descriptors(X, "descriptors", dim=self.dim)
        k = int(k)
        if not 1 <= k <= self.n_words:
            raise DataError(f"assignment k={k} must be between 1 and the vocabulary size {self.n_words}")
        if X.shape[0] == 0:
            ids = np.zeros((0, k), np.int32)
            return (ids, np.zeros((0, k), np.float32)) if return_distances else ids
        knn = None if self._uses_hnsw() else self._get_knn(k)
        if knn is not None:
            dist, ids = knn.search(X, k)
        else:
            self._set_threads()
            dist, ids = self._get_index().search(X, k)
            ids = ids.astype(np.int32)
        return (ids, dist) if return_distances else ids

    def assignment_recall(self, X, k: int = 1) -> float:
        """Fraction of descriptors whose approximate (HNSW) nearest word is the exact nearest word,
        i.e. recall@1 of ``assign(X)`` against a flat search (1.0 when the search is exact)."""
        approx = self.assign(X, k)[:, 0]
        faiss = _faiss()
        flat = faiss.IndexFlatL2(self.dim)
        flat.add(self.centroids_)
        _, exact = flat.search(check_descriptors(X, "descriptors", dim=self.dim), 1)
        return float(np.mean(approx == exact[:, 0])) if len(approx) else 1.0

    # -- persistence --------------------------------------------------------------------------
    def get_params(self) -> dict:
        return dict(size=self.size, iterations=self.iterations,
                    max_points_per_centroid=self.max_points_per_centroid, seed=self.seed,
                    search=self.search, hnsw_m=self.hnsw_m, hnsw_ef_search=self.hnsw_ef_search,
                    threads=self.threads)

    def save(self, path) -> str:
        """Write ``path`` (.npz) atomically: centroids plus parameters as JSON."""
        self._check_fitted()
        path = os.fspath(path)
        if not path.endswith(".npz"):
            path += ".npz"
        meta = dict(params=self.get_params(), inertia=getattr(self, "inertia_", None),
                    n_training=getattr(self, "n_training_", None), format="bowretrieval.vocabulary/1")
        return save_npz_atomic(path, centroids=self.centroids_, meta=json_array(meta))

    @classmethod
    def load(cls, path) -> "Vocabulary":
        path = os.fspath(path)
        if not os.path.exists(path) and os.path.exists(path + ".npz"):
            path += ".npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                centroids = z["centroids"]
                meta = json.loads(str(z["meta"]))
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"{path}: not a bowretrieval vocabulary file ({exc}); rebuild it with `bowr vocab build`") from exc
        voc = cls(**meta["params"])
        voc.centroids_ = np.ascontiguousarray(centroids, dtype=np.float32)
        voc.inertia_ = meta.get("inertia")
        voc.n_training_ = meta.get("n_training")
        return voc
