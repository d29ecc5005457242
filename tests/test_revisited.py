"""The revisited protocol: the reference test vectors of algorithms.md and the protocol splits."""
import json

import numpy as np
import pytest

from bowretrieval.errors import DataError
from bowretrieval.revisited import compute_map, evaluate, load_gnd


def _one(ranking, ok, junk=()):
    ranks = np.array(ranking)[:, None]  # revisitop accepts a partial ranking: unranked positives count as missed
    return compute_map(ranks, [{"ok": np.array(ok), "junk": np.array(junk, dtype=np.int64)}], (1, 5, 10))


@pytest.mark.parametrize("ranking, ok, junk, ap, prs", [
    ([3, 4, 0, 1, 2, 5], [0], [], 0.16667, [0, 1 / 3, 1 / 3]),
    ([0, 5, 1, 3], [0, 1, 2], [], 0.52778, [1, 2 / 3, 2 / 3]),
    ([4, 0, 5, 1], [0, 1], [4], 0.79167, [1, 2 / 3, 2 / 3]),
])
def test_reference_vectors(ranking, ok, junk, ap, prs):
    m, aps, pr, _ = _one(ranking, ok, junk)
    assert m == pytest.approx(ap, abs=5e-5)
    assert pr == pytest.approx(prs, abs=1e-9)


def test_query_without_positives_is_skipped():
    ranks = np.array([[0, 0], [1, 1], [2, 2]])
    m, aps, pr, _ = compute_map(ranks, [{"ok": np.array([0]), "junk": np.array([], np.int64)},
                                        {"ok": np.array([], np.int64), "junk": np.array([], np.int64)}])
    assert m == pytest.approx(1.0)
    assert np.isnan(aps[1])


def test_protocols_move_hard_and_easy():
    ranks = np.array([[2], [0], [1]])  # hard image 2 first, then easy 0
    gnd = [{"easy": [0], "hard": [2], "junk": [1]}]
    r = evaluate(ranks, gnd)
    assert r["easy"]["mAP"] == pytest.approx(100.0)  # hard is junk for Easy
    assert r["hard"]["mAP"] == pytest.approx(100.0)  # easy is junk for Hard
    assert r["medium"]["mAP"] == pytest.approx(100.0)


def test_malformed_ground_truth_names_file_and_field(tmp_path):
    p = tmp_path / "gnd_x.json"
    p.write_text(json.dumps({"imlist": ["a"], "qimlist": ["a"], "gnd": [{"easy": [5]}]}))
    with pytest.raises(DataError, match=r"gnd_x.json.*gnd\[0\].easy"):
        load_gnd(p)
    p.write_text(json.dumps({"imlist": ["a"], "gnd": []}))
    with pytest.raises(DataError, match="qimlist"):
        load_gnd(p)


def test_protocol_without_any_positive_is_nan_not_zero():
    ranks = np.array([[0], [1]])
    r = evaluate(ranks, [{"easy": [0], "hard": [], "junk": []}])
    assert r["easy"]["mAP"] == pytest.approx(100.0)
    assert np.isnan(r["hard"]["mAP"])
