"""Re-ranking by spatial verification and query expansion from verified images.

- ``rerank_order``: the top ``top`` results are verified; verified images (at least
  ``min_inliers`` inliers: 10 after BoW, 5 after ASMK* whose shortlists are cleaner — Tolias et al.)
  move first, ordered by inlier count (ties keep the original order), the others follow in their
  original order, then everything below the verified depth.
- ``SpatialReranker``: tentative matches from shared visual words (``correspondences``), fast
  spatial matching (``ransac``) of a query against its shortlist, in parallel.
- Query expansion (Chum et al., "Total recall", ICCV 2007): the features of verified images that the
  verified model maps inside the query region are brought into the query frame and added to the
  query (``expansion_sets``); the expanded query is then issued again: average query expansion over
  the BoW vectors (``bow_average_query``), or re-aggregated into ASMK* / HQE by their modules.
- ``draw_verification``: the query beside its top results with the inlier matches drawn (cv2).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .correspondences import WordMatcher
from .errors import DataError
from .ransac import SpatialVerifier, Verification, apply_model


def rerank_order(ranking, n_inliers, min_inliers: int = 10) -> np.ndarray:
    """New order of ``ranking`` (n,) given the inlier counts of its first len(n_inliers) entries:
    verified (>= min_inliers) first by inlier count, then the unverified of that depth in their
    original order, then the rest of the ranking unchanged."""
    ranking = np.asarray(ranking)
    inl = np.asarray(n_inliers, np.int64).reshape(-1)
    depth = len(inl)
    if depth > len(ranking):
        raise DataError(f"{depth} inlier counts for a ranking of {len(ranking)} results")
    pos = np.arange(depth)
    ver = inl >= max(int(min_inliers), 1)
    v_idx = pos[ver][np.lexsort((pos[ver], -inl[ver]))]
    new = np.concatenate([v_idx, pos[~ver], np.arange(depth, len(ranking))]).astype(np.int64)
    return ranking[new]


@dataclass
class DatabaseFeatures:
    """What verification needs of each database image: frames (N_i, 6), word ids (N_i,) or (N_i, k)
    aligned with the frames, and optionally the image size (width, height)."""

    frames: list
    words: list
    sizes: list | None = None

    def __post_init__(self):
        if len(self.frames) != len(self.words):
            raise DataError(f"{len(self.frames)} frame arrays but {len(self.words)} word arrays")
        for i, (f, w) in enumerate(zip(self.frames, self.words)):
            if len(f) != len(w):
                raise DataError(f"database image {i}: {len(f)} frames but {len(w)} word assignments")
        if self.sizes is not None and len(self.sizes) != len(self.frames):
            raise DataError(f"{len(self.frames)} images but {len(self.sizes)} sizes")

    def __len__(self):
        return len(self.frames)


class SpatialReranker:
    """Verify the top of a ranking and re-order it.

    verifier: the ``SpatialVerifier`` (default parameters if None). top: results verified per query.
    min_inliers: inliers for an image to count as verified. burst_limit: see ``correspondences``.
    """

    def __init__(self, verifier: SpatialVerifier | None = None, top: int = 100, min_inliers: int = 10,
                 burst_limit: int = 64):
        self.verifier = verifier or SpatialVerifier()
        self.top = int(top)
        self.min_inliers = int(min_inliers)
        self.burst_limit = int(burst_limit)
        if self.top < 0:
            raise DataError(f"rerank top must be >= 0, got {top}")

    def verify(self, q_frames, q_words, ids, db: DatabaseFeatures) -> list:
        """Verifications of the query against database images ``ids`` (in that order)."""
        q_frames = np.asarray(q_frames, np.float32).reshape(-1, 6)
        if len(q_frames) != len(np.asarray(q_words).reshape(len(q_frames), -1)):
            raise DataError("query frames and word assignments differ in length")
        matcher = WordMatcher(q_words, self.burst_limit)
        ids = [int(i) for i in ids]
        matches = [matcher.match(db.words[i]) for i in ids]
        sizes = None if db.sizes is None else [db.sizes[i] for i in ids]
        return self.verifier.verify_many(q_frames, [db.frames[i] for i in ids], matches, sizes)

    def rerank(self, ranking, q_frames, q_words, db: DatabaseFeatures):
        """(new ranking, {database id: Verification} for the verified depth)."""
        ranking = np.asarray(ranking)
        ids = ranking[: self.top]
        ver = self.verify(q_frames, q_words, ids, db)
        new = rerank_order(ranking, [v.n_inliers for v in ver], self.min_inliers)
        return new, {int(i): v for i, v in zip(ids, ver)}

    def verified(self, verifications: dict, ranking=None, max_images: int | None = None) -> list:
        """Ids of verified images, most inliers first (optionally in ``ranking`` order of appearance)."""
        ids = [i for i, v in verifications.items() if v.n_inliers >= self.min_inliers]
        if ranking is not None:
            rank = {int(j): r for r, j in enumerate(np.asarray(ranking)[: max(self.top, 1)])}
            ids.sort(key=lambda i: rank.get(i, len(rank)))
        else:
            ids.sort(key=lambda i: -verifications[i].n_inliers)
        return ids[:max_images] if max_images else ids


def query_region(q_frames, bbox=None, size=None) -> tuple:
    """The query region (x1, y1, x2, y2) in query pixels: the crop box, else the image, else the
    bounding box of the query features."""
    if bbox is not None:
        return tuple(float(v) for v in bbox)
    if size is not None:
        return (-0.5, -0.5, float(size[0]) - 0.5, float(size[1]) - 0.5)
    f = np.asarray(q_frames).reshape(-1, 6)
    if len(f) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(f[:, 0].min()), float(f[:, 1].min()), float(f[:, 0].max()), float(f[:, 1].max()))


def mapped_into_query(verification: Verification, d_frames, region) -> np.ndarray:
    """Indices of database features that the verified model maps inside the query region."""
    if verification.kind == "none" or len(d_frames) == 0:
        return np.zeros(0, np.int64)
    try:
        inv = np.linalg.inv(verification.model)
    except np.linalg.LinAlgError:
        return np.zeros(0, np.int64)
    p = apply_model(inv, np.asarray(d_frames)[:, :2])
    x1, y1, x2, y2 = region
    with np.errstate(invalid="ignore"):
        inside = (p[:, 0] >= x1) & (p[:, 0] <= x2) & (p[:, 1] >= y1) & (p[:, 1] <= y2)
    return np.nonzero(inside)[0]


def expansion_sets(verifications: dict, ids, db: DatabaseFeatures, region) -> list:
    """For each verified database id: (id, indices of its features mapped inside the query region)."""
    out = []
    for i in ids:
        sel = mapped_into_query(verifications[i], db.frames[i], region)
        if len(sel):
            out.append((int(i), sel))
    return out


def bow_average_query(index, word_lists, top: int | None = None):
    """Average query expansion in the BoW space: the mean of the L2-normalised tf-idf vectors of the
    query and of each expansion word set, scored against ``index`` (a ``bow.BowIndex``).
    Returns (ids, scores) of the ranking, best first."""
    qi, qw, _, qv, qs = index.prepare_queries([(np.asarray(w).reshape(-1), None) for w in word_lists])
    per_entry = np.repeat(qs.astype(np.float64), np.diff(qi)) / max(len(word_lists), 1)
    top = index.n_images_ if top is None else min(int(top), index.n_images_)
    ids, scores = index.search_prepared(np.array([0, len(qw)], np.int64), qw, None,
                                        (qv * per_entry).astype(np.float32), np.ones(1, np.float32), top)
    return ids[0], scores[0]


# -- pictures ---------------------------------------------------------------------------------------
def draw_verification(query_image, results, out_path=None, height: int = 360, max_lines: int = 200,
                      bbox=None):
    """Side-by-side picture: the query (BGR array) and its results, each ``(image, Verification,
    q_frames, d_frames, caption)``, scaled to ``height``, with the inlier matches as lines.
    Writes ``out_path`` (any cv2 format) when given and returns the picture."""
    import cv2

    def prep(img):
        img = np.asarray(img)
        if img.ndim == 2:
            img = cv2.cvtColor(img.astype(np.uint8), cv2.COLOR_GRAY2BGR)
        elif img.shape[2] == 4:
            img = img[:, :, :3]
        if img.dtype != np.uint8:
            img = np.clip(img, 0, 255).astype(np.uint8)
        s = height / max(img.shape[0], 1)
        return cv2.resize(img, (max(1, int(round(img.shape[1] * s))), height), interpolation=cv2.INTER_AREA), s

    q, sq = prep(query_image)
    panels, scales = [q], [sq]
    for r in results:
        p, s = prep(r[0])
        panels.append(p)
        scales.append(s)
    gap = 8
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    canvas = np.full((height + 28, width, 3), 255, np.uint8)
    xs = []
    x = 0
    for p in panels:
        canvas[28:, x:x + p.shape[1]] = p
        xs.append(x)
        x += p.shape[1] + gap
    if bbox is not None:
        b = np.asarray(bbox, float) * sq
        cv2.rectangle(canvas, (int(b[0]), int(b[1]) + 28), (int(b[2]), int(b[3]) + 28), (0, 200, 255), 2)
    cv2.putText(canvas, "query", (4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    rng = np.random.default_rng(0)
    for k, r in enumerate(results, start=1):
        _, v, qf, df, caption = r
        cv2.putText(canvas, str(caption), (xs[k] + 4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 140, 0) if v is not None and v.n_inliers else (0, 0, 200), 1, cv2.LINE_AA)
        if v is None or len(v.inliers) == 0:
            continue
        inl = v.inliers
        if len(inl) > max_lines:
            inl = inl[np.linspace(0, len(inl) - 1, max_lines).astype(int)]
        for a, b in inl:
            pa = (int(round(qf[a, 0] * sq + xs[0])), int(round(qf[a, 1] * sq)) + 28)
            pb = (int(round(df[b, 0] * scales[k] + xs[k])), int(round(df[b, 1] * scales[k])) + 28)
            colour = tuple(int(c) for c in rng.integers(40, 256, 3))
            cv2.line(canvas, pa, pb, colour, 1, cv2.LINE_AA)
            cv2.circle(canvas, pa, 2, colour, -1)
            cv2.circle(canvas, pb, 2, colour, -1)
    if out_path is not None:
        from .errors import ImageError

        if not cv2.imwrite(str(out_path), canvas):
            raise ImageError(f"{out_path}: cannot write the picture (unknown extension or unwritable folder)")
    return canvas
