"""Inverted-file scale: build time, bytes per entry, open time and query latency (1 and 2 threads)
on generated indexes whose word frequencies are Zipf-like over a 65,536-word vocabulary.

Each image gets ``--words`` distinct words: ~1.03x that many draws from p(r) ~ (r + 1)^-s over a
random permutation of the words, deduplicated (so the count is "about" --words). Signatures are
uniform random 128-bit codes, so about half of the pairs pass tau = 0 as with real residuals' signs.
Queries are generated like database images (one aggregated signature per word). Entries are added in
chunks of --chunk images and compacted once, then the directory is written and re-opened memory-mapped.

With ``--out-of-core`` the index is built by ``InvertedFile.build_on_disk`` (chunks sorted into
runs on disk, then merged word range by word range into the index files) under ``--workdir``, so
its size is bounded by the disk, not the memory; the build's peak RSS is reported, and ``--cold N``
also times N queries each after evicting the index files from the page cache (fsync +
posix_fadvise DONTNEED), with the major page faults they took.

    python benchmarks/bench_invfile_scale.py --images 100000 --words 1000
    python benchmarks/bench_invfile_scale.py --images 1000000 --words 200 --kinds asmk bow
    nice -n 10 python benchmarks/bench_invfile_scale.py --out-of-core --images 1000000 --words 1000 \
        --kinds asmk --workdir /work/cache/scale --chunk 25000 --cold 5
"""
from __future__ import annotations

import argparse
import os
import resource
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


def build_out_of_core(path, kind, n_images, words, chunk, s, seed, run_bytes, mem_bytes):
    """InvertedFile.build_on_disk from a generator of chunks; times exclude the generation."""
    rng = np.random.default_rng(seed)
    cdf, perm = zipf_cdf(s, rng)
    gen = [0.0, 0.0]

    def chunks():
        for lo in range(0, n_images, chunk):
            n = min(chunk, n_images - lo)
            tg, cg = time.perf_counter(), time.process_time()
            w, im = gen_images(n, words, cdf, perm, rng)
            sig = rng.integers(0, 2**64, (len(w), 2), dtype=np.uint64) if kind != "bow" else None
            gen[0] += time.perf_counter() - tg
            gen[1] += time.process_time() - cg
            yield w, im, sig, None, n
            del w, im, sig
            print(f"  chunk {lo // chunk + 1}/{-(-n_images // chunk)} added", file=sys.stderr, flush=True)

    t0, c0 = time.perf_counter(), time.process_time()
    InvertedFile.build_on_disk(path, chunks(), N_WORDS, kind, run_bytes=run_bytes, mem_bytes=mem_bytes)
    return (time.perf_counter() - t0 - gen[0], time.process_time() - c0 - gen[1]), (cdf, perm)


def evict(path):
    """Drop the index files' pages from the page cache (written back first)."""
    for f in os.listdir(path):
        fd = os.open(os.path.join(path, f), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_latency(ivf, qs, path, n, top=100):
    """(wall, CPU, major faults) per query, each query run right after evicting the index files."""
    ivf.threads = 1
    wall = cpu = flt = 0.0
    for q in qs[:n]:
        evict(path)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        t0, c0 = time.perf_counter(), time.thread_time()
        ivf.search([q], top)
        wall += time.perf_counter() - t0
        cpu += time.thread_time() - c0
        flt += resource.getrusage(resource.RUSAGE_SELF).ru_majflt - f0
    k = max(1, min(n, len(qs)))
    return wall / k, cpu / k, flt / k


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
    ivf.search(qs, top)  # warm pages: every posting list the queries read
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
    if threads == 1:
        for q in qs:
            ivf.search([q], top)
    else:
        ivf.search(qs, top)
    wall = (time.perf_counter() - t0) / len(qs)
    cpu = (time.thread_time() - c0) if threads == 1 else (time.process_time() - p0) / threads
    return wall, cpu / len(qs), (resource.getrusage(resource.RUSAGE_SELF).ru_majflt - f0) / len(qs)


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
    ap.add_argument("--out-of-core", action="store_true",
                    help="build with InvertedFile.build_on_disk (runs + merge under --workdir)")
    ap.add_argument("--run-mb", type=int, default=512, help="out-of-core: postings per sorted run (MiB)")
    ap.add_argument("--merge-mb", type=int, default=1024, help="out-of-core: merge working memory (MiB)")
    ap.add_argument("--cold", type=int, default=0, help="also time N queries on an evicted page cache")
    ap.add_argument("--keep", action="store_true", help="keep the index directories")
    ap.add_argument("--reuse", action="store_true",
                    help="out-of-core: query an index kept by an earlier --keep run instead of building")
    a = ap.parse_args(argv)
    rows = []
    for n_img in a.images:
        for kind in a.kinds:
            path = os.path.join(a.workdir, f"{kind}-{n_img}")
            if a.out_of_core and a.reuse and os.path.exists(os.path.join(path, "manifest.json")):
                build_s, (cdf, perm) = (float("nan"),) * 2, zipf_cdf(a.zipf, np.random.default_rng(a.seed))
                save_s, rss = float("nan"), float("nan")
                indptr = np.load(os.path.join(path, "indptr.npy"))
                e = int(indptr[-1])
            elif a.out_of_core:
                build_s, (cdf, perm) = build_out_of_core(path, kind, n_img, a.words, a.chunk, a.zipf, a.seed,
                                                         a.run_mb << 20, a.merge_mb << 20)
                save_s = float("nan")  # the build writes the directory
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                indptr = np.load(os.path.join(path, "indptr.npy"))
                e = int(indptr[-1])
            else:
                ivf, build_s, (cdf, perm) = build(kind, n_img, a.words, a.chunk, a.zipf, a.seed)
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                indptr = np.asarray(ivf.indptr_)
                e = ivf.n_entries
                t0 = time.perf_counter()
                ivf.save(path)
                save_s = time.perf_counter() - t0
                del ivf
            df = np.diff(indptr).astype(np.float64)
            imbalance = N_WORDS * (df ** 2).sum() / df.sum() ** 2
            print(f"built {kind} {n_img}: {e:,} entries, build CPU {build_s[1]:.1f} s wall {build_s[0]:.1f} s, "
                  f"peak RSS {rss:.2f} GiB", file=sys.stderr, flush=True)
            arrays = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".npy"))
            posting = sum(os.path.getsize(os.path.join(path, f)) for f in ("ids.npy", "payload.npy"))
            t0 = time.perf_counter()
            ivf = InvertedFile.load(path)
            open_s = time.perf_counter() - t0
            qs = queries(a.queries, a.words, cdf, perm, kind, a.seed)
            cold = cold_latency(ivf, qs, path, a.cold) if a.cold else None
            l1 = latency(ivf, qs, 1)
            l2 = latency(ivf, qs, 2)
            rows.append((kind, n_img, e / n_img, e, build_s, save_s, posting / e, arrays / e, open_s,
                         scanned(ivf, qs), l1, l2, imbalance, rss, cold))
            print(f"done {kind} {n_img}: {rows[-1]}", file=sys.stderr, flush=True)
            del ivf
            if not a.keep:
                shutil.rmtree(path, ignore_errors=True)
    print(f"\nZipf s={a.zipf} over {N_WORDS} words, ~{a.words} distinct words per image, {a.queries} queries "
          f"of ~{a.words} words, top 100; uniform random 128-bit signatures; chunks of {a.chunk} images; "
          + (f"out of core (runs of {a.run_mb} MiB, merge memory {a.merge_mb} MiB)" if a.out_of_core else "in memory"))
    print("times: CPU seconds (wall seconds on the shared machine in brackets); warm = after one pass over the "
          "queries, majflt = major page faults per query (0: served from the page cache); "
          "cold = each query right after evicting the index files")
    print("| kind | images | words/img | entries | build s | peak RSS GiB | save s | B/entry postings | B/entry all arrays "
          "| open s | entries scanned/query | query s 1 thread warm [majflt] | query s 2 threads (batch) "
          "| query s 1 thread cold [majflt] | df imbalance |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cold = f"{r[14][1]:.4f} ({r[14][0]:.4f}) [{r[14][2]:,.0f}]" if r[14] else "-"
        print(f"| {r[0]} | {r[1]:,} | {r[2]:.0f} | {r[3]:,} | {r[4][1]:.1f} ({r[4][0]:.1f}) | {r[13]:.2f} | {r[5]:.1f} "
              f"| {r[6]:.2f} | {r[7]:.2f} | {r[8]:.4f} | {r[9]:,.0f} | {r[10][1]:.4f} ({r[10][0]:.4f}) [{r[10][2]:.0f}] "
              f"| {r[11][1]:.4f} ({r[11][0]:.4f}) | {cold} | {r[12]:.2f} |")


if __name__ == "__main__":
    main()
