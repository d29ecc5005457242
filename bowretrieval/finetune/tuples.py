"""Training tuples: the ``bowretrieval.tuples/1`` export (tuples.json) or cirtorch's trainer.pkl layout
(see docs/finetune.md), images read as RGB and downscaled to a maximum side.

Both are validated once when loaded: indices in range, every referenced image present, a non-empty
negative pool; errors name the file and what to fix.
"""
from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..errors import DataError
from ..imageio import read_color

FORMAT = "bowretrieval.tuples/1"


@dataclass
class Split:
    qidxs: np.ndarray
    pidxs: np.ndarray
    positives: list  # per query: all valid positives (at least pidxs[i])
    negative_pool: np.ndarray


@dataclass
class TupleSet:
    """Images (absolute paths), their model id (cluster, -1 = none) and the train / val splits."""

    source: str
    paths: list
    cluster: np.ndarray
    splits: dict = field(default_factory=dict)

    def split(self, name) -> Split:
        if name not in self.splits:
            raise DataError(f"{self.source}: no '{name}' split (has {', '.join(self.splits) or 'none'})")
        return self.splits[name]

    def pairs(self, name="train", all_positives=True):
        """(query, positive) index pairs of a split: every valid positive, or the chosen one."""
        s = self.split(name)
        if not all_positives:
            return s.qidxs.copy(), s.pidxs.copy()
        q = np.concatenate([[qi] * len(ps) for qi, ps in zip(s.qidxs, s.positives)]).astype(np.int64)
        p = np.concatenate([np.asarray(ps, np.int64) for ps in s.positives])
        return q, p


def _ints(v, src, key):
    try:
        a = np.asarray(v, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{src}: '{key}' must be a list of integers") from None
    return a


def _make_split(d, n, src, name, cluster) -> Split:
    if not isinstance(d, dict):
        raise DataError(f"{src}: split '{name}' must be a mapping")
    for key in ("qidxs", "pidxs"):
        if key not in d:
            raise DataError(f"{src}: split '{name}' lacks '{key}'")
    q, p = _ints(d["qidxs"], src, f"{name}.qidxs"), _ints(d["pidxs"], src, f"{name}.pidxs")
    if len(q) != len(p):
        raise DataError(f"{src}: {name}.qidxs has {len(q)} entries but {name}.pidxs has {len(p)}")
    pos = d.get("positives")
    positives = [[int(x)] for x in p] if pos is None else [list(_ints(ps, src, f"{name}.positives")) for ps in pos]
    if len(positives) != len(q):
        raise DataError(f"{src}: {name}.positives has {len(positives)} lists for {len(q)} queries")
    if "negative_pool" in d:
        pool = _ints(d["negative_pool"], src, f"{name}.negative_pool")
    else:  # cirtorch: every image of the split may be a negative (other models only, checked when mining)
        pool = np.arange(n, dtype=np.int64)
    for key, a in (("qidxs", q), ("pidxs", p), ("negative_pool", pool),
                   ("positives", np.concatenate([np.asarray(x, np.int64) for x in positives]) if positives else q)):
        if a.size and (a.min() < 0 or a.max() >= n):
            raise DataError(f"{src}: {name}.{key} has an index outside 0..{n - 1}")
    return Split(q, p, positives, pool)


def _check_images(paths, src):
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{src}: {len(missing)} of {len(paths)} referenced images are missing, e.g. "
                        + ", ".join(missing[:3]) + "; fix image_root / the image list or re-export the tuples")


def load_tuples(path, image_root=None, ext=".jpg", check_images=True) -> TupleSet:
    """Read DIR/tuples.json, a tuples.json path, or a cirtorch trainer.pkl (needs ``image_root``)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        cands = [os.path.join(path, f) for f in ("tuples.json", "trainer.pkl")]
        found = [c for c in cands if os.path.isfile(c)]
        if not found:
            raise DataError(f"{path}: no tuples.json or trainer.pkl in this folder")
        path = found[0]
    if not os.path.isfile(path):
        raise DataError(f"{path}: tuple file not found")
    if path.endswith(".json"):
        ts = _load_json(path, image_root)
    else:
        ts = _load_pkl(path, image_root, ext)
    if check_images:
        _check_images(ts.paths, path)
    for name, s in ts.splits.items():
        if name == "train" and len(s.qidxs) == 0:
            raise DataError(f"{path}: the train split has no queries")
    return ts


def _load_json(path, image_root):
    try:
        with open(path) as fh:
            d = json.load(fh)
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise DataError(f"{path}: not a '{FORMAT}' tuple file (field 'format' is {d.get('format') if isinstance(d, dict) else None!r})")
    for key in ("images", "cluster", "train"):
        if key not in d:
            raise DataError(f"{path}: missing field '{key}'")
    root = image_root or d.get("image_root") or os.path.dirname(os.path.abspath(path))
    if not os.path.isabs(root):
        root = os.path.join(os.path.dirname(os.path.abspath(path)), root)
    paths = [os.path.join(root, im) for im in d["images"]]
    cluster = _ints(d["cluster"], path, "cluster")
    if len(cluster) != len(paths):
        raise DataError(f"{path}: 'cluster' has {len(cluster)} entries for {len(paths)} images")
    splits = {name: _make_split(d[name], len(paths), path, name, cluster) for name in ("train", "val") if name in d}
    return TupleSet(path, paths, cluster, splits)


def _load_pkl(path, image_root, ext):
    if not image_root:
        raise DataError(f"{path}: a trainer.pkl names images by id only; give the image folder (--image-root)")
    try:
        with open(path, "rb") as fh:
            d = pickle.load(fh)  # noqa: S301 (documented: only for trusted files)
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as a trainer.pkl ({type(exc).__name__}: {exc})") from exc
    if not isinstance(d, dict) or "train" not in d:
        raise DataError(f"{path}: expected {{'train': {{'cids', 'cluster', 'qidxs', 'pidxs'}}, 'val': ...}}")
    # the two splits index their own cids lists: concatenate them into one image list
    paths, cluster, splits = [], [], {}
    for name in ("train", "val"):
        if name not in d:
            continue
        s = d[name]
        for key in ("cids", "cluster", "qidxs", "pidxs"):
            if key not in s:
                raise DataError(f"{path}: split '{name}' lacks '{key}'")
        off = len(paths)
        paths += [os.path.join(image_root, c + ext) for c in s["cids"]]
        cl = _ints(s["cluster"], path, f"{name}.cluster")
        if len(cl) != len(s["cids"]):
            raise DataError(f"{path}: {name}.cluster has {len(cl)} entries for {len(s['cids'])} cids")
        # keep the splits' model ids apart
        cluster.append(np.where(cl >= 0, cl + (0 if name == "train" else 1_000_000), -1))
        sp = _make_split({"qidxs": s["qidxs"], "pidxs": s["pidxs"]}, len(s["cids"]), path, name, cl)
        splits[name] = Split(sp.qidxs + off, sp.pidxs + off, [[x + off for x in ps] for ps in sp.positives],
                             sp.negative_pool + off)
    return TupleSet(path, paths, np.concatenate(cluster), splits)


def read_rgb(path, max_side=None, bbox=None) -> np.ndarray:
    """An image as uint8 RGB (H, W, 3), optionally cropped to bbox [x1, y1, x2, y2] and downscaled."""
    img = read_color(path, cv2.IMREAD_COLOR)
    if img.dtype != np.uint8:
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    img = img[:, :, ::-1]
    if bbox is not None:
        h, w = img.shape[:2]
        x1, y1 = max(0, int(np.floor(bbox[0]))), max(0, int(np.floor(bbox[1])))
        x2, y2 = min(w, int(np.ceil(bbox[2]))), min(h, int(np.ceil(bbox[3])))
        if x2 <= x1 or y2 <= y1:
            from ..errors import ImageError

            raise ImageError(f"{path}: bounding box {list(bbox)} is empty inside a {w}x{h} image")
        img = img[y1:y2, x1:x2]
    return np.ascontiguousarray(resize_max(img, max_side))


def resize_max(img, max_side, upscale=False):
    h, w = img.shape[:2]
    if not max_side or (max(h, w) <= max_side and not upscale):
        return img
    s = max_side / float(max(h, w))
    nw, nh = max(1, int(round(w * s))), max(1, int(round(h * s)))
    return cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
