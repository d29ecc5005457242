"""Training tuples on synthetic 3-D models: the positive, negative, query and split rules."""
import json
import pickle

import numpy as np
import pytest

from bowretrieval.sfm.model import Model
from bowretrieval.sfm.tuples import (TupleParams, build_tuples, negatives_for, pair_stats, trainer_layout,
                                     write_tuples)


def synthetic_model(n_cams, seed, radius=10.0, n_points=1500, arc=np.pi, prefix="m", dist=None):
    """Cameras on an arc around a point cloud, looking at its centre; visibility by field of view."""
    rng = np.random.default_rng(seed)
    X = rng.normal(0, 2.0, (n_points, 3))
    names, C, R = [], [], []
    for k in range(n_cams):
        a = arc * k / max(1, n_cams - 1)
        r = radius if dist is None else dist[k]
        c = np.array([r * np.cos(a), r * np.sin(a), rng.normal(0, 0.3)])
        z = -c / np.linalg.norm(c)
        x = np.cross([0, 0, 1.0], z)
        x /= np.linalg.norm(x)
        y = np.cross(z, x)
        names.append(f"{prefix}_{k:03d}.jpg")
        C.append(c)
        R.append(np.stack([x, y, z]))
    C, R = np.array(C), np.array(R)
    focal = np.full(n_cams, 800.0)
    indptr, obs, depth = [0], [], []
    for k in range(n_cams):
        Xc = (X - C[k]) @ R[k].T
        u = focal[k] * Xc[:, :2] / Xc[:, 2:3]
        # a point is seen when it projects into a 1000 x 700 image and faces the camera side
        vis = (Xc[:, 2] > 0) & (np.abs(u[:, 0]) < 500) & (np.abs(u[:, 1]) < 350) & ((X - C[k]) @ (-C[k]) > -12)
        facing = np.nonzero(vis & (X @ C[k] / np.linalg.norm(C[k]) > -0.5))[0]
        obs.append(facing)
        depth.append(Xc[facing, 2])
        indptr.append(indptr[-1] + len(facing))
    return Model("synthetic", names, C, R, focal, X, np.array(indptr), np.concatenate(obs), np.concatenate(depth))


@pytest.fixture(scope="module")
def models():
    return [synthetic_model(40, 0, prefix="a"), synthetic_model(60, 1, prefix="b"),
            synthetic_model(25, 2, prefix="c"), synthetic_model(320, 3, prefix="d", arc=2 * np.pi)]


@pytest.fixture(scope="module")
def tuples(models):
    return build_tuples(models, "/photos", TupleParams(seed=0))


def _locate(models, tuples, g):
    m = models[tuples["cluster"][g]]
    return m, m.names.index(tuples["images"][g])


def test_scale_change_of_a_camera_twice_as_far_is_two():
    m = synthetic_model(2, 5, arc=0.0, dist=[10.0, 20.0])
    n, overlap, scale = pair_stats(m, 0, 1)
    assert n > 100
    assert scale == pytest.approx(2.0, rel=0.15)
    assert pair_stats(m, 1, 0)[2] == pytest.approx(scale, rel=1e-9)


def test_every_exported_positive_shares_20_percent_and_scale_change_at_most_1_5(models, tuples):
    checked = 0
    for split in ("train", "val"):
        s = tuples[split]
        for q, p, p2, pos in zip(s["qidxs"], s["pidxs"], s["pidxs_m2"], s["positives"]):
            mq, iq = _locate(models, tuples, q)
            assert p in pos and p2 in pos
            for g in pos:
                mp, ip = _locate(models, tuples, g)
                assert mp is mq and ip != iq
                _, overlap, scale = pair_stats(mq, iq, ip)
                assert overlap >= 0.2 and scale <= 1.5
                checked += 1
    assert checked > 50


def test_m2_is_the_valid_positive_with_most_shared_points(models, tuples):
    s = tuples["train"]
    for q, p2, pos in zip(s["qidxs"], s["pidxs_m2"], s["positives"]):
        m, iq = _locate(models, tuples, q)
        counts = [pair_stats(m, iq, _locate(models, tuples, g)[1])[0] for g in pos]
        assert pair_stats(m, iq, _locate(models, tuples, p2)[1])[0] == max(counts)


def test_positive_pool_is_limited_to_the_100_nearest_cameras(models):
    big = models[3]
    t = build_tuples([big], "/photos", TupleParams(seed=0, val_fraction=0))
    for q, pos in zip(t["train"]["qidxs"], t["train"]["positives"]):
        d = np.linalg.norm(big.C - big.C[q], axis=1)
        d[q] = np.inf
        hundredth = np.sort(d)[99]
        assert all(d[p] <= hundredth for p in pos)


def test_queries_per_model_are_ten_percent_capped_at_30(models, tuples):
    per = {}
    for split in ("train", "val"):
        for q in tuples[split]["qidxs"]:
            per[tuples["cluster"][q]] = per.get(tuples["cluster"][q], 0) + 1
    assert per == {0: 4, 1: 6, 2: 2, 3: 30}


def test_negatives_never_come_from_the_query_model_and_at_most_one_per_model(tuples):
    s = tuples["train"]
    cl = np.array(tuples["cluster"])
    rng = np.random.default_rng(0)
    for q in s["qidxs"]:
        neg = negatives_for(cl, s["negative_pool"], q, 5, rng)
        assert neg, "every train query needs negatives"
        assert all(cl[n] != cl[q] for n in neg)
        assert len({cl[n] for n in neg}) == len(neg)


def test_split_is_by_model_and_indices_are_consistent(tuples):
    n = len(tuples["images"])
    assert len(tuples["cluster"]) == n and len(set(tuples["images"])) == n
    models_of = {sp: {tuples["cluster"][g] for g in tuples[sp]["negative_pool"]} for sp in ("train", "val")}
    assert models_of["train"] and models_of["val"] and not (models_of["train"] & models_of["val"])
    for sp in ("train", "val"):
        s = tuples[sp]
        assert len(s["qidxs"]) == len(s["pidxs"]) == len(s["positives"]) == len(s["pidxs_m2"])
        for q, p in zip(s["qidxs"], s["pidxs"]):
            assert 0 <= q < n and 0 <= p < n
            assert tuples["cluster"][q] == tuples["cluster"][p] and tuples["cluster"][q] in models_of[sp]


def test_trainer_pickle_loads_with_the_cirtorch_layout(tuples, tmp_path):
    paths = write_tuples(tuples, tmp_path)
    with open(paths["pkl"], "rb") as fh:
        db = pickle.load(fh)
    assert set(db) == {"train", "val"}
    for sp in ("train", "val"):
        d = db[sp]
        assert set(d) == {"cids", "cluster", "qidxs", "pidxs"}
        assert len(d["cids"]) == len(d["cluster"])
        for q, p in zip(d["qidxs"], d["pidxs"]):
            assert d["cluster"][q] == d["cluster"][p]
            assert not d["cids"][q].endswith(".jpg")
        assert [tuples["images"][g][:-4] for g in tuples[sp]["qidxs"]] == [d["cids"][q] for q in d["qidxs"]]
    with open(paths["json"]) as fh:
        assert json.load(fh)["format"] == "bowretrieval.tuples/1"
    assert trainer_layout(tuples) == db


def test_exclusion_list_drops_models_or_images(models):
    t = build_tuples(models, "/photos", TupleParams(seed=0), exclude={"b_010.jpg"})
    assert not any(n.startswith("b_") for n in t["images"])
    assert t["params"]["excluded_models"] == [1]
    t = build_tuples(models, "/photos", TupleParams(seed=0, exclude_mode="images"), exclude={"b_010"})
    assert "b_010.jpg" not in t["images"] and "b_011.jpg" in t["images"]
