"""landmarks-dev with spatial verification and query expansion: mAP Easy/Medium/Hard and mP@10.

Methods (one vocabulary, one feature set, the same queries):
  BoW            tf-idf cosine                     BoW+SP       + re-rank the top 100 (>= 10 inliers)
  BoW+SP+QE      + average query expansion from verified images, re-query, re-rank again
  ASMK*          (query MA 5)                      ASMK*+SP     + re-rank the top 100 (>= 15 inliers;
                                                                 --sweep-min-inliers shows 5..10)
  ASMK*+SP+QE    + the verified images' features mapped into the query region, aggregated with the
                 query's, re-query, re-rank
  HQE            Hamming query expansion (reliable images from strict Hamming matches)
  HQE+SP         SMK* first round, verified images as the reliable ones, HQE, re-rank

Features: --extractor (OpenCV SIFT by default; RootSIFT, max side 1024) as `bowr eval` computes them,
stored in --work/features (extracted when missing); the vocabulary (default 16k words) is learned on
../shared/data/train-photos. Also prints the chance level of verification: inlier counts of
negative images (neither easy, hard nor junk for the query) in the verified shortlists.

    python benchmarks/eval_sp_landmarks.py --work /work/cache/ransac/work [--protocol crop|full|both]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bowretrieval.config import ExperimentConfig, to_dict  # noqa: E402
from bowretrieval.extract import ExtractJob  # noqa: E402
from bowretrieval.featurestore import FeatureStore  # noqa: E402
from bowretrieval.imageio import list_images  # noqa: E402
from bowretrieval.paths import shared_data_dir  # noqa: E402
from bowretrieval.pipeline import _digest, extract_stage, query_jobs, store_name, vocab_stage  # noqa: E402
from bowretrieval.ransac import SpatialVerifier  # noqa: E402
from bowretrieval.rerank import DatabaseFeatures, QueryFeatures, SpatialReranker, VerifiedSearch  # noqa: E402
from bowretrieval.revisited import RevisitedDataset, evaluate  # noqa: E402

METHODS = ["BoW", "BoW+SP", "BoW+SP+QE", "ASMK*", "ASMK*+SP", "ASMK*+SP+QE", "HQE", "HQE+SP"]


def load_queries(store_path, ds, variant, beta):
    out = []
    with FeatureStore(store_path) as st:
        for job, g in zip(query_jobs(ds), ds.gnd):
            fr = st.frames(job.name) if job.name in st else np.zeros((0, 6), np.float32)
            d = st.descriptors(job.name, variant, beta=beta) if job.name in st else np.zeros((0, 128), np.float32)
            if g["bbx"] is not None:
                region = tuple(g["bbx"])
            else:
                w, h = st.image_size(job.name)
                region = (-0.5, -0.5, w - 0.5, h - 0.5)
            out.append(QueryFeatures(fr, d, region))
    return out


def chance_level(ds, ranks_verifs, min_inliers):
    """Inlier counts of negatives and positives (medium) inside the verified shortlists."""
    neg, pos = [], []
    for qi, ver in enumerate(ranks_verifs):
        g = ds.gnd[qi]
        ok = set(np.asarray(g["easy"]).tolist()) | set(np.asarray(g["hard"]).tolist())
        junk = set(np.asarray(g["junk"]).tolist())
        for i, v in ver.items():
            if i in ok:
                pos.append(v.n_inliers)
            elif i not in junk:
                neg.append(v.n_inliers)
    neg, pos = np.array(neg), np.array(pos)
    return dict(n_negative=len(neg), neg_p99=float(np.percentile(neg, 99)) if len(neg) else 0.0,
                neg_p999=float(np.percentile(neg, 99.9)) if len(neg) else 0.0,
                neg_max=int(neg.max()) if len(neg) else 0,
                neg_ge_5=float((neg >= 5).mean()) if len(neg) else 0.0,
                neg_ge_10=float((neg >= 10).mean()) if len(neg) else 0.0,
                n_positive=len(pos), pos_ge_min=float((pos >= min_inliers).mean()) if len(pos) else 0.0,
                pos_median=float(np.median(pos)) if len(pos) else 0.0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="work folder (features/, vocabulary) as `bowr eval --work`")
    ap.add_argument("--protocol", choices=("crop", "full", "both"), default="both")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    ap.add_argument("--vocab-size", type=int, default=16384)
    ap.add_argument("--extractor", default="sift", help="registered extractor (default parameters)")
    ap.add_argument("--threshold", type=float, default=12.0, help="inlier threshold, px at 1024 px")
    ap.add_argument("--match-ma", type=int, default=3, help="query multiple assignment of correspondences")
    ap.add_argument("--min-inliers", type=int, default=0, help="0: rerank.DEFAULT_MIN_INLIERS (10 bow, 15 asmk/hqe)")
    ap.add_argument("--top", type=int, default=100, help="images verified per query")
    ap.add_argument("--qe-images", type=int, default=50)
    ap.add_argument("--sweep-min-inliers", default="5,8,10,15",
                    help="also evaluate the +SP methods (without QE) at these verified thresholds (same verifications)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="results JSON (default: <work>/sp-results-<protocol>.json)")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    root = shared_data_dir() / "landmarks-dev"
    train = shared_data_dir() / "train-photos"
    if not root.is_dir():
        print(f"{root} not found; set BOWR_SHARED_DATA")
        return 1
    cfg = ExperimentConfig()
    cfg.vocab.size = args.vocab_size
    cfg.extract.extractor, cfg.extract.params = args.extractor, {}
    cfg.extract.workers = 1
    fdir = os.path.join(args.work, "features")
    train_paths = list_images(str(train))
    from bowretrieval.extract import jobs_from_paths

    train_store = os.path.join(fdir, store_name("train", cfg.extract))
    extract_stage(jobs_from_paths(train_paths), train_store, cfg.extract, progress=False)
    vkey = _digest([to_dict(cfg.vocab), to_dict(cfg.extract), sorted(os.path.basename(p) for p in train_paths)])
    voc = vocab_stage(train_store, cfg.vocab, os.path.join(args.work, f"vocab-{cfg.vocab.size}-{vkey}.npz"), False)
    voc.threads = args.threads

    protocols = {"crop": "gnd_landmarks-dev-crop.json", "full": "gnd_landmarks-dev.json"}
    todo = ["crop", "full"] if args.protocol == "both" else [args.protocol]
    ds0 = RevisitedDataset(str(root), protocols[todo[0]])
    db_store = os.path.join(fdir, store_name(f"db-{os.path.basename(os.path.normpath(ds0.root))}", cfg.extract))
    extract_stage([ExtractJob(n, p) for n, p in zip(ds0.imlist, ds0.db_paths())], db_store, cfg.extract, False)
    t0 = time.time()
    variant, beta = cfg.vocab.descriptor, cfg.vocab.beta
    with FeatureStore(db_store) as st:
        names = ds0.imlist
        frames = [st.frames(n) if n in st else np.zeros((0, 6), np.float32) for n in names]
        descs = [st.descriptors(n, variant, beta=beta) if n in st else np.zeros((0, 128), np.float32) for n in names]
        sizes = [st.image_size(n) if n in st else (0, 0) for n in names]
    wpath = os.path.join(args.work, f"dbwords-{vkey}.npz")
    if os.path.exists(wpath):
        with np.load(wpath) as z:
            allw, ptr = z["words"], z["indptr"]
        words = [allw[ptr[i]:ptr[i + 1]] for i in range(len(names))]
    else:
        words = [voc.assign(d, 1) if len(d) else np.zeros((0, 1), np.int32) for d in descs]
        np.savez(wpath, words=np.concatenate(words), indptr=np.concatenate([[0], np.cumsum([len(w) for w in words])]))
    print(f"database: {len(names)} images, {sum(len(f) for f in frames)} features "
          f"({time.time() - t0:.1f} s to load and assign)", flush=True)
    dbf = DatabaseFeatures(frames, words, sizes)

    from bowretrieval.asmk import Codebook, build
    from bowretrieval.bow import BowIndex

    indexes = {}
    need = {m.split("+")[0] for m in methods}
    if "BoW" in need:
        indexes["BoW"] = BowIndex(voc.n_words, args.threads).fit(words)
    cb = Codebook.from_vocabulary(voc) if need & {"ASMK*", "HQE"} else None
    if "ASMK*" in need:
        indexes["ASMK*"] = build(cb, descs, "asmk", words=words, threads=args.threads)
    if "HQE" in need:
        indexes["HQE"] = build(cb, descs, "hqe", words=words, threads=args.threads)

    verifier = SpatialVerifier(threshold=args.threshold, threads=args.threads)
    all_results = {}
    for proto in todo:
        ds = RevisitedDataset(str(root), protocols[proto])
        q_store = os.path.join(fdir, store_name(f"queries-{ds.name}", cfg.extract))
        extract_stage(query_jobs(ds), q_store, cfg.extract, False)
        queries = load_queries(q_store, ds, variant, beta)
        k = max(5, args.match_ma)  # one assignment per query serves every method (a prefix is the k' < k)
        qpath = os.path.join(args.work, f"qwords{k}-{ds.name}-{vkey}.npz")
        if os.path.exists(qpath):
            with np.load(qpath) as z:
                qa, qp = z["words"], z["indptr"]
            qwords = [qa[qp[i]:qp[i + 1]] for i in range(len(queries))]
        else:
            qwords = [voc.assign(q.descriptors, k) if len(q.descriptors) else np.zeros((0, k), np.int32)
                      for q in queries]
            np.savez(qpath, words=np.concatenate(qwords), indptr=np.concatenate([[0], np.cumsum([len(w) for w in qwords])]))
        for q, w in zip(queries, qwords):
            q.cache["words"] = w
        rows, results = [], {}
        for m in methods:
            base = m.split("+")[0]
            sp, qe = "+SP" in m, ("+QE" in m) or (m == "HQE+SP")
            search = VerifiedSearch(indexes[base], dbf,
                                    SpatialReranker(verifier, args.top, args.min_inliers),
                                    vocabulary=voc, db_descriptors=lambda i: descs[i],
                                    qe=("hqe" if base == "HQE" else "avg") if qe else "none",
                                    qe_images=args.qe_images, match_ma=args.match_ma, verify=sp)
            t = time.perf_counter()
            ranks, verifs, firsts = [], [], []
            for q in queries:
                r, v, st = search.search(q)
                ranks.append(r)
                verifs.append(v)
                firsts.append(st.get("first_ranking"))
            dt = (time.perf_counter() - t) / max(len(queries), 1)
            res = evaluate(np.stack(ranks, 1), ds.gnd, (1, 5, 10))
            res["s_per_query"] = dt
            if sp:
                res["chance"] = chance_level(ds, verifs, search.reranker.min_inliers)
            results[m] = res
            rows.append((m, res))
            if sp and not qe and args.sweep_min_inliers:
                from bowretrieval.rerank import rerank_order

                for t in [int(x) for x in args.sweep_min_inliers.split(",")]:
                    rk = [rerank_order(f, [v[int(i)].n_inliers for i in f[:args.top]], t) if f is not None else r
                          for f, v, r in zip(firsts, verifs, ranks)]
                    rs = evaluate(np.stack(rk, 1), ds.gnd, (1, 5, 10))
                    rs["s_per_query"] = dt
                    rs.pop("per_query", None)
                    results[f"{m} (>={t})"] = rs
                    rows.append((f"{m} (>={t})", rs))
                    print(f"[{proto}]   {m} with >= {t} inliers: E {rs['easy']['mAP']:6.2f} M {rs['medium']['mAP']:6.2f} "
                          f"H {rs['hard']['mAP']:6.2f}", flush=True)
            print(f"[{proto}] {m:<12} E {res['easy']['mAP']:6.2f} M {res['medium']['mAP']:6.2f} "
                  f"H {res['hard']['mAP']:6.2f}  mP@10 M {res['medium']['mP'][2]:6.2f} H {res['hard']['mP'][2]:6.2f}"
                  f"  {dt * 1e3:7.1f} ms/query", flush=True)
        print(f"\n### landmarks-dev ({ds.name}), {len(queries)} queries, {len(names)} images\n")
        print("| method | mAP E | mAP M | mAP H | mP@10 E | mP@10 M | mP@10 H | ms / query |\n|---|---|---|---|---|---|---|---|")
        for m, r in rows:
            print(f"| {m} | {r['easy']['mAP']:.2f} | {r['medium']['mAP']:.2f} | {r['hard']['mAP']:.2f} | "
                  f"{r['easy']['mP'][2]:.2f} | {r['medium']['mP'][2]:.2f} | {r['hard']['mP'][2]:.2f} | "
                  f"{r['s_per_query'] * 1e3:.1f} |")
        print("\nchance level (inliers of negatives / positives in the verified top lists):")
        for m, r in rows:
            if "chance" in r:
                c = r["chance"]
                print(f"  {m:<12} negatives {c['n_negative']}: p99 {c['neg_p99']:.0f}, p99.9 {c['neg_p999']:.0f}, "
                      f"max {c['neg_max']}, >=5 {100 * c['neg_ge_5']:.2f}%, >=10 {100 * c['neg_ge_10']:.2f}%; "
                      f"positives {c['n_positive']}: median {c['pos_median']:.0f}, verified {100 * c['pos_ge_min']:.1f}%")
        for r in results.values():
            r.pop("per_query", None)
        all_results[proto] = results
        out = args.out.replace(".json", f"-{proto}.json") if args.out else os.path.join(args.work, f"sp-results-{proto}.json")
        with open(out + ".tmp", "w") as fh:
            json.dump(dict(results=results, args=vars(args), verifier=verifier.get_params()), fh, indent=1)
        os.replace(out + ".tmp", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
