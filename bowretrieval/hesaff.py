"""Hessian-Affine regions with SIFT descriptors (Mikolajczyk & Schmid 2004, Perdoch et al. 2009).

Scale-space det(Hessian) sigma^4 extrema with quadratic refinement, Baumberg affine shape
adaptation, up-right ("gravity vector") or dominant-orientation frames, 41x41 normalised patches and
4x4x8 SIFT, optionally at several measurement-region sizes per frame in one pass. The Gaussian
pyramid is built here with OpenCV; every per-pixel and per-keypoint step runs in the compiled
kernel ``bowretrieval._ext.hesaff`` without the GIL, over ``threads`` OpenMP threads.

Modes: ``compat`` samples each patch at image resolution and blurs it like the reference program
(a drop-in for its features); ``fast`` samples each patch from the pyramid level whose blur matches
its subsampling, which removes most of the per-patch cost.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from .descriptors import VARIANTS, transform
from .errors import ConfigError, DataError
from .features import MR_SIZE, Features, register_extractor, rescale_frames
from .imageio import downscale

DEFAULT_REGIONS = (1.0,)
MULTI_REGIONS = (0.5, 0.75, 1.0, 1.25, 1.5)  # the usual set of relative measurement regions
MODES = ("compat", "fast")
ORIENTATIONS = ("upright", "dominant")
INITIAL_SIGMA = 1.6
INPUT_SIGMA = 0.5  # blur assumed in the input image
LEVELS = 3  # detection levels per octave
BORDER = 5
# affine-adaptation update per mode: 0 = the reference program's (keeps its points), 1 = composed
# in the patch frame (see ext/hesaff/hesaff_core.c, adapt_shape)
_SHAPE_UPDATE = {"compat": 0, "fast": 1}


def _ext():
    try:
        from ._ext import hesaff as _h
    except ImportError as exc:  # pragma: no cover - only without a build
        raise ImportError("bowretrieval._ext.hesaff is not built; run `python setup.py build_ext --inplace` "
                          "or `pip install -e .` in the repository") from exc
    return _h


@register_extractor("hesaff")
class HessianAffine:
    """Hessian-Affine detector + SIFT, returning raw uint8 SIFT, (N, 128) or (N, R, 128).

    threshold: Hessian threshold t on the 0..255 scale (det H sigma^4 > t^2; reference 16/3).
    edge_ratio: eigenvalue ratio of the edge test. max_features: keep the strongest |response|
    (0: all). max_side: downscale larger images internally (0: never); frames stay in input pixels.
    mode: 'compat' | 'fast'. orientation: 'upright' | 'dominant' (up to 4 per region).
    regions: relative measurement-region sizes (x 3 sqrt 3 x scale), e.g. MULTI_REGIONS.
    descriptor / beta: the variant ``transform`` produces for consumers (stores keep raw SIFT).
    threads: OpenMP threads of the kernels (the pyramid is built on one thread).
    """

    def __init__(self, threshold: float = 16.0 / 3.0, edge_ratio: float = 10.0, max_features: int = 0,
                 max_side: int = 0, mode: str = "fast", orientation: str = "upright",
                 regions=DEFAULT_REGIONS, descriptor: str = "rootsift", beta: float = 0.5, threads: int = 1):
        if not (isinstance(threshold, (int, float)) and threshold > 0 and math.isfinite(threshold)):
            raise ConfigError(f"hesaff.threshold must be a positive number, got {threshold!r}")
        if not (isinstance(edge_ratio, (int, float)) and edge_ratio > 1):
            raise ConfigError(f"hesaff.edge_ratio must be > 1, got {edge_ratio!r}")
        if int(max_features) < 0 or int(max_side) < 0:
            raise ConfigError("hesaff.max_features and hesaff.max_side must be >= 0 (0: no limit)")
        if 0 < int(max_side) < 2 * BORDER + 3:
            raise ConfigError(f"hesaff.max_side {max_side} is too small; use 0 or >= {2 * BORDER + 3}")
        if mode not in MODES:
            raise ConfigError(f"hesaff.mode must be one of {MODES}, got {mode!r}")
        if orientation not in ORIENTATIONS:
            raise ConfigError(f"hesaff.orientation must be one of {ORIENTATIONS}, got {orientation!r}")
        if isinstance(regions, (int, float)):
            regions = (regions,)
        try:
            regions = tuple(float(r) for r in regions)
        except (TypeError, ValueError):
            raise ConfigError(f"hesaff.regions must be a list of positive numbers, got {regions!r}") from None
        if not regions or not all(0.1 <= r <= 4.0 for r in regions):
            raise ConfigError(f"hesaff.regions must be a non-empty list of sizes in [0.1, 4], got {regions!r}")
        if descriptor not in VARIANTS:
            raise ConfigError(f"hesaff.descriptor must be one of {VARIANTS}, got {descriptor!r}")
        if int(threads) < 1:
            raise ConfigError("hesaff.threads must be >= 1")
        self.params = dict(threshold=float(threshold), edge_ratio=float(edge_ratio),
                           max_features=int(max_features), max_side=int(max_side), mode=mode,
                           orientation=orientation, regions=list(regions), descriptor=descriptor,
                           beta=float(beta), threads=int(threads))

    # -- public API -------------------------------------------------------------------------
    def extract(self, gray: np.ndarray) -> Features:
        """Features of a grey float32 image on the 0..255 scale; frames in its pixel coordinates."""
        img = self._check(gray)
        p = self.params
        n_reg = len(p["regions"])
        empty = Features.empty(regions=n_reg if n_reg > 1 else 0)
        if img is None:
            return empty
        img, scale = downscale(img, p["max_side"] or None)
        img = np.ascontiguousarray(img, dtype=np.float32)
        if min(img.shape) <= 2 * BORDER + 2:
            return empty
        frames, resp, desc = self._run(img)
        if len(frames) == 0:
            return empty
        if p["max_features"] and len(frames) > p["max_features"]:
            keep = np.sort(np.argsort(-np.abs(resp), kind="stable")[: p["max_features"]])
            frames, resp, desc = frames[keep], resp[keep], desc[keep]
        frames = rescale_frames(frames, scale)
        if n_reg == 1:
            desc = desc[:, 0, :]
        return Features(np.ascontiguousarray(frames, np.float32), np.ascontiguousarray(desc),
                        meta={"response": resp.astype(np.float32)})

    def transform(self, desc) -> np.ndarray:
        """The configured descriptor variant (float32) of raw uint8 SIFT from ``extract``."""
        return transform(desc, self.params["descriptor"], self.params["beta"])

    # -- internals --------------------------------------------------------------------------
    @staticmethod
    def _check(gray):
        g = np.asarray(gray)
        if g.ndim == 3 and g.shape[2] == 1:
            g = g[:, :, 0]
        if g.ndim != 2:
            raise DataError(f"hesaff.extract needs a 2-D grey image, got shape {g.shape}; "
                            "convert colour images with bowretrieval.imageio.to_gray")
        if g.size == 0 or min(g.shape) <= 2 * BORDER + 2:
            return None
        g = g.astype(np.float32, copy=False)
        if not np.isfinite(g).all():
            g = np.nan_to_num(g, nan=0.0, posinf=255.0, neginf=0.0)
        if float(g.max() - g.min()) < 1e-6:
            return None
        return np.ascontiguousarray(g)

    def _kernel_params(self):
        p = self.params
        regions = p["regions"]
        below = [r for r in regions if r <= 1.0]
        # border test on the reference region (or the largest region below it), so that extra
        # larger regions do not remove features near the border; they sample with clamping
        check = max(below) if below else min(regions)
        return dict(threshold=p["threshold"], edge_ratio=p["edge_ratio"], mode=MODES.index(p["mode"]),
                    oriented=ORIENTATIONS.index(p["orientation"]), max_ori=4, check_region=float(check),
                    shape_update=_SHAPE_UPDATE[p["mode"]],
                    ref_flags=_ext().REF_ALL if p["mode"] == "compat" else 0)

    def _run(self, img):
        h = _ext()
        threads = self.params["threads"]
        kp_params = self._kernel_params()
        prev = cv2.getNumThreads()
        cv2.setNumThreads(1)  # blurs of one image are too small to gain from OpenCV's thread pool
        try:
            pyramid, kps = self._detect(img, kp_params, threads)
        finally:
            cv2.setNumThreads(prev)
        if len(kps) == 0:
            return np.zeros((0, 6), np.float32), np.zeros(0, np.float32), np.zeros((0, 1, 128), np.uint8)
        if self.params["max_features"] and len(kps) > 2 * self.params["max_features"]:
            # adaptation drops some points; keep a margin so the final cut has enough to choose from
            keep = np.sort(np.argsort(-np.abs(kps["response"]), kind="stable")[: 2 * self.params["max_features"]])
            kps = np.ascontiguousarray(kps[keep])
        regions = np.asarray(self.params["regions"], np.float32)
        frames, resp, desc, count = h.describe(pyramid, kps, kp_params, regions, threads)
        S = frames.shape[1]
        mask = np.arange(S)[None, :] < count[:, None]
        return frames[mask], resp[mask], desc[mask]

    @staticmethod
    def _detect(img, kp_params, threads):
        """Gaussian scale space (3 levels per octave, 5 blurred images each) and its extrema.

        Returns the sampling pyramid [(image, pixel distance, blur in image pixels), ...] (entry 0
        the input, then levels 0..2 of every octave) and the detected keypoints."""
        h = _ext()
        step = 2.0 ** (1.0 / LEVELS)
        # compat: the reference program's kernels, int(6 sigma + 1) taps made odd; otherwise
        # OpenCV's default for float images, 8 sigma + 1 taps
        ref_k = kp_params.get("ref_flags", 0) & h.REF_PYR_KSIZE

        def blur(a, s):
            k = (int(6.0 * s + 1.0) | 1) if ref_k else 0
            return cv2.GaussianBlur(a, (k, k), s, borderType=cv2.BORDER_REPLICATE)
        pyramid = [(img, 1.0, INPUT_SIGMA)]
        first = blur(img, math.sqrt(INITIAL_SIGMA ** 2 - INPUT_SIGMA ** 2))
        pd, octave, found = 1.0, 0, []
        while min(first.shape) > 2 * BORDER + 2:
            levels = [first]
            sigma = INITIAL_SIGMA
            for _ in range(LEVELS + 1):
                levels.append(blur(levels[-1], sigma * math.sqrt(step * step - 1.0)))
                sigma *= step
            found.append(h.detect_octave(levels, pd, octave, kp_params, threads))
            for k in range(LEVELS):
                pyramid.append((levels[k], pd, pd * INITIAL_SIGMA * step ** k))
            first = np.ascontiguousarray(levels[LEVELS][::2, ::2])
            pd *= 2.0
            octave += 1
        kps = np.concatenate(found) if found else np.zeros(0, h.KP_DTYPE)
        return pyramid, np.ascontiguousarray(kps)


def hesaff_frames_to_ellipses(frames: np.ndarray) -> np.ndarray:
    """Ellipse matrices E (N, 2, 2) with x^T E x = 1 on the region border (E = (A A^T)^-1)."""
    A = np.asarray(frames, np.float64)[:, 2:6].reshape(-1, 2, 2)
    return np.linalg.inv(A @ A.transpose(0, 2, 1))


__all__ = ["HessianAffine", "DEFAULT_REGIONS", "MULTI_REGIONS", "MR_SIZE", "hesaff_frames_to_ellipses"]
