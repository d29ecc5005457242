"""The baseline experiment as stages that read one artefact and write the next (hloc style):

    images -> features/*.h5 -> vocab_*.npz -> index/ -> ranks -> results.json

Every stage skips work whose artefact already exists with the same settings, so re-running an
experiment after a crash, or with another search method, reuses what was computed.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
from tqdm.auto import tqdm

from .bow import BowIndex
from .config import ExperimentConfig, ExtractConfig, SearchConfig, VocabConfig, save_config, to_dict
from .errors import BowRetrievalError, ConfigError, DataError, FeatureStoreError
from .extract import ExtractJob, extract_to_store, jobs_from_paths
from .featurestore import FeatureStore
from .imageio import list_images
from .npzio import save_npz_atomic
from .revisited import RevisitedDataset, evaluate, format_table
from .vocabulary import Vocabulary


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def store_name(prefix: str, ecfg: ExtractConfig) -> str:
    return f"{prefix}-{ecfg.extractor}-{_digest([ecfg.params, ecfg.max_side])}.h5"


def extract_stage(jobs, store_path, ecfg: ExtractConfig, progress=True):
    return extract_to_store(jobs, store_path, ecfg.extractor, ecfg.params, ecfg.max_side or None,
                            ecfg.workers, progress=progress)


def read_descriptors(store: FeatureStore, names, variant, beta=0.5, progress=False, desc="read"):
    out = []
    for n in tqdm(names, desc=desc, unit="img", disable=not progress):
        out.append(store.descriptors(n, variant, beta=beta) if n in store else np.zeros((0, 128), np.float32))
    return out


def vocab_stage(train_store_path, vcfg: VocabConfig, out_path, progress=True) -> Vocabulary:
    """Learn a vocabulary on every image of a training store (subsampled to max_descriptors)."""
    if os.path.exists(out_path):
        return Vocabulary.load(out_path)
    with FeatureStore(train_store_path) as st:
        names = st.names()
        descs = read_descriptors(st, names, vcfg.descriptor, vcfg.beta, progress, "load training features")
    X = np.concatenate(descs) if descs else np.zeros((0, 128), np.float32)
    if len(X) > vcfg.max_descriptors:
        rng = np.random.default_rng(vcfg.seed)
        X = X[np.sort(rng.choice(len(X), vcfg.max_descriptors, replace=False))]
    voc = Vocabulary(vcfg.size, vcfg.iterations, vcfg.max_points_per_centroid, vcfg.seed)
    if progress:
        print(f"k-means: {len(X)} descriptors from {len(names)} images -> {vcfg.size} words ...", flush=True)
    voc.fit(X)
    voc.save(out_path)
    save_config(vcfg, os.path.splitext(out_path)[0] + ".yaml")
    return voc


def assign_all(voc: Vocabulary, descs, k=1, progress=True, desc="assign"):
    return [voc.assign(d, k) if len(d) else np.zeros((0, k), np.int32)
            for d in tqdm(descs, desc=desc, unit="img", disable=not progress)]


def index_stage(db_store_path, names, voc: Vocabulary, scfg: SearchConfig, vcfg: VocabConfig,
                out_dir=None, progress=True, extract_cfg: ExtractConfig | None = None, image_root=None) -> BowIndex:
    from .asmk import METHODS

    if scfg.method not in METHODS:
        raise DataError(f"search.method {scfg.method!r} is not one of {', '.join(METHODS)}")
    if scfg.out_of_core:
        if scfg.method == "bow":
            raise ConfigError("search.out_of_core needs search.method smk, asmk or hqe (the bow index keeps "
                              "every feature's word in memory for verification)")
        if not out_dir:
            raise ConfigError("search.out_of_core needs an index directory to build into")
        from .asmk import Codebook, Database, build_on_disk

        os.makedirs(out_dir, exist_ok=True)
        with FeatureStore(db_store_path) as st:
            descs = (st.descriptors(n, vcfg.descriptor, beta=vcfg.beta) if n in st else np.zeros((0, 128), np.float32)
                     for n in names)
            build_on_disk(Codebook.from_vocabulary(voc), descs, os.path.join(out_dir, "asmk"), scfg.method,
                          names=names, threads=scfg.threads, progress=progress, n_images=len(names),
                          alpha=scfg.alpha, tau=scfg.tau, query_ma=scfg.query_ma, db_ma=scfg.db_ma)
        index = Database.load(os.path.join(out_dir, "asmk"), threads=scfg.threads)
        _save_index_meta(out_dir, None, names, voc, scfg, vcfg, extract_cfg, image_root, db_store_path)
        return index
    with FeatureStore(db_store_path) as st:
        descs = read_descriptors(st, names, vcfg.descriptor, vcfg.beta, progress, "load database features")
    if scfg.method == "bow":
        words = assign_all(voc, descs, scfg.db_ma, progress, "assign database")
        index = BowIndex(voc.n_words, scfg.threads).fit(words)
        index.feature_words_ = words  # per-feature words: tentative matches for spatial verification
    else:
        from .asmk import Codebook, build

        index = build(Codebook.from_vocabulary(voc), descs, scfg.method, names=names, threads=scfg.threads,
                      progress=progress, alpha=scfg.alpha, tau=scfg.tau, query_ma=scfg.query_ma, db_ma=scfg.db_ma)
    if out_dir:
        _save_index_meta(out_dir, index, names, voc, scfg, vcfg, extract_cfg, image_root, db_store_path)
    return index


def _save_index_meta(out_dir, index, names, voc, scfg, vcfg, extract_cfg, image_root, db_store_path):
    if extract_cfg is None:
        with FeatureStore(db_store_path) as st:
            extract_cfg = ExtractConfig(extractor=st.extractor, params=st.extractor_params,
                                        max_side=int(st._h5.attrs.get("max_side", 0)))
    save_index_dir(out_dir, index, names, voc, scfg, vcfg, extract_cfg, image_root, db_store_path)


def save_index_dir(out_dir, index: BowIndex, names, voc: Vocabulary, scfg, vcfg, extract_cfg=None, image_root=None,
                   features=None):
    """An index directory: bow/ or asmk/ (versioned posting lists), names.json (image names, the search
    and vocabulary settings, and the extractor settings queries must be described with), vocab.npz.
    ``index`` None: the posting lists are already there (built on disk)."""
    os.makedirs(out_dir, exist_ok=True)
    if index is not None:
        index.save(os.path.join(out_dir, "bow" if isinstance(index, BowIndex) else "asmk"))
    voc.save(os.path.join(out_dir, "vocab.npz"))
    tmp = os.path.join(out_dir, "names.json.tmp")
    meta = {"names": list(names), "search": to_dict(scfg), "vocab": to_dict(vcfg),
            "extract": to_dict(extract_cfg) if extract_cfg is not None else None,
            "image_root": os.path.abspath(image_root) if image_root else None,
            "features": os.path.abspath(features) if features else None}
    if getattr(index, "feature_words_", None) is not None:  # BoW: keep the words for verification
        fw = [np.asarray(w, np.int32).reshape(len(w), -1) for w in index.feature_words_]
        save_npz_atomic(os.path.join(out_dir, "words.npz"),
                        words=np.concatenate(fw) if fw else np.zeros((0, 1), np.int32),
                        indptr=np.concatenate([[0], np.cumsum([len(w) for w in fw])]).astype(np.int64))
    with open(tmp, "w") as fh:
        json.dump(meta, fh)
    os.replace(tmp, os.path.join(out_dir, "names.json"))


def describe_queries(paths, meta: dict, bbox=None) -> list:
    """Describe query images exactly like the indexed database (extractor settings from the index
    directory's names.json), cropped to ``bbox``; returns descriptors in the vocabulary's variant."""
    from .descriptors import transform
    from .extract import _extract_one
    from .features import get_extractor

    ecfg = meta.get("extract") or {}
    if not ecfg:
        raise DataError("the index directory records no extractor settings; rebuild it with `bowr index build`")
    ex = get_extractor(ecfg["extractor"], **(ecfg.get("params") or {}))
    vcfg = meta["vocab"]
    out = []
    for i, p in enumerate(paths):
        name, feats, info, _ = _extract_one(ExtractJob(f"q{i}", os.fspath(p), bbox), ecfg.get("max_side") or None, ex)
        if feats is None:
            raise DataError(f"query {p}: {info}")
        d = feats.descriptors
        if d.ndim == 3:
            d = d[:, d.shape[1] // 2, :]
        out.append(transform(d, vcfg["descriptor"], vcfg["beta"]) if len(d) else np.zeros((0, d.shape[-1]), np.float32))
    return out


def load_index_dir(path, threads=1, with_meta=False):
    from .config import from_dict

    try:
        with open(os.path.join(path, "names.json")) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        from .errors import IndexFormatError

        raise IndexFormatError(f"{path}: not an index directory (names.json unreadable: {exc}); "
                               "build one with `bowr index build`") from exc
    if meta["search"].get("method", "bow") == "bow":
        index = BowIndex.load(os.path.join(path, "bow"), threads=threads)
        if os.path.exists(os.path.join(path, "words.npz")):
            with np.load(os.path.join(path, "words.npz")) as z:
                w, p = z["words"], z["indptr"]
            index.feature_words_ = [w[p[i]:p[i + 1]] for i in range(len(p) - 1)]
    else:
        from .asmk import Database

        index = Database.load(os.path.join(path, "asmk"), threads=threads)
    voc = Vocabulary.load(os.path.join(path, "vocab.npz"))
    out = (index, meta["names"], voc, from_dict(SearchConfig, meta["search"]), from_dict(VocabConfig, meta["vocab"]))
    return out + (meta,) if with_meta else out


def query_stage(index: BowIndex, voc: Vocabulary, query_descs, scfg: SearchConfig, progress=True):
    """Full rankings (n_db, n_queries) as revisitop expects, and seconds per query (assign + score)."""
    t0 = time.time()
    if not isinstance(index, BowIndex):  # an asmk.Database (smk, asmk, hqe)
        res = index.query(query_descs, top=None)
        return res.ids.T.copy(), res.seconds_per_query
    words = assign_all(voc, query_descs, scfg.query_ma or 1, progress, "assign queries")
    ranks, _ = index.search(words)
    dt = (time.time() - t0) / max(len(query_descs), 1)
    return ranks.T.copy(), dt


def query_jobs(ds: RevisitedDataset) -> list:
    """Queries are cropped to their bounding box; keyed by position (a photo may give several crops)."""
    return [ExtractJob(f"{i:05d}:{n}", ds.image_path(n), tuple(ds.gnd[i]["bbx"]) if ds.gnd[i]["bbx"] else None)
            for i, n in enumerate(ds.qimlist)]


def run_experiment(dataset_root, train_images, workdir, cfg: ExperimentConfig | None = None,
                   gnd_file=None, progress=True, log=print) -> dict:
    """Extract, learn the vocabulary on ``train_images`` (a folder), index, query, evaluate.

    Writes ``<workdir>/results-<dataset>.json`` (table values, per-query AP, timings) with the
    config next to it, and returns the results dictionary.
    """
    cfg = cfg or ExperimentConfig()
    ds = RevisitedDataset(dataset_root, gnd_file or (cfg.eval.protocols_file or None))
    os.makedirs(workdir, exist_ok=True)
    fdir = os.path.join(workdir, "features")
    timings = {}

    train_paths = list_images(train_images)
    if not train_paths:
        raise DataError(f"{train_images}: no training images found")
    train_store = os.path.join(fdir, store_name("train", cfg.extract))
    t0 = time.time()
    rep = extract_stage(jobs_from_paths(train_paths), train_store, cfg.extract, progress)
    _log_failures(rep, log)

    db_store = os.path.join(fdir, store_name(f"db-{os.path.basename(os.path.normpath(ds.root))}", cfg.extract))
    db_jobs = [ExtractJob(n, p) for n, p in zip(ds.imlist, ds.db_paths())]
    t0 = time.time()
    rep = extract_stage(db_jobs, db_store, cfg.extract, progress)
    if rep.done:
        timings["extract_s_per_image"] = (time.time() - t0) / rep.done
    _log_failures(rep, log)

    q_store = os.path.join(fdir, store_name(f"queries-{ds.name}", cfg.extract))
    rep = extract_stage(query_jobs(ds), q_store, cfg.extract, progress)
    _log_failures(rep, log)

    vkey = _digest([to_dict(cfg.vocab), to_dict(cfg.extract), sorted(os.path.basename(p) for p in train_paths)])
    vpath = os.path.join(workdir, f"vocab-{cfg.vocab.size}-{vkey}.npz")
    t0 = time.time()
    existed = os.path.exists(vpath)
    voc = vocab_stage(train_store, cfg.vocab, vpath, progress)
    if not existed:
        timings["vocab_s"] = time.time() - t0

    t0 = time.time()
    idir = os.path.join(workdir, f"index-{vkey}" if cfg.search.method == "bow" else f"index-{cfg.search.method}-{vkey}")
    index = _reusable_index(idir, ds.imlist, cfg)
    if index is None:
        index = index_stage(db_store, ds.imlist, voc, cfg.search, cfg.vocab, idir, progress,
                            extract_cfg=cfg.extract, image_root=os.path.join(ds.root, "jpg"))
        timings["index_s"] = time.time() - t0
    with FeatureStore(q_store) as st:
        qnames = [j.name for j in query_jobs(ds)]
        qdesc = read_descriptors(st, qnames, cfg.vocab.descriptor, cfg.vocab.beta)
    ranks, timings["query_s"] = query_stage(index, voc, qdesc, cfg.search, progress)
    method = f"{cfg.search.method}-{cfg.vocab.size}"
    if cfg.verify.enabled:  # spatial verification (and query expansion): docs/spatial_verification.md
        from .rerank import verify_stage

        t0 = time.time()
        regions = [tuple(g["bbx"]) if g["bbx"] else (-0.5, -0.5, 1e9, 1e9) for g in ds.gnd]
        ranks = verify_stage(index, voc, db_store, ds.imlist, q_store, qnames, regions, cfg, progress)
        timings["verify_s"] = (time.time() - t0) / max(len(qnames), 1)
        method += "+sp" + ("" if cfg.verify.qe == "none" else f"+qe-{cfg.verify.qe}")
    res = evaluate(ranks, ds.gnd, cfg.eval.kappas)
    res.update(dataset=ds.name, gnd_file=ds.gnd_file, method=method,
               extractor=cfg.extract.extractor, timings=timings, n_db=len(ds.imlist), n_queries=len(ds.qimlist),
               index_dir=idir, query_store=q_store,
               top10=[[ds.imlist[j] for j in ranks[:10, i]] for i in range(ranks.shape[1])])
    out = os.path.join(workdir, f"results-{ds.name}.json")
    with open(out + ".tmp", "w") as fh:
        json.dump(res, fh, indent=1)
    os.replace(out + ".tmp", out)
    save_config(cfg, os.path.join(workdir, f"results-{ds.name}.config.yaml"))
    res["results_file"] = out
    res["ranks"] = ranks
    log(format_table([(f"{cfg.extract.extractor} {res['method']} ({ds.name})", res)]))
    return res


def _reusable_index(idir, names, cfg: ExperimentConfig):
    """The index directory an earlier run wrote for the same images and settings, or None."""
    try:
        with open(os.path.join(idir, "names.json")) as fh:
            meta = json.load(fh)
        same = (meta.get("names") == list(names) and meta.get("search") == to_dict(cfg.search)
                and meta.get("vocab") == to_dict(cfg.vocab) and meta.get("extract") == to_dict(cfg.extract))
        return load_index_dir(idir, threads=cfg.search.threads)[0] if same else None
    except (OSError, ValueError, KeyError, BowRetrievalError):
        return None  # absent, older or damaged: build it again


def _log_failures(rep, log):
    if rep.failed:
        log(f"{len(rep.failed)} image(s) skipped:")
        for n, why in sorted(rep.failed.items()):
            log(f"  {n}: {why}")
