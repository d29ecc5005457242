"""Shared fixtures: the real-data folder (skipped with a reason when absent) and small generated images."""
import os

import numpy as np
import pytest

from bowretrieval.paths import ENV_VAR, shared_data_dir


@pytest.fixture(scope="session")
def shared_data():
    """``../shared/data`` (or ``$BOWR_SHARED_DATA``); tests using it skip when it is absent."""
    d = shared_data_dir()
    if not d.is_dir():
        pytest.skip(f"real test data not found at {d}; set {ENV_VAR} to the shared data folder to run this test")
    return d


@pytest.fixture(scope="session")
def landmarks_dev(shared_data):
    d = shared_data / "landmarks-dev"
    if not (d / "jpg").is_dir():
        pytest.skip(f"{d} missing; set {ENV_VAR}")
    return d


@pytest.fixture
def textured_image():
    """A 240x320 grey image with blobs and edges at several scales (float32, 0..255), seeded."""
    rng = np.random.default_rng(0)
    import cv2

    img = np.full((240, 320), 128, np.float32)
    for _ in range(40):
        x, y = rng.integers(10, 310), rng.integers(10, 230)
        r = int(rng.integers(3, 18))
        cv2.circle(img, (int(x), int(y)), r, float(rng.choice([30, 220])), -1)
    img = cv2.GaussianBlur(img, (0, 0), 1.0)
    return np.ascontiguousarray(img)


def write_image(path, img):
    import cv2

    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    assert cv2.imwrite(os.fspath(path), img)
    return path


def write_blob_images(folder, n):
    """``n`` distinct 320x240 images of random blurred ellipses, ``folder``/a<i>.png (seeded by i)."""
    import cv2

    for i in range(n):
        rng = np.random.default_rng(i)
        img = np.full((240, 320), 128, np.float32)
        for _ in range(60):
            cv2.ellipse(img, (int(rng.integers(0, 320)), int(rng.integers(0, 240))),
                        (int(rng.integers(2, 20)), int(rng.integers(2, 20))), float(rng.uniform(0, 180)), 0, 360,
                        float(rng.uniform(0, 255)), -1)
        write_image(os.path.join(folder, f"a{i}.png"),
                    np.clip(cv2.GaussianBlur(img, (0, 0), 1.0), 0, 255).astype(np.uint8))
