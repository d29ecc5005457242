"""3-D models as plain arrays: loading, similarity alignment (Umeyama) and a top-view picture.

A model folder holds COLMAP's binary model (cameras.bin, images.bin, points3D.bin) and
``model.npz`` written by the adapter: image names, camera centres ``C`` and rotations ``R``
(world-to-camera), mean focal lengths, 3-D points, and per image the ids and depths of the 3-D
points it observes (CSR: ``obs_indptr``, ``obs_point``, ``obs_depth``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import cv2
import numpy as np

from bowretrieval.errors import DataError


@dataclass
class Model:
    path: str
    names: list
    C: np.ndarray  # (n, 3) camera centres
    R: np.ndarray  # (n, 3, 3) world-to-camera rotations
    focal: np.ndarray  # (n,) pixels
    points: np.ndarray  # (P, 3)
    obs_indptr: np.ndarray  # (n + 1,)
    obs_point: np.ndarray  # point ids observed by image i: obs_point[obs_indptr[i]:obs_indptr[i+1]] (sorted)
    obs_depth: np.ndarray  # depth of each observed point in that camera
    point_error: np.ndarray | None = None

    def __len__(self):
        return len(self.names)

    def observed(self, i: int) -> np.ndarray:
        return self.obs_point[self.obs_indptr[i]:self.obs_indptr[i + 1]]

    def depths(self, i: int) -> np.ndarray:
        return self.obs_depth[self.obs_indptr[i]:self.obs_indptr[i + 1]]

    @classmethod
    def load(cls, path) -> "Model":
        path = os.fspath(path)
        f = os.path.join(path, "model.npz")
        try:
            with np.load(f, allow_pickle=False) as z:
                return cls(path, [str(n) for n in z["names"]], z["C"], z["R"], z["focal"], z["points"],
                           z["obs_indptr"], z["obs_point"], z["obs_depth"],
                           z["point_error"] if "point_error" in z else None)
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"{f}: not a readable model file ({exc}); re-run `bowr sfm mine`") from exc


def umeyama(src: np.ndarray, dst: np.ndarray):
    """Similarity (s, R, t) minimising sum ||s R src_i + t - dst_i||^2 (Umeyama, PAMI 1991)."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[0] < 3:
        raise DataError(f"umeyama: need two (n >= 3, d) arrays of equal shape, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    U, D, Vt = np.linalg.svd(cov)
    S = np.eye(src.shape[1])
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        S[-1, -1] = -1
    R = U @ S @ Vt
    var_s = (xs ** 2).sum() / len(src)
    s = float(np.trace(np.diag(D) @ S) / var_s) if var_s > 0 else 1.0
    t = mu_d - s * R @ mu_s
    return s, R, t


def camera_spread(C: np.ndarray) -> float:
    """RMS distance of camera centres from their mean (the yardstick of the accuracy figures)."""
    C = np.asarray(C, np.float64)
    return float(np.sqrt(((C - C.mean(0)) ** 2).sum(1).mean()))


def align_to_cameras(model: Model, cameras_json, name_map=None) -> dict:
    """Align the model's camera centres to ground truth (``cameras.json``: {image: {"C": ...}}).

    name_map: optional {model image name: ground-truth image name}. Returns the errors per image,
    their median / max and both as a fraction of the ground-truth camera spread.
    """
    with open(cameras_json) as fh:
        gt = json.load(fh)
    name_map = name_map or {}
    src, dst, used = [], [], []
    for i, n in enumerate(model.names):
        g = name_map.get(n, n)
        if g in gt:
            src.append(model.C[i])
            dst.append(gt[g]["C"])
            used.append(g)
    if len(src) < 3:
        raise DataError(f"{cameras_json}: only {len(src)} of the model's images have ground truth; need 3")
    src, dst = np.array(src), np.array(dst)
    s, R, t = umeyama(src, dst)
    err = np.linalg.norm((s * src @ R.T + t) - dst, axis=1)
    spread = camera_spread(np.array([v["C"] for v in gt.values()], np.float64))
    return dict(n=len(used), median=float(np.median(err)), max=float(err.max()), spread=spread,
                median_rel=float(np.median(err) / spread), max_rel=float(err.max() / spread),
                errors={u: float(e) for u, e in zip(used, err)}, scale=s)


def top_view(model: Model, path, size: int = 800, max_points: int = 20000, seed: int = 0) -> str:
    """Draw points and cameras seen from above (the plane spanned by the two main camera axes)."""
    C = model.C
    X = model.points
    if len(X) > max_points:
        X = X[np.random.default_rng(seed).choice(len(X), max_points, replace=False)]
    # "up" = mean camera y-axis (image down) negated; project onto the plane orthogonal to it
    up = -model.R[:, 1, :].mean(0) if len(C) else np.array([0, 0, 1.0])
    up /= max(np.linalg.norm(up), 1e-12)
    a = np.cross(up, [1.0, 0, 0]) if abs(up[0]) < 0.9 else np.cross(up, [0, 1.0, 0])
    a /= np.linalg.norm(a)
    b = np.cross(up, a)
    P = np.concatenate([X, C]) if len(X) else C
    uv = np.stack([P @ a, P @ b], 1)
    lo, hi = np.percentile(uv, 1, axis=0), np.percentile(uv, 99, axis=0)
    lo = np.minimum(lo, (C @ np.stack([a, b], 1)).min(0))
    hi = np.maximum(hi, (C @ np.stack([a, b], 1)).max(0))
    span = max(float((hi - lo).max()), 1e-9)
    px = lambda q: ((np.stack([q @ a, q @ b], 1) - lo) / span * (size - 40) + 20).astype(int)  # noqa: E731
    img = np.full((size, size, 3), 255, np.uint8)
    for x, y in px(X) if len(X) else []:
        if 0 <= x < size and 0 <= y < size:
            img[y, x] = (90, 90, 90)
    cams = px(C)
    look = px(C + model.R[:, 2, :] * span * 0.03)
    for (x, y), (lx, ly) in zip(cams, look):
        cv2.line(img, (int(x), int(y)), (int(lx), int(ly)), (0, 0, 255), 1, cv2.LINE_AA)
        cv2.circle(img, (int(x), int(y)), 3, (0, 0, 255), -1, cv2.LINE_AA)
    cv2.putText(img, f"{len(C)} cameras, {len(model.points)} points", (10, size - 10),
                cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cv2.imwrite(os.fspath(path), img)
    return os.fspath(path)
