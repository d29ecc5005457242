"""YAML configuration mapped 1:1 onto dataclasses.

Every field has a default and a one-line meaning (``field(metadata={'help': ...})``). Unknown keys,
wrong types and malformed YAML raise ``ConfigError`` naming the file and the field. The config used
for a result is saved next to it (``save_config``).
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field

import yaml

from .errors import ConfigError


def _f(default, help: str):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ExtractConfig:
    extractor: str = _f("hesaff", "registered extractor name: hesaff (Hessian-Affine + SIFT) or sift (OpenCV DoG)")
    params: dict = _f({}, "extractor parameters, passed as keyword arguments")
    max_side: int = _f(1024, "downscale images whose longest side exceeds this (0: never)")
    workers: int = _f(2, "extraction worker processes")


@dataclass
class VocabConfig:
    size: int = _f(16384, "number of visual words")
    iterations: int = _f(15, "k-means iterations")
    max_points_per_centroid: int = _f(256, "k-means subsample: training points per word at most")
    max_descriptors: int = _f(3_000_000, "random subsample of training descriptors before k-means")
    seed: int = _f(0, "random seed of sampling and k-means")
    descriptor: str = _f("rootsift", "descriptor variant the vocabulary is learned on: sift, rootsift, power")
    beta: float = _f(0.5, "SIFT power for descriptor: power")


@dataclass
class SearchConfig:
    method: str = _f("bow", "retrieval method: bow (tf-idf cosine), smk, asmk or hqe (docs/asmk.md)")
    query_ma: int = _f(0, "query multiple assignment: nearest words per query descriptor (0: the method's "
                          "default, bow 1, smk/asmk 5, hqe 3)")
    db_ma: int = _f(1, "database multiple assignment")
    threads: int = _f(2, "scoring threads")
    alpha: float = _f(3.0, "smk/asmk/hqe selectivity exponent: sigma(u) = sign(u)|u|^alpha")
    tau: float = _f(0.0, "smk/asmk selectivity threshold on u = 1 - 2 h / 128 (hqe: Hamming 48)")
    out_of_core: bool = _f(False, "smk/asmk/hqe: build the index on disk, reading the feature store image by "
                                  "image (collections larger than memory; docs/index_format.md)")


@dataclass
class VerifyConfig:
    enabled: bool = _f(False, "spatially verify and re-rank the top results (--verify); docs/spatial_verification.md")
    top: int = _f(100, "results verified per query")
    threshold: float = _f(12.0, "inlier transfer error in pixels for a database image of reference_side pixels")
    reference_side: int = _f(1024, "threshold scales with the database image's longest side over this (0: absolute)")
    min_inliers: int = _f(0, "inliers that make an image verified (0: measured defaults, 10 after bow, 15 after smk/asmk/hqe)")
    max_hypotheses: int = _f(300, "affine hypotheses (single correspondences) scored per image pair (0: all)")
    homography: bool = _f(True, "upgrade the best affine model to a homography when that gains inliers")
    max_scale_change: float = _f(2.0, "an inlier's frames must agree with the model's local scale within this factor (0: off)")
    max_angle: float = _f(30.0, "... and with its local rotation within this many degrees (0: off)")
    match_ma: int = _f(3, "query multiple assignment of the tentative correspondences")
    burst_limit: int = _f(64, "words making more than this many correspondences in a pair are skipped")
    qe: str = _f("none", "query expansion from verified images (--qe): none, avg, or hqe (needs search.method hqe)")
    qe_images: int = _f(50, "verified images used for query expansion at most")
    threads: int = _f(2, "image pairs verified in parallel")


@dataclass
class EvalConfig:
    kappas: list = _f([1, 5, 10], "k of the mean precision at k")
    protocols_file: str = _f("", "ground-truth file inside the dataset folder (empty: gnd_*.json, else .pkl)")


@dataclass
class ExperimentConfig:
    extract: ExtractConfig = field(default_factory=ExtractConfig, metadata={"help": "feature extraction"})
    vocab: VocabConfig = field(default_factory=VocabConfig, metadata={"help": "vocabulary learning"})
    search: SearchConfig = field(default_factory=SearchConfig, metadata={"help": "indexing and search"})
    verify: VerifyConfig = field(default_factory=VerifyConfig, metadata={"help": "spatial verification and query expansion"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "evaluation"})


def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                float(value)
                return value.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity")
            except ValueError:
                return False
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (str, bool):
        return isinstance(value, tp)
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    if tp is list or origin is list:
        return isinstance(value, list)
    return True


def from_dict(cls, data, source="<config>", prefix=""):
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclasses."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix or 'top level'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{path}'; known keys here: {', '.join(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, source, path)
        else:
            if not _type_ok(value, tp):
                name = getattr(tp, "__name__", str(tp))
                raise ConfigError(f"{source}: '{path}' must be {name}, got {value!r}")
            kwargs[key] = float(value) if tp is float else value
    return cls(**kwargs)


def resolve_config_path(path) -> str:
    """``path`` itself when it exists; otherwise the shipped config of that name (``configs/`` of the
    source tree, installed as ``bowretrieval/configs``), so ``--config mrootsift.yaml`` works anywhere."""
    path = os.fspath(path)
    if os.path.exists(path):
        return path
    name = os.path.basename(path)
    here = os.path.dirname(os.path.abspath(__file__))
    for d in (os.path.join(here, "configs"), os.path.join(os.path.dirname(here), "configs")):
        cand = os.path.join(d, name)
        if os.path.isfile(cand):
            return cand
    return path


def load_config(path, cls=ExperimentConfig):
    """Read a YAML file into ``cls`` (ConfigError on malformed YAML or unknown keys); a name that is
    not a file is looked up among the shipped configs (``resolve_config_path``)."""
    path = resolve_config_path(path)
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML ({exc})") from exc
    return from_dict(cls, data, path)


def apply_overrides(cfg, overrides, source="--set"):
    """Apply 'section.key=value' strings (values parsed as YAML) to a config dataclass in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"{source}: '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        obj = cfg
        for p in parts[:-1]:
            if not dataclasses.is_dataclass(obj) or not hasattr(obj, p):
                raise ConfigError(f"{source}: unknown key '{key}'")
            obj = getattr(obj, p)
        leaf = parts[-1]
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: cannot parse value of '{key}' ({exc})") from exc
        if dataclasses.is_dataclass(obj):
            patched = from_dict(type(obj), {leaf: value}, source, ".".join(parts[:-1]))
            setattr(obj, leaf, getattr(patched, leaf))
        elif isinstance(obj, dict):
            obj[leaf] = value
        else:
            raise ConfigError(f"{source}: unknown key '{key}'")
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path):
    """Write the config used for a result next to it (YAML)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
    os.replace(tmp, path)
    return path


def describe(cls=ExperimentConfig, indent=0) -> str:
    """Human-readable list of every field, its default and meaning (for --help and docs)."""
    lines = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(" " * indent + f"{f.name}:  # {f.metadata.get('help', '')}")
            lines.append(describe(tp, indent + 2))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(" " * indent + f"{f.name}: {default!r}  # {f.metadata.get('help', '')}")
    return "\n".join(lines)
