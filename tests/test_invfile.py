"""Inverted file kernels against dense numpy references; persistence and bad input."""
import json
import os

import numpy as np
import pytest

from bowretrieval import invfile as invmod
from bowretrieval.bow import BowIndex
from bowretrieval.errors import DataError, IndexFormatError
from bowretrieval.invfile import InvertedFile, selectivity_lut

N_WORDS = 40


def _ham(a, b):
    x = np.bitwise_xor(a[:, None, :], b[None, :, :])
    return np.unpackbits(x.view(np.uint8), axis=-1).reshape(len(a), len(b), -1).sum(-1)


def _random_sig_db(rng, n_img=25, per_img=12, unique=True, n_words=N_WORDS):
    W, I, F = [], [], []
    for d in range(n_img):
        w = rng.choice(n_words, per_img, replace=not unique)
        W.append(w); I.append(np.full(per_img, d)); F.append(np.arange(per_img))
    W, I, F = map(np.concatenate, (W, I, F))
    S = rng.integers(0, 2**64, (len(W), 2), dtype=np.uint64)
    # correlate some signatures so that Hamming distances spread over 0..128
    S[::3] = S[0] ^ rng.integers(0, 2**16, (len(S[::3]), 2), dtype=np.uint64)
    return W, I, S, F


def _dense_sig_scores(qw, qs, W, I, S, n_img, alpha=3.0, tau=0.0, ht=None, aggregated=True):
    lut, _ = selectivity_lut(alpha, tau, ht)
    if aggregated:
        df = np.bincount(W, minlength=N_WORDS)
    else:
        df = np.bincount(np.unique(np.stack([W, I], 1), axis=0)[:, 0], minlength=N_WORDS)
    idf2 = np.where(df > 0, np.log(n_img / np.maximum(df, 1)), 0.0) ** 2
    k = lut[_ham(qs, S)] * (qw[:, None] == W[None, :])
    raw = np.bincount(I, weights=(k * idf2[qw][:, None]).sum(0), minlength=n_img)
    kdd = lut[_ham(S, S)] * (W[:, None] == W[None, :]) * (I[:, None] == I[None, :])
    sd = np.bincount(I, weights=(kdd * idf2[W][:, None]).sum(0), minlength=n_img)
    sq = (lut[_ham(qs, qs)] * (qw[:, None] == qw[None, :]) * idf2[qw][:, None]).sum()
    return raw / np.sqrt(np.maximum(sd, 1e-30) * sq) * (sd > 0)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def test_asmk_scores_match_dense_reference(rng):
    W, I, S, _ = _random_sig_db(rng)
    ivf = InvertedFile(N_WORDS, "asmk").add(W, I, S).compact()
    others = np.setdiff1d(np.arange(N_WORDS), W[:4])
    qw = np.concatenate([W[:4], rng.choice(others, 5, replace=False)])
    qs = rng.integers(0, 2**64, (9, 2), dtype=np.uint64)
    qs[:4] = S[:4]
    ids, sc = ivf.search([(qw, qs)], top=None)
    ref = _dense_sig_scores(qw, qs, W, I, S, 25)
    np.testing.assert_allclose(sc[0], np.sort(ref)[::-1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ref[ids[0]], sc[0], rtol=1e-5, atol=1e-7)


def test_smk_scores_match_dense_reference_with_bursts(rng):
    W, I, S, F = _random_sig_db(rng, unique=False, n_words=8)
    ivf = InvertedFile(N_WORDS, "smk", ht=48).add(W, I, S, F).compact()
    qw = rng.integers(0, 8, 15)
    qs = np.concatenate([S[:8], rng.integers(0, 2**64, (7, 2), dtype=np.uint64)])
    qw[:8] = W[:8]
    ids, sc = ivf.search([(qw, qs)], top=None)
    ref = _dense_sig_scores(qw, qs, W, I, S, 25, ht=48, aggregated=False)
    np.testing.assert_allclose(ref[ids[0]], sc[0], rtol=1e-5, atol=1e-7)
    assert sc[0, 0] > 0


def test_bow_scores_are_tfidf_cosines(rng):
    imgs = [rng.integers(0, N_WORDS, rng.integers(1, 30)) for _ in range(20)]
    q = rng.integers(0, N_WORDS, 25)
    tf = np.stack([np.bincount(w, minlength=N_WORDS) for w in imgs]).astype(float)
    idf = np.log(20 / np.maximum((tf > 0).sum(0), 1))
    D = tf * idf
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    qv = np.bincount(q, minlength=N_WORDS) * idf
    ref = D @ (qv / np.linalg.norm(qv))
    got = BowIndex(N_WORDS).fit(imgs).scores([q])[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_scores_do_not_depend_on_thread_count(rng):
    W, I, S, _ = _random_sig_db(rng)
    qs = [(rng.choice(N_WORDS, 10, replace=False), rng.integers(0, 2**64, (10, 2), dtype=np.uint64)) for _ in range(7)]
    a = InvertedFile(N_WORDS, "asmk", threads=1).add(W, I, S).search(qs, top=10)
    b = InvertedFile(N_WORDS, "asmk", threads=3).add(W, I, S).search(qs, top=10)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_partial_top_k_equals_truncated_full_ranking_with_id_tie_break(rng):
    imgs = [rng.integers(0, 6, 5) for _ in range(60)]  # many exact ties
    idx = BowIndex(N_WORDS).fit(imgs)
    qs = [rng.integers(0, 6, 8) for _ in range(5)]
    full_ids, full_s = idx.search(qs)
    for top in (1, 7, 33):
        ids, s = idx.search(qs, top)
        np.testing.assert_array_equal(ids, full_ids[:, :top])
    for row_ids, row_s in zip(full_ids, full_s):
        order = np.lexsort((row_ids, -row_s))
        np.testing.assert_array_equal(order, np.arange(len(order)))


def test_chunked_add_equals_one_pass_build(rng):
    W, I, S, _ = _random_sig_db(rng)
    one = InvertedFile(N_WORDS, "asmk").add(W, I, S).compact()
    chunked = InvertedFile(N_WORDS, "asmk")
    for lo, hi in ((0, 10), (10, 11), (11, 25)):
        m = (I >= lo) & (I < hi)
        chunked.add(W[m], I[m] - lo, S[m], n_images=hi - lo)
        chunked.compact()
    for name in ("indptr_", "ids_", "payload_", "idf_", "inv_norm_"):
        np.testing.assert_array_equal(getattr(one, name), getattr(chunked, name))


def test_merged_shards_equal_one_index(rng):
    W, I, S, F = _random_sig_db(rng, unique=False)
    one = InvertedFile(N_WORDS, "smk").add(W, I, S, F).compact()
    m = I < 9
    a = InvertedFile(N_WORDS, "smk").add(W[m], I[m], S[m], F[m]).compact()
    b = InvertedFile(N_WORDS, "smk").add(W[~m], I[~m] - 9, S[~m], F[~m]).compact()
    merged = InvertedFile.merge_shards([a, b])
    for name in ("indptr_", "ids_", "payload_", "fids_", "idf_"):
        np.testing.assert_array_equal(getattr(one, name), getattr(merged, name))
    np.testing.assert_allclose(one.inv_norm_, merged.inv_norm_, rtol=1e-6)


def test_save_load_roundtrip_is_memory_mapped(rng, tmp_path):
    W, I, S, _ = _random_sig_db(rng)
    ivf = InvertedFile(N_WORDS, "asmk", alpha=2.0).add(W, I, S).compact()
    ivf.save(tmp_path / "ix")
    back = InvertedFile.load(tmp_path / "ix", verify=True)
    assert isinstance(back.payload_, np.memmap) and back.alpha == 2.0
    q = [(W[:5], S[:5])]
    np.testing.assert_array_equal(ivf.search(q, 10)[0], back.search(q, 10)[0])
    assert sorted(os.listdir(tmp_path)) == ["ix"]


def test_bow_index_save_load_roundtrip(rng, tmp_path):
    imgs = [rng.integers(0, N_WORDS, 20) for _ in range(10)]
    idx = BowIndex(N_WORDS).fit(imgs)
    idx.save(tmp_path / "bow")
    back = BowIndex.load(tmp_path / "bow")
    np.testing.assert_array_equal(idx.search(imgs[:3], 5)[0], back.search(imgs[:3], 5)[0])


@pytest.fixture
def saved(tmp_path):
    rng = np.random.default_rng(1)
    W, I, S, _ = _random_sig_db(rng)
    return InvertedFile(N_WORDS, "asmk").add(W, I, S).compact().save(tmp_path / "ix")


def test_truncated_array_is_an_index_format_error(saved):
    fn = os.path.join(saved, "payload.npy")
    with open(fn, "r+b") as fh:
        fh.truncate(os.path.getsize(fn) - 16)
    with pytest.raises(IndexFormatError, match="truncated"):
        InvertedFile.load(saved)


def test_flipped_byte_fails_checksum_verification(saved):
    fn = os.path.join(saved, "ids.npy")
    with open(fn, "r+b") as fh:
        fh.seek(-3, 2)
        b = fh.read(1)
        fh.seek(-3, 2)
        fh.write(bytes([b[0] ^ 0xFF]))
    InvertedFile.load(saved)  # structure intact: opens without reading every byte
    with pytest.raises(IndexFormatError, match="CRC32"):
        InvertedFile.load(saved, verify=True)


def test_other_format_version_is_refused(saved):
    mf = os.path.join(saved, "manifest.json")
    man = json.load(open(mf))
    man["version"] = invmod.VERSION + 1
    json.dump(man, open(mf, "w"))
    with pytest.raises(IndexFormatError, match="version"):
        InvertedFile.load(saved)


def test_truncated_manifest_is_an_index_format_error(saved):
    mf = os.path.join(saved, "manifest.json")
    text = open(mf).read()
    open(mf, "w").write(text[: len(text) // 2])
    with pytest.raises(IndexFormatError, match="manifest"):
        InvertedFile.load(saved)


def test_missing_directory_is_an_index_format_error(tmp_path):
    with pytest.raises(IndexFormatError, match="manifest.json"):
        InvertedFile.load(tmp_path / "nothing")


def test_query_without_features_scores_zero_in_id_order(rng):
    W, I, S, _ = _random_sig_db(rng)
    ivf = InvertedFile(N_WORDS, "asmk").add(W, I, S)
    ids, sc = ivf.search([(np.zeros(0, np.int32), np.zeros((0, 2), np.uint64))], top=5)
    np.testing.assert_array_equal(ids[0], np.arange(5))
    assert not sc.any()


def test_image_ids_beyond_uint32_are_refused():
    ivf = InvertedFile(N_WORDS, "bow")
    with pytest.raises(DataError, match="uint32"):
        ivf.add(np.array([1]), np.array([0]), n_images=2**32)


def test_words_outside_vocabulary_are_refused():
    with pytest.raises(DataError, match="another vocabulary"):
        InvertedFile(N_WORDS, "bow").add(np.array([N_WORDS]), np.array([0]))


def test_asmk_kind_refuses_two_signatures_for_one_image_and_word():
    s = np.zeros((2, 2), np.uint64)
    with pytest.raises(DataError, match="aggregate"):
        InvertedFile(N_WORDS, "asmk").add(np.array([3, 3]), np.array([0, 0]), s)


def test_failed_write_leaves_no_directory(rng, tmp_path, monkeypatch):
    W, I, S, _ = _random_sig_db(rng)
    ivf = InvertedFile(N_WORDS, "asmk").add(W, I, S).compact()
    real_save, calls = np.save, []

    def failing_save(fn, a, *args, **kw):
        calls.append(fn)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_save(fn, a, *args, **kw)

    monkeypatch.setattr(invmod.np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ivf.save(tmp_path / "ix")
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_previous_index(rng, tmp_path, monkeypatch):
    W, I, S, _ = _random_sig_db(rng)
    ivf = InvertedFile(N_WORDS, "asmk").add(W, I, S).compact()
    ivf.save(tmp_path / "ix")
    monkeypatch.setattr(invmod.np, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        ivf.save(tmp_path / "ix")
    assert InvertedFile.load(tmp_path / "ix", verify=True).n_images_ == 25
    assert os.listdir(tmp_path) == ["ix"]


def test_entries_of_returns_the_images_postings(rng):
    W, I, S, F = _random_sig_db(rng, unique=False)
    ivf = InvertedFile(N_WORDS, "smk").add(W, I, S, F).compact()
    pos, words = ivf.entries_of(4)
    assert sorted(ivf.fids_[pos].tolist()) == list(range(12))
    np.testing.assert_array_equal(np.sort(words), np.sort(W[I == 4]))
    assert (ivf.ids_[pos] == 4).all()


def test_negative_selectivity_ranks_below_untouched_images(rng):
    W, I, S, _ = _random_sig_db(rng, n_img=30)
    I = np.where(I >= 25, I + 10, I)  # images 25..39 have no entries: untouched, score 0
    ivf = InvertedFile(N_WORDS, "asmk", tau=-0.6).add(W, I, S, n_images=40).compact()
    qw = np.unique(W[:6])
    qs = rng.integers(0, 2**64, (len(qw), 2), dtype=np.uint64)
    ids, sc = ivf.search([(qw, qs)], top=None)
    ref = _dense_sig_scores(qw, qs, W, I, S, 40, tau=-0.6)
    assert (ref < 0).any()
    np.testing.assert_array_equal(ids[0], np.lexsort((np.arange(40), -ref.astype(np.float32))))


@pytest.mark.parametrize("tau", [0.0, -0.6])
def test_sparse_and_dense_accumulation_rank_like_the_reference(rng, tau):
    # a query scanning fewer entries than half the images keeps a touched list; one scanning more
    # accumulates densely and finishes over every image: both must give the reference ranking
    W, I, S, _ = _random_sig_db(rng, n_img=400, per_img=4)
    ivf = InvertedFile(N_WORDS, "asmk", tau=tau).add(W, I, S).compact()
    df = np.diff(ivf.indptr_)
    rare = np.array([np.argmin(np.where(df > 0, df, 10**9))])
    common = np.argsort(-df)[:8]
    assert df[rare].sum() * 2 < 400 <= df[common].sum() * 2
    for qw in (rare, common):
        qs = rng.integers(0, 2**64, (len(qw), 2), dtype=np.uint64)
        qs[0] = S[np.nonzero(W == qw[0])[0][0]]  # one exact match
        ids, sc = ivf.search([(qw, qs)], top=None)
        ref = _dense_sig_scores(qw, qs, W, I, S, 400, tau=tau)
        assert sorted(ids[0]) == list(range(400))
        np.testing.assert_allclose(sc[0], ref[ids[0]], rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(np.lexsort((ids[0], -sc[0])), np.arange(400))  # score desc, then id
        assert ((sc[0] == 0) == (ref[ids[0]] == 0)).all()
