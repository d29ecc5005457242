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

    def _update_weights(self):
        n = self.n_images_
        df = np.diff(self.indptr_).astype(np.float64)
        if self.kind == "smk" and self.n_entries:  # df counts images, not features
            w = self._word_of_entries()
            new_img = np.ones(self.n_entries, bool)
            new_img[1:] = (w[1:] != w[:-1]) | (self.ids_[1:] != self.ids_[:-1])
            df = np.bincount(w[new_img], minlength=self.n_words).astype(np.float64)
        idf = np.where(df > 0, np.log(max(n, 1) / np.maximum(df, 1)), 0.0)
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
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        entries = {}
        for name, a in arrays.items():
            a = np.asarray(a)
            fn = f"{name}.npy"
            np.save(os.path.join(tmp, fn), a)
            entries[name] = dict(file=fn, dtype=a.dtype.str, shape=list(a.shape), crc32=_crc32(a),
                                 bytes=os.path.getsize(os.path.join(tmp, fn)))
        man = dict(format=FORMAT, version=VERSION, arrays=entries, **meta)
        with open(os.path.join(tmp, "manifest.json"), "w") as fh:
            json.dump(man, fh, indent=1)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.replace(path, os.path.join(old, "index"))
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


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
