"""Pictures of retrieval results drawn with OpenCV (no plotting library needed).

* :func:`ranked_list_image`: a query (its box drawn) followed by its top results, each framed by its
  ground-truth label (green easy, blue hard, grey junk, red negative) with rank and score.
* :func:`pr_curve_image`: precision-recall curves (junk removed, as in the revisited protocol).
"""
from __future__ import annotations

import os

import cv2
import numpy as np

from .errors import DataError
from .imageio import read_color

LABEL_COLOURS = {"easy": (60, 180, 60), "hard": (200, 120, 30), "junk": (150, 150, 150), "negative": (40, 40, 220),
                 None: (90, 90, 90)}  # BGR


def _bgr8(img) -> np.ndarray:
    """Any decoded image (grey, BGR, BGRA; 8 or 16 bit) as 3-channel uint8."""
    if img.dtype == np.uint16:
        img = (img // 257).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(img[:, :, :3])


def _thumb(img, side, bbox=None, colour=(0, 200, 255)):
    """Fit ``img`` into a side x side tile (letterboxed); draw ``bbox`` scaled along."""
    h, w = img.shape[:2]
    s = side / max(h, w)
    small = cv2.resize(img, (max(1, int(round(w * s))), max(1, int(round(h * s)))), interpolation=cv2.INTER_AREA)
    tile = np.full((side, side, 3), 255, np.uint8)
    y0, x0 = (side - small.shape[0]) // 2, (side - small.shape[1]) // 2
    tile[y0:y0 + small.shape[0], x0:x0 + small.shape[1]] = small
    if bbox is not None:
        x1, y1, x2, y2 = [float(v) * s for v in bbox]
        cv2.rectangle(tile, (int(x0 + x1), int(y0 + y1)), (int(x0 + x2), int(y0 + y2)), colour, 2)
    return tile


def ranked_list_image(query_path, result_paths, labels=None, scores=None, bbox=None, thumb: int = 160,
                      per_row: int = 6, title: str | None = None) -> np.ndarray:
    """One picture (BGR uint8): the query with its box, then the ranked results framed by label.

    labels: per result 'easy', 'hard', 'junk', 'negative' or None (unknown).
    """
    if not result_paths:
        raise DataError("ranked_list_image: no results to draw")
    labels = list(labels) if labels is not None else [None] * len(result_paths)
    pad, text_h = 6, 18
    cell_w, cell_h = thumb + 2 * pad, thumb + 2 * pad + text_h
    n = len(result_paths) + 1
    rows = (n + per_row - 1) // per_row
    head = 28 if title else 0
    canvas = np.full((head + rows * cell_h, min(n, per_row) * cell_w, 3), 255, np.uint8)
    if title:
        cv2.putText(canvas, title, (pad, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    items = [(query_path, "query", None, bbox)] + [
        (p, labels[i], None if scores is None else float(scores[i]), None) for i, p in enumerate(result_paths)]
    for k, (path, lab, sc, box) in enumerate(items):
        r, c = divmod(k, per_row)
        x, y = c * cell_w, head + r * cell_h
        try:
            tile = _thumb(_bgr8(read_color(path)), thumb, box)
        except Exception:  # a missing result image must not prevent the picture
            tile = np.full((thumb, thumb, 3), 220, np.uint8)
        colour = (0, 200, 255) if lab == "query" else LABEL_COLOURS.get(lab, LABEL_COLOURS[None])
        canvas[y:y + thumb + 2 * pad, x:x + thumb + 2 * pad] = colour
        canvas[y + pad:y + pad + thumb, x + pad:x + pad + thumb] = tile
        text = "query" if lab == "query" else f"{k}. {lab or ''}" + (f" {sc:.3f}" if sc is not None else "")
        cv2.putText(canvas, text, (x + pad, y + thumb + 2 * pad + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.42,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def precision_recall(ranking, ok, junk=()) -> tuple:
    """Recall and precision after each positive of one ranked list, junk removed (revisited style)."""
    ranking = np.asarray(ranking)
    ok, junk = np.asarray(ok, np.int64), np.asarray(junk, np.int64)
    if ok.size == 0:
        raise DataError("precision_recall: the query has no positive image")
    kept = ranking[~np.isin(ranking, junk)]
    hit = np.isin(kept, ok)
    tp = np.cumsum(hit)
    ranks = np.nonzero(hit)[0]
    recall = np.concatenate([[0.0], tp[ranks] / ok.size])
    precision = np.concatenate([[1.0], tp[ranks] / (ranks + 1.0)])
    return recall, precision


def mean_pr_curve(ranks, gnd_protocol, points: int = 101) -> tuple:
    """Interpolated precision (max precision at recall >= r) averaged over queries with positives.

    ranks: (n_db, n_queries); gnd_protocol: list of {'ok', 'junk'} (revisited.protocol_gnd)."""
    grid = np.linspace(0, 1, points)
    curves = []
    for i, g in enumerate(gnd_protocol):
        if len(g["ok"]) == 0:
            continue
        r, p = precision_recall(ranks[:, i], g["ok"], g.get("junk", ()))
        interp = np.maximum.accumulate(p[::-1])[::-1]
        idx = np.searchsorted(r, grid, side="left")
        curves.append(np.where(idx < len(r), interp[np.minimum(idx, len(r) - 1)], 0.0))
    if not curves:
        raise DataError("mean_pr_curve: no query has a positive image")
    return grid, np.mean(curves, axis=0)


def pr_curve_image(curves: dict, size=(520, 400), title: str = "precision-recall") -> np.ndarray:
    """Draw curves {name: (recall, precision)} on one chart (BGR uint8)."""
    w, h = size
    left, right, top, bottom = 50, 150, 30, 40
    img = np.full((h, w, 3), 255, np.uint8)
    pw, ph = w - left - right, h - top - bottom

    def pt(r, p):
        return int(left + r * pw), int(top + (1 - p) * ph)

    for t in np.linspace(0, 1, 6):
        cv2.line(img, pt(t, 0), pt(t, 1), (230, 230, 230), 1)
        cv2.line(img, pt(0, t), pt(1, t), (230, 230, 230), 1)
        cv2.putText(img, f"{t:.1f}", (pt(t, 0)[0] - 10, top + ph + 15), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1)
        cv2.putText(img, f"{t:.1f}", (8, pt(0, t)[1] + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1)
    cv2.rectangle(img, pt(0, 1), pt(1, 0), (0, 0, 0), 1)
    cv2.putText(img, "recall", (left + pw // 2 - 20, h - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    cv2.putText(img, "precision", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1)
    cv2.putText(img, title, (left + 40, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    palette = [(60, 180, 60), (200, 120, 30), (40, 40, 220), (160, 60, 160), (0, 160, 200), (90, 90, 90)]
    for k, (name, (r, p)) in enumerate(curves.items()):
        col = palette[k % len(palette)]
        pts = np.array([pt(a, b) for a, b in zip(r, p)], np.int32)
        cv2.polylines(img, [pts], False, col, 2, cv2.LINE_AA)
        y = top + 15 + 20 * k
        cv2.line(img, (left + pw + 10, y - 4), (left + pw + 30, y - 4), col, 2)
        cv2.putText(img, name, (left + pw + 35, y), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def save_image(path, img) -> str:
    """Write a PNG/JPEG (by extension) atomically."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ext = os.path.splitext(path)[1] or ".png"
    ok, buf = cv2.imencode(ext, img)
    if not ok:
        raise DataError(f"{path}: cannot encode the picture as {ext}")
    tmp = path + ".tmp"
    buf.tofile(tmp)
    os.replace(tmp, path)
    return path
