"""Mining 3-D models from an unordered photo collection (retrieval-SfM).

Radenovic, Tolias & Chum, "CNN image retrieval learns from BoW" (ECCV 2016) and Schonberger et al.,
"From single image query to detailed 3D reconstruction" (CVPR 2015): instead of matching all
N(N-1)/2 pairs, find overlapping images by retrieval and spatial verification, grow clusters by
query expansion, match densely only inside clusters, reconstruct every connected component.

Stages, each leaving a plain artefact in the work folder so that an interrupted run resumes:

1. ``features``  features.h5 (resumable store), duplicate and unusable photos reported
2. ``index``     retrieval/vocab.npz, retrieval/words.npz (BoW tf-idf index built from them)
3. ``clusters``  pairs.jsonl (every verification, appended), clusters.json (scene graph)
4. ``match``     colmap/database.db, colmap/matches.json (COLMAP matching inside clusters)
5. ``map``       models/c<k>/ (one mapping child process per connected component)
6. ``extend``    models/c<k>e/ (re-query registered images, add verified ones, map again)
7. ``finish``    summary.json, top.png per model
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections import deque

import numpy as np
from tqdm.auto import tqdm

from bowretrieval.bow import BowIndex
from bowretrieval.config import save_config, to_dict
from bowretrieval.errors import ConfigError, DataError
from bowretrieval.extract import extract_to_store, jobs_from_paths
from bowretrieval.features import get_extractor
from bowretrieval.npzio import save_npz_atomic
from bowretrieval.featurestore import FeatureStore
from bowretrieval.imageio import list_images
from bowretrieval.vocabulary import Vocabulary

from . import colmap
from .colmap import DbImage
from .config import MineConfig
from .minhash import minhash_pairs
from .verify import make_verifier

SUMMARY_FORMAT = "bowretrieval.sfm.summary/1"
STAGES = ("features", "index", "clusters", "match", "map", "extend", "finish")


def db_images(store: FeatureStore, names, max_features: int = 0) -> list:
    """COLMAP database entries (keypoints, uint8 SIFT) for ``names`` from a feature store."""
    out = []
    for n in names:
        f = store.load(n)
        d = f.descriptors
        if d.ndim == 3:
            d = d[:, d.shape[1] // 2, :]
        xy = f.frames[:, :2]
        if max_features and len(xy) > max_features:
            xy, d = xy[:max_features], d[:max_features]
        w, h = store.image_size(n)
        out.append(DbImage(n, w, h, xy, d))
    return out


class UnionFind:
    def __init__(self, n):
        self.parent = list(range(n))

    def find(self, a):
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def connected_components(n: int, edges) -> list:
    """Lists of node ids, largest first (ties by smallest id); isolated nodes are singletons."""
    uf = UnionFind(n)
    for a, b in edges:
        uf.union(a, b)
    groups = {}
    for i in range(n):
        groups.setdefault(uf.find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))


def _atomic_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


def _read_json(path):
    with open(path) as fh:
        return json.load(fh)


class Miner:
    """One mining run over ``photos`` (a folder or a .txt list) in ``workdir``; see the module doc."""

    def __init__(self, photos, workdir, cfg: MineConfig | None = None, log=print, progress: bool = True):
        self.photos = os.path.abspath(os.fspath(photos))
        self.work = os.path.abspath(os.fspath(workdir))
        self.cfg = cfg or MineConfig()
        self.log = log
        self.progress = progress
        self.times = {}
        if self.cfg.retrieval.seeds not in ("retrieval", "minhash", "both"):
            raise ConfigError(f"retrieval.seeds must be retrieval, minhash or both, got {self.cfg.retrieval.seeds!r}")
        if self.cfg.min_model_size < 3:
            raise ConfigError("min_model_size must be >= 3 (COLMAP needs an initial pair and one more view)")

    # ------------------------------------------------------------------------------------------
    def path(self, *parts):
        return os.path.join(self.work, *parts)

    def _stage(self, i, name, msg=""):
        self.log(f"[{i}/{len(STAGES)}] {name}{': ' + msg if msg else ''}")

    def _check_settings(self):
        """A work folder belongs to one set of settings: refuse to mix artefacts of two."""
        os.makedirs(self.work, exist_ok=True)
        mine = to_dict(self.cfg)
        mine.pop("threads", None)
        mine["colmap"].pop("timeout", None)
        mine = dict(settings=mine, photos=self.photos)
        f = self.path("settings.json")
        if os.path.exists(f):
            old = _read_json(f)
            if old != json.loads(json.dumps(mine)):
                raise ConfigError(f"{self.work} was mined from other photos or with other settings "
                                  f"(see {f}); use a new --out folder or delete this one")
        else:
            _atomic_json(f, mine)
        save_config(self.cfg, self.path("config.yaml"))

    # ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        t_all = time.time()
        self._check_settings()
        for i, name in enumerate(STAGES, 1):
            t0 = time.time()
            getattr(self, f"stage_{name}")(i)
            self.times[name] = time.time() - t0
            if name == "features" and len(self.names) == 0:
                return self._finish_empty(t_all, "no usable photos: every file failed or had too few features")
        return self.summary_(time.time() - t_all)

    # 1 ----------------------------------------------------------------------------------------
    def stage_features(self, i):
        paths = list_images(self.photos)
        if not paths:
            raise DataError(f"{self.photos}: no images found (looked for .jpg, .png, .tif, ...); "
                            "point PHOTOS at a folder of photos or a .txt list of paths")
        root = self.photos if os.path.isdir(self.photos) else None
        jobs = jobs_from_paths(paths, root)
        # exact duplicates (same bytes) would give zero-baseline pairs: keep the first copy only
        seen, self.duplicates, unique = {}, {}, []
        for job in jobs:
            try:
                with open(job.path, "rb") as fh:
                    digest = hashlib.sha1(fh.read()).hexdigest()
            except OSError:
                digest = None  # unreadable: the extractor reports it
            if digest is not None and digest in seen:
                self.duplicates[job.name] = seen[digest]
            else:
                if digest is not None:
                    seen[digest] = job.name
                unique.append(job)
        fc = self.cfg.features
        params = dict(fc.params)
        if fc.max_features and "max_features" not in params and \
                "max_features" in get_extractor(fc.extractor, **params).params:
            params["max_features"] = fc.max_features
        self.store_path = fc.store or self.path("features.h5")
        self._stage(i, "features", f"{len(jobs)} photos, {len(self.duplicates)} duplicates, "
                                   f"extractor {fc.extractor} -> {self.store_path}")
        rep = extract_to_store(unique, self.store_path, fc.extractor, params, fc.max_side or None,
                               workers=max(1, self.cfg.threads), progress=self.progress)
        self.failed = dict(rep.failed)
        self.few_features = []
        names = []
        with FeatureStore(self.store_path) as st:
            for job in unique:
                if job.name in self.failed or job.name not in st:
                    self.failed.setdefault(job.name, "not extracted")
                    continue
                if int(st._group(job.name).attrs["n"]) < fc.min_features:
                    self.few_features.append(job.name)
                    continue
                names.append(job.name)
        self.names = names
        self.image_root = root or os.path.commonpath([os.path.dirname(os.path.abspath(j.path)) for j in jobs])
        self.log(f"    {len(names)} usable, {len(self.failed)} failed, {len(self.few_features)} with fewer than "
                 f"{fc.min_features} features")

    # 2 ----------------------------------------------------------------------------------------
    def stage_index(self, i):
        os.makedirs(self.path("retrieval"), exist_ok=True)
        fc = self.cfg.features
        with FeatureStore(self.store_path) as st:
            self.frames, descs, self.sizes = [], [], []
            for n in tqdm(self.names, desc="load features", disable=not self.progress, unit="img"):
                d = st.descriptors(n, "rootsift")
                fr = st.frames(n)
                if fc.max_features and len(d) > fc.max_features:
                    d, fr = d[:fc.max_features], fr[:fc.max_features]
                descs.append(d)
                self.frames.append(np.ascontiguousarray(fr, np.float32))
                self.sizes.append(max(st.image_size(n)))
        words_f = self.path("retrieval", "words.npz")
        if os.path.exists(words_f):
            with np.load(words_f, allow_pickle=False) as z:
                names = [str(n) for n in z["names"]]
                if names != self.names:
                    raise DataError(f"{words_f}: written for other images; delete it and re-run")
                indptr, flat, n_words = z["indptr"], z["words"], int(z["n_words"])
            self.words = [flat[indptr[k]:indptr[k + 1]] for k in range(len(names))]
            self._stage(i, "index", f"{n_words} words (resumed)")
        else:
            voc = self._vocabulary(descs, i)
            n_words = voc.n_words
            self.words = [voc.assign(d, 1)[:, 0] for d in tqdm(descs, desc="assign words", disable=not self.progress,
                                                               unit="img")]
            indptr = np.concatenate([[0], np.cumsum([len(w) for w in self.words])]).astype(np.int64)
            flat = np.concatenate(self.words) if self.words else np.zeros(0, np.int32)
            save_npz_atomic(words_f, names=np.array(self.names, dtype=str), indptr=indptr, words=flat,
                            n_words=n_words)
        self.n_words = n_words
        self.index = BowIndex(n_words, threads=self.cfg.threads).fit(self.words)

    def _vocabulary(self, descs, i):
        rc = self.cfg.retrieval
        if rc.vocabulary:
            voc = Vocabulary.load(rc.vocabulary)
            self._stage(i, "index", f"vocabulary {rc.vocabulary} ({voc.n_words} words)")
            return voc
        f = self.path("retrieval", "vocab.npz")
        if os.path.exists(f):
            voc = Vocabulary.load(f)
            self._stage(i, "index", f"vocabulary {f} ({voc.n_words} words, resumed)")
            return voc
        total = sum(len(d) for d in descs)
        rng = np.random.default_rng(self.cfg.seed)
        X = np.concatenate(descs) if descs else np.zeros((0, 128), np.float32)
        if len(X) > rc.vocab_max_descriptors:
            X = X[rng.choice(len(X), rc.vocab_max_descriptors, replace=False)]
        # verification pairs features through shared words, so a word should occur about once per
        # image: about twice as many words as features per image, as far as the data supports
        per_image = float(np.median([len(d) for d in descs])) if descs else 0.0
        auto = 2 ** int(np.clip(np.round(np.log2(max(2.0, min(2 * per_image, total / 5.0)))), 8, 13))
        size = min(rc.vocab_size or auto, max(1, len(X)))
        self._stage(i, "index", f"learning {size} words on {len(X)} of {total} descriptors of the collection")
        voc = Vocabulary(size=size, iterations=10, seed=self.cfg.seed, threads=self.cfg.threads).fit(X)
        voc.save(f)
        return voc

    # 3 ----------------------------------------------------------------------------------------
    def _load_pairs(self):
        self.verified = {}  # (a, b) with a < b (name indices) -> inliers
        f = self.path("pairs.jsonl")
        pos = {n: k for k, n in enumerate(self.names)}
        if os.path.exists(f):
            with open(f) as fh:
                for line in fh:
                    try:
                        a, b, n = json.loads(line)
                    except ValueError:
                        continue  # a line cut by an interruption
                    if a in pos and b in pos:
                        ia, ib = pos[a], pos[b]
                        self.verified[(min(ia, ib), max(ia, ib))] = int(n)
        self._pairs_fh = open(f, "a")

    def verify_pairs(self, a: int, others) -> list:
        """Inliers of the spatially verified pairs (a, b) for b in others (cached on disk)."""
        todo = [b for b in dict.fromkeys(others) if (min(a, b), max(a, b)) not in self.verified]
        if todo:
            counts = self.verifier.inliers_many(self.frames[a], self.words[a], [self.frames[b] for b in todo],
                                                [self.words[b] for b in todo], [self.sizes[b] for b in todo])
            for b, n in zip(todo, counts):
                key = (min(a, b), max(a, b))
                self.verified[key] = int(n)
                self.n_verifications += 1
                self._pairs_fh.write(json.dumps([self.names[key[0]], self.names[key[1]], int(n)]) + "\n")
        return [self.verified[(min(a, b), max(a, b))] for b in others]

    def _verified(self, q, cands) -> list:
        return [c for c, n in zip(cands, self.verify_pairs(q, cands)) if n >= self.verifier.min_inliers]

    def query(self, q: int, exclude=(), top_k=None) -> list:
        """Verified results of image q (indices), with one round of average query expansion."""
        rc = self.cfg.retrieval
        top_k = top_k or rc.top_k
        ranked, _ = self.index.search([self.words[q]], top=top_k + 1)
        cands = [int(c) for c in ranked[0] if c != q and c not in exclude][:top_k]
        good = self._verified(q, cands)
        if rc.expansion > 0 and good:
            # average query expansion (Chum et al. 2007): query again with the words of the query and
            # its best verified results, verify what is new against the query
            best = sorted(good, key=lambda c: -self.verified[(min(q, c), max(q, c))])[:rc.expansion]
            words = np.concatenate([self.words[q]] + [self.words[c] for c in best])
            ranked, _ = self.index.search([words], top=top_k + 1 + len(best))
            seen = set(cands)
            more = [int(c) for c in ranked[0] if c != q and c not in seen and c not in exclude][:top_k]
            good += self._verified(q, more)
        return good

    def stage_clusters(self, i):
        vc, rc = self.cfg.verify, self.cfg.retrieval
        self.verifier = make_verifier(vc.backend, vc.threshold, vc.min_inliers, vc.max_per_word, self.cfg.seed,
                                      self.cfg.threads)
        self.n_verifications = 0
        self._load_pairs()
        f = self.path("clusters.json")
        if os.path.exists(f):
            data = _read_json(f)
            self.clusters = data["clusters"]
            self.mining_stats = data["stats"]
            self._stage(i, "clusters", f"{len(self.clusters)} clusters (resumed)")
            return
        n = len(self.names)
        self._stage(i, "clusters", f"seeds ({rc.seeds}) and growth by verified query expansion over {n} images")
        seeds = []
        n_minhash = 0
        if rc.seeds in ("minhash", "both"):
            cand = minhash_pairs(self.words, rc.minhash_sketches, rc.minhash_size, rc.minhash_max_bucket,
                                 seed=self.cfg.seed)
            n_minhash = len(cand)
            by_first = {}
            for a, b in cand:
                by_first.setdefault(a, []).append(b)
            for a, bs in tqdm(by_first.items(), desc="verify min-hash collisions", disable=not self.progress,
                              unit="img"):
                for b, n in zip(bs, self.verify_pairs(a, bs)):
                    if n >= vc.min_inliers:
                        seeds += [a, b]
            self.log(f"    min-hash: {len(cand)} colliding pairs, {len(seeds) // 2} verified")
        if rc.seeds in ("retrieval", "both"):
            order = list(range(n))
            random.Random(self.cfg.seed).shuffle(order)
            seeds += order[:int(math.ceil(rc.seed_fraction * n))]
        queried = set()
        bar = tqdm(total=n, desc="queries", disable=not self.progress, unit="img")
        for s in seeds:
            if s in queried:
                continue
            todo = deque([s])
            while todo:  # growth: every newly verified image is queried in turn
                q = todo.popleft()
                if q in queried:
                    continue
                queried.add(q)
                bar.update(1)
                for c in self.query(q):
                    if c not in queried:
                        todo.append(c)
        bar.close()
        self._pairs_fh.flush()
        edges = [k for k, v in self.verified.items() if v >= vc.min_inliers]
        comps = [c for c in connected_components(n, edges) if len(c) >= 2]
        self.clusters = [[self.names[k] for k in sorted(c)] for c in comps]
        self.mining_stats = dict(queries=len(queried), verifications=len(self.verified),
                                 verified_pairs=len(edges), minhash_candidates=n_minhash)
        _atomic_json(f, dict(clusters=self.clusters, stats=self.mining_stats,
                             edges=[[self.names[a], self.names[b], self.verified[(a, b)]] for a, b in edges]))
        self.log(f"    {len(queried)} queries, {len(self.verified)} pairs verified ({len(edges)} overlapping), "
                 f"{len(self.clusters)} clusters, sizes {[len(c) for c in self.clusters][:10]}")

    # 4 ----------------------------------------------------------------------------------------
    def _dense_pairs(self, members: list) -> set:
        """Pairs to match inside one cluster: all of them, or retrieval neighbours in big clusters."""
        cc = self.cfg.colmap
        pos = {n: k for k, n in enumerate(self.names)}
        idx = sorted(pos[m] for m in members)
        if len(idx) <= cc.max_dense:
            return {(a, b) for ai, a in enumerate(idx) for b in idx[ai + 1:]}
        inside = np.zeros(len(self.names), bool)
        inside[idx] = True
        pairs = set()
        ranked, _ = self.index.search([self.words[a] for a in idx], top=None)
        for a, row in zip(idx, ranked):
            row = [int(b) for b in row if inside[b] and b != a][:cc.dense_neighbours]
            pairs |= {(min(a, b), max(a, b)) for b in row}
        vc = self.cfg.verify
        pairs |= {k for k, v in self.verified.items()
                  if v >= min(vc.weak_inliers, vc.min_inliers) and inside[k[0]] and inside[k[1]]}
        return pairs

    def _match(self, pairs, name) -> dict:
        """Match ``pairs`` (name index pairs) with COLMAP; {(a, b): inliers} of the verified ones."""
        pf = self.path("colmap", f"{name}.pairs.txt")
        with open(pf, "w") as fh:
            for a, b in sorted(pairs):
                fh.write(f"{self.names[a]} {self.names[b]}\n")
        cc = self.cfg.colmap
        res = colmap.run_job(dict(kind="match", name=name, database=self.path("colmap", "database.db"), pairs_file=pf,
                                  threads=self.cfg.threads, max_ratio=cc.max_ratio, min_inliers=cc.min_inliers,
                                  max_error=cc.max_error, seed=self.cfg.seed),
                             self.path("colmap", "jobs"), cc.timeout)
        if not res.ok:
            raise colmap.SfmError(f"descriptor matching failed: {res.message}")
        return res.data

    def stage_match(self, i):
        f = self.path("colmap", "matches.json")
        os.makedirs(self.path("colmap"), exist_ok=True)
        # clusters joined by weaker verified links (below verify.min_inliers, at least
        # verify.weak_inliers) are densified together: COLMAP's epipolar verification decides
        vc = self.cfg.verify
        weak = [k for k, v in self.verified.items() if v >= min(vc.weak_inliers, vc.min_inliers)]
        groups = [c for c in connected_components(len(self.names), weak) if len(c) >= self.cfg.min_model_size]
        big = [[self.names[k] for k in sorted(c)] for c in groups]
        self.groups = [len(c) for c in big]
        if os.path.exists(f):
            data = _read_json(f)
            self._stage(i, "match", f"{data['pairs_matched']} pairs (resumed)")
        else:
            pairs = set()
            for c in big:
                pairs |= self._dense_pairs(c)
            self._stage(i, "match", f"{len(pairs)} pairs inside {len(big)} groups of >= {self.cfg.min_model_size} "
                                    f"images {self.groups} (COLMAP matcher + epipolar verification)")
            data = dict(pairs_matched=len(pairs), verified=[])
            if pairs:
                with FeatureStore(self.store_path) as st:
                    colmap.write_database(self.path("colmap", "database.db"),
                                          db_images(st, self.names, self.cfg.features.max_features), [])
                data["verified"] = self._match(pairs, "match")["verified"]
            _atomic_json(f, data)
        pos = {n: k for k, n in enumerate(self.names)}
        self.pairs_matched = data["pairs_matched"]
        self.scene_graph = {(min(pos[a], pos[b]), max(pos[a], pos[b])): n for a, b, n in data["verified"]
                            if n >= self.cfg.colmap.min_inliers}
        self.log(f"    {len(self.scene_graph)} pairs with >= {self.cfg.colmap.min_inliers} epipolar inliers")

    # 5 ----------------------------------------------------------------------------------------
    def _map(self, names: list, job_name: str):
        cc = self.cfg.colmap
        out = self.path("models", job_name)
        res_file = self.path("models", "jobs", f"{job_name}.result.json")
        if os.path.exists(res_file):
            return colmap.JobResult(True, 0.0, "resumed", _read_json(res_file))
        return colmap.run_job(dict(kind="map", name=job_name, database=self.path("colmap", "database.db"),
                                   images=sorted(names), output=out, image_root=self.image_root,
                                   threads=self.cfg.threads, seed=self.cfg.seed,
                                   min_model_size=min(self.cfg.min_model_size, max(3, len(names) // 2)),
                                   min_num_matches=cc.min_inliers, init_min_num_inliers=cc.init_min_num_inliers,
                                   init_min_tri_angle=cc.init_min_tri_angle,
                                   abs_pose_min_num_inliers=cc.abs_pose_min_num_inliers),
                              self.path("models", "jobs"), cc.timeout)

    def map_components(self, components: list, suffix: str = "") -> tuple:
        """Map each component (list of names) in its own child process; failures are recorded."""
        models, failures = [], []
        for k, comp in enumerate(tqdm(components, desc="mapping", disable=not self.progress, unit="component")):
            res = self._map(comp, f"c{k}{suffix}")
            if not res.ok:
                failures.append(dict(component=k, images=len(comp), reason=res.message))
                self.log(f"    component {k} ({len(comp)} images) FAILED: {res.message}")
                continue
            for m in res.data["models"]:
                m["component"] = k
                if m["registered"] >= self.cfg.min_model_size:
                    models.append(m)
            self.log(f"    component {k}: {len(comp)} images -> models "
                     f"{[m['registered'] for m in res.data['models']]} registered ({res.seconds:.0f} s)")
        return models, failures

    def stage_map(self, i):
        edges = list(self.scene_graph)
        comps = [c for c in connected_components(len(self.names), edges) if len(c) >= self.cfg.min_model_size]
        self.components = [[self.names[k] for k in c] for c in comps]
        self._stage(i, "map", f"{len(comps)} components of >= {self.cfg.min_model_size} images: "
                              f"{[len(c) for c in comps]}")
        self.models, self.failures = self.map_components(self.components)

    # 6 ----------------------------------------------------------------------------------------
    def stage_extend(self, i):
        if not self.cfg.extend or not self.models:
            self._stage(i, "extend", "skipped")
            return
        from .model import Model

        pos = {n: k for k, n in enumerate(self.names)}
        in_model = {n for m in self.models for n in Model.load(m["path"]).names}
        additions = {}
        for mi, m in enumerate(self.models):
            reg = [pos[n] for n in Model.load(m["path"]).names]
            new = {}
            for q in reg:
                for c in self.query(q, exclude=set(), top_k=2 * self.cfg.retrieval.top_k):
                    if self.names[c] not in in_model:
                        new.setdefault(c, []).append(q)
            if new:
                additions[mi] = new
        self._pairs_fh.flush()
        n_new = sum(len(v) for v in additions.values())
        self._stage(i, "extend", f"{n_new} verified images outside the models found by re-querying registered images")
        if not additions:
            return
        pairs = set()
        for mi, new in additions.items():
            reg = [pos[n] for n in Model.load(self.models[mi]["path"]).names]
            for c, qs in new.items():
                ranked, _ = self.index.search([self.words[c]], top=None)
                inside = set(reg)
                near = [int(b) for b in ranked[0] if int(b) in inside][:self.cfg.colmap.dense_neighbours]
                pairs |= {(min(c, b), max(c, b)) for b in set(near) | set(qs)}
                pairs |= {(min(c, d), max(c, d)) for d in new if d != c}
        pairs -= set(self.scene_graph)
        data = self._match(pairs, "extend") if pairs else dict(verified=[])
        self.pairs_matched += len(pairs)
        for a, b, n in data["verified"]:
            if n >= self.cfg.colmap.min_inliers:
                self.scene_graph[(min(pos[a], pos[b]), max(pos[a], pos[b]))] = n
        comps, which = [], []
        for mi, new in additions.items():
            comps.append(sorted(set(Model.load(self.models[mi]["path"]).names) | {self.names[c] for c in new}))
            which.append(mi)
        ext_models, ext_fail = self.map_components(comps, suffix="e")
        self.failures += ext_fail
        for em in ext_models:
            mi = which[em["component"]]
            old = self.models[mi]
            if em["registered"] > old["registered"] and old.get("component") is not None:
                self.log(f"    model of component {old['component']}: {old['registered']} -> {em['registered']} images")
                em["component"] = old["component"]
                self.models[mi] = em

    # 7 ----------------------------------------------------------------------------------------
    def stage_finish(self, i):
        from .model import Model, top_view

        kept, kept_names, dropped = [], set(), []
        for m in sorted(self.models, key=lambda m: -m["registered"]):
            names = set(Model.load(m["path"]).names)
            overlap = len(names & kept_names) / max(1, len(names))
            if overlap >= self.cfg.max_overlap:
                dropped.append(dict(path=m["path"], overlap=overlap))
                continue
            kept.append(m)
            kept_names |= names
        for k, m in enumerate(kept):
            model = Model.load(m["path"])
            m.update(id=k, images=model.names, picture=top_view(model, os.path.join(m["path"], "top.png")))
        self.final_models = kept
        self.dropped = dropped
        self._stage(i, "finish", f"{len(kept)} models ({len(dropped)} overlapping dropped) -> "
                                 f"{self.path('summary.json')}")

    # ------------------------------------------------------------------------------------------
    def summary_(self, seconds) -> dict:
        models = [dict(id=m["id"], path=m["path"], registered=m["registered"], points=m["points"],
                       reprojection_error=m["reprojection_error"], picture=m["picture"], images=m["images"])
                  for m in self.final_models]
        msg = (f"{len(models)} models, {sum(m['registered'] for m in models)} images registered"
               if models else "no models: no group of at least "
               f"{self.cfg.min_model_size} overlapping photos was found (lower min_model_size for small collections)")
        s = dict(format=SUMMARY_FORMAT, photos=self.photos, image_root=self.image_root, n_photos=
                 len(self.names) + len(self.failed) + len(self.few_features) + len(self.duplicates),
                 n_usable=len(self.names), failed=self.failed, duplicates=self.duplicates,
                 few_features=self.few_features, mining=self.mining_stats, clusters=[len(c) for c in self.clusters],
                 groups=getattr(self, "groups", []),
                 pairs_matched=self.pairs_matched, scene_graph_edges=len(self.scene_graph),
                 components=[len(c) for c in self.components], failed_components=self.failures,
                 dropped_models=self.dropped, models=models, message=msg,
                 seconds=self.times, seconds_total=seconds, config=to_dict(self.cfg))
        _atomic_json(self.path("summary.json"), s)
        self.log(msg)
        return s

    def _finish_empty(self, t0, msg):
        self.clusters, self.components, self.failures, self.final_models, self.dropped = [], [], [], [], []
        self.mining_stats, self.pairs_matched, self.scene_graph = {}, 0, {}
        s = self.summary_(time.time() - t0)
        s["message"] = msg
        _atomic_json(self.path("summary.json"), s)
        self.log(msg)
        return s


def mine(photos, workdir, cfg: MineConfig | None = None, log=print, progress: bool = True) -> dict:
    """Mine 3-D models from ``photos`` into ``workdir``; returns the summary (also summary.json)."""
    miner = Miner(photos, workdir, cfg, log, progress)
    try:
        return miner.run()
    finally:
        fh = getattr(miner, "_pairs_fh", None)
        if fh is not None:
            fh.close()


def load_summary(workdir) -> dict:
    f = os.path.join(os.fspath(workdir), "summary.json")
    if not os.path.exists(f):
        raise DataError(f"{f}: no summary; run `bowr sfm mine PHOTOS --out {workdir}` first")
    s = _read_json(f)
    if s.get("format") != SUMMARY_FORMAT:
        raise DataError(f"{f}: format {s.get('format')!r} is not {SUMMARY_FORMAT!r}; mine again")
    return s


__all__ = ["MineConfig", "Miner", "mine", "load_summary", "connected_components", "db_images"]
