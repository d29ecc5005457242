"""Robust image reading: every failure becomes an ``ImageError`` naming the file and the reason.

Images are decoded with OpenCV from bytes (so unicode paths work), converted to grey as
(R+G+B)/3 on the 0..255 scale (the Hessian-Affine reference convention), 16-bit images are mapped
to 0..255, alpha is dropped, and images larger than ``max_side`` are downscaled with area averaging.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np

from .errors import ImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MIN_SIDE = 16  # below this no detector finds anything meaningful; reported, not fatal


@dataclass
class LoadedImage:
    gray: np.ndarray  # float32 (H, W), 0..255, possibly downscaled
    scale: float  # original pixels per pixel of ``gray`` (>= 1)
    original_size: tuple  # (width, height) of the file


def read_color(path, flags=cv2.IMREAD_UNCHANGED) -> np.ndarray:
    """Decode an image file into an array (BGR, BGRA, grey; 8 or 16 bit) or raise ImageError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file; check the path or the image list")
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a directory, not an image")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageError(f"{path}: cannot be read ({exc})") from exc
    if data.size == 0:
        raise ImageError(f"{path}: empty file; re-copy or remove it")
    try:
        img = cv2.imdecode(data, flags)
    except cv2.error as exc:  # e.g. more pixels than OpenCV accepts (CV_IO_MAX_IMAGE_PIXELS, 2^30)
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ImageError(f"{path}: cannot be decoded ({msg}); if it is a huge image, downscale it first") from None
    if img is None:
        raise ImageError(f"{path}: not a decodable image (corrupt or not an image file); re-copy or remove it")
    return img


def to_gray(img: np.ndarray) -> np.ndarray:
    """Grey = (R+G+B)/3 as float32 on the 0..255 scale, whatever the channel count or bit depth."""
    if img.dtype == np.uint16:
        img = img.astype(np.float32) * (255.0 / 65535.0)
    elif img.dtype != np.uint8:
        img = img.astype(np.float32)
        hi = float(img.max()) if img.size else 1.0
        if hi <= 1.0:
            img = img * 255.0
    img = img.astype(np.float32, copy=False)
    if img.ndim == 3:
        img = img[:, :, :3].mean(axis=2) if img.shape[2] >= 3 else img[:, :, 0]
    return np.ascontiguousarray(img, dtype=np.float32)


def downscale(gray: np.ndarray, max_side: int | None):
    """Downscale so that the longest side is <= max_side; returns (image, scale >= 1)."""
    h, w = gray.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return gray, 1.0
    s = max(h, w) / float(max_side)
    nw, nh = max(1, int(round(w / s))), max(1, int(round(h / s)))
    small = cv2.resize(gray, (nw, nh), interpolation=cv2.INTER_AREA)
    # the effective scale per axis differs by rounding; use the mean so frames map back to within 0.5 px
    return small, 0.5 * (w / nw + h / nh)


def load_gray(path, max_side: int | None = None, bbox=None) -> LoadedImage:
    """Read ``path`` as a grey float32 image, optionally cropped to ``bbox`` = [x1, y1, x2, y2]
    (in original pixels) and downscaled to ``max_side``. Raises ImageError for unusable files."""
    img = read_color(path)
    h, w = img.shape[:2]
    if h < 1 or w < 1:
        raise ImageError(f"{path}: image has no pixels")
    gray = to_gray(img)
    if bbox is not None:
        x1, y1, x2, y2 = [float(v) for v in bbox]
        x1, y1 = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
        x2, y2 = min(w, int(np.ceil(x2))), min(h, int(np.ceil(y2)))
        if x2 <= x1 or y2 <= y1:
            raise ImageError(f"{path}: bounding box {list(bbox)} is empty inside a {w}x{h} image")
        gray = gray[y1:y2, x1:x2]
    small, scale = downscale(gray, max_side)
    return LoadedImage(np.ascontiguousarray(small), scale, (w, h))


def list_images(folder) -> list:
    """Sorted image files (by extension) directly inside ``folder`` or listed one per line in a text file."""
    folder = os.fspath(folder)
    if os.path.isfile(folder) and folder.endswith((".txt", ".lst")):
        base = os.path.dirname(folder)
        with open(folder) as fh:
            names = [ln.strip() for ln in fh if ln.strip() and not ln.startswith("#")]
        return [n if os.path.isabs(n) else os.path.join(base, n) for n in names]
    if not os.path.isdir(folder):
        raise ImageError(f"{folder}: not a folder of images or a .txt image list")
    return sorted(
        os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS)
    )
