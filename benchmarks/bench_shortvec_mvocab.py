"""mVocab 4x8k for bench_shortvec.py, learned member by member in parallel processes.

Each part learns one member of configs/mvocab.yaml exactly as MultiVocabulary.fit would (same
descriptor subsample seed and k-means seed) and encodes the training photos, the database and the
crop queries with it; ``combine`` stacks the parts into the bundle (blocks are independent, so the
concatenation equals encoding with the whole bundle), learns the joint whitening on the training
photos and writes the encoder and BoW caches that ``bench_shortvec.py --configs mvocab`` then reads.

    for k in 0 1 2 3; do python benchmarks/bench_shortvec_mvocab.py part $k --sift-db DB --sift-crop CROP & done; wait
    python benchmarks/bench_shortvec_mvocab.py combine
    python benchmarks/bench_shortvec.py --configs mvocab --iterations 8 --max-descriptors 120000 --sift-db DB --sift-crop CROP
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_shortvec import bundle_config, raw  # noqa: E402
from bowretrieval.featurestore import FeatureStore  # noqa: E402
from bowretrieval.multivocab import MultiVocabulary, load_states, save_states  # noqa: E402
from bowretrieval.paths import shared_data_dir  # noqa: E402
from bowretrieval.revisited import RevisitedDataset  # noqa: E402
from bowretrieval.shortvec import ShortVectorEncoder  # noqa: E402
from shortvec_features import stores  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("part", "combine"))
    ap.add_argument("k", type=int, nargs="?", default=0)
    ap.add_argument("--cache", default="/work/cache/shortvec")
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--max-descriptors", type=int, default=120000)
    ap.add_argument("--sift-db", required=False)
    ap.add_argument("--sift-crop", required=False)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg, enc_path = bundle_config(repo, "mvocab", args)
    stem = os.path.basename(enc_path)[4:-4]
    if args.stage == "part":
        k = args.k
        # member k of the bundle subsamples with seed + 104729 (k + 1); as member 0 of its own bundle
        part_cfg = dataclasses.replace(cfg, members=[cfg.members[k]], seed=cfg.seed + 104729 * k)
        st = stores(args.cache)
        with FeatureStore(st["train"]) as s:
            train = raw(st["train"], s.names())
        t0 = time.time()
        b = MultiVocabulary(part_cfg, threads=args.threads).fit(train, progress=True)
        print(f"part {k}: learned in {time.time() - t0:.0f} s", flush=True)
        data = shared_data_dir()
        ds = RevisitedDataset(data / "landmarks-dev", "gnd_landmarks-dev-crop.json")
        full = RevisitedDataset(data / "landmarks-dev", "gnd_landmarks-dev.json")
        Xt = b.transform(train, progress=True, desc=f"part {k} train")
        t0 = time.time()
        Xd = b.transform(raw(args.sift_db, full.imlist), progress=True, desc=f"part {k} db")
        spi = (time.time() - t0) / Xd.shape[0]
        Xc = b.transform(raw(args.sift_crop, [f"{i:05d}:{n}" for i, n in enumerate(ds.qimlist)]), progress=True,
                         desc=f"part {k} crop")
        out = os.path.join(args.cache, f"mvocab-part{k}")
        for name, X in (("train", Xt), ("db", Xd), ("crop", Xc)):
            sp.save_npz(f"{out}-{name}.npz", X)
        save_states(f"{out}-bundle.npz", bundle=b.state_dict())
        np.save(f"{out}-encode_s.npy", spi)
        return 0
    parts = range(len(cfg.members))
    states = [load_states(os.path.join(args.cache, f"mvocab-part{k}-bundle.npz"))["bundle"] for k in parts]
    arrays = {f"voc{k}": states[k]["arrays"]["voc0"] for k in parts}
    meta = dict(states[0]["meta"])
    from bowretrieval.multivocab import to_dict_bundle

    meta["config"] = to_dict_bundle(cfg)
    meta["vocab_params"] = [s["meta"]["vocab_params"][0] for s in states]
    meta["inertia"] = [s["meta"]["inertia"][0] for s in states]
    bundle = MultiVocabulary.from_state({"arrays": arrays, "meta": meta}, "mvocab parts")
    load = lambda name: sp.hstack([sp.load_npz(os.path.join(args.cache, f"mvocab-part{k}-{name}.npz"))  # noqa: E731
                                   for k in parts]).tocsr()
    enc = ShortVectorEncoder(bundle).fit_bow(load("train"))
    enc.save(enc_path)
    bow = os.path.join(args.cache, f"bow-{stem}-sr.npz")
    sp.save_npz(bow + ".db.npz", load("db"))
    sp.save_npz(bow + ".crop.npz", load("crop"))
    spi = sum(float(np.load(os.path.join(args.cache, f"mvocab-part{k}-encode_s.npy"))) for k in parts)
    np.savez(bow, encode_s_per_image=spi)
    print(f"{enc_path}: {bundle.dim}-D bundle, whitening on {enc.whitening_.n_training_} photos; {bow}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
