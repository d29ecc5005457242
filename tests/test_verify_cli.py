"""``bowr search --verify/--qe/--out-matches`` and ``bowr verify`` end to end on generated images."""
import json

import cv2
import numpy as np
import pytest

from bowretrieval.cli import main
from conftest import write_image


def _blobs(seed, n=70):
    rng = np.random.default_rng(seed)
    img = np.full((300, 400), 128, np.float32)
    for _ in range(n):
        cv2.ellipse(img, (int(rng.integers(0, 400)), int(rng.integers(0, 300))),
                    (int(rng.integers(3, 22)), int(rng.integers(3, 22))), float(rng.uniform(0, 180)), 0, 360,
                    float(rng.uniform(0, 255)), -1)
    return np.clip(cv2.GaussianBlur(img, (0, 0), 1.0), 0, 255).astype(np.uint8)


def _warped(img):
    """The image rotated by 12 degrees and scaled by 0.9 about its centre."""
    M = cv2.getRotationMatrix2D((200, 150), 12, 0.9)
    return cv2.warpAffine(img, M, (400, 300), borderValue=128)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify")
    imgs = tmp / "imgs"
    for i in range(5):
        write_image(imgs / f"a{i}.png", _blobs(i))
    write_image(tmp / "query.png", _warped(_blobs(3)))
    store, voc = tmp / "db.h5", tmp / "v.npz"
    assert main(["extract", str(imgs), "--out", str(store), "--quiet", "--workers", "1"]) == 0
    assert main(["vocab", "build", "--features", str(store), "--out", str(voc), "--quiet",
                 "--set", "vocab.size=256", "--set", "vocab.iterations=5"]) == 0
    for method in ("bow", "asmk"):
        assert main(["index", "build", "--features", str(store), "--vocab", str(voc), "--out", str(tmp / method),
                     "--image-root", str(imgs), "--method", method, "--quiet"]) == 0
    return tmp


@pytest.mark.parametrize("method,extra", [("bow", []), ("asmk", ["--qe", "avg"])])
def test_search_verify_puts_the_matching_image_first_with_inliers(indexed, capsys, method, extra):
    capsys.readouterr()
    assert main(["search", str(indexed / method), str(indexed / "query.png"), "--verify", "--top", "3",
                 "--json"] + extra) == 0
    res = json.loads(capsys.readouterr().out)[0]
    assert res["top"][0] == "a3.png"
    assert res["inliers"][0] >= 15 and max(res["inliers"][1:]) < res["inliers"][0] / 3


def test_search_out_matches_writes_a_picture(indexed, capsys):
    out = indexed / "matches.jpg"
    assert main(["search", str(indexed / "bow"), str(indexed / "query.png"), "--out-matches", str(out),
                 "--top", "2"]) == 0
    assert "a3.png" in capsys.readouterr().out
    pic = cv2.imread(str(out))
    assert pic is not None and pic.shape[1] > 2 * pic.shape[0]


def test_verify_command_prints_inliers_and_draws(indexed, capsys):
    out = indexed / "pair.png"
    assert main(["verify", str(indexed / "query.png"), str(indexed / "imgs" / "a3.png"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    n = int(text.split(" inliers")[0].rsplit(" ", 1)[1])
    assert n >= 20 and out.stat().st_size > 1000


def test_hqe_expansion_needs_an_hqe_index(indexed, capsys):
    assert main(["search", str(indexed / "bow"), str(indexed / "query.png"), "--qe", "hqe"]) == 1
    assert "hqe" in capsys.readouterr().err
