"""Sharded extraction, assignment and indexing as Dask task graphs (optional extra ``[dask]``).

Every function builds one task per shard (``dask.delayed``) and runs the graph with
``dask.compute(..., scheduler=scheduler)``: ``None`` takes dask's current default, which is a
``distributed.Client`` when one is active, else the local threads scheduler; ``"threads"``,
``"processes"`` and ``"synchronous"`` pick a local one. The same code therefore runs on one
machine and, unchanged, on a Dask cluster, as long as every path given lives on a filesystem all
workers see. Each task writes ordinary artefacts with the single-machine code:

* ``extract_shards``: images -> ``shard-00000.h5`` ... (resumable feature stores, ``extract_to_store``)
* ``assign_shards``: stores + vocabulary -> ``<store>.words.npz`` (per-feature words, one file per shard)
* ``index_shards``: stores + vocabulary -> per-shard ASMK*/SMK*/HQE databases (``asmk.build_on_disk``)
  merged into one index directory (``asmk.merge_database_shards``) that ``bowr search`` opens.

Images are sorted by name and split into contiguous shards, so the merged index lists them in the
order ``bowr index build`` gives one store of all of them, and its arrays are byte for byte the same.
See docs/cluster.md.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict

import numpy as np

from .errors import BowRetrievalError, DataError

SHARD_FORMAT = "shard-{:05d}.h5"


def require_dask():
    """The ``dask`` module, or a BowRetrievalError that says how to install it."""
    try:
        import dask
    except ImportError as exc:
        raise BowRetrievalError("bowretrieval.cluster needs dask: pip install 'bowretrieval[dask]' "
                                "(and 'distributed' to run on a Dask cluster)") from exc
    return dask


def _compute(tasks, scheduler, compute_kwargs):
    dask = require_dask()
    return list(dask.compute(*tasks, scheduler=scheduler, **compute_kwargs))


def _delayed(fn):
    return require_dask().delayed(fn, pure=False)


# -- extraction ---------------------------------------------------------------------------------
def split_jobs(jobs, n_shards: int) -> list:
    """Jobs sorted by name and cut into at most ``n_shards`` contiguous, nearly equal lists."""
    if n_shards < 1:
        raise DataError(f"n_shards must be >= 1, got {n_shards}")
    jobs = sorted(jobs, key=lambda j: j.name)
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        dup = sorted({n for i, n in enumerate(names) if i and names[i - 1] == n})[:3]
        raise DataError(f"image name(s) {dup} given more than once")
    bounds = np.linspace(0, len(jobs), min(n_shards, len(jobs)) + 1).round().astype(int)
    return [jobs[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _extract_shard(jobs, store_path, extractor, params, max_side, workers, retry_failed):
    """One task: extract ``jobs`` into ``store_path`` (a resumable store that must hold nothing else)."""
    from .extract import extract_to_store
    from .featurestore import FeatureStore

    if os.path.exists(store_path):
        with FeatureStore(store_path) as st:
            other = (set(st.names()) | set(st.failed())) - {j.name for j in jobs}
        if other:
            raise DataError(f"{store_path}: holds images of another shard split ({sorted(other)[:3]} ...); "
                            "re-run with the same images and number of shards, or use a new folder")
    return extract_to_store(jobs, store_path, extractor, params, max_side, workers, retry_failed=retry_failed,
                            progress=False)


def extract_shards(jobs, out_dir, n_shards: int, extractor: str = "sift", params: dict | None = None,
                   max_side: int | None = 1024, workers_per_shard: int = 1, retry_failed: bool = False,
                   scheduler=None, **compute_kwargs) -> list:
    """Extract ``jobs`` (``extract.ExtractJob`` list) into ``<out_dir>/shard-00000.h5`` ..., one task
    per shard; returns the shards' ``ExtractReport`` (store path, extracted, skipped, failed and
    featureless images with reasons). Resumable like ``extract_to_store``: re-running with the
    same jobs and ``n_shards`` skips the images already done. ``compute_kwargs`` go to
    ``dask.compute`` (e.g. ``num_workers`` for the local schedulers)."""
    from .features import get_extractor

    params = dict(params or {})
    get_extractor(extractor, **params)  # fail early on a bad name or parameter, before any task
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    parts = split_jobs(jobs, n_shards)
    _record_split(out_dir, parts)
    tasks = [_delayed(_extract_shard)(part, os.path.join(out_dir, SHARD_FORMAT.format(i)), extractor,
                                      params, max_side, workers_per_shard, retry_failed)
             for i, part in enumerate(parts)]
    return _compute(tasks, scheduler, compute_kwargs)


def _record_split(out_dir, parts):
    """Write ``<out_dir>/shards.json`` (per shard: image count and a digest of the names), or refuse,
    before any task runs, a split that differs from the one recorded: a resumed run must put every
    image in the shard it went to before, or an image could end up in two shards."""
    import hashlib

    split = dict(format="bowretrieval.shards/1", shards=[
        dict(store=SHARD_FORMAT.format(i), images=len(p),
             names_sha1=hashlib.sha1("\n".join(j.name for j in p).encode()).hexdigest()) for i, p in enumerate(parts)])
    fn = os.path.join(out_dir, "shards.json")
    if os.path.exists(fn):
        with open(fn) as fh:
            old = json.load(fh)
        if old != split:
            raise DataError(f"{out_dir}: its shard stores hold another shard split ({len(old.get('shards', []))} "
                            f"shards, see shards.json) than these {sum(len(p) for p in parts)} images in "
                            f"{len(parts)} shards; re-run with the same images and number of shards, or use a "
                            "new folder")
        return
    with open(fn + ".tmp", "w") as fh:
        json.dump(split, fh, indent=1)
    os.replace(fn + ".tmp", fn)


def shard_stores(path) -> list:
    """The shard stores of a folder written by ``extract_shards`` (sorted), or ``[path]`` for a file."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return [path]
    stores = sorted(os.path.join(path, f) for f in os.listdir(path) if f.startswith("shard-") and f.endswith(".h5"))
    if not stores:
        raise DataError(f"{path}: no shard-*.h5 feature stores; run `bowr cluster extract` first")
    return stores


def _vocab_config(vocab_path, vcfg=None):
    """The vocabulary section: ``vcfg``, else the ``<vocab>.yaml`` written next to it, else defaults."""
    from .config import VocabConfig, load_config

    if vcfg is not None:
        return vcfg
    vyaml = os.path.splitext(os.fspath(vocab_path))[0] + ".yaml"
    return load_config(vyaml, VocabConfig) if os.path.exists(vyaml) else VocabConfig()


# -- assignment ---------------------------------------------------------------------------------
def _assign_shard(store_path, vocab_path, out_path, k, descriptor, beta, batch_features=200_000):
    """One task: load the vocabulary once, assign every image of the store, write one words file."""
    from .featurestore import FeatureStore
    from .npzio import json_array, save_npz_atomic
    from .vocabulary import Vocabulary

    voc = Vocabulary.load(vocab_path)
    words, counts, batch = [], [], []

    def flush():
        if batch:
            X = np.concatenate(batch)
            words.append(voc.assign(X, k) if len(X) else np.zeros((0, k), np.int32))
            batch.clear()

    with FeatureStore(store_path) as st:
        names = st.names()
        for n in names:
            d = st.descriptors(n, descriptor, beta=beta)
            if batch and sum(len(b) for b in batch) + len(d) > batch_features:
                flush()
            batch.append(d)
            counts.append(len(d))
        flush()
    W = np.concatenate(words).astype(np.int32) if words else np.zeros((0, k), np.int32)
    indptr = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
    save_npz_atomic(out_path, words=W, indptr=indptr, names=json_array(names))
    return out_path


def assign_shards(stores, vocab_path, out_dir=None, k: int = 1, vcfg=None, scheduler=None, **compute_kwargs) -> list:
    """Assign every feature of each shard store to its ``k`` nearest words of the vocabulary, one
    task per shard; writes ``<out_dir or the store's folder>/<store name>.words.npz`` (``words``
    (n_features, k) int32, ``indptr`` (n_images + 1) int64: image i's features are rows
    indptr[i]:indptr[i+1], ``names`` JSON in store order) and returns the file paths. Descriptor
    variant and beta: ``vcfg`` (a ``config.VocabConfig``), else the vocabulary's ``.yaml``."""
    vcfg = _vocab_config(vocab_path, vcfg)
    vocab_path = os.path.abspath(os.fspath(vocab_path))
    tasks = []
    for i, sp in enumerate(stores):
        sp = os.path.abspath(os.fspath(sp))
        folder = os.path.abspath(os.fspath(out_dir)) if out_dir else os.path.dirname(sp)
        os.makedirs(folder, exist_ok=True)
        out = os.path.join(folder, os.path.splitext(os.path.basename(sp))[0] + ".words.npz")
        tasks.append(_delayed(_assign_shard)(sp, vocab_path, out, int(k), vcfg.descriptor, vcfg.beta))
    return _compute(tasks, scheduler, compute_kwargs)


# -- indexing -----------------------------------------------------------------------------------
def _index_shard(store_path, vocab_path, out, scfg, vcfg, mem_bytes):
    """One task: an ASMK*/SMK*/HQE database of one shard store (kept if already built the same way).
    Returns (out or None for a store without images, extractor settings)."""
    from .asmk import Codebook, MethodParams, build_on_disk
    from .featurestore import FeatureStore
    from .invfile import _crc32, read_manifest
    from .vocabulary import Vocabulary

    voc = Vocabulary.load(vocab_path)
    with FeatureStore(store_path) as st:
        names = st.names()
        settings = (st.extractor, st.extractor_params, int(st._h5.attrs.get("max_side", 0)))
        if not names:
            return None, settings
        mp = asdict(MethodParams(method=scfg.method, alpha=scfg.alpha, tau=scfg.tau, query_ma=scfg.query_ma,
                                 db_ma=scfg.db_ma))
        try:  # resume: a shard database of the same images, method and vocabulary is reused
            man = read_manifest(out)
            if (man.get("names") == names and man.get("method") == mp
                    and man["arrays"]["centroids"]["crc32"] == _crc32(voc.centroids_)):
                return out, settings
        except (BowRetrievalError, KeyError, TypeError):
            pass
        descs = (st.descriptors(n, vcfg.descriptor, beta=vcfg.beta) for n in names)
        build_on_disk(Codebook.from_vocabulary(voc), descs, out, scfg.method, names=names, threads=scfg.threads,
                      n_images=len(names), mem_bytes=mem_bytes, alpha=scfg.alpha, tau=scfg.tau,
                      query_ma=scfg.query_ma, db_ma=scfg.db_ma)
    return out, settings


def _merge_index(results, vocab_path, out_dir, cfg, image_root, keep_shards, mem_bytes):
    """The final task: merge the shard databases into ``<out_dir>/asmk`` and write the index directory."""
    from .asmk import merge_database_shards
    from .config import save_config
    from .invfile import read_manifest
    from .pipeline import save_index_dir
    from .vocabulary import Vocabulary

    results = [r for r in results if r[0] is not None]
    if not results:
        raise DataError("index_shards: the shard stores hold no images; extract them first")
    settings = {json.dumps(s, sort_keys=True) for _, s in results}
    if len(settings) > 1:
        raise DataError(f"index_shards: the shard stores were extracted with different settings: {sorted(settings)}")
    dirs = [d for d, _ in results]
    merge_database_shards(dirs, os.path.join(out_dir, "asmk"), mem_bytes=mem_bytes)
    names = read_manifest(os.path.join(out_dir, "asmk"))["names"]
    cfg.extract.extractor, cfg.extract.params, cfg.extract.max_side = results[0][1]
    save_index_dir(out_dir, None, names, Vocabulary.load(vocab_path), cfg.search, cfg.vocab, cfg.extract, image_root)
    save_config(cfg, os.path.join(out_dir, "config.yaml"))
    if not keep_shards:
        shutil.rmtree(os.path.join(out_dir, "shards"), ignore_errors=True)
    return out_dir


def index_shards(stores, vocab_path, out_dir, cfg=None, image_root=None, keep_shards: bool = False,
                 mem_bytes: int = 1 << 30, scheduler=None, **compute_kwargs) -> str:
    """Index shard stores (in order; ``shard_stores(folder)`` lists a folder's) with the vocabulary:
    one task per shard builds ``<out_dir>/shards/shard-0000k/`` with ``asmk.build_on_disk``, a
    final task merges them into ``<out_dir>/asmk`` (``asmk.merge_database_shards``) and writes
    the rest of an index directory (names.json, vocab.npz, config.yaml) as ``bowr index build``
    does; the shard databases are then deleted unless ``keep_shards`` (re-running reuses those
    kept). ``cfg``: an ``ExperimentConfig`` (search.method smk, asmk or hqe; vocab section from
    the vocabulary's .yaml when present). Returns ``out_dir``."""
    from .config import ExperimentConfig

    cfg = cfg or ExperimentConfig()
    cfg.vocab = _vocab_config(vocab_path, None)
    if cfg.search.method not in ("smk", "asmk", "hqe"):
        raise DataError(f"index_shards builds smk, asmk or hqe databases, not {cfg.search.method!r} "
                        "(a BoW index keeps every feature's word in memory); pass --method asmk "
                        "(search.method)")
    stores = [os.path.abspath(os.fspath(s)) for s in stores]
    if not stores:
        raise DataError("index_shards: no shard stores given")
    vocab_path = os.path.abspath(os.fspath(vocab_path))
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(os.path.join(out_dir, "shards"), exist_ok=True)
    parts = [_delayed(_index_shard)(sp, vocab_path, os.path.join(out_dir, "shards", f"shard-{i:05d}"),
                                    cfg.search, cfg.vocab, mem_bytes)
             for i, sp in enumerate(stores)]
    final = _delayed(_merge_index)(parts, vocab_path, out_dir, cfg, image_root, keep_shards, mem_bytes)
    return _compute([final], scheduler, compute_kwargs)[0]
