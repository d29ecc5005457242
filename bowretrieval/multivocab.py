"""Bundles of diverse visual vocabularies and their concatenated bag-of-words vectors.

Jegou & Chum (ECCV 2012) and Radenovic, Jegou & Chum (ICMR 2015): several vocabularies that
quantise differently (other k-means seeds, measurement regions, SIFT powers, PCA projections) give
BoW vectors whose concatenation keeps finer visual information; PCA-whitening it jointly
(``whitening.PCAWhitening``) gives short vectors. A bundle is described in YAML (``configs/m*.yaml``)::

    name: mrootsift
    members:                      # one descriptor source each
      - {name: beta1,  descriptor: power, beta: 1.0, sizes: [2048, 1024, 512, 256, 128], seed: 1}
      - {name: beta04, descriptor: power, beta: 0.4, sizes: [2048, 1024, 512, 256, 128], seed: 2}

Per vocabulary the histogram is square-rooted (signed square root of non-negative counts) and
L2-normalised, no idf; vocabularies of different sizes are weighted by log(size); the blocks are
concatenated into one sparse row. All sizes of a member are assigned with one fused product
(``ext/shortvec.pyx``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from .config import _f, from_dict, load_config, to_dict
from .descriptors import VARIANTS, transform
from .errors import ConfigError, DataError, NotFittedError
from .npzio import json_array, save_npz_atomic
from .vocabulary import Vocabulary, check_descriptors

FORMAT = "bowretrieval.multivocab/1"
SUBSETS = ("all", "even", "odd")


@dataclass
class MemberConfig:
    name: str = _f("", "label of this descriptor source (unique within the bundle)")
    region: int = _f(-1, "measurement region index in (N, R, 128) stores (-1: the middle one / the only one)")
    descriptor: str = _f("rootsift", "descriptor variant: sift, rootsift, power")
    beta: float = _f(0.5, "SIFT power for descriptor: power (component-wise x**beta, then L2)")
    pca_dims: int = _f(0, "PCA-SIFT: project descriptors to this many dimensions (0: no projection)")
    pca_subset: str = _f("even", "training images the PCA projection is learned on: all, even or odd positions")
    seed: int = _f(0, "k-means seed of this member's vocabularies")
    sizes: list = _f([8192], "vocabulary sizes; several sizes form a bundle weighted by log(size)")


@dataclass
class BundleConfig:
    name: str = _f("bundle", "name of the bundle (used in file names and tables)")
    members: list = _f([], "descriptor sources, each a MemberConfig mapping")
    iterations: int = _f(15, "k-means iterations")
    max_points_per_centroid: int = _f(256, "k-means subsample: training points per word at most")
    max_descriptors: int = _f(1_000_000, "random subsample of training descriptors per member before k-means")
    weighting: str = _f("log", "per-vocabulary weight: log (log(size)) or none")
    short_dims: int = _f(128, "dimension D' of the PCA-whitened short vectors")
    seed: int = _f(0, "seed of descriptor subsampling and of the whitening's Lanczos start vector")

    def member_configs(self, source="<config>") -> list:
        out = []
        for i, m in enumerate(self.members):
            mc = m if isinstance(m, MemberConfig) else from_dict(MemberConfig, m, source, f"members[{i}]")
            out.append(mc)
        return out


def validate_bundle(cfg: BundleConfig, source="<config>") -> list:
    """Check a bundle config and return its MemberConfig list; ConfigError names the field."""
    members = cfg.member_configs(source)
    if not members:
        raise ConfigError(f"{source}: 'members' is empty; list at least one descriptor source")
    names = set()
    for i, m in enumerate(members):
        where = f"{source}: members[{i}]"
        if not m.name:
            m.name = f"m{i}"
        if m.name in names:
            raise ConfigError(f"{where}: duplicate member name {m.name!r}")
        names.add(m.name)
        if m.descriptor not in VARIANTS:
            raise ConfigError(f"{where}.descriptor must be one of {VARIANTS}, got {m.descriptor!r}")
        if m.pca_subset not in SUBSETS:
            raise ConfigError(f"{where}.pca_subset must be one of {SUBSETS}, got {m.pca_subset!r}")
        if m.pca_dims < 0:
            raise ConfigError(f"{where}.pca_dims must be >= 0")
        if not m.sizes or any((not isinstance(s, int)) or isinstance(s, bool) or s < 2 for s in m.sizes):
            raise ConfigError(f"{where}.sizes must be a non-empty list of integers >= 2, got {m.sizes!r}")
    if cfg.weighting not in ("log", "none"):
        raise ConfigError(f"{source}: weighting must be 'log' or 'none', got {cfg.weighting!r}")
    if cfg.short_dims < 1:
        raise ConfigError(f"{source}: short_dims must be >= 1")
    return members


def load_bundle_config(path) -> BundleConfig:
    cfg = load_config(path, BundleConfig)
    cfg.members = validate_bundle(cfg, os.fspath(path))
    return cfg


def is_bundle_config(path) -> bool:
    """True when a YAML file describes a vocabulary bundle (has a top-level 'members' list)."""
    import yaml

    from .config import resolve_config_path

    try:
        with open(resolve_config_path(path)) as fh:
            data = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "members" in data


@contextlib.contextmanager
def _blas_threads(n):
    if n and n > 0:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
            yield
            return
        with threadpool_limits(limits=int(n)):
            yield
    else:
        yield


def vocabulary_weight(size: int, weighting: str = "log") -> float:
    """Weight of a vocabulary's L2-normalised block: log(size) (natural log) or 1."""
    return float(np.log(size)) if weighting == "log" else 1.0


class MultiVocabulary:
    """A bundle of vocabularies over several descriptor sources (see the module docstring).

    config: BundleConfig (or a mapping / YAML path). threads: BLAS + kernel threads (0: library default).
    chunk: descriptors per fused product (bounds the (chunk, words) score matrix in memory).
    """

    def __init__(self, config=None, threads: int = 0, chunk: int = 2048):
        if config is None:
            config = BundleConfig()
        elif isinstance(config, (str, os.PathLike)):
            config = load_bundle_config(config)
        elif isinstance(config, dict):
            config = from_dict(BundleConfig, config)
        self.config = dataclasses.replace(config, members=validate_bundle(config))
        self.threads = int(threads)
        self.chunk = int(chunk)

    # -- describing the vectors ---------------------------------------------------------------
    @property
    def members(self) -> list:
        return self.config.members

    def blocks(self) -> list:
        """(member index, size, weight) per vocabulary, in concatenation order."""
        return [(mi, int(s), vocabulary_weight(s, self.config.weighting))
                for mi, m in enumerate(self.members) for s in m.sizes]

    @property
    def dim(self) -> int:
        """Length of the concatenated BoW vector (sum of all vocabulary sizes)."""
        return int(sum(s for _, s, _ in self.blocks()))

    # -- descriptors of one member ---------------------------------------------------------------
    def member_descriptors(self, mi: int, desc, what="descriptors") -> np.ndarray:
        """The descriptors member ``mi`` quantises: region slice, SIFT variant, PCA-SIFT projection."""
        m = self.members[mi]
        d = self._region(mi, desc, what)
        if self._has_projection(mi):
            proj = self._projections[mi]
            if d.shape[0] == 0:
                return np.zeros((0, proj.dim), np.float32)
            if d.shape[1] != proj.components_.shape[1]:
                raise DataError(f"{what}: dimension {d.shape[1]} does not match member {m.name!r}'s PCA-SIFT "
                                f"projection ({proj.components_.shape[1]}); use the descriptors the bundle was learned on")
            check_descriptors(d, what)
            return proj.transform(d)  # the SIFT variant is applied inside PCASift
        if d.shape[0] == 0:
            return np.zeros((0, d.shape[1]), np.float32)
        return check_descriptors(transform(d, m.descriptor, m.beta), what)

    def _region(self, mi, desc, what):
        """The (N, D) slice of member ``mi``'s measurement region."""
        m = self.members[mi]
        d = np.asarray(desc)
        if d.ndim == 3:
            r = d.shape[1] // 2 if m.region < 0 else m.region
            if r >= d.shape[1]:
                raise DataError(f"{what}: member {m.name!r} uses measurement region {m.region} but the descriptors "
                                f"have only {d.shape[1]} regions; extract with more measurement regions")
            return d[:, r, :]
        if d.ndim == 2:
            if m.region >= 0:
                raise DataError(f"{what}: member {m.name!r} uses measurement region {m.region} but the descriptors "
                                "have no region axis (N, 128); extract with measurement regions (N, R, 128), "
                                "e.g. the hesaff extractor with `regions`")
            return d
        raise DataError(f"{what}: descriptors must be (N, D) or (N, R, D), got shape {d.shape}")

    def _has_projection(self, mi) -> bool:
        return getattr(self, "_projections", {}).get(mi) is not None

    # -- learning -----------------------------------------------------------------------------
    def fit(self, train_images, progress: bool = False) -> "MultiVocabulary":
        """Learn every member's PCA projection (if any) and vocabularies.

        train_images: sequence of per-image descriptor arrays, (N, 128) or (N, R, 128), raw SIFT
        (uint8 as stored, or float). Images with no features are allowed.
        """
        cfg = self.config
        members = validate_bundle(cfg)
        train_images = list(train_images)
        if not train_images:
            raise DataError("no training images given to MultiVocabulary.fit")
        self._projections = {}
        self.vocabularies_ = []
        for mi, m in enumerate(members):
            if m.pca_dims:
                from .pcasift import PCASift

                pick = {"all": slice(None), "even": slice(0, None, 2), "odd": slice(1, None, 2)}[m.pca_subset]
                self._projections[mi] = None
                sub = [self._region(mi, d, f"training image {i}") for i, d in enumerate(train_images[pick])]
                Xp = self._subsample(np.concatenate(sub), cfg.max_descriptors, cfg.seed + 7919 * (mi + 1))
                check_descriptors(Xp, f"member {m.name!r} PCA-SIFT training descriptors")
                self._projections[mi] = PCASift(m.pca_dims, variant=m.descriptor, beta=m.beta).fit(Xp)
            X = [self.member_descriptors(mi, d, f"training image {i}") for i, d in enumerate(train_images)]
            X = np.concatenate(X)
            X = self._subsample(X, cfg.max_descriptors, cfg.seed + 104729 * (mi + 1))
            for s in m.sizes:
                if progress:
                    print(f"[{cfg.name}] k-means member {m.name} ({m.descriptor}"
                          f"{' beta %g' % m.beta if m.descriptor == 'power' else ''}"
                          f"{' pca %d' % m.pca_dims if m.pca_dims else ''}): {len(X)} x {X.shape[1]} -> {s} words",
                          flush=True)
                voc = Vocabulary(s, cfg.iterations, cfg.max_points_per_centroid, seed=m.seed,
                                 search="exact", threads=self.threads)
                try:
                    voc.fit(X)
                except DataError as exc:
                    raise DataError(f"bundle {cfg.name!r}, member {m.name!r}: {exc}") from None
                self.vocabularies_.append(voc)
        self._build_fused()
        return self

    @staticmethod
    def _subsample(X, n, seed):
        if len(X) > n:
            rng = np.random.default_rng(seed)
            X = X[np.sort(rng.choice(len(X), n, replace=False))]
        return X

    def _build_fused(self):
        self._fused = []
        it = iter(self.vocabularies_)
        for m in self.members:
            vocs = [next(it) for _ in m.sizes]
            C = np.ascontiguousarray(np.concatenate([v.centroids_ for v in vocs]), dtype=np.float32)
            offsets = np.zeros(len(vocs) + 1, np.int64)
            np.cumsum([v.n_words for v in vocs], out=offsets[1:])
            self._fused.append((C, np.einsum("ij,ij->i", C, C).astype(np.float32), offsets))

    def _check_fitted(self):
        if getattr(self, "vocabularies_", None) is None:
            raise NotFittedError("MultiVocabulary is not fitted: call fit(train_images) or MultiVocabulary.load(path)")

    # -- assignment ---------------------------------------------------------------------------
    def assign(self, desc, what="descriptors") -> list:
        """Nearest word per descriptor for every vocabulary: a list of int32 (N,) arrays, in block order.

        All sizes of a member come from one fused product X C^T and a blockwise argmin."""
        self._check_fitted()
        with _blas_threads(self.threads):
            return self._assign(desc, what)

    def _assign(self, desc, what):
        from ._ext import shortvec as _k

        out = []
        for mi, (C, c2, offsets) in enumerate(self._fused):
            X = self.member_descriptors(mi, desc, what)
            if X.shape[1] != C.shape[1]:
                raise DataError(f"{what}: dimension {X.shape[1]} does not match member "
                                f"{self.members[mi].name!r}'s vocabularies ({C.shape[1]})")
            words = np.empty((len(X), len(offsets) - 1), np.int32)
            for a in range(0, len(X), self.chunk):
                dots = X[a:a + self.chunk] @ C.T
                _k.block_argmin(dots, c2, offsets, words[a:a + self.chunk], max(self.threads, 1))
            out.extend(words[:, b].copy() for b in range(words.shape[1]))
        return out

    # -- encoding -----------------------------------------------------------------------------
    def encode(self, desc, what="descriptors", _limited=False):
        """(indices int64, values float32) of one image's concatenated, weighted BoW vector."""
        self._check_fitted()
        if _limited:
            words = self._assign(desc, what)
        else:
            with _blas_threads(self.threads):
                words = self._assign(desc, what)
        return self.encode_words(words)

    def encode_words(self, words):
        """(indices, values) of the concatenated BoW vector from per-vocabulary word arrays (``assign``)."""
        idx, val = [], []
        base = 0
        for (mi, size, weight), w in zip(self.blocks(), words):
            if len(w):
                u, c = np.unique(w, return_counts=True)
                v = np.sqrt(c.astype(np.float64))  # signed square root of non-negative counts
                v *= weight / np.linalg.norm(v)
                idx.append(u.astype(np.int64) + base)
                val.append(v.astype(np.float32))
            base += size
        if not idx:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(idx), np.concatenate(val)

    def transform(self, images, progress: bool = False, desc="BoW") -> sp.csr_matrix:
        """Sparse (n_images, dim) float32 matrix of concatenated BoW vectors; empty images give zero rows."""
        self._check_fitted()
        indptr, indices, data = [0], [], []
        with _blas_threads(self.threads):  # set once: threadpoolctl costs ~50 ms per entry
            for i, d in enumerate(tqdm(images, desc=desc, unit="img", disable=not progress)):
                ix, v = self.encode(d, f"image {i}", _limited=True)
                indices.append(ix)
                data.append(v)
                indptr.append(indptr[-1] + len(ix))
        n = len(indptr) - 1
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
        return sp.csr_matrix((cat(data, np.float32), cat(indices, np.int64), np.asarray(indptr, np.int64)),
                             shape=(n, self.dim))

    # -- persistence --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        self._check_fitted()
        arrays = {f"voc{j}": v.centroids_ for j, v in enumerate(self.vocabularies_)}
        proj = {}
        for mi, p in getattr(self, "_projections", {}).items():
            if p is not None:
                arrays[f"pca{mi}_mean"] = p.mean_
                arrays[f"pca{mi}_components"] = p.components_
                arrays[f"pca{mi}_var"] = p.explained_variance_
                arrays[f"pca{mi}_var_ratio"] = p.explained_variance_ratio_
                proj[str(mi)] = dict(params=p.get_params(), n_training=p.n_training_)
        meta = dict(format=FORMAT, config=to_dict_bundle(self.config), projections=proj,
                    vocab_params=[v.get_params() for v in self.vocabularies_],
                    inertia=[getattr(v, "inertia_", None) for v in self.vocabularies_])
        return {"arrays": arrays, "meta": meta}

    @classmethod
    def from_state(cls, state, source="<state>", threads: int = 0) -> "MultiVocabulary":
        meta, arrays = state["meta"], state["arrays"]
        if meta.get("format") != FORMAT:
            raise DataError(f"{source}: bundle format {meta.get('format')!r} is not {FORMAT!r}; rebuild it "
                            "with `bowr vocab build`")
        cfg = from_dict(BundleConfig, meta["config"], source)
        self = cls(cfg, threads=threads)
        members = validate_bundle(cfg, source)
        n_voc = sum(len(m.sizes) for m in members)
        self.vocabularies_ = []
        for j in range(n_voc):
            v = Vocabulary(**meta["vocab_params"][j])
            v.centroids_ = np.ascontiguousarray(arrays[f"voc{j}"], dtype=np.float32)
            v.inertia_ = meta["inertia"][j]
            self.vocabularies_.append(v)
        self._projections = {}
        for key, pm in meta.get("projections", {}).items():
            from .pcasift import PCASift

            mi = int(key)
            p = PCASift(**pm["params"])
            p.mean_ = np.asarray(arrays[f"pca{mi}_mean"], np.float32)
            p.components_ = np.asarray(arrays[f"pca{mi}_components"], np.float32)
            p.explained_variance_ = np.asarray(arrays[f"pca{mi}_var"], np.float32)
            p.explained_variance_ratio_ = np.asarray(arrays[f"pca{mi}_var_ratio"], np.float32)
            p.n_training_ = pm.get("n_training")
            self._projections[mi] = p
        self._build_fused()
        return self

    def save(self, path) -> str:
        return save_states(path, bundle=self.state_dict())

    @classmethod
    def load(cls, path, threads: int = 0) -> "MultiVocabulary":
        states = load_states(path)
        if "bundle" not in states:
            raise DataError(f"{path}: holds no vocabulary bundle")
        return cls.from_state(states["bundle"], os.fspath(path), threads)


def to_dict_bundle(cfg: BundleConfig) -> dict:
    d = to_dict(cfg)
    d["members"] = [to_dict(m) if not isinstance(m, dict) else dict(m) for m in cfg.members]
    return d


# -- one .npz holding several components' arrays and a JSON header --------------------------------
def save_states(path, **states) -> str:
    """Write components' state dicts ({'arrays', 'meta'}) into one .npz, atomically."""
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arrays, header = {}, {}
    for comp, st in states.items():
        header[comp] = st["meta"]
        for k, a in st["arrays"].items():
            arrays[f"{comp}/{k}"] = a
    return save_npz_atomic(path, header=json_array(header), **arrays)


def load_states(path) -> dict:
    path = os.fspath(path)
    if not os.path.exists(path) and os.path.exists(path + ".npz"):
        path += ".npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            states = {c: {"meta": m, "arrays": {}} for c, m in header.items()}
            for key in z.files:
                if "/" in key:
                    comp, name = key.split("/", 1)
                    states[comp]["arrays"][name] = z[key]
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: not a bowretrieval vocabulary-bundle file ({exc}); "
                        "rebuild it with `bowr vocab build CONFIG`") from exc
    return states
