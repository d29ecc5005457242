"""Cost of the sharded index path (bowretrieval.cluster / docs/cluster.md): per-shard out-of-core
builds (the part a Dask cluster runs in parallel) versus the final merge (one task, sequential),
versus one build of the whole collection; and whether the merged arrays equal the one build's.

Generated data: ``--shards`` x ``--images`` images of ``--features`` RootSIFT-like descriptors
(non-negative, L2-normalised, drawn around 4 x ``--words`` random modes), a ``--words`` codebook
(sign binarisation), ASMK* with the default parameters, one thread everywhere. CPU seconds
(time.process_time) and wall seconds of this process; the shards are built one after the other
here, so "critical path" (the slowest shard + the merge) is what N workers would take.

    nice python benchmarks/bench_cluster_merge.py --shards 4 --images 1000 --features 300
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np

from bowretrieval import asmk
from bowretrieval.vocabulary import Vocabulary


def descriptors(shard, n_images, n_feat, modes, seed):
    for i in range(n_images):
        rng = np.random.default_rng([seed, shard, i])
        d = modes[rng.integers(0, len(modes), n_feat)] + 0.05 * rng.standard_normal((n_feat, 128)).astype(np.float32)
        d = np.abs(d)
        yield (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.process_time() - c, time.perf_counter() - t


def crcs(path):
    with open(os.path.join(path, "manifest.json")) as fh:
        return {k: v["crc32"] for k, v in json.load(fh)["arrays"].items()}


def dir_mb(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--images", type=int, default=1000, help="images per shard")
    ap.add_argument("--features", type=int, default=300, help="features per image")
    ap.add_argument("--words", type=int, default=1024)
    ap.add_argument("--method", default="asmk", choices=("smk", "asmk", "hqe"))
    ap.add_argument("--workdir", default="/work/cache/cluster/bench")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir)
    rng = np.random.default_rng(a.seed)
    modes = np.abs(rng.standard_normal((4 * a.words, 128))).astype(np.float32)
    train = np.concatenate(list(descriptors(10 ** 6, 200, 300, modes, a.seed)))
    voc = Vocabulary(a.words, iterations=5, seed=a.seed, threads=1).fit(train)
    cb = asmk.Codebook.from_vocabulary(voc)
    names = [[f"s{s}/{i:06d}" for i in range(a.images)] for s in range(a.shards)]
    shard_dirs, shard_cpu = [], []
    for s in range(a.shards):
        p = os.path.join(a.workdir, f"shard-{s:05d}")
        _, c, _ = timed(lambda: asmk.build_on_disk(cb, descriptors(s, a.images, a.features, modes, a.seed), p,
                                                   a.method, names=names[s]))
        shard_dirs.append(p)
        shard_cpu.append(c)
    merged = os.path.join(a.workdir, "merged")
    _, merge_cpu, merge_wall = timed(lambda: asmk.merge_database_shards(shard_dirs, merged))
    one = os.path.join(a.workdir, "one")

    def all_images():
        for s in range(a.shards):
            yield from descriptors(s, a.images, a.features, modes, a.seed)

    _, one_cpu, _ = timed(lambda: asmk.build_on_disk(cb, all_images(), one, a.method,
                                                     names=[n for ns in names for n in ns]))
    n_img = a.shards * a.images
    print(f"{a.method}, {a.shards} shards x {a.images} images x {a.features} features, {a.words} words, "
          f"index {dir_mb(merged):.1f} MB\n")
    print("| step | CPU s | note |\n|---|---|---|")
    print(f"| shard builds (sum) | {sum(shard_cpu):.2f} | {min(shard_cpu):.2f}-{max(shard_cpu):.2f} s per shard |")
    print(f"| merge | {merge_cpu:.2f} | wall {merge_wall:.2f} s, {1e3 * merge_cpu / n_img:.3f} ms per image |")
    print(f"| critical path (slowest shard + merge) | {max(shard_cpu) + merge_cpu:.2f} | what {a.shards} workers take |")
    print(f"| one build of everything | {one_cpu:.2f} | single machine |")
    print(f"\nmerged arrays identical to the one build: {crcs(merged) == crcs(one)}")


if __name__ == "__main__":
    main()
