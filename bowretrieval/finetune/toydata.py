"""Generated training tuples in the ``bowretrieval.tuples/1`` layout, plus a revisited-format ground
truth for held-out landmarks (``gnd_toy.json``: every view a query, the other views of its landmark
easy, itself junk, distractors in the database). Landmark id = cluster (model) id.

Two sources:
- ``write_synthetic_tuples``: landmarks rendered by ``bowretrieval.synthetic`` (textured 3D planes,
  pinhole cameras, occlusion, lighting); a query's valid positives are the views that see >= 20% of its
  query region with a scale change <= 1.5 (the m3 rule). Used by the benchmark; images >= 64 px.
- ``write_toy_tuples``: planar textures seen through random homographies with photometric changes, at
  any size (48x36 renders in milliseconds): the unit tests' data, where a tiny network trained for a
  few dozen tuples must measurably improve. All landmarks share one grey-level distribution, so global
  colour statistics do not identify them.
"""
from __future__ import annotations

import json
import os

import cv2
import numpy as np


def _write_json(path, obj):
    with open(path + ".tmp", "w") as fh:
        json.dump(obj, fh)
    os.replace(path + ".tmp", path)


def _heldout_gnd(names, cluster, test_models):
    db = [i for i in range(len(names)) if cluster[i] in test_models or cluster[i] == -1]
    at = {i: k for k, i in enumerate(db)}
    gnd, qim = [], []
    for i in db:
        if cluster[i] == -1:
            continue
        qim.append(names[i])
        gnd.append({"bbx": None, "easy": [at[j] for j in db if cluster[j] == cluster[i] and j != i],
                    "hard": [], "junk": [at[i]]})
    return {"imlist": [names[i] for i in db], "qimlist": qim, "gnd": gnd}


def synthetic_queries(dataset_json, min_overlap=0.2, max_scale=1.5):
    """(image names, cluster per image, [(query index, [positive indices])]) of a generated dataset."""
    with open(dataset_json) as fh:
        meta = json.load(fh)
    names = list(meta["imlist"])
    where = {n: i for i, n in enumerate(names)}
    queries = []
    for q in meta["queries"]:
        pos = [where[v] for v, st in q["views"].items() if st["overlap"] >= min_overlap and st["scale"] <= max_scale]
        if pos:
            queries.append((where[q["query"]], pos))
    return names, [int(c) for c in meta["cluster"]], queries


def write_synthetic_tuples(out_dir, n_train=32, n_val=0, n_test=4, views=6, n_distractors=8, queries_per_model=2,
                           size=(320, 240), seed=0) -> dict:
    """Render landmarks with ``bowretrieval.synthetic.generate`` into ``out_dir``; write tuples.json
    (train / val landmarks) and gnd_toy.json (held-out landmarks). Returns {'tuples', 'gnd', 'root'}."""
    from ..synthetic import generate

    n_models = n_train + n_val + n_test
    g = generate(out_dir, seed=seed, n_landmarks=n_models, views_per_landmark=views,
                 queries_per_landmark=min(queries_per_model, views), n_distractors=n_distractors, n_train=0,
                 size=size, name="toy-all")
    names, cluster, queries = synthetic_queries(g.dataset_json)
    cluster = np.asarray(cluster)
    rng = np.random.default_rng(seed)

    def split(models):
        qs = [(q, ps) for q, ps in queries if cluster[q] in models]
        return {"qidxs": [q for q, _ in qs], "pidxs": [int(rng.choice(ps)) for _, ps in qs],
                "positives": [ps for _, ps in qs], "pidxs_m2": [ps[0] for _, ps in qs],
                "negative_pool": [int(i) for i in np.flatnonzero(np.isin(cluster, models))]}

    tpath, gpath = os.path.join(out_dir, "tuples.json"), os.path.join(out_dir, "gnd_toy.json")
    _write_json(tpath, {"format": "bowretrieval.tuples/1", "image_root": os.path.relpath(g.images_dir, out_dir),
                        "images": [n + ".jpg" for n in names], "cluster": [int(c) for c in cluster],
                        "train": split(list(range(n_train))), "val": split(list(range(n_train, n_train + n_val))),
                        "params": {"generator": "bowretrieval.synthetic", "seed": seed, "views": views}})
    _write_json(gpath, _heldout_gnd(names, cluster, set(range(n_train + n_val, n_models))))
    return {"tuples": tpath, "gnd": gpath, "root": out_dir}


def _texture(rng, size):
    img = np.full((size, size), rng.uniform(60, 190), np.float32)
    gy, gx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img += rng.uniform(-40, 40) * gx + rng.uniform(-40, 40) * gy
    for _ in range(int(rng.integers(14, 24))):
        c = float(rng.uniform(0, 255))
        kind = rng.integers(3)
        x, y = (int(v) for v in rng.integers(0, size, 2))
        if kind == 0:
            w, h = (int(v) for v in rng.integers(size // 16, size // 3, 2))
            cv2.rectangle(img, (x, y), (x + w, y + h), c, -1)
        elif kind == 1:
            a, b = (int(v) for v in rng.integers(size // 20, size // 5, 2))
            cv2.ellipse(img, (x, y), (a, b), float(rng.uniform(0, 180)), 0, 360, c, -1)
        else:
            x2, y2 = (int(v) for v in rng.integers(0, size, 2))
            cv2.line(img, (x, y), (x2, y2), c, int(rng.integers(2, 7)))
    tint = rng.uniform(0.85, 1.15, 3)  # a mild colour cast shared by nothing in particular
    return np.clip(img[:, :, None] * tint[None, None, :], 0, 255).astype(np.float32)


def _view(rng, tex, out_w, out_h, strength=1.0):
    size = tex.shape[0]
    src = np.float32([[0, 0], [size, 0], [size, size], [0, size]])
    # random similarity + perspective jitter, then fit the (cropped) landmark into the output frame
    s = rng.uniform(0.8, 1.25)
    ang = np.deg2rad(rng.uniform(-15, 15) * strength)
    cx, cy = out_w / 2 + rng.uniform(-0.12, 0.12) * out_w, out_h / 2 + rng.uniform(-0.12, 0.12) * out_h
    half = 0.5 * s * max(out_w, out_h)
    base = np.float32([[-half, -half], [half, -half], [half, half], [-half, half]])
    rot = np.float32([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    dst = base @ rot.T + np.float32([cx, cy])
    dst += rng.uniform(-0.12, 0.12, (4, 2)).astype(np.float32) * half * strength
    H = cv2.getPerspectiveTransform(src, dst.astype(np.float32))
    bg = float(rng.uniform(40, 200))
    img = cv2.warpPerspective(tex, H, (out_w, out_h), flags=cv2.INTER_AREA, borderValue=(bg, bg, bg))
    gain, bias = rng.uniform(0.6, 1.4), rng.uniform(-40, 40)
    img = img * gain + bias + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_toy_tuples(out_dir, n_train=8, n_val=2, n_test=4, views=6, n_distractors=8, queries_per_model=2,
                     size=(96, 72), seed=0) -> dict:
    """Write DIR/jpg/*.jpg, DIR/tuples.json (train/val landmarks) and DIR/gnd_toy.json (held-out test
    landmarks: every view a query, the other views of its landmark easy, itself junk, plus distractors).
    Returns {'tuples': path, 'gnd': path, 'root': DIR}."""
    rng = np.random.default_rng(seed)
    jpg = os.path.join(out_dir, "jpg")
    os.makedirs(jpg, exist_ok=True)
    w, h = size
    names, cluster = [], []

    def save(name, img, cl):
        cv2.imwrite(os.path.join(jpg, name + ".jpg"), img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
        names.append(name)
        cluster.append(cl)

    n_models = n_train + n_val + n_test
    for m in range(n_models):
        tex = _texture(rng, 192)
        for v in range(views):
            save(f"lm{m:03d}_v{v:02d}", _view(rng, tex, w, h), m)
    for d in range(n_distractors):
        save(f"distractor_{d:03d}", _view(rng, _texture(rng, 192), w, h), -1)
    cluster = np.asarray(cluster)

    def split(models):
        q, p, pos, m2 = [], [], [], []
        for m in models:
            idx = np.flatnonzero(cluster == m)
            for qi in rng.choice(idx, min(queries_per_model, len(idx)), replace=False):
                others = [int(i) for i in idx if i != qi]
                q.append(int(qi))
                p.append(int(rng.choice(others)))
                pos.append(others)
                m2.append(others[0])
        pool = [int(i) for i in np.flatnonzero(np.isin(cluster, models))]
        return {"qidxs": q, "pidxs": p, "positives": pos, "pidxs_m2": m2, "negative_pool": pool}

    tup = {"format": "bowretrieval.tuples/1", "image_root": "jpg", "images": [n + ".jpg" for n in names],
           "cluster": [int(c) for c in cluster],
           "train": split(list(range(n_train))), "val": split(list(range(n_train, n_train + n_val))),
           "params": {"generator": "bowretrieval.finetune.toydata", "seed": seed, "views": views}}
    tpath, gpath = os.path.join(out_dir, "tuples.json"), os.path.join(out_dir, "gnd_toy.json")
    _write_json(tpath, tup)
    _write_json(gpath, _heldout_gnd(names, cluster, set(range(n_train + n_val, n_models))))
    return {"tuples": tpath, "gnd": gpath, "root": out_dir}
