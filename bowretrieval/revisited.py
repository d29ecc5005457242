"""The revisited Oxford/Paris evaluation protocol (Radenovic et al., CVPR 2018), number for number
identical to revisitop's ``compute_map`` (trapezoidal AP, junk removed, capped mP@k).

Ground truth is ``{'imlist', 'qimlist', 'gnd'}`` with ``gnd[i] = {'bbx', 'easy', 'hard', 'junk'}``
(indices into imlist). Prefer the ``.json`` form: unpickling a ``gnd_*.pkl`` from an untrusted
source can run arbitrary code.
"""
from __future__ import annotations

import json
import os
import pickle

import numpy as np

from .errors import DataError

PROTOCOLS = ("easy", "medium", "hard")


def compute_ap(ranks, nres: int) -> float:
    """Trapezoidal AP of the 0-based, junk-corrected ranks of the positives, out of nres positives."""
    ap = 0.0
    step = 1.0 / nres
    for j, rank in enumerate(ranks):
        p0 = 1.0 if rank == 0 else float(j) / rank
        p1 = float(j + 1) / (rank + 1)
        ap += (p0 + p1) * step / 2.0
    return ap


def compute_map(ranks, gnd, kappas=(1, 5, 10)):
    """mAP, per-query AP, mP@k and per-query P@k; ``ranks`` is (n_db, n_queries) as in revisitop.

    gnd[i] has 'ok' and optionally 'junk'. Queries with no ok image are skipped (AP and P@k NaN).
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != len(gnd):
        raise DataError(f"ranks must be (n_db, n_queries={len(gnd)}), got {ranks.shape}")
    nq = len(gnd)
    kappas = list(kappas)
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    nempty = 0
    mean_ap = 0.0
    pr = np.zeros(len(kappas))
    for i in range(nq):
        ok = np.asarray(gnd[i]["ok"], dtype=np.int64)
        if ok.size == 0:
            aps[i] = np.nan
            prs[i, :] = np.nan
            nempty += 1
            continue
        junk = np.asarray(gnd[i].get("junk", []), dtype=np.int64)
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], ok)]
        jpos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], junk)]
        # every junk item ranked before a positive shifts it up by one
        pos = pos - np.searchsorted(jpos, pos)
        ap = compute_ap(pos, len(ok))
        mean_ap += ap
        aps[i] = ap
        pos = pos + 1
        for j, k in enumerate(kappas):
            kq = min(max(pos), k) if len(pos) else k
            prs[i, j] = (pos <= kq).sum() / kq
        pr += prs[i, :]
    if nq == nempty:  # no query has a positive under this protocol: nothing to average
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    n = nq - nempty
    return mean_ap / n, aps, pr / n, prs


def protocol_gnd(gnd, protocol: str) -> list:
    """ok/junk lists for 'easy', 'medium' or 'hard' (as in revisitop's example evaluation)."""
    out = []
    for g in gnd:
        easy, hard, junk = (np.asarray(g.get(k, []), dtype=np.int64) for k in ("easy", "hard", "junk"))
        if protocol == "easy":
            out.append({"ok": easy, "junk": np.concatenate([junk, hard])})
        elif protocol == "medium":
            out.append({"ok": np.concatenate([easy, hard]), "junk": junk})
        elif protocol == "hard":
            out.append({"ok": hard, "junk": np.concatenate([junk, easy])})
        else:
            raise DataError(f"unknown protocol {protocol!r}; use easy, medium or hard")
    return out


def evaluate(ranks, gnd, kappas=(1, 5, 10)) -> dict:
    """All three protocols. ``ranks`` (n_db, n_queries). Returns percentages like revisitop prints,
    plus per-query AP (fractions, NaN where the query has no positive) under 'per_query'."""
    res = {"kappas": list(kappas), "per_query": {}}
    for p in PROTOCOLS:
        m, aps, mpr, _ = compute_map(ranks, protocol_gnd(gnd, p), kappas)
        res[p] = {"mAP": 100.0 * m, "mP": [100.0 * v for v in mpr]}
        res["per_query"][p] = [None if np.isnan(a) else float(a) for a in aps]
    return res


def format_table(results: dict, title: str = "") -> str:
    """One line per method: mAP E/M/H and mP@k Medium."""
    rows = results if isinstance(results, list) else [(title or "result", results)]
    ks = rows[0][1]["kappas"]
    head = f"{'method':<28} {'mAP E':>7} {'mAP M':>7} {'mAP H':>7}  " + " ".join(f"{'mP@' + str(k) + ' M':>8}" for k in ks)
    lines = [head, "-" * len(head)]
    for name, r in rows:
        lines.append(f"{name:<28} {r['easy']['mAP']:7.2f} {r['medium']['mAP']:7.2f} {r['hard']['mAP']:7.2f}  "
                     + " ".join(f"{v:8.2f}" for v in r["medium"]["mP"]))
    return "\n".join(lines)


# -- ground-truth files -------------------------------------------------------------------------
def load_gnd(path) -> dict:
    """Read and validate a revisited ground-truth file (.json preferred, .pkl accepted)."""
    path = os.fspath(path)
    try:
        if path.endswith(".json"):
            with open(path) as fh:
                cfg = json.load(fh)
        else:
            with open(path, "rb") as fh:
                cfg = pickle.load(fh)  # noqa: S301 (documented: only for trusted files)
    except FileNotFoundError:
        raise DataError(f"{path}: ground-truth file not found") from None
    except Exception as exc:
        raise DataError(f"{path}: cannot be parsed as revisited ground truth ({type(exc).__name__}: {exc})") from exc
    return validate_gnd(cfg, path)


def validate_gnd(cfg, path="<ground truth>") -> dict:
    if not isinstance(cfg, dict):
        raise DataError(f"{path}: expected a mapping with imlist, qimlist, gnd; got {type(cfg).__name__}")
    for key in ("imlist", "qimlist", "gnd"):
        if key not in cfg:
            raise DataError(f"{path}: missing field '{key}'")
        if not isinstance(cfg[key], (list, tuple)):
            raise DataError(f"{path}: field '{key}' must be a list")
    n, nq = len(cfg["imlist"]), len(cfg["qimlist"])
    if len(cfg["gnd"]) != nq:
        raise DataError(f"{path}: field 'gnd' has {len(cfg['gnd'])} entries for {nq} queries in 'qimlist'")
    gnd = []
    for i, g in enumerate(cfg["gnd"]):
        if not isinstance(g, dict):
            raise DataError(f"{path}: gnd[{i}] must be a mapping")
        out = {}
        for key in ("easy", "hard", "junk"):
            try:
                v = np.asarray(g.get(key, []), dtype=np.int64).reshape(-1)
            except (TypeError, ValueError):
                raise DataError(f"{path}: gnd[{i}].{key} must be a list of image indices") from None
            if v.size and (v.min() < 0 or v.max() >= n):
                raise DataError(f"{path}: gnd[{i}].{key} has index {int(v.max() if v.max() >= n else v.min())} "
                                f"outside imlist (0..{n - 1})")
            out[key] = v
        if "bbx" in g and g["bbx"] is not None:
            try:
                b = [float(x) for x in g["bbx"]]
            except (TypeError, ValueError):
                raise DataError(f"{path}: gnd[{i}].bbx must be [x1, y1, x2, y2]") from None
            if len(b) != 4 or b[2] <= b[0] or b[3] <= b[1]:
                raise DataError(f"{path}: gnd[{i}].bbx {g['bbx']} must be [x1, y1, x2, y2] with x2 > x1, y2 > y1")
            out["bbx"] = b
        else:
            out["bbx"] = None
        gnd.append(out)
    return {"imlist": list(cfg["imlist"]), "qimlist": list(cfg["qimlist"]), "gnd": gnd}


class RevisitedDataset:
    """A dataset in the revisited layout: ``<root>/jpg/<name>.jpg`` and ``<root>/gnd_<name>.{json,pkl}``.

    Works for roxford5k / rparis6k as distributed and for ../shared/data/landmarks-dev.
    """

    def __init__(self, root, gnd_file=None, ext=".jpg"):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise DataError(f"{self.root}: dataset folder not found")
        if gnd_file is None:
            cands = sorted(f for f in os.listdir(self.root) if f.startswith("gnd_") and f.endswith((".json", ".pkl")))
            if not cands:
                raise DataError(f"{self.root}: no gnd_<name>.json / .pkl ground-truth file")
            jsons = [c for c in cands if c.endswith(".json")]
            gnd_file = (jsons or cands)[0]
        if not os.path.isabs(gnd_file):
            # a relative name is looked up in the dataset folder first, then from the working directory
            in_root = os.path.join(self.root, gnd_file)
            gnd_file = in_root if os.path.exists(in_root) or not os.path.exists(gnd_file) else gnd_file
        self.gnd_file = gnd_file
        self.name = os.path.splitext(os.path.basename(gnd_file))[0][len("gnd_"):]
        cfg = load_gnd(gnd_file)
        self.imlist, self.qimlist, self.gnd = cfg["imlist"], cfg["qimlist"], cfg["gnd"]
        self.ext = ext

    def image_path(self, name) -> str:
        return os.path.join(self.root, "jpg", name + self.ext)

    def db_paths(self) -> list:
        return [self.image_path(n) for n in self.imlist]

    def query_paths(self) -> list:
        return [self.image_path(n) for n in self.qimlist]

    def query_bbox(self, i):
        return self.gnd[i]["bbx"]
