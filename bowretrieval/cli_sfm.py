"""``bowr sfm``: mine 3-D models from a photo collection and export training tuples (docs/sfm.md)."""
from __future__ import annotations


def _config(args):
    from bowretrieval.config import apply_overrides

    from .sfm.config import load_mine_config

    cfg = load_mine_config(args.config)
    cfg = apply_overrides(cfg, args.set)
    if args.min_model_size is not None:
        cfg.min_model_size = args.min_model_size
    if args.threads is not None:
        cfg.threads = args.threads
    return cfg


def cmd_mine(args) -> int:
    from .sfm.mine import mine

    s = mine(args.photos, args.out, _config(args), progress=not args.quiet)
    for m in s["models"]:
        print(f"model {m['id']}: {m['registered']} images, {m['points']} points, "
              f"reprojection error {m['reprojection_error']:.2f} px  {m['path']}")
    for f in s["failed_components"]:
        print(f"component {f['component']} ({f['images']} images) failed: {f['reason']}")
    print(f"{s['message']}; summary: {args.out}/summary.json")
    return 0


def cmd_export(args) -> int:
    from .sfm.tuples import TupleParams, export_tuples

    p = TupleParams(pool_size=args.pool_size, min_overlap=args.min_overlap, max_scale_change=args.max_scale_change,
                    query_fraction=args.query_fraction, max_queries=args.max_queries,
                    val_fraction=args.val_fraction, exclude_mode=args.exclude_mode, seed=args.seed)
    export_tuples(args.workdir, args.out, args.exclude, p)
    return 0


def cmd_match_test(args) -> int:
    from .sfm.exclude import matching_images

    matching_images(args.workdir, args.test_photos, args.out, args.top_k, progress=not args.quiet)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("sfm", help="retrieval-SfM: mine 3-D models, export training tuples",
                              description="Mine 3-D models from unordered photos (retrieval + verification + "
                                          "COLMAP) and export CNN training tuples. See docs/sfm.md.")
    sub = p.add_subparsers(dest="sfm_command", metavar="COMMAND")
    m = sub.add_parser("mine", help="reconstruct every landmark of a photo collection",
                       description="Stages: features, index, clusters, match, map, extend, finish. Artefacts of "
                                   "each stage stay in --out, so re-running the same command resumes.")
    m.add_argument("photos", help="folder of photos (or a .txt list of paths)")
    m.add_argument("--out", required=True, help="work folder (models, summary.json, caches)")
    m.add_argument("--config", metavar="FILE", help="YAML settings (configs/sfm.yaml)")
    m.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a setting, e.g. --set retrieval.top_k=30 (repeatable)")
    m.add_argument("--min-model-size", type=int, default=None, help="drop smaller components and models")
    m.add_argument("--threads", type=int, default=None, help="COLMAP, index and extraction threads")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.set_defaults(func=cmd_mine)
    x = sub.add_parser("match-test", help="list collection photos that match a test set (for --exclude)",
                       description="Query the mined collection with every test photo (same features, vocabulary "
                                   "and spatial verification) and write the verified collection photos, one per line.")
    x.add_argument("workdir", help="work folder of `bowr sfm mine`")
    x.add_argument("test_photos", help="folder (or .txt list) of the test set's photos")
    x.add_argument("--out", required=True, help="exclusion list to write")
    x.add_argument("--top-k", type=int, default=50, help="retrieval results verified per test photo")
    x.add_argument("--quiet", action="store_true", help="no progress bars")
    x.set_defaults(func=cmd_match_test)
    e = sub.add_parser("export-tuples", help="training tuples from mined models (docs/tuples_format.md)",
                       description="Write DIR/tuples.json (bowretrieval.tuples/1) and DIR/trainer.pkl "
                                   "(cnnimageretrieval-pytorch layout) from the models of a mining run.")
    e.add_argument("workdir", help="work folder of `bowr sfm mine`")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--exclude", metavar="LIST", help="text file of image names (e.g. a test set's images)")
    e.add_argument("--exclude-mode", choices=("models", "images"), default="models",
                   help="drop whole models holding an excluded image (default) or only those images")
    e.add_argument("--pool-size", type=int, default=100, help="nearest camera centres in the positive pool")
    e.add_argument("--min-overlap", type=float, default=0.2, help="shared 3-D points / query's points")
    e.add_argument("--max-scale-change", type=float, default=1.5, help="see docs/tuples_format.md")
    e.add_argument("--query-fraction", type=float, default=0.1, help="queries per model (fraction)")
    e.add_argument("--max-queries", type=int, default=30, help="queries per model at most")
    e.add_argument("--val-fraction", type=float, default=0.2, help="models in the validation split")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=cmd_export)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


__all__ = ["register"]
