"""Local-feature quality on an image pair with a known homography (Mikolajczyk et al. 2005 style).

Repeatability: fraction of features whose centre, projected by H, lies within ``tol`` pixels of a
feature of the other image, counted over the area both images see. Matching: mutual nearest
neighbours in descriptor space whose centres agree with H within ``tol`` pixels.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy.spatial import cKDTree

from .errors import DataError


def load_homography(path, node: str = "H13") -> np.ndarray:
    """Read a 3x3 homography from an OpenCV FileStorage XML/YAML file (node ``node``) or a text file."""
    path = str(path)
    if path.endswith((".xml", ".yml", ".yaml")):
        fs = cv2.FileStorage(path, cv2.FILE_STORAGE_READ)
        H = fs.getNode(node).mat() if fs.isOpened() else None
        fs.release()
    else:
        H = np.loadtxt(path)
    if H is None or np.shape(H) != (3, 3):
        raise DataError(f"{path}: no 3x3 homography (node {node!r}); check the file")
    return np.asarray(H, np.float64)


def project(H: np.ndarray, xy: np.ndarray) -> np.ndarray:
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    p = np.c_[xy, np.ones(len(xy))] @ np.asarray(H, np.float64).T
    return p[:, :2] / p[:, 2:3]


def _inside(xy, shape, margin=0.0):
    h, w = shape[:2]
    return (xy[:, 0] >= margin) & (xy[:, 1] >= margin) & (xy[:, 0] <= w - 1 - margin) & (xy[:, 1] <= h - 1 - margin)


def repeatability(xy1, xy2, H, shape1, shape2, tol: float = 2.5) -> dict:
    """Centre repeatability of two point sets (N, 2) under H (image 1 -> image 2)."""
    xy1, xy2 = np.asarray(xy1, np.float64)[:, :2], np.asarray(xy2, np.float64)[:, :2]
    p1 = project(H, xy1) if len(xy1) else np.zeros((0, 2))
    p2 = project(np.linalg.inv(H), xy2) if len(xy2) else np.zeros((0, 2))
    c1 = _inside(p1, shape2)
    c2 = _inside(p2, shape1)
    n1, n2 = int(c1.sum()), int(c2.sum())
    if n1 == 0 or n2 == 0:
        return dict(repeatability=0.0, correspondences=0, common1=n1, common2=n2)
    t2 = cKDTree(xy2[c2])
    d1, _ = t2.query(p1[c1], k=1)
    t1 = cKDTree(xy1[c1])
    d2, _ = t1.query(p2[c2], k=1)
    corr = min(int((d1 <= tol).sum()), int((d2 <= tol).sum()))
    return dict(repeatability=corr / min(n1, n2), correspondences=corr, common1=n1, common2=n2)


def mutual_nn(d1: np.ndarray, d2: np.ndarray) -> np.ndarray:
    """Mutual nearest neighbours (Euclidean) between float descriptor sets -> (M, 2) index pairs."""
    if len(d1) == 0 or len(d2) == 0:
        return np.zeros((0, 2), np.int64)
    a = np.asarray(d1, np.float32)
    b = np.asarray(d2, np.float32)
    # ||a-b||^2 = |a|^2 + |b|^2 - 2ab in blocks to bound memory
    nn12 = np.empty(len(a), np.int64)
    best21 = np.full(len(b), np.inf, np.float32)
    nn21 = np.zeros(len(b), np.int64)
    bb = (b * b).sum(1)
    for s in range(0, len(a), 2048):
        blk = a[s:s + 2048]
        dist = bb[None, :] - 2.0 * blk @ b.T + (blk * blk).sum(1)[:, None]
        nn12[s:s + 2048] = dist.argmin(1)
        col = dist.argmin(0)
        val = dist[col, np.arange(len(b))]
        upd = val < best21
        best21[upd] = val[upd]
        nn21[upd] = col[upd] + s
    i = np.arange(len(a))
    keep = nn21[nn12] == i
    return np.stack([i[keep], nn12[keep]], 1)


def consistent_matches(xy1, xy2, pairs, H, tol: float = 5.0) -> int:
    """Number of index pairs whose centres agree with H (image 1 -> 2) within ``tol`` pixels."""
    if len(pairs) == 0:
        return 0
    p = project(H, np.asarray(xy1, np.float64)[pairs[:, 0], :2])
    return int((np.linalg.norm(p - np.asarray(xy2, np.float64)[pairs[:, 1], :2], axis=1) <= tol).sum())
