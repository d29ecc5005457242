"""Fine-tuning configuration (``configs/finetune.yaml``), mapped 1:1 onto these dataclasses; torch-free."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import _f


@dataclass
class NetworkConfig:
    arch: str = _f("resnet18", "backbone: resnet18/34/50/101, resnet_tiny, vgg16, vgg_small, mobilenet_v2")
    width: int = _f(64, "channels of the first stage (64 = the standard network; 8-16 for quick tests)")
    weights: str = _f("", "local weights file for the backbone (torchvision/timm/cirtorch names); empty: random")
    p: float = _f(3.0, "GeM initial p")
    whitening: int = _f(0, "output dimension of a learned FC whitening layer (0: none)")


@dataclass
class TrainConfig:
    loss: str = _f("contrastive", "contrastive or triplet")
    margin: float = _f(0.7, "contrastive margin tau (0.7-0.85) or triplet margin")
    epochs: int = _f(10, "training epochs")
    queries_per_epoch: int = _f(2000, "tuples per epoch (random training queries, all when fewer)")
    negatives: int = _f(5, "hard negatives per tuple")
    pool_size: int = _f(20000, "negative-pool images sampled per epoch for mining (all when fewer)")
    mining_refreshes: int = _f(1, "pool descriptors recomputed (and negatives re-mined) this many times per epoch")
    positive: str = _f("fixed", "positive per query: fixed (the exported m3 choice) or random (any valid positive)")
    lr: float = _f(1e-6, "Adam learning rate of the network (1e-6..5e-7 for pretrained nets)")
    lr_p: float = _f(1e-5, "Adam learning rate of GeM's p (no weight decay)")
    weight_decay: float = _f(1e-6, "Adam weight decay (not on p)")
    lr_decay: float = _f(0.01, "exponential decay: lr_epoch = lr * exp(-lr_decay * epoch)")
    accumulate: int = _f(5, "tuples per optimiser step (gradient accumulation)")
    image_size: int = _f(362, "training images are downscaled to this longest side")
    freeze_bn: bool = _f(True, "keep batch-norm statistics and layers in eval mode while training")
    amp: str = _f("auto", "mixed precision: auto (on with CUDA), on, off")
    device: str = _f("auto", "auto (CUDA when available, else CPU), cpu, cuda, cuda:N")
    seed: int = _f(0, "random seed (query sampling, pool sampling, initial weights)")
    threads: int = _f(0, "torch CPU threads (0: leave torch's default)")
    cache_images: bool = _f(True, "keep decoded, resized training images in memory")
    checkpoint_every: int = _f(1, "save a checkpoint every this many epochs")


@dataclass
class ExtractConfig:
    image_size: int = _f(1024, "test images are downscaled to this longest side")
    scales: list = _f([1.0], "scales of the multi-scale descriptor, e.g. [1, 0.7071, 0.5]")


@dataclass
class PostConfig:
    whitening: str = _f("lw", "post-processing whitening: none, lw (learned from training pairs), pcaw")
    dim: int = _f(0, "keep this many whitened dimensions (0: all)")
    shrinkage: float = _f(0.1, "Lw covariance shrinkage (0: exact closed form; needs more pairs than dims)")
    qe_k: int = _f(0, "alpha-QE: top-k database vectors (0: no query expansion)")
    qe_alpha: float = _f(3.0, "alpha-QE exponent")


@dataclass
class FinetuneConfig:
    network: NetworkConfig = field(default_factory=NetworkConfig, metadata={"help": "network"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "training"})
    extract: ExtractConfig = field(default_factory=ExtractConfig, metadata={"help": "descriptor extraction"})
    post: PostConfig = field(default_factory=PostConfig, metadata={"help": "whitening and query expansion"})
