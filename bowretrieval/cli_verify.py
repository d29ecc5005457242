"""Command-line pieces of spatial verification (docs/spatial_verification.md):

    bowr search INDEX q.jpg --verify [--qe avg|hqe] [--out-matches matches.jpg]
    bowr eval DATASET --train T --work W --verify [--qe avg]
    bowr verify a.jpg b.jpg [--out matches.jpg]      # one pair, for looking at

``register`` adds ``bowr verify``; ``add_search_args`` / ``add_eval_args`` add the options that
``cli.py`` hands to ``search`` / ``apply_eval_args``.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .errors import BowRetrievalError

QE_CHOICES = ("none", "avg", "hqe")


def add_search_args(p):
    p.add_argument("--verify", action="store_true", help="re-rank the top results by spatial verification")
    p.add_argument("--qe", choices=QE_CHOICES, default=None,
                   help="query expansion from verified images (avg; hqe needs an hqe index); implies --verify")
    p.add_argument("--features", default=None, help="database feature store (default: the one the index was built from)")
    p.add_argument("--out-matches", default=None, metavar="FILE",
                   help="write a picture of the query beside its top results with the inlier matches "
                        "(FILE; with several queries, -<i> is added before the extension)")
    p.add_argument("--verify-top", type=int, default=None, help="results verified per query (default 100)")
    p.add_argument("--verify-threshold", type=float, default=None, help="inlier threshold, px at 1024 px (default 12)")


def add_eval_args(p):
    p.add_argument("--verify", action="store_true", help="spatial verification of the top 100 (verify.enabled)")
    p.add_argument("--qe", choices=QE_CHOICES, default=None, help="query expansion from verified images (verify.qe)")


def apply_eval_args(cfg, args):
    if getattr(args, "verify", False) or (getattr(args, "qe", None) or "none") != "none":
        cfg.verify.enabled = True
    if getattr(args, "qe", None):
        cfg.verify.qe = args.qe
    return cfg


def _describe(path, meta, bbox):
    """Frames, descriptors (the index's variant) and size of one query, described like the database."""
    from .descriptors import transform
    from .extract import ExtractJob, _extract_one
    from .features import get_extractor

    ecfg = meta.get("extract") or {}
    if not ecfg:
        raise BowRetrievalError("the index directory records no extractor settings; rebuild it with `bowr index build`")
    ex = get_extractor(ecfg["extractor"], **(ecfg.get("params") or {}))
    _, feats, info, _ = _extract_one(ExtractJob("q", os.fspath(path), bbox), ecfg.get("max_side") or None, ex)
    if feats is None:
        raise BowRetrievalError(f"query {path}: {info}")
    d = feats.descriptors
    if d.ndim == 3:
        d = d[:, d.shape[1] // 2, :]
    vcfg = meta["vocab"]
    desc = transform(d, vcfg["descriptor"], vcfg["beta"]) if len(d) else np.zeros((0, 128), np.float32)
    return feats.frames, desc, info


def _image_path(root, name):
    if root:
        for cand in (os.path.join(root, name), *(os.path.join(root, name + e) for e in (".jpg", ".png", ".jpeg"))):
            if os.path.exists(cand):
                return cand
    return None


def search_verified(args, index, names, voc, meta, bbox) -> int:
    """``bowr search`` with --verify / --qe / --out-matches."""
    from .config import VerifyConfig
    from .featurestore import FeatureStore
    from .rerank import QueryFeatures, database_features, query_region, verified_search

    vcfg = VerifyConfig(enabled=True, qe=args.qe or "none", threads=max(1, args.threads))
    if args.verify_top is not None:
        vcfg.top = args.verify_top
    if args.verify_threshold is not None:
        vcfg.threshold = args.verify_threshold
    store_path = args.features or meta.get("features")
    if not store_path or not os.path.exists(store_path):
        raise BowRetrievalError(f"verification needs the database feature store ({store_path or 'not recorded'}); "
                                "pass --features DB.h5")
    variant, beta = meta["vocab"]["descriptor"], meta["vocab"]["beta"]
    out = []
    with FeatureStore(store_path) as st:
        db = database_features(index, st, names, voc, variant, beta, in_memory=False)
        search = verified_search(index, db, vcfg, voc, lambda i: st.descriptors(names[i], variant, beta=beta))
        for qi, qpath in enumerate(args.queries):
            frames, desc, size = _describe(qpath, meta, bbox)
            region = query_region(frames, bbox, None if bbox else size)
            ranking, ver, stats = search.search(QueryFeatures(frames, desc, region))
            top = [int(j) for j in ranking[: args.top]]
            entry = {"query": qpath, "top": [names[j] for j in top],
                     "inliers": [ver[j].n_inliers if j in ver else None for j in top]}
            out.append(entry)
            if not args.json:
                print(f"{qpath}:")
                for r, (j, n) in enumerate(zip(top, entry["inliers"]), 1):
                    tag = "" if n is None else f"  {n} inliers" + (" (verified)" if n >= search.reranker.min_inliers else "")
                    print(f"  {r:3d}. {names[j]}{tag}")
            if args.out_matches:
                target = args.out_matches
                if len(args.queries) > 1:
                    stem, ext = os.path.splitext(args.out_matches)
                    target = f"{stem}-{qi}{ext}"
                _draw_search(qpath, bbox, frames, top[: min(5, args.top)], ver, db, names, meta, target)
                if not args.json:
                    print(f"  matches drawn in {target}")
    if args.json:
        print(json.dumps(out, indent=1))
    return 0


def _draw_search(qpath, bbox, q_frames, top, ver, db, names, meta, target):
    from .imageio import read_color
    from .rerank import draw_verification

    root = meta.get("image_root")
    results = []
    for j in top:
        p = _image_path(root, names[j])
        if p is None:
            raise BowRetrievalError(f"cannot find the image of {names[j]!r} under {root!r} to draw it; "
                                    "build the index with --image-root")
        v = ver.get(j)
        caption = f"{names[j][:28]}: {v.n_inliers if v else '-'} inl."
        results.append((read_color(p), v, q_frames, db.frames[j], caption))
    draw_verification(read_color(qpath), results, target, bbox=bbox)


# -- bowr verify ------------------------------------------------------------------------------------
def cmd_verify(args) -> int:
    from .cli import _parse_bbox, load_cli_config
    from .correspondences import descriptor_matches, word_matches
    from .descriptors import transform
    from .extract import ExtractJob, _extract_one
    from .features import get_extractor
    from .imageio import read_color
    from .ransac import SpatialVerifier
    from .rerank import draw_verification

    cfg = load_cli_config(args)
    e = cfg.extract
    ex = get_extractor(e.extractor, **e.params)
    bbox = _parse_bbox(args.bbox)
    feats = []
    for path, box in ((args.query, bbox), (args.database, None)):
        _, f, info, _ = _extract_one(ExtractJob("x", path, box), e.max_side or None, ex)
        if f is None:
            raise BowRetrievalError(f"{path}: {info}")
        feats.append((f, info))
    (fq, _), (fd, size_d) = feats
    dq = transform(fq.descriptors, cfg.vocab.descriptor, cfg.vocab.beta)
    dd = transform(fd.descriptors, cfg.vocab.descriptor, cfg.vocab.beta)
    if args.vocab:
        from .vocabulary import Vocabulary

        voc = Vocabulary.load(args.vocab)
        m = word_matches(voc.assign(dq, cfg.verify.match_ma) if len(dq) else np.zeros((0, 1), np.int32),
                         voc.assign(dd, 1) if len(dd) else np.zeros((0, 1), np.int32), cfg.verify.burst_limit)
    else:
        m = descriptor_matches(dq, dd, args.ratio)
    v = SpatialVerifier(threshold=cfg.verify.threshold, reference_side=cfg.verify.reference_side,
                        max_hypotheses=cfg.verify.max_hypotheses, homography=cfg.verify.homography,
                        max_scale_change=cfg.verify.max_scale_change,
                        max_angle=cfg.verify.max_angle).verify(fq.frames, fd.frames, m, size_d)
    print(f"{args.query} -> {args.database}: {len(fq)} / {len(fd)} features, {len(m)} tentative matches, "
          f"{v.n_inliers} inliers ({v.kind})")
    if v.kind != "none":
        print("model (query px -> database px):\n" + np.array2string(v.model, precision=5, suppress_small=True))
    if args.out:
        draw_verification(read_color(args.query), [(read_color(args.database), v, fq.frames, fd.frames,
                                                    f"{v.n_inliers} inliers")], args.out, height=480, bbox=bbox)
        print(f"matches drawn in {args.out}")
    return 0


def register(subparsers):
    from .cli import _add_config_args

    p = subparsers.add_parser("verify", help="spatially verify one image pair and draw the inliers",
                              description="Extract features of two images (extract section of the config), match "
                                          "them (ratio test, or shared visual words with --vocab), verify by fast "
                                          "spatial matching (verify section) and print / draw the inliers.")
    p.add_argument("query", help="query image")
    p.add_argument("database", help="database image")
    p.add_argument("--out", default=None, help="picture of the pair with the inlier matches (.jpg/.png)")
    p.add_argument("--bbox", default=None, help="crop the query to x1,y1,x2,y2 first")
    p.add_argument("--vocab", default=None, help="vocabulary (.npz): tentative matches from shared words")
    p.add_argument("--ratio", type=float, default=0.85, help="ratio test of descriptor matches (without --vocab)")
    _add_config_args(p)
    p.set_defaults(func=cmd_verify)
