"""Out-of-core building (InvertedFile.build_on_disk, merge_shards_to_disk) against the in-memory
build: the same arrays bit for bit, the same manifest, the same rankings; failures leave nothing."""
import json
import os

import numpy as np
import pytest

from bowretrieval import invfile as invmod
from bowretrieval.errors import DataError
from bowretrieval.invfile import InvertedFile

N_WORDS = 300


def _collection(kind, n_img=120, seed=3):
    """Chunks of generated images (Zipf-like words; for smk repeated words with feature ids)."""
    rng = np.random.default_rng(seed)
    p = (np.arange(N_WORDS) + 1.0) ** -0.7
    p /= p.sum()
    chunks, lo = [], 0
    for n in (7, 30, 1, 0, 25, 40, 17):  # uneven chunk sizes, one without images
        n = min(n, n_img - lo)
        W, I, F = [], [], []
        for d in range(n):
            k = int(rng.integers(0, 40))  # some images have no features
            w = rng.choice(N_WORDS, k, p=p, replace=(kind != "asmk"))
            W.append(w); I.append(np.full(k, d)); F.append(np.arange(k))
        W = np.concatenate(W).astype(np.int64) if n else np.zeros(0, np.int64)
        I = np.concatenate(I).astype(np.int64) if n else np.zeros(0, np.int64)
        F = np.concatenate(F).astype(np.int64) if n else np.zeros(0, np.int64)
        S = rng.integers(0, 2**64, (len(W), 2), dtype=np.uint64)
        if len(S):
            S[::4] = S[0] ^ rng.integers(0, 2**12, (len(S[::4]), 2), dtype=np.uint64)  # spread distances
        chunks.append((W, I, S if kind != "bow" else None, F if kind == "smk" else None, n))
        lo += n
    return chunks


def _in_memory(kind, chunks):
    ivf = InvertedFile(N_WORDS, kind, alpha=3.0, tau=0.0)
    for W, I, S, F, n in chunks:
        ivf.add(W, I, S, F, n_images=n)
    return ivf.compact()


def _queries(kind, rng, n=6):
    qs = []
    for _ in range(n):
        w = rng.choice(N_WORDS, 30, replace=(kind == "smk"))
        qs.append((w, rng.integers(0, 2**64, (len(w), 2), dtype=np.uint64) if kind != "bow" else None))
    return qs


@pytest.mark.parametrize("kind", ["bow", "asmk", "smk"])
@pytest.mark.parametrize("run_bytes, mem_bytes", [(1 << 30, 1 << 30), (400, 64 * 50)])
def test_build_on_disk_equals_in_memory_build(kind, run_bytes, mem_bytes, tmp_path):
    chunks = _collection(kind)
    ref = _in_memory(kind, chunks)
    ref.save(tmp_path / "ref")
    gen = ((W, I, S, F, n) for W, I, S, F, n in chunks)  # a generator: consumed once
    out = InvertedFile.build_on_disk(tmp_path / "ooc", gen, N_WORDS, kind, run_bytes=run_bytes,
                                     mem_bytes=mem_bytes, extra_meta=dict(note="x"),
                                     extra_arrays=dict(names=np.arange(5)))
    assert out == str(tmp_path / "ooc")
    assert sorted(os.listdir(tmp_path)) == ["ooc", "ref"]  # no runs or temporary folders left
    ooc = InvertedFile.load(tmp_path / "ooc", verify=True)
    assert ooc.n_images_ == ref.n_images_ == 120 and ooc.n_entries == ref.n_entries > 0
    for name in ("indptr", "ids", "payload", "fids", "idf", "inv_norm"):
        if name == "fids" and kind != "smk":
            continue
        a = (tmp_path / "ref" / f"{name}.npy").read_bytes()
        b = (tmp_path / "ooc" / f"{name}.npy").read_bytes()
        assert a == b, f"{kind}: {name}.npy differs"
    m_ref = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    m_ooc = json.loads((tmp_path / "ooc" / "manifest.json").read_text())
    assert m_ooc.pop("note") == "x" and m_ooc["arrays"].pop("names")["shape"] == [5]
    assert m_ooc == m_ref
    np.testing.assert_array_equal(ooc.extra_["names"], np.arange(5))
    qs = _queries(kind, np.random.default_rng(1))
    for (i1, s1), (i2, s2) in zip([ref.search(qs, top=50)], [ooc.search(qs, top=50)]):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(s1, s2)


@pytest.mark.parametrize("kind", ["asmk", "smk"])
def test_merge_shards_to_disk_equals_one_index(kind, tmp_path):
    chunks = _collection(kind)
    ref = _in_memory(kind, chunks)
    ref.save(tmp_path / "ref")
    shards = []
    for k, part in enumerate((chunks[:2], chunks[2:5], chunks[5:])):
        _in_memory(kind, part).save(tmp_path / f"shard{k}")
        shards.append(tmp_path / f"shard{k}")
    InvertedFile.merge_shards_to_disk(shards, tmp_path / "merged", mem_bytes=64 * 30, verify=True)
    for name in ("indptr", "ids", "payload", "idf", "inv_norm") + (("fids",) if kind == "smk" else ()):
        assert (tmp_path / "ref" / f"{name}.npy").read_bytes() == (tmp_path / "merged" / f"{name}.npy").read_bytes(), name
    merged = InvertedFile.load(tmp_path / "merged", verify=True)
    qs = _queries(kind, np.random.default_rng(2))
    for a, b in zip(ref.search(qs, top=20), merged.search(qs, top=20)):
        np.testing.assert_array_equal(a, b)


def test_merge_shards_to_disk_refuses_other_parameters(tmp_path):
    chunks = _collection("asmk")
    InvertedFile(N_WORDS, "asmk").add(*chunks[0][:3], n_images=chunks[0][4]).save(tmp_path / "a")
    InvertedFile(N_WORDS, "asmk", alpha=2.0).add(*chunks[1][:3], n_images=chunks[1][4]).save(tmp_path / "b")
    with pytest.raises(DataError, match="parameters"):
        InvertedFile.merge_shards_to_disk([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_failing_chunk_source_leaves_nothing(tmp_path):
    chunks = _collection("asmk")
    work = tmp_path / "work"
    work.mkdir()

    def source():
        yield from chunks[:4]  # enough for a few runs with run_bytes=400
        raise OSError("feature store unreadable")

    with pytest.raises(OSError, match="unreadable"):
        InvertedFile.build_on_disk(tmp_path / "ix", source(), N_WORDS, "asmk", run_bytes=400, workdir=work)
    assert sorted(os.listdir(tmp_path)) == ["work"] and os.listdir(work) == []


def test_failure_during_the_merge_leaves_nothing_and_keeps_the_previous_index(tmp_path, monkeypatch):
    chunks = _collection("asmk")
    InvertedFile.build_on_disk(tmp_path / "ix", iter(chunks[:2]), N_WORDS, "asmk")
    real, calls = invmod._NpyWriter.write, []

    def failing(self, a):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(self, a)

    monkeypatch.setattr(invmod._NpyWriter, "write", failing)
    with pytest.raises(OSError, match="disk full"):
        InvertedFile.build_on_disk(tmp_path / "ix", iter(chunks), N_WORDS, "asmk", run_bytes=400, mem_bytes=64 * 40)
    assert len(calls) == 5
    assert os.listdir(tmp_path) == ["ix"]
    assert InvertedFile.load(tmp_path / "ix", verify=True).n_images_ == chunks[0][4] + chunks[1][4]


def test_bad_chunk_is_refused_and_leaves_nothing(tmp_path):
    chunks = _collection("asmk")
    bad = (np.array([0, N_WORDS]), np.array([0, 0]), np.zeros((2, 2), np.uint64), None, 1)
    with pytest.raises(DataError, match="word ids"):
        InvertedFile.build_on_disk(tmp_path / "ix", [chunks[0], bad], N_WORDS, "asmk")
    assert os.listdir(tmp_path) == []


def test_empty_collection_builds_an_empty_index(tmp_path):
    InvertedFile.build_on_disk(tmp_path / "ix", [], N_WORDS, "bow")
    ivf = InvertedFile.load(tmp_path / "ix", verify=True)
    assert ivf.n_images_ == 0 and ivf.n_entries == 0 and len(ivf.indptr_) == N_WORDS + 1
