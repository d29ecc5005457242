"""Hessian-Affine benchmark: our modes against pyhesaff (the reference program's wheel) and OpenCV SIFT.

Prints, for graf1/graf3 of ../shared/data/pairs (native 800x640 and resized to 1024x768), every
extractor getting the same 8-bit grey image (pyhesaff's API takes 8-bit arrays only):
features on image 1, seconds per image, repeatability (projected centre within 2.5 px, over the
common area) and mutual-nearest-neighbour RootSIFT matches consistent with H (5 px); then the
compat overlap with pyhesaff, the speed ratios at 1024x768, the rotation test and peak RSS on a
4000x3000 photo. pyhesaff is a benchmark-only dependency (`pip install --no-deps pyhesaff ubelt`);
without it its rows are reported as unavailable with the reason.

    python benchmarks/bench_hesaff.py [--threads 2] [--repeats 3] [--out results.json] [--skip-rss]
"""
from __future__ import annotations

import os

# the kernels run a few short OpenMP regions per image; on a shared, oversubscribed machine spinning
# waiters cost more than they save (set before any OpenMP library starts)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess
import sys
import time

import cv2
import numpy as np
from scipy.spatial import cKDTree

from bowretrieval.descriptors import rootsift
from bowretrieval.featureeval import consistent_matches, load_homography, mutual_nn, repeatability
from bowretrieval.features import get_extractor
from bowretrieval.hesaff import HessianAffine
from bowretrieval.imageio import load_gray, read_color
from bowretrieval.paths import shared_data_dir


def pyhesaff_or_reason():
    try:
        import pyhesaff  # noqa: F401

        return pyhesaff, None
    except Exception as exc:  # ImportError, or a broken wheel
        return None, f"{type(exc).__name__}: {exc}"


class PyHesaff:
    """pyhesaff in up-right mode (its dominant-orientation mode is unreliable), as frames + SIFT."""

    def __init__(self, mod):
        self.mod = mod

    def extract(self, gray):
        # the program converts colour as (R+G+B)/3; give it that grey replicated in 3 channels
        g8 = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
        return self._frames(*self.mod.detect_feats_in_image(np.ascontiguousarray(np.dstack([g8, g8, g8]))))

    def extract_colour(self, bgr):
        """The program's own colour path: (R+G+B)/3 in float, as our load_gray."""
        return self._frames(*self.mod.detect_feats_in_image(np.ascontiguousarray(bgr)))

    @staticmethod
    def _frames(kpts, desc):
        # its keypoints are (x, y, a, c, d, ori) with the lower-triangular frame [[a, 0], [c, d]]
        frames = np.zeros((len(kpts), 6), np.float32)
        frames[:, :2] = kpts[:, :2]
        frames[:, 2] = kpts[:, 2]
        frames[:, 4] = kpts[:, 3]
        frames[:, 5] = kpts[:, 4]
        return frames, desc


def make_extractors(threads, pyh):
    ex = {}
    for mode in ("compat", "fast"):
        for ori in ("upright", "dominant"):
            h = HessianAffine(mode=mode, orientation=ori, threads=threads)
            ex[f"hesaff {mode} {ori}"] = (lambda g, h=h: _ours(h, g))
    ex["hesaff fast upright 3 regions"] = (
        lambda g, h=HessianAffine(mode="fast", regions=(0.5, 1.0, 1.5), threads=threads): _ours(h, g, region=1))
    if pyh is not None:
        p = PyHesaff(pyh)
        ex["pyhesaff upright"] = p.extract
    sift = get_extractor("sift")
    ex["opencv sift"] = lambda g: _ours(sift, g)
    return ex


def _ours(ex, g, region=None):
    f = ex.extract(g)
    d = f.descriptors if region is None else f.descriptors[:, region]
    return f.frames, d


def timed(fn, img, repeats):
    best, out = np.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(img)
        best = min(best, time.perf_counter() - t)
    return out, best


def resize_pair(g1, g3, H, size):
    w, h = size
    s1 = np.diag([w / g1.shape[1], h / g1.shape[0], 1.0])
    s3 = np.diag([w / g3.shape[1], h / g3.shape[0], 1.0])
    # pixel centres at integer coordinates: x' = (x + 0.5) s - 0.5
    for s in (s1, s3):
        s[0, 2] = 0.5 * s[0, 0] - 0.5
        s[1, 2] = 0.5 * s[1, 1] - 0.5
    r1 = cv2.resize(g1, size, interpolation=cv2.INTER_AREA)
    r3 = cv2.resize(g3, size, interpolation=cv2.INTER_AREA)
    return r1, r3, s3 @ H @ np.linalg.inv(s1)


def pair_table(name, g1, g3, H, extractors, repeats):
    rows = {}
    for key, fn in extractors.items():
        (f1, d1), t1 = timed(fn, g1, repeats)
        (f3, d3), t3 = timed(fn, g3, repeats)
        rep = repeatability(f1, f3, H, g1.shape, g3.shape, tol=2.5)["repeatability"]
        pairs = mutual_nn(rootsift(d1), rootsift(d3))
        m = consistent_matches(f1, f3, pairs, H, tol=5.0)
        rows[key] = dict(features=len(f1), features3=len(f3), s_per_image=(t1 + t3) / 2, repeatability=rep,
                         matches=m, frames1=f1)
    print(f"\n## {name} ({g1.shape[1]}x{g1.shape[0]})")
    print("| extractor | features img1 | s / image | repeatability (2.5 px) | mutual-NN RootSIFT matches with H (5 px) |")
    print("|---|---|---|---|---|")
    for key, r in rows.items():
        print(f"| {key} | {r['features']} | {r['s_per_image']:.3f} | {r['repeatability']:.3f} | {r['matches']} |")
    return rows


def overlap(ref, ours, tol=1.0, shape_tol=0.15):
    """Fraction of reference frames with one of ours within ``tol`` px and a similar shape
    (relative Frobenius difference of the frame matrices below ``shape_tol``)."""
    if len(ref) == 0 or len(ours) == 0:
        return 0.0, 0.0
    tree = cKDTree(ours[:, :2])
    near = tree.query_ball_point(ref[:, :2], tol)
    pos = np.array([bool(js) for js in near])
    ok = np.zeros(len(ref), bool)
    for i, js in enumerate(near):
        A = ref[i, 2:].reshape(2, 2)
        for j in js:
            if np.linalg.norm(ours[j, 2:].reshape(2, 2) - A) / np.linalg.norm(A) < shape_tol:
                ok[i] = True
                break
    return float(pos.mean()), float(ok.mean())


def same_input_table(pairs, pyh, threads):
    """compat against pyhesaff when both see exactly the same image: the 8-bit grey of the tables
    above, and at native size also pyhesaff's own colour path, whose unrounded (R+G+B)/3 is
    bit-identical to the grey our load_gray makes of the colour file. Exact agreement: centre within 0.05 px,
    frame matrix within 1%."""
    print("\n## compat vs pyhesaff on identical input (up-right; exact: centre within 0.05 px, frame within 1%)")
    print("| input | features ours / pyhesaff | pyhesaff frames exactly reproduced | descriptors of those: max / mean abs diff | matches ours / pyhesaff |")
    print("|---|---|---|---|---|")
    ours = HessianAffine(mode="compat", threads=threads)
    ref = PyHesaff(pyh)
    res = {}
    for name, (a, b, H, colour) in pairs.items():
        if colour is None:
            a8, b8 = (np.clip(np.rint(x), 0, 255).astype(np.float32) for x in (a, b))
            fo = [ours.extract(a8), ours.extract(b8)]
            fr = [ref.extract(a8), ref.extract(b8)]
        else:  # pyhesaff reads the colour image; ours the grey load_gray makes of it
            fo = [ours.extract(a), ours.extract(b)]
            fr = [ref.extract_colour(c) for c in colour]
        m_o = consistent_matches(fo[0].frames, fo[1].frames,
                                 mutual_nn(rootsift(fo[0].descriptors), rootsift(fo[1].descriptors)), H, tol=5.0)
        m_r = consistent_matches(fr[0][0], fr[1][0], mutual_nn(rootsift(fr[0][1]), rootsift(fr[1][1])), H, tol=5.0)
        rf, rd = fr[0]
        dist, j = cKDTree(fo[0].frames[:, :2]).query(rf[:, :2])
        shape = np.linalg.norm(fo[0].frames[j, 2:] - rf[:, 2:], axis=1) / np.linalg.norm(rf[:, 2:], axis=1)
        same = (dist < 0.05) & (shape < 0.01)
        diff = np.abs(fo[0].descriptors[j[same]].astype(int) - rd[same].astype(int))
        res[name] = dict(features=len(fo[0]), features_pyhesaff=len(rf), exact=float(same.mean()),
                         desc_max_diff=int(diff.max()), desc_mean_diff=float(diff.mean()), matches=m_o,
                         matches_pyhesaff=m_r)
        print(f"| {name} | {len(fo[0])} / {len(rf)} | {same.mean():.3f} | {diff.max()} / {diff.mean():.4f} | {m_o} / {m_r} |")
    return res


def speed_table(g, pyh, threads, repeats):
    fns = {"fast, 1 region": HessianAffine(mode="fast", threads=threads).extract,
           "fast, 3 regions (0.5, 1, 1.5)": HessianAffine(mode="fast", regions=(0.5, 1.0, 1.5), threads=threads).extract,
           "compat, 1 region": HessianAffine(mode="compat", threads=threads).extract}
    if pyh is not None:
        fns["pyhesaff, 1 region"] = PyHesaff(pyh).extract
    times = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved so that load changes hit every contender alike
        for k, fn in fns.items():
            t = time.perf_counter()
            fn(g)
            times[k].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    print(f"\n## speed at {g.shape[1]}x{g.shape[0]} (best of {repeats}, ours on {threads} threads)")
    print("| extractor | s / image | speed-up vs pyhesaff |")
    print("|---|---|---|")
    for k, t in best.items():
        ratio = best["pyhesaff, 1 region"] / t if "pyhesaff, 1 region" in best else float("nan")
        print(f"| {k} | {t:.3f} | {ratio:.2f}x |")
    return best


def rotate(g, deg):
    h, w = g.shape
    M = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), deg, 1.0)
    cos, sin = abs(M[0, 0]), abs(M[0, 1])
    nw, nh = int(np.ceil(h * sin + w * cos)), int(np.ceil(h * cos + w * sin))
    M[0, 2] += (nw - w) / 2.0
    M[1, 2] += (nh - h) / 2.0
    out = cv2.warpAffine(g, M, (nw, nh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out, np.vstack([M, [0, 0, 1]])


def rotation_table(g, threads):
    modes = {"fast dominant": HessianAffine(mode="fast", orientation="dominant", threads=threads),
             "fast upright": HessianAffine(mode="fast", orientation="upright", threads=threads),
             "compat dominant": HessianAffine(mode="compat", orientation="dominant", threads=threads)}
    res = {}
    print("\n## rotation: graf1 against itself rotated (mutual-NN RootSIFT matches consistent with the rotation, 5 px)")
    print("| extractor | 0 deg | 30 deg | 60 deg | 90 deg | kept at 30 / 60 / 90 |")
    print("|---|---|---|---|---|---|")
    for key, ex in modes.items():
        a = ex.extract(g)
        ra = rootsift(a.descriptors)
        counts = []
        for deg in (0, 30, 60, 90):
            if deg == 0:
                b, H = a, np.eye(3)
                rb = ra
            else:
                gr, H = rotate(g, deg)
                b = ex.extract(gr)
                rb = rootsift(b.descriptors)
            counts.append(consistent_matches(a.frames, b.frames, mutual_nn(ra, rb), H, tol=5.0))
        kept = [c / max(counts[0], 1) for c in counts[1:]]
        res[key] = dict(counts=counts, kept=kept)
        print(f"| {key} | {counts[0]} | {counts[1]} | {counts[2]} | {counts[3]} | "
              f"{kept[0]:.2f} / {kept[1]:.2f} / {kept[2]:.2f} |")
    return res


RSS_CHILD = r"""
import resource, sys, time, cv2, numpy as np
from bowretrieval.hesaff import HessianAffine
from bowretrieval.imageio import load_gray
g = load_gray(sys.argv[1]).gray
g = cv2.resize(g, (4000, 3000), interpolation=cv2.INTER_CUBIC)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
f = HessianAffine(mode=sys.argv[2], max_side=int(sys.argv[3]), regions=eval(sys.argv[4]), threads=int(sys.argv[5])).extract(g)
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(f), dt, base / 1024.0, peak / 1024.0)
"""


def rss_table(photo, threads):
    print(f"\n## peak RSS on a 4000x3000 image ({os.path.basename(photo)} upscaled), one process per row")
    print("| settings | features | s | RSS before extract (MiB) | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    res = {}
    for mode, max_side, regions in (("fast", 0, "(1.0,)"), ("fast", 0, "(0.5, 0.75, 1.0, 1.25, 1.5)"),
                                    ("fast", 2048, "(1.0,)"), ("compat", 0, "(1.0,)")):
        out = subprocess.run([sys.executable, "-c", RSS_CHILD, photo, mode, str(max_side), regions, str(threads)],
                             capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            print(f"| {mode} max_side={max_side} regions={regions} | failed: {out.stderr.strip()[-200:]} | | | |")
            continue
        n, dt, base, peak = out.stdout.split()
        key = f"{mode}, max_side={max_side}, regions={regions}"
        res[key] = dict(features=int(n), seconds=float(dt), base_mib=float(base), peak_mib=float(peak))
        print(f"| {key} | {n} | {float(dt):.2f} | {float(base):.0f} | {float(peak):.0f} |")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the figures as JSON")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--only", default="", help="comma list of sections: pairs,overlap,speed,rotation,rss")
    args = ap.parse_args(argv)
    only = set(filter(None, args.only.split(",")))
    run = lambda s: not only or s in only  # noqa: E731

    d = shared_data_dir() / "pairs"
    if not (d / "graf1.png").exists():
        print(f"graf1/graf3 not found in {d}; set BOWR_SHARED_DATA")
        return 1
    cv2.setNumThreads(args.threads)
    pyh, why = pyhesaff_or_reason()
    if pyh is None:
        print(f"pyhesaff unavailable ({why}); its rows are left out")
    # every extractor gets the same pixels: pyhesaff's Python API takes 8-bit images only, so the
    # (R+G+B)/3 grey is rounded to 8 bits once and that image goes to all of them (likewise after resizing)
    f1, f3 = load_gray(d / "graf1.png").gray, load_gray(d / "graf3.png").gray
    to8 = lambda x: np.clip(np.rint(x), 0, 255).astype(np.float32)  # noqa: E731
    g1, g3 = to8(f1), to8(f3)
    H = load_homography(d / "H1to3p.xml")
    r1, r3, Hr = resize_pair(g1, g3, H, (1024, 768))
    r1, r3 = to8(r1), to8(r3)
    results = {"threads": args.threads, "pyhesaff": why or "ok"}
    if run("pairs") or run("overlap"):
        ex = make_extractors(args.threads, pyh)
        native = pair_table("graf1 -> graf3", g1, g3, H, ex, args.repeats)
        resized = pair_table("graf1 -> graf3 resized", r1, r3, Hr, ex, args.repeats)
        strip = lambda t: {k: {kk: vv for kk, vv in v.items() if kk != "frames1"} for k, v in t.items()}  # noqa: E731
        results["graf"] = strip(native)
        results["graf_1024x768"] = strip(resized)
        if pyh is not None:
            ref = native["pyhesaff upright"]["frames1"]
            comp = native["hesaff compat upright"]["frames1"]
            pos, shape = overlap(ref, comp)
            cnt = len(comp) / max(len(ref), 1)
            print(f"\n## compat vs pyhesaff on graf1: our count / theirs = {cnt:.3f}; "
                  f"their frames with one of ours within 1 px: {pos:.3f}, and with a similar shape: {shape:.3f}")
            results["compat_overlap"] = dict(count_ratio=cnt, within_1px=pos, within_1px_similar_shape=shape)
            colour = (read_color(d / "graf1.png"), read_color(d / "graf3.png"))
            results["compat_same_input"] = same_input_table(
                {"graf 8-bit grey": (g1, g3, H, None), "graf 1024x768 8-bit grey": (r1, r3, Hr, None),
                 "graf colour (pyhesaff's own grey)": (f1, f3, H, colour)}, pyh, args.threads)
    if run("speed"):
        results["speed_1024x768"] = speed_table(r1, pyh, args.threads, max(args.repeats, 5))
    if run("rotation"):
        results["rotation"] = rotation_table(g1, args.threads)
    if run("rss") and not args.skip_rss:
        photo = shared_data_dir() / "landmarks-dev" / "jpg"
        photos = sorted(p for p in photo.glob("*.jpg") if not p.name.startswith("distractor"))
        results["rss_4000x3000"] = rss_table(str(photos[0] if photos else d / "graf1.png"), args.threads)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
