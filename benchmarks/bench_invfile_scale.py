"""Inverted-file scale: build time, bytes per entry, open time and query latency (1 and 2 threads)
on generated indexes whose word frequencies are Zipf-like over a 65,536-word vocabulary.

Each image gets ``--words`` distinct words: ~1.03x that many draws from p(r) ~ (r + 1)^-s over a
random permutation of the words, deduplicated (so the count is "about" --words). Signatures are
uniform random 128-bit codes, so about half of the pairs pass tau = 0 as with real residuals' signs.
Queries are generated like database images (one aggregated signature per word). Entries are added in
chunks of --chunk images and compacted once, then the directory is written and re-opened memory-mapped.

    python benchmarks/bench_invfile_scale.py --images 100000 --words 1000
    python benchmarks/bench_invfile_scale.py --images 1000000 --words 200 --kinds asmk bow
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np

from bowretrieval.invfile import InvertedFile

N_WORDS = 65536


def zipf_cdf(s: float, rng) -> tuple[np.ndarray, np.ndarray]:
    p = (np.arange(N_WORDS) + 1.0) ** -s
    return np.cumsum(p / p.sum()), rng.permutation(N_WORDS).astype(np.int32)


def gen_images(n_img, words, cdf, perm, rng):
    """(words int32, image int64) of n_img images, sorted by image then word, distinct per image."""
    draws = int(words * 1.03)
    w = perm[np.minimum(np.searchsorted(cdf, rng.random(n_img * draws)), N_WORDS - 1)].reshape(n_img, draws)
    w.sort(axis=1)
    keep = np.ones(w.shape, bool)
    keep[:, 1:] = w[:, 1:] != w[:, :-1]
    return w[keep], np.repeat(np.arange(n_img, dtype=np.int64), keep.sum(1))


def build(kind, n_images, words, chunk, s, seed):
    rng = np.random.default_rng(seed)
    cdf, perm = zipf_cdf(s, rng)
    ivf = InvertedFile(N_WORDS, kind)
    t0, c0 = time.perf_counter(), time.process_time()
    gen_s = gen_c = 0.0
    for lo in range(0, n_images, chunk):
        n = min(chunk, n_images - lo)
        tg, cg = time.perf_counter(), time.process_time()
        w, im = gen_images(n, words, cdf, perm, rng)
        sig = rng.integers(0, 2**64, (len(w), 2), dtype=np.uint64) if kind != "bow" else None
        gen_s += time.perf_counter() - tg
        gen_c += time.process_time() - cg
        ivf.add(w, im, sig, n_images=n)
        del w, im, sig
    ivf.compact()
    return ivf, (time.perf_counter() - t0 - gen_s, time.process_time() - c0 - gen_c), (cdf, perm)


def queries(n, words, cdf, perm, kind, seed):
    rng = np.random.default_rng(seed + 1)
    w, im = gen_images(n, words, cdf, perm, rng)
    out = []
    for i in range(n):
        qw = w[im == i]
        out.append((qw, rng.integers(0, 2**64, (len(qw), 2), dtype=np.uint64) if kind != "bow" else None))
    return out


def latency(ivf, qs, threads, top=100):
    """(wall, CPU) seconds per query. 1 thread: queries one after another, CPU = the thread's CPU
    time. 2 threads: the batch scored in parallel (one query per thread), CPU = process CPU / 2,
    i.e. the wall time the batch would take on two otherwise idle cores."""
    ivf.threads = threads
    ivf.search(qs[:2], top)  # warm pages
    t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
    if threads == 1:
        for q in qs:
            ivf.search([q], top)
    else:
        ivf.search(qs, top)
    wall = (time.perf_counter() - t0) / len(qs)
    cpu = (time.thread_time() - c0) if threads == 1 else (time.process_time() - p0) / threads
    return wall, cpu / len(qs)


def scanned(ivf, qs):
    df = np.diff(np.asarray(ivf.indptr_))
    return float(np.mean([df[w].sum() for w, _ in qs]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, nargs="+", default=[100_000])
    ap.add_argument("--words", type=int, default=1000, help="distinct words per image (about)")
    ap.add_argument("--kinds", nargs="+", default=["asmk", "bow"])
    ap.add_argument("--zipf", type=float, default=0.5, help="exponent s of p(r) ~ (r + 1)^-s")
    ap.add_argument("--chunk", type=int, default=50_000, help="images per add() chunk")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--workdir", default="/tmp/bowr-invfile-scale")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    rows = []
    for n_img in a.images:
        for kind in a.kinds:
            ivf, build_s, (cdf, perm) = build(kind, n_img, a.words, a.chunk, a.zipf, a.seed)
            e = ivf.n_entries
            df = np.diff(ivf.indptr_).astype(np.float64)
            imbalance = N_WORDS * (df ** 2).sum() / df.sum() ** 2
            path = os.path.join(a.workdir, f"{kind}-{n_img}")
            t0 = time.perf_counter()
            ivf.save(path)
            save_s = time.perf_counter() - t0
            del ivf
            arrays = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".npy"))
            posting = sum(os.path.getsize(os.path.join(path, f)) for f in ("ids.npy", "payload.npy"))
            t0 = time.perf_counter()
            ivf = InvertedFile.load(path)
            open_s = time.perf_counter() - t0
            qs = queries(a.queries, a.words, cdf, perm, kind, a.seed)
            l1 = latency(ivf, qs, 1)
            l2 = latency(ivf, qs, 2)
            rows.append((kind, n_img, e / n_img, e, build_s, save_s, posting / e, arrays / e, open_s,
                         scanned(ivf, qs), l1, l2, imbalance))
            print(f"done {kind} {n_img}: {rows[-1]}", file=sys.stderr, flush=True)
            del ivf
            shutil.rmtree(path, ignore_errors=True)
    print(f"\nZipf s={a.zipf} over {N_WORDS} words, ~{a.words} distinct words per image, {a.queries} queries "
          f"of ~{a.words} words, top 100; uniform random 128-bit signatures; chunks of {a.chunk} images")
    print("times: CPU seconds (wall seconds on the shared machine in brackets)")
    print("| kind | images | words/img | entries | build s | save s | B/entry postings | B/entry all arrays "
          "| open s | entries scanned/query | query s 1 thread | query s 2 threads (batch) | df imbalance |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:,} | {r[2]:.0f} | {r[3]:,} | {r[4][1]:.1f} ({r[4][0]:.1f}) | {r[5]:.1f} | {r[6]:.2f} "
              f"| {r[7]:.2f} | {r[8]:.4f} | {r[9]:,.0f} | {r[10][1]:.4f} ({r[10][0]:.4f}) "
              f"| {r[11][1]:.4f} ({r[11][0]:.4f}) | {r[12]:.2f} |")


if __name__ == "__main__":
    main()
