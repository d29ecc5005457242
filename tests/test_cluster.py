"""Sharded extraction / assignment / indexing on Dask (bowretrieval.cluster) equals the single-machine path."""
import json
import os

import numpy as np
import pytest

pytest.importorskip("dask", reason="dask not installed (optional extra: pip install 'bowretrieval[dask]')")

from bowretrieval import asmk, cluster  # noqa: E402
from bowretrieval.cli import main  # noqa: E402
from bowretrieval.errors import DataError  # noqa: E402
from conftest import write_blob_images  # noqa: E402


def _crcs(index_dir):
    with open(os.path.join(index_dir, "manifest.json")) as fh:
        man = json.load(fh)
    return {k: v["crc32"] for k, v in man["arrays"].items()}, man


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """7 images (one unreadable file among them) extracted both ways; vocabulary; the one-store index."""
    tmp = tmp_path_factory.mktemp("cluster")
    imgs = tmp / "imgs"
    write_blob_images(imgs, 7)
    (imgs / "a3b.png").write_bytes(b"not a png")  # sorts into the middle shard
    store, voc, idx = tmp / "db.h5", tmp / "v.npz", tmp / "idx"
    assert main(["extract", str(imgs), "--out", str(store), "--quiet", "--workers", "1"]) == 0
    assert main(["vocab", "build", "--features", str(store), "--out", str(voc), "--quiet",
                 "--set", "vocab.size=64", "--set", "vocab.iterations=5"]) == 0
    assert main(["index", "build", "--features", str(store), "--vocab", str(voc), "--out", str(idx),
                 "--quiet", "--method", "asmk"]) == 0
    return tmp, imgs, store, voc, idx


def test_sharded_extract_reports_bad_image_and_matches_one_store(built):
    from bowretrieval.extract import jobs_from_paths
    from bowretrieval.featurestore import FeatureStore
    from bowretrieval.imageio import list_images

    tmp, imgs, store, _, _ = built
    jobs = jobs_from_paths(list_images(imgs), imgs)
    reps = cluster.extract_shards(jobs, tmp / "shards", 3, "hesaff", scheduler="synchronous")
    assert [os.path.basename(r.store) for r in reps] == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    assert [r.done for r in reps] == [3, 1, 3] and [len(r.failed) for r in reps] == [0, 1, 0]
    assert list(reps[1].failed) == ["a3b.png"]
    with FeatureStore(store) as one:
        names = one.names()
        shard_names = []
        for r in reps:
            with FeatureStore(r.store) as st:
                shard_names += st.names()
                for n in st.names():
                    np.testing.assert_array_equal(st.load(n).descriptors, one.load(n).descriptors)
    assert shard_names == names  # contiguous shards of the sorted names: the one-store order
    again = cluster.extract_shards(jobs, tmp / "shards", 3, "hesaff", scheduler="threads", num_workers=2)
    assert [r.done for r in again] == [0, 0, 0] and [r.skipped for r in again] == [3, 2, 3]
    assert list(again[1].failed) == ["a3b.png"]  # still reported on resume
    with pytest.raises(DataError, match="another shard split"):  # refused before any task runs
        cluster.extract_shards(jobs, tmp / "shards", 2, "hesaff", scheduler="synchronous")
    with FeatureStore(reps[0].store) as st:
        assert st.names() == ["a0.png", "a1.png", "a2.png"]


def test_sharded_index_equals_one_store_index(built, capsys):
    tmp, imgs, _, voc, idx = built
    out = tmp / "idx-sharded"
    # the CLI: extract (resumes the shards of the test above, or builds them) and index on the threads scheduler
    assert main(["cluster", "extract", str(imgs), "--out", str(tmp / "shards"), "--shards", "3",
                 "--scheduler", "synchronous"]) == 0
    assert "FAILED a3b.png" in capsys.readouterr().out
    assert main(["cluster", "index", str(tmp / "shards"), "--vocab", str(voc), "--out", str(out),
                 "--method", "asmk", "--scheduler", "threads", "--workers", "2", "--keep-shards"]) == 0
    a, man_a = _crcs(idx / "asmk")
    b, man_b = _crcs(out / "asmk")
    assert a == b and set(a) >= {"ids", "payload", "idf", "inv_norm", "feat_indptr", "feat_words", "centroids"}
    assert man_b["n_images"] == 7 and man_b["names"] == man_a["names"] and man_b["method"] == man_a["method"]
    assert len(os.listdir(out / "shards")) == 3 and not [f for f in os.listdir(out) if f.startswith(".")]
    capsys.readouterr()
    for q in ("a2.png", "a5.png"):
        assert main(["search", str(idx), str(imgs / q), "--top", "7", "--json"]) == 0
        one = json.loads(capsys.readouterr().out)[0]["top"]
        assert main(["search", str(out), str(imgs / q), "--top", "7", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)[0]["top"] == one and one[0] == q
    # per-shard words: the vocabulary's exact assignment, in store order
    from bowretrieval.featurestore import FeatureStore
    from bowretrieval.vocabulary import Vocabulary

    files = cluster.assign_shards(cluster.shard_stores(tmp / "shards"), voc, tmp / "words", k=2,
                                  scheduler="synchronous")
    v = Vocabulary.load(voc)
    with np.load(files[2]) as z, FeatureStore(tmp / "shards" / "shard-00002.h5") as st:
        assert json.loads(str(z["names"])) == st.names()
        n0 = st.names()[0]
        np.testing.assert_array_equal(z["words"][z["indptr"][0]:z["indptr"][1]], v.assign(st.descriptors(n0), 2))
        assert z["indptr"][-1] == len(z["words"]) == sum(len(st.descriptors(n)) for n in st.names())


def test_merge_refuses_shards_built_differently(built):
    tmp, _, _, voc, _ = built
    from bowretrieval.vocabulary import Vocabulary

    cb = asmk.Codebook.from_vocabulary(Vocabulary.load(voc))
    rng = np.random.default_rng(0)
    descs = [np.abs(rng.standard_normal((40, 128))).astype(np.float32) for _ in range(4)]
    s0 = asmk.build_on_disk(cb, descs[:2], tmp / "m" / "s0", "asmk", names=["x0", "x1"])
    s1 = asmk.build_on_disk(cb, descs[2:], tmp / "m" / "s1", "asmk", names=["x2", "x3"], alpha=2.0)
    s2 = asmk.build_on_disk(cb, descs[2:], tmp / "m" / "s2", "asmk", names=["x0", "x3"])
    before = sorted(os.listdir(tmp / "m"))
    with pytest.raises(DataError, match="not built like"):
        asmk.merge_database_shards([s0, s1], tmp / "m" / "merged")
    with pytest.raises(DataError, match="more than one shard"):
        asmk.merge_database_shards([s0, s2], tmp / "m" / "merged")
    assert sorted(os.listdir(tmp / "m")) == before  # nothing left behind
    # and shards built alike merge into exactly the one-build database
    s3 = asmk.build_on_disk(cb, descs[2:], tmp / "m" / "s3", "asmk", names=["x2", "x3"])
    merged = asmk.merge_database_shards([s0, s3], tmp / "m" / "merged")
    whole = asmk.build(cb, descs, "asmk", names=["x0", "x1", "x2", "x3"]).save(tmp / "m" / "whole")
    assert _crcs(merged)[0] == _crcs(whole)[0]
    assert asmk.Database.load(merged).names == ["x0", "x1", "x2", "x3"]


def test_missing_dask_names_the_extra(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_dask(name, *a, **k):
        if name == "dask" or name.startswith("dask."):
            raise ImportError("No module named 'dask'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_dask)
    with pytest.raises(Exception, match=r"pip install 'bowretrieval\[dask\]'"):
        cluster.require_dask()
