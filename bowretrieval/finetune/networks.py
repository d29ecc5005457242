"""Retrieval networks: a fully convolutional backbone -> GeM pooling -> L2 -> optional FC whitening -> L2
(Radenovic, Tolias & Chum, "Fine-tuning CNN image retrieval with no human annotation", TPAMI 2018).

Backbones are defined here with torchvision's parameter names (ResNet-18/34/50/101 and narrower
variants, VGG-style FCNs, MobileNetV2), so weights files written by torchvision, timm (ResNets) or
cirtorch load by path without torchvision. A network is fully described by a plain dictionary
(``NetworkSpec.to_dict()``) that checkpoints carry, so ``build_network(spec)`` rebuilds it.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import DataError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

RESNETS = {  # name -> (block, layers)
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
    "resnet101": ("bottleneck", [3, 4, 23, 3]),
    "resnet_tiny": ("basic", [1, 1, 1, 1]),
}
VGGS = {  # torchvision's VGG16 configuration and a small VGG-style FCN; the last max-pool is dropped
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg_small": [64, "M", 128, "M", 256, 256, "M", 512, 512],
}
ARCHS = tuple(RESNETS) + tuple(VGGS) + ("mobilenet_v2",)


@dataclass
class NetworkSpec:
    """Everything needed to rebuild a network (stored in checkpoints)."""

    arch: str = "resnet18"
    width: int = 64  # channels of the first stage (64 = torchvision; 8 or 16 for tests)
    p: float = 3.0  # GeM initial p
    whitening: int = 0  # output dimension of the learned FC whitening layer (0: none)
    mean: list = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list = field(default_factory=lambda: list(IMAGENET_STD))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NetworkSpec":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


# -- pooling and normalisation -----------------------------------------------------------------
class GeM(nn.Module):
    """Generalized-mean pooling f_k = (mean_x x_k^p)^(1/p) with a learnable p (init 3, eps 1e-6)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x):
        # pooled in float32 even under autocast: x^p of half-precision activations overflows
        x = x.float().clamp(min=self.eps).pow(self.p)
        return x.mean(dim=(-2, -1)).pow(1.0 / self.p)

    def extra_repr(self):
        return f"p={float(self.p.detach()[0]):.4f}, eps={self.eps}"


def l2n(x, eps: float = 1e-6):
    return x / (x.norm(p=2, dim=-1, keepdim=True) + eps)


# -- ResNet ------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + idt)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride on the 3x3 (torchvision v1.5)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + idt)


class ResNetFeatures(nn.Module):
    """torchvision's ResNet without avgpool/fc (same parameter names: conv1, bn1, layer1..4)."""

    def __init__(self, block: str, layers, width: int = 64):
        super().__init__()
        blk = BasicBlock if block == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = width
        for i, n in enumerate(layers):
            planes, stride = width * 2 ** i, 1 if i == 0 else 2
            down = None
            if stride != 1 or inplanes != planes * blk.expansion:
                down = nn.Sequential(nn.Conv2d(inplanes, planes * blk.expansion, 1, stride, bias=False),
                                     nn.BatchNorm2d(planes * blk.expansion))
            mods = [blk(inplanes, planes, stride, down)]
            inplanes = planes * blk.expansion
            mods += [blk(inplanes, planes) for _ in range(1, n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*mods))
        self.out_channels = inplanes
        self.n_layers = len(layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.n_layers):
            x = getattr(self, f"layer{i + 1}")(x)
        return x


# cirtorch stores a ResNet as nn.Sequential(conv1, bn1, relu, maxpool, layer1..4): position -> name
_CIRTORCH_RESNET = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


# -- VGG-style FCN -----------------------------------------------------------------------------
def vgg_features(cfg, width: int = 64) -> nn.Sequential:
    """torchvision's ``vgg.features`` layout (conv, relu, ..., max-pool) with channels scaled by width/64."""
    layers, c = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            out = max(1, v * width // 64)
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(inplace=True)]
            c = out
    seq = nn.Sequential(*layers)
    seq.out_channels = c
    return seq


# -- MobileNetV2 (torchvision layout, for its offline ImageNet weights) --------------------------
def _make_divisible(v, divisor=8):
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin, cout, kernel=3, stride=1, groups=1):
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = int(round(cin * expand))
        self.use_res = stride == 1 and cin == cout
        layers = [] if expand == 1 else [ConvBNReLU(cin, hidden, 1)]
        layers += [ConvBNReLU(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


def mobilenet_v2_features(width: int = 64) -> nn.Sequential:
    """torchvision's ``mobilenet_v2().features``; width 64 is the standard network (multiplier width/64)."""
    mult = width / 64.0
    setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
               [6, 320, 1, 1]]
    cin = _make_divisible(32 * mult)
    last = _make_divisible(1280 * max(1.0, mult))
    feats = [ConvBNReLU(3, cin, stride=2)]
    for t, c, n, s in setting:
        cout = _make_divisible(c * mult)
        for i in range(n):
            feats.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
            cin = cout
    feats.append(ConvBNReLU(cin, last, 1))
    seq = nn.Sequential(*feats)
    seq.out_channels = last
    return seq


def make_backbone(spec: NetworkSpec) -> nn.Module:
    if spec.arch in RESNETS:
        block, layers = RESNETS[spec.arch]
        return ResNetFeatures(block, layers, spec.width)
    if spec.arch in VGGS:
        return vgg_features(VGGS[spec.arch], spec.width)
    if spec.arch == "mobilenet_v2":
        return mobilenet_v2_features(spec.width)
    raise DataError(f"unknown network architecture {spec.arch!r}; choose one of {', '.join(ARCHS)}")


# -- the retrieval network -------------------------------------------------------------------------
class RetrievalNet(nn.Module):
    """features -> GeM -> L2 [-> FC whitening -> L2]; ``forward`` maps (B, 3, H, W) to (B, D)."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        self.spec = spec
        self.features = make_backbone(spec)
        self.pool = GeM(spec.p)
        c = self.features.out_channels
        self.whiten = nn.Linear(c, spec.whitening, bias=True) if spec.whitening else None
        self.dim = spec.whitening or c
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x):
        """uint8-scale RGB (0..255) -> the input the backbone's weights expect."""
        return (x / 255.0 - self.mean) / self.std

    def forward(self, x):
        v = l2n(self.pool(self.features(self.normalize(x))))
        if self.whiten is not None:
            v = l2n(self.whiten(v.to(self.whiten.weight.dtype)).float())
        return v

    def describe(self) -> dict:
        return self.spec.to_dict()


def build_network(spec) -> RetrievalNet:
    """A network from a ``NetworkSpec`` or its dictionary (as stored in checkpoints)."""
    if isinstance(spec, dict):
        spec = NetworkSpec.from_dict(spec)
    return RetrievalNet(spec)


# -- loading weights files ---------------------------------------------------------------------
_HEAD_PREFIXES = ("fc.", "classifier.", "head.", "pool.", "whiten.", "lwhiten.", "meta")


def _unwrap(obj, path):
    for key in ("state_dict", "model", "net", "network"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    return obj


def _canonical_keys(sd: dict, arch: str) -> dict:
    """Strip wrapper prefixes and drop classifier/pooling heads; map cirtorch's positional ResNet names."""
    out = {}
    for k, v in sd.items():
        for pre in ("module.", "backbone.", "model.", "body."):
            if k.startswith(pre):
                k = k[len(pre):]
        if k.startswith(_HEAD_PREFIXES):
            continue
        if k.startswith("features."):
            k = k[len("features."):]
        if arch in RESNETS:
            head, _, rest = k.partition(".")
            if head in _CIRTORCH_RESNET:
                k = _CIRTORCH_RESNET[head] + "." + rest
        out[k] = v
    return out


def load_backbone_weights(net: RetrievalNet, path) -> dict:
    """Load a local weights file (torchvision / timm / cirtorch key names) into ``net.features``.

    Every backbone parameter and buffer must be present with the same shape; otherwise a DataError
    names the mismatching layers. Returns {'loaded': n, 'ignored': [head keys dropped]}.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: weights file not found (weights are only read from a local file)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as a PyTorch weights file ({type(exc).__name__}: {exc})") from exc
    sd = _unwrap(raw, path)
    arch = net.spec.arch
    mapped = _canonical_keys(sd, arch)
    own = net.features.state_dict()
    missing = [k for k in own if k not in mapped]
    unexpected = [k for k in mapped if k not in own]
    shape = [k for k in own if k in mapped and tuple(mapped[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if shape:
            parts.append("shape mismatch: " + "; ".join(
                f"{k} file {tuple(mapped[k].shape)} vs network {tuple(own[k].shape)}" for k in shape[:6])
                + (f" (+{len(shape) - 6} more)" if len(shape) > 6 else ""))
        if missing:
            parts.append(f"missing in file: {', '.join(missing[:6])}" + (f" (+{len(missing) - 6} more)" if len(missing) > 6 else ""))
        if unexpected:
            parts.append(f"not in network: {', '.join(unexpected[:6])}"
                         + (f" (+{len(unexpected) - 6} more)" if len(unexpected) > 6 else ""))
        raise DataError(f"{path}: weights do not fit network arch={arch} width={net.spec.width}: "
                        + " | ".join(parts) + ". Pick the architecture the file was trained for (--arch).")
    net.features.load_state_dict({k: mapped[k] for k in own}, strict=True)
    return {"loaded": len(own), "ignored": sorted(set(mapped) - set(own))}


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def gem_combine(vectors, p: float):
    """Generalized mean of several L2-normalised descriptors (multi-scale combination), then L2.

    Descriptors of a network with an FC whitening layer have negative entries: use p = 1 for those
    (as cirtorch does)."""
    if p == 1.0:
        return l2n(torch.stack(list(vectors)).mean(0))
    v = torch.stack([x.clamp(min=1e-6).pow(p) for x in vectors]).mean(0).pow(1.0 / p)
    return l2n(v)


__all__ = ["NetworkSpec", "RetrievalNet", "GeM", "build_network", "load_backbone_weights", "l2n",
           "gem_combine", "ARCHS", "count_parameters"]
