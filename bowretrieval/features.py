"""Local-feature extractors, pluggable by name.

An extractor turns a grey float32 image (0..255) into ``Features``: frames (N, 6) float32
``x, y, a11, a12, a21, a22`` (the affine map from the unit circle of the normalised patch to image
pixels, pixel centres at integer coordinates) and raw SIFT descriptors as uint8, (N, 128) or
(N, R, 128) for R measurement regions. Register new extractors with ``@register_extractor("name")``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from .descriptors import sift_to_uint8
from .errors import ConfigError

MR_SIZE = 3.0 * np.sqrt(3.0)  # measurement-region radius in units of the detected scale


@dataclass
class Features:
    frames: np.ndarray  # (N, 6) float32
    descriptors: np.ndarray  # (N, 128) or (N, R, 128) uint8
    meta: dict = field(default_factory=dict)

    def __len__(self):
        return int(self.frames.shape[0])

    @staticmethod
    def empty(dim: int = 128, regions: int = 0) -> "Features":
        shape = (0, regions, dim) if regions else (0, dim)
        return Features(np.zeros((0, 6), np.float32), np.zeros(shape, np.uint8))


_REGISTRY: dict = {}


def register_extractor(name: str):
    """Class decorator: make an extractor available to ``get_extractor(name, **params)``."""

    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_extractors() -> list:
    _load_builtin()
    return sorted(_REGISTRY)


def get_extractor(name: str, **params):
    """Instantiate a registered extractor; unknown names or parameters raise ConfigError."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown extractor {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    try:
        return cls(**params)
    except TypeError as exc:
        raise ConfigError(f"extractor {name!r}: bad parameters {sorted(params)} ({exc})") from exc


def _load_builtin():
    # extractors living in other modules register themselves on import
    try:
        from . import hesaff  # noqa: F401
    except ImportError:
        pass


def rescale_frames(frames: np.ndarray, scale: float, offset=(0.0, 0.0)) -> np.ndarray:
    """Map frames from a downscaled (by ``scale``) and/or cropped (at ``offset``) image back to the
    original pixel grid, keeping the pixel-centre-at-integer convention."""
    f = np.array(frames, dtype=np.float32, copy=True)
    if scale != 1.0:
        f[:, 0:2] = (f[:, 0:2] + 0.5) * scale - 0.5
        f[:, 2:6] *= scale
    f[:, 0] += offset[0]
    f[:, 1] += offset[1]
    return f


def frames_from_keypoints(kps, mr_size: float = MR_SIZE) -> np.ndarray:
    """Similarity frames from OpenCV keypoints: centre, radius mr_size * sigma, dominant orientation.

    OpenCV stores ``size`` = 2 sigma and ``angle`` = theta in degrees, the dominant gradient
    orientation measured in image coordinates (x right, y down); the frame maps the patch x-axis onto
    that orientation, so F_b F_a^-1 of two matched frames is the local image-to-image rotation and
    scale (checked by rotating an image: tests/test_ransac.py).
    """
    if len(kps) == 0:
        return np.zeros((0, 6), np.float32)
    pts = np.array([k.pt for k in kps], np.float64)
    sigma = np.array([k.size for k in kps], np.float64) / 2.0
    theta = np.deg2rad(np.array([k.angle for k in kps], np.float64))
    r = mr_size * sigma
    c, s = np.cos(theta) * r, np.sin(theta) * r
    return np.stack([pts[:, 0], pts[:, 1], c, -s, s, c], axis=1).astype(np.float32)


@register_extractor("sift")
class OpenCVSift:
    """OpenCV SIFT (difference of Gaussians) with dominant orientations; the baseline extractor."""

    def __init__(self, max_features: int = 0, contrast_threshold: float = 0.04,
                 edge_threshold: float = 10.0, sigma: float = 1.6, upright: bool = False):
        if max_features < 0:
            raise ConfigError("sift.max_features must be >= 0 (0 keeps all)")
        self.params = dict(max_features=int(max_features), contrast_threshold=float(contrast_threshold),
                           edge_threshold=float(edge_threshold), sigma=float(sigma), upright=bool(upright))
        self._sift = None

    def _detector(self):
        if self._sift is None:  # created lazily: cv2 objects do not pickle into worker processes
            p = self.params
            self._sift = cv2.SIFT_create(nfeatures=p["max_features"], contrastThreshold=p["contrast_threshold"],
                                         edgeThreshold=p["edge_threshold"], sigma=p["sigma"])
        return self._sift

    def __getstate__(self):
        return {"params": self.params, "_sift": None}

    def extract(self, gray: np.ndarray) -> Features:
        if gray.size == 0 or min(gray.shape[:2]) < 8 or float(gray.max() - gray.min()) < 1e-6:
            return Features.empty()
        img8 = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
        kps, desc = self._detector().detectAndCompute(img8, None)
        if desc is None or len(kps) == 0:
            return Features.empty()
        if self.params["upright"]:
            for k in kps:
                k.angle = 0.0
            kps, desc = self._detector().compute(img8, kps)
        # OpenCV emits duplicate keypoints (same location/scale, several orientations are fine,
        # exact duplicates are not): drop exact repeats.
        frames = frames_from_keypoints(kps)
        _, keep = np.unique(np.round(frames, 3), axis=0, return_index=True)
        keep.sort()
        return Features(frames[keep], sift_to_uint8(desc[keep]))
