"""Feature stores for the short-vector benchmarks (cached under /work/cache/shortvec by default).

OpenCV SIFT keypoints described at five measurement-region sizes {0.5, 0.75, 1, 1.25, 1.5} x r:
an EMULATION of Hessian-Affine multiple measurement regions (the same detected frame described at
several relative sizes), used because the ``hesaff`` extractor with ``regions`` is not on main yet.
Region index 2 (1.0 x r) is exactly OpenCV SIFT, so the single-region variants use that slice.

    python benchmarks/shortvec_features.py [--out DIR] [--which train,db,crop,full]
"""
from __future__ import annotations

import argparse
import os
import sys

import cv2
import numpy as np

from bowretrieval.extract import ExtractJob, extract_to_store, jobs_from_paths
from bowretrieval.features import Features, OpenCVSift, frames_from_keypoints, register_extractor
from bowretrieval.descriptors import sift_to_uint8
from bowretrieval.imageio import list_images
from bowretrieval.paths import shared_data_dir
from bowretrieval.revisited import RevisitedDataset

REGION_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)


@register_extractor("sift-mr-emulated")
class SiftMeasurementRegions(OpenCVSift):
    """OpenCV SIFT keypoints, each described at several relative keypoint sizes -> (N, R, 128)."""

    def __init__(self, scales=REGION_SCALES, **kw):
        super().__init__(**kw)
        self.params["scales"] = [float(s) for s in scales]

    def extract(self, gray):
        R = len(self.params["scales"])
        if gray.size == 0 or min(gray.shape[:2]) < 8 or float(gray.max() - gray.min()) < 1e-6:
            return Features.empty(regions=R)
        img8 = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
        det = self._detector()
        kps = det.detect(img8, None)
        if not kps:
            return Features.empty(regions=R)
        frames = frames_from_keypoints(kps)
        _, keep = np.unique(np.round(frames, 3), axis=0, return_index=True)
        keep.sort()
        kps = [kps[i] for i in keep]
        # all regions in one compute call: the scale space is built once (same octave fields, so the
        # descriptors equal separate calls)
        n = len(kps)
        scaled = [cv2.KeyPoint(k.pt[0], k.pt[1], k.size * s, k.angle, k.response, k.octave, k.class_id)
                  for s in self.params["scales"] for k in kps]
        out_kps, d = det.compute(img8, scaled)
        if d is None or len(out_kps) != len(scaled):
            raise RuntimeError("SIFT compute dropped keypoints")
        descs = [sift_to_uint8(d[r * n:(r + 1) * n]) for r in range(R)]
        return Features(frames[keep], np.stack(descs, axis=1))


def stores(out):
    return {k: os.path.join(out, f"{k}-sift-mr.h5") for k in ("train", "db", "crop", "full")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/work/cache/shortvec")
    ap.add_argument("--which", default="train,db,crop,full")
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)
    data = shared_data_dir()
    if not (data / "landmarks-dev").is_dir():
        sys.exit(f"{data}: shared data not found (set BOWR_SHARED_DATA)")
    st = stores(args.out)
    for which in args.which.split(","):
        if which == "train":
            jobs = jobs_from_paths(list_images(data / "train-photos"))
        else:
            gnd = {"db": "gnd_landmarks-dev.json", "crop": "gnd_landmarks-dev-crop.json", "full": "gnd_landmarks-dev.json"}[which]
            ds = RevisitedDataset(data / "landmarks-dev", gnd)
            if which == "db":
                jobs = [ExtractJob(n, p) for n, p in zip(ds.imlist, ds.db_paths())]
            else:
                jobs = [ExtractJob(f"{i:05d}:{n}", ds.image_path(n), tuple(ds.gnd[i]["bbx"]) if ds.gnd[i]["bbx"] else None)
                        for i, n in enumerate(ds.qimlist)]
        rep = extract_to_store(jobs, st[which], "sift-mr-emulated", {}, 1024, workers=1)
        print(rep.summary(), flush=True)


if __name__ == "__main__":
    main()
