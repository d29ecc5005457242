"""ASMK* parity and speed against jenicek/asmk (``pip install --no-deps asmk``) in one run.

Same codebook (a bowretrieval vocabulary), same descriptors (RootSIFT from feature stores made by
`bowr extract` / the pipeline), same parameters: binary signatures, alpha 3, tau 0, query MA 5,
database MA 1, idf. Both single-threaded (faiss and our kernels on 1 thread). Prints mAP E/M/H of
both, the largest difference, and seconds per query for the scoring alone (asmk: its
``IVF.search``; ours: ``InvertedFile.search``) and end to end (assignment + aggregation +
binarisation + scoring), as CPU time of the querying thread (the machine is shared). Asmk assigns
query descriptors with faiss's flat (exact) search; ours with the exact int8-screened search of
``bowretrieval.knn`` (same words: exact distances). Our end to end is also measured with faiss's flat
search and with HNSW word assignment (approximate, reporting its agreement with exact assignment).

    PYTHONPATH=. python benchmarks/bench_asmk_parity.py --vocab V.npz --db DB.h5 --queries Q.h5 \
        --gnd /work/shared/data/landmarks-dev/gnd_landmarks-dev-crop.json
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bowretrieval import asmk as ours
from bowretrieval.featurestore import FeatureStore
from bowretrieval.revisited import evaluate, load_gnd
from bowretrieval.vocabulary import Vocabulary


def read(store_path, names, variant="rootsift"):
    with FeatureStore(store_path) as st:
        return [st.descriptors(n, variant) if n in st else np.zeros((0, 128), np.float32) for n in names]


def cached_words(voc, descs, k, path=None):
    """Exact k-nearest words of every image (shared by the implementations), cached in ``path``."""
    if path and os.path.exists(path):
        with np.load(path) as z:
            flat, n = z["words"], z["n"]
        if flat.shape[1] >= k and len(n) == len(descs):
            return np.split(flat[:, :k], np.cumsum(n)[:-1])
    n = np.array([len(d) for d in descs])
    flat = voc.assign(np.concatenate(descs), k)
    if path:
        np.savez(path + ".tmp.npz", words=flat, n=n)
        os.replace(path + ".tmp.npz", path)
    return np.split(flat, np.cumsum(n)[:-1])


def run_peer(centroids, db, db_words, qs, alpha, tau, qma, dma):
    import faiss
    from asmk import asmk_method, codebook as cdb_pkg, index as idx_pkg

    faiss.omp_set_num_threads(1)
    params = {
        "index": {"gpu_id": None},
        "train_codebook": {"codebook": {"size": len(centroids)}},
        "build_ivf": {"kernel": {"binary": True}, "ivf": {"use_idf": True},
                      "quantize": {"multiple_assignment": dma}, "aggregate": {}},
        "query_ivf": {"quantize": {"multiple_assignment": qma}, "aggregate": {},
                      "search": {"topk": None}, "similarity": {"similarity_threshold": tau, "alpha": alpha}},
    }
    cdb = cdb_pkg.Codebook(idx_pkg.initialize_index(None), size=len(centroids))
    cdb.index(np.ascontiguousarray(centroids, np.float32))
    m = asmk_method.ASMKMethod(params, {}, codebook=cdb)
    keep = [i for i, d in enumerate(db) if len(d)]  # asmk cannot hold images without features
    vecs = np.concatenate([db[i] for i in keep])
    imids = np.concatenate([np.full(len(db[i]), i) for i in keep])
    words = np.concatenate([db_words[i] for i in keep])
    # the database words are assigned once for both implementations (not part of query timing):
    # asmk's builder steps after its own quantisation
    t0 = time.perf_counter()
    builder = m.create_ivf_builder()
    builder.ivf.add(*builder.kernel.aggregate(vecs, words, imids))
    m = m.add_ivf_builder(builder)
    build_s = time.perf_counter() - t0
    kern, ivf = m.kernel, m.inverted_file
    sim = lambda *x: kern.similarity(*x, alpha=alpha, similarity_threshold=tau)  # noqa: E731
    ranks, t_score = [], 0.0
    t0 = time.thread_time()
    for q in qs:
        if not len(q):
            ranks.append(np.arange(len(db)))
            continue
        quant = cdb.quantize(q, multiple_assignment=qma)
        agg = kern.aggregate_image(*quant)
        ts = time.thread_time()
        r, _ = ivf.search(*agg, similarity_func=sim, topk=None)
        t_score += time.thread_time() - ts
        r = np.asarray(r)
        ranks.append(np.concatenate([r, np.setdiff1d(np.arange(len(db)), r)]))  # images asmk lacks go last
    total = time.thread_time() - t0
    return np.stack(ranks, 1), t_score / len(qs), total / len(qs), build_s


def run_ours(voc, db, db_words, qs, alpha, tau, qma, dma, search="exact", ef=128, kernel="auto"):
    import faiss

    faiss.omp_set_num_threads(1)
    v = Vocabulary(**dict(voc.get_params(), search=search, hnsw_ef_search=ef, threads=1))
    v.exact_kernel = kernel
    v.centroids_ = voc.centroids_
    cb = ours.Codebook.from_vocabulary(v)
    v.assign(db[0][:2], 1)  # build the HNSW graph / the exact search's screen outside the timed queries
    t0 = time.perf_counter()
    d = ours.build(cb, db, "asmk", alpha=alpha, tau=tau, query_ma=qma, db_ma=dma, threads=1, words=db_words)
    build_s = time.perf_counter() - t0
    t0 = time.thread_time()
    enc = d.encode_queries(qs)
    t1 = time.thread_time()
    ids, _ = d.ivf.search(enc, None)
    t2 = time.thread_time()
    # scoring alone, one query at a time like the peer
    ts = time.thread_time()
    for q in enc:
        d.ivf.search([q], None)
    score_single = (time.thread_time() - ts) / len(qs)
    return ids.T.copy(), score_single, (t2 - t0) / len(qs), build_s, (t1 - t0) / len(qs), d


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", required=True, help="bowretrieval vocabulary (.npz): the shared codebook")
    ap.add_argument("--db", required=True, help="database feature store (.h5)")
    ap.add_argument("--queries", required=True, help="query feature store (.h5), names '<i:05d>:<image>'")
    ap.add_argument("--gnd", required=True, help="revisited ground truth (.json/.pkl)")
    ap.add_argument("--alpha", type=float, default=3.0)
    ap.add_argument("--tau", type=float, default=0.0)
    ap.add_argument("--query-ma", type=int, default=5)
    ap.add_argument("--db-ma", type=int, default=1)
    ap.add_argument("--db-words", default=None, help="cache file (.npz) of the database word assignment")
    ap.add_argument("--hnsw-ef", type=int, default=16, help="efSearch of the HNSW assignment variant")
    a = ap.parse_args(argv)
    gnd = load_gnd(a.gnd)
    voc = Vocabulary.load(a.vocab)
    db = read(a.db, gnd["imlist"])
    qs = read(a.queries, [f"{i:05d}:{n}" for i, n in enumerate(gnd["qimlist"])])
    print(f"{len(db)} database images ({sum(map(len, db))} features), {len(qs)} queries "
          f"({sum(map(len, qs))} features), {voc.n_words} words; alpha {a.alpha}, tau {a.tau}, "
          f"query MA {a.query_ma}, db MA {a.db_ma}; single thread", flush=True)
    import faiss

    faiss.omp_set_num_threads(1)
    db_words = cached_words(voc, db, a.db_ma, a.db_words)
    r_peer, peer_score, peer_total, peer_build = run_peer(voc.centroids_, db, db_words, qs, a.alpha, a.tau, a.query_ma, a.db_ma)
    print(f"asmk done: {peer_total:.4f} s/query", flush=True)
    r_ours, our_score, our_total, our_build, our_assign, d = run_ours(voc, db, db_words, qs, a.alpha, a.tau, a.query_ma, a.db_ma)
    r_flat, _, flat_total, _, flat_assign, _ = run_ours(voc, db, db_words, qs, a.alpha, a.tau, a.query_ma, a.db_ma,
                                                        kernel="faiss")
    r_hnsw, _, hnsw_total, _, hnsw_assign, _ = run_ours(voc, db, db_words, qs, a.alpha, a.tau, a.query_ma, a.db_ma,
                                                        "hnsw", a.hnsw_ef)
    # agreement of HNSW with exact assignment on the query descriptors
    X = np.concatenate([q for q in qs if len(q)])
    ex = voc.assign(X, a.query_ma)
    hv = Vocabulary(**dict(voc.get_params(), search="hnsw", hnsw_ef_search=a.hnsw_ef, threads=1))
    hv.centroids_ = voc.centroids_
    hn = hv.assign(X, a.query_ma)
    top1 = float((ex[:, 0] == hn[:, 0]).mean())
    setagree = float(np.mean([len(set(e) & set(h)) / a.query_ma for e, h in zip(ex[:5000], hn[:5000])]))
    E = {name: evaluate(r, gnd["gnd"]) for name, r in (("asmk (jenicek)", r_peer), ("ours", r_ours),
                                                       ("ours, faiss flat assignment", r_flat),
                                                       ("ours, HNSW assignment", r_hnsw))}
    print("\n| implementation | mAP E | mAP M | mAP H | mP@10 M | build s (words given) | s/query scoring | s/query end to end |")
    print("|---|---|---|---|---|---|---|---|")
    rows = (("asmk (jenicek)", peer_build, peer_score, peer_total), ("ours", our_build, our_score, our_total),
            ("ours, faiss flat assignment", float("nan"), our_score, flat_total),
            ("ours, HNSW assignment", float("nan"), our_score, hnsw_total))  # efSearch --hnsw-ef
    for name, b, s, t in rows:
        e = E[name]
        print(f"| {name} | {e['easy']['mAP']:.2f} | {e['medium']['mAP']:.2f} | {e['hard']['mAP']:.2f} | "
              f"{e['medium']['mP'][-1]:.2f} | {b:.1f} | {s:.5f} | {t:.4f} |")
    diff = max(abs(E["ours"][p]["mAP"] - E["asmk (jenicek)"][p]["mAP"]) for p in ("easy", "medium", "hard"))
    same_top = float(np.mean(r_ours[:10] == r_peer[:10]))
    print(f"\nlargest mAP difference ours vs asmk: {diff:.3f} (points); top-10 positions identical: {100 * same_top:.1f}%")
    print(f"speed-up, scoring alone: {peer_score / our_score:.1f}x; end to end: {peer_total / our_total:.1f}x "
          f"(our query assignment + binarisation {our_assign:.4f} s of {our_total:.4f} s); "
          f"with faiss's flat search for the same exact assignment: {peer_total / flat_total:.1f}x "
          f"(assignment+binarisation {flat_assign:.4f} s); "
          f"with HNSW assignment: {peer_total / hnsw_total:.1f}x (assignment+binarisation {hnsw_assign:.4f} s)")
    print(f"HNSW vs exact assignment on {len(X)} query descriptors: nearest word equal {100 * top1:.1f}%, "
          f"overlap of the {a.query_ma} words {100 * setagree:.1f}% (first 5000)")


if __name__ == "__main__":
    main()
