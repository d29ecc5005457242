"""`bowr vocab build CONFIG` with a bundle config and `bowr shortvec build|search` (small generated data)."""
import json

import numpy as np

from bowretrieval.cli import main
from bowretrieval.features import Features, get_extractor
from bowretrieval.featurestore import FeatureStore
from bowretrieval.shortvec import ShortVectorEncoder, ShortVectorIndex

from conftest import write_image


def _store(path, images, rng):
    with FeatureStore(path, "a", "sift", get_extractor("sift").params, 1024) as st:
        for i, img in enumerate(images):
            kps = get_extractor("sift").extract(img)
            st.put(f"im{i:02d}", kps, img.shape[1], img.shape[0])
    return path


def _images(rng, n):
    import cv2

    out = []
    for _ in range(n):
        img = np.full((200, 260), 128, np.float32)
        for _ in range(60):
            x, y, r = int(rng.integers(5, 255)), int(rng.integers(5, 195)), int(rng.integers(2, 14))
            cv2.circle(img, (x, y), r, float(rng.choice([20, 90, 170, 240])), -1)
        out.append(cv2.GaussianBlur(img, (0, 0), 1.0))
    return out


def test_bundle_vocab_build_then_shortvec_build_and_search(tmp_path, capsys):
    rng = np.random.default_rng(0)
    train = _store(tmp_path / "train.h5", _images(rng, 12), rng)
    db_imgs = _images(rng, 8)
    db = _store(tmp_path / "db.h5", db_imgs, rng)
    cfg = tmp_path / "b.yaml"
    cfg.write_text("name: tiny\niterations: 4\nshort_dims: 6\nmembers:\n"
                   "  - {name: a, descriptor: rootsift, sizes: [32, 8], seed: 1}\n"
                   "  - {name: b, descriptor: power, beta: 0.4, sizes: [16], seed: 2}\n")
    enc_path = tmp_path / "enc.npz"
    assert main(["vocab", "build", str(cfg), "--features", str(train), "--out", str(enc_path), "--quiet"]) == 0
    enc = ShortVectorEncoder.load(enc_path)
    assert enc.dim == 6 and enc.bundle.dim == 56
    assert (tmp_path / "enc.yaml").exists()
    assert main(["shortvec", "build", "--encoder", str(enc_path), "--features", str(db),
                 "--out", str(tmp_path / "idx"), "--quiet"]) == 0
    index = ShortVectorIndex.load(tmp_path / "idx")
    assert index.n_images_ == 8 and index.names_[0] == "im00"
    q = write_image(tmp_path / "q.png", np.clip(db_imgs[3], 0, 255).astype(np.uint8))
    capsys.readouterr()
    assert main(["shortvec", "search", str(tmp_path / "idx"), str(q), "--top", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res[0]["top"][0] == "im03" and res[0]["scores"][0] > 0.9  # the PNG round trip changes a few features


def test_vocab_build_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "enc.npz"
    out.write_bytes(b"x")
    cfg = tmp_path / "b.yaml"
    cfg.write_text("name: t\nmembers:\n  - {sizes: [8]}\n")
    assert main(["vocab", "build", str(cfg), "--features", str(tmp_path / "none.h5"), "--out", str(out)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
