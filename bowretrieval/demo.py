"""``bowr demo``: the whole baseline experiment on the embedded generated dataset.

Generates the seeded landmark collection (:mod:`bowretrieval.synthetic`), extracts OpenCV SIFT
features, learns a vocabulary on the independent generated training images, indexes the database,
queries with the cropped queries, evaluates with the revisited protocol, prints the table and draws
a query with its top results and the precision-recall curves.
"""
from __future__ import annotations

import os
import time

from .config import ExperimentConfig
from .revisited import RevisitedDataset, protocol_gnd

# dataset sizes: the default demo, and a tiny one for smoke tests
DEMO_DATA = dict(n_landmarks=6, views_per_landmark=12, queries_per_landmark=3, n_distractors=120, n_train=80,
                 size=(640, 480))
QUICK_DATA = dict(n_landmarks=3, views_per_landmark=5, queries_per_landmark=2, n_distractors=10, n_train=12,
                  size=(320, 240))


def demo_config(quick: bool = False, workers: int = 2) -> ExperimentConfig:
    """The baseline configuration scaled to the small generated dataset."""
    cfg = ExperimentConfig()
    # the foundation baseline (configs/baseline.yaml) is OpenCV SIFT with dominant orientations; the
    # generated cameras roll freely, which up-right Hessian-Affine frames are not meant for
    cfg.extract.extractor = "sift"
    cfg.extract.workers = workers
    cfg.vocab.size = 256 if quick else 2048
    cfg.vocab.iterations = 10
    cfg.search.method = "bow"
    return cfg


def _labels(g, ranking):
    lab = []
    for j in ranking:
        j = int(j)
        lab.append("easy" if j in g["easy"] else "hard" if j in g["hard"] else "junk" if j in g["junk"]
                   else "negative")
    return lab


def run_demo(out_dir="bowr-demo", seed: int = 0, quick: bool = False, workers: int = 2, texture_dir=None,
             progress: bool = True, log=print) -> dict:
    """Run the demo into ``out_dir``; returns the results dictionary with the figure paths added."""
    from . import synthetic
    from .pipeline import run_experiment
    from .visualize import mean_pr_curve, pr_curve_image, ranked_list_image, save_image

    out_dir = os.path.abspath(os.fspath(out_dir))
    t0 = time.time()
    data = synthetic.generate(os.path.join(out_dir, "data"), seed=seed, texture_dir=texture_dir, workers=workers,
                              progress=progress, **(QUICK_DATA if quick else DEMO_DATA))
    t_gen = time.time() - t0
    log(f"dataset: {data.root} (generated in {t_gen:.1f} s)")
    cfg = demo_config(quick, workers)
    res = run_experiment(data.root, data.train_dir, os.path.join(out_dir, "work"), cfg, progress=progress, log=log)

    ds = RevisitedDataset(data.root)
    ranks = res["ranks"]
    med = [a for a in res["per_query"]["medium"]]
    valid = [i for i, a in enumerate(med) if a is not None]
    # show a typical query: the one whose Medium AP is the median
    qi = sorted(valid, key=lambda i: med[i])[len(valid) // 2] if valid else 0
    top = ranks[:11, qi]
    pic = ranked_list_image(ds.image_path(ds.qimlist[qi]), [ds.image_path(ds.imlist[j]) for j in top],
                            _labels(ds.gnd[qi], top), bbox=ds.gnd[qi]["bbx"],
                            title=f"query {ds.qimlist[qi]}: Medium AP {100 * (med[qi] or 0):.1f}")
    res["ranking_image"] = save_image(os.path.join(out_dir, "demo_ranking.png"), pic)
    curves = {p: mean_pr_curve(ranks, protocol_gnd(ds.gnd, p)) for p in ("easy", "medium", "hard")}
    res["pr_image"] = save_image(os.path.join(out_dir, "demo_pr.png"),
                                 pr_curve_image(curves, title=f"mean interpolated precision ({ds.name})"))
    res["generate_s"] = t_gen
    res["total_s"] = time.time() - t0
    log(f"ranked list of a query: {res['ranking_image']}")
    log(f"precision-recall curves: {res['pr_image']}")
    log(f"results with per-query AP: {res['results_file']}")
    log(f"demo finished in {res['total_s']:.0f} s")
    return res

