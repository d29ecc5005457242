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
    assert "index_s" in res["timings"] and "vocab_s" in res["timings"]

    # a second run reuses the data, features, vocabulary and index, and gives the same numbers
    assert main(["demo", "--out", str(tmp_path / "d"), "--quick", "--workers", "1", "--quiet"]) == 0
    again = json.loads((tmp_path / "d" / "work" / "results-synthetic.json").read_text())
    assert "index_s" not in again["timings"] and "vocab_s" not in again["timings"]
    assert again["per_query"] == res["per_query"]


def test_precision_recall_skips_junk():
    r, p = precision_recall([4, 0, 5, 1], ok=[0, 1], junk=[4])
    assert r.tolist() == [0.0, 0.5, 1.0]
    assert p.tolist() == pytest.approx([1.0, 1.0, 2 / 3])


def test_mean_pr_curve_is_one_for_perfect_rankings():
    ranks = np.array([[0, 1], [1, 0], [2, 2]])
    grid, prec = mean_pr_curve(ranks, [{"ok": [0, 1], "junk": []}, {"ok": [1], "junk": []}])
    assert np.allclose(prec, 1.0) and grid[-1] == 1.0


def test_ranked_list_image_draws_query_and_results_even_when_one_is_missing(tmp_path):
    from bowretrieval.visualize import ranked_list_image

    img = np.full((120, 160, 3), 90, np.uint8)
    cv2.imwrite(str(tmp_path / "q.png"), img)
    pic = ranked_list_image(str(tmp_path / "q.png"), [str(tmp_path / "q.png"), str(tmp_path / "gone.jpg")],
                            ["easy", "negative"], bbox=[10, 10, 100, 80], thumb=100, per_row=6)
    assert pic.shape == (18 + 112, 3 * 112, 3)
    assert tuple(pic[2, 112 + 2]) == (60, 180, 60)  # the first result is framed green (easy)
    assert tuple(pic[2, 224 + 2]) == (40, 40, 220)  # the second red (negative)
