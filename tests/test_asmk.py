"""ASMK*/SMK*/HQE facade: signatures against numpy, retrieval on generated data, persistence."""
import os

import numpy as np
import pytest

from bowretrieval import asmk
from bowretrieval._ext import invfile as _k
from bowretrieval.errors import IndexFormatError


def _pack(bits):
    """(n, 128) bools -> (n, 2) uint64 with bit b in word b // 64 at position b % 64."""
    w = (bits.reshape(len(bits), 2, 64).astype(np.uint64) << np.arange(64, dtype=np.uint64)).sum(-1)
    return w.astype(np.uint64)


@pytest.fixture(scope="module")
def world():
    """Images made of noisy copies of 'object' descriptors, queries are noisy subsets of images."""
    rng = np.random.default_rng(3)
    train = rng.standard_normal((4000, 128)).astype(np.float32)
    cb = asmk.train_codebook(train, size=32, iterations=4)
    db = [rng.standard_normal((int(rng.integers(30, 60)), 128)).astype(np.float32) for _ in range(30)]
    queries = [d[:20] + 0.1 * rng.standard_normal((20, 128)).astype(np.float32) for d in db[:6]]
    return rng, train, cb, db, queries


def test_sign_signatures_are_signs_of_aggregated_residuals(world):
    rng, _, cb, db, _ = world
    X = db[0]
    w, im, sigs, fid, A = cb.encode([X], 2, aggregate=True)
    for wi, s in zip(w, sigs):
        members = (A == wi).any(1)
        r = (X[members] - cb.centroids_[wi]).sum(0)
        np.testing.assert_array_equal(s, _pack(r[None] > 0)[0])


def test_projection_signatures_threshold_projected_mean_residual_at_medians(world):
    rng, train, _, db, _ = world
    cb = asmk.train_codebook(train, size=16, iterations=3, binarization="projection")
    np.testing.assert_allclose(cb.projection_ @ cb.projection_.T, np.eye(128), atol=1e-5)
    X = db[1]
    w, im, sigs, fid, A = cb.encode([X], 1, aggregate=False)
    z = (X[fid] - cb.centroids_[w]) @ cb.projection_.T
    np.testing.assert_array_equal(sigs, _pack(z > cb.medians_[w]))


def test_projection_bits_are_balanced_on_training_data(world):
    _, train, _, _, _ = world
    cb = asmk.train_codebook(train, size=8, iterations=3, binarization="projection")
    _, _, sigs, _, _ = cb.encode([train], 1, aggregate=False)
    ones = np.unpackbits(sigs.view(np.uint8), axis=1).mean()
    assert abs(ones - 0.5) < 0.02


def test_hamming_kernel_matches_bit_count():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**64, (5, 2), dtype=np.uint64)
    b = rng.integers(0, 2**64, (4, 2), dtype=np.uint64)
    ref = np.unpackbits((a[:, None] ^ b[None]).view(np.uint8), axis=-1).reshape(5, 4, -1).sum(-1)
    np.testing.assert_array_equal(_k.hamming(a, b), ref)


@pytest.mark.parametrize("method", ["smk", "asmk", "hqe"])
def test_each_method_retrieves_the_source_image_first(world, method):
    _, _, cb, db, queries = world
    res = asmk.build(cb, db, method=method).query(queries, top=5)
    np.testing.assert_array_equal(res.ids[:, 0], np.arange(6))


def test_asmk_scores_equal_dense_formula(world):
    _, _, cb, db, queries = world
    d = asmk.build(cb, db, method="asmk", query_ma=2)
    res = d.query(queries[:1], top=None)
    (qw, qs), = d.encode_queries(queries[:1])
    w, im, s, _, _ = cb.encode(db, 1, aggregate=True)
    idf2 = np.log(len(db) / np.bincount(w, minlength=32).clip(1)) ** 2
    h = np.unpackbits((qs[:, None] ^ s[None]).view(np.uint8), axis=-1).reshape(len(qs), len(s), -1).sum(-1)
    u = 1 - 2 * h / 128
    k = np.where(u > 0, u ** 3, 0) * (qw[:, None] == w[None])
    raw = np.bincount(im, weights=(k * idf2[qw][:, None]).sum(0), minlength=len(db))
    ref = raw / np.sqrt(np.bincount(im, weights=idf2[w], minlength=len(db)) * idf2[qw].sum())
    np.testing.assert_allclose(res.scores[0], ref[res.ids[0]], rtol=1e-4, atol=1e-6)


def test_hqe_expansion_adds_frequent_reliable_words_with_majority_signatures(world):
    _, _, cb, db, _ = world
    d = asmk.build(cb, db, method="hqe", hqe_min_images=2, hqe_word_fraction=0.5)
    ivf = d.ivf
    qw = np.array([1], np.int32)
    qs = np.zeros((1, 2), np.uint64)
    imgs = (0, 1, 2)
    words_by_img = [set(d.image_words(i)[:, 0].tolist()) for i in imgs]
    frequent = {w for w in range(32) if sum(w in s for s in words_by_img) >= 2} - {1}
    new_w, new_s = d.hqe_expand(qw, qs, np.array(imgs))
    assert new_w[0] == 1 and (new_s[0] == 0).all()  # the query's own entries come first, unchanged
    assert set(new_w[1:].tolist()) == frequent and len(frequent) > 0
    for word, sig in zip(new_w[1:], new_s[1:]):  # the majority of the reliable images' bits
        voters = []
        for i in imgs:
            pos, ww = ivf.entries_of(i, d.image_words(i))
            voters += list(np.asarray(ivf.payload_)[pos[ww == word]])
        bits = np.unpackbits(np.array(voters).view(np.uint8), axis=1)
        expect = np.packbits(2 * bits.sum(0) > len(voters)).view(np.uint64)
        np.testing.assert_array_equal(sig, expect)


def test_database_save_load_roundtrip(world, tmp_path):
    _, _, cb, db, queries = world
    d = asmk.build(cb, db, method="asmk", names=[f"im{i}" for i in range(len(db))])
    d.save(tmp_path / "db")
    back = asmk.Database.load(tmp_path / "db", verify=True)
    assert back.names[3] == "im3" and back.params.query_ma == 5
    np.testing.assert_array_equal(d.query(queries, 10).ids, back.query(queries, 10).ids)
    np.testing.assert_array_equal(back.image_words(2), d.image_words(2))


def test_query_result_and_codebook_save_load(world, tmp_path):
    _, _, cb, db, queries = world
    res = asmk.build(cb, db).query(queries, 4)
    res.save(tmp_path / "r.npz")
    back = asmk.QueryResult.load(tmp_path / "r.npz")
    np.testing.assert_array_equal(back.ids, res.ids)
    cb.save(tmp_path / "cb.npz")
    np.testing.assert_array_equal(asmk.Codebook.load(tmp_path / "cb.npz").centroids_, cb.centroids_)


def test_incremental_add_equals_one_build(world):
    _, _, cb, db, queries = world
    one = asmk.build(cb, db).query(queries, 10)
    inc = asmk.build(cb, db[:11]).add(db[11:], chunk_features=100).query(queries, 10)
    np.testing.assert_array_equal(one.ids, inc.ids)
    np.testing.assert_allclose(one.scores, inc.scores, rtol=1e-6)


def test_tentative_matches_pair_features_sharing_a_word(world):
    _, _, cb, db, queries = world
    d = asmk.build(cb, db)
    qw = d.query_words(queries[0], 2)
    m = d.tentative_matches(qw, 0)
    dw = d.image_words(0)[:, 0]
    ref = {(i, j) for i in range(len(qw)) for j in range(len(dw)) if dw[j] in qw[i]}
    assert set(map(tuple, m.tolist())) == ref and len(ref) > 0


def test_query_without_features_gives_zero_scores(world):
    _, _, cb, db, _ = world
    res = asmk.build(cb, db).query([np.zeros((0, 128), np.float32)], top=3)
    np.testing.assert_array_equal(res.ids[0], [0, 1, 2])
    assert not res.scores.any()


def test_loading_a_plain_inverted_file_as_database_is_a_clear_error(world, tmp_path):
    from bowretrieval.invfile import InvertedFile

    InvertedFile(8, "bow").add(np.array([1, 2]), np.array([0, 1])).save(tmp_path / "ivf")
    with pytest.raises(IndexFormatError, match="not a bowretrieval.asmk database"):
        asmk.Database.load(tmp_path / "ivf")
    assert os.path.isdir(tmp_path / "ivf")


def test_cli_builds_and_searches_an_asmk_index(tmp_path, capsys):
    import json

    from bowretrieval.cli import main
    from conftest import write_blob_images

    imgs = tmp_path / "imgs"
    write_blob_images(imgs, 4)
    store, voc, idx = tmp_path / "db.h5", tmp_path / "v.npz", tmp_path / "idx"
    assert main(["extract", str(imgs), "--out", str(store), "--quiet", "--workers", "1"]) == 0
    assert main(["vocab", "build", "--features", str(store), "--out", str(voc), "--quiet",
                 "--set", "vocab.size=64", "--set", "vocab.iterations=5"]) == 0
    assert main(["index", "build", "--features", str(store), "--vocab", str(voc), "--out", str(idx),
                 "--quiet", "--method", "asmk"]) == 0
    assert asmk.Database.load(idx / "asmk").params.query_ma == 5
    capsys.readouterr()
    assert main(["search", str(idx), str(imgs / "a1.png"), "--top", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"] == ["a1.png"]
    # the same index built on disk, image by image from the store (search.out_of_core)
    ooc = tmp_path / "idx-ooc"
    assert main(["index", "build", "--features", str(store), "--vocab", str(voc), "--out", str(ooc),
                 "--quiet", "--method", "asmk", "--set", "search.out_of_core=true"]) == 0
    a = json.load(open(idx / "asmk" / "manifest.json"))["arrays"]
    b = json.load(open(ooc / "asmk" / "manifest.json"))["arrays"]
    assert {k: v["crc32"] for k, v in a.items()} == {k: v["crc32"] for k, v in b.items()}
    capsys.readouterr()
    assert main(["search", str(ooc), str(imgs / "a2.png"), "--top", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"] == ["a2.png"]
    assert main(["index", "build", "--features", str(store), "--vocab", str(voc), "--out", str(tmp_path / "x"),
                 "--quiet", "--method", "bow", "--set", "search.out_of_core=true"]) != 0
    assert "out_of_core needs search.method" in capsys.readouterr().err


def test_cli_index_verify_reports_checksum_damage(world, tmp_path, capsys):
    from bowretrieval.cli import main

    _, _, cb, db, _ = world
    path = asmk.build(cb, db[:5]).save(tmp_path / "idx" / "asmk")
    assert main(["index", "verify", str(tmp_path / "idx")]) == 0
    assert "ok (asmk, 5 images" in capsys.readouterr().out
    with open(os.path.join(path, "payload.npy"), "r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 0xFF]))
    assert main(["index", "verify", str(tmp_path / "idx")]) == 1
    assert "CRC32" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["asmk", "smk", "hqe", "bow"])
def test_build_on_disk_equals_build_and_save(world, tmp_path, method):
    """Out-of-core build from a generator: the same arrays, byte for byte, as build(...).save()."""
    import json

    _, _, cb, db, queries = world
    db = db[:12] + [np.zeros((0, 128), np.float32)] + db[12:]   # an image without features
    names = [f"im{i}" for i in range(len(db))]
    asmk.build(cb, db, method=method, names=names).save(tmp_path / "mem")
    out = asmk.build_on_disk(cb, (d for d in db), tmp_path / "disk", method=method, names=names,
                             chunk_features=90, run_bytes=600, mem_bytes=400)
    assert out == str(tmp_path / "disk")
    man = {k: json.load(open(tmp_path / k / "manifest.json")) for k in ("mem", "disk")}
    assert man["mem"]["arrays"].keys() == man["disk"]["arrays"].keys()
    for name, e in man["mem"]["arrays"].items():
        assert e["crc32"] == man["disk"]["arrays"][name]["crc32"], name
        assert e["shape"] == man["disk"]["arrays"][name]["shape"], name
    a, b = asmk.Database.load(tmp_path / "mem"), asmk.Database.load(tmp_path / "disk", verify=True)
    assert b.names == names and b.params.method == method
    np.testing.assert_array_equal(a.query(queries, 10).ids, b.query(queries, 10).ids)
    np.testing.assert_array_equal(a.image_words(13), b.image_words(13))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]   # no temporary files left


def test_build_on_disk_failure_leaves_nothing(world, tmp_path):
    _, _, cb, db, _ = world

    def broken():
        yield from db[:10]
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        asmk.build_on_disk(cb, broken(), tmp_path / "x", chunk_features=50)
    assert os.listdir(tmp_path) == []
    with pytest.raises(Exception, match="dimension"):
        asmk.build_on_disk(cb, [np.zeros((3, 64), np.float32)], tmp_path / "y")
    with pytest.raises(Exception, match="2 names for 3 images"):
        asmk.build_on_disk(cb, db[:3], tmp_path / "z", names=["a", "b"])
    assert os.listdir(tmp_path) == []
