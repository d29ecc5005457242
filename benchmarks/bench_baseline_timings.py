"""Baseline figures on ../shared/data/landmarks-dev: OpenCV SIFT + RootSIFT, 16k-word vocabulary
learned on ../shared/data/train-photos, tf-idf BoW with cosine scoring.

The experiment is ``configs/baseline.yaml`` unless ``--config`` names another (the package's default
extractor is hesaff, the foundation's baseline is OpenCV SIFT). Runs
``bowretrieval.pipeline.run_experiment`` on the crop protocol first (gnd_landmarks-dev-crop),
then on the full-image protocol (features, vocabulary and index are reused), and prints:

* mAP Easy / Medium / Hard and mP@1/5/10 Medium for both protocols;
* timings measured in this process, as wall seconds and CPU seconds (CPU time is what the work costs
  on an idle machine; wall time grows with whatever else runs on a shared one):
  extraction per image at 1024 px (one process, one thread, ``--single`` landmark photos),
  vocabulary training (k-means on the training descriptors, with ``--time-vocab``: it fits the
  16k-word vocabulary once more), and per query (assignment + scoring, full ranking of the database).

Usage::

    OMP_NUM_THREADS=1 nice python benchmarks/bench_baseline_timings.py --workdir /tmp/bowr-baseline --time-vocab

Artefacts (feature stores, vocabulary, index, results-*.json with per-query AP and the config) stay in
``--workdir``; a second run reuses them. Timings are kept in ``<workdir>/timings.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from bowretrieval.config import ExperimentConfig, load_config
from bowretrieval.features import get_extractor
from bowretrieval.featurestore import FeatureStore
from bowretrieval.imageio import load_gray
from bowretrieval.paths import shared_data_dir
from bowretrieval.pipeline import query_jobs, query_stage, read_descriptors, run_experiment
from bowretrieval.revisited import RevisitedDataset, format_table
from bowretrieval.vocabulary import Vocabulary


HERE = os.path.dirname(os.path.abspath(__file__))


class Clock:
    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *a):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def time_extraction(ds: RevisitedDataset, n: int, max_side: int, cfg_extractor: str = "sift", params=None) -> dict:
    """Read + grey + downscale + features per image, in this process with one OpenCV thread."""
    import cv2

    cv2.setNumThreads(1)
    ex = get_extractor(cfg_extractor, **(params or {}))
    names = [x for x in ds.imlist if not x.startswith("distractor__")][:n]
    nfeat = 0
    with Clock() as c:
        for name in names:
            nfeat += len(ex.extract(load_gray(ds.image_path(name), max_side=max_side).gray))
    k = max(len(names), 1)
    return {"wall": c.wall / k, "cpu": c.cpu / k, "images": len(names), "features_per_image": nfeat / k}


def time_vocabulary(workdir, cfg) -> dict:
    """Fit the vocabulary again with the experiment's settings on the same training descriptors."""
    train = [f for f in os.listdir(os.path.join(workdir, "features")) if f.startswith("train-")]
    with FeatureStore(os.path.join(workdir, "features", train[0])) as st:
        X = np.concatenate(read_descriptors(st, st.names(), cfg.vocab.descriptor, cfg.vocab.beta))
    v = cfg.vocab
    voc = Vocabulary(v.size, v.iterations, v.max_points_per_centroid, v.seed)
    with Clock() as c:
        voc.fit(X)
    return {"wall": c.wall, "cpu": c.cpu, "descriptors": int(len(X)), "words": v.size, "iterations": v.iterations}


def time_queries(res: dict, ds: RevisitedDataset) -> dict:
    """Assignment + scoring of every query of ``ds`` against the experiment's index (``res`` is what
    run_experiment returned: it names the index directory and the query store it used)."""
    from bowretrieval.pipeline import load_index_dir

    index, names, voc, scfg, vcfg = load_index_dir(res["index_dir"], threads=1)
    voc.threads = 1  # one thread for the word search too
    with FeatureStore(res["query_store"]) as st:
        qdesc = read_descriptors(st, [j.name for j in query_jobs(ds)], vcfg.descriptor, vcfg.beta)
    with Clock() as c:
        query_stage(index, voc, qdesc, scfg, progress=False)
    k = max(len(qdesc), 1)
    return {"wall": c.wall / k, "cpu": c.cpu / k, "queries": len(qdesc), "db_images": len(names)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="folder for stores, vocabulary, index, results")
    ap.add_argument("--data", default=None, help="shared data folder (default: $BOWR_SHARED_DATA or ../shared/data)")
    ap.add_argument("--config", default=os.path.join(HERE, "..", "configs", "baseline.yaml"),
                    help="experiment configuration (default: configs/baseline.yaml, OpenCV SIFT + RootSIFT)")
    ap.add_argument("--vocab-size", type=int, default=16384)
    ap.add_argument("--workers", type=int, default=None, help="extraction processes (default: the config's)")
    ap.add_argument("--single", type=int, default=20, help="images for the extraction timing (0: skip)")
    ap.add_argument("--time-vocab", action="store_true", help="fit the vocabulary once more to time it")
    args = ap.parse_args(argv)

    data = args.data or str(shared_data_dir())
    root = os.path.join(data, "landmarks-dev")
    train = os.path.join(data, "train-photos")
    if not os.path.isdir(root) or not os.path.isdir(train):
        print(f"skipped: {root} or {train} not found (set BOWR_SHARED_DATA)")
        return 0
    cfg = load_config(args.config) if args.config else ExperimentConfig()
    cfg.vocab.size = args.vocab_size
    if args.workers:
        cfg.extract.workers = args.workers
    os.makedirs(args.workdir, exist_ok=True)
    tfile = os.path.join(args.workdir, "timings.json")
    timings = json.load(open(tfile)) if os.path.exists(tfile) else {}

    rows, dss, results = [], [], []
    for gnd in ("gnd_landmarks-dev-crop.json", "gnd_landmarks-dev.json"):
        res = run_experiment(root, train, args.workdir, cfg, gnd_file=gnd, log=lambda *a: None)
        rows.append((f"{cfg.extract.extractor} {cfg.search.method}-{args.vocab_size} {res['dataset']}", res))
        dss.append(RevisitedDataset(root, gnd))
        results.append(res)
        if "extract_s_per_image" in res["timings"]:
            timings["batch_extract_wall_s_per_image"] = res["timings"]["extract_s_per_image"]
    if args.single:
        timings["extract"] = time_extraction(dss[0], args.single, cfg.extract.max_side, cfg.extract.extractor,
                                             cfg.extract.params)
    if args.time_vocab:
        timings["vocab"] = time_vocabulary(args.workdir, cfg)
    for ds, res in zip(dss, results):
        timings[f"query[{ds.name}]"] = time_queries(res, ds)
    with open(tfile + ".tmp", "w") as fh:
        json.dump(timings, fh, indent=1)
    os.replace(tfile + ".tmp", tfile)

    print(format_table(rows))
    print()
    print(f"{'timing':<62} {'wall s':>9} {'CPU s':>9}")
    print("-" * 82)
    lines = []
    if "extract" in timings:
        e = timings["extract"]
        lines.append((f"extraction per image, 1024 px ({e['features_per_image']:.0f} features, one thread)", e))
    if "vocab" in timings:
        v = timings["vocab"]
        lines.append((f"vocabulary: k-means {v['descriptors']} x 128 -> {v['words']} words, {v['iterations']} it", v))
    for k, q in timings.items():
        if k.startswith("query["):
            lines.append((f"per query, {k[6:-1]} ({q['db_images']} images, assign + score)", q))
    for label, t in lines:
        print(f"{label:<62} {t['wall']:>9.3f} {t['cpu']:>9.3f}")
    if "batch_extract_wall_s_per_image" in timings:
        print(f"{'extraction, batch of database images (' + str(args.workers) + ' processes), wall / n':<62} "
              f"{timings['batch_extract_wall_s_per_image']:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
