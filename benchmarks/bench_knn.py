"""Exact nearest-word search: bowretrieval.knn (int8-screened exact search) against faiss's flat
search (IndexFlatL2, BLAS) and a numpy product + argpartition, one thread, same descriptors and
words, in one run. Descriptors per second (higher is better), the ratio to faiss, and the
agreement of the returned words with faiss (exact searches differ only inside float-rounding ties).

    python benchmarks/bench_knn.py --vocab V.npz --store Q.h5 [--words 16384 65536] [--k 1 5]

Without --vocab, words are learned quickly (faiss k-means) on the store's descriptors.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from bowretrieval import knn
from bowretrieval.featurestore import FeatureStore
from bowretrieval.vocabulary import Vocabulary


def timed(f, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t = time.thread_time()
        out = f()
        best = min(best, time.thread_time() - t)
    return best, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="feature store (.h5) of query descriptors")
    ap.add_argument("--vocab", nargs="*", default=[], help="vocabularies (.npz); else --words are learned")
    ap.add_argument("--words", nargs="*", type=int, default=[16384])
    ap.add_argument("--k", nargs="*", type=int, default=[1, 5])
    ap.add_argument("--n", type=int, default=20000, help="descriptors to assign")
    a = ap.parse_args(argv)
    import faiss

    faiss.omp_set_num_threads(1)
    with FeatureStore(a.store) as st:
        X = np.concatenate([st.descriptors(n) for n in st.names()])
    rng = np.random.default_rng(0)
    vocabs = [Vocabulary.load(p).centroids_ for p in a.vocab]
    if not vocabs:
        for w in a.words:
            v = Vocabulary(size=w, iterations=10, threads=2).fit(X[rng.choice(len(X), min(len(X), 40 * w), replace=False)])
            vocabs.append(v.centroids_)
    Q = X[rng.choice(len(X), min(a.n, len(X)), replace=False)]
    print(f"{len(Q)} descriptors, one thread; AVX-512 VNNI screen available: {knn.available()}\n")
    print("| words | k | faiss flat desc/s | numpy desc/s | bowretrieval.knn desc/s | knn / faiss | exact distances per descriptor | same words as faiss |")
    print("|---|---|---|---|---|---|---|---|")
    for C in vocabs:
        flat = faiss.IndexFlatL2(C.shape[1])
        flat.add(C)
        ex = knn.ExactKnn(C, threads=1)
        cn = (C ** 2).sum(1)
        for k in a.k:
            tf, (_, fi) = timed(lambda: flat.search(Q, k))

            def np_search():
                with threadpool_limits(1):
                    out = np.empty((len(Q), k), np.int64)
                    for lo in range(0, len(Q), 2048):
                        d = cn[None] - 2 * Q[lo:lo + 2048] @ C.T
                        p = np.argpartition(d, k - 1, axis=1)[:, :k]
                        out[lo:lo + 2048] = np.take_along_axis(p, np.argsort(np.take_along_axis(d, p, 1), 1), 1)
                    return out

            tn, _ = timed(np_search, 1)
            tk, (_, ki) = timed(lambda: ex.search(Q, k))
            print(f"| {len(C)} | {k} | {len(Q) / tf:,.0f} | {len(Q) / tn:,.0f} | {len(Q) / tk:,.0f} | "
                  f"{tf / tk:.2f}x | {ex.n_exact_ / len(Q):.1f} | {100 * np.mean(ki == fi):.3f}% |")


if __name__ == "__main__":
    main()
