"""The ``bowr`` command line: help for every step, and extract -> vocab -> index -> search end to end."""
import json
import subprocess
import sys

import numpy as np
import pytest

from bowretrieval.cli import main
from conftest import write_image


def test_help_lists_every_step(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for step in ("extract", "vocab", "index", "search", "eval", "demo", "config"):
        assert step in out


def test_python_dash_m_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "bowretrieval", "config"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    assert "vocab:" in r.stdout and "size: 16384" in r.stdout


def test_config_error_names_file_and_key(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("vocab:\n  sise: 10\n")
    assert main(["config", str(p)]) == 1
    err = capsys.readouterr().err
    assert "c.yaml" in err and "vocab.sise" in err


def _blobs(seed):
    import cv2

    rng = np.random.default_rng(seed)
    img = np.full((240, 320), 128, np.float32)
    for _ in range(60):
        cv2.ellipse(img, (int(rng.integers(0, 320)), int(rng.integers(0, 240))),
                    (int(rng.integers(2, 20)), int(rng.integers(2, 20))), float(rng.uniform(0, 180)), 0, 360,
                    float(rng.uniform(0, 255)), -1)
    return np.clip(cv2.GaussianBlur(img, (0, 0), 1.0), 0, 255).astype(np.uint8)


def test_pipeline_end_to_end(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    for i in range(4):  # four unrelated images: each must find itself first
        write_image(imgs / f"a{i}.png", _blobs(i))
    (imgs / "broken.jpg").write_bytes(b"not an image")
    store, voc, idx = tmp_path / "db.h5", tmp_path / "v.npz", tmp_path / "idx"
    assert main(["extract", str(imgs), "--out", str(store), "--quiet", "--workers", "1"]) == 0
    assert "broken.jpg" in capsys.readouterr().out  # the bad image is listed, the batch finished
    assert main(["vocab", "build", "--features", str(store), "--out", str(voc), "--quiet",
                 "--set", "vocab.size=128", "--set", "vocab.iterations=5"]) == 0
    assert main(["index", "build", "--features", str(store), "--vocab", str(voc), "--out", str(idx), "--quiet"]) == 0
    meta = json.loads((idx / "names.json").read_text())
    assert meta["vocab"]["size"] == 128 and meta["extract"]["extractor"] == "hesaff"
    capsys.readouterr()
    assert main(["search", str(idx), str(imgs / "a2.png"), "--top", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res[0]["top"] == ["a2.png"]


def test_set_accepts_exponent_floats_and_rejects_words():
    from bowretrieval.config import ExperimentConfig, apply_overrides
    from bowretrieval.errors import ConfigError

    cfg = apply_overrides(ExperimentConfig(), ["search.alpha=1e-3"])
    assert cfg.search.alpha == pytest.approx(1e-3) and isinstance(cfg.search.alpha, float)
    with pytest.raises(ConfigError, match="search.alpha"):
        apply_overrides(ExperimentConfig(), ["search.alpha=fast"])


def test_shipped_configs_load_by_name_from_anywhere(tmp_path, monkeypatch):
    from bowretrieval.config import load_config

    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    cfg = load_config("baseline.yaml")
    assert cfg.extract.extractor == "sift" and cfg.vocab.size == 16384
