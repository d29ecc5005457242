"""Atomic .npz writes: the final name appears only whole, and a failed write leaves nothing behind."""
import json
import os

import numpy as np
import pytest

from bowretrieval.npzio import json_array, save_npz_atomic


def test_roundtrip_with_json_meta(tmp_path):
    p = save_npz_atomic(tmp_path / "a.npz", x=np.arange(3), meta=json_array({"k": 1}))
    with np.load(p) as z:
        assert z["x"].tolist() == [0, 1, 2]
        assert json.loads(str(z["meta"])) == {"k": 1}
    assert sorted(os.listdir(tmp_path)) == ["a.npz"]


def test_failed_write_keeps_old_file_and_no_temporary(tmp_path):
    p = save_npz_atomic(tmp_path / "a.npz", x=np.arange(3))

    class Unsaveable:
        def __array__(self, *a, **k):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_npz_atomic(p, x=Unsaveable())
    assert sorted(os.listdir(tmp_path)) == ["a.npz"]
    with np.load(p) as z:
        assert z["x"].tolist() == [0, 1, 2]
