"""The embedded dataset generator: layout, determinism, camera model, geometric labels."""
import hashlib
import json
import os
import pickle

import cv2
import numpy as np
import pytest

from bowretrieval import synthetic
from bowretrieval.errors import DataError
from bowretrieval.revisited import RevisitedDataset, load_gnd

TINY = dict(seed=3, n_landmarks=2, views_per_landmark=5, queries_per_landmark=2, n_distractors=3, n_train=2,
            size=(240, 180))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("syn") / "ds", **TINY)


def _digest(folder):
    h = hashlib.sha1()
    for f in sorted(os.listdir(folder)):
        with open(os.path.join(folder, f), "rb") as fh:
            h.update(f.encode() + fh.read())
    return h.hexdigest()


def test_layout_is_revisited(tiny):
    ds = RevisitedDataset(tiny.root)
    assert ds.name == "synthetic"
    assert len(ds.imlist) == 2 * 5 + 3
    assert len(ds.qimlist) == 4
    assert all(os.path.exists(p) for p in ds.db_paths())
    assert len(tiny.train_images()) == 2


def test_pickle_and_json_hold_the_same_ground_truth(tiny):
    with open(tiny.gnd_pkl, "rb") as fh:
        pkl = pickle.load(fh)
    with open(tiny.gnd_json) as fh:
        js = json.load(fh)
    assert pkl == js
    load_gnd(tiny.gnd_pkl)  # validates


def test_same_seed_gives_identical_files_with_any_number_of_processes(tiny, tmp_path):
    again = synthetic.generate(tmp_path / "again", workers=2, **TINY)
    assert _digest(again.images_dir) == _digest(tiny.images_dir)
    assert _digest(again.train_dir) == _digest(tiny.train_dir)
    for f in ("gnd_json", "gnd_pkl", "cameras_json", "dataset_json"):
        with open(getattr(again, f), "rb") as a, open(getattr(tiny, f), "rb") as b:
            assert a.read() == b.read()


def test_other_seed_gives_other_images(tiny, tmp_path):
    other = synthetic.generate(tmp_path / "other", **{**TINY, "seed": 4})
    assert _digest(other.images_dir) != _digest(tiny.images_dir)


def test_existing_dataset_is_reused_and_other_params_refused(tiny):
    before = os.path.getmtime(tiny.gnd_json)
    assert synthetic.generate(tiny.root, **TINY).gnd_json == tiny.gnd_json
    assert os.path.getmtime(tiny.gnd_json) == before
    with pytest.raises(DataError, match="other parameters"):
        synthetic.generate(tiny.root, **{**TINY, "n_train": 3})


def test_labels_come_only_from_views_of_the_query_landmark(tiny):
    ds = RevisitedDataset(tiny.root)
    for q, g in zip(ds.qimlist, ds.gnd):
        lm = q.split("__")[0]
        labelled = np.concatenate([g["easy"], g["hard"], g["junk"]])
        assert {ds.imlist[i].split("__")[0] for i in labelled} == {lm}
        assert ds.imlist.index(q) in g["junk"]  # the query photo is junk for itself
        assert len(set(labelled.tolist())) == len(labelled)  # each view gets one label
    assert sum(len(g["easy"]) + len(g["hard"]) for g in ds.gnd) > 0


def test_cameras_json_has_the_scenes_dev_form(tiny):
    with open(tiny.cameras_json) as fh:
        cams = json.load(fh)
    assert len(cams) == 10
    for name, c in cams.items():
        assert os.path.exists(os.path.join(tiny.images_dir, name))
        R = np.array(c["R"])
        assert np.array(c["K"]).shape == (3, 3) and len(c["C"]) == 3
        assert np.allclose(R @ R.T, np.eye(3), atol=1e-9) and np.linalg.det(R) == pytest.approx(1.0)
        w, h = c["size"]
        assert cv2.imread(os.path.join(tiny.images_dir, name)).shape[:2] == (h, w)


def test_query_boxes_lie_inside_their_images(tiny):
    ds = RevisitedDataset(tiny.root)
    with open(tiny.cameras_json) as fh:
        cams = json.load(fh)
    for q, g in zip(ds.qimlist, ds.gnd):
        w, h = cams[q + ".jpg"]["size"]
        x1, y1, x2, y2 = g["bbx"]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h


def _scene():
    rng = np.random.default_rng(0)
    planes = synthetic.make_building(rng, lambda tw, th: synthetic.procedural_texture(rng, tw, th), 30.0, n_extra=0)
    cam = synthetic.sample_camera(rng, planes, (200, 150), max_azimuth=0.0)
    bg = np.zeros((150, 200, 3), np.float32)
    return planes, cam, synthetic.render(planes, cam, bg)


def test_render_projects_the_facade_where_the_camera_model_says():
    planes, cam, (img, ids, invz) = _scene()
    centre = planes[0].origin + planes[0].u * planes[0].width / 2 + planes[0].v * planes[0].height / 2
    (x, y), z = cam.project(centre[None])[0][0], cam.project(centre[None])[1][0]
    assert ids[int(round(y)), int(round(x))] == 0
    assert invz[int(round(y)), int(round(x))] == pytest.approx(1.0 / z, rel=1e-3)


def test_a_view_overlaps_itself_fully_at_scale_one():
    planes, cam, (img, ids, invz) = _scene()
    ys, xs = np.nonzero(ids == 0)
    bbx = [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]
    X, pid, xq = synthetic.region_points(cam, ids, invz, bbx, n=400)
    s = synthetic.overlap_stats(X, pid, xq, cam, ids)
    assert s["overlap"] == pytest.approx(1.0, abs=0.01)
    assert s["scale"] == pytest.approx(1.0, abs=0.01)
    assert synthetic.label(s, 0.0) == "easy"


def test_occluded_points_are_not_seen():
    planes, cam, (img, ids, invz) = _scene()
    ys, xs = np.nonzero(ids == 0)
    bbx = [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]
    X, pid, xq = synthetic.region_points(cam, ids, invz, bbx, n=400)
    blocked = ids.copy()
    blocked[:, : ids.shape[1] // 2] = -2  # an occluder over the left half of the image
    s = synthetic.overlap_stats(X, pid, xq, cam, blocked)
    assert 0.3 < s["overlap"] < 0.7


def test_labels_follow_the_documented_thresholds():
    assert synthetic.label(dict(overlap=0.6, scale=1.5, side=100), 10.0) == "easy"
    assert synthetic.label(dict(overlap=0.6, scale=1.5, side=100), 40.0) == "hard"
    assert synthetic.label(dict(overlap=0.3, scale=3.0, side=100), 10.0) == "hard"
    assert synthetic.label(dict(overlap=0.2, scale=1.0, side=100), 10.0) == "junk"
    assert synthetic.label(dict(overlap=0.6, scale=1.0, side=20), 10.0) == "junk"


def test_texture_dir_photos_dress_the_landmarks(tmp_path):
    rng = np.random.default_rng(1)
    tex = tmp_path / "photos"
    tex.mkdir()
    for i in range(3):
        cv2.imwrite(str(tex / f"p{i}.png"), rng.integers(0, 255, (90, 120, 3), dtype=np.uint8))
    ds = synthetic.generate(tmp_path / "ds", seed=0, n_landmarks=1, views_per_landmark=3, queries_per_landmark=1,
                            n_distractors=1, n_train=1, size=(160, 120), texture_dir=tex)
    with open(ds.dataset_json) as fh:
        assert json.load(fh)["params"]["texture_dir"] == str(tex)
    assert len(RevisitedDataset(ds.root).imlist) == 4


def test_empty_texture_dir_is_refused(tmp_path):
    with pytest.raises(DataError, match="no images"):
        synthetic.generate(tmp_path / "ds", n_landmarks=1, views_per_landmark=2, queries_per_landmark=1,
                           texture_dir=tmp_path)


def test_relative_ground_truth_name_prefers_the_dataset_folder(tiny, tmp_path, monkeypatch):
    """A gnd file of the same name in the working directory does not shadow the dataset's."""
    import shutil

    name = os.path.basename(RevisitedDataset(tiny.root).gnd_file)
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / name, "w") as fh:
        fh.write("not json")
    ds = RevisitedDataset(tiny.root, name)
    assert os.path.dirname(os.path.abspath(ds.gnd_file)) == os.path.abspath(tiny.root)
    # a file that exists only relative to the working directory is still found
    other = tmp_path / "gnd_copy.json"
    shutil.copy(os.path.join(tiny.root, name), other)
    assert RevisitedDataset(tiny.root, "gnd_copy.json").name == "copy"
