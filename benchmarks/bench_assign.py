"""Assignment throughput of a 4 x (2k+1k+512+256+128) vocabulary bundle (mRootSIFT), 2 threads:
the fused product + blockwise argmin of MultiVocabulary.assign against a flat faiss search per
vocabulary, a plain numpy nearest-centroid search and scikit-learn's pairwise_distances_argmin, all
from the same raw SIFT descriptors (the per-member SIFT power transform is included everywhere) and in
the same run. Descriptors per second; higher is better.

    python benchmarks/bench_assign.py --encoder /work/cache/shortvec/enc-mrootsift.npz --n 20000
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

from bowretrieval.featurestore import FeatureStore
from bowretrieval.multivocab import MultiVocabulary, load_bundle_config
from bowretrieval.shortvec import ShortVectorEncoder


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="/work/cache/shortvec/enc-mrootsift.npz",
                    help="mRootSIFT encoder (learned by bench_shortvec.py); learned quickly here if absent")
    ap.add_argument("--train", default="/work/cache/shortvec/train-sift-mr.h5", help="feature store to draw descriptors from")
    ap.add_argument("--n", type=int, default=20000, help="descriptors to assign")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    with FeatureStore(args.train) as st:
        names = st.names()
        descs = [st.load(n).descriptors for n in names[::-1][:60]]
    X = np.concatenate(descs)[: args.n]
    if os.path.exists(args.encoder):
        bundle = ShortVectorEncoder.load(args.encoder, threads=args.threads).bundle
        src = args.encoder
    else:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        cfg = load_bundle_config(os.path.join(repo, "configs", "mrootsift.yaml"))
        cfg.iterations, cfg.max_descriptors = 4, 100000
        bundle = MultiVocabulary(cfg, threads=args.threads).fit(descs)
        src = "configs/mrootsift.yaml, 4 k-means iterations on 100k descriptors (speed only)"
    n = len(X)
    print(f"bundle: {src}; {len(bundle.vocabularies_)} vocabularies, {bundle.dim} words; {n} descriptors "
          f"{X.shape[1:]}; {args.threads} threads", flush=True)

    def fused():
        return bundle.assign(X)

    def per_vocab(kind):
        def run():
            from sklearn.metrics import pairwise_distances_argmin

            out, j = [], 0
            for mi, m in enumerate(bundle.members):
                Xm = bundle.member_descriptors(mi, X)
                for _ in m.sizes:
                    C = bundle.vocabularies_[j].centroids_
                    if kind == "faiss":
                        out.append(bundle.vocabularies_[j].assign(Xm)[:, 0])
                    elif kind == "numpy":
                        c2 = (C * C).sum(1)
                        out.append(np.concatenate([np.argmin(c2[None, :] - 2 * Xm[a:a + 2048] @ C.T, axis=1)
                                                   for a in range(0, len(Xm), 2048)]))
                    else:
                        out.append(pairwise_distances_argmin(Xm, C))
                    j += 1
            return out
        return run

    rows = []
    ref = None
    with threadpool_limits(limits=args.threads):
        for label, fn in [("MultiVocabulary.assign (fused GEMM + block argmin)", fused),
                          ("faiss IndexFlatL2 per vocabulary", per_vocab("faiss")),
                          ("numpy argmin(|c|^2 - 2 X C^T) per vocabulary", per_vocab("numpy")),
                          ("sklearn pairwise_distances_argmin per vocabulary", per_vocab("sklearn"))]:
            fn()  # warm-up (BLAS threads, faiss index construction)
            best = np.inf
            for _ in range(2):
                t0 = time.perf_counter()
                words = fn()
                best = min(best, time.perf_counter() - t0)
            if ref is None:
                ref = words
            agree = np.mean([np.mean(a == b) for a, b in zip(ref, words)])
            rows.append((label, n / best, agree))
    base = rows[0][1]
    print(f"\n{'method':<52} {'desc/s':>10} {'vs fused':>9} {'same words':>11}")
    for label, rate, agree in rows:
        print(f"{label:<52} {rate:10.0f} {rate / base:9.2f} {100 * agree:10.2f}%")


if __name__ == "__main__":
    sys.exit(main())
