"""`bowr demo`: generated data -> features -> vocabulary -> index -> evaluation -> pictures."""
import json

import cv2
import numpy as np
import pytest

from bowretrieval.cli import main
from bowretrieval.visualize import mean_pr_curve, precision_recall


def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--quick", "--workers", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "mAP M" in out and "bow-256 (synthetic)" in out
    res = json.loads((tmp_path / "d" / "work" / "results-synthetic.json").read_text())
    assert res["n_queries"] == 6 and res["medium"]["mAP"] > 40.0  # far above chance on 25 images
    pic = cv2.imread(str(tmp_path / "d" / "demo_ranking.png"))
    assert pic is not None and pic.shape[1] > 6 * 160
    assert cv2.imread(str(tmp_path / "d" / "demo_pr.png")) is not None
    assert (tmp_path / "d" / "work" / "results-synthetic.config.yaml").exists()


def test_precision_recall_skips_junk():
    r, p = precision_recall([4, 0, 5, 1], ok=[0, 1], junk=[4])
    assert r.tolist() == [0.0, 0.5, 1.0]
    assert p.tolist() == pytest.approx([1.0, 1.0, 2 / 3])


def test_mean_pr_curve_is_one_for_perfect_rankings():
    ranks = np.array([[0, 1], [1, 0], [2, 2]])
    grid, prec = mean_pr_curve(ranks, [{"ok": [0, 1], "junk": []}, {"ok": [1], "junk": []}])
    assert np.allclose(prec, 1.0) and grid[-1] == 1.0
