"""``bowr shortvec build|search|eval`` and the bundle branch of ``bowr vocab build CONFIG``.

    bowr vocab build configs/mrootsift.yaml --features train.h5 --out mrootsift.npz   # bundle + whitening
    bowr shortvec build --encoder mrootsift.npz --features db.h5 --out sv-index/
    bowr shortvec search sv-index/ query.jpg --qe
    bowr shortvec eval DATASET --bundle configs/mrootsift.yaml --train PHOTOS --work DIR
"""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
from tqdm.auto import tqdm

from .errors import BowRetrievalError, DataError


def read_raw(store, names, progress=False, desc="read"):
    """Raw stored descriptors per image ((N, 128) or (N, R, 128) uint8); missing images give none."""
    out = []
    for n in tqdm(names, desc=desc, unit="img", disable=not progress):
        if n in store:
            out.append(store.load(n).descriptors)
        else:
            out.append(np.zeros((0, 128), np.uint8))
    return out


def learn_encoder(train_store_path, bundle_config, out_path, threads=0, progress=True):
    """Learn a bundle and its joint PCA-whitening on every image of a training feature store."""
    import yaml

    from .featurestore import FeatureStore
    from .multivocab import MultiVocabulary, load_bundle_config, to_dict_bundle
    from .shortvec import ShortVectorEncoder

    cfg = load_bundle_config(bundle_config) if isinstance(bundle_config, (str, os.PathLike)) else bundle_config
    with FeatureStore(train_store_path) as st:
        names = st.names()
        if not names:
            raise DataError(f"{train_store_path}: the training feature store holds no images; run `bowr extract`")
        train = read_raw(st, names, progress, "load training features")
    t0 = time.time()
    enc = ShortVectorEncoder(MultiVocabulary(cfg, threads=threads)).fit(train, progress=progress)
    path = enc.save(out_path)
    with open(os.path.splitext(path)[0] + ".yaml", "w") as fh:
        yaml.safe_dump(to_dict_bundle(enc.bundle.config), fh, sort_keys=False)
    if progress:
        print(f"{path}: {len(enc.bundle.vocabularies_)} vocabularies, {enc.bundle.dim}-D BoW -> {enc.dim}-D "
              f"({enc.whitening_.method_} PCA on {enc.whitening_.n_training_} images) in {time.time() - t0:.0f} s")
    return enc


def cmd_vocab_bundle(args, config_path) -> int:
    """`bowr vocab build CONFIG` with a bundle config: vocabularies + whitening in one file."""
    if os.path.exists(args.out) and not args.force:
        raise BowRetrievalError(f"{args.out}: exists; pass --force to learn it again")
    learn_encoder(args.features, config_path, args.out, getattr(args, "threads", 0), progress=not args.quiet)
    return 0


def build_index(encoder, store_path, out_dir, storage="float32", pq_m=16, pq_bits=8, threads=0,
                progress=True, encoder_path=None):
    """Encode every image of a database store and write a short-vector index directory."""
    from .featurestore import FeatureStore
    from .shortvec import ShortVectorIndex

    with FeatureStore(store_path) as st:
        names = st.names()
        if not names:
            raise DataError(f"{store_path}: the feature store holds no images; run `bowr extract` first")
        ext = dict(extractor=st.extractor, params=st.extractor_params, max_side=int(st._h5.attrs.get("max_side", 0)))
        V = encoder.transform(read_raw(st, names, progress, "load database features"), progress=progress)
    index = ShortVectorIndex(storage, pq_m, pq_bits, threads=threads).fit(V)
    index.save(out_dir, names=names, extra={"extract": ext})
    if encoder_path:
        shutil.copyfile(encoder_path, os.path.join(out_dir, "encoder.npz"))
    else:
        encoder.save(os.path.join(out_dir, "encoder.npz"))
    return index, names


def cmd_build(args) -> int:
    from .shortvec import ShortVectorEncoder

    enc = ShortVectorEncoder.load(args.encoder, threads=args.threads)
    index, names = build_index(enc, args.features, args.out, args.storage, args.pq_m, args.pq_bits,
                               args.threads, not args.quiet, encoder_path=args.encoder)
    print(f"{args.out}: {len(names)} images, {index.dim_}-D {args.storage} vectors "
          f"({index.bytes_per_image:g} bytes per image)")
    return 0


def describe_images(paths, extract: dict, bbox=None) -> list:
    """Raw descriptors of image files, described with the extractor settings an index recorded."""
    from .extract import ExtractJob, _extract_one
    from .features import get_extractor

    ex = get_extractor(extract["extractor"], **(extract.get("params") or {}))
    out = []
    for i, p in enumerate(paths):
        _, feats, info, _ = _extract_one(ExtractJob(f"q{i}", os.fspath(p), bbox), extract.get("max_side") or None, ex)
        if feats is None:
            raise DataError(f"query {p}: {info}")
        out.append(feats.descriptors)
    return out


def cmd_search(args) -> int:
    from .cli import _parse_bbox
    from .shortvec import ShortVectorEncoder, ShortVectorIndex

    index = ShortVectorIndex.load(args.index, threads=args.threads)
    enc = ShortVectorEncoder.load(os.path.join(args.index, "encoder.npz"), threads=args.threads)
    ext = (index.extra_ or {}).get("extract")
    if not ext:
        raise DataError(f"{args.index}: records no extractor settings; rebuild it with `bowr shortvec build`")
    Q = enc.transform(describe_images(args.queries, ext, _parse_bbox(args.bbox)))
    ids, sims = index.search(Q, top=args.top, qe=args.qe, alpha=args.alpha, nqe=args.nqe)
    out = []
    for qi, q in enumerate(args.queries):
        top = [(index.names_[int(j)], float(s)) for j, s in zip(ids[qi], sims[qi])]
        out.append({"query": q, "top": [n for n, _ in top], "scores": [s for _, s in top]})
        if not args.json:
            print(f"{q}:")
            for r, (n, s) in enumerate(top, 1):
                print(f"  {r:3d}. {n}  {s:.4f}")
    if args.json:
        print(json.dumps(out, indent=1))
    return 0


def cmd_eval(args) -> int:
    """Extract, learn the bundle + whitening on --train, encode, search with and without alpha-QE, evaluate."""
    from .cli import load_cli_config
    from .extract import ExtractJob, jobs_from_paths
    from .featurestore import FeatureStore
    from .imageio import list_images
    from .multivocab import load_bundle_config
    from .pipeline import _digest, extract_stage, query_jobs, store_name
    from .revisited import RevisitedDataset, evaluate, format_table
    from .shortvec import ShortVectorEncoder, ShortVectorIndex

    cfg = load_cli_config(args)
    bcfg = load_bundle_config(args.bundle)
    progress = not args.quiet
    ds = RevisitedDataset(args.dataset, args.gnd)
    os.makedirs(args.work, exist_ok=True)
    fdir = os.path.join(args.work, "features")
    train_paths = list_images(args.train)
    if not train_paths:
        raise DataError(f"{args.train}: no training images found")
    train_store = os.path.join(fdir, store_name("train", cfg.extract))
    extract_stage(jobs_from_paths(train_paths), train_store, cfg.extract, progress)
    db_store = os.path.join(fdir, store_name(f"db-{os.path.basename(os.path.normpath(ds.root))}", cfg.extract))
    extract_stage([ExtractJob(n, p) for n, p in zip(ds.imlist, ds.db_paths())], db_store, cfg.extract, progress)
    q_store = os.path.join(fdir, store_name(f"queries-{ds.name}", cfg.extract))
    extract_stage(query_jobs(ds), q_store, cfg.extract, progress)

    from .multivocab import to_dict_bundle
    key = _digest([to_dict_bundle(bcfg), cfg.extract.extractor, cfg.extract.params, cfg.extract.max_side,
                   sorted(os.path.basename(p) for p in train_paths)])
    enc_path = os.path.join(args.work, f"encoder-{bcfg.name}-{key}.npz")
    if os.path.exists(enc_path):
        enc = ShortVectorEncoder.load(enc_path, threads=args.threads)
    else:
        enc = learn_encoder(train_store, bcfg, enc_path, args.threads, progress)
    index, _ = build_index(enc, db_store, os.path.join(args.work, f"shortvec-{bcfg.name}-{key}"),
                           args.storage, args.pq_m, 8, args.threads, progress, encoder_path=enc_path)
    with FeatureStore(q_store) as st:
        Q = enc.transform(read_raw(st, [j.name for j in query_jobs(ds)]))
    rows, out = [], {}
    for qe in (False, True):
        ids, _ = index.search(Q, qe=qe)
        res = evaluate(ids.T, ds.gnd)
        label = f"{bcfg.name} {enc.dim}-D{' +aQE' if qe else ''}"
        rows.append((label, res))
        out[label] = {k: res[k] for k in ("easy", "medium", "hard")}
    print(format_table(rows))
    path = os.path.join(args.work, f"results-shortvec-{bcfg.name}-{ds.name}.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(dict(results=out, bytes_per_image=index.bytes_per_image, bundle=to_dict_bundle(bcfg)), fh, indent=1)
    os.replace(path + ".tmp", path)
    return 0


def register(subparsers):
    from .cli import _add_config_args, _group_help

    p = subparsers.add_parser("shortvec", help="multi-vocabulary short vectors (128-D) and their search",
                              description="Short vectors: BoW over a vocabulary bundle (bowr vocab build CONFIG) "
                                          "reduced jointly by PCA-whitening; exhaustive inner-product search with "
                                          "alpha-QE. See docs/shortvec.md.")
    sub = p.add_subparsers(dest="shortvec_command", metavar="ACTION")

    b = sub.add_parser("build", help="encode a database feature store into a short-vector index",
                       description="Encode every image of a feature store with an encoder file (bundle + "
                                   "whitening from `bowr vocab build CONFIG`) and write an index directory.")
    b.add_argument("--encoder", required=True, help="encoder .npz from `bowr vocab build CONFIG`")
    b.add_argument("--features", required=True, help="database feature store (.h5)")
    b.add_argument("--out", required=True, help="index directory to write")
    b.add_argument("--storage", choices=("float32", "pq"), default="float32",
                   help="float32 vectors (exact) or product-quantised codes")
    b.add_argument("--pq-m", type=int, default=16, help="PQ sub-quantisers (bytes per image with 8 bits)")
    b.add_argument("--pq-bits", type=int, default=8, help="bits per PQ sub-quantiser code")
    b.add_argument("--threads", type=int, default=0, help="threads (0: library default)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_build)

    s = sub.add_parser("search", help="query a short-vector index with images",
                       description="Describe query images with the index's extractor settings, encode and rank.")
    s.add_argument("index", help="index directory from `bowr shortvec build`")
    s.add_argument("queries", nargs="+", help="query image files")
    s.add_argument("--bbox", default=None, help="crop every query to x1,y1,x2,y2 (pixels)")
    s.add_argument("--top", type=int, default=10, help="results per query")
    s.add_argument("--qe", action="store_true", help="alpha query expansion")
    s.add_argument("--alpha", type=float, default=None, help="alpha of alpha-QE (default 3; 0 = average QE)")
    s.add_argument("--nqe", type=int, default=None, help="neighbours used by the expansion (default 50)")
    s.add_argument("--threads", type=int, default=0, help="threads (0: library default)")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s.set_defaults(func=cmd_search)

    e = sub.add_parser("eval", help="learn, index and evaluate a bundle on a revisited-format dataset",
                       description="Extract features (the extract section of --config), learn the bundle and "
                                   "whitening on --train, index the database, search the (cropped) queries with "
                                   "and without alpha-QE and print mAP E/M/H. Artefacts are reused from --work.")
    e.add_argument("dataset", help="dataset folder with jpg/ and gnd_<name>.json (or .pkl)")
    e.add_argument("--bundle", required=True, help="bundle config, e.g. configs/mrootsift.yaml")
    e.add_argument("--train", required=True, help="folder of independent training images")
    e.add_argument("--work", required=True, help="work folder for features, encoder, index and results")
    e.add_argument("--gnd", default=None, help="ground-truth file inside the dataset (default: first gnd_*.json)")
    e.add_argument("--storage", choices=("float32", "pq"), default="float32", help="vector storage")
    e.add_argument("--pq-m", type=int, default=16, help="PQ sub-quantisers")
    e.add_argument("--threads", type=int, default=0, help="threads (0: library default)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_args(e)
    e.set_defaults(func=cmd_eval)
    p.set_defaults(func=lambda a: _group_help(p))
