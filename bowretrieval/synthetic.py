"""The embedded default dataset: a seeded photo collection of textured 3D "landmarks".

Nothing can be downloaded, so the package renders its own benchmark. Each landmark is a small set of
textured planes (a main facade, protruding blocks, a tower behind it, angled wings) in its own world
frame (metres; X right, Y down, Z away from the cameras, ground at Y = 0). Views are rendered through
pinhole cameras with known poses (``x ~ K R (X - C)``) with changes of viewpoint (azimuth up to
``max_azimuth``), distance and zoom (scale), lighting (gain, gamma, tint, shading, noise) and
occlusion (poles, trees, vehicles in front), composited with a per-pixel depth test and saved as JPEG.
Distractors are single views of other, unrelated buildings of the same kind; the training images are
yet other buildings drawn from an independent random stream, for learning vocabularies.

Layout written by :func:`generate` (the revisited Oxford/Paris layout, see docs/formats.md)::

    <out>/jpg/landmarkLL__VVVV.jpg, jpg/distractor__NNNN.jpg   database images
    <out>/gnd_<name>.json  and .pkl                             {'imlist', 'qimlist', 'gnd'}
    <out>/cameras.json     {file name: {K, R, C, size}}         landmark views (one frame per landmark)
    <out>/train/train__NNNN.jpg                                independent training images
    <out>/dataset.json     parameters, landmark id per image, per-query overlap statistics

Ground truth comes from the geometry. A query is a landmark view with a box ``bbx`` around part of
one of its facades. The landmark surface seen inside the box (a grid of about 2,500 samples on
pixels where a facade is visible and not occluded) is lifted to 3D with the query's depth buffer and
projected into every other view of the same landmark; a sample counts as seen there when it falls
inside the image on the same plane, not hidden by a nearer plane or an occluder. With ``overlap``
the fraction of samples seen, ``scale`` the change of size of the seen part (square root of the
ratio of its areas, >= 1 either way) and ``angle`` the angle between the two viewing rays to it:

* easy: overlap >= 0.5, scale <= 2 and angle <= 25 degrees;
* hard: otherwise overlap >= 0.25, scale <= 4 and angle <= 60 degrees;
  both need the seen part to span at least 32 pixels (the side of a square of its extent);
* junk: every other view of the same landmark, the query image itself included.

Views of other landmarks and distractors are negatives. Lighting is not used for the labels.
"""
from __future__ import annotations

import json
import os
import pickle
import string
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from .errors import DataError

FORMAT = "bowretrieval.synthetic/1"

# label thresholds (see module docstring)
EASY_OVERLAP, EASY_SCALE, EASY_ANGLE = 0.5, 2.0, 25.0
HARD_OVERLAP, HARD_SCALE, HARD_ANGLE, HARD_MIN_SIDE = 0.25, 4.0, 60.0, 32.0

_STREAM_LANDMARK, _STREAM_VIEW, _STREAM_DISTRACTOR, _STREAM_TRAIN, _STREAM_QUERY = range(5)


@dataclass
class Plane:
    """A textured rectangle: ``origin`` is its top-left corner, ``u`` / ``v`` unit vectors along
    the texture's x (right) and y (down) axes; ``width`` / ``height`` in metres."""

    origin: np.ndarray
    u: np.ndarray
    v: np.ndarray
    width: float
    height: float
    texture: np.ndarray  # (h, w, 3) uint8 BGR

    def corners(self) -> np.ndarray:
        o, u, v = self.origin, self.u * self.width, self.v * self.height
        return np.stack([o, o + u, o + u + v, o + v])

    def describe(self) -> dict:
        return dict(origin=self.origin.tolist(), u=self.u.tolist(), v=self.v.tolist(),
                    width=float(self.width), height=float(self.height))


@dataclass
class Camera:
    K: np.ndarray
    R: np.ndarray  # world-to-camera rotation
    C: np.ndarray  # centre in world coordinates
    size: tuple  # (width, height)

    def to_json(self) -> dict:
        return {"K": self.K.tolist(), "R": self.R.tolist(), "C": self.C.tolist(), "size": list(self.size)}

    def project(self, X: np.ndarray):
        """Pixels (N, 2) and depths (N,) of world points (N, 3)."""
        xc = (X - self.C) @ self.R.T
        z = xc[:, 2]
        p = xc @ self.K.T
        with np.errstate(divide="ignore", invalid="ignore"):
            return p[:, :2] / p[:, 2:3], z


@dataclass
class GeneratedDataset:
    """Where :func:`generate` wrote everything."""

    root: str
    name: str
    images_dir: str
    gnd_json: str
    gnd_pkl: str
    cameras_json: str
    train_dir: str
    dataset_json: str

    def train_images(self) -> list:
        return sorted(os.path.join(self.train_dir, f) for f in os.listdir(self.train_dir) if f.endswith(".jpg"))


# -- procedural textures -----------------------------------------------------------------------------
def _noise(rng, h, w, octaves=4, base=4) -> np.ndarray:
    """Multi-octave value noise in about [-1, 1], float32 (h, w)."""
    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        n = base * 2**o
        small = rng.standard_normal((max(2, n * h // max(h, w)), max(2, n * w // max(h, w))), dtype=np.float32)
        out += amp * cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        total += amp
        amp *= 0.55
    return out / total


def _colour(rng, lo=30, hi=230) -> tuple:
    return tuple(int(c) for c in rng.integers(lo, hi, 3))


def _random_word(rng) -> str:
    n = int(rng.integers(2, 8))
    return "".join(rng.choice(list(string.ascii_uppercase + string.digits), n))


def procedural_texture(rng, width: int, height: int) -> np.ndarray:
    """A facade-like BGR uint8 texture: noisy wall, a grid of varied windows, signs with random text,
    ornaments and stains. Different random generators give unrelated textures."""
    width, height = int(width), int(height)
    wall = np.array(_colour(rng, 60, 220), np.float32)
    tex = np.empty((height, width, 3), np.float32)
    tex[:] = wall
    tex += 28.0 * _noise(rng, height, width, octaves=5, base=3)[:, :, None] * rng.uniform(0.5, 1.0, 3)
    tex = np.clip(tex, 0, 255).astype(np.uint8)
    s = max(width, height) / 1000.0  # drawing scale

    # bricks / courses: a faint regular pattern of random pitch
    if rng.random() < 0.6:
        pitch = max(4, int(rng.uniform(10, 22) * s))
        shade = _colour(rng, 40, 200)
        for y in range(0, height, pitch):
            cv2.line(tex, (0, y), (width, y), shade, max(1, int(s)))

    # windows: a grid with per-window variation (shape, frame, bars, dark or lit panes)
    cols, rows = int(rng.integers(3, 9)), int(rng.integers(2, 6))
    cw, ch = width / cols, height / rows
    frame_c = _colour(rng, 150, 255)
    for r in range(rows):
        for c in range(cols):
            if rng.random() < 0.12:
                continue
            ww, wh = cw * rng.uniform(0.35, 0.7), ch * rng.uniform(0.4, 0.75)
            x0, y0 = c * cw + (cw - ww) / 2, r * ch + (ch - wh) / 2
            p0, p1 = (int(x0), int(y0)), (int(x0 + ww), int(y0 + wh))
            pane = _colour(rng, 0, 110) if rng.random() < 0.8 else _colour(rng, 150, 255)
            cv2.rectangle(tex, p0, p1, pane, -1)
            t = max(1, int(rng.uniform(2, 6) * s))
            cv2.rectangle(tex, p0, p1, frame_c, t)
            if rng.random() < 0.4:  # arched top
                cv2.ellipse(tex, (int(x0 + ww / 2), int(y0)), (int(ww / 2), int(wh / 4)), 0, 180, 360, frame_c, t)
            if rng.random() < 0.6:  # glazing bars
                cv2.line(tex, (int(x0 + ww / 2), int(y0)), (int(x0 + ww / 2), int(y0 + wh)), frame_c, t)
                cv2.line(tex, (int(x0), int(y0 + wh / 2)), (int(x0 + ww), int(y0 + wh / 2)), frame_c, t)
            if rng.random() < 0.3:  # something behind the glass
                cx, cy = int(x0 + ww * rng.uniform(0.2, 0.8)), int(y0 + wh * rng.uniform(0.2, 0.8))
                cv2.circle(tex, (cx, cy), max(2, int(min(ww, wh) * rng.uniform(0.08, 0.25))), _colour(rng), -1)

    # ornaments, stains, graffiti: make every facade unique
    for _ in range(int(rng.integers(25, 60))):
        kind = rng.integers(0, 4)
        col = _colour(rng, 0, 255)
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = max(3, int(rng.uniform(6, 40) * s))
        if kind == 0:
            cv2.circle(tex, (x, y), r, col, -1 if rng.random() < 0.5 else max(1, int(2 * s)))
        elif kind == 1:
            pts = np.array([[x + rng.integers(-2 * r, 2 * r), y + rng.integers(-2 * r, 2 * r)] for _ in range(
                int(rng.integers(3, 6)))], np.int32)
            cv2.fillPoly(tex, [pts], col)
        elif kind == 2:
            cv2.line(tex, (x, y), (x + int(rng.integers(-4 * r, 4 * r)), y + int(rng.integers(-4 * r, 4 * r))),
                     col, max(1, int(rng.uniform(1, 4) * s)))
        else:
            cv2.ellipse(tex, (x, y), (r, max(2, r // 2)), float(rng.uniform(0, 180)), 0, 360, col, -1)

    # signs with text: the most distinctive local structure of real streets
    for _ in range(int(rng.integers(3, 9))):
        font = int(rng.choice([0, 1, 2, 3, 4, 6, 7]))
        scale = rng.uniform(0.8, 2.2) * s
        th = max(1, int(rng.uniform(1, 3) * s))
        word = _random_word(rng)
        (tw, tht), base = cv2.getTextSize(word, font, scale, th)
        x = int(rng.integers(0, max(1, width - tw)))
        y = int(rng.integers(tht + 2, max(tht + 3, height - base)))
        bg, fg = _colour(rng, 150, 255), _colour(rng, 0, 100)
        if rng.random() < 0.5:
            bg, fg = fg, bg
        pad = max(2, int(6 * s))
        cv2.rectangle(tex, (x - pad, y - tht - pad), (x + tw + pad, y + base + pad), bg, -1)
        cv2.putText(tex, word, (x, y), font, scale, fg, th, cv2.LINE_AA)

    fine = 6.0 * rng.standard_normal((height, width, 1), dtype=np.float32)
    return np.clip(tex.astype(np.float32) + fine, 0, 255).astype(np.uint8)


class TextureSource:
    """Procedural textures, or crops of photos from ``texture_dir`` (any image files).

    Photos are split once: the first ones (sorted by name) dress the landmarks, the rest the
    distractor and training buildings, so no photo appears both on a landmark and elsewhere.
    """

    def __init__(self, texture_dir=None, n_reserved: int = 0):
        self.photos: list = []
        if texture_dir:
            from .imageio import list_images

            self.photos = list_images(texture_dir)
            if not self.photos:
                raise DataError(f"{texture_dir}: texture_dir holds no images (jpg, png, ...)")
        self.n_reserved = min(n_reserved, len(self.photos))

    def _photo(self, path, rng, width, height) -> np.ndarray:
        from .imageio import read_color

        img = read_color(path)
        if img.dtype != np.uint8:
            img = (img.astype(np.float32) * (255.0 / max(float(img.max()), 1.0))).astype(np.uint8)
        if img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        img = img[:, :, :3]
        h, w = img.shape[:2]
        aspect = width / height
        # the largest random crop with the target aspect ratio covering at least 60% of a side
        f = rng.uniform(0.6, 1.0)
        cw = min(w, int(f * min(w, h * aspect)))
        chh = min(h, max(1, int(cw / aspect)))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - chh + 1))
        crop = np.ascontiguousarray(img[y0:y0 + chh, x0:x0 + cw])
        return cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA if cw > width else cv2.INTER_CUBIC)

    def landmark(self, rng, index: int, width: int, height: int) -> np.ndarray:
        if index < self.n_reserved:
            return self._photo(self.photos[index], rng, width, height)
        return procedural_texture(rng, width, height)

    def other(self, rng, width: int, height: int) -> np.ndarray:
        rest = self.photos[self.n_reserved:]
        if rest:
            return self._photo(rest[int(rng.integers(0, len(rest)))], rng, width, height)
        return procedural_texture(rng, width, height)


# -- scenes -------------------------------------------------------------------------------------------
def _rot_y(deg) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])


def make_building(rng, texture_fn, px_per_m: float, n_extra: int | None = None) -> list:
    """Planes of one building: a main facade plus protruding blocks, a tower behind, angled wings."""
    W = rng.uniform(8.0, 14.0)
    H = W * rng.uniform(0.5, 0.8)
    ex, ey = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])

    def plane(origin, u, w, h):
        tw, th = max(16, int(w * px_per_m)), max(16, int(h * px_per_m))
        return Plane(np.asarray(origin, float), np.asarray(u, float), ey.copy(), w, h, texture_fn(tw, th))

    planes = [plane([-W / 2, -H, 0.0], ex, W, H)]
    n_extra = int(rng.integers(1, 4)) if n_extra is None else n_extra
    kinds = rng.permutation(["block", "tower", "wing"])[:n_extra]
    for kind in kinds:
        if kind == "block":  # a porch or shop front in front of the facade
            w, h = W * rng.uniform(0.2, 0.4), H * rng.uniform(0.3, 0.6)
            x = rng.uniform(-W / 2, W / 2 - w)
            planes.append(plane([x, -h, -rng.uniform(1.0, 2.5)], ex, w, h))
        elif kind == "tower":  # rises above the facade from behind
            w, h = W * rng.uniform(0.15, 0.3), H * rng.uniform(1.3, 1.8)
            x = rng.uniform(-W / 2, W / 2 - w)
            planes.append(plane([x, -h, rng.uniform(2.0, 5.0)], ex, w, h))
        else:  # a wing at an angle, attached to one end of the facade and coming forward
            side = rng.choice([-1.0, 1.0])
            ang = rng.uniform(35.0, 70.0)
            w, h = W * rng.uniform(0.3, 0.5), H * rng.uniform(0.7, 1.0)
            if side > 0:  # right end: the wing starts there and runs towards the cameras
                u = _rot_y(ang) @ ex
                origin = np.array([W / 2, -h, 0.0])
            else:  # left end: the wing ends there
                u = _rot_y(-ang) @ ex
                origin = np.array([-W / 2, -h, 0.0]) - w * u
            planes.append(plane(origin, u, w, h))
    return planes


def _look_at(C, target, roll_deg) -> np.ndarray:
    f = target - C
    f = f / np.linalg.norm(f)
    right = np.cross([0.0, 1.0, 0.0], f)
    right /= np.linalg.norm(right)
    down = np.cross(f, right)
    R = np.stack([right, down, f])
    a = np.deg2rad(roll_deg)
    Rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    return Rz @ R


def sample_camera(rng, planes, size, max_azimuth=50.0, distance=(1.0, 2.4), zoom=(0.8, 1.6),
                  min_coverage=0.15, tries=50) -> Camera:
    """A camera in front of the building's main facade that sees enough of it."""
    main = planes[0]
    W, H = main.width, main.height
    centre = main.origin + main.u * W / 2 + main.v * H / 2
    w, h = size
    for _ in range(tries):
        az = rng.uniform(-max_azimuth, max_azimuth)
        D = W * rng.uniform(*distance)
        C = centre + D * np.array([np.sin(np.deg2rad(az)), 0.0, -np.cos(np.deg2rad(az))])
        C[1] = -rng.uniform(1.5, 1.5 + 0.4 * H)  # eye height up to a raised viewpoint
        target = centre + np.array([rng.uniform(-0.25, 0.25) * W, rng.uniform(-0.2, 0.2) * H, 0.0])
        R = _look_at(C, target, rng.normal(0.0, 3.0))
        f = max(w, h) * rng.uniform(*zoom)
        K = np.array([[f, 0, (w - 1) / 2.0], [0, f, (h - 1) / 2.0], [0, 0, 1.0]])
        cam = Camera(K, R, C, (w, h))
        corners = np.concatenate([p.corners() for p in planes])
        if (cam.project(corners)[1] < 0.5).any():
            continue  # a plane reaches behind or too close to the camera
        pts, _ = cam.project(main.corners())
        poly = np.clip(pts, -4 * max(w, h), 5 * max(w, h)).astype(np.float32)
        inside = cv2.contourArea(cv2.convexHull(poly)) if len(poly) else 0.0
        clip = cv2.intersectConvexConvex(poly, np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32))[0]
        if inside > 0 and clip / (w * h) >= min_coverage:
            return cam
    raise DataError("could not place a camera that sees the landmark; relax max_azimuth / distance")


# -- rendering ----------------------------------------------------------------------------------------
def _background(rng, w, h) -> np.ndarray:
    """Sky over ground: smooth, few features, different in every image."""
    horizon = int(h * rng.uniform(0.55, 0.85))
    sky_top, sky_bot = np.array(_colour(rng, 120, 255), np.float32), np.array(_colour(rng, 150, 255), np.float32)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    img = sky_top * (1 - t) + sky_bot * t
    img = np.repeat(img, w, axis=1)
    img += 12.0 * _noise(rng, h, w, octaves=3, base=2)[:, :, None]
    ground = np.array(_colour(rng, 40, 140), np.float32)
    img[horizon:] = ground + 18.0 * _noise(rng, h - horizon, w, octaves=4, base=4)[:, :, None]
    return img


def _mip(texture, texels_per_pixel):
    """Pre-filter a texture that is minified, so the warp does not alias."""
    level = 0
    while texels_per_pixel >= 2.0 and min(texture.shape[:2]) >= 32:
        texture = cv2.pyrDown(texture)
        texels_per_pixel /= 2.0
        level += 1
    return texture, 2**level


def render(planes, cam: Camera, background):
    """Composite the planes seen by ``cam`` over ``background`` (float32 (h, w, 3)) with a depth test.

    Returns the image (float32), the plane id per pixel (int16, -1 background) and the inverse depth
    per pixel (float32, 0 on background).
    """
    w, h = cam.size
    img = background.copy()
    ids = np.full((h, w), -1, np.int16)
    best = np.zeros((h, w), np.float32)
    Kinv = np.linalg.inv(cam.K)
    U, V = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    for i, p in enumerate(planes):
        pts, z = cam.project(p.corners())
        if (z <= 0).any():
            continue
        th, tw = p.texture.shape[:2]
        span = max(np.linalg.norm(pts[1] - pts[0]), np.linalg.norm(pts[2] - pts[3]), 1e-3)
        tex, f = _mip(p.texture, tw / span)
        th, tw = tex.shape[:2]
        sx, sy = p.width / tw, p.height / th
        # texture pixel (s, t), centre at integers, -> point origin + (s + .5) sx u + (t + .5) sy v
        M = np.stack([sx * p.u, sy * p.v, p.origin + 0.5 * sx * p.u + 0.5 * sy * p.v - cam.C], axis=1)
        Hm = cam.K @ cam.R @ M
        warped = cv2.warpPerspective(tex, Hm, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        mask = cv2.warpPerspective(np.ones((th, tw), np.uint8), Hm, (w, h), flags=cv2.INTER_NEAREST,
                                   borderMode=cv2.BORDER_CONSTANT) > 0
        # inverse depth of a plane is affine in the pixel coordinates: n.K^-1 x / (n.X0)
        n_c = cam.R @ np.cross(p.u, p.v)
        d = float(n_c @ (cam.R @ (p.origin - cam.C)))
        if abs(d) < 1e-9:
            continue  # seen exactly edge-on
        a, b, c = (Kinv.T @ n_c) / d
        invz = (a * U + b * V + c).astype(np.float32)
        upd = mask & (invz > best)
        img[upd] = warped[upd]
        ids[upd] = i
        best[upd] = invz[upd]
    return img, ids, best


def _occlude(rng, img, ids, texture_fn, max_fraction=0.25):
    """Put 1-3 objects (pole, tree, vehicle) in front of the landmark; their pixels get id -2."""
    h, w = ids.shape
    ys, xs = np.nonzero(ids >= 0)
    if len(xs) == 0:
        return
    for _ in range(int(rng.integers(1, 4))):
        mask = np.zeros((h, w), np.uint8)
        j = int(rng.integers(0, len(xs)))
        cx, cy = int(xs[j]), int(ys[j])
        kind = rng.integers(0, 3)
        if kind == 0:  # pole or lamp post from the bottom
            t = max(3, int(w * rng.uniform(0.01, 0.03)))
            cv2.rectangle(mask, (cx - t, cy - int(h * 0.3)), (cx + t, h), 1, -1)
            cv2.circle(mask, (cx, cy - int(h * 0.3)), 2 * t, 1, -1)
        elif kind == 1:  # tree crown on a trunk
            r = int(min(w, h) * rng.uniform(0.08, 0.2))
            for _ in range(6):
                cv2.circle(mask, (cx + int(rng.integers(-r, r + 1)), cy + int(rng.integers(-r, r + 1)) // 2), r, 1, -1)
            cv2.rectangle(mask, (cx - r // 6, cy), (cx + r // 6, h), 1, -1)
        else:  # vehicle or people at the bottom
            bw, bh = int(w * rng.uniform(0.15, 0.35)), int(h * rng.uniform(0.1, 0.25))
            cv2.rectangle(mask, (cx - bw // 2, h - bh), (cx + bw // 2, h), 1, -1)
        m = mask.astype(bool) & (ids != -2)
        if m.sum() + (ids == -2).sum() > max_fraction * h * w:
            continue
        tex = cv2.resize(texture_fn(max(16, w // 3), max(16, h // 3)), (w, h), interpolation=cv2.INTER_LINEAR)
        tex = tex.astype(np.float32) * np.float32(rng.uniform(0.4, 0.9))
        img[m] = tex[m]
        ids[m] = -2


def _photometric(rng, img) -> np.ndarray:
    """Lighting change: gain, gamma, colour tint, a shading gradient, sensor noise, sometimes blur."""
    h, w = img.shape[:2]
    u8 = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    gain = rng.uniform(0.6, 1.3) * rng.uniform(0.9, 1.1, 3) * 255.0
    lut = (np.linspace(0.0, 1.0, 256)[:, None] ** rng.uniform(0.7, 1.4)) * gain[None, :]
    x = cv2.LUT(u8, lut.astype(np.float32).reshape(256, 1, 3))
    gx, gy = rng.uniform(-0.25, 0.25, 2)
    shade = 1.0 + gx * np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :] \
        + gy * np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
    out = x * shade[:, :, None]
    if rng.random() < 0.3:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.5, 1.0))
    out += np.float32(rng.uniform(1.0, 3.0)) * rng.standard_normal(out.shape, dtype=np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _write_jpg(path, img, quality):
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise DataError(f"{path}: JPEG encoding failed")
    buf.tofile(path)


def _size_for(rng, size):
    w, h = size
    return (h, w) if rng.random() < 0.2 else (w, h)  # some portrait shots


# -- ground truth from geometry -----------------------------------------------------------------------
def _query_box(rng, planes, cam, ids):
    """A box around part of the largest visible facade of a query view, or None."""
    w, h = cam.size
    counts = np.bincount(ids[ids >= 0].ravel().astype(np.int64), minlength=len(planes))
    if counts.sum() == 0:
        return None
    p = planes[int(np.argmax(counts))]
    for _ in range(20):
        fw, fh = rng.uniform(0.35, 0.8, 2)
        s0, t0 = rng.uniform(0, 1 - fw), rng.uniform(0, 1 - fh)
        sub = np.array([p.origin + p.u * p.width * (s0 + a) + p.v * p.height * (t0 + b)
                        for a, b in ((0, 0), (fw, 0), (fw, fh), (0, fh))])
        pts, _ = cam.project(sub)
        x1, y1 = np.clip(pts.min(0), 0, [w - 1, h - 1])
        x2, y2 = np.clip(pts.max(0), 0, [w - 1, h - 1])
        if (x2 - x1) * (y2 - y1) < 0.08 * w * h:
            continue
        box = ids[int(y1):int(y2) + 1, int(x1):int(x2) + 1]
        if (box >= 0).mean() >= 0.5:
            return [round(float(x1), 1), round(float(y1), 1), round(float(x2), 1), round(float(y2), 1)]
    return None


def region_points(cam: Camera, ids, invz, bbx, n=2500):
    """3D points and plane ids of the landmark surface seen in ``bbx`` (a grid of about n samples)."""
    x1, y1, x2, y2 = bbx
    step = max(1.0, np.sqrt((x2 - x1) * (y2 - y1) / n))
    xs, ys = np.meshgrid(np.arange(x1, x2 + 1e-6, step), np.arange(y1, y2 + 1e-6, step))
    px, py = np.rint(xs.ravel()).astype(int), np.rint(ys.ravel()).astype(int)
    keep = ids[py, px] >= 0
    px, py = px[keep], py[keep]
    z = 1.0 / invz[py, px]
    rays = np.stack([px, py, np.ones_like(px)], 1).astype(np.float64) @ np.linalg.inv(cam.K).T
    X = (rays * z[:, None]) @ cam.R + cam.C
    return X, ids[py, px].astype(np.int64), np.stack([px, py], 1).astype(np.float64)


def overlap_stats(X, pid, xq, cam: Camera, ids) -> dict:
    """Fraction of the query region's points seen by ``cam``, scale change and viewing angle change."""
    if len(X) == 0:
        return dict(overlap=0.0, scale=np.inf, side=0.0)
    w, h = cam.size
    pts, z = cam.project(X)
    px, py = np.rint(pts[:, 0]), np.rint(pts[:, 1])
    inb = (z > 0) & (px >= 0) & (py >= 0) & (px < w) & (py < h)
    seen = np.zeros(len(X), bool)
    seen[inb] = ids[py[inb].astype(int), px[inb].astype(int)] == pid[inb]
    ov = float(seen.mean())
    if seen.sum() < 10:
        return dict(overlap=ov, scale=np.inf, side=0.0)

    def area(p):
        return float(np.sqrt(max(np.linalg.det(np.cov(p.T)), 1e-12)))

    a_db, a_q = area(pts[seen]), area(xq[seen])
    scale = float(np.sqrt(max(a_db, a_q) / max(min(a_db, a_q), 1e-12)))
    # side of the seen part in pixels: a uniform square of side s has covariance det (s^2/12)^2
    side = float(np.sqrt(12.0 * a_db))
    return dict(overlap=ov, scale=scale, side=side)


def label(stats: dict, angle: float) -> str:
    """'easy', 'hard' or 'junk' from overlap statistics (thresholds in the module docstring)."""
    ov, sc = stats["overlap"], stats["scale"]
    if stats["side"] < HARD_MIN_SIDE:
        return "junk"
    if ov >= EASY_OVERLAP and sc <= EASY_SCALE and angle <= EASY_ANGLE:
        return "easy"
    if ov >= HARD_OVERLAP and sc <= HARD_SCALE and angle <= HARD_ANGLE:
        return "hard"
    return "junk"


def _angle(X, c1, c2) -> float:
    m = X.mean(0)
    a, b = c1 - m, c2 - m
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return float(np.degrees(np.arccos(np.clip(cos, -1, 1))))


# -- the generator ------------------------------------------------------------------------------------
@dataclass
class SyntheticParams:
    seed: int = 0
    n_landmarks: int = 6
    views_per_landmark: int = 12
    queries_per_landmark: int = 3
    n_distractors: int = 120
    n_train: int = 80
    size: tuple = (640, 480)
    max_azimuth: float = 50.0
    occlusion: float = 0.4
    texture_dir: str | None = None
    name: str = "synthetic"
    jpeg_quality: tuple = (80, 95)


def _rng(seed, *stream):
    return np.random.default_rng([int(seed), *[int(s) for s in stream]])


def _single_view(rng, textures, size, px_per_m):
    """One view of a new, unrelated building (distractors and training images)."""
    w, h = _size_for(rng, size)
    planes = make_building(rng, lambda tw, th: textures.other(rng, tw, th), px_per_m)
    cam = sample_camera(rng, planes, (w, h), max_azimuth=60.0, distance=(0.6, 2.5), min_coverage=0.1)
    img, ids, _ = render(planes, cam, _background(rng, w, h))
    if rng.random() < 0.4:
        _occlude(rng, img, ids, lambda tw, th: procedural_texture(rng, tw, th))
    return _photometric(rng, img)


def _px_per_m(size, landmark: bool) -> float:
    # a 10 m landmark facade gets 1.6x the image width in texels (close-ups stay sharp); others 1x
    return (1.6 if landmark else 1.0) * max(size) / 10.0


def _landmark_task(p: SyntheticParams, L: int, images_dir: str) -> dict:
    """Render every view of landmark L and label its queries; returns names, cameras, ground truth
    (indices relative to the landmark's first view)."""
    textures = TextureSource(p.texture_dir, n_reserved=p.n_landmarks)
    rng = _rng(p.seed, _STREAM_LANDMARK, L)
    planes = make_building(rng, lambda tw, th: textures.landmark(rng, L, tw, th), _px_per_m(p.size, True))
    views, cameras = [], {}
    for v in range(p.views_per_landmark):
        vr = _rng(p.seed, _STREAM_VIEW, L, v)
        w, h = _size_for(vr, p.size)
        # the first view of each landmark is a frontal, unoccluded overview
        cam = sample_camera(vr, planes, (w, h), max_azimuth=10.0 if v == 0 else p.max_azimuth)
        img, ids, invz = render(planes, cam, _background(vr, w, h))
        if v > 0 and vr.random() < p.occlusion:
            _occlude(vr, img, ids, lambda tw, th, vr=vr: procedural_texture(vr, tw, th))
        nm = f"landmark{L:02d}__{v:04d}"
        _write_jpg(os.path.join(images_dir, nm + ".jpg"), _photometric(vr, img), vr.integers(*p.jpeg_quality))
        views.append((nm, cam, ids, invz))
        cameras[nm + ".jpg"] = cam.to_json()

    qr = _rng(p.seed, _STREAM_QUERY, L)
    order = [0] + list(qr.permutation(np.arange(1, p.views_per_landmark)))
    queries = []
    for qi in order:
        if len(queries) == p.queries_per_landmark:
            break
        nm, cam, ids, invz = views[qi]
        bbx = _query_box(qr, planes, cam, ids)
        if bbx is None:
            continue
        X, pid, xq = region_points(cam, ids, invz, bbx)
        if len(X) < 50:
            continue
        g = {"bbx": bbx, "easy": [], "hard": [], "junk": []}
        st = {}
        for vj, (nj, cj, idj, _) in enumerate(views):
            if vj == qi:
                g["junk"].append(vj)
                continue
            s = overlap_stats(X, pid, xq, cj, idj)
            s["angle"] = _angle(X, cam.C, cj.C)
            g[label(s, s["angle"])].append(vj)
            st[nj] = {k: (round(float(x), 4) if np.isfinite(x) else None) for k, x in s.items()}
        queries.append((nm, g, {"query": nm, "bbx": bbx, "views": st}))
    return {"names": [v[0] for v in views], "cameras": cameras, "queries": queries}


def _single_task(p: SyntheticParams, stream: int, i: int, path: str) -> str:
    rng = _rng(p.seed, stream, i)
    textures = TextureSource(p.texture_dir, n_reserved=p.n_landmarks)
    _write_jpg(path, _single_view(rng, textures, p.size, _px_per_m(p.size, False)), rng.integers(*p.jpeg_quality))
    return path


def _run_task(task):
    fn, args = task
    return fn(*args)


def generate(out_dir, seed: int = 0, n_landmarks: int = 6, views_per_landmark: int = 12,
             queries_per_landmark: int = 3, n_distractors: int = 120, n_train: int = 80,
             size=(640, 480), max_azimuth: float = 50.0, occlusion: float = 0.4, texture_dir=None,
             name: str = "synthetic", overwrite: bool = False, workers: int = 1,
             progress: bool = False) -> GeneratedDataset:
    """Render the dataset into ``out_dir`` (see the module docstring for layout and labels).

    The same arguments always give the same files, whatever ``workers`` (rendering processes). An
    ``out_dir`` already holding a dataset generated with the same arguments is reused as is; one with
    other arguments raises unless ``overwrite``.

    size: (width, height) of the images (a fifth of the views are portrait). occlusion: probability
    that a view gets occluders. texture_dir: a folder of photos used as facade textures instead of
    procedural ones. queries_per_landmark: query views per landmark (each with a box).
    """
    size = (int(size[0]), int(size[1]))
    if n_landmarks < 1 or views_per_landmark < 2:
        raise DataError("generate: need n_landmarks >= 1 and views_per_landmark >= 2")
    if not 1 <= queries_per_landmark <= views_per_landmark:
        raise DataError("generate: queries_per_landmark must be between 1 and views_per_landmark")
    if min(size) < 64:
        raise DataError(f"generate: size {size} is too small; use at least 64 pixels a side")
    params = SyntheticParams(seed, n_landmarks, views_per_landmark, queries_per_landmark, n_distractors,
                             n_train, size, float(max_azimuth), float(occlusion),
                             os.path.abspath(texture_dir) if texture_dir else None, name)
    pdict = json.loads(json.dumps(asdict(params)))
    out_dir = os.path.abspath(os.fspath(out_dir))
    paths = GeneratedDataset(out_dir, name, os.path.join(out_dir, "jpg"),
                             os.path.join(out_dir, f"gnd_{name}.json"), os.path.join(out_dir, f"gnd_{name}.pkl"),
                             os.path.join(out_dir, "cameras.json"), os.path.join(out_dir, "train"),
                             os.path.join(out_dir, "dataset.json"))
    if os.path.exists(paths.dataset_json):
        try:
            with open(paths.dataset_json) as fh:
                old = json.load(fh).get("params")
        except (OSError, ValueError):
            old = None
        if old == pdict and os.path.exists(paths.gnd_json):
            return paths
        if not overwrite:
            raise DataError(f"{out_dir}: holds a generated dataset with other parameters; choose another "
                            "folder or delete this one (features computed from it would be stale)")
    elif os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise DataError(f"{out_dir}: folder is not empty; choose an empty or new folder")
    TextureSource(texture_dir, n_reserved=n_landmarks)  # fail early on an empty texture folder
    os.makedirs(paths.images_dir, exist_ok=True)
    os.makedirs(paths.train_dir, exist_ok=True)

    tasks = [(_landmark_task, (params, L, paths.images_dir)) for L in range(n_landmarks)]
    tasks += [(_single_task, (params, _STREAM_DISTRACTOR, i, os.path.join(paths.images_dir, f"distractor__{i:04d}.jpg")))
              for i in range(n_distractors)]
    tasks += [(_single_task, (params, _STREAM_TRAIN, i, os.path.join(paths.train_dir, f"train__{i:04d}.jpg")))
              for i in range(n_train)]
    weights = [views_per_landmark] * n_landmarks + [1] * (n_distractors + n_train)

    from tqdm.auto import tqdm

    bar = tqdm(total=sum(weights), desc="render", unit="img", disable=not progress)
    results = []
    if workers <= 1:
        for t, wt in zip(tasks, weights):
            results.append(_run_task(t))
            bar.update(wt)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for r, wt in zip(pool.map(_run_task, tasks, chunksize=1), weights):
                results.append(r)
                bar.update(wt)
    bar.close()

    imlist, cluster, cameras, qimlist, gnd, qstats = [], [], {}, [], [], []
    for L, r in enumerate(results[:n_landmarks]):
        base = len(imlist)
        imlist += r["names"]
        cluster += [L] * len(r["names"])
        cameras.update(r["cameras"])
        for nm, g, st in r["queries"]:
            qimlist.append(nm)
            gnd.append({k: (v if k == "bbx" else [base + j for j in v]) for k, v in g.items()})
            qstats.append(st)
    imlist += [f"distractor__{i:04d}" for i in range(n_distractors)]
    cluster += [-1] * n_distractors

    _atomic_json(paths.cameras_json, cameras)
    gt = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    _atomic_json(paths.gnd_json, gt)
    gt = json.loads(json.dumps(gt))  # fresh objects: the pickle's bytes must not depend on object sharing
    tmp = paths.gnd_pkl + ".tmp"
    with open(tmp, "wb") as fh:
        pickle.dump(gt, fh, protocol=4)
    os.replace(tmp, paths.gnd_pkl)
    _atomic_json(paths.dataset_json, {
        "format": FORMAT, "params": pdict, "imlist": imlist, "cluster": cluster,
        "thresholds": {"easy": [EASY_OVERLAP, EASY_SCALE, EASY_ANGLE],
                       "hard": [HARD_OVERLAP, HARD_SCALE, HARD_ANGLE, HARD_MIN_SIDE]},
        "queries": qstats})  # written last: marks the dataset complete
    return paths


def _atomic_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh)
    os.replace(tmp, path)
