"""Batch feature extraction into a resumable HDF5 store, in worker processes, with a progress bar.

Bad images never stop a batch: each is recorded in the store's ``/failed`` group with the reason
and listed in the returned report. Re-running skips images already done.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .errors import BowRetrievalError, ImageError
from .featurestore import FeatureStore
from .features import Features, get_extractor, rescale_frames
from .imageio import MIN_SIDE, load_gray


@dataclass
class ExtractJob:
    name: str  # key in the store
    path: str
    bbox: tuple | None = None  # crop [x1, y1, x2, y2] in original pixels (queries)


@dataclass
class ExtractReport:
    store: str
    done: int = 0
    skipped: int = 0
    failed: dict = field(default_factory=dict)  # name -> reason
    empty: dict = field(default_factory=dict)  # name -> why it has no features (1x1, constant, ...)

    def summary(self) -> str:
        s = f"{self.store}: {self.done} extracted, {self.skipped} already present, {len(self.failed)} failed"
        if self.empty:
            s += f", {len(self.empty)} without features"
        for name, why in sorted(self.failed.items()):
            s += f"\n  FAILED {name}: {why}"
        for name, why in sorted(self.empty.items()):
            s += f"\n  NO FEATURES {name}: {why}"
        return s


_WORKER_EXTRACTOR = None


def _init_worker(extractor, params, threads):
    global _WORKER_EXTRACTOR
    import cv2

    cv2.setNumThreads(threads)
    _WORKER_EXTRACTOR = get_extractor(extractor, **params)


def _empty_reason(gray) -> str:
    h, w = gray.shape[:2]
    if min(h, w) < MIN_SIDE:
        return f"image is {w}x{h} px, smaller than {MIN_SIDE} px a side: no features"
    if float(gray.max() - gray.min()) < 1e-6:
        return "constant image: no features"
    return "no features detected"


def _extract_one(job: ExtractJob, max_side, extractor=None):
    """Runs in a worker: returns (name, features, (w, h), scale) or (name, None, reason, None); an image
    without features says why in ``features.meta['note']`` (stored with it and reported)."""
    ex = extractor or _WORKER_EXTRACTOR
    try:
        img = load_gray(job.path, max_side=max_side, bbox=job.bbox)
        w, h = img.original_size
        if job.bbox is not None:
            w, h = job.bbox[2] - job.bbox[0], job.bbox[3] - job.bbox[1]
        if min(img.gray.shape) < MIN_SIDE:
            feats = Features.empty()
        else:
            feats = ex.extract(img.gray)
        offset = (0.0, 0.0)
        if job.bbox is not None:
            offset = (float(max(0, int(np.floor(job.bbox[0])))), float(max(0, int(np.floor(job.bbox[1])))))
        frames = rescale_frames(feats.frames, img.scale, offset)
        if not (np.isfinite(frames).all()):
            raise BowRetrievalError("extractor produced non-finite frames")
        meta = {"note": _empty_reason(img.gray)} if len(feats) == 0 else {}
        return job.name, Features(frames, feats.descriptors, meta), (w, h), img.scale
    except ImageError as exc:
        return job.name, None, str(exc), None
    except Exception as exc:  # a bug or a pathological image must not stop the batch
        return job.name, None, f"{type(exc).__name__}: {exc} ({traceback.format_exc(limit=2).splitlines()[-1]})", None


def jobs_from_paths(paths, root=None) -> list:
    """Jobs named by the path relative to ``root`` (default: the common folder), extension kept."""
    paths = [os.fspath(p) for p in paths]
    if not paths:
        return []
    root = os.fspath(root) if root else os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    return [ExtractJob(os.path.relpath(os.path.abspath(p), root), p) for p in paths]


def extract_to_store(jobs, store_path, extractor: str = "sift", params: dict | None = None,
                     max_side: int | None = 1024, workers: int = 2, retry_failed: bool = False,
                     progress: bool = True, threads_per_worker: int = 1) -> ExtractReport:
    """Extract features for ``jobs`` (ExtractJob list) into ``store_path``; resumable."""
    params = dict(params or {})
    get_extractor(extractor, **params)  # fail early on a bad name or parameter
    os.makedirs(os.path.dirname(os.path.abspath(store_path)), exist_ok=True)
    report = ExtractReport(os.fspath(store_path))
    with FeatureStore(store_path, "a", extractor, params, max_side) as store:
        done_before = set(store.names())
        failed_before = store.failed()
        notes_before = store.notes()
        todo = []
        for job in jobs:
            if job.name in done_before or (job.name in failed_before and not retry_failed):
                report.skipped += 1
                if job.name in failed_before:
                    report.failed[job.name] = failed_before[job.name]
                elif job.name in notes_before:
                    report.empty[job.name] = notes_before[job.name]
            else:
                todo.append(job)
        bar = tqdm(total=len(todo), desc=f"extract {extractor}", unit="img", disable=not progress)

        def handle(res):
            name, feats, info, scale = res
            if feats is None:
                store.put_failure(name, info)
                report.failed[name] = info
            else:
                note = feats.meta.get("note", "")
                store.put(name, feats, info[0], info[1], scale, note=note)
                report.done += 1
                if note:
                    report.empty[name] = note
            bar.update(1)

        if workers <= 1 or len(todo) <= 1:
            ex = get_extractor(extractor, **params)
            for job in todo:
                handle(_extract_one(job, max_side, ex))
        else:
            ctx = mp.get_context("spawn")  # OpenCV/OpenMP state does not survive fork safely
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=(extractor, params, threads_per_worker)) as pool:
                chunk = max(1, min(8, len(todo) // (4 * workers)))
                for res in pool.map(_extract_one, todo, [max_side] * len(todo), chunksize=chunk):
                    handle(res)
        bar.close()
    return report
