"""Bad input never stops a batch: each bad image is listed with its reason, in the output and the store.

One batch (`bowr extract` over a list file, two worker processes) covers every case of the issue; the
tests below each check one of them. Malformed configuration and ground-truth files give one clear
error naming the file and the field.
"""
import json
import os
import struct
import zlib

import cv2
import numpy as np
import pytest

from bowretrieval.cli import main
from bowretrieval.config import ExperimentConfig, apply_overrides, load_config
from bowretrieval.errors import ConfigError, DataError
from bowretrieval.featurestore import FeatureStore
from bowretrieval.revisited import load_gnd
from bowretrieval.synthetic import procedural_texture


def _texture(seed, w=320, h=240):
    return procedural_texture(np.random.default_rng(seed), w, h)


def _png_claiming(width, height) -> bytes:
    """A valid PNG header for a width x height image with almost no data (a 'decompression bomb')."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    good = _texture(0)
    cv2.imwrite(str(d / "good.png"), good)
    cv2.imwrite(str(d / "good2.jpg"), _texture(1))
    ok, buf = cv2.imencode(".jpg", good)
    rng = np.random.default_rng(0)
    (d / "corrupt.jpg").write_bytes(buf.tobytes()[:600] + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.jpg").write_text("these are my holiday notes, not a photo\n")
    cv2.imwrite(str(d / "one_pixel.png"), np.full((1, 1, 3), 200, np.uint8))
    cv2.imwrite(str(d / "constant.png"), np.full((200, 300), 77, np.uint8))
    cv2.imwrite(str(d / "deep16.png"), good.astype(np.uint16) * 257)
    cv2.imwrite(str(d / "rgba.png"), np.dstack([good, np.full(good.shape[:2], 128, np.uint8)]))
    cv2.imwrite(str(d / "grey.png"), cv2.cvtColor(good, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(d / "huge.jpg"), cv2.resize(_texture(2, 800, 600), (5000, 3750), interpolation=cv2.INTER_CUBIC))
    (d / "bomb.png").write_bytes(_png_claiming(60000, 60000))
    names = ["good.png", "good2.jpg", "corrupt.jpg", "empty.jpg", "notes.jpg", "missing.jpg", "one_pixel.png",
             "constant.png", "deep16.png", "rgba.png", "grey.png", "huge.jpg", "bomb.png"]
    (d / "list.txt").write_text("\n".join(names) + "\n")
    store = d / "store.h5"
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(["extract", str(d / "list.txt"), "--out", str(store), "--workers", "2", "--quiet",
                   "--set", "extract.max_side=1024"])
    with FeatureStore(store) as st:
        return dict(rc=rc, out=out.getvalue(), names=st.names(), failed=st.failed(), notes=st.notes(),
                    n={n: len(st.frames(n)) for n in st.names()},
                    frames={n: st.frames(n) for n in ("huge.jpg", "good.png")},
                    size={n: st.image_size(n) for n in st.names()}, dir=d, store=store)


def test_batch_completes_for_the_good_images(batch):
    assert batch["rc"] == 0
    assert {"good.png", "good2.jpg"} <= set(batch["names"])
    assert batch["n"]["good.png"] > 100 and batch["n"]["good2.jpg"] > 100


@pytest.mark.parametrize("name, reason", [
    ("corrupt.jpg", "not a decodable image"),
    ("empty.jpg", "empty file"),
    ("notes.jpg", "not a decodable image"),
    ("missing.jpg", "no such file"),
    ("bomb.png", "cannot be decoded"),
])
def test_unreadable_image_is_listed_with_its_reason_in_output_and_store(batch, name, reason):
    assert reason in batch["failed"][name]
    line = next(ln for ln in batch["out"].splitlines() if f"FAILED {name}" in ln)
    assert reason in line


@pytest.mark.parametrize("name, reason", [
    ("one_pixel.png", "1x1 px"),
    ("constant.png", "constant image"),
])
def test_image_without_features_is_kept_empty_and_says_why(batch, name, reason):
    assert batch["n"][name] == 0
    assert reason in batch["notes"][name]
    assert any(f"NO FEATURES {name}" in ln and reason in ln for ln in batch["out"].splitlines())


@pytest.mark.parametrize("name", ["deep16.png", "rgba.png", "grey.png"])
def test_sixteen_bit_alpha_and_grey_images_give_the_same_features_as_8bit_colour(batch, name):
    # grey = (R+G+B)/3: 16-bit is mapped to 0..255, alpha is dropped; OpenCV's own grey conversion
    # weighs channels differently, so the grey file gives close but not identical features
    ref = batch["n"]["good.png"]
    if name == "grey.png":
        assert abs(batch["n"][name] - ref) < 0.2 * ref
    else:
        assert batch["n"][name] == ref


def test_huge_image_is_downscaled_with_frames_in_original_pixels(batch):
    f = batch["frames"]["huge.jpg"]
    assert batch["size"]["huge.jpg"] == (5000, 3750)
    assert len(f) > 50
    assert f[:, 0].max() > 2500 and f[:, 0].max() < 5000 and f[:, 1].max() < 3750
    # frames are scaled too: the smallest detected radius is several original pixels
    radius = np.sqrt(np.abs(f[:, 2] * f[:, 5] - f[:, 3] * f[:, 4]))
    assert radius.min() > 5000 / 1024


def test_rerun_skips_everything_and_still_reports_the_bad_images(batch, capsys):
    d = batch["dir"]
    assert main(["extract", str(d / "list.txt"), "--out", str(batch["store"]), "--workers", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "0 extracted, 13 already present, 5 failed, 2 without features" in out
    assert "FAILED bomb.png" in out


# -- configuration and ground-truth files --------------------------------------------------------------
def test_malformed_yaml_names_the_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("vocab:\n  size: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: malformed YAML"):
        load_config(p)


def test_wrong_type_names_file_and_field(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text("vocab:\n  size: lots\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: 'vocab.size' must be int"):
        load_config(p)


def test_section_that_is_not_a_mapping_names_it(tmp_path):
    p = tmp_path / "flat.yaml"
    p.write_text("extract: sift\n")
    with pytest.raises(ConfigError, match=r"flat.yaml: 'extract' must be a mapping"):
        load_config(p)


def test_unknown_override_key_is_named():
    with pytest.raises(ConfigError, match=r"vocab.colour"):
        apply_overrides(ExperimentConfig(), ["vocab.colour=blue"])


def test_ground_truth_that_is_not_json_names_the_file(tmp_path):
    p = tmp_path / "gnd_cut.json"
    p.write_text('{"imlist": ["a", "b"], "qimlist": ["a"], "gnd": [{"easy": [1]')
    with pytest.raises(DataError, match=r"gnd_cut.json: cannot be parsed"):
        load_gnd(p)


def test_ground_truth_with_a_bad_box_names_the_field(tmp_path):
    p = tmp_path / "gnd_box.json"
    p.write_text(json.dumps({"imlist": ["a", "b"], "qimlist": ["a"], "gnd": [{"bbx": [10, 5, 2, 50], "easy": [1]}]}))
    with pytest.raises(DataError, match=r"gnd_box.json: gnd\[0\].bbx"):
        load_gnd(p)


def test_pickle_ground_truth_that_is_garbage_names_the_file(tmp_path):
    p = tmp_path / "gnd_x.pkl"
    p.write_bytes(os.urandom(64))
    with pytest.raises(DataError, match=r"gnd_x.pkl: cannot be parsed"):
        load_gnd(p)
