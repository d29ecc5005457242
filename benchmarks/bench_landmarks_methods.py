"""BoW tf-idf, SMK*, ASMK* and HQE on ../shared/data/landmarks-dev: mAP Easy/Medium/Hard and mP@10.

The codebook is a vocabulary learned on ../shared/data/train-photos (`bowr vocab build` or the
pipeline's vocab stage); features come from feature stores of the database and of the queries of each
protocol (the pipeline names them db-landmarks-dev-<extractor>-<key>.h5,
queries-landmarks-dev-crop-..., queries-landmarks-dev-...). Crop protocol first, then full images.

    PYTHONPATH=. python benchmarks/bench_landmarks_methods.py --vocab V.npz --db DB.h5 \
        --queries crop=QCROP.h5 full=QFULL.h5
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bench_asmk_parity import cached_words
from bowretrieval import asmk
from bowretrieval.featurestore import FeatureStore
from bowretrieval.paths import shared_data_dir
from bowretrieval.revisited import evaluate, load_gnd
from bowretrieval.vocabulary import Vocabulary

GND = {"crop": "gnd_landmarks-dev-crop.json", "full": "gnd_landmarks-dev.json"}


def read(store_path, names, variant="rootsift"):
    with FeatureStore(store_path) as st:
        ex = st.extractor
        return [st.descriptors(n, variant) if n in st else np.zeros((0, 128), np.float32) for n in names], ex


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", required=True)
    ap.add_argument("--db", required=True)
    ap.add_argument("--queries", nargs="+", required=True, help="protocol=store.h5 (protocols: crop, full)")
    ap.add_argument("--methods", nargs="+", default=["bow", "smk", "asmk", "hqe"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--db-words", default=None, help="cache file (.npz) of the database word assignment")
    a = ap.parse_args(argv)
    root = os.path.join(shared_data_dir(), "landmarks-dev")
    voc = Vocabulary.load(a.vocab)
    cb = asmk.Codebook.from_vocabulary(voc)
    gnd0 = load_gnd(os.path.join(root, GND["crop"]))
    db, extractor = read(a.db, gnd0["imlist"])
    print(f"extractor {extractor}, RootSIFT, {voc.n_words} words learned on train-photos; "
          f"{len(db)} database images, {sum(map(len, db))} features; {a.threads} thread(s)", flush=True)
    # words are assigned once (exact, nearest first) and shared by the methods
    db_words = cached_words(voc, db, 1, a.db_words)
    dbs = {}
    for m in a.methods:
        t0 = time.perf_counter()
        dbs[m] = (asmk.build(cb, db, m, threads=a.threads, words=db_words), time.perf_counter() - t0)
    rows = []
    for spec in a.queries:
        proto, path = spec.split("=", 1)
        gnd = load_gnd(os.path.join(root, GND[proto]))
        qs, _ = read(path, [f"{i:05d}:{n}" for i, n in enumerate(gnd["qimlist"])])
        kmax = max(dbs[m][0].params.query_ma for m in a.methods)
        q_words = [voc.assign(q, kmax) if len(q) else np.zeros((0, kmax), np.int32) for q in qs]
        for m in a.methods:
            d, build_s = dbs[m]
            res = d.query(qs, top=None, words=[w[:, :d.params.query_ma] for w in q_words])
            e = evaluate(res.ids.T, gnd["gnd"], (1, 5, 10))
            rows.append((proto, m, d.params.query_ma, e, res.seconds_per_query, build_s))
            print(f"{proto} {m}: M {e['medium']['mAP']:.2f} H {e['hard']['mAP']:.2f}", flush=True)
    print("\n| protocol | method | query MA | mAP E | mAP M | mAP H | mP@10 E | mP@10 M | mP@10 H | s/query (words given) | build s (words given) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for proto, m, qma, e, sq, b in rows:
        print(f"| {proto} | {m} | {qma} | {e['easy']['mAP']:.2f} | {e['medium']['mAP']:.2f} | {e['hard']['mAP']:.2f} | "
              f"{e['easy']['mP'][2]:.2f} | {e['medium']['mP'][2]:.2f} | {e['hard']['mP'][2]:.2f} | {sq:.4f} | {b:.1f} |")


if __name__ == "__main__":
    main()
