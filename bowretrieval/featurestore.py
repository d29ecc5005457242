"""Resumable HDF5 feature store: one group per image, written by one process, flushed per image.

Layout (format ``bowretrieval.features/1``; see docs/formats.md)::

    /                       attrs: format, extractor, extractor_params (JSON), max_side
    /images/<key>           attrs: name, width, height, scale, n, complete (, note: why no features)
        frames              (N, 6) float32  x, y, a11, a12, a21, a22 in original pixels
        descriptors         (N, 128) or (N, R, 128) uint8 raw SIFT
    /failed/<key>           attrs: name, reason

``<key>`` is the image name percent-encoded (HDF5 treats '/' as a path separator). A group counts
only once its ``complete`` attribute is set, so a run killed mid-write is repaired on reopen: the
incomplete group is dropped and redone, and everything flushed before survives.
"""
from __future__ import annotations

import json
import os
from urllib.parse import quote, unquote

import h5py
import numpy as np

from .descriptors import transform
from .errors import FeatureStoreError
from .features import Features

FORMAT = "bowretrieval.features/1"


def _key(name: str) -> str:
    return quote(name, safe="")


class FeatureStore:
    """Open a store for reading (mode 'r') or for adding images (mode 'a').

    extractor / extractor_params / max_side: the settings the store is written with; opening an
    existing store for writing with other settings raises instead of mixing features.
    """

    def __init__(self, path, mode: str = "r", extractor: str | None = None,
                 extractor_params: dict | None = None, max_side: int | None = None):
        self.path = os.fspath(path)
        self.mode = mode
        if mode == "r" and not os.path.exists(self.path):
            raise FeatureStoreError(f"{self.path}: no such feature store; run `bowr extract` first")
        try:
            self._h5 = h5py.File(self.path, mode)
        except OSError as exc:
            raise FeatureStoreError(
                f"{self.path}: cannot be opened as an HDF5 feature store ({exc}); if a crash damaged it, "
                "move it aside and re-run the extraction") from exc
        if mode != "r":
            self._init_write(extractor, extractor_params or {}, max_side)
        elif self._h5.attrs.get("format") != FORMAT:
            fmt = self._h5.attrs.get("format")
            self._h5.close()
            raise FeatureStoreError(f"{self.path}: format {fmt!r} is not {FORMAT!r}; re-extract with this version")

    def _init_write(self, extractor, params, max_side):
        h = self._h5
        settings = json.dumps(params, sort_keys=True)
        if "format" not in h.attrs:
            h.attrs["format"] = FORMAT
            h.attrs["extractor"] = extractor or ""
            h.attrs["extractor_params"] = settings
            h.attrs["max_side"] = int(max_side or 0)
            h.require_group("images")
            h.require_group("failed")
        else:
            if h.attrs["format"] != FORMAT:
                raise FeatureStoreError(f"{self.path}: written in format {h.attrs['format']!r}; use a new file")
            same = (extractor is None or h.attrs["extractor"] == extractor) and \
                   (extractor is None or h.attrs["extractor_params"] == settings) and \
                   (max_side is None or int(h.attrs["max_side"]) == int(max_side or 0))
            if not same:
                raise FeatureStoreError(
                    f"{self.path}: holds features of extractor {h.attrs['extractor']!r} "
                    f"{h.attrs['extractor_params']} max_side {h.attrs['max_side']}, not {extractor!r} {settings} "
                    f"max_side {max_side}; write to another file")
            self._drop_incomplete()

    def _drop_incomplete(self):
        grp = self._h5["images"]
        for k in [k for k in grp if not grp[k].attrs.get("complete", False)]:
            del grp[k]
        self._h5.flush()

    # -- context manager ------------------------------------------------------------------------
    def close(self):
        if getattr(self, "_h5", None) is not None and self._h5.id.valid:
            self._h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- reading --------------------------------------------------------------------------------
    @property
    def extractor(self) -> str:
        return str(self._h5.attrs.get("extractor", ""))

    @property
    def extractor_params(self) -> dict:
        return json.loads(self._h5.attrs.get("extractor_params", "{}"))

    def names(self) -> list:
        grp = self._h5["images"]
        return sorted(unquote(k) for k in grp if grp[k].attrs.get("complete", False))

    def failed(self) -> dict:
        grp = self._h5["failed"]
        return {unquote(k): str(grp[k].attrs["reason"]) for k in grp}

    def notes(self) -> dict:
        """Images stored without features, with the reason (too small, constant, nothing detected)."""
        grp = self._h5["images"]
        return {unquote(k): str(grp[k].attrs["note"]) for k in grp
                if grp[k].attrs.get("complete", False) and "note" in grp[k].attrs}

    def __contains__(self, name) -> bool:
        k = _key(name)
        grp = self._h5["images"]
        return k in grp and bool(grp[k].attrs.get("complete", False))

    def __len__(self):
        return len(self.names())

    def _group(self, name):
        if name not in self:
            if _key(name) in self._h5["failed"]:
                reason = self._h5["failed"][_key(name)].attrs["reason"]
                raise FeatureStoreError(f"{self.path}: image {name!r} failed extraction: {reason}")
            raise FeatureStoreError(f"{self.path}: no features for image {name!r}; extract it first")
        return self._h5["images"][_key(name)]

    def load(self, name) -> Features:
        g = self._group(name)
        meta = {k: g.attrs[k] for k in ("width", "height", "scale")}
        return Features(g["frames"][()], g["descriptors"][()], meta)

    def frames(self, name) -> np.ndarray:
        return self._group(name)["frames"][()]

    def descriptors(self, name, variant: str = "rootsift", region: int | None = None, beta: float = 0.5):
        """Float32 descriptors of one image in the given variant; ``region`` selects a measurement
        region of (N, R, 128) stores (default: the middle one, i.e. 1.0 x r for the default set)."""
        d = self._group(name)["descriptors"][()]
        if d.ndim == 3:
            d = d[:, d.shape[1] // 2 if region is None else region, :]
        return transform(d, variant, beta)

    def image_size(self, name) -> tuple:
        g = self._group(name)
        return int(g.attrs["width"]), int(g.attrs["height"])

    # -- writing --------------------------------------------------------------------------------
    def put(self, name: str, feats: Features, width: int, height: int, scale: float = 1.0, note: str = ""):
        """Write one image's features (replacing an earlier entry) and flush; ``note`` says why an
        image has no features (kept in the group's ``note`` attribute)."""
        if self.mode == "r":
            raise FeatureStoreError(f"{self.path}: opened read-only")
        k = _key(name)
        grp = self._h5["images"]
        if k in grp:
            del grp[k]
        if k in self._h5["failed"]:
            del self._h5["failed"][k]
        frames = np.ascontiguousarray(feats.frames, dtype=np.float32)
        desc = np.ascontiguousarray(feats.descriptors)
        if frames.ndim != 2 or frames.shape[1] != 6 or desc.shape[0] != frames.shape[0]:
            raise FeatureStoreError(f"{name}: frames {frames.shape} / descriptors {desc.shape} do not agree")
        g = grp.create_group(k)
        g.create_dataset("frames", data=frames)
        g.create_dataset("descriptors", data=desc)
        g.attrs.update(name=name, width=int(width), height=int(height), scale=float(scale), n=int(len(frames)))
        if note:
            g.attrs["note"] = str(note)
        g.attrs["complete"] = True  # written last: marks the group as whole
        self._h5.flush()

    def put_failure(self, name: str, reason: str):
        if self.mode == "r":
            raise FeatureStoreError(f"{self.path}: opened read-only")
        k = _key(name)
        grp = self._h5["failed"]
        if k in grp:
            del grp[k]
        grp.create_group(k).attrs.update(name=name, reason=str(reason))
        self._h5.flush()
