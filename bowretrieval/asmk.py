"""SMK*, ASMK* and Hamming query expansion (HQE) over local descriptors: a small facade

    codebook = train_codebook(train_descriptors, size=65536)          # -> Codebook (save / load)
    db = build(codebook, database_descriptors, method="asmk")          # -> Database (save / load)
    result = db.query(query_descriptors, top=100)                      # -> QueryResult (save / load)

in the style of jenicek/asmk, with the posting lists in ``bowretrieval.invfile`` (compiled kernels,
memory-mapped directory) instead of Python loops and pickles.

References: Tolias, Avrithis, Jegou, "To aggregate or not to aggregate: selective match kernels for
image search", ICCV 2013 (SMK*, ASMK*: residuals to the visual word, aggregated per image and word
for ASMK*, binarised to 128 bits, selectivity sigma(u) = sign(u)|u|^alpha for u > tau, idf, and
normalisation by self-similarity); Jegou, Douze, Schmid, "Hamming embedding", ECCV 2008 (random
orthogonal projection with per-word median thresholds); Tolias & Jegou, "Visual query expansion with
or without geometry: refining local descriptors by Hamming embedding", CVPR 2014 (HQE).

Descriptors are given per image (a list of (N_i, D) float32 arrays, e.g. RootSIFT); feature ids are
positions in those arrays, so spatial verification can map a shared word back to a frame.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm.auto import tqdm

from ._ext import invfile as _k
from .errors import DataError, IndexFormatError, NotFittedError
from .invfile import InvertedFile, read_index_dir, write_index_dir
from .npzio import json_array, save_npz_atomic
from .vocabulary import Vocabulary, check_descriptors

METHODS = ("bow", "smk", "asmk", "hqe")
BINARIZATIONS = ("sign", "projection")


# -- step 1: codebook ----------------------------------------------------------------------------
class Codebook:
    """Visual vocabulary plus the binarisation of residuals.

    size: number of words. binarization: 'sign' (bit = residual component > 0, 128-D descriptors)
    or 'projection' (Hamming embedding: random orthogonal projection to 128 bits, thresholds at the
    per-word medians of training residuals). iterations, max_points_per_centroid, seed: k-means.
    search: word assignment 'auto' | 'exact' | 'hnsw' (see Vocabulary). threads: faiss threads.
    """

    def __init__(self, size: int = 65536, binarization: str = "sign", iterations: int = 15,
                 max_points_per_centroid: int = 256, seed: int = 0, search: str = "auto",
                 threads: int = 0):
        self.size = int(size)
        self.binarization = binarization
        self.iterations = int(iterations)
        self.max_points_per_centroid = int(max_points_per_centroid)
        self.seed = int(seed)
        self.search = search
        self.threads = int(threads)

    def get_params(self) -> dict:
        return dict(size=self.size, binarization=self.binarization, iterations=self.iterations,
                    max_points_per_centroid=self.max_points_per_centroid, seed=self.seed,
                    search=self.search, threads=self.threads)

    def _vocab(self) -> Vocabulary:
        return Vocabulary(self.size, self.iterations, self.max_points_per_centroid, self.seed,
                          search=self.search, threads=self.threads)

    def fit(self, X, vocabulary: Vocabulary | None = None) -> "Codebook":
        """Learn words on X (or take ``vocabulary``), then the projection medians on X."""
        if self.binarization not in BINARIZATIONS:
            raise DataError(f"binarization must be one of {BINARIZATIONS}, got {self.binarization!r}")
        X = check_descriptors(X, "codebook training descriptors")
        self.vocabulary_ = vocabulary if vocabulary is not None else self._vocab().fit(X)
        self.size = self.vocabulary_.n_words
        self.centroids_ = self.vocabulary_.centroids_
        if self.binarization == "sign" and self.vocabulary_.dim != 128:
            raise DataError(f"sign binarisation needs 128-D descriptors, got {self.vocabulary_.dim}; "
                            "use binarization='projection'")
        self.projection_ = np.zeros((0, 0), np.float32)
        self.medians_ = np.zeros((0, 0), np.float32)
        if self.binarization == "projection":
            rng = np.random.default_rng(self.seed)
            d = self.vocabulary_.dim
            q, _ = np.linalg.qr(rng.standard_normal((max(d, 128), max(d, 128))))
            self.projection_ = np.ascontiguousarray(q[:128, :d], np.float32)
            w = self.assign(X, 1)[:, 0]
            z = (X - self.centroids_[w]) @ self.projection_.T
            med = np.zeros((self.size, 128), np.float32)
            order = np.argsort(w, kind="stable")
            bounds = np.searchsorted(w[order], np.arange(self.size + 1))
            for c in np.nonzero(np.diff(bounds))[0]:  # words without training data keep 0
                med[c] = np.median(z[order[bounds[c]:bounds[c + 1]]], axis=0)
            self.medians_ = med
        return self

    @classmethod
    def from_vocabulary(cls, vocabulary: Vocabulary, binarization: str = "sign", train=None) -> "Codebook":
        """A codebook on an existing vocabulary (``train`` descriptors for 'projection' medians)."""
        cb = cls(vocabulary.n_words, binarization, vocabulary.iterations, vocabulary.max_points_per_centroid,
                 vocabulary.seed, vocabulary.search, vocabulary.threads)
        if binarization == "projection" and train is None:
            raise DataError("projection binarisation needs training descriptors for the per-word medians")
        X = train if train is not None else vocabulary.centroids_[:1]
        return cb.fit(X, vocabulary)

    def _check(self):
        if getattr(self, "centroids_", None) is None:
            raise NotFittedError("Codebook is not trained: use train_codebook(...) or Codebook.load(path)")

    def assign(self, X, k: int = 1) -> np.ndarray:
        self._check()
        return self.vocabulary_.assign(X, k)

    def encode(self, descriptors, k: int, aggregate: bool, threads: int = 1, words=None):
        """Entries of a list of images: (words int32, image int64, signatures (n, 2) uint64,
        feature ids int64 local to each image), one entry per (image, word) when ``aggregate``
        else one per (feature, word). ``words`` (per image (N_i, k) arrays) skips assignment."""
        self._check()
        descs = [check_descriptors(d, f"descriptors of image {i}", self.centroids_.shape[1])
                 for i, d in enumerate(descriptors)]
        n = np.array([len(d) for d in descs], np.int64)
        X = np.concatenate(descs) if descs else np.zeros((0, self.centroids_.shape[1]), np.float32)
        if words is None:
            A = self.assign(X, k) if len(X) else np.zeros((0, k), np.int32)
        else:
            A = np.concatenate([np.asarray(w, np.int32).reshape(len(d), -1) for w, d in zip(words, descs)]) \
                if descs else np.zeros((0, k), np.int32)
        k = A.shape[1]
        img_of = np.repeat(np.arange(len(descs), dtype=np.int64), n)
        f = np.repeat(np.arange(len(X), dtype=np.int64), k)
        w = A.reshape(-1).astype(np.int32)
        im = img_of[f]
        order = np.lexsort((f, w, im))
        f, w, im = f[order], w[order], im[order]
        if aggregate and len(f):
            new = np.ones(len(f), bool)
            new[1:] = (w[1:] != w[:-1]) | (im[1:] != im[:-1])
            starts = np.nonzero(new)[0]
        else:
            starts = np.arange(len(f))
        ptr = np.append(starts, len(f)).astype(np.int64)
        sigs = _k.residual_signatures(X, f, ptr, np.ascontiguousarray(w[starts]), self.centroids_,
                                      self.projection_, self.medians_, threads)
        first = np.concatenate([[0], np.cumsum(n)[:-1]]) if len(n) else n
        fid = f[starts] - first[im[starts]]
        return w[starts], im[starts], sigs, fid, A

    def save(self, path) -> str:
        self._check()
        path = os.fspath(path)
        meta = dict(format="bowretrieval.codebook/1", params=self.get_params(),
                    vocabulary=self.vocabulary_.get_params())
        return save_npz_atomic(path, centroids=self.centroids_, projection=self.projection_, medians=self.medians_,
                               meta=json_array(meta))

    @classmethod
    def load(cls, path) -> "Codebook":
        try:
            with np.load(os.fspath(path), allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("centroids", "projection", "medians")}
                meta = json.loads(str(z["meta"]))
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"{path}: not a bowretrieval codebook ({exc}); train one with train_codebook") from exc
        return cls._from_arrays(meta, arrays)

    @classmethod
    def _from_arrays(cls, meta, arrays) -> "Codebook":
        cb = cls(**meta["params"])
        voc = Vocabulary(**meta["vocabulary"])
        voc.centroids_ = np.ascontiguousarray(arrays["centroids"], np.float32)
        cb.vocabulary_ = voc
        cb.centroids_ = voc.centroids_
        cb.projection_ = np.ascontiguousarray(arrays["projection"], np.float32)
        cb.medians_ = np.ascontiguousarray(arrays["medians"], np.float32)
        return cb


def train_codebook(descriptors, size: int = 65536, binarization: str = "sign", seed: int = 0,
                   vocabulary: Vocabulary | None = None, **params) -> Codebook:
    """Step 1: k-means words (or a given vocabulary) and the residual binarisation."""
    X = np.concatenate(list(descriptors)) if isinstance(descriptors, (list, tuple)) else descriptors
    return Codebook(size, binarization, seed=seed, **params).fit(X, vocabulary)


# -- step 2: database ----------------------------------------------------------------------------
@dataclass
class MethodParams:
    """Parameters of the retrieval method (defaults: Tolias et al. 2013/2014)."""
    method: str = "asmk"       # bow | smk | asmk | hqe
    alpha: float = 3.0         # selectivity exponent
    tau: float = 0.0           # selectivity threshold on u = 1 - 2h/128
    query_ma: int = 0          # query multiple assignment (0: 5 for smk/asmk, 3 for hqe, 1 for bow)
    db_ma: int = 1             # database multiple assignment
    hqe_ht: int = 48           # HQE: Hamming threshold of the scoring kernel
    hqe_strict_ht: int = 32    # HQE: strict threshold of reliable correspondences
    hqe_top: int = 100         # HQE: images inspected for reliability
    hqe_min_matches: int = 5   # HQE: reliable correspondences that make an image reliable
    hqe_min_images: int = 2    # HQE: a new word joins the query when in >= this many reliable images
    hqe_word_fraction: float = 0.5  # HQE: ... and in >= this fraction of the reliable images

    def __post_init__(self):
        if self.method not in METHODS:
            raise DataError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.query_ma == 0:
            self.query_ma = {"bow": 1, "hqe": 3}.get(self.method, 5)

    @property
    def kind(self) -> str:
        return {"hqe": "smk"}.get(self.method, self.method)


@dataclass
class QueryResult:
    """Rankings of a query batch: ids (n_queries, top) int64, scores float32, seconds per query."""
    ids: np.ndarray
    scores: np.ndarray
    seconds_per_query: float = 0.0
    meta: dict = field(default_factory=dict)

    def save(self, path) -> str:
        path = os.fspath(path)
        return save_npz_atomic(path, ids=self.ids, scores=self.scores,
                               meta=json_array(dict(self.meta, seconds_per_query=self.seconds_per_query)))

    @classmethod
    def load(cls, path) -> "QueryResult":
        with np.load(os.fspath(path), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return cls(z["ids"], z["scores"], meta.pop("seconds_per_query", 0.0), meta)


class Database:
    """An indexed image collection: codebook, inverted file and per-image word assignments."""

    def __init__(self, codebook: Codebook, params: MethodParams, ivf: InvertedFile,
                 feat_indptr: np.ndarray, feat_words: np.ndarray, names=None, threads: int = 1):
        self.codebook = codebook
        self.params = params
        self.ivf = ivf
        self.feat_indptr = feat_indptr
        self.feat_words = feat_words
        self.names = list(names) if names is not None else None
        self.threads = int(threads)

    @property
    def n_images(self) -> int:
        return self.ivf.n_images_ + self.ivf._pending_images

    # -- spatial-verification support ---------------------------------------------------------
    def image_words(self, image: int) -> np.ndarray:
        """Word assignments (N_i, db_ma) int32 of database image ``image``; row = feature id."""
        if not 0 <= image < len(self.feat_indptr) - 1:
            raise DataError(f"image {image} outside [0, {len(self.feat_indptr) - 1})")
        return np.asarray(self.feat_words[self.feat_indptr[image]:self.feat_indptr[image + 1]])

    def query_words(self, descriptors, k: int | None = None) -> np.ndarray:
        """Word assignments (N, k) of query descriptors (k defaults to the method's query MA)."""
        return self.codebook.assign(descriptors, k or self.params.query_ma)

    def tentative_matches(self, query_words, image: int) -> np.ndarray:
        """Pairs (M, 2) int64 (query feature, database feature) of image ``image`` sharing a word."""
        qw = np.asarray(query_words).reshape(len(query_words), -1)
        dw = self.image_words(image)
        qf = np.repeat(np.arange(len(qw)), qw.shape[1]); qv = qw.reshape(-1)
        df = np.repeat(np.arange(len(dw)), dw.shape[1]); dv = dw.reshape(-1)
        qo, do = np.argsort(qv, kind="stable"), np.argsort(dv, kind="stable")
        qv, qf, dv, df = qv[qo], qf[qo], dv[do], df[do]
        lo, hi = np.searchsorted(dv, qv, "left"), np.searchsorted(dv, qv, "right")
        cnt = hi - lo
        a = np.repeat(qf, cnt)
        b = df[np.repeat(lo, cnt) + (np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt))]
        return np.unique(np.stack([a, b], 1), axis=0).astype(np.int64)

    # -- adding images ------------------------------------------------------------------------
    def add(self, descriptors, chunk_features: int = 500_000, progress: bool = False, words=None) -> "Database":
        """Index more images (ids continue after the existing ones); chunked to bound memory."""
        p, cb = self.params, self.codebook
        fptr, fwords = [np.asarray(self.feat_indptr)], [np.asarray(self.feat_words)]
        descriptors = list(descriptors)
        i, bar = 0, tqdm(total=len(descriptors), desc=f"index ({p.method})", unit="img", disable=not progress)
        while i < len(descriptors):
            j, nf = i, 0
            while j < len(descriptors) and (j == i or nf + len(descriptors[j]) <= chunk_features):
                nf += len(descriptors[j]); j += 1
            chunk = descriptors[i:j]
            entries, Acat = _encode_chunk(cb, p, chunk, self.threads, None if words is None else words[i:j])
            self.ivf.add(**entries)
            n = np.array([len(d) for d in chunk], np.int64)
            fptr.append(fptr[-1][-1] + np.cumsum(n))
            fwords.append(Acat.astype(np.int32))
            bar.update(j - i)
            i = j
        bar.close()
        self.feat_indptr = np.concatenate(fptr)
        self.feat_words = np.concatenate(fwords) if len(fwords) > 1 else fwords[0]
        self.ivf.compact()
        return self

    # -- step 3: query ------------------------------------------------------------------------
    def encode_queries(self, descriptors, words=None):
        """Query batch as ``InvertedFile.search`` input: [(words, signatures or None), ...]."""
        p, cb = self.params, self.codebook
        out = []
        for i, d in enumerate(descriptors):
            if p.kind == "bow":
                w = (cb.assign(d, p.query_ma) if len(d) else np.zeros((0,), np.int32)) if words is None else words[i]
                out.append((np.asarray(w).reshape(-1), None))
            else:
                w, _, sigs, _, _ = cb.encode([d], p.query_ma, p.kind == "asmk", 1,
                                             None if words is None else [words[i]])
                out.append((w, sigs))
        return out

    def query(self, descriptors, top: int | None = 100, words=None) -> QueryResult:
        """Rank the database for each query image's descriptors (a list of (N, D) arrays).
        A query without features returns zero scores (database order)."""
        t0 = time.perf_counter()
        queries = self.encode_queries(descriptors, words)
        t1 = time.perf_counter()
        top = self.n_images if top is None else min(int(top), self.n_images)
        if self.params.method == "hqe":
            ids, scores = self._hqe(queries, top)
        else:
            self.ivf.threads = self.threads
            ids, scores = self.ivf.search(queries, top)
        t2 = time.perf_counter()
        nq = max(len(queries), 1)
        return QueryResult(ids, scores, (t2 - t0) / nq,
                           dict(method=self.params.method, encode_s_per_query=(t1 - t0) / nq,
                                search_s_per_query=(t2 - t1) / nq))

    def _hqe(self, queries, top):
        """Tolias & Jegou 2014: query, find reliable images among the top ``hqe_top`` (>= min_matches
        correspondences at Hamming distance <= strict_ht), add the words frequent among them with one
        majority-vote signature each to the query, query again."""
        p, ivf = self.params, self.ivf
        ivf.threads = self.threads
        first_ids, _ = ivf.search(queries, max(top, min(p.hqe_top, self.n_images)))
        expanded = []
        mask = np.zeros(self.n_images, np.uint8)
        for (qw, qs), cand in zip(queries, first_ids):
            if not len(qw):
                expanded.append((qw, qs)); continue
            cand = cand[:p.hqe_top]
            mask[cand] = 1
            a, j, _ = _k.correspondences(qw, qs, ivf.indptr_, ivf.ids_, ivf.payload_, mask, p.hqe_strict_ht)
            mask[cand] = 0
            img = np.asarray(ivf.ids_)[j]
            # count distinct query features per image (a feature with MA may hit several words)
            per_img = np.bincount(img, minlength=self.n_images) if len(img) else np.zeros(self.n_images, int)
            reliable = np.nonzero(per_img >= p.hqe_min_matches)[0]
            expanded.append(self.hqe_expand(qw, qs, reliable))
        ids, scores = ivf.search(expanded, top)
        return ids, scores

    def hqe_expand(self, qw, qs, reliable):
        """The query's own entries plus, for every word not in the query that is present in at least
        max(hqe_min_images, hqe_word_fraction * |reliable|) reliable images, one signature: the bitwise
        majority vote (ties -> 0) of the reliable images' features in that word."""
        p, ivf = self.params, self.ivf
        if not len(reliable):
            return qw, qs
        W, S, I = [], [], []
        for d in reliable:
            pos, words = ivf.entries_of(int(d), self.image_words(int(d)))
            W.append(words); S.append(np.asarray(ivf.payload_)[pos]); I.append(np.full(len(pos), d, np.int64))
        W, S, I = np.concatenate(W), np.concatenate(S), np.concatenate(I)
        pairs = np.unique(np.stack([W.astype(np.int64), I], 1), axis=0)
        votes = np.bincount(pairs[:, 0], minlength=ivf.n_words)
        need = max(p.hqe_min_images, int(np.ceil(p.hqe_word_fraction * len(reliable))))
        keep = votes >= need
        keep[qw] = False
        sel = keep[W]
        W, S = W[sel], S[sel]
        if not len(W):
            return qw, qs
        o = np.argsort(W, kind="stable")
        W, S = W[o], S[o]
        uw, start, cnt = np.unique(W, return_index=True, return_counts=True)
        bits = np.unpackbits(S.view(np.uint8), axis=1).astype(np.int32)
        sums = np.add.reduceat(bits, start, axis=0)
        vote = (2 * sums > cnt[:, None]).astype(np.uint8)
        sig = np.packbits(vote, axis=1).view(np.uint64).reshape(-1, 2)
        return (np.concatenate([qw, uw.astype(np.int32)]),
                np.ascontiguousarray(np.concatenate([qs, sig])))

    # -- persistence --------------------------------------------------------------------------
    def save(self, path) -> str:
        """One index directory: the inverted file, codebook arrays, assignments, parameters."""
        cb = self.codebook
        extra = dict(feat_indptr=np.asarray(self.feat_indptr, np.int64), feat_words=np.asarray(self.feat_words, np.int32),
                     centroids=cb.centroids_, projection=cb.projection_, medians=cb.medians_)
        meta = dict(method=asdict(self.params), codebook=dict(format="bowretrieval.codebook/1", params=cb.get_params(),
                    vocabulary=cb.vocabulary_.get_params()), names=self.names)
        return self.ivf.save(path, extra, meta)

    @classmethod
    def load(cls, path, threads: int = 1, mmap: bool = True, verify: bool = False) -> "Database":
        ivf = InvertedFile.load(path, threads=threads, mmap=mmap, verify=verify)
        man, ex = ivf.manifest_, ivf.extra_
        try:
            cb = Codebook._from_arrays(man["codebook"], ex)
            params = MethodParams(**man["method"])
            db = cls(cb, params, ivf, ex["feat_indptr"], ex["feat_words"], man.get("names"), threads)
        except (KeyError, TypeError) as exc:
            raise IndexFormatError(f"{path}: not a bowretrieval.asmk database ({exc!r} missing); rebuild it "
                                   "with `bowr index build`") from exc
        if len(db.feat_indptr) != ivf.n_images_ + 1:
            raise IndexFormatError(f"{path}: feat_indptr disagrees with n_images; rebuild the index")
        return db


def _encode_chunk(cb: Codebook, p: MethodParams, chunk, threads: int, words=None):
    """``InvertedFile.add`` keywords for a chunk of database images, and their per-feature words
    (N, db_ma) int32. ``words`` (per image (N_i, db_ma) arrays) skips assignment."""
    if p.kind == "bow":
        A = ([cb.assign(d, p.db_ma) if len(d) else np.zeros((0, p.db_ma), np.int32) for d in chunk]
             if words is None else [np.asarray(w, np.int32).reshape(len(d), -1) for w, d in zip(words, chunk)])
        Acat = np.concatenate(A) if A else np.zeros((0, p.db_ma), np.int32)
        img = np.repeat(np.repeat(np.arange(len(chunk)), [len(a) for a in A]), Acat.shape[1])
        return dict(words=Acat.reshape(-1), image_ids=img, n_images=len(chunk)), Acat
    w, im, sigs, fid, Acat = cb.encode(chunk, p.db_ma, p.kind == "asmk", threads, words)
    return dict(words=w, image_ids=im, payload=sigs, feature_ids=fid if p.kind == "smk" else None,
                n_images=len(chunk)), Acat


def build_on_disk(codebook: Codebook, descriptors, path, method: str = "asmk", names=None, threads: int = 1,
                  progress: bool = False, n_images: int | None = None, chunk_features: int = 500_000,
                  run_bytes: int = 1 << 30, mem_bytes: int = 1 << 30, workdir=None, **params) -> str:
    """Step 2 for collections larger than memory: the directory ``build(...).save(path)`` writes,
    byte for byte in its arrays, without holding the index, the descriptors or the per-feature words
    in memory. ``descriptors`` is any iterable of (N_i, D) arrays, one per image in database order
    (a generator reading a feature store image by image is fine; ``n_images`` sizes the progress
    bar). Images are encoded in chunks of about ``chunk_features`` features; the inverted file is
    built by ``InvertedFile.build_on_disk`` (sorted runs of ``run_bytes`` merged word range by word
    range, ~``mem_bytes`` of working memory), and the per-feature words for spatial verification are
    appended to a temporary file. Atomic: on any error nothing is left at ``path``. Open the result
    with ``Database.load(path)``."""
    mp = MethodParams(method=method, **params)
    ht = mp.hqe_ht if mp.method == "hqe" else None
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmpdir = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.words-", dir=workdir or os.path.dirname(path))
    wfile = os.path.join(tmpdir, "feat_words.bin")
    counts = []

    def chunks():
        bar = tqdm(total=n_images, desc=f"index ({mp.method}, on disk)", unit="img", disable=not progress)
        with open(wfile, "wb") as fh:
            chunk, nf = [], 0
            for d in descriptors:
                d = check_descriptors(d, f"descriptors of image {len(counts) + len(chunk)}", codebook.centroids_.shape[1])
                if chunk and nf + len(d) > chunk_features:
                    yield encode(chunk, fh)
                    bar.update(len(chunk))
                    chunk, nf = [], 0
                chunk.append(d)
                nf += len(d)
            if chunk:
                yield encode(chunk, fh)
                bar.update(len(chunk))
        bar.close()

    def encode(chunk, fh):
        out, Acat = _encode_chunk(codebook, mp, chunk, threads)
        fh.write(np.ascontiguousarray(Acat, np.int32).tobytes())
        counts.extend(len(d) for d in chunk)
        return out

    def extra_arrays():
        n = np.asarray(counts, np.int64)
        total = int(n.sum())
        words = (np.memmap(wfile, np.int32, "r", shape=(total, mp.db_ma)) if total
                 else np.zeros((0, mp.db_ma), np.int32))
        return dict(feat_indptr=np.concatenate([[0], np.cumsum(n)]).astype(np.int64), feat_words=words,
                    centroids=codebook.centroids_, projection=codebook.projection_, medians=codebook.medians_)

    def extra_meta():
        if names is not None and len(names) != len(counts):
            raise DataError(f"build_on_disk: {len(names)} names for {len(counts)} images")
        return dict(method=asdict(mp), codebook=dict(format="bowretrieval.codebook/1", params=codebook.get_params(),
                    vocabulary=codebook.vocabulary_.get_params()), names=list(names) if names is not None else None)

    try:
        return InvertedFile.build_on_disk(path, chunks(), codebook.size, mp.kind, mp.alpha, mp.tau, ht,
                                          run_bytes=run_bytes, mem_bytes=mem_bytes, workdir=workdir,
                                          extra_arrays=extra_arrays, extra_meta=extra_meta)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def merge_database_shards(shard_paths, path, mem_bytes: int = 1 << 30, verify: bool = False, workdir=None) -> str:
    """One database directory at ``path`` from database directories built separately (by
    ``build_on_disk`` or ``build(...).save``) with the same codebook and method parameters; shard
    k's images follow shard k-1's. The posting lists are merged out of core by
    ``InvertedFile.merge_shards_to_disk`` (idf and normalisers recomputed over the whole
    collection); the per-feature words are concatenated through a temporary file (under
    ``workdir``, default next to ``path``), ``feat_indptr`` with each shard's offset, the names
    joined. Every array equals, byte for byte, that of one build over the shards' images in the
    same order. Shards that disagree (method parameters, codebook, kind) or repeat an image name
    raise a DataError before anything is written; on any error nothing is left at ``path``."""
    from .invfile import read_manifest

    shard_paths = [os.fspath(p) for p in shard_paths]
    if not shard_paths:
        raise DataError("merge_database_shards: no shards given")
    cb_arrays = ("centroids", "projection", "medians")

    def fingerprint(sp, man):
        arrs = man.get("arrays", {})
        missing = [k for k in ("feat_indptr", "feat_words") + cb_arrays if k not in arrs] + \
                  [k for k in ("method", "codebook") if k not in man]
        if missing:
            raise IndexFormatError(f"{sp}: not a bowretrieval.asmk database ({missing[0]!r} missing); "
                                   "build the shards with asmk.build_on_disk")
        return dict(params=man["params"], method=man["method"], codebook=man["codebook"],
                    **{k: [arrs[k][f] for f in ("dtype", "shape", "crc32")] for k in cb_arrays},
                    feat_words=[arrs["feat_words"]["dtype"], arrs["feat_words"]["shape"][1:]])

    mans = [read_manifest(sp) for sp in shard_paths]
    ref = fingerprint(shard_paths[0], mans[0])
    for sp, man in zip(shard_paths[1:], mans[1:]):
        fp = fingerprint(sp, man)
        if fp != ref:
            diff = ", ".join(f"{k}: {fp[k]} vs {ref[k]}" for k in ref if fp[k] != ref[k])
            raise DataError(f"merge_database_shards: {sp} was not built like {shard_paths[0]} ({diff}); "
                            "build every shard with the same codebook and method parameters")
    names = [man.get("names") for man in mans]
    if all(n is None for n in names):
        names = None
    elif any(n is None for n in names):
        raise DataError("merge_database_shards: some shards record image names and others do not")
    else:
        names = [n for ns in names for n in ns]
        if len(set(names)) != len(names):
            from collections import Counter

            dup = sorted(n for n, c in Counter(names).items() if c > 1)[:3]
            raise DataError(f"merge_database_shards: image(s) {dup} appear in more than one shard")
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmpdir = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.words-", dir=workdir or os.path.dirname(path))

    def extra_arrays():
        ptrs, words, base = [np.zeros(1, np.int64)], [], 0
        for sp, man in zip(shard_paths, mans):
            ptr = np.load(os.path.join(sp, man["arrays"]["feat_indptr"]["file"]), allow_pickle=False)
            fw = np.load(os.path.join(sp, man["arrays"]["feat_words"]["file"]), mmap_mode="r", allow_pickle=False)
            if len(ptr) != int(man["n_images"]) + 1 or int(ptr[-1]) != len(fw):
                raise IndexFormatError(f"{sp}: feat_indptr disagrees with n_images / feat_words; rebuild the shard")
            ptrs.append(np.asarray(ptr[1:], np.int64) + base)
            words.append(fw)
            base += int(ptr[-1])
        ma = int(ref["feat_words"][1][0])
        wfile = os.path.join(tmpdir, "feat_words.bin")
        with open(wfile, "wb") as fh:
            for fw in words:
                step = max(1, (64 << 20) // (4 * ma))
                for i in range(0, len(fw), step):
                    fh.write(np.ascontiguousarray(fw[i:i + step], np.int32).tobytes())
        fwords = np.memmap(wfile, np.int32, "r", shape=(base, ma)) if base else np.zeros((0, ma), np.int32)
        cb = {k: np.load(os.path.join(shard_paths[0], mans[0]["arrays"][k]["file"]), allow_pickle=False)
              for k in cb_arrays}
        return dict(feat_indptr=np.concatenate(ptrs), feat_words=fwords, **cb)

    meta = dict(method=mans[0]["method"], codebook=mans[0]["codebook"], names=names)
    try:
        return InvertedFile.merge_shards_to_disk(shard_paths, path, mem_bytes=mem_bytes, verify=verify,
                                                 extra_arrays=extra_arrays, extra_meta=meta)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def build(codebook: Codebook, descriptors, method: str = "asmk", names=None, threads: int = 1,
          progress: bool = False, words=None, **params) -> Database:
    """Step 2: index database images (a list of (N_i, D) descriptor arrays) with ``method``."""
    mp = MethodParams(method=method, **params)
    ht = mp.hqe_ht if mp.method == "hqe" else None
    ivf = InvertedFile(codebook.size, mp.kind, mp.alpha, mp.tau, ht, threads)
    db = Database(codebook, mp, ivf, np.zeros(1, np.int64), np.zeros((0, mp.db_ma), np.int32), names, threads)
    return db.add(descriptors, progress=progress, words=words)
