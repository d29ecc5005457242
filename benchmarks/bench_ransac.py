"""Speed and inliers of spatial verification on real image pairs, against OpenCV in the same run.

For each pair of ../shared/data/pairs (OpenCV SIFT, at most --features per image) the tentative
correspondences are built once — from visual words when --vocab is given (query multiple
assignment --ma), else by descriptor nearest neighbours with a ratio test — and verified by

  * bowretrieval fast spatial matching (affine hypotheses from single correspondences + LO + homography)
  * the same without the homography upgrade (affine only)
  * cv2.findHomography(USAC_MAGSAC) and cv2.estimateAffine2D (RANSAC) on the same point pairs

with one thread each, all with the same pixel threshold. Prints median / p90 milliseconds per pair
and the inliers; for graf1/graf3 also the inliers within the threshold of the ground-truth
homography (an upper bound for any model).

    python benchmarks/bench_ransac.py [--vocab vocab.npz] [--features 2000] [--repeat 50]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cv2  # noqa: E402

from bowretrieval.correspondences import descriptor_matches, word_matches  # noqa: E402
from bowretrieval.descriptors import transform  # noqa: E402
from bowretrieval.features import get_extractor  # noqa: E402
from bowretrieval.imageio import load_gray  # noqa: E402
from bowretrieval.paths import shared_data_dir  # noqa: E402
from bowretrieval.ransac import SpatialVerifier, apply_model  # noqa: E402

PAIRS = [("graf1.png", "graf3.png"), ("box.png", "box_in_scene.png"), ("aero1.jpg", "aero3.jpg"),
         ("leuvenA.jpg", "leuvenB.jpg")]


def timed(fn, repeat):
    ts, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    ts = np.array(ts) * 1e3
    return float(np.median(ts)), float(np.percentile(ts, 90)), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", help="vocabulary (.npz) for word correspondences (default: ratio-test matches)")
    ap.add_argument("--ma", type=int, default=3, help="query multiple assignment for word correspondences")
    ap.add_argument("--ratio", type=float, default=0.9, help="ratio test without --vocab")
    ap.add_argument("--features", type=int, default=2000, help="SIFT features per image at most")
    ap.add_argument("--threshold", type=float, default=12.0, help="inlier threshold in px at 1024 px")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--max-hypotheses", type=int, default=300)
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)
    pairs_dir = shared_data_dir() / "pairs"
    if not pairs_dir.is_dir():
        print(f"{pairs_dir} not found; set BOWR_SHARED_DATA")
        return 1
    voc = None
    if args.vocab:
        from bowretrieval.vocabulary import Vocabulary

        voc = Vocabulary.load(args.vocab)
        voc.threads = 1
    ex = get_extractor("sift", max_features=args.features)
    H13 = None
    if (pairs_dir / "H1to3p.xml").exists():
        fs = cv2.FileStorage(str(pairs_dir / "H1to3p.xml"), cv2.FILE_STORAGE_READ)
        H13 = fs.getNode("H13").mat()
        fs.release()
    rows = []
    for a, b in PAIRS:
        if not (pairs_dir / a).exists() or not (pairs_dir / b).exists():
            continue
        ia, ib = load_gray(pairs_dir / a), load_gray(pairs_dir / b)
        fa, fb = ex.extract(ia.gray), ex.extract(ib.gray)
        da, db = transform(fa.descriptors, "rootsift"), transform(fb.descriptors, "rootsift")
        if voc is not None:
            m = word_matches(voc.assign(da, args.ma), voc.assign(db, 1))
            src = f"words MA{args.ma}"
        else:
            m = descriptor_matches(da, db, args.ratio)
            src = f"ratio {args.ratio}"
        size_b = ib.gray.shape[::-1]
        ver = SpatialVerifier(threshold=args.threshold, max_hypotheses=args.max_hypotheses, threads=1)
        ver_aff = SpatialVerifier(threshold=args.threshold, max_hypotheses=args.max_hypotheses, homography=False)
        thr = ver.threshold_for(size_b)
        p, q = fa.frames[m[:, 0], :2].astype(np.float32), fb.frames[m[:, 1], :2].astype(np.float32)
        name = f"{os.path.splitext(a)[0]}/{os.path.splitext(b)[0]}"
        head = f"{name} ({len(fa)}/{len(fb)} feats, {len(m)} {src}, thr {thr:.1f}px)"
        t, t90, v = timed(lambda: ver.verify(fa.frames, fb.frames, m, size_b), args.repeat)
        rows.append((head, "bowr FSM+LO+H", t, t90, v.n_inliers, v.model if v.kind != "none" else None))
        t, t90, v = timed(lambda: ver_aff.verify(fa.frames, fb.frames, m, size_b), args.repeat)
        rows.append((head, "bowr FSM+LO affine", t, t90, v.n_inliers, v.model if v.kind != "none" else None))
        if len(m) >= 4:
            t, t90, (H, mask) = timed(lambda: cv2.findHomography(p, q, cv2.USAC_MAGSAC, thr), args.repeat)
            rows.append((head, "cv2 findHomography USAC_MAGSAC", t, t90,
                         int(mask.sum()) if mask is not None else 0, H))
        if len(m) >= 3:
            t, t90, (A, mask) = timed(lambda: cv2.estimateAffine2D(p, q, ransacReprojThreshold=thr), args.repeat)
            rows.append((head, "cv2 estimateAffine2D RANSAC", t, t90, int(mask.sum()) if mask is not None else 0,
                         None if A is None else np.vstack([A, [0, 0, 1]])))
        if a == "graf1.png" and H13 is not None:
            e = np.linalg.norm(apply_model(H13, p) - q, axis=1)
            rows.append((head, "ground-truth H13 (upper bound)", float("nan"), float("nan"), int((e < thr).sum()), H13))
    print(f"\n| pair | method | median ms | p90 ms | inliers | max err vs GT (graf, px) |\n|---|---|---|---|---|---|")
    for head, meth, t, t90, n, model in rows:
        gerr = ""
        if head.startswith("graf1") and H13 is not None and model is not None:
            g = np.stack(np.meshgrid(np.linspace(100, 700, 13), np.linspace(100, 540, 12)), -1).reshape(-1, 2)
            gerr = f"{np.nanmax(np.linalg.norm(apply_model(model, g) - apply_model(H13, g), axis=1)):.1f}"
        print(f"| {head} | {meth} | {t:.3f} | {t90:.3f} | {n} | {gerr} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
