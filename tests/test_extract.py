"""Batch extraction and the feature store: resuming, surviving SIGKILL, frames in original pixels."""
import os
import subprocess
import sys
import textwrap

import cv2
import h5py
import numpy as np
import pytest

from bowretrieval.errors import FeatureStoreError
from bowretrieval.extract import ExtractJob, _extract_one, extract_to_store, jobs_from_paths
from bowretrieval.features import Features, get_extractor, rescale_frames
from bowretrieval.featurestore import FeatureStore
from bowretrieval.imageio import load_gray
from bowretrieval.synthetic import procedural_texture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(folder, n, size=(200, 150)):
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        p = os.path.join(folder, f"im{i:02d}.png")
        cv2.imwrite(p, procedural_texture(np.random.default_rng(100 + i), *size))
        paths.append(p)
    return paths


def _feats(n, seed=0):
    rng = np.random.default_rng(seed)
    return Features(rng.random((n, 6), dtype=np.float32), rng.integers(0, 255, (n, 128), dtype=np.uint8))


# -- feature store ------------------------------------------------------------------------------------
def test_store_round_trips_features_and_image_size(tmp_path):
    f = _feats(7)
    with FeatureStore(tmp_path / "s.h5", "a", "sift", {"a": 1}, 1024) as st:
        st.put("dir/a b.jpg", f, 640, 480, 1.5)
    with FeatureStore(tmp_path / "s.h5") as st:
        g = st.load("dir/a b.jpg")
        assert st.names() == ["dir/a b.jpg"]
        assert np.array_equal(g.frames, f.frames) and np.array_equal(g.descriptors, f.descriptors)
        assert st.image_size("dir/a b.jpg") == (640, 480) and st.extractor_params == {"a": 1}


def test_store_reopened_with_other_settings_refuses_to_mix(tmp_path):
    FeatureStore(tmp_path / "s.h5", "a", "sift", {}, 1024).close()
    with pytest.raises(FeatureStoreError, match="max_side"):
        FeatureStore(tmp_path / "s.h5", "a", "sift", {}, 512)


def test_incomplete_group_is_dropped_on_reopen(tmp_path):
    with FeatureStore(tmp_path / "s.h5", "a", "sift", {}, 1024) as st:
        st.put("done.jpg", _feats(3), 10, 10)
    with h5py.File(tmp_path / "s.h5", "a") as h:  # what a crash between datasets and the flag leaves
        g = h["images"].create_group("half.jpg")
        g.create_dataset("frames", data=np.zeros((2, 6), np.float32))
    with FeatureStore(tmp_path / "s.h5") as st:
        assert st.names() == ["done.jpg"]
    with FeatureStore(tmp_path / "s.h5", "a", "sift", {}, 1024) as st:
        assert "half.jpg" not in st._h5["images"]


def test_rerun_skips_images_already_done(tmp_path):
    paths = _images(tmp_path / "im", 3)
    store = tmp_path / "s.h5"
    r1 = extract_to_store(jobs_from_paths(paths[:2]), store, workers=1, progress=False)
    r2 = extract_to_store(jobs_from_paths(paths), store, workers=1, progress=False)
    assert (r1.done, r2.done, r2.skipped) == (2, 1, 2)
    with FeatureStore(store) as st:
        assert st.names() == ["im00.png", "im01.png", "im02.png"]


KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from bowretrieval.extract import extract_to_store, jobs_from_paths
    from bowretrieval.features import OpenCVSift, register_extractor

    calls = [0]

    @register_extractor("sift")  # the baseline, except that the process dies on its 4th image
    class Dying(OpenCVSift):
        def extract(self, gray):
            calls[0] += 1
            if calls[0] == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().extract(gray)

    extract_to_store(jobs_from_paths(sys.argv[2:]), sys.argv[1], workers=1, progress=False)
""")


def test_sigkill_mid_run_loses_nothing_already_written(tmp_path):
    paths = _images(tmp_path / "im", 6)
    store = tmp_path / "s.h5"
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(repo=REPO))
    r = subprocess.run([sys.executable, str(script), str(store)] + paths, timeout=120)
    assert r.returncode == -9  # killed while extracting the 4th image
    with FeatureStore(store) as st:
        assert st.names() == ["im00.png", "im01.png", "im02.png"]
    rep = extract_to_store(jobs_from_paths(paths), store, workers=1, progress=False)
    assert (rep.skipped, rep.done) == (3, 3)
    with FeatureStore(store) as st:
        assert len(st.names()) == 6 and all(len(st.frames(n)) > 0 for n in st.names())


# -- frames in original pixels ------------------------------------------------------------------------
def test_rescale_frames_keeps_pixel_centres_at_integers():
    f = np.array([[0, 0, 1, 0, 0, 1], [10, 4, 2, 1, -1, 2]], np.float32)
    g = rescale_frames(f, 2.0, offset=(100, 50))
    assert g[0].tolist() == [100.5, 50.5, 2, 0, 0, 2]  # small pixel 0 covers original pixels 0 and 1
    assert g[1].tolist() == [120.5, 58.5, 4, 2, -2, 4]


def _blobs(width, height, centres, sigma):
    img = np.full((height, width), 60.0, np.float32)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    for x, y in centres:
        img += 150.0 * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
    return np.clip(img, 0, 255).astype(np.uint8)


CENTRES = [(300.0, 200.0), (900.0, 260.0), (520.0, 610.0), (1180.0, 700.0)]


def _nearest(frames, c):
    return float(np.min(np.hypot(frames[:, 0] - c[0], frames[:, 1] - c[1])))


def test_downscaled_extraction_reports_frames_in_original_pixels(tmp_path):
    p = str(tmp_path / "blobs.png")
    cv2.imwrite(p, _blobs(1400, 900, CENTRES, sigma=18.0))
    name, feats, size, scale = _extract_one(ExtractJob("b", p), 560, get_extractor("sift"))
    assert size == (1400, 900) and scale == pytest.approx(2.5)
    for c in CENTRES:  # every blob is found where it is in the original image, to within a pixel
        assert _nearest(feats.frames, c) < 1.0


def test_cropped_extraction_reports_frames_in_original_pixels(tmp_path):
    p = str(tmp_path / "blobs.png")
    cv2.imwrite(p, _blobs(1400, 900, CENTRES, sigma=12.0))
    _, feats, size, _ = _extract_one(ExtractJob("b", p, (700, 100, 1300, 800)), None, get_extractor("sift"))
    assert size == (600, 700)
    assert feats.frames[:, 0].min() >= 700 and feats.frames[:, 1].min() >= 100
    for c in CENTRES[1::2]:  # the two blobs inside the box
        assert _nearest(feats.frames, c) < 0.5


def test_load_gray_is_the_channel_mean_on_0_255(tmp_path):
    img = np.zeros((20, 30, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 30, 60, 240
    cv2.imwrite(str(tmp_path / "c.png"), img)
    g = load_gray(tmp_path / "c.png")
    assert g.gray.dtype == np.float32 and g.gray.shape == (20, 30)
    assert np.allclose(g.gray, 110.0) and g.scale == 1.0
