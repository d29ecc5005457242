"""Short-vector retrieval on landmarks-dev: mAP E/M/H at 128-D for single 8k + PCA-whitening and the
multi-vocabulary bundles (mVocab, mMeasReg, mRootSIFT, mPCA-SIFT), each without and with alpha-QE,
plus the full-dimensional tf-idf BoW (same 8k words) for reference. Everything (vocabularies,
PCA-SIFT projections, whitening) is learned on ../shared/data/train-photos.

Features: OpenCV SIFT keypoints described at 5 measurement-region sizes (emulated measurement
regions, see benchmarks/shortvec_features.py); region 2 (1.0 x r) is plain OpenCV SIFT and is what
every single-region bundle uses. Run the feature script first (cached in --cache):

    python benchmarks/shortvec_features.py --out /work/cache/shortvec
    python benchmarks/bench_shortvec.py --cache /work/cache/shortvec [--configs single8k,mrootsift]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bowretrieval.featurestore import FeatureStore  # noqa: E402
from bowretrieval.multivocab import MultiVocabulary, load_bundle_config  # noqa: E402
from bowretrieval.paths import shared_data_dir  # noqa: E402
from bowretrieval.revisited import RevisitedDataset, evaluate  # noqa: E402
from bowretrieval.shortvec import ShortVectorEncoder, ShortVectorIndex  # noqa: E402
from shortvec_features import stores  # noqa: E402

CONFIGS = ("single8k", "mvocab", "mmeasreg", "mrootsift", "mpcasift")
LABELS = {"single8k": "single 8k + PCAw", "mvocab": "mVocab 4x8k", "mmeasreg": "mMeasReg 5x2k",
          "mrootsift": "mRootSIFT 4x(2k..128)", "mpcasift": "mPCA-SIFT 4x(2k..128)"}


def bundle_config(repo, name, args):
    cfg = load_bundle_config(os.path.join(repo, "configs", f"{name}.yaml"))
    if args.iterations:
        cfg.iterations = args.iterations
    if args.max_descriptors:
        cfg.max_descriptors = args.max_descriptors
    path = os.path.join(args.cache, f"enc-{name}-it{cfg.iterations}-n{cfg.max_descriptors}.npz")
    return cfg, path


def raw(store_path, names):
    with FeatureStore(store_path) as st:
        missing = [n for n in names if n not in st]
        if missing:
            print(f"WARNING {store_path}: {len(missing)} of {len(names)} images missing (treated as featureless)")
        return [st.load(n).descriptors if n in st else np.zeros((0, 128), np.uint8) for n in names]


def row(name, res):
    return (f"{name:<46} {res['easy']['mAP']:6.1f} {res['medium']['mAP']:6.1f} {res['hard']['mAP']:6.1f}"
            f"   {res['medium']['mP'][0]:6.1f} {res['medium']['mP'][1]:6.1f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="/work/cache/shortvec")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pq-m", type=int, default=16)
    ap.add_argument("--sift-db", default=None, help="single-region OpenCV SIFT store of the database (default: "
                    "region 1.0 x r of the measurement-region store); used by every bundle except mMeasReg")
    ap.add_argument("--sift-crop", default=None, help="the same for the cropped queries")
    ap.add_argument("--iterations", type=int, default=None, help="override every config's k-means iterations")
    ap.add_argument("--max-descriptors", type=int, default=None,
                    help="override every config's training-descriptor subsample (per member)")
    ap.add_argument("--learn-only", action="store_true", help="learn and cache the encoders, then stop")
    ap.add_argument("--pca-crops", type=int, default=0,
                    help="re-learn only the whitening on the training photos plus this many random crops of them "
                         "(features inside a random window), vocabularies unchanged; results go to res-<name>-crops.json")
    ap.add_argument("--report", action="store_true", help="only print the table of the results already computed")
    args = ap.parse_args(argv)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if args.report:
        return report(args)
    data = shared_data_dir()
    st = stores(args.cache)
    need = ["train"] if args.learn_only else ["train"] + (["db", "crop"] if "mmeasreg" in args.configs or not args.sift_db else [])
    for k, p in ((k, st[k]) for k in need):
        if not os.path.exists(p):
            sys.exit(f"{p}: missing; run benchmarks/shortvec_features.py --out {args.cache} first")
    with FeatureStore(st["train"]) as s:
        train_names = s.names()
    train = raw(st["train"], train_names)
    if args.learn_only:
        for name in args.configs.split(","):
            cfg, path = bundle_config(repo, name, args)
            if not os.path.exists(path):
                t0 = time.time()
                ShortVectorEncoder(MultiVocabulary(cfg, threads=args.threads)).fit(train, progress=True).save(path)
                print(f"{name}: learned in {time.time() - t0:.0f} s -> {path}", flush=True)
        return
    ds = {"crop": RevisitedDataset(data / "landmarks-dev", "gnd_landmarks-dev-crop.json"),
          "full": RevisitedDataset(data / "landmarks-dev", "gnd_landmarks-dev.json")}
    crop_names = [f"{i:05d}:{n}" for i, n in enumerate(ds["crop"].qimlist)]

    def sets(multi_region):
        """db, crop and full-protocol query descriptors. Full-protocol queries are whole database
        images (their bbx is the whole image), so they reuse the database features."""
        dbp = st["db"] if multi_region or not args.sift_db else args.sift_db
        cp = st["crop"] if multi_region or not args.sift_crop else args.sift_crop
        return raw(dbp, ds["full"].imlist), {"crop": raw(cp, crop_names)}

    data_mr = sets(True) if (not args.sift_db or "mmeasreg" in args.configs) else None
    data_sr = sets(False) if args.sift_db else data_mr
    db, queries = data_sr
    print(f"train: {len(train)} images, {sum(len(d) for d in train)} features; db: {len(db)} images, "
          f"{sum(len(d) for d in db)} features; crop queries {len(queries['crop'])}", flush=True)

    for name in args.configs.split(","):
        eval_config(name, args, repo, train, ds, data_mr if name == "mmeasreg" else data_sr)
    report(args)


def _l2rows(B):
    n = np.sqrt(np.asarray(B.multiply(B).sum(axis=1)).ravel())
    return sp.diags(1.0 / np.maximum(n, 1e-12)) @ B


def eval_config(name, args, repo, train, ds, sets):
    """Learn (or load) one bundle's encoder, encode, search with/without alpha-QE, write res-<name>.json."""
    db, queries = sets
    cfg, path = bundle_config(repo, name, args)
    extra, results = {}, {p: [] for p in ds}
    t0 = time.time()
    if os.path.exists(path):
        enc = ShortVectorEncoder.load(path, threads=args.threads)
    else:
        enc = ShortVectorEncoder(MultiVocabulary(cfg, threads=args.threads)).fit(train, progress=True)
        enc.save(path)
        extra["learn_s"] = time.time() - t0
    suffix = ""
    if args.pca_crops:
        from bench_whitening import crop_masks, photos

        imgs = photos(stores(args.cache)["train"]) if name != "mmeasreg" else None
        if name == "mmeasreg":  # keep the region axis
            with FeatureStore(stores(args.cache)["train"]) as s:
                imgs = [(s.load(n).frames[:, :2], s.load(n).descriptors, s.image_size(n)) for n in s.names()]
        masks = crop_masks(imgs, len(imgs) + args.pca_crops, seed=1)
        words = [enc.bundle.assign(d) for _, d, _ in imgs]
        rows = [enc.bundle.encode_words([w[m] for w in words[i]]) for i, m in masks]
        indptr = np.concatenate([[0], np.cumsum([len(ix) for ix, _ in rows])])
        X = sp.csr_matrix((np.concatenate([v for _, v in rows]), np.concatenate([ix for ix, _ in rows]), indptr),
                          shape=(len(rows), enc.bundle.dim))
        enc.fit_bow(X)
        suffix = "-crops"
        extra["pca_training_vectors"] = int(X.shape[0])
    bow_path = os.path.join(args.cache, f"bow-{os.path.basename(path)[4:-4]}{'-sr' if args.sift_db and name != 'mmeasreg' else ''}.npz")
    if os.path.exists(bow_path):
        z = np.load(bow_path)
        Bdb, Bq = sp.load_npz(bow_path + ".db.npz"), {"crop": sp.load_npz(bow_path + ".crop.npz")}
        extra["encode_s_per_image"] = float(z["encode_s_per_image"])
    else:
        t0 = time.time()
        Bdb = enc.bundle.transform(db, progress=True, desc=f"{name} db")
        extra["encode_s_per_image"] = (time.time() - t0) / len(db)
        Bq = {"crop": enc.bundle.transform(queries["crop"], progress=True, desc=f"{name} crop queries")}
        sp.save_npz(bow_path + ".db.npz", Bdb)
        sp.save_npz(bow_path + ".crop.npz", Bq["crop"])
        np.savez(bow_path, encode_s_per_image=extra["encode_s_per_image"])
    pos = {n: i for i, n in enumerate(ds["full"].imlist)}
    Bq["full"] = Bdb[[pos[n] for n in ds["full"].qimlist]]  # full-protocol queries are whole db images
    Vdb = enc.transform_bow(Bdb)
    index = ShortVectorIndex(threads=args.threads).fit(Vdb)
    pq = ShortVectorIndex("pq", pq_m=args.pq_m, pq_bits=8, threads=args.threads).fit(Vdb) if args.pq_m else None
    for p, d in ds.items():
        Vq = enc.transform_bow(Bq[p])
        for qe in (False, True):
            ids, _ = index.search(Vq, qe=qe)
            label = f"{LABELS[name]}{' [PCAw: +crops]' if suffix else ''}{' +aQE' if qe else ''}"
            results[p].append((label, evaluate(ids.T, d.gnd)))
        if pq is not None:
            ids, _ = pq.search(Vq)
            results[p].append((f"  {LABELS[name]}{' [+crops]' if suffix else ''} PQ {pq.bytes_per_image:g} B/image",
                               evaluate(ids.T, d.gnd)))
        if suffix:
            continue
        # the concatenated BoW before PCA-whitening (cosine): what the reduction keeps or gains
        S = (_l2rows(Bq[p]) @ _l2rows(Bdb).T).toarray()
        results[p].append((f"  {enc.bundle.dim}-D sqrt-BoW, no PCA", evaluate(np.argsort(-S, axis=1, kind="stable").T, d.gnd)))
        if name == "single8k":
            # full-dimensional tf-idf BoW over the same 8k words (reference). The stored block is
            # sqrt(count) / norm * log(8192), so its square is the term frequency up to a per-image
            # factor, which the L2 normalisation of tf-idf vectors removes: exactly BowIndex's cosine.
            tf_db, tf_q = Bdb.power(2).tocsr(), Bq[p].power(2).tocsr()
            df = np.bincount(tf_db.indices, minlength=Bdb.shape[1])
            idf = np.where(df > 0, np.log(Bdb.shape[0] / np.maximum(df, 1)), 0.0)
            S = (_l2rows(tf_q @ sp.diags(idf)) @ _l2rows(tf_db @ sp.diags(idf)).T).toarray()
            results[p].append(("tf-idf BoW 8k (8192-D sparse)", evaluate(np.argsort(-S, axis=1, kind="stable").T, d.gnd)))
    for p in ds:
        for n, r in results[p]:
            print(f"[{p}] {row(n, r)}", flush=True)
    extra["bytes_float32"] = index.bytes_per_image
    if pq is not None:
        extra["bytes_pq"] = pq.bytes_per_image
    extra["config"] = {"iterations": cfg.iterations, "max_descriptors": cfg.max_descriptors, "bow_dim": enc.bundle.dim,
                       "db_images": int(Bdb.shape[0])}
    out = {p: [[n, {k: r[k] for k in ("easy", "medium", "hard")}] for n, r in results[p]] for p in ds}
    with open(os.path.join(args.cache, f"res-{name}{suffix}.json"), "w") as fh:
        json.dump({"results": out, "extra": extra}, fh, indent=1)


def report(args):
    head = f"{'method (128-D unless said)':<46} {'E':>6} {'M':>6} {'H':>6}   {'mP@1M':>6} {'mP@5M':>6}"
    res = {}
    for name in CONFIGS:
        for suffix in ("", "-crops"):
            f = os.path.join(args.cache, f"res-{name}{suffix}.json")
            if os.path.exists(f):
                with open(f) as fh:
                    res[name + suffix] = json.load(fh)
    for p in ("crop", "full"):
        print(f"\nlandmarks-dev, {p} protocol ({'gnd_landmarks-dev-crop.json' if p == 'crop' else 'gnd_landmarks-dev.json'})")
        print(head)
        print("-" * len(head))
        for name, r in res.items():
            for n, v in r["results"][p]:
                print(f"{n:<46} {v['easy']['mAP']:6.1f} {v['medium']['mAP']:6.1f} {v['hard']['mAP']:6.1f}"
                      f"   {v['medium']['mP'][0]:6.1f} {v['medium']['mP'][1]:6.1f}")
    print("\n" + json.dumps({n: r["extra"] for n, r in res.items()}, indent=1))


if __name__ == "__main__":
    main()
