"""Fine-tuning on mined tuples (Radenovic, Tolias & Chum, TPAMI 2018), with the same code path on CPU and CUDA.

Each epoch: sample training queries and a negative pool; describe the pool with the current network
(cached, refreshed ``mining_refreshes`` times per epoch); for each query take the hardest pool images
with at most one image per model (and none from the query's model) as negatives; then train on tuples
(query, positive, negatives) with Adam, a separate learning rate for GeM's p, exponential decay
exp(-lr_decay * epoch), gradient accumulation over tuples and optional mixed precision.

A checkpoint (``<workdir>/checkpoint.pt``) is written atomically after good epochs only; it carries the
network description, so ``load_network`` rebuilds the network without the config, and everything
needed to resume. A NaN/Inf loss stops training and leaves the last good checkpoint untouched.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import to_dict
from ..errors import BowRetrievalError, ConfigError, DataError
from .config import FinetuneConfig
from .losses import LOSSES, tuple_loss
from .networks import NetworkSpec, RetrievalNet, build_network, load_backbone_weights
from .tuples import TupleSet, read_rgb

CHECKPOINT_FORMAT = "bowretrieval.finetune.checkpoint/1"


class TrainingDiverged(BowRetrievalError):
    """The loss or the weights became NaN/Inf; training stopped before saving anything."""


# -- devices and images ----------------------------------------------------------------------------
def select_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda'/'cuda:N' without CUDA is an error, not a fallback."""
    name = (name or "auto").strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available to this torch "
                              f"({torch.__version__}); use --device cpu or --device auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")


def amp_settings(mode: str, device: torch.device):
    """(enabled, dtype): float16 with loss scaling on CUDA, bfloat16 on CPU."""
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"train.amp must be auto, on or off, got {mode!r}")
    on = mode == "on" or (mode == "auto" and device.type == "cuda")
    return on, (torch.float16 if device.type == "cuda" else torch.bfloat16)


def to_tensor(img: np.ndarray, device) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> float (1, 3, H, W) on ``device`` (0..255; the network normalises)."""
    t = torch.from_numpy(np.ascontiguousarray(img)).to(device, non_blocking=True)
    return t.permute(2, 0, 1).unsqueeze(0).float()


class ImageCache:
    """Decoded, resized training images, kept in memory when ``enabled``."""

    def __init__(self, max_side: int, enabled: bool = True):
        self.max_side = max_side
        self.enabled = enabled
        self._d = {}

    def __call__(self, path) -> np.ndarray:
        img = self._d.get(path)
        if img is None:
            img = read_rgb(path, self.max_side)
            if self.enabled:
                self._d[path] = img
        return img


@torch.no_grad()
def describe(net: RetrievalNet, images, device, amp=(False, torch.float32), progress=False, desc="describe"):
    """Descriptors (N, D) float32 tensor on ``device`` of uint8 RGB images, one forward per image, eval mode."""
    was = net.training
    net.eval()
    out = []
    for img in tqdm(images, desc=desc, unit="img", disable=not progress, leave=False):
        with torch.autocast(device.type, dtype=amp[1], enabled=amp[0]):
            out.append(net(to_tensor(img, device)).float())
    net.train(was)
    return torch.cat(out) if out else torch.zeros((0, net.dim), device=device)


# -- mining ------------------------------------------------------------------------------------------
def mine_negatives(qdesc, pool_desc, pool_idx, cluster, qidxs, n_neg: int) -> list:
    """Hardest negatives per query, at most one per model (cluster), none from the query's model.

    qdesc (Q, D), pool_desc (P, D) tensors; pool_idx (P,) image indices; cluster per image (-1: in no
    model, each such image counts as its own model). Returns Q lists of image indices.
    """
    scores = (pool_desc @ qdesc.T).float().cpu().numpy()  # (P, Q)
    order = np.argsort(-scores, axis=0, kind="stable")
    out = []
    for j, q in enumerate(qidxs):
        qc = cluster[q]
        used, negs = set(), []
        for r in order[:, j]:
            img = int(pool_idx[r])
            c = int(cluster[img])
            if img == q or (c == qc and c != -1):
                continue
            key = c if c != -1 else ("img", img)
            if key in used:
                continue
            used.add(key)
            negs.append(img)
            if len(negs) == n_neg:
                break
        out.append(negs)
    return out


# -- checkpoints -----------------------------------------------------------------------------------
def save_checkpoint(path, state: dict):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_checkpoint(path, map_location="cpu") -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: checkpoint not found")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: not a bowretrieval fine-tuning checkpoint (format {CHECKPOINT_FORMAT})")
    return ck


def load_network(path, device="cpu") -> RetrievalNet:
    """Rebuild the network a checkpoint describes and load its weights (eval mode)."""
    ck = read_checkpoint(path)
    net = build_network(ck["network"])
    net.load_state_dict(ck["state_dict"])
    return net.to(device).eval()


def _finite_params(net) -> bool:
    return all(torch.isfinite(p).all() for p in net.parameters())


# -- the trainer -------------------------------------------------------------------------------------
class Trainer:
    """Train a retrieval network on a TupleSet; ``fit()`` runs the remaining epochs.

    ``workdir`` receives checkpoint.pt (latest good epoch) and config.yaml. With ``resume`` an existing
    checkpoint there is continued (network description, weights, optimiser, epoch, history, RNG).
    """

    def __init__(self, cfg: FinetuneConfig, tuples: TupleSet, workdir, resume=True, log=print, progress=True):
        self.cfg, self.tuples, self.workdir, self.log, self.progress = cfg, tuples, os.fspath(workdir), log, progress
        t = cfg.train
        if t.loss not in LOSSES:
            raise ConfigError(f"train.loss must be one of {', '.join(LOSSES)}, got {t.loss!r}")
        if t.positive not in ("fixed", "random"):
            raise ConfigError(f"train.positive must be fixed or random, got {t.positive!r}")
        if t.accumulate < 1 or t.negatives < 1 or t.mining_refreshes < 1:
            raise ConfigError("train.accumulate, train.negatives and train.mining_refreshes must be >= 1")
        self.split = tuples.split("train")
        self._check_pool()
        if t.threads:
            torch.set_num_threads(t.threads)
        self.device = select_device(t.device)
        self.amp = amp_settings(t.amp, self.device)
        os.makedirs(self.workdir, exist_ok=True)
        self.ckpt_path = os.path.join(self.workdir, "checkpoint.pt")
        self.epoch, self.history = 0, []
        ck = read_checkpoint(self.ckpt_path) if resume and os.path.exists(self.ckpt_path) else None
        torch.manual_seed(t.seed)
        n = cfg.network
        spec = NetworkSpec.from_dict(ck["network"]) if ck else NetworkSpec(n.arch, n.width, n.p, n.whitening)
        self.net = build_network(spec)
        if ck is None and n.weights:
            info = load_backbone_weights(self.net, n.weights)
            log(f"loaded {info['loaded']} backbone tensors from {n.weights}")
        self.net.to(self.device)
        self.optimizer = torch.optim.Adam([
            {"params": [p for name, p in self.net.named_parameters() if not name.startswith("pool.")],
             "lr": t.lr, "weight_decay": t.weight_decay, "base_lr": t.lr},
            {"params": list(self.net.pool.parameters()), "lr": t.lr_p, "weight_decay": 0.0, "base_lr": t.lr_p},
        ])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp[0] and self.device.type == "cuda")
        if ck:
            self.net.load_state_dict(ck["state_dict"])
            self.optimizer.load_state_dict(ck["optimizer"])
            for g, base in zip(self.optimizer.param_groups, (t.lr, t.lr_p)):
                g["base_lr"] = base
            if ck.get("scaler"):
                self.scaler.load_state_dict(ck["scaler"])
            self.epoch, self.history = int(ck["epoch"]), list(ck.get("history", []))
            torch.set_rng_state(ck["torch_rng"])
            log(f"resumed {self.ckpt_path} after epoch {self.epoch}")
        self.images = ImageCache(t.image_size, t.cache_images)

    def _check_pool(self):
        s, cl = self.split, self.tuples.cluster
        if len(s.negative_pool) == 0:
            raise DataError(f"{self.tuples.source}: the train negative pool is empty; negatives must come from "
                            "images of other models (export more than one model)")
        pool_models = set(int(c) for c in cl[s.negative_pool])
        has_unclustered = -1 in pool_models
        for q in s.qidxs:
            if not has_unclustered and pool_models <= {int(cl[q])}:
                raise DataError(f"{self.tuples.source}: query image {int(q)} has no possible negative: every "
                                "negative-pool image belongs to its own model; add images of other models")

    # -- one epoch -----------------------------------------------------------------------------------
    def _epoch_tuples(self, rng, qsel, pool):
        """Yield (query, positive, negatives) for ``qsel``, re-mining the pool ``mining_refreshes`` times."""
        t, s, cl = self.cfg.train, self.split, self.tuples.cluster
        chunks = np.array_split(np.arange(len(qsel)), min(t.mining_refreshes, len(qsel)))
        for chunk in chunks:
            pool_desc = describe(self.net, [self.images(self.tuples.paths[i]) for i in pool], self.device,
                                 self.amp, self.progress, "mine: pool")
            qi = s.qidxs[qsel[chunk]]
            qdesc = describe(self.net, [self.images(self.tuples.paths[i]) for i in qi], self.device, self.amp)
            negs = mine_negatives(qdesc, pool_desc, pool, cl, qi, t.negatives)
            for k, j in enumerate(qsel[chunk]):
                pos = int(s.pidxs[j]) if t.positive == "fixed" else int(rng.choice(s.positives[j]))
                yield int(s.qidxs[j]), pos, negs[k]

    def _set_train_mode(self):
        self.net.train()
        if self.cfg.train.freeze_bn:
            for m in self.net.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def train_epoch(self) -> dict:
        t, s = self.cfg.train, self.split
        rng = np.random.default_rng([t.seed, self.epoch])
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * math.exp(-t.lr_decay * self.epoch)
        nq = min(t.queries_per_epoch, len(s.qidxs))
        qsel = rng.permutation(len(s.qidxs))[:nq]
        pool = s.negative_pool if len(s.negative_pool) <= t.pool_size else \
            np.sort(rng.choice(s.negative_pool, t.pool_size, replace=False))
        t0 = time.time()
        n_img, total, done = 0, 0.0, 0
        self.optimizer.zero_grad(set_to_none=True)
        self._set_train_mode()
        bar = tqdm(total=nq, desc=f"epoch {self.epoch + 1}/{t.epochs}", unit="tuple", disable=not self.progress)
        train_time = 0.0
        for q, p, negs in self._epoch_tuples(rng, qsel, pool):
            self._set_train_mode()
            t1 = time.time()
            idx = [q, p] + negs
            with torch.autocast(self.device.type, dtype=self.amp[1], enabled=self.amp[0]):
                out = torch.cat([self.net(to_tensor(self.images(self.tuples.paths[i]), self.device)) for i in idx])
                loss = tuple_loss(t.loss, out.float(), t.margin)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"epoch {self.epoch + 1}, tuple {done + 1}: the loss is {loss.item()}; training stopped "
                    f"without saving; the last good checkpoint {self.ckpt_path} (epoch {self.epoch}) is unchanged. "
                    "Lower train.lr / train.lr_p or set train.amp off.")
            self.scaler.scale(loss).backward()
            done += 1
            if done % t.accumulate == 0 or done == nq:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            train_time += time.time() - t1
            total += float(loss.detach())
            n_img += len(idx)
            bar.update(1)
            bar.set_postfix(loss=f"{total / done:.4f}", p=f"{float(self.net.pool.p.detach()):.3f}")
        bar.close()
        if not _finite_params(self.net):
            raise TrainingDiverged(f"epoch {self.epoch + 1}: the weights became NaN/Inf; training stopped without "
                                   f"saving; the last good checkpoint {self.ckpt_path} (epoch {self.epoch}) is unchanged")
        return {"epoch": self.epoch + 1, "loss": total / max(done, 1), "tuples": done, "p": float(self.net.pool.p.detach()),
                "seconds": time.time() - t0, "train_images_per_s": n_img / max(train_time, 1e-9),
                "lr": self.optimizer.param_groups[0]["lr"]}

    def state(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "network": self.net.describe(),
                "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "history": self.history, "config": to_dict(self.cfg),
                "torch_rng": torch.get_rng_state(), "torch_version": torch.__version__}

    def fit(self) -> list:
        """Run epochs ``epoch+1 .. train.epochs``; returns the history (one dict per epoch)."""
        from ..config import save_config

        save_config(self.cfg, os.path.join(self.workdir, "config.yaml"))
        t = self.cfg.train
        while self.epoch < t.epochs:
            rec = self.train_epoch()
            self.epoch += 1
            self.history.append(rec)
            self.log(f"epoch {rec['epoch']}: loss {rec['loss']:.4f}  p {rec['p']:.3f}  lr {rec['lr']:.2e}  "
                     f"{rec['train_images_per_s']:.1f} train images/s  ({rec['seconds']:.0f} s)")
            if self.epoch % t.checkpoint_every == 0 or self.epoch == t.epochs:
                save_checkpoint(self.ckpt_path, self.state())
        return self.history


def train(cfg: FinetuneConfig, tuples: TupleSet, workdir, resume=True, log=print, progress=True) -> Trainer:
    """Build (or resume) a trainer and run it to ``cfg.train.epochs``."""
    tr = Trainer(cfg, tuples, workdir, resume, log, progress)
    tr.fit()
    return tr
