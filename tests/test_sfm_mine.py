"""Mining: graph helpers, min-hash, verification, bad input, and a small real reconstruction."""
import json
import os
import shutil

import cv2
import numpy as np
import pytest

from bowretrieval.errors import ConfigError, DataError
from bowretrieval.sfm.config import MineConfig
from bowretrieval.sfm.mine import Miner, connected_components, mine
from bowretrieval.sfm.minhash import minhash_pairs
from bowretrieval.sfm.verify import HomographyVerifier, word_correspondences


def test_connected_components_largest_first():
    comps = connected_components(7, [(0, 1), (5, 6), (1, 2), (4, 4)])
    assert comps == [[0, 1, 2], [5, 6], [3], [4]]


def test_word_correspondences_pair_every_shared_word_but_bursts():
    c = word_correspondences(np.array([5, 1, 5, 7, 9, 3, 3, 3]), np.array([5, 9, 2, 3, 3]), max_per_word=2)
    assert sorted(map(tuple, c)) == [(0, 0), (2, 0), (4, 1)]


def test_minhash_finds_near_duplicate_sets_only():
    rng = np.random.default_rng(0)
    base = rng.choice(1_000_000, 3000, replace=False)
    sets = [base, np.concatenate([base[:2400], rng.choice(1_000_000, 600)])]
    sets += [rng.choice(1_000_000, 3000, replace=False) for _ in range(30)]
    assert minhash_pairs(sets, sketches=32, size=3, seed=0) == [(0, 1)]


def test_homography_verifier_counts_the_inliers_of_a_true_homography():
    rng = np.random.default_rng(1)
    xy1 = rng.uniform(0, 800, (300, 2))
    H = np.array([[0.9, 0.1, 30], [-0.05, 1.1, 10], [1e-4, 0, 1]])
    p = np.c_[xy1, np.ones(300)] @ H.T
    xy2 = p[:, :2] / p[:, 2:]
    w = rng.permutation(300)
    good = HomographyVerifier(threshold=4, min_inliers=20).inliers(xy1, w, xy2, w)
    assert good >= 290
    assert HomographyVerifier(threshold=4).inliers(xy1, w, rng.uniform(0, 800, (300, 2)), w) < 20


def _texture(seed, w=320, h=240):
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.uniform(0, 255, (h, w)).astype(np.float32), (0, 0), 2.0)
    img = (img - img.min()) / (img.max() - img.min()) * 255
    return img.astype(np.uint8)


def _small_cfg():
    cfg = MineConfig()
    cfg.threads = 1
    cfg.min_model_size = 3
    cfg.features.max_features = 600
    return cfg


def test_empty_folder_says_no_images_found(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(DataError, match="no images found"):
        mine(tmp_path / "photos", tmp_path / "work", _small_cfg(), progress=False)


@pytest.fixture(scope="module")
def bad_collection(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    photos = d / "photos"
    photos.mkdir()
    for k in range(4):
        cv2.imwrite(str(photos / f"tex{k}.png"), _texture(k))
    shutil.copy(photos / "tex0.png", photos / "tex0_copy.png")
    cv2.imwrite(str(photos / "tiny.png"), _texture(9, 12, 10))
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    s = mine(photos, d / "work", _small_cfg(), progress=False, log=lambda *_: None)
    return d, s


def test_unrelated_photos_give_zero_models_and_a_clear_message(bad_collection):
    _, s = bad_collection
    assert s["models"] == []
    assert s["message"].startswith("no models")
    assert "overlapping photos" in s["message"]


def test_duplicates_tiny_and_unreadable_photos_are_reported(bad_collection):
    d, s = bad_collection
    assert s["duplicates"] == {"tex0_copy.png": "tex0.png"}
    assert list(s["failed"]) == ["broken.jpg"]
    assert s["few_features"] == ["tiny.png"]
    assert s["n_usable"] == 4 and s["n_photos"] == 7
    with open(d / "work" / "summary.json") as fh:
        assert json.load(fh)["models"] == []


def test_a_work_folder_refuses_other_settings(bad_collection):
    d, _ = bad_collection
    cfg = _small_cfg()
    cfg.verify.min_inliers = 99
    with pytest.raises(ConfigError, match="other settings"):
        mine(d / "photos", d / "work", cfg, progress=False)


# -- a small real reconstruction --------------------------------------------------------------------
@pytest.fixture(scope="module")
def herzjesu_run(tmp_path_factory):
    from bowretrieval.paths import shared_data_dir

    data = shared_data_dir()
    scene = data / "scenes-dev" / "herzjesu"
    if not (scene / "cameras.json").is_file():
        pytest.skip(f"{scene} not found; set BOWR_SHARED_DATA to the shared data folder")
    d = tmp_path_factory.mktemp("hj")
    photos = d / "photos"
    photos.mkdir()
    for name in sorted(os.listdir(scene / "images"))[4:11]:
        os.symlink(scene / "images" / name, photos / name)
    for name in sorted(os.listdir(data / "landmarks-dev" / "jpg"))[:40:10]:  # 4 distractors
        if name.startswith("distractor__"):
            os.symlink(data / "landmarks-dev" / "jpg" / name, photos / name)
    cfg = _small_cfg()
    cfg.min_model_size = 5
    cfg.threads = 2
    cfg.features.max_features = 1500
    miner = Miner(photos, d / "work", cfg, log=lambda *_: None, progress=False)
    s = miner.run()
    return miner, s, scene


def test_real_photos_give_one_accurate_model_without_distractors(herzjesu_run):
    from bowretrieval.sfm.model import Model, align_to_cameras

    miner, s, scene = herzjesu_run
    assert len(s["models"]) == 1
    m = s["models"][0]
    assert m["registered"] == 7
    assert not any(n.startswith("distractor") for n in m["images"])
    assert m["reprojection_error"] < 2.0
    acc = align_to_cameras(Model.load(m["path"]), scene / "cameras.json")
    assert acc["median_rel"] < 0.01
    assert os.path.isfile(m["picture"])


def test_a_colmap_failure_in_one_component_does_not_stop_the_others(herzjesu_run):
    miner, s, _ = herzjesu_run
    good = s["models"][0]["images"]
    models, failures = miner.map_components([good[:3] + ["no_such_image.jpg"], good], suffix="_failtest")
    assert [f["component"] for f in failures] == [0]
    assert "no_such_image.jpg" in failures[0]["reason"]
    assert [m["component"] for m in models] == [1] and models[0]["registered"] == 7


def test_cli_exports_tuples_from_the_real_model(herzjesu_run, tmp_path):
    import pickle

    from bowretrieval.cli import main

    miner, s, _ = herzjesu_run
    assert main(["sfm", "export-tuples", miner.work, "--out", str(tmp_path / "t"), "--query-fraction", "0.5"]) == 0
    with open(tmp_path / "t" / "tuples.json") as fh:
        t = json.load(fh)
    assert len(t["images"]) == 7 and set(t["cluster"]) == {0}
    assert len(t["train"]["qidxs"]) == 4 and t["val"]["qidxs"] == []
    with open(tmp_path / "t" / "trainer.pkl", "rb") as fh:
        assert len(pickle.load(fh)["train"]["cids"]) == 7


def _save_model(path, names, seed):
    rng = np.random.default_rng(seed)
    n = len(names)
    os.makedirs(path)
    np.savez(os.path.join(path, "model.npz"), names=np.array(names), C=rng.normal(size=(n, 3)),
             R=np.tile(np.eye(3), (n, 1, 1)), focal=np.full(n, 500.0), points=rng.normal(size=(50, 3)),
             obs_indptr=np.zeros(n + 1, np.int64), obs_point=np.zeros(0, np.int64), obs_depth=np.zeros(0))
    return str(path)


def test_a_model_mostly_inside_a_larger_one_is_dropped(tmp_path):
    big = _save_model(tmp_path / "big", [f"{k}.jpg" for k in range(6)], 0)
    small = _save_model(tmp_path / "small", ["3.jpg", "4.jpg", "5.jpg", "9.jpg"], 1)
    other = _save_model(tmp_path / "other", ["7.jpg", "8.jpg", "9.jpg"], 2)
    miner = Miner(tmp_path, tmp_path / "work", _small_cfg(), log=lambda *_: None, progress=False)
    miner.models = [dict(path=p, registered=r, points=50, reprojection_error=0.5)
                    for p, r in ((small, 4), (big, 6), (other, 3))]
    miner.stage_finish(7)
    assert [m["path"] for m in miner.final_models] == [big, other]
    assert [d["path"] for d in miner.dropped] == [small] and miner.dropped[0]["overlap"] == 0.75
    assert all(os.path.isfile(m["picture"]) for m in miner.final_models)


def test_running_again_resumes_without_new_work(herzjesu_run):
    miner, s, _ = herzjesu_run
    again = Miner(miner.photos, miner.work, miner.cfg, log=lambda *_: None, progress=False)
    s2 = again.run()
    assert again.n_verifications == 0
    assert [m["images"] for m in s2["models"]] == [m["images"] for m in s["models"]]


def test_test_set_matches_become_an_exclusion_list(herzjesu_run, tmp_path):
    from bowretrieval.cli import main

    miner, s, scene = herzjesu_run
    test = tmp_path / "test"
    test.mkdir()
    for name in sorted(os.listdir(scene / "images"))[11:13]:  # neighbours of the mined views
        os.symlink(scene / "images" / name, test / name)
    data = scene.parent.parent / "landmarks-dev" / "jpg"
    os.symlink(data / sorted(n for n in os.listdir(data) if n.startswith("distractor__"))[5], test / "d.jpg")
    lst = tmp_path / "exclude.txt"
    assert main(["sfm", "match-test", miner.work, str(test), "--out", str(lst), "--quiet"]) == 0
    names = [ln.strip() for ln in open(lst) if not ln.startswith("#")]
    assert names and set(names) <= set(s["models"][0]["images"])
    assert main(["sfm", "export-tuples", miner.work, "--out", str(tmp_path / "t"), "--exclude", str(lst)]) == 1
    one = tmp_path / "one.txt"  # images mode drops only the listed photo
    one.write_text(names[0] + "\n")
    assert main(["sfm", "export-tuples", miner.work, "--out", str(tmp_path / "t"), "--exclude", str(one),
                 "--exclude-mode", "images"]) == 0
    with open(tmp_path / "t" / "tuples.json") as fh:
        kept = json.load(fh)["images"]
    assert len(kept) == 6 and names[0] not in kept
