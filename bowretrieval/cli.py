"""The ``bowr`` command line: a thin layer over the package's stages (see ``bowr --help``).

Each step reads one artefact and writes the next, so a user can run them one by one or all at once::

    bowr extract PHOTOS --out db.h5                    # images -> HDF5 feature store
    bowr vocab build --features train.h5 --out v.npz   # feature store -> vocabulary
    bowr index build --features db.h5 --vocab v.npz --out index/
    bowr search index/ query.jpg                       # ranked list
    bowr eval DATASET --train PHOTOS --work DIR        # all stages + revisited evaluation
    bowr demo                                          # the same on a generated dataset

Command groups of later capabilities live in their own modules (``PLUGINS``), each exposing
``register(subparsers)``.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys

from .errors import BowRetrievalError

# modules adding command groups; each defines register(subparsers)
PLUGINS: tuple = ("bowretrieval.cli_cluster", "bowretrieval.cli_finetune", "bowretrieval.cli_sfm",
                  "bowretrieval.cli_shortvec", "bowretrieval.cli_verify")

EPILOG = """steps:
  extract   detect and describe local features of a folder (or .txt list) of images into a
            resumable HDF5 feature store; bad images are skipped and listed
  vocab     learn a visual vocabulary (k-means) from a feature store
  index     assign database features to visual words and build an inverted-file index directory
  search    query an index with one or more images (optionally cropped with --bbox)
  eval      run every stage on a dataset in the revisited Oxford/Paris layout and print mAP
  demo      generate a small dataset and run the whole experiment on it
  config    print the configuration fields with their defaults, or check a YAML file

Every command takes --config FILE (YAML, see configs/) and --set section.key=value overrides."""


def _add_method_arg(p):
    p.add_argument("--method", choices=("bow", "smk", "asmk", "hqe"), default=None,
                   help="retrieval method (search.method): bow tf-idf, smk (SMK*), asmk (ASMK*), hqe "
                        "(Hamming query expansion); see docs/asmk.md")


def _add_config_args(p):
    p.add_argument("--config", metavar="FILE", help="YAML experiment configuration (default: built-in defaults)")
    p.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[],
                   help="override one configuration value (repeatable), e.g. --set vocab.size=4096")


def load_cli_config(args):
    """The experiment configuration from --config and --set (ConfigError names the file and field)."""
    from .config import ExperimentConfig, apply_overrides, load_config

    cfg = load_config(args.config) if getattr(args, "config", None) else ExperimentConfig()
    cfg = apply_overrides(cfg, getattr(args, "set", []))
    if getattr(args, "method", None):  # --method is a shortcut for --set search.method=...
        cfg.search.method = args.method
    return cfg


# -- extract ----------------------------------------------------------------------------------------
def cmd_extract(args) -> int:
    from .extract import extract_to_store, jobs_from_paths
    from .imageio import list_images

    cfg = load_cli_config(args)
    e = cfg.extract
    paths = list_images(args.images)
    if not paths:
        raise BowRetrievalError(f"{args.images}: no images found (extensions .jpg .png ...); nothing to extract")
    root = args.images if os.path.isdir(args.images) else None
    rep = extract_to_store(jobs_from_paths(paths, root), args.out, e.extractor, e.params, e.max_side or None,
                           args.workers or e.workers, retry_failed=args.retry_failed, progress=not args.quiet)
    print(rep.summary())
    return 0


# -- vocab ------------------------------------------------------------------------------------------
def cmd_vocab_build(args) -> int:
    from .multivocab import is_bundle_config
    from .pipeline import vocab_stage

    bundle = args.bundle or (args.config if args.config and is_bundle_config(args.config) else None)
    if bundle:  # a vocabulary bundle (configs/m*.yaml): vocabularies + joint PCA-whitening, one file
        from .cli_shortvec import cmd_vocab_bundle

        return cmd_vocab_bundle(args, bundle)
    cfg = load_cli_config(args)
    if os.path.exists(args.out) and not args.force:
        raise BowRetrievalError(f"{args.out}: exists; pass --force to learn it again")
    if args.force and os.path.exists(args.out):
        os.remove(args.out)
    voc = vocab_stage(args.features, cfg.vocab, args.out, progress=not args.quiet)  # writes <out>.yaml too
    print(f"{args.out}: {voc.n_words} words of dimension {voc.dim} "
          f"(inertia {getattr(voc, 'inertia_', float('nan')):.4g})")
    return 0


# -- index ------------------------------------------------------------------------------------------
def cmd_index_build(args) -> int:
    from .config import save_config
    from .featurestore import FeatureStore
    from .pipeline import index_stage
    from .vocabulary import Vocabulary

    cfg = load_cli_config(args)
    voc = Vocabulary.load(args.vocab)
    vyaml = os.path.splitext(args.vocab)[0] + ".yaml"
    if os.path.exists(vyaml):  # the descriptor variant the vocabulary was learned on travels with it
        from .config import VocabConfig, load_config

        cfg.vocab = load_config(vyaml, VocabConfig)
    with FeatureStore(args.features) as st:
        names = st.names()
        extractor, params = st.extractor, st.extractor_params
        max_side = int(st._h5.attrs.get("max_side", 0))
    if not names:
        raise BowRetrievalError(f"{args.features}: the feature store holds no images; run `bowr extract` first")
    cfg.extract.extractor, cfg.extract.params, cfg.extract.max_side = extractor, params, max_side
    index_stage(args.features, names, voc, cfg.search, cfg.vocab, args.out, progress=not args.quiet,
                extract_cfg=cfg.extract, image_root=args.image_root)
    save_config(cfg, os.path.join(args.out, "config.yaml"))
    print(f"{args.out}: {len(names)} images indexed with {voc.n_words} words ({cfg.search.method})")
    return 0


def cmd_index_verify(args) -> int:
    from .invfile import InvertedFile

    subs = [os.path.join(args.index, d) for d in ("bow", "asmk") if os.path.isdir(os.path.join(args.index, d))]
    for path in subs or [args.index]:
        man = InvertedFile.verify(path)
        nbytes = sum(e["bytes"] for e in man["arrays"].values())
        print(f"{path}: ok ({man['params']['kind']}, {man['n_images']} images, {man['n_entries']} entries, "
              f"{nbytes / 1e6:.1f} MB, format version {man['version']})")
    return 0


# -- search -----------------------------------------------------------------------------------------
def _parse_bbox(text):
    if text is None:
        return None
    try:
        b = [float(v) for v in text.split(",")]
    except ValueError:
        b = []
    if len(b) != 4 or b[2] <= b[0] or b[3] <= b[1]:
        raise BowRetrievalError(f"--bbox {text!r}: expected x1,y1,x2,y2 with x2 > x1 and y2 > y1")
    return tuple(b)


def cmd_search(args) -> int:
    from .pipeline import describe_queries, load_index_dir, query_stage

    index, names, voc, scfg, vcfg, meta = load_index_dir(args.index, threads=args.threads, with_meta=True)
    bbox = _parse_bbox(args.bbox)
    if args.verify or args.qe or args.out_matches:
        from .cli_verify import search_verified

        return search_verified(args, index, names, voc, meta, bbox)
    descs = describe_queries(args.queries, meta, bbox)
    ranks, _ = query_stage(index, voc, descs, scfg, progress=False)
    out = []
    for qi, q in enumerate(args.queries):
        top = [names[int(j)] for j in ranks[: args.top, qi]]
        out.append({"query": q, "top": top})
        if not args.json:
            print(f"{q}:")
            for r, n in enumerate(top, 1):
                print(f"  {r:3d}. {n}")
    if args.json:
        print(json.dumps(out, indent=1))
    return 0


# -- eval -------------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from .pipeline import run_experiment

    from .cli_verify import apply_eval_args

    cfg = apply_eval_args(load_cli_config(args), args)
    run_experiment(args.dataset, args.train, args.work, cfg, gnd_file=args.gnd, progress=not args.quiet)
    return 0


# -- demo -------------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, seed=args.seed, quick=args.quick, workers=args.workers, texture_dir=args.texture_dir,
             progress=not args.quiet)
    return 0


# -- config -----------------------------------------------------------------------------------------
def cmd_config(args) -> int:
    from .config import ExperimentConfig, describe, load_config, to_dict

    if args.file:
        cfg = load_config(args.file)
        import yaml

        print(f"{args.file}: valid")
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    else:
        print(describe(ExperimentConfig))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bowr", description="Particular-object image retrieval in the bag-of-words tradition.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"bowretrieval {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("extract", help="extract local features of images into an HDF5 feature store",
                       description="Detect and describe local features of every image in a folder (or a .txt "
                                   "list) into a resumable HDF5 store. Re-running skips images already done; "
                                   "unreadable images are skipped, recorded in the store and listed.")
    p.add_argument("images", help="folder of images or a .txt file with one path per line")
    p.add_argument("--out", required=True, help="feature store to create or extend (.h5)")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: extract.workers)")
    p.add_argument("--retry-failed", action="store_true", help="try again images that failed before")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_args(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("vocab", help="learn visual vocabularies",
                       description="Learn visual vocabularies with k-means (faiss).")
    vsub = p.add_subparsers(dest="vocab_command", metavar="ACTION")
    vb = vsub.add_parser("build", help="learn a vocabulary from a feature store",
                         description="k-means vocabulary (size, iterations, seed, descriptor variant: the "
                                     "vocab section of the config) learned on every image of a feature store.")
    vb.add_argument("bundle", nargs="?", metavar="CONFIG",
                    help="vocabulary-bundle YAML (configs/mrootsift.yaml ...): learn the bundle and its joint "
                         "PCA-whitening into one encoder file (see docs/shortvec.md)")
    vb.add_argument("--features", required=True, help="training feature store (.h5) from `bowr extract`")
    vb.add_argument("--out", required=True, help="vocabulary file to write (.npz)")
    vb.add_argument("--force", action="store_true", help="overwrite an existing vocabulary")
    vb.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_args(vb)
    vb.set_defaults(func=cmd_vocab_build)
    p.set_defaults(func=lambda a: _group_help(p))

    p = sub.add_parser("index", help="build inverted-file indexes",
                       description="Assign database features to visual words and build an index directory.")
    isub = p.add_subparsers(dest="index_command", metavar="ACTION")
    ib = isub.add_parser("build", help="index a feature store with a vocabulary",
                         description="Build an index directory (posting lists, vocabulary, image names, "
                                     "extractor settings and the config) from a database feature store.")
    ib.add_argument("--features", required=True, help="database feature store (.h5)")
    ib.add_argument("--vocab", required=True, help="vocabulary (.npz) from `bowr vocab build`")
    ib.add_argument("--out", required=True, help="index directory to write")
    ib.add_argument("--image-root", default=None, help="folder the store's image names are relative to "
                                                        "(recorded so results can be shown as pictures)")
    ib.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_method_arg(ib)
    _add_config_args(ib)
    ib.set_defaults(func=cmd_index_build)
    iv = isub.add_parser("verify", help="check an index directory (sizes, format version, CRC32 checksums)",
                         description="Read every array of an index directory and compare it with the CRC32 "
                                     "checksums, sizes and format version of its manifest; prints a summary.")
    iv.add_argument("index", help="index directory from `bowr index build` (or an inverted-file directory)")
    iv.set_defaults(func=cmd_index_verify)
    p.set_defaults(func=lambda a: _group_help(p))

    p = sub.add_parser("search", help="query an index with images",
                       description="Describe each query image like the database (same extractor settings) "
                                   "and print its ranked list.")
    p.add_argument("index", help="index directory from `bowr index build`")
    p.add_argument("queries", nargs="+", help="query image files")
    p.add_argument("--bbox", default=None, help="crop every query to x1,y1,x2,y2 (pixels) before describing it")
    p.add_argument("--top", type=int, default=10, help="results to print per query")
    p.add_argument("--threads", type=int, default=1, help="scoring threads")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    from .cli_verify import add_eval_args, add_search_args

    add_search_args(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("eval", help="run all stages on a revisited-format dataset and evaluate",
                       description="Extract (database, cropped queries, training images), learn the vocabulary "
                                   "on the training images, index, query and evaluate with the revisited "
                                   "protocol (mAP Easy/Medium/Hard, mP@k). Every stage reuses artefacts "
                                   "already in the work folder. Writes results-<dataset>.json and the config.")
    p.add_argument("dataset", help="dataset folder with jpg/ and gnd_<name>.json (or .pkl)")
    p.add_argument("--train", required=True, help="folder of independent training images for the vocabulary")
    p.add_argument("--work", required=True, help="work folder for features, vocabulary, index and results")
    p.add_argument("--gnd", default=None, help="ground-truth file inside the dataset (default: first gnd_*.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_method_arg(p)
    add_eval_args(p)
    _add_config_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="generate a small landmark dataset and run the whole experiment on it",
                       description="Render the embedded dataset (seeded 3D landmarks with known cameras, "
                                   "distractors and independent training images; see docs/formats.md), then "
                                   "extract, learn the vocabulary on the training images, index, query, "
                                   "evaluate, print the table and draw a query's top results and the "
                                   "precision-recall curves. Re-running reuses everything already computed.")
    p.add_argument("--out", default="bowr-demo", help="output folder (default: ./bowr-demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated dataset")
    p.add_argument("--quick", action="store_true", help="a tiny dataset (seconds; for smoke tests)")
    p.add_argument("--workers", type=int, default=2, help="extraction processes")
    p.add_argument("--texture-dir", default=None, help="folder of photos to use as facade textures")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("config", help="show configuration fields or check a YAML file",
                       description="Without FILE: every configuration field with its default and meaning. "
                                   "With FILE: validate it and print the resulting configuration.")
    p.add_argument("file", nargs="?", help="YAML configuration to check")
    p.set_defaults(func=cmd_config)

    for mod in PLUGINS:
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod).register(sub)
    return parser


def _group_help(p) -> int:
    p.print_help()
    return 2


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BowRetrievalError as exc:
        print(f"bowr: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bowr: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
