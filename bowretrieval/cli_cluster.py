"""``bowr cluster extract|assign|index``: the sharded stages of ``bowretrieval.cluster`` on Dask."""
from __future__ import annotations

import contextlib
import os

from .errors import BowRetrievalError

SCHEDULERS = ("threads", "processes", "synchronous")


@contextlib.contextmanager
def _scheduler(args):
    """(scheduler, dask.compute keywords) for --scheduler / --workers; a tcp:// address connects a
    ``distributed.Client`` for the duration of the command (its scheduler is then dask's default)."""
    s = args.scheduler
    if s in SCHEDULERS:
        yield s, ({"num_workers": args.workers} if args.workers and s != "synchronous" else {})
        return
    try:
        from distributed import Client
    except ImportError as exc:
        raise BowRetrievalError(f"--scheduler {s}: a cluster address needs dask.distributed "
                                "(pip install distributed); local choices: " + ", ".join(SCHEDULERS)) from exc
    with Client(s):
        yield None, {}


def cmd_cluster_extract(args) -> int:
    from .cli import load_cli_config
    from .cluster import extract_shards
    from .extract import jobs_from_paths
    from .imageio import list_images

    e = load_cli_config(args).extract
    paths = list_images(args.images)
    if not paths:
        raise BowRetrievalError(f"{args.images}: no images found (extensions .jpg .png ...); nothing to extract")
    root = args.images if os.path.isdir(args.images) else None
    with _scheduler(args) as (sched, kw):
        reports = extract_shards(jobs_from_paths(paths, root), args.out, args.shards, e.extractor, e.params,
                                 e.max_side or None, retry_failed=args.retry_failed, scheduler=sched, **kw)
    for rep in reports:
        print(rep.summary())
    print(f"{args.out}: {len(reports)} shards, {sum(r.done for r in reports)} extracted, "
          f"{sum(r.skipped for r in reports)} already present, {sum(len(r.failed) for r in reports)} failed")
    return 0


def _stores(args):
    from .cluster import shard_stores

    return [s for p in args.features for s in shard_stores(p)]


def cmd_cluster_assign(args) -> int:
    from .cluster import assign_shards

    with _scheduler(args) as (sched, kw):
        files = assign_shards(_stores(args), args.vocab, args.out, args.k, scheduler=sched, **kw)
    for f in files:
        print(f)
    return 0


def cmd_cluster_index(args) -> int:
    from .cli import load_cli_config
    from .cluster import index_shards

    cfg = load_cli_config(args)
    stores = _stores(args)
    with _scheduler(args) as (sched, kw):
        index_shards(stores, args.vocab, args.out, cfg, image_root=args.image_root, keep_shards=args.keep_shards,
                     scheduler=sched, **kw)
    print(f"{args.out}: {len(stores)} shard(s) indexed and merged ({cfg.search.method})")
    return 0


def register(subparsers) -> None:
    from .cli import _add_config_args, _add_method_arg

    p = subparsers.add_parser("cluster", help="sharded extraction, assignment and indexing on Dask",
                              description="The extract / assign / index stages split into shards, one Dask task "
                                          "each, run on a local scheduler or a Dask cluster (needs the [dask] "
                                          "extra; every path must be on a filesystem all workers see). "
                                          "See docs/cluster.md.")
    sub = p.add_subparsers(dest="cluster_command", metavar="ACTION")

    def common(q):
        q.add_argument("--scheduler", default="threads",
                       help="threads | processes | synchronous, or a cluster address tcp://HOST:8786 "
                            "(default: threads)")
        q.add_argument("--workers", type=int, default=0, help="local threads/processes (default: dask's)")

    e = sub.add_parser("extract", help="extract images into N shard feature stores",
                       description="Sort the images by name, cut them into --shards contiguous shards and extract "
                                   "each into OUT/shard-0000k.h5 (resumable; bad images are skipped and listed).")
    e.add_argument("images", help="folder of images or a .txt file with one path per line")
    e.add_argument("--out", required=True, help="folder for the shard stores")
    e.add_argument("--shards", type=int, required=True, help="number of shards (tasks)")
    e.add_argument("--retry-failed", action="store_true", help="try again images that failed before")
    common(e)
    _add_config_args(e)
    e.set_defaults(func=cmd_cluster_extract)

    a = sub.add_parser("assign", help="assign every shard's features to visual words",
                       description="One task per shard store: OUT/<store>.words.npz with the k nearest words of "
                                   "every feature (words, indptr, names).")
    a.add_argument("features", nargs="+", help="shard folder from `bowr cluster extract`, or store files")
    a.add_argument("--vocab", required=True, help="vocabulary (.npz) from `bowr vocab build`")
    a.add_argument("--out", default=None, help="folder for the words files (default: next to each store)")
    a.add_argument("--k", type=int, default=1, help="words per feature (multiple assignment)")
    common(a)
    a.set_defaults(func=cmd_cluster_assign)

    i = sub.add_parser("index", help="index shard stores and merge them into one index directory",
                       description="One task per shard builds an ASMK*/SMK*/HQE database out of core; a final task "
                                   "merges them into OUT (the directory `bowr index build` writes for one store "
                                   "of the same images, byte for byte in its arrays).")
    i.add_argument("features", nargs="+", help="shard folder from `bowr cluster extract`, or store files in order")
    i.add_argument("--vocab", required=True, help="vocabulary (.npz) from `bowr vocab build`")
    i.add_argument("--out", required=True, help="index directory to write")
    i.add_argument("--image-root", default=None, help="folder the image names are relative to")
    i.add_argument("--keep-shards", action="store_true", help="keep OUT/shards/ (per-shard databases)")
    common(i)
    _add_method_arg(i)
    _add_config_args(i)
    i.set_defaults(func=cmd_cluster_index)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
