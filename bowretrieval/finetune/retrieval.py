"""Global descriptors from a trained network, whitening learned on training tuples, and evaluation on a
revisited-format dataset (mAP E/M/H with ``bowretrieval.revisited``), with optional alpha-QE.

Multi-scale descriptors: the image at ``image_size`` rescaled by each scale (default {1, 1/sqrt2, 1/2}),
one descriptor per scale, combined by a generalized mean with the network's learned p (p = 1 for a
network with an FC whitening layer), then L2.
"""
from __future__ import annotations

import os
import time

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import BowRetrievalError, DataError
from ..revisited import RevisitedDataset, evaluate
from .networks import RetrievalNet, gem_combine
from .train import amp_settings, to_tensor
from .tuples import TupleSet, read_rgb
from .whiten import LearnedWhitening, PCAWhitening, alpha_qe, rank

MULTISCALE = (1.0, 2 ** -0.5, 0.5)


@torch.no_grad()
def extract_vectors(net: RetrievalNet, items, device, image_size=1024, scales=(1.0,), amp="off",
                    progress=True, desc="extract", failed=None) -> np.ndarray:
    """(N, D) float32 descriptors of ``items`` (paths or (path, bbox) pairs), cropped then downscaled.

    An unreadable image gets a zero vector and is recorded in ``failed`` (dict path -> reason) when
    given, otherwise the error propagates.
    """
    net.eval()
    amp_on = amp_settings(amp, device)
    p = 1.0 if net.whiten is not None else float(net.pool.p.detach()[0])
    out = np.zeros((len(items), net.dim), np.float32)
    for i, it in enumerate(tqdm(items, desc=desc, unit="img", disable=not progress)):
        path, bbox = (it, None) if isinstance(it, (str, os.PathLike)) else it
        try:
            img = read_rgb(path, image_size, bbox)
        except BowRetrievalError as exc:
            if failed is None:
                raise
            failed[os.fspath(path)] = str(exc)
            continue
        vs = []
        for s in scales:
            im = img if s == 1.0 else cv2.resize(img, (max(1, round(img.shape[1] * s)), max(1, round(img.shape[0] * s))),
                                                 interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
            with torch.autocast(device.type, dtype=amp_on[1], enabled=amp_on[0]):
                vs.append(net(to_tensor(im, device)).float()[0])
        v = vs[0] if len(vs) == 1 else gem_combine(vs, p)
        out[i] = v.cpu().numpy()
    return out


def training_descriptors(net, tuples: TupleSet, device, image_size, scales, amp="off", progress=True):
    """Descriptors of every image used by the training split's pairs: (X, index of each image in X, q, p)."""
    q, p = tuples.pairs("train", all_positives=True)
    used = np.unique(np.concatenate([q, p, tuples.split("train").negative_pool]))
    X = extract_vectors(net, [tuples.paths[i] for i in used], device, image_size, scales, amp, progress, "whitening set")
    where = {int(i): k for k, i in enumerate(used)}
    return X, np.array([where[int(i)] for i in q]), np.array([where[int(i)] for i in p])


def learn_whitening(method, X, qpos, ppos, dim=0, shrinkage=0.1):
    """Lw from the training pairs, or PCA-whitening of X (dim 0: as many components as X supports)."""
    if method == "lw":
        return LearnedWhitening(dim, shrinkage).fit(X, qpos, ppos)
    if method == "pcaw":
        n_comp = dim or min(len(X) - 1, X.shape[1])
        return PCAWhitening(n_comp).fit(X)
    raise DataError(f"unknown whitening {method!r}; use lw or pcaw")


def dataset_vectors(net, ds: RevisitedDataset, device, image_size=1024, scales=(1.0,), amp="off", progress=True):
    """Database (full images) and query (cropped to bbx) descriptors; timings in images/s."""
    failed = {}
    t0 = time.time()
    X = extract_vectors(net, ds.db_paths(), device, image_size, scales, amp, progress, "database", failed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ips = len(ds.imlist) / max(time.time() - t0, 1e-9)
    Q = extract_vectors(net, [(ds.image_path(n), ds.gnd[i]["bbx"]) for i, n in enumerate(ds.qimlist)], device,
                        image_size, scales, amp, progress, "queries", failed)
    return X, Q, {"extract_images_per_s": ips, "failed": failed}


def evaluate_vectors(X, Q, gnd, whitener=None, qe_k=0, qe_alpha=3.0) -> dict:
    """mAP E/M/H (percent) of inner-product search, optionally whitened and with alpha-QE."""
    if whitener is not None:
        X, Q = whitener.transform(X), whitener.transform(Q)
    if qe_k:
        Q = alpha_qe(Q, X, qe_k, qe_alpha)
    return evaluate(rank(Q, X), gnd)
