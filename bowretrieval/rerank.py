"""Re-ranking by spatial verification and query expansion from verified images.

- ``rerank_order``: the top ``top`` results are verified; verified images (at least
  ``min_inliers`` inliers; Philbin et al. / Tolias et al. use 10 after BoW and 5 after ASMK*, our
  measured chance level gives 10 after BoW and 15 after ASMK*/SMK*/HQE: ``DEFAULT_MIN_INLIERS``)
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

from dataclasses import dataclass, field

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
    aligned with the frames, and optionally the image size (width, height). Any sequences with
    ``len`` and integer indexing will do (``StoreFrames`` reads frames lazily from a feature store)."""

    frames: list
    words: list
    sizes: list | None = None

    def __post_init__(self):
        if len(self.frames) != len(self.words):
            raise DataError(f"{len(self.frames)} frame arrays but {len(self.words)} word arrays")
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
        frames = [db.frames[i] for i in ids]
        words = [db.words[i] for i in ids]
        for i, f, w in zip(ids, frames, words):
            if len(f) != len(w):
                raise DataError(f"database image {i}: {len(f)} frames but {len(w)} word assignments; "
                                "were the index and the feature store built from the same features?")
        matches = [matcher.match(w) for w in words]
        sizes = None if db.sizes is None else [db.sizes[i] for i in ids]
        return self.verifier.verify_many(q_frames, frames, matches, sizes)

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


# -- search with verification and expansion --------------------------------------------------------
QE_MODES = ("none", "avg", "hqe")
# Inliers that make an image verified, per first-round method. The literature uses 5 after ASMK*
# (with Hamming-filtered correspondences) and 10 after BoW. Our correspondences come from shared
# words only (query MA 3): 10% of the negatives in a top-100 reach 5 inliers by chance, 0.03% reach
# 10. ASMK*'s first round is nearly perfect on landmarks-dev, so any false verification costs: 5 and
# 10 lower its Medium mAP on the full-image protocol, 15 raises it on both protocols
# (docs/spatial_verification.md); BoW gains most at 10.
DEFAULT_MIN_INLIERS = {"bow": 10, "smk": 15, "asmk": 15, "hqe": 15}


@dataclass
class QueryFeatures:
    """One query: frames (N, 6) in query-image pixels, descriptors (N, D) in the index's variant and
    the query region (x1, y1, x2, y2) expanded features must map into."""

    frames: np.ndarray
    descriptors: np.ndarray
    region: tuple
    cache: dict = field(default_factory=dict)  # word assignments, reused across searches


class VerifiedSearch:
    """Search, spatial verification of the shortlist and optional query expansion, over either
    index kind: a ``bow.BowIndex`` (with its ``vocabulary``) or an ``asmk.Database`` (smk, asmk,
    hqe).

    db: ``DatabaseFeatures`` (frames, words aligned with the index's assignment, sizes).
    db_descriptors: callable id -> (N_i, D) descriptors; needed for 'avg' expansion of ASMK*/SMK*.
    reranker: the ``SpatialReranker`` (its min_inliers 0 means ``DEFAULT_MIN_INLIERS[method]``).
    qe: 'none', 'avg' (average query expansion from verified images) or 'hqe' (HQE with the
    verified images as the reliable ones; needs a 'hqe' database). qe_images: verified images used.
    match_ma: query multiple assignment of the tentative correspondences.
    """

    def __init__(self, index, db: DatabaseFeatures, reranker: SpatialReranker | None = None,
                 vocabulary=None, db_descriptors=None, qe: str = "none", qe_images: int = 50,
                 match_ma: int = 3, verify: bool = True):
        from .bow import BowIndex

        self.index = index
        self.db = db
        self.is_bow = isinstance(index, BowIndex)
        self.vocabulary = vocabulary
        self.db_descriptors = db_descriptors
        self.qe = qe
        self.qe_images = int(qe_images)
        self.match_ma = int(match_ma)
        self.verify = bool(verify)
        if qe not in QE_MODES:
            raise DataError(f"query expansion must be one of {QE_MODES}, got {qe!r}")
        if self.is_bow and vocabulary is None:
            raise DataError("a BoW index needs its vocabulary for query assignment")
        method = "bow" if self.is_bow else index.params.method
        if qe == "hqe" and method != "hqe":
            raise DataError(f"qe 'hqe' needs an index built with method hqe, not {method!r}")
        if qe == "avg" and not self.is_bow and db_descriptors is None:
            raise DataError("average query expansion on an ASMK*/SMK* index needs the database descriptors")
        if qe != "none" and not self.verify:
            raise DataError("query expansion from verified images needs verification (--verify)")
        self.method = method
        self.reranker = reranker or SpatialReranker()
        if self.reranker.min_inliers <= 0:
            self.reranker.min_inliers = DEFAULT_MIN_INLIERS.get(method, 10)
        if len(db) != (index.n_images_ if self.is_bow else index.n_images):
            raise DataError(f"{len(db)} database feature sets for an index of "
                            f"{index.n_images_ if self.is_bow else index.n_images} images")

    # -- backend pieces ------------------------------------------------------------------------
    def _assign(self, q: QueryFeatures, k):
        """The k nearest words of the query descriptors (cached on the query: the k nearest are a
        prefix of the k' > k nearest)."""
        w = q.cache.get("words")
        if w is None or w.shape[1] < k:
            d = q.descriptors
            if len(d) == 0:
                w = np.zeros((0, k), np.int32)
            else:
                w = self.vocabulary.assign(d, k) if self.is_bow else self.index.query_words(d, k)
            q.cache["words"] = w
        return w[:, :k]

    def _query_ma(self):
        return 1 if self.is_bow else self.index.params.query_ma

    def _first_ranking(self, q: QueryFeatures):
        if self.is_bow:
            return self.index.search([self._assign(q, 1)], None)[0][0], None
        if self.qe == "hqe":
            # HQE+SP: the first round is the plain Hamming-embedding (SMK*) ranking
            enc = self.index.encode_queries([q.descriptors], words=[self._assign(q, self._query_ma())])
            self.index.ivf.threads = self.index.threads
            return self.index.ivf.search(enc, None)[0][0], enc[0]
        return self.index.query([q.descriptors], top=None, words=[self._assign(q, self._query_ma())]).ids[0], None

    def _expanded_ranking(self, q: QueryFeatures, ver: dict, ranking, enc):
        ids = self.reranker.verified(ver, ranking, self.qe_images)
        if not ids:
            return None
        if self.qe == "hqe":
            expanded = self.index.hqe_expand(enc[0], enc[1], np.asarray(ids, np.int64))
            return self.index.ivf.search([expanded], None)[0][0]
        sets = expansion_sets(ver, ids, self.db, q.region)
        if not sets:
            return None
        if self.is_bow:
            words = [self._assign(q, 1).reshape(-1)] + \
                    [np.asarray(self.db.words[i])[sel].reshape(-1) for i, sel in sets]
            return bow_average_query(self.index, words)[0]
        # ASMK*/SMK*: one query aggregating the query's and the mapped descriptors, each with its
        # nearest word (the database features' words are known: no assignment, as in HQE)
        descs = [np.asarray(q.descriptors, np.float32)] + \
                [np.asarray(self.db_descriptors(i), np.float32)[sel] for i, sel in sets]
        words = [self._assign(q, 1)] + [np.asarray(self.db.words[i]).reshape(len(self.db.words[i]), -1)[sel, :1]
                                        for i, sel in sets]
        return self.index.query([np.concatenate(descs)], top=None,
                                words=[np.concatenate(words).astype(np.int32)]).ids[0]

    # -- the search ----------------------------------------------------------------------------
    def search(self, q: QueryFeatures):
        """(ranking (n_images,) int64, {id: Verification} of the last verified shortlist, stats:
        'first_ranking' (before verification), 'verified' (count), 'expanded' (QE issued))."""
        stats = {}
        if self.verify:
            self._assign(q, max(self.match_ma, self._query_ma()))  # one assignment serves both
        ranking, enc = self._first_ranking(q)
        if not self.verify or len(q.frames) == 0:
            return np.asarray(ranking, np.int64), {}, stats
        qw = self._assign(q, self.match_ma)
        stats["first_ranking"] = np.asarray(ranking, np.int64)
        ranking, ver = self.reranker.rerank(ranking, q.frames, qw, self.db)
        stats["verified"] = sum(v.n_inliers >= self.reranker.min_inliers for v in ver.values())
        if self.qe != "none":
            new = self._expanded_ranking(q, ver, ranking, enc)
            if new is not None:
                cache = ver
                ranking, ver2 = self._rerank_cached(np.asarray(new, np.int64), q.frames, qw, cache)
                stats["expanded"] = True
                ver = ver2
        return np.asarray(ranking, np.int64), ver, stats

    def _rerank_cached(self, ranking, q_frames, q_words, cache):
        """Re-rank reusing verifications already computed for this query."""
        top = ranking[: self.reranker.top]
        todo = [int(i) for i in top if int(i) not in cache]
        if todo:
            for i, v in zip(todo, self.reranker.verify(q_frames, q_words, todo, self.db)):
                cache[i] = v
        ver = {int(i): cache[int(i)] for i in top}
        return rerank_order(ranking, [ver[int(i)].n_inliers for i in top], self.reranker.min_inliers), ver


# -- wiring to index directories, feature stores and configs ---------------------------------------
class StoreFrames:
    """Frames of database images read lazily from a feature store (``names`` in index order)."""

    def __init__(self, store, names):
        self.store, self.names = store, list(names)

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        n = self.names[int(i)]
        return self.store.frames(n) if n in self.store else np.zeros((0, 6), np.float32)


class _IndexWords:
    """Per-image word assignments of an ``asmk.Database`` as a sequence."""

    def __init__(self, database):
        self.database = database

    def __len__(self):
        return self.database.n_images

    def __getitem__(self, i):
        return self.database.image_words(int(i))


def database_features(index, store, names, vocabulary=None, descriptor="rootsift", beta=0.5,
                      in_memory=True) -> DatabaseFeatures:
    """Frames, words and sizes of the indexed images from the database feature ``store`` (an open
    ``FeatureStore``). Words come from the index (ASMK*/SMK*/HQE databases, or a BoW index built
    with its words kept), else by assigning the store's descriptors with ``vocabulary``."""
    from .bow import BowIndex

    names = list(names)
    frames = [f for f in StoreFrames(store, names)] if in_memory else StoreFrames(store, names)
    sizes = [store.image_size(n) if n in store else (0, 0) for n in names]
    if not isinstance(index, BowIndex):
        words = _IndexWords(index)
    elif getattr(index, "feature_words_", None) is not None:
        words = index.feature_words_
    else:
        if vocabulary is None:
            raise DataError("the BoW index keeps no per-feature words; pass its vocabulary to assign them")
        words = [vocabulary.assign(store.descriptors(n, descriptor, beta=beta), 1) if n in store
                 else np.zeros((0, 1), np.int32) for n in names]
    return DatabaseFeatures(frames, words, sizes)


def verified_search(index, db: DatabaseFeatures, vcfg, vocabulary=None, db_descriptors=None) -> VerifiedSearch:
    """A ``VerifiedSearch`` from a ``config.VerifyConfig``."""
    verifier = SpatialVerifier(threshold=vcfg.threshold, reference_side=vcfg.reference_side,
                               max_hypotheses=vcfg.max_hypotheses, homography=vcfg.homography,
                               max_scale_change=vcfg.max_scale_change, max_angle=vcfg.max_angle,
                               threads=vcfg.threads)
    rr = SpatialReranker(verifier, vcfg.top, vcfg.min_inliers, vcfg.burst_limit)
    return VerifiedSearch(index, db, rr, vocabulary, db_descriptors, vcfg.qe, vcfg.qe_images, vcfg.match_ma,
                          verify=vcfg.enabled)


def verify_stage(index, vocabulary, db_store_path, names, q_store_path, q_names, regions, cfg, progress=True):
    """Pipeline stage: search every query of a query store with verification / expansion as
    ``cfg.verify`` says; returns ranks (n_db, n_queries) as revisitop expects."""
    from tqdm.auto import tqdm

    from .featurestore import FeatureStore

    variant, beta = cfg.vocab.descriptor, cfg.vocab.beta
    with FeatureStore(db_store_path) as dst, FeatureStore(q_store_path) as qst:
        db = database_features(index, dst, names, vocabulary, variant, beta)
        search = verified_search(index, db, cfg.verify, vocabulary,
                                 lambda i: dst.descriptors(names[i], variant, beta=beta))
        ranks = []
        for n, region in tqdm(list(zip(q_names, regions)), desc="verify", unit="query", disable=not progress):
            if n in qst:
                q = QueryFeatures(qst.frames(n), qst.descriptors(n, variant, beta=beta), region)
            else:
                q = QueryFeatures(np.zeros((0, 6), np.float32), np.zeros((0, 128), np.float32), region)
            ranks.append(search.search(q)[0])
    return np.stack(ranks, 1) if ranks else np.zeros((len(names), 0), np.int64)


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
