"""The pycolmap adapter: import order (zlib), version pin, child processes that fail or hang."""
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from bowretrieval.sfm import colmap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_zlib_works_after_importing_the_adapter_first():
    # pycolmap 4.2 exports its own zlib; a fresh process that loads the adapter (and so pycolmap)
    # first must still compress (pytest itself imports zlib early, hence the subprocess)
    code = ("import bowretrieval.sfm.colmap as c; c.check_pycolmap(); import pycolmap, zlib, io, numpy as np; "
            "assert len(zlib.compress(b'x' * 100000)) < 1000; np.savez_compressed(io.BytesIO(), a=np.zeros(1000)); "
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok")


def test_another_pycolmap_version_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycolmap", types.SimpleNamespace(__version__="3.11.0"))
    with pytest.raises(colmap.SfmError, match="pip install pycolmap==4.2.1"):
        colmap.check_pycolmap()


def test_a_hung_child_is_killed_at_the_timeout(tmp_path):
    r = colmap.run_job(dict(kind="map", name="slow", database=str(tmp_path / "none.db"), images=["a.jpg"],
                            output=str(tmp_path / "out")), tmp_path / "jobs", timeout=0.05)
    assert not r.ok
    assert "timeout" in r.message


def test_a_failing_child_is_reported_not_raised(tmp_path):
    db = tmp_path / "db.db"
    rng = np.random.default_rng(0)
    imgs = [colmap.DbImage(f"{k}.jpg", 640, 480, rng.uniform(0, 400, (50, 2)), rng.integers(0, 255, (50, 128)))
            for k in range(3)]
    colmap.write_database(db, imgs, [colmap.DbPair(0, 1, np.array([[0, 0], [1, 1]]), np.array([[0, 0]]))])
    r = colmap.run_job(dict(kind="map", name="bad", database=str(db), images=["0.jpg", "missing.jpg"],
                            output=str(tmp_path / "out")), tmp_path / "jobs", timeout=120)
    assert not r.ok
    assert "missing.jpg" in r.message and "not in the database" in r.message
