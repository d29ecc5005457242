"""Time and peak memory to learn the joint PCA-whitening (D' = 128) of a 4 x (4k+2k+1k+512+256+128)
bundle (SIFT powers 1, 0.4, 0.5, 0.6; 32,256-D BoW) on 2000 images.

The 2000 images are the 200 train-photos plus 1800 random crops of them (each crop keeps the stored
features whose centre lies in a random window covering 15..60% of the photo's area), so no extra
photos or extraction are needed. The vocabularies only shape the sparsity pattern here, so they are
learned with 4 k-means iterations on 60k descriptors. The dual Gram + Lanczos path (ours) is compared
with scikit-learn's PCA(svd_solver='arpack') on the same sparse matrix in the same run; the primal
covariance would be a 32,256^2 float64 matrix (8.3 GB) and is not attempted.

    python benchmarks/bench_whitening.py --train /work/cache/shortvec/train-sift-mr.h5
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import tracemalloc

import numpy as np
import scipy.sparse as sp

from bowretrieval.featurestore import FeatureStore
from bowretrieval.multivocab import MultiVocabulary
from bowretrieval.whitening import PCAWhitening

SIZES = [4096, 2048, 1024, 512, 256, 128]


def photos(store_path):
    imgs = []
    with FeatureStore(store_path) as st:
        for n in st.names():
            f = st.load(n)
            d = f.descriptors[:, f.descriptors.shape[1] // 2] if f.descriptors.ndim == 3 else f.descriptors
            imgs.append((f.frames[:, :2], d, st.image_size(n)))
    return imgs


def crop_masks(imgs, n_total, seed=0):
    """(photo index, feature mask) per image: every photo whole, then random crops of them."""
    rng = np.random.default_rng(seed)
    out = [(i, np.ones(len(d), bool)) for i, (_, d, _) in enumerate(imgs)]
    while len(out) < n_total:
        i = int(rng.integers(len(imgs)))
        xy, d, (w, h) = imgs[i]
        area = rng.uniform(0.15, 0.6)
        aspect = rng.uniform(0.6, 1.6)
        cw, ch = min(w, w * np.sqrt(area * aspect)), min(h, h * np.sqrt(area / aspect))
        x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        keep = (xy[:, 0] >= x0) & (xy[:, 0] < x0 + cw) & (xy[:, 1] >= y0) & (xy[:, 1] < y0 + ch)
        out.append((i, keep))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", default="/work/cache/shortvec/train-sift-mr.h5")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default="/work/cache/shortvec/bench-whitening-bundle.npz")
    ap.add_argument("--no-sklearn", action="store_true")
    args = ap.parse_args(argv)
    imgs = photos(args.train)
    masks = crop_masks(imgs, args.images)
    print(f"{len(masks)} images ({sum(int(m.sum()) for _, m in masks)} features; {len(imgs)} photos + random crops)",
          flush=True)
    if os.path.exists(args.cache):
        bundle = MultiVocabulary.load(args.cache, threads=args.threads)
    else:
        cfg = dict(name="m4x4k", iterations=4, max_descriptors=60000, members=[
            dict(name=f"beta{b}", descriptor="power", beta=b, sizes=SIZES, seed=i + 1)
            for i, b in enumerate([1.0, 0.4, 0.5, 0.6])])
        t0 = time.time()
        bundle = MultiVocabulary(cfg, threads=args.threads).fit([d for _, d, _ in imgs], progress=True)
        bundle.save(args.cache)
        print(f"vocabularies learned in {time.time() - t0:.0f} s", flush=True)
    t0 = time.time()
    xpath = args.cache[:-4] + f"-bow{args.images}.npz"
    if os.path.exists(xpath):
        X = sp.load_npz(xpath)
    else:
        # a crop's features are a subset of its photo's: assign every photo once, then select
        words = [bundle.assign(d) for _, d, _ in imgs]
        enc = [bundle.encode_words([w[m] for w in words[i]]) for i, m in masks]
        indptr = np.concatenate([[0], np.cumsum([len(ix) for ix, _ in enc])])
        X = sp.csr_matrix((np.concatenate([v for _, v in enc]), np.concatenate([ix for ix, _ in enc]), indptr),
                          shape=(len(enc), bundle.dim))
        sp.save_npz(xpath, X)
    t_bow = time.time() - t0
    X = X[np.asarray(X.getnnz(axis=1)) > 0]
    print(f"BoW: {X.shape[0]} x {X.shape[1]}, {X.nnz} non-zeros ({X.nnz / X.shape[0]:.0f} per image), "
          f"encoded in {t_bow:.1f} s", flush=True)

    rows = []

    def measure(label, fn):
        tracemalloc.start()
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rows.append((label, dt, peak / 2**20))
        print(f"{label}: {dt:.1f} s, peak {peak / 2**20:.0f} MiB", flush=True)
        return out

    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=args.threads):
        w = measure("PCAWhitening dual Gram + Lanczos (ours)", lambda: PCAWhitening(128).fit(X))
        if not args.no_sklearn:
            from sklearn.decomposition import PCA

            sk = measure("sklearn PCA(svd_solver='arpack'), sparse input",
                         lambda: PCA(128, svd_solver="arpack", random_state=0).fit(X))
            ev = sk.explained_variance_
            print(f"eigenvalues agree with sklearn: max rel. diff {np.max(np.abs(w.explained_variance_ - ev) / ev):.2e}")
    print(f"\njoint PCA-whitening, {X.shape[0]} images x {X.shape[1]} dims -> 128, {args.threads} threads")
    print(f"{'method':<48} {'time s':>8} {'peak MiB (tracemalloc)':>24}")
    for label, dt, mb in rows:
        print(f"{label:<48} {dt:8.1f} {mb:24.0f}")
    print(f"process max RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; "
          f"primal covariance would need {X.shape[1] ** 2 * 8 / 1e9:.1f} GB")


if __name__ == "__main__":
    sys.exit(main())
