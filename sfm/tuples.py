"""Training tuples from 3-D models (Radenovic, Tolias & Chum, "CNN image retrieval learns from BoW").

For a query q in model M with observed 3-D points P(q):

- positive pool: the ``pool_size`` (100) images of M whose camera centres are nearest to q's;
- overlap(q, p) = |P(p) & P(q)| / |P(q)|;
- scale change(q, p): every co-observed point X is seen at apparent scale f / depth (focal length in
  pixels over its depth in the camera), so r_X = (f_p / d_p(X)) / (f_q / d_q(X)) is how much larger
  X's neighbourhood appears in p than in q; s = median_X r_X and the scale change is max(s, 1/s)
  (1 = same scale; symmetric in q and p);
- valid positives: overlap >= 0.2 and scale change <= 1.5;
- m2: the valid positive with the most co-observed points; m3 (the adopted choice, ``pidxs``): a
  random valid positive;
- negatives: only images of other models; ``negative_pool`` lists the images of a split and the
  trainer takes at most one per model (``negatives_for``).

Queries: 10% of a model's images (at least 1, at most 30) among those with a valid positive.
Train / validation split by model. Written as ``tuples.json`` (format ``bowretrieval.tuples/1``,
docs/tuples_format.md) and ``trainer.pkl`` (cnnimageretrieval-pytorch layout).
"""
from __future__ import annotations

import json
import math
import os
import pickle
from dataclasses import dataclass, field

import numpy as np

from bowretrieval.errors import DataError

from .model import Model

FORMAT = "bowretrieval.tuples/1"


@dataclass
class TupleParams:
    pool_size: int = 100  # nearest camera centres forming the positive pool
    min_overlap: float = 0.2  # |P(p) & P(q)| / |P(q)|
    max_scale_change: float = 1.5
    query_fraction: float = 0.1  # queries per model
    max_queries: int = 30
    val_fraction: float = 0.2  # fraction of models in the validation split
    exclude_mode: str = "models"  # 'models': drop models holding an excluded image; 'images': drop the images
    seed: int = 0
    extra: dict = field(default_factory=dict)


def pair_stats(model: Model, q: int, p: int) -> tuple:
    """(co-observed points, overlap, scale change) of images q and p of one model."""
    Pq, Pp = model.observed(q), model.observed(p)
    common, iq, ip = np.intersect1d(Pq, Pp, assume_unique=True, return_indices=True)
    if len(Pq) == 0 or len(common) == 0:
        return 0, 0.0, math.inf
    dq, dp = model.depths(q)[iq], model.depths(p)[ip]
    ok = (dq > 0) & (dp > 0)
    if not ok.any():
        return len(common), len(common) / len(Pq), math.inf
    r = (model.focal[p] / dp[ok]) / (model.focal[q] / dq[ok])
    s = float(np.median(r))
    return len(common), len(common) / len(Pq), max(s, 1.0 / s)


def positives_for(model: Model, q: int, params: TupleParams) -> tuple:
    """Valid positives of q (indices into the model), sorted by co-observed points (most first),
    and the number of co-observed points of each."""
    d = np.linalg.norm(model.C - model.C[q], axis=1)
    d[q] = np.inf
    pool = np.argsort(d, kind="stable")[:min(params.pool_size, len(model) - 1)]
    good = []
    for p in pool:
        n, ov, sc = pair_stats(model, q, int(p))
        if ov >= params.min_overlap and sc <= params.max_scale_change:
            good.append((n, int(p)))
    good.sort(key=lambda t: (-t[0], t[1]))
    return [p for _, p in good], [n for n, _ in good]


def negatives_for(cluster, pool, q: int, k: int, rng=None, ranking=None) -> list:
    """Up to k negatives for query q from ``pool``: never from q's model, at most one per model (N2).

    ranking: optional pool order (e.g. by descriptor distance to q, nearest first); random otherwise.
    """
    cluster = np.asarray(cluster)
    order = list(ranking) if ranking is not None else \
        list((rng or np.random.default_rng(0)).permutation(np.asarray(pool)))
    out, used = [], {int(cluster[q])}
    for i in order:
        c = int(cluster[i])
        if c in used and c != -1:
            continue
        if c == int(cluster[q]):
            continue
        out.append(int(i))
        if c != -1:
            used.add(c)
        if len(out) == k:
            break
    return out


def _read_exclusions(path) -> set:
    with open(path) as fh:
        return {ln.strip() for ln in fh if ln.strip() and not ln.startswith("#")}


def _is_excluded(name, excl):
    base = os.path.basename(name)
    return name in excl or base in excl or os.path.splitext(base)[0] in excl


def build_tuples(models: list, image_root: str, params: TupleParams | None = None, exclude=None) -> dict:
    """The ``bowretrieval.tuples/1`` dictionary for a list of Models (one cluster id per model)."""
    params = params or TupleParams()
    if params.exclude_mode not in ("models", "images"):
        raise DataError(f"exclude_mode must be 'models' or 'images', got {params.exclude_mode!r}")
    excl = set(exclude or ())
    rng = np.random.default_rng(params.seed)
    images, cluster, per_model = [], [], []
    excluded_models, excluded_images = [], []
    for mid, model in enumerate(models):
        hit = [n for n in model.names if _is_excluded(n, excl)]
        if hit and params.exclude_mode == "models":
            excluded_models.append(mid)
            continue
        excluded_images += hit
        base = len(images)
        keep = [i for i, n in enumerate(model.names) if not _is_excluded(n, excl)]
        gidx = {i: base + k for k, i in enumerate(keep)}
        images += [model.names[i] for i in keep]
        cluster += [mid] * len(keep)
        # queries: a random sample of the images that have at least one valid positive
        n_q = min(params.max_queries, max(1, int(round(params.query_fraction * len(keep)))))
        entries = []
        for i in rng.permutation(keep):
            pos = [p for p in positives_for(model, int(i), params)[0] if p in gidx]
            if pos:
                entries.append((gidx[int(i)], [gidx[p] for p in pos]))
                if len(entries) == n_q:
                    break
        entries.sort()
        per_model.append((mid, entries, list(range(base, base + len(keep)))))
    kept_ids = [m for m, _, _ in per_model]
    order = list(rng.permutation(len(kept_ids)))
    n_val = int(math.floor(params.val_fraction * len(kept_ids))) if len(kept_ids) >= 2 else 0
    if params.val_fraction > 0 and len(kept_ids) >= 2:
        n_val = max(1, n_val)
    val_set = {kept_ids[k] for k in order[:n_val]}

    def split(which):
        q, p, pos, m2, pool = [], [], [], [], []
        for mid, entries, members in per_model:
            if (mid in val_set) != (which == "val"):
                continue
            pool += members
            for qi, positives in entries:
                q.append(qi)
                pos.append(positives)
                m2.append(positives[0])
                p.append(int(positives[rng.integers(len(positives))]))
        return dict(qidxs=q, pidxs=p, positives=pos, pidxs_m2=m2, negative_pool=pool)

    return dict(format=FORMAT, image_root=os.path.abspath(image_root), images=images, cluster=cluster,
                train=split("train"), val=split("val"),
                params=dict(pool_size=params.pool_size, min_overlap=params.min_overlap,
                            max_scale_change=params.max_scale_change, query_fraction=params.query_fraction,
                            max_queries=params.max_queries, val_fraction=params.val_fraction,
                            exclude_mode=params.exclude_mode, seed=params.seed, positive_rule="m3",
                            scale_change="max(s, 1/s), s = median over co-observed points of (f_p/d_p)/(f_q/d_q)",
                            val_models=sorted(val_set), excluded_models=excluded_models,
                            excluded_images=sorted(excluded_images), **params.extra))


def trainer_layout(t: dict) -> dict:
    """cnnimageretrieval-pytorch's training database: per split cids (relative path without
    extension), cluster, qidxs and pidxs indexing that split's cids."""
    out = {}
    for name in ("train", "val"):
        s = t[name]
        members = sorted(set(s["negative_pool"]) | set(s["qidxs"]) | set(s["pidxs"]))
        local = {g: k for k, g in enumerate(members)}
        out[name] = dict(cids=[os.path.splitext(t["images"][g])[0] for g in members],
                         cluster=[int(t["cluster"][g]) for g in members],
                         qidxs=[local[g] for g in s["qidxs"]], pidxs=[local[g] for g in s["pidxs"]])
    return out


def write_tuples(t: dict, out_dir) -> dict:
    """Write out_dir/tuples.json and out_dir/trainer.pkl atomically; returns their paths."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = dict(json=os.path.join(out_dir, "tuples.json"), pkl=os.path.join(out_dir, "trainer.pkl"))
    tmp = paths["json"] + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(t, fh)
    os.replace(tmp, paths["json"])
    tmp = paths["pkl"] + ".tmp"
    with open(tmp, "wb") as fh:
        pickle.dump(trainer_layout(t), fh, protocol=4)
    os.replace(tmp, paths["pkl"])
    return paths


def export_tuples(workdir, out_dir, exclude_file=None, params: TupleParams | None = None, log=print) -> dict:
    """Read the models of a mining run (summary.json) and write the tuples; returns the tuples dict."""
    from .mine import load_summary

    s = load_summary(workdir)
    if not s["models"]:
        raise DataError(f"{workdir}: the mining run found no 3-D models ({s.get('message', '')}); "
                        "no tuples can be made")
    models = [Model.load(m["path"]) for m in s["models"]]
    exclude = _read_exclusions(exclude_file) if exclude_file else None
    t = build_tuples(models, s["image_root"], params, exclude)
    if not t["images"]:
        raise DataError(f"{exclude_file}: every model of {workdir} holds an excluded image; nothing is left "
                        "for training (use --exclude-mode images to drop only the listed photos)")
    paths = write_tuples(t, out_dir)
    log(f"{len(t['images'])} images in {len(models) - len(t['params']['excluded_models'])} models; "
        f"train {len(t['train']['qidxs'])} queries, val {len(t['val']['qidxs'])} queries; "
        f"excluded {len(t['params']['excluded_models'])} models, {len(t['params']['excluded_images'])} images "
        f"-> {paths['json']}, {paths['pkl']}")
    return t
