"""Settings of retrieval-SfM, mapped 1:1 from ``configs/sfm.yaml`` (see bowretrieval.config)."""
from __future__ import annotations

from dataclasses import dataclass, field

from bowretrieval.config import _f, load_config


@dataclass
class SfmFeaturesConfig:
    extractor: str = _f("sift", "registered extractor (sift; hesaff once it is built)")
    params: dict = _f({}, "extractor parameters (max_features is set from the field below)")
    max_features: int = _f(4000, "features per image at most (0: all); bounds matching and mapping time")
    max_side: int = _f(1024, "downscale images whose longest side exceeds this (0: never)")
    store: str = _f("", "feature store to use or fill (empty: WORKDIR/features.h5)")
    min_features: int = _f(50, "images with fewer features are left out (tiny or blank photos)")


@dataclass
class SfmRetrievalConfig:
    vocabulary: str = _f("", "vocabulary .npz to use (empty: learn one on the collection)")
    vocab_size: int = _f(0, "words of the learned vocabulary (0: ~2 x features per image, 256..8192)")
    vocab_max_descriptors: int = _f(100_000, "descriptors sampled to learn the vocabulary")
    top_k: int = _f(20, "retrieval results spatially verified per query")
    expansion: int = _f(5, "verified results merged into an average-query-expansion query (0: off)")
    seeds: str = _f("retrieval", "seed finding: retrieval (sampled queries), minhash (large vocabularies), or both")
    seed_fraction: float = _f(1.0, "fraction of the images (random order) tried as seed queries")
    minhash_sketches: int = _f(64, "min-hash sketches per image")
    minhash_size: int = _f(3, "min-hashes per sketch (a collision needs all of them equal)")
    minhash_max_bucket: int = _f(10, "sketch buckets with more images are ignored (frequent words)")


@dataclass
class SfmVerifyConfig:
    backend: str = _f("bowretrieval", "bowretrieval (package fast spatial matching) or opencv (USAC homography)")
    threshold: float = _f(10.0, "homography reprojection threshold, pixels per 1024 px of image side")
    min_inliers: int = _f(30, "inliers for a retrieval result to count as verified")
    max_per_word: int = _f(4, "skip visual words more frequent than this in an image")
    weak_inliers: int = _f(20, "clusters linked by pairs with this many inliers are matched together")


@dataclass
class SfmColmapConfig:
    max_ratio: float = _f(0.8, "Lowe ratio of COLMAP's descriptor matcher")
    min_inliers: int = _f(15, "epipolar inliers for a matched pair to enter the scene graph")
    max_error: float = _f(4.0, "epipolar RANSAC threshold in pixels")
    init_min_num_inliers: int = _f(30, "inliers of the initial image pair (COLMAP default 100: too strict)")
    init_min_tri_angle: float = _f(4.0, "triangulation angle of the initial pair in degrees (default 16)")
    abs_pose_min_num_inliers: int = _f(20, "2D-3D inliers to register an image")
    timeout: float = _f(3600.0, "seconds before a matching or mapping child process is killed")
    max_dense: int = _f(150, "clusters above this size are densified with retrieval neighbours only")
    dense_neighbours: int = _f(30, "neighbours per image in large clusters")


@dataclass
class MineConfig:
    features: SfmFeaturesConfig = field(default_factory=SfmFeaturesConfig, metadata={"help": "local features"})
    retrieval: SfmRetrievalConfig = field(default_factory=SfmRetrievalConfig, metadata={"help": "index and seeds"})
    verify: SfmVerifyConfig = field(default_factory=SfmVerifyConfig, metadata={"help": "spatial verification"})
    colmap: SfmColmapConfig = field(default_factory=SfmColmapConfig, metadata={"help": "matching and mapping"})
    min_model_size: int = _f(20, "drop components and models with fewer images (Radenovic et al.: 20)")
    max_overlap: float = _f(0.5, "drop a model when this fraction of its images is in a larger model")
    extend: bool = _f(True, "re-query registered images to extend models, then map again")
    seed: int = _f(0, "random seed (sampling, RANSAC, COLMAP)")
    threads: int = _f(2, "threads of COLMAP and the index")


def load_mine_config(path=None) -> MineConfig:
    return load_config(path, MineConfig) if path else MineConfig()
