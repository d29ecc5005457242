"""Acceptance benchmark of retrieval-SfM against an exhaustive-matching baseline.

Collection: every image of scenes-dev (herzjesu, fountain, entry, monstree) shuffled with 200
distractors from landmarks-dev (seeded sample), as symlinks with neutral names. Both pipelines use
the same features (OpenCV SIFT, one feature store) and the same COLMAP matcher and mapper; they
differ in which pairs are matched: ours mines them (retrieval + verification + densification
inside clusters), the baseline matches all N(N-1)/2 pairs.

    nice python benchmarks/bench_sfm.py --work /work/cache/sfm/bench [--stages baseline,ours]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bowretrieval  # noqa: E402,F401  (imports zlib before pycolmap)
from bowretrieval.paths import shared_data_dir  # noqa: E402

SCENES_WITH_GT = ("herzjesu", "fountain", "entry")


def make_collection(data, work, n_distractors=200, seed=0):
    """Symlink folder work/photos/NNNN.jpg and mapping {name: (scene or 'distractor', original)}."""
    import glob

    scene = sorted(glob.glob(os.path.join(data, "scenes-dev", "*", "images", "*.jpg")))
    dis = sorted(glob.glob(os.path.join(data, "landmarks-dev", "jpg", "distractor__*.jpg")))
    if not scene or len(dis) < n_distractors:
        raise SystemExit(f"{data}: scenes-dev / landmarks-dev distractors missing; set BOWR_SHARED_DATA")
    rng = random.Random(seed)
    dis = rng.sample(dis, n_distractors)
    allp = scene + dis
    rng.shuffle(allp)
    photos = os.path.join(work, "photos")
    os.makedirs(photos, exist_ok=True)
    mapping = {}
    for i, p in enumerate(allp):
        name = f"{i:04d}.jpg"
        dst = os.path.join(photos, name)
        if not os.path.islink(dst):
            os.symlink(p, dst)
        label = "distractor" if "distractor__" in p else p.split(os.sep)[-3]
        mapping[name] = (label, p)
    return photos, mapping


def evaluate(models, mapping, data):
    """Per scene: models holding its photos, registered fraction, accuracy; distractors registered."""
    from bowretrieval.sfm.model import align_to_cameras

    scenes = sorted({lab for lab, _ in mapping.values() if lab != "distractor"})
    total = {s: sum(1 for lab, _ in mapping.values() if lab == s) for s in scenes}
    out = {"distractors_registered": 0, "scenes": {}}
    for m in models:
        out["distractors_registered"] += sum(1 for n in m.names if mapping[n][0] == "distractor")
    for s in scenes:
        holding = [(k, sum(1 for n in m.names if mapping[n][0] == s)) for k, m in enumerate(models)]
        holding = [(k, c) for k, c in holding if c > 0]
        best = max(holding, key=lambda kc: kc[1]) if holding else (None, 0)
        row = dict(images=total[s], models=[k for k, _ in holding], registered=best[1],
                   registered_frac=best[1] / total[s],
                   shares_model_with=sorted({mapping[n][0] for n in models[best[0]].names} - {s})
                   if best[0] is not None else [])
        if s in SCENES_WITH_GT and best[0] is not None and best[1] >= 3:
            m = models[best[0]]
            name_map = {n: os.path.basename(mapping[n][1]) for n in m.names if mapping[n][0] == s}
            sub = _submodel(m, list(name_map))
            acc = align_to_cameras(sub, os.path.join(data, "scenes-dev", s, "cameras.json"), name_map)
            row.update(median_err_rel=acc["median_rel"], max_err_rel=acc["max_rel"],
                       median_err=acc["median"], max_err=acc["max"], spread=acc["spread"])
        out["scenes"][s] = row
    return out


def _submodel(m, names):
    import numpy as np

    from bowretrieval.sfm.model import Model

    idx = [m.names.index(n) for n in names]
    return Model(m.path, names, m.C[idx], m.R[idx], m.focal[idx], m.points, np.zeros(len(idx) + 1, np.int64),
                 np.zeros(0, np.int64), np.zeros(0))


def run_baseline(work, photos, store_path, threads, timeout):
    """All pairs with COLMAP's matcher, then one mapping run over the whole collection."""
    from bowretrieval.featurestore import FeatureStore
    from bowretrieval.sfm import colmap
    from bowretrieval.sfm.mine import db_images
    from bowretrieval.sfm.model import Model

    base = os.path.join(work, "baseline")
    res_path = os.path.join(base, "result.json")
    if os.path.exists(res_path):
        with open(res_path) as fh:
            return json.load(fh)
    os.makedirs(base, exist_ok=True)
    t0 = time.time()
    with FeatureStore(store_path) as st:
        names = st.names()
        colmap.write_database(os.path.join(base, "database.db"), db_images(st, names), [])
    t_db = time.time() - t0
    t1 = time.time()
    r = colmap.run_job(dict(kind="match", name="match", database=os.path.join(base, "database.db"),
                            exhaustive=True, threads=threads), os.path.join(base, "jobs"), timeout)
    if not r.ok:
        raise SystemExit(r.message)
    t_match = time.time() - t1
    t2 = time.time()
    r2 = colmap.run_job(dict(kind="map", name="map", database=os.path.join(base, "database.db"), images=names,
                             output=os.path.join(base, "models"), image_root=photos, threads=threads,
                             min_model_size=5), os.path.join(base, "jobs"), timeout)
    if not r2.ok:
        raise SystemExit(r2.message)
    t_map = time.time() - t2
    res = dict(pairs_matched=r.data["matched_pairs"], pairs_verified=len(r.data["verified"]),
               seconds=dict(database=t_db, matching=t_match, mapping=t_map, total=time.time() - t0),
               models=[m["path"] for m in r2.data["models"]], n_images=len(names))
    with open(res_path, "w") as fh:
        json.dump(res, fh, indent=1)
    return res


def run_ours(work, photos, store_path, args):
    """Retrieval-SfM with the same features; the first complete run's figures are kept."""
    from bowretrieval.sfm.mine import MineConfig, mine

    out = os.path.join(work, "ours")
    res_path = os.path.join(out, "bench_result.json")
    if os.path.exists(res_path):
        with open(res_path) as fh:
            return json.load(fh)
    cfg = MineConfig()
    cfg.features.max_features = args.max_features
    cfg.features.store = store_path
    cfg.threads = args.threads
    cfg.min_model_size = args.min_model_size
    t = time.time()
    s = mine(photos, out, cfg)
    res = dict(pairs_matched=s["pairs_matched"], seconds=dict(s["seconds"], total=time.time() - t),
               models=[m["path"] for m in s["models"]], mining=s["mining"], message=s["message"])
    with open(res_path, "w") as fh:
        json.dump(res, fh, indent=1)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/work/cache/sfm/bench")
    ap.add_argument("--stages", default="baseline,ours")
    ap.add_argument("--max-features", type=int, default=4000, help="SIFT features per image (both pipelines)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-model-size", type=int, default=8,
                    help="entry has 10 photos and fountain 11: the default 20 would drop them")
    ap.add_argument("--timeout", type=float, default=6 * 3600)
    args = ap.parse_args(argv)
    data = str(shared_data_dir())
    photos, mapping = make_collection(data, args.work)
    store_path = os.path.join(args.work, f"features_sift{args.max_features // 1000}k.h5")
    from bowretrieval.extract import extract_to_store, jobs_from_paths
    from bowretrieval.imageio import list_images

    t0 = time.time()
    rep = extract_to_store(jobs_from_paths(list_images(photos), photos), store_path, "sift",
                           {"max_features": args.max_features}, 1024, workers=args.threads)
    print(f"features: {rep.summary().splitlines()[0]} ({time.time() - t0:.0f} s)")
    stages = args.stages.split(",")
    from bowretrieval.sfm.model import Model

    rows = {}
    if "baseline" in stages:
        b = run_baseline(args.work, photos, store_path, args.threads, args.timeout)
        models = [Model.load(p) for p in b["models"]]
        rows["exhaustive"] = dict(pairs=b["pairs_matched"], seconds=b["seconds"]["total"],
                                  eval=evaluate([m for m in models if len(m) >= 5], mapping, data))
    if "ours" in stages:
        o = run_ours(args.work, photos, store_path, args)
        models = [Model.load(p) for p in o["models"]]
        rows["retrieval-sfm"] = dict(pairs=o["pairs_matched"], seconds=o["seconds"]["total"],
                                     eval=evaluate(models, mapping, data), stage_seconds=o["seconds"],
                                     mining=o["mining"])
    with open(os.path.join(args.work, "bench_result.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    print_table(rows)


def print_table(rows):
    print("\n| method | pairs matched | time (s) | distractors registered | scene | registered | models | median err (% spread) | max err (% spread) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method, r in rows.items():
        e = r["eval"]
        for s, row in e["scenes"].items():
            med = f"{100 * row['median_err_rel']:.3f}" if "median_err_rel" in row else "-"
            mx = f"{100 * row['max_err_rel']:.3f}" if "max_err_rel" in row else "-"
            merged = f" (with {'+'.join(row['shares_model_with'])})" if row["shares_model_with"] else ""
            print(f"| {method} | {r['pairs']} | {r['seconds']:.0f} | {e['distractors_registered']} | {s} | "
                  f"{row['registered']}/{row['images']} | {len(row['models'])}{merged} | {med} | {mx} |")


if __name__ == "__main__":
    main()
