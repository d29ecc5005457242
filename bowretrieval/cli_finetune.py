"""``bowr finetune train|extract|eval|toydata``: CNN fine-tuning on mined tuples (optional extra [finetune]).

torch is imported only when a finetune command runs, so ``bowr --help`` works without it.
"""
from __future__ import annotations

import argparse
import json
import os

from .errors import ConfigError


def _torch_or_exit():
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConfigError("bowr finetune needs PyTorch: pip install 'bowretrieval[finetune]'") from None


def _load_cfg(args):
    from .config import apply_overrides, load_config
    from .finetune.config import FinetuneConfig

    cfg = load_config(args.config, FinetuneConfig) if args.config else FinetuneConfig()
    apply_overrides(cfg, args.set)
    if getattr(args, "device", None):
        cfg.train.device = args.device
    if getattr(args, "threads", None):
        cfg.train.threads = args.threads
    return cfg


def _common(p):
    p.add_argument("--config", help="YAML config (configs/finetune.yaml); sections network, train, extract, post")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument("--device", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 on a busy 2-core machine)")


def cmd_toydata(args) -> int:
    from .finetune.toydata import write_synthetic_tuples, write_toy_tuples

    w, h = (int(v) for v in args.size.lower().split("x"))
    info = (write_synthetic_tuples if args.synthetic else write_toy_tuples)(args.out, args.train, args.val, args.test, args.views, args.distractors,
                            args.queries_per_model, (w, h), args.seed)
    print(f"wrote {info['tuples']} and the held-out ground truth {info['gnd']}")
    return 0


def cmd_train(args) -> int:
    _torch_or_exit()
    from .finetune.train import train
    from .finetune.tuples import load_tuples

    cfg = _load_cfg(args)
    if args.arch:
        cfg.network.arch = args.arch
    if args.weights:
        cfg.network.weights = args.weights
    if args.epochs:
        cfg.train.epochs = args.epochs
    tuples = load_tuples(args.tuples, args.image_root, args.ext)
    tr = train(cfg, tuples, args.workdir, resume=not args.restart)
    print(f"checkpoint: {tr.ckpt_path} (epoch {tr.epoch})")
    return 0


def _network(args, device):
    from .finetune.networks import NetworkSpec, build_network, load_backbone_weights
    from .finetune.train import load_network

    if args.checkpoint:
        return load_network(args.checkpoint, device)
    if not args.arch:
        raise ConfigError("give --checkpoint, or --arch (and --weights) to use an untrained network")
    net = build_network(NetworkSpec(args.arch, args.width))
    if args.weights:
        load_backbone_weights(net, args.weights)
    return net.to(device).eval()


def _scales(args, cfg):
    from .finetune.retrieval import MULTISCALE

    return list(MULTISCALE) if args.multiscale else list(cfg.extract.scales)


def cmd_extract(args) -> int:
    _torch_or_exit()
    import numpy as np

    from .finetune.retrieval import extract_vectors
    from .finetune.train import select_device
    from .finetune.whiten import load_whitening
    from .imageio import list_images

    cfg = _load_cfg(args)
    device = select_device(cfg.train.device)
    net = _network(args, device)
    paths = list_images(args.images)
    failed = {}
    X = extract_vectors(net, paths, device, args.image_size or cfg.extract.image_size, _scales(args, cfg),
                        cfg.train.amp, failed=failed)
    if args.whitening:
        X = load_whitening(args.whitening).transform(X)
    ok = np.array([p not in failed for p in paths])
    from .npzio import save_npz_atomic

    save_npz_atomic(args.out, descriptors=X[ok],
                    names=np.array([os.path.basename(p) for p, k in zip(paths, ok) if k]))
    print(f"{args.out}: {int(ok.sum())} descriptors of dimension {X.shape[1]}")
    for p, why in sorted(failed.items()):
        print(f"  skipped {p}: {why}")
    return 0


def cmd_eval(args) -> int:
    _torch_or_exit()
    import numpy as np

    from .finetune.retrieval import dataset_vectors, evaluate_vectors, learn_whitening, training_descriptors
    from .finetune.train import select_device
    from .finetune.tuples import load_tuples
    from .finetune.whiten import save_whitening
    from .revisited import RevisitedDataset, format_table

    cfg = _load_cfg(args)
    device = select_device(cfg.train.device)
    net = _network(args, device)
    size = args.image_size or cfg.extract.image_size
    scales = _scales(args, cfg)
    methods = [m.strip() for m in (args.whitening or cfg.post.whitening).split(",") if m.strip()]
    bad = [m for m in methods if m not in ("none", "lw", "pcaw")]
    if bad:
        raise ConfigError(f"--whitening: unknown method(s) {bad}; use none, lw, pcaw (comma-separated)")
    whiteners = {"none": None}
    if any(m != "none" for m in methods):
        if not args.tuples:
            raise ConfigError("learned whitening needs the training tuples: give --tuples DIR")
        tuples = load_tuples(args.tuples, args.image_root, args.ext)
        Xw, qpos, ppos = training_descriptors(net, tuples, device, size, scales, cfg.train.amp)
        for m in methods:
            if m != "none":
                whiteners[m] = learn_whitening(m, Xw, qpos, ppos, cfg.post.dim, cfg.post.shrinkage)
                if args.save_whitening:
                    os.makedirs(args.save_whitening, exist_ok=True)
                    save_whitening(os.path.join(args.save_whitening, f"whiten-{m}.npz"), whiteners[m])
    ds = RevisitedDataset(args.dataset, args.gnd)
    X, Q, info = dataset_vectors(net, ds, device, size, scales, cfg.train.amp)
    qe_k = cfg.post.qe_k if args.qe_k is None else args.qe_k
    rows, out = [], {"dataset": ds.name, "gnd_file": ds.gnd_file, "image_size": size, "scales": scales,
                     "extract_images_per_s": info["extract_images_per_s"], "failed": info["failed"], "results": {}}
    for m in methods:
        for k in ([0, qe_k] if qe_k else [0]):
            name = {"none": "net", "lw": "net+Lw", "pcaw": "net+PCAw"}[m] + (f" +aQE{k}" if k else "")
            r = evaluate_vectors(X, Q, ds.gnd, whiteners[m], k, cfg.post.qe_alpha)
            rows.append((name, r))
            out["results"][name] = {p: r[p] for p in ("easy", "medium", "hard")}
    print(format_table(rows))
    if args.out:
        with open(args.out + ".tmp", "w") as fh:
            json.dump(out, fh, indent=1)
        os.replace(args.out + ".tmp", args.out)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="CNN fine-tuning on mined tuples: train, extract, eval, toydata",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="finetune_cmd")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    t = sub.add_parser("train", help="train a GeM network on tuples (resumes <workdir>/checkpoint.pt)")
    t.add_argument("--tuples", required=True, help="folder with tuples.json (or trainer.pkl), or the file itself")
    t.add_argument("--workdir", required=True, help="where checkpoint.pt and config.yaml go")
    t.add_argument("--image-root", help="image folder (required for a trainer.pkl; overrides tuples.json's)")
    t.add_argument("--ext", default=".jpg", help="image extension appended to trainer.pkl cids")
    t.add_argument("--arch", help="override network.arch")
    t.add_argument("--weights", help="local backbone weights file (torchvision/timm/cirtorch names)")
    t.add_argument("--epochs", type=int, help="override train.epochs")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --workdir")
    _common(t)
    t.set_defaults(func=cmd_train)

    for name, helptext in (("extract", "global descriptors of a folder / .txt list of images into an .npz"),
                           ("eval", "mAP E/M/H on a revisited-format dataset, with Lw / PCAw / alpha-QE")):
        e = sub.add_parser(name, help=helptext)
        e.add_argument("--checkpoint", help="checkpoint.pt written by `bowr finetune train`")
        e.add_argument("--arch", help="without --checkpoint: an untrained network of this architecture")
        e.add_argument("--width", type=int, default=64, help="with --arch: first-stage channels")
        e.add_argument("--weights", help="with --arch: local backbone weights file")
        e.add_argument("--image-size", type=int, help="longest side at test time (default extract.image_size)")
        e.add_argument("--multiscale", action="store_true", help="scales {1, 1/sqrt2, 1/2} combined by GeM")
        _common(e)
        if name == "extract":
            e.add_argument("--images", required=True, help="folder of images or .txt list")
            e.add_argument("--out", required=True, help="output .npz (descriptors, names)")
            e.add_argument("--whitening", help="whiten-*.npz saved by `bowr finetune eval --save-whitening`")
            e.set_defaults(func=cmd_extract)
        else:
            e.add_argument("--dataset", required=True, help="revisited-format folder (jpg/, gnd_*.json)")
            e.add_argument("--gnd", help="ground-truth file in the folder (e.g. gnd_landmarks-dev-crop.json)")
            e.add_argument("--tuples", help="training tuples to learn Lw / PCAw from")
            e.add_argument("--image-root", help="image folder for a trainer.pkl")
            e.add_argument("--ext", default=".jpg", help="image extension for trainer.pkl cids")
            e.add_argument("--whitening", help="comma-separated: none,lw,pcaw (default post.whitening)")
            e.add_argument("--qe-k", type=int, help="alpha-QE top-k (0: off; default post.qe_k)")
            e.add_argument("--save-whitening", metavar="DIR", help="write the learned whiten-<method>.npz here")
            e.add_argument("--out", help="write the results as JSON")
            e.set_defaults(func=cmd_eval)

    g = sub.add_parser("toydata", help="write generated tuples (planar textures, or --synthetic 3D landmarks) for tests and demos")
    g.add_argument("out", help="output folder (jpg/, tuples.json, gnd_toy.json)")
    g.add_argument("--train", type=int, default=40, help="training landmarks")
    g.add_argument("--val", type=int, default=4, help="validation landmarks")
    g.add_argument("--test", type=int, default=6, help="held-out landmarks in gnd_toy.json")
    g.add_argument("--views", type=int, default=4, help="views per landmark")
    g.add_argument("--distractors", type=int, default=8, help="unrelated images in the held-out database")
    g.add_argument("--queries-per-model", type=int, default=2, help="training queries per landmark")
    g.add_argument("--size", default="96x72", help="image size WxH")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--synthetic", action="store_true",
                   help="render 3D landmarks with bowretrieval.synthetic (>= 64 px) instead of planar textures")
    g.set_defaults(func=cmd_toydata)
