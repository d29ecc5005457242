"""Baseline bag-of-words index: tf-idf weighting and cosine scoring over CSR posting lists
(Sivic & Zisserman, "Video Google", 2003). The arithmetic runs in ``ext/bow.pyx``.

idf(w) = log(N / df(w)); an image vector is v_d[w] = tf(d, w) idf(w) / ||tf idf||_2, a query the
same, and the score is their dot product. Images without features get score 0 and rank last
(ties keep database order).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from ._ext import bow as _k
from .errors import DataError, IndexFormatError

FORMAT = "bowretrieval.bow/1"


def _check_words(words, n_words, what):
    w = np.asarray(words)
    if w.ndim == 2:
        w = w.reshape(-1)
    if w.ndim != 1:
        raise DataError(f"{what}: word ids must be a 1-D (or (N, k)) array, got shape {w.shape}")
    if w.size and (w.min() < 0 or w.max() >= n_words):
        raise DataError(f"{what}: word ids must lie in [0, {n_words}); got range [{w.min()}, {w.max()}] — "
                        "were they assigned with another vocabulary?")
    return np.ascontiguousarray(w, dtype=np.int32)


class BowIndex:
    """tf-idf inverted file. Build with ``BowIndex(n_words).fit(list_of_word_arrays)``.

    n_words: vocabulary size. threads: scoring threads for batch queries.
    """

    def __init__(self, n_words: int, threads: int = 1):
        self.n_words = int(n_words)
        self.threads = int(threads)

    def fit(self, image_words) -> "BowIndex":
        """image_words: sequence with one int array of word ids per database image (any shape)."""
        n_img = len(image_words)
        if n_img >= 2**32 - 1:
            raise DataError(f"{n_img} images exceed the uint32 image ids of this index; shard it")
        words = [_check_words(w, self.n_words, f"database image {i}") for i, w in enumerate(image_words)]
        ids = np.repeat(np.arange(n_img, dtype=np.int64), [len(w) for w in words])
        allw = np.concatenate(words) if words else np.zeros(0, np.int32)
        img, word, cnt = _k.histograms(ids, allw, self.n_words)
        df = np.bincount(word, minlength=self.n_words).astype(np.float64)
        self.idf_ = np.where(df > 0, np.log(max(n_img, 1) / np.maximum(df, 1)), 0.0).astype(np.float32)
        wts = cnt * self.idf_[word]
        norms = np.sqrt(np.bincount(img, weights=wts.astype(np.float64) ** 2, minlength=n_img))
        wts = (wts / np.maximum(norms[img], 1e-12)).astype(np.float32)
        self.indptr_ = np.zeros(self.n_words + 1, np.int64)
        np.cumsum(np.bincount(word, minlength=self.n_words), out=self.indptr_[1:])
        self.ids_ = img.astype(np.uint32)
        self.weights_ = np.ascontiguousarray(wts)
        self.n_images_ = n_img
        return self

    def query_vectors(self, queries):
        """CSR (indptr, words, weights) of tf-idf L2-normalised query vectors."""
        indptr, all_w, all_v = [0], [], []
        for i, q in enumerate(queries):
            q = _check_words(q, self.n_words, f"query {i}")
            u, c = np.unique(q, return_counts=True)
            v = c.astype(np.float32) * self.idf_[u]
            n = float(np.linalg.norm(v))
            all_w.append(u.astype(np.int32))
            all_v.append((v / n if n > 0 else v).astype(np.float32))
            indptr.append(indptr[-1] + len(u))
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
        return np.asarray(indptr, np.int64), cat(all_w, np.int32), cat(all_v, np.float32)

    def scores(self, queries) -> np.ndarray:
        """Dense cosine scores (n_queries, n_images) for a list of query word arrays."""
        qi, qw, qv = self.query_vectors(queries)
        out = np.zeros((len(queries), self.n_images_), np.float32)
        _k.score_batch(qi, qw, qv, self.indptr_, self.ids_, self.weights_, out, self.threads)
        return out

    def search(self, queries, top: int | None = None):
        """Ranked database ids (n_queries, top or all) and their scores, best first."""
        s = self.scores(queries)
        order = np.argsort(-s, axis=1, kind="stable")
        if top is not None:
            order = order[:, :top]
        return order.astype(np.int64), np.take_along_axis(s, order, axis=1)

    # -- persistence: a versioned directory, written atomically --------------------------------
    def save(self, path):
        path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-index-", dir=parent)
        try:
            for name in ("idf_", "indptr_", "ids_", "weights_"):
                np.save(os.path.join(tmp, name.rstrip("_") + ".npy"), getattr(self, name))
            with open(os.path.join(tmp, "manifest.json"), "w") as fh:
                json.dump(dict(format=FORMAT, n_words=self.n_words, n_images=self.n_images_,
                               n_entries=int(len(self.ids_))), fh, indent=1)
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path, threads: int = 1, mmap: bool = True) -> "BowIndex":
        path = os.fspath(path)
        try:
            with open(os.path.join(path, "manifest.json")) as fh:
                man = json.load(fh)
        except (OSError, ValueError) as exc:
            raise IndexFormatError(f"{path}: no readable manifest.json ({exc}); rebuild with `bowr index build`") from exc
        if man.get("format") != FORMAT:
            raise IndexFormatError(f"{path}: index format {man.get('format')!r} is not {FORMAT!r}; rebuild it")
        self = cls(man["n_words"], threads)
        try:
            for name in ("idf", "indptr", "ids", "weights"):
                setattr(self, name + "_", np.load(os.path.join(path, name + ".npy"), mmap_mode="r" if mmap else None))
        except (OSError, ValueError) as exc:
            raise IndexFormatError(f"{path}: damaged index array ({exc}); rebuild it") from exc
        self.n_images_ = int(man["n_images"])
        if len(self.ids_) != man["n_entries"] or len(self.indptr_) != self.n_words + 1:
            raise IndexFormatError(f"{path}: array sizes disagree with the manifest; rebuild it")
        return self
