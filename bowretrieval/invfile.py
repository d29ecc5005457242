"""Inverted file over visual words: BoW tf-idf, SMK* / ASMK* / HQE signatures, memory-mapped on disk.

Posting lists are one CSR structure over the words (``indptr`` int64, n_words + 1) with, per entry,
a uint32 image id and a payload: a float32 term frequency (``kind='bow'``) or a 128-bit binary
signature as two uint64 (``'asmk'``: one aggregated signature per image and word; ``'smk'``: one per
feature, with uint32 feature ids). The arithmetic lives in ``ext/invfile.pyx``.

Scores (Tolias, Avrithis, Jegou, "To aggregate or not to aggregate", ICCV 2013, eqs. 1-12):

* bow: idf(w) = log(N / df(w)); cosine of tf-idf vectors (Sivic & Zisserman 2003).
* smk / asmk: u = 1 - 2 h / 128 for signatures at Hamming distance h, sigma(u) = sign(u) |u|^alpha if
  u > tau else 0; s(q, d) = sum_w idf(w)^2 sum_{pairs in w} sigma(u) / sqrt(S(q) S(d)) with S the
  self-similarity of an image under the same kernel (for aggregated signatures S = sum_w idf(w)^2).
  idf squared, as in jenicek/asmk, so rankings agree with it.

Images get consecutive ids 0..n_images-1 in the order they are added (uint32 inside, int64 at the
API). ``add`` buffers chunks and ``compact`` merges them; idf and the per-image normalisers are
recomputed on compaction because they depend on the whole database.

On disk an index is a directory (see docs/index_format.md): ``manifest.json`` (format version,
kind, parameters, sizes, CRC32 per array) and one ``.npy`` per array, opened with ``mmap_mode='r'`` so
opening is instant and pages are shared between processes. Writes go to a temporary sibling
directory renamed into place, so a failed build leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib

import numpy as np

from ._ext import invfile as _k
from .errors import DataError, IndexFormatError

FORMAT = "bowretrieval.invfile"
VERSION = 1
KINDS = ("bow", "smk", "asmk")
MAX_IMAGES = 2**32 - 1  # uint32 image ids
SIG_BITS = 128


def selectivity_lut(alpha: float, tau: float, ht: int | None = None) -> tuple[np.ndarray, int]:
    """sigma(u) for every Hamming distance 0..128 and the largest distance that can score.

    sigma(u) = sign(u)|u|^alpha if u > tau else 0 with u = 1 - 2h/128; ``ht`` (a Hamming threshold)
    replaces tau when given: distances h <= ht score, others not.
    """
    h = np.arange(SIG_BITS + 1)
    u = 1.0 - 2.0 * h / SIG_BITS
    ok = (h <= ht) if ht is not None else (u > tau)
    lut = np.where(ok, np.sign(u) * np.abs(u) ** alpha, 0.0).astype(np.float32)
    last = int(np.nonzero(ok)[0].max()) if ok.any() else -1
    return lut, last


def _as_words(words, n_words, what) -> np.ndarray:
    w = np.asarray(words)
    if w.size and not np.issubdtype(w.dtype, np.integer):
        raise DataError(f"{what}: word ids must be integers, got {w.dtype}")
    w = w.reshape(-1)
    if w.size and (w.min() < 0 or w.max() >= n_words):
        raise DataError(f"{what}: word ids must lie in [0, {n_words}); got range [{w.min()}, {w.max()}]; "
                        "were they assigned with another vocabulary?")
    return np.ascontiguousarray(w, dtype=np.int32)


def _as_sigs(sigs, n, what) -> np.ndarray:
    s = np.asarray(sigs)
    if s.dtype != np.uint64 or s.shape != (n, 2):
        raise DataError(f"{what}: signatures must be uint64 of shape ({n}, 2) (128 bits each), "
                        f"got {s.dtype} {s.shape}")
    return np.ascontiguousarray(s)


class InvertedFile:
    """CSR inverted file with tf (bow) or 128-bit signature (smk, asmk) payloads.

    n_words: vocabulary size. kind: 'bow', 'smk' (one signature per feature) or 'asmk' (one per
    image and word). alpha, tau: selectivity sigma(u) = sign(u)|u|^alpha for u > tau.
    ht: Hamming threshold overriding tau when set (HQE uses 48). threads: query threads.
    """

    def __init__(self, n_words: int, kind: str = "asmk", alpha: float = 3.0, tau: float = 0.0,
                 ht: int | None = None, threads: int = 1):
        if kind not in KINDS:
            raise DataError(f"inverted file kind must be one of {KINDS}, got {kind!r}")
        if int(n_words) < 1:
            raise DataError(f"n_words must be >= 1, got {n_words}")
        self.n_words = int(n_words)
        self.kind = kind
        self.alpha = float(alpha)
        self.tau = float(tau)
        self.ht = None if ht is None else int(ht)
        self.threads = int(threads)
        self._reset()

    def _reset(self):
        self.indptr_ = np.zeros(self.n_words + 1, np.int64)
        self.ids_ = np.zeros(0, np.uint32)
        self.payload_ = np.zeros((0, 2), np.uint64) if self.signed else np.zeros(0, np.float32)
        self.fids_ = np.zeros(0, np.uint32) if self.kind == "smk" else None
        self.n_images_ = 0
        self.idf_ = np.zeros(self.n_words, np.float32)
        self.inv_norm_ = np.zeros(0, np.float32)
        self._pending = []
        self._pending_images = 0

    @property
    def signed(self) -> bool:
        return self.kind != "bow"

    @property
    def n_entries(self) -> int:
        return int(len(self.ids_))

    def get_params(self) -> dict:
        return dict(n_words=self.n_words, kind=self.kind, alpha=self.alpha, tau=self.tau, ht=self.ht)

    def lut(self):
        return selectivity_lut(self.alpha, self.tau, self.ht)

    # -- building -----------------------------------------------------------------------------
    def add(self, words, image_ids, payload=None, feature_ids=None, n_images: int | None = None) -> "InvertedFile":
        """Append the entries of a chunk of new images (ids local to the chunk, 0..n_images-1).

        bow: ``words`` one per assigned feature (tf counted here, payload ignored). smk/asmk:
        ``words`` one per entry with ``payload`` (n, 2) uint64 signatures; asmk entries must be
        unique per (image, word); smk needs ``feature_ids``. Call ``compact`` (or ``finalize``)
        before searching; ``search`` does it for you.
        """
        words = _as_words(words, self.n_words, "add")
        img = np.asarray(image_ids).reshape(-1)
        if len(img) != len(words):
            raise DataError(f"add: {len(words)} words but {len(img)} image ids")
        if img.size and (img.min() < 0):
            raise DataError("add: image ids must be >= 0")
        n_new = int(n_images if n_images is not None else (int(img.max()) + 1 if img.size else 0))
        if img.size and img.max() >= n_new:
            raise DataError(f"add: image id {int(img.max())} >= n_images {n_new}")
        base = self.n_images_ + self._pending_images
        if base + n_new > MAX_IMAGES:
            raise DataError(f"add: {base + n_new} images exceed the uint32 image ids of one index "
                            f"(at most {MAX_IMAGES}); split the collection into shards")
        img = img.astype(np.int64) + base
        if len(img) < 2 or bool(np.all(img[1:] >= img[:-1])):  # already in image order: O(n) counting sort
            order = _k.counting_order(words, self.n_words)
        else:
            order = np.lexsort((np.arange(len(words)), img, words))
        words, img = words[order], img[order]
        if self.kind == "bow":
            starts, counts = _k.count_pairs(img, words)
            words, img, pay, fids = words[starts], img[starts], counts.astype(np.float32), None
        else:
            pay = _as_sigs(payload, len(order), "add")[order]
            fids = None
            if self.kind == "smk":
                if feature_ids is None:
                    raise DataError("add: kind 'smk' needs feature_ids (one per entry)")
                fids = np.asarray(feature_ids).reshape(-1)
                if len(fids) != len(order):
                    raise DataError("add: feature_ids must have one value per entry")
                fids = fids[order].astype(np.uint32)
            elif len(words) > 1 and np.any((np.diff(words) == 0) & (np.diff(img) == 0)):
                raise DataError("add: kind 'asmk' takes one aggregated signature per (image, word); "
                                "aggregate first (bowretrieval.asmk) or use kind 'smk'")
        self._pending.append((words, img.astype(np.uint32), pay, fids))
        self._pending_images += n_new
        return self

    def compact(self) -> "InvertedFile":
        """Merge the pending chunks into the posting lists and recompute idf and normalisers."""
        if self._pending:
            parts = [(self._word_of_entries(), self.ids_, self.payload_, self.fids_)] + self._pending
            self._pending = []
            self._merge(parts)
            self.n_images_ += self._pending_images
            self._pending_images = 0
        self._update_weights()
        return self

    finalize = compact

    def _word_of_entries(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_words, dtype=np.int32), np.diff(self.indptr_))

    def _merge(self, parts):
        """Parts are (words, ids, payload, fids) each sorted by (word, id); ids increase across
        parts, so a stable sort by word keeps (word, id, fid) order."""
        counts = [np.bincount(w, minlength=self.n_words).astype(np.int64) for w, *_ in parts]
        indptr = np.zeros(self.n_words + 1, np.int64)
        np.cumsum(np.sum(counts, axis=0), out=indptr[1:])
        total = int(indptr[-1])
        ids = np.empty(total, np.uint32)
        pay = np.empty((total, 2), np.uint64) if self.signed else np.empty(total, np.float32)
        fids = np.empty(total, np.uint32) if self.kind == "smk" else None
        offset = indptr[:-1].copy()  # next free slot of each word
        for k, c in enumerate(counts):
            w, i, p, f = parts[k]
            parts[k] = None  # let merged chunks go as we proceed
            if not len(w):
                continue
            starts = np.zeros(self.n_words + 1, np.int64)
            np.cumsum(c, out=starts[1:])
            dest = offset[w] + (np.arange(len(w), dtype=np.int64) - starts[w])
            ids[dest] = i
            pay[dest] = p
            if fids is not None:
                fids[dest] = f
            offset += c
        self.indptr_, self.ids_, self.payload_, self.fids_ = indptr, ids, pay, fids

    def _df(self) -> np.ndarray:
        """Images per word (int64): the posting-list lengths, or for smk the distinct images."""
        if self.kind == "smk":
            return _distinct_images_per_word(self.indptr_, self.ids_)
        return np.diff(self.indptr_).astype(np.int64)

    def _update_weights(self):
        n = self.n_images_
        idf = _idf(self._df(), n)
        self.idf_ = idf.astype(np.float32)
        if not self.n_entries:
            self.inv_norm_ = np.zeros(n, np.float32)
            return
        w = self._word_of_entries()
        if self.kind == "bow":
            selfsim = np.bincount(self.ids_, weights=(self.payload_ * idf[w]) ** 2, minlength=n)
        elif self.kind == "asmk":
            selfsim = np.bincount(self.ids_, weights=(idf ** 2)[w], minlength=n)
        else:
            lut, ht = self.lut()
            selfsim = _k.self_similarity(self.indptr_, self.ids_, self.payload_,
                                         (idf ** 2).astype(np.float32), lut, ht, n)
        self.inv_norm_ = np.where(selfsim > 0, 1.0 / np.sqrt(np.maximum(selfsim, 1e-30)), 0.0).astype(np.float32)

    @classmethod
    def merge_shards(cls, shards, threads: int = 1) -> "InvertedFile":
        """One index from several with the same parameters; shard k's images follow shard k-1's."""
        shards = list(shards)
        if not shards:
            raise DataError("merge_shards: no shards given")
        p0 = shards[0].get_params()
        for s in shards[1:]:
            if s.get_params() != p0:
                raise DataError(f"merge_shards: parameters differ: {s.get_params()} vs {p0}")
        out = cls(threads=threads, **p0)
        total = sum(s.n_images_ + s._pending_images for s in shards)
        if total > MAX_IMAGES:
            raise DataError(f"merge_shards: {total} images exceed the uint32 image ids of one index")
        parts, base = [], 0
        for s in shards:
            s.compact() if s._pending else None
            parts.append((s._word_of_entries(), (s.ids_.astype(np.int64) + base).astype(np.uint32),
                          np.asarray(s.payload_), None if s.fids_ is None else np.asarray(s.fids_)))
            base += s.n_images_
        out._merge(parts)
        out.n_images_ = base
        out._update_weights()
        return out

    # -- out-of-core building -----------------------------------------------------------------
    @classmethod
    def build_on_disk(cls, path, chunks, n_words: int, kind: str = "asmk", alpha: float = 3.0,
                      tau: float = 0.0, ht: int | None = None, run_bytes: int = 1 << 30,
                      mem_bytes: int = 1 << 30, workdir=None, extra_arrays: dict | None = None,
                      extra_meta: dict | None = None) -> str:
        """Build an index directory at ``path`` without holding it in memory; returns the path.

        ``chunks`` is an iterable (a generator is fine) of ``add`` arguments, one chunk of new
        images each: a tuple ``(words, image_ids, payload, feature_ids, n_images)`` (trailing
        items optional) or a dict of ``add`` keywords; image ids are local to the chunk and the
        chunks follow each other in image order. Chunks are gathered in memory until they hold
        ``run_bytes`` of postings, sorted (the in-memory builder) and written as a run; the runs
        are then merged word range by word range (about ``mem_bytes`` of working memory each)
        straight into the index files, with CRC32s, idf and per-image normalisers computed on the
        way. Peak memory is about 2 x run_bytes + mem_bytes plus one chunk, whatever the index
        size; disk needs the index size twice (runs + index) until the runs are deleted.

        ``extra_arrays`` / ``extra_meta`` (as for ``save``) may also be callables returning the dict,
        called once every chunk has been consumed.

        The result is the same directory, byte for byte in its arrays, as ``add`` of the same
        chunks, ``compact`` and ``save``: ``InvertedFile.load`` opens it. Runs go to a temporary
        directory under ``workdir`` (default: inside the temporary index directory); the index is
        renamed into place only when complete, and on any error (or interruption) the temporary
        directories are removed and nothing is left at ``path``.
        """
        proto = cls(n_words, kind, alpha, tau, ht)
        params = proto.get_params()
        path, tmp = _temp_sibling(path)
        rundir = None
        try:
            rundir = (tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.runs-", dir=workdir)
                      if workdir is not None else os.path.join(tmp, ".runs"))
            os.makedirs(rundir, exist_ok=True)
            runs, cur, held = [], cls(**params), 0
            per_run = max(1, int(run_bytes) // _entry_bytes(kind))

            def flush():
                nonlocal cur, held
                if cur._pending_images or cur._pending:
                    runs.append(cur._write_run(os.path.join(rundir, f"run{len(runs):05d}")))
                cur, held = cls(**params), 0

            for chunk in chunks:
                args = chunk if isinstance(chunk, dict) else dict(zip(
                    ("words", "image_ids", "payload", "feature_ids", "n_images"), chunk))
                cur.add(**args)
                held += len(cur._pending[-1][0])
                if held >= per_run:
                    flush()
                if sum(r.n_images for r in runs) + cur._pending_images > MAX_IMAGES:
                    raise DataError(f"build_on_disk: more than {MAX_IMAGES} images exceed the uint32 "
                                    "image ids of one index; split the collection into shards")
            flush()
            if callable(extra_arrays):  # arrays that exist only once the chunks are consumed
                extra_arrays = extra_arrays()
            if callable(extra_meta):
                extra_meta = extra_meta()
            _merge_runs(tmp, runs, params, mem_bytes, extra_arrays, extra_meta)
            shutil.rmtree(rundir)
            rundir = None
            _commit_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if rundir is not None:
                shutil.rmtree(rundir, ignore_errors=True)
            raise
        return path

    def _write_run(self, prefix) -> "_Run":
        """Sort the pending chunks (as ``compact`` would, without weights) and write them as a run."""
        parts, self._pending = self._pending, []
        self._merge(parts)
        self.n_images_ += self._pending_images
        self._pending_images = 0
        files = {}
        for name, a in (("ids", self.ids_), ("payload", self.payload_), ("fids", self.fids_)):
            if a is not None:
                np.save(f"{prefix}-{name}.npy", a)
                files[name] = _NpyFile(f"{prefix}-{name}.npy")
        return _Run(self.indptr_, files, self.n_images_, self._df())

    @classmethod
    def merge_shards_to_disk(cls, shard_paths, path, mem_bytes: int = 1 << 30, verify: bool = False,
                             extra_arrays: dict | None = None, extra_meta: dict | None = None) -> str:
        """Merge saved index directories (shard k's images follow shard k-1's) into a new index
        directory at ``path`` without loading them: the out-of-core counterpart of
        ``merge_shards``, written atomically, with about ``mem_bytes`` of working memory.
        ``verify`` checks every shard's CRC32s first. Owner extras of the shards are not carried:
        the owner passes the merged ones as ``extra_arrays`` / ``extra_meta`` (dicts, or callables
        returning them, called once the shards are checked; ``asmk.merge_database_shards`` does)."""
        shard_paths = [os.fspath(p) for p in shard_paths]
        if not shard_paths:
            raise DataError("merge_shards_to_disk: no shards given")
        runs, p0 = [], None
        for sp in shard_paths:
            man, arrays = read_index_dir(sp, mmap=True, verify=verify)
            p = man["params"]
            if p0 is None:
                p0 = p
            elif p != p0:
                raise DataError(f"merge_shards_to_disk: parameters of {sp} differ: {p} vs {p0}")
            indptr = np.array(arrays["indptr"], np.int64)
            names = ["ids", "payload"] + (["fids"] if p["kind"] == "smk" else [])
            missing = [k for k in names if k not in arrays]
            if missing:
                raise IndexFormatError(f"{sp}: array {missing[0]!r} missing; rebuild the index")
            if p["kind"] == "smk":  # distinct images per word, in word ranges
                df = np.zeros(len(indptr) - 1, np.int64)
                step = max(1, int(mem_bytes) // 16)
                w0 = 0
                while w0 < len(indptr) - 1:
                    w1 = min(max(int(np.searchsorted(indptr, indptr[w0] + step, side="right")) - 1, w0 + 1),
                             len(indptr) - 1)
                    df[w0:w1] = _distinct_images_per_word(indptr[w0:w1 + 1] - indptr[w0],
                                                          np.asarray(arrays["ids"][indptr[w0]:indptr[w1]]))
                    w0 = w1
            else:
                df = np.diff(indptr)
            del arrays
            files = {k: _NpyFile(os.path.join(sp, man["arrays"][k]["file"])) for k in names}
            runs.append(_Run(indptr, files, int(man["n_images"]), df))
        path, tmp = _temp_sibling(path)
        try:
            if callable(extra_arrays):
                extra_arrays = extra_arrays()
            if callable(extra_meta):
                extra_meta = extra_meta()
            _merge_runs(tmp, runs, p0, mem_bytes, extra_arrays, extra_meta)
            _commit_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    # -- querying -----------------------------------------------------------------------------
    def query_weights(self, q_words) -> np.ndarray:
        """Per query entry weight: idf^2 for signatures (the kernel applies sigma(u))."""
        return (self.idf_[q_words].astype(np.float64) ** 2).astype(np.float32)

    def search(self, queries, top: int | None = 100):
        """Rank the database for a batch of queries.

        queries: list of ``(words, payload)`` per query; bow: payload ignored (words one per
        assigned feature); smk/asmk: payload (n, 2) uint64 signatures, one per word entry.
        A query without features gets all-zero scores (images in id order).
        Returns ids (n_queries, top) int64 and scores (n_queries, top) float32, best first.
        """
        if self._pending:
            self.compact()
        top = self.n_images_ if top is None else min(int(top), self.n_images_)
        q_indptr, q_words, q_sigs, q_weights, q_scale = self.prepare_queries(queries)
        return self.search_prepared(q_indptr, q_words, q_sigs, q_weights, q_scale, top)

    def prepare_queries(self, queries):
        """CSR arrays of a query batch: (indptr, words, signatures or None, weights, scale)."""
        indptr, W, S, V, scale = [0], [], [], [], []
        idf = self.idf_.astype(np.float64)
        lut, ht = self.lut()
        for i, (words, payload) in enumerate(queries):
            w = _as_words(words, self.n_words, f"query {i}")
            if self.kind == "bow":
                u, c = np.unique(w, return_counts=True)
                v = c * idf[u]
                n = float(np.sqrt((v ** 2).sum()))
                W.append(u.astype(np.int32))
                V.append(v * idf[u])  # query tf-idf times the database's idf (its tf is stored)
                scale.append(1.0 / n if n > 0 else 0.0)
            else:
                s = _as_sigs(payload, len(w), f"query {i}")
                v = idf[w] ** 2
                if self.kind == "asmk":
                    if len(np.unique(w)) != len(w):
                        raise DataError(f"query {i}: kind 'asmk' takes one aggregated signature per word")
                    selfsim = v.sum()
                else:
                    o = np.lexsort((np.arange(len(w)), w))
                    w, s, v = w[o], s[o], v[o]
                    selfsim = _query_self_similarity(w, s, idf, lut, ht, self.n_words)
                W.append(w)
                S.append(s)
                V.append(v)
                scale.append(1.0 / np.sqrt(selfsim) if selfsim > 0 else 0.0)
            indptr.append(indptr[-1] + len(W[-1]))
        cat = lambda xs, dt, shape=(0,): np.ascontiguousarray(np.concatenate(xs), dt) if xs else np.zeros(shape, dt)  # noqa: E731
        sigs = cat(S, np.uint64, (0, 2)) if self.signed else None
        return (np.asarray(indptr, np.int64), cat(W, np.int32), sigs, cat(V, np.float32),
                np.asarray(scale, np.float32))

    def search_prepared(self, q_indptr, q_words, q_sigs, q_weights, q_scale, top):
        if self.kind == "bow":
            return _k.search_tf(q_indptr, q_words, q_weights, self.indptr_, self.ids_, self.payload_,
                                self.inv_norm_, q_scale, top, self.threads)
        lut, ht = self.lut()
        return _k.search_sig(q_indptr, q_words, q_sigs, q_weights, self.indptr_, self.ids_,
                             self.payload_, self.inv_norm_, q_scale, lut, ht, top, self.threads)

    def entries_of(self, image: int, words=None):
        """Posting entries of one database image: (positions int64, words int32). ``words``
        restricts the look-up (e.g. the image's own assignments); otherwise every word is probed."""
        if not 0 <= int(image) < self.n_images_:
            raise DataError(f"image {image} outside [0, {self.n_images_})")
        ws = np.arange(self.n_words, dtype=np.int32) if words is None else np.unique(_as_words(words, self.n_words, "words"))
        start, end = _k.locate(self.indptr_, self.ids_, ws, np.full(len(ws), image, np.uint32))
        n = end - start
        pos = np.repeat(start, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
        return pos.astype(np.int64), np.repeat(ws, n)

    # -- persistence --------------------------------------------------------------------------
    def _arrays(self) -> dict:
        arr = dict(indptr=self.indptr_, ids=self.ids_, payload=self.payload_, idf=self.idf_,
                   inv_norm=self.inv_norm_)
        if self.fids_ is not None:
            arr["fids"] = self.fids_
        return arr

    def save(self, path, extra_arrays: dict | None = None, extra_meta: dict | None = None) -> str:
        """Write the index directory atomically (temp dir + rename); returns the path."""
        if self._pending:
            self.compact()
        arrays = self._arrays()
        arrays.update(extra_arrays or {})
        meta = dict(params=self.get_params(), n_images=self.n_images_, n_entries=self.n_entries)
        meta.update(extra_meta or {})
        return write_index_dir(path, arrays, meta)

    @classmethod
    def load(cls, path, threads: int = 1, mmap: bool = True, verify: bool = False) -> "InvertedFile":
        """Open an index directory; arrays are memory-mapped (``mmap=True``). ``verify`` also checks
        CRC32 checksums (reads every byte). Raises IndexFormatError on any damage."""
        man, arrays = read_index_dir(path, mmap=mmap, verify=verify)
        p = man["params"]
        self = cls(threads=threads, **p)
        try:
            self.indptr_, self.ids_, self.payload_ = arrays["indptr"], arrays["ids"], arrays["payload"]
            self.idf_, self.inv_norm_ = arrays["idf"], arrays["inv_norm"]
            self.fids_ = arrays.get("fids")
        except KeyError as exc:
            raise IndexFormatError(f"{path}: array {exc} missing; rebuild the index") from exc
        self.n_images_ = int(man["n_images"])
        self.extra_ = {k: v for k, v in arrays.items() if k not in ("indptr", "ids", "payload", "idf", "inv_norm", "fids")}
        self.manifest_ = man
        e = int(man["n_entries"])
        ok = (len(self.indptr_) == self.n_words + 1 and len(self.ids_) == e and len(self.payload_) == e
              and int(self.indptr_[0]) == 0 and int(self.indptr_[-1]) == e
              and len(self.inv_norm_) == self.n_images_ and len(self.idf_) == self.n_words
              and (self.kind != "smk" or (self.fids_ is not None and len(self.fids_) == e)))
        if not ok:
            raise IndexFormatError(f"{path}: array sizes disagree with manifest.json (corrupt or "
                                   "partially copied index); rebuild it")
        return self

    @staticmethod
    def verify(path) -> dict:
        """Check every array against its CRC32 (IndexFormatError on mismatch); returns the manifest."""
        man, _ = read_index_dir(path, mmap=True, verify=True)
        return man


def _query_self_similarity(w, s, idf, lut, ht, n_words) -> float:
    indptr = np.zeros(n_words + 1, np.int64)
    np.cumsum(np.bincount(w, minlength=n_words), out=indptr[1:])
    ss = _k.self_similarity(indptr, np.zeros(len(w), np.uint32), np.ascontiguousarray(s),
                            (idf ** 2).astype(np.float32), lut, ht, 1)
    return float(ss[0])


def _idf(df, n) -> np.ndarray:
    """idf = log(N / df) in float64 (0 for unused words), the one formula of every build path."""
    df = np.asarray(df).astype(np.float64)
    return np.where(df > 0, np.log(max(n, 1) / np.maximum(df, 1)), 0.0)


def _distinct_images_per_word(indptr, ids, w0: int = 0) -> np.ndarray:
    """Distinct images of each word of a CSR block (words w0.. of len(indptr) - 1), int64."""
    nw = len(indptr) - 1
    if not len(ids):
        return np.zeros(nw, np.int64)
    w = np.repeat(np.arange(nw, dtype=np.int32), np.diff(np.asarray(indptr)))
    ids = np.asarray(ids)
    new_img = np.ones(len(ids), bool)
    new_img[1:] = (w[1:] != w[:-1]) | (ids[1:] != ids[:-1])
    return np.bincount(w[new_img], minlength=nw).astype(np.int64)


# -- out-of-core building: sorted runs on disk, merged word range by word range -----------------
class _NpyFile:
    """An .npy array read in slices with plain file reads (no memory map, so the pages read stay
    out of the process's resident set)."""

    def __init__(self, fn):
        with open(fn, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(fh)
            self.offset = fh.tell()
        if fortran or dtype.hasobject:
            raise IndexFormatError(f"{fn}: not a C-ordered plain array")
        self.fn, self.dtype, self.shape = fn, dtype, tuple(shape)
        self.row = int(np.prod(self.shape[1:], dtype=np.int64))

    def read(self, start: int, n: int) -> np.ndarray:
        out = np.empty((n,) + tuple(self.shape[1:]), self.dtype)
        if n == 0:
            return out
        with open(self.fn, "rb") as fh:
            fh.seek(self.offset + start * self.row * self.dtype.itemsize)
            got = fh.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != out.nbytes:
            raise IndexFormatError(f"{self.fn}: truncated (wanted {out.nbytes} bytes at entry {start}, got {got})")
        return out


class _NpyWriter:
    """Sequential writer of one .npy file of known dtype and shape, with a running CRC32."""

    def __init__(self, fn, dtype, shape):
        self.fn, self.dtype, self.shape = fn, np.dtype(dtype), tuple(int(x) for x in shape)
        self.fh = open(fn, "wb")
        np.lib.format.write_array_header_1_0(self.fh, dict(descr=np.lib.format.dtype_to_descr(self.dtype),
                                                           fortran_order=False, shape=self.shape))
        self.crc, self.rows = 0, 0

    def write(self, a: np.ndarray):
        a = np.ascontiguousarray(a, self.dtype)
        b = a.reshape(-1).view(np.uint8)
        self.crc = zlib.crc32(b, self.crc)
        self.fh.write(b)
        self.rows += len(a)

    def close(self) -> dict:
        self.fh.close()
        if self.rows != self.shape[0]:
            raise RuntimeError(f"{self.fn}: wrote {self.rows} rows of {self.shape[0]}")
        return dict(file=os.path.basename(self.fn), dtype=self.dtype.str, shape=list(self.shape),
                    crc32=self.crc, bytes=os.path.getsize(self.fn))


class _Run:
    """One sorted run (a shard): its CSR word pointers in memory, its entry arrays on disk."""

    def __init__(self, indptr, files: dict, n_images: int, df):
        self.indptr = np.asarray(indptr, np.int64)
        self.files = files  # name -> _NpyFile: ids, payload, (fids)
        self.n_images = int(n_images)
        self.df = np.asarray(df, np.int64)


def _entry_bytes(kind) -> int:
    return 8 if kind == "bow" else (24 if kind == "smk" else 20)


def _merge_runs(tmp, runs, params: dict, mem_bytes: int, extra_arrays=None, extra_meta=None) -> None:
    """Write the index of ``runs`` (in image order) into directory ``tmp``: CSR arrays filled word
    range by word range (each range gathers every run's contiguous slice for it), CRC32s and the
    per-image self-similarities accumulated as the ranges stream by, in the same order as the
    in-memory build so every array comes out bit for bit the same."""
    n_words, kind = params["n_words"], params["kind"]
    n_img = sum(r.n_images for r in runs)
    if n_img > MAX_IMAGES:
        raise DataError(f"{n_img} images exceed the uint32 image ids of one index (at most {MAX_IMAGES})")
    counts = np.zeros(n_words, np.int64)
    df = np.zeros(n_words, np.int64)
    for r in runs:
        if len(r.indptr) != n_words + 1:
            raise DataError(f"run/shard with {len(r.indptr) - 1} words merged into an index of {n_words}")
        counts += np.diff(r.indptr)
        df += r.df
    indptr = np.zeros(n_words + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    total = int(indptr[-1])
    idf = _idf(df, n_img)
    idf2 = idf ** 2
    lut, ht = selectivity_lut(params["alpha"], params["tau"], params["ht"])
    selfsim = np.zeros(n_img, np.float64)
    names = ["ids", "payload"] + (["fids"] if kind == "smk" else [])
    dtypes = dict(ids=np.uint32, payload=np.float32 if kind == "bow" else np.uint64, fids=np.uint32)
    shapes = dict(ids=(total,), payload=(total,) if kind == "bow" else (total, 2), fids=(total,))
    writers = {k: _NpyWriter(os.path.join(tmp, f"{k}.npy"), dtypes[k], shapes[k]) for k in names}
    bases = np.cumsum([0] + [r.n_images for r in runs])[:-1]
    # word ranges of at most ~mem_bytes of working memory (~64 bytes per entry: arrays + indices)
    per_range = max(1, int(mem_bytes) // 64)
    w0 = 0
    try:
        while w0 < n_words:
            w1 = int(np.searchsorted(indptr, indptr[w0] + per_range, side="right")) - 1
            w1 = min(max(w1, w0 + 1), n_words)
            lo, hi = int(indptr[w0]), int(indptr[w1])
            bufs = {k: np.empty((hi - lo,) + shapes[k][1:], dtypes[k]) for k in names}
            nxt = indptr[w0:w1] - lo  # next free slot of each word in the buffers
            for r, base in zip(runs, bases):
                a, b = int(r.indptr[w0]), int(r.indptr[w1])
                if a == b:
                    continue
                c = np.diff(r.indptr[w0:w1 + 1])
                wl = np.repeat(np.arange(w1 - w0, dtype=np.int64), c)
                dest = nxt[wl] + (np.arange(a, b, dtype=np.int64) - r.indptr[w0:w1][wl])
                del wl
                ids = r.files["ids"].read(a, b - a)
                if base:
                    np.add(ids, np.uint32(base), out=ids)
                bufs["ids"][dest] = ids
                del ids
                for k in names[1:]:
                    bufs[k][dest] = r.files[k].read(a, b - a)
                del dest
                nxt += c
            if hi > lo:
                w = np.repeat(np.arange(w0, w1, dtype=np.int64), counts[w0:w1])
                if kind == "bow":
                    np.add.at(selfsim, bufs["ids"], (bufs["payload"] * idf[w]) ** 2)
                elif kind == "asmk":
                    np.add.at(selfsim, bufs["ids"], idf2[w])
                else:
                    _k.self_similarity(indptr[w0:w1 + 1] - lo, bufs["ids"], bufs["payload"],
                                       idf2[w0:w1].astype(np.float32), lut, ht, n_img, out=selfsim)
                del w
            for k in names:
                writers[k].write(bufs[k])
            del bufs
            w0 = w1
        done = {k: writers.pop(k).close() for k in names}
    finally:
        for wr in writers.values():
            wr.fh.close()
    inv_norm = np.where(selfsim > 0, 1.0 / np.sqrt(np.maximum(selfsim, 1e-30)), 0.0).astype(np.float32)
    entries = dict(indptr=_save_array(tmp, "indptr", indptr), ids=done["ids"], payload=done["payload"],
                   idf=_save_array(tmp, "idf", idf.astype(np.float32)),
                   inv_norm=_save_array(tmp, "inv_norm", inv_norm))
    if "fids" in done:
        entries["fids"] = done["fids"]
    for name, a in (extra_arrays or {}).items():
        entries[name] = _save_array(tmp, name, a)
    meta = dict(params=dict(params), n_images=n_img, n_entries=total)
    meta.update(extra_meta or {})
    _write_manifest(tmp, entries, meta)


# -- the on-disk directory ---------------------------------------------------------------------
def _crc32(a: np.ndarray, chunk=1 << 24) -> int:
    b = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    c = 0
    for i in range(0, len(b), chunk):
        c = zlib.crc32(b[i:i + chunk], c)
    return c


def write_index_dir(path, arrays: dict, meta: dict) -> str:
    """Write ``arrays`` (.npy each) and manifest.json into a temp sibling, then rename into place.
    An existing directory at ``path`` is replaced only once the new one is complete."""
    path, tmp = _temp_sibling(path)
    try:
        entries = {}
        for name, a in arrays.items():
            entries[name] = _save_array(tmp, name, a)
        _write_manifest(tmp, entries, meta)
        _commit_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _temp_sibling(path) -> tuple[str, str]:
    """(absolute path, a new empty temporary directory next to it) for an atomic directory write."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    return path, tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)


def _save_array(tmp, name, a) -> dict:
    a = np.asarray(a)
    fn = f"{name}.npy"
    np.save(os.path.join(tmp, fn), a)
    return dict(file=fn, dtype=a.dtype.str, shape=list(a.shape), crc32=_crc32(a),
                bytes=os.path.getsize(os.path.join(tmp, fn)))


def _write_manifest(tmp, entries: dict, meta: dict):
    man = dict(format=FORMAT, version=VERSION, arrays=entries, **meta)
    with open(os.path.join(tmp, "manifest.json"), "w") as fh:
        json.dump(man, fh, indent=1)


def _commit_dir(tmp, path):
    """Rename the complete directory ``tmp`` onto ``path`` (an existing one is moved aside first)."""
    parent = os.path.dirname(path)
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
        os.replace(path, os.path.join(old, "index"))
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(path) -> dict:
    path = os.fspath(path)
    mf = os.path.join(path, "manifest.json")
    try:
        with open(mf) as fh:
            man = json.load(fh)
    except FileNotFoundError as exc:
        raise IndexFormatError(f"{path}: no manifest.json: not an index directory, or an interrupted "
                               "copy; build one with `bowr index build`") from exc
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{mf}: unreadable or truncated manifest ({exc}); rebuild the index") from exc
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise IndexFormatError(f"{mf}: not a {FORMAT} manifest (format {man.get('format') if isinstance(man, dict) else None!r})")
    if man.get("version") != VERSION:
        raise IndexFormatError(f"{path}: index format version {man.get('version')} but this bowretrieval "
                               f"reads version {VERSION}; rebuild the index with this version")
    return man


def read_index_dir(path, mmap: bool = True, verify: bool = False):
    """(manifest, {name: array}) with structural checks; CRC32 checks when ``verify``."""
    man = read_manifest(path)
    arrays = {}
    for name, e in man.get("arrays", {}).items():
        fn = os.path.join(os.fspath(path), e["file"])
        if not os.path.exists(fn):
            raise IndexFormatError(f"{fn}: missing array file; the index is incomplete, rebuild it")
        if os.path.getsize(fn) != e["bytes"]:
            raise IndexFormatError(f"{fn}: {os.path.getsize(fn)} bytes but the manifest says {e['bytes']} "
                                   "(truncated or overwritten); rebuild the index")
        try:
            a = np.load(fn, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise IndexFormatError(f"{fn}: unreadable array ({exc}); rebuild the index") from exc
        if a.dtype.str != e["dtype"] or list(a.shape) != e["shape"]:
            raise IndexFormatError(f"{fn}: {a.dtype.str} {list(a.shape)} but the manifest says "
                                   f"{e['dtype']} {e['shape']}; rebuild the index")
        if verify and _crc32(a) != e["crc32"]:
            raise IndexFormatError(f"{fn}: CRC32 checksum mismatch (corrupted on disk); rebuild the index")
        arrays[name] = a
    return man, arrays
