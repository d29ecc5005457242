"""Exact k-nearest-word search (bowretrieval.knn): same answer as a brute-force search."""
import numpy as np
import pytest

from bowretrieval import knn
from bowretrieval.errors import DataError
from bowretrieval.vocabulary import Vocabulary


def sqd(X, C):
    X, C = X.astype(np.float64), C.astype(np.float64)
    return np.maximum((X ** 2).sum(1)[:, None] + (C ** 2).sum(1)[None] - 2 * X @ C.T, 0)


def brute(X, C, k):
    d = sqd(X, C)
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, ids, 1), ids


def clustered(rng, n, d, centers=40, spread=0.15, nonneg=True):
    """SIFT-like data: points around a few centres, optionally non-negative and L2-normalised."""
    mu = rng.random((centers, d)) if nonneg else rng.standard_normal((centers, d))
    X = mu[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, d))
    if nonneg:
        X = np.abs(X)
        X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32)


def check_same(X, C, k, dist, ids):
    """ids equal to brute force except inside ties closer than float rounding; distances exact."""
    bd, bi = brute(X, C, k)
    np.testing.assert_allclose(dist, bd, rtol=1e-5, atol=1e-5)
    differ = ids != bi
    if differ.any():  # only where the true distances tie within rounding
        true_of_ours = np.take_along_axis(sqd(X, C), ids.astype(np.int64), 1)
        assert np.abs(true_of_ours - bd)[differ].max() < 1e-5
    return float(differ.mean())


@pytest.mark.parametrize("K,D,k,nonneg", [(1000, 128, 5, True), (1003, 128, 1, True), (517, 64, 7, False),
                                          (300, 10, 3, False), (40, 3, 40, False), (200, 128, 64, True)])
@pytest.mark.parametrize("simd", [True, False])
def test_matches_brute_force(K, D, k, nonneg, simd):
    rng = np.random.default_rng(K + D + k)
    C = clustered(rng, K, D, nonneg=nonneg)
    X = clustered(rng, 333, D, nonneg=nonneg)
    ex = knn.ExactKnn(C, screen_dims=48)
    dist, ids = ex.search(X, k, simd=simd)
    assert ids.dtype == np.int32 and ids.shape == (333, k) and dist.shape == (333, k)
    assert np.all(np.diff(dist, axis=1) >= 0)
    assert check_same(X, C, k, dist, ids) < 0.01


@pytest.mark.parametrize("simd", [True, False])
def test_screen_prunes_structured_data(simd):
    """Descriptors whose variance sits in few directions (like SIFT) need few exact distances."""
    rng = np.random.default_rng(7)
    A = rng.standard_normal((24, 128)) * np.linspace(1, 0.1, 24)[:, None]
    C = (rng.standard_normal((4000, 24)) @ A + 0.02 * rng.standard_normal((4000, 128))).astype(np.float32)
    X = (rng.standard_normal((500, 24)) @ A + 0.02 * rng.standard_normal((500, 128))).astype(np.float32)
    ex = knn.ExactKnn(C, screen_dims=32)
    dist, ids = ex.search(X, 5, simd=simd)
    check_same(X, C, 5, dist, ids)
    assert ex.n_exact_ < 0.02 * len(C) * len(X)


def test_queries_far_from_words_and_duplicates():
    rng = np.random.default_rng(1)
    C = clustered(rng, 600, 128)
    C[100:110] = C[5]                       # exact duplicates: ties broken by the lower index
    X = np.concatenate([C[5:6], 10.0 * np.ones((3, 128), np.float32), np.zeros((2, 128), np.float32)])
    dist, ids = knn.ExactKnn(C).search(X, 5)
    assert ids[0].tolist() == [5, 100, 101, 102, 103]
    assert np.all(dist[0] == 0)
    check_same(X, C, 5, dist, ids)


def test_constant_words_and_threads():
    C = np.zeros((50, 16), np.float32)
    C[7] = 1.0
    X = np.ones((5, 16), np.float32)
    dist, ids = knn.ExactKnn(C).search(X, 2)
    assert ids[:, 0].tolist() == [7] * 5 and ids[:, 1].tolist() == [0] * 5
    rng = np.random.default_rng(2)
    C = clustered(rng, 2000, 128)
    X = clustered(rng, 1500, 128)
    one = knn.ExactKnn(C, threads=1).search(X, 5)
    two = knn.ExactKnn(C, threads=2).search(X, 5)
    assert np.array_equal(one[1], two[1]) and np.array_equal(one[0], two[0])


def test_bad_arguments():
    C = np.random.default_rng(0).random((100, 8)).astype(np.float32)
    ex = knn.ExactKnn(C)
    with pytest.raises(ValueError, match="k=0"):
        ex.search(C[:2], 0)
    with pytest.raises(ValueError, match="k=65"):
        knn.ExactKnn(np.random.default_rng(0).random((100, 8)).astype(np.float32)).search(C[:2], knn.MAX_K + 1)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        ex.search(np.zeros((2, 9), np.float32), 1)
    with pytest.raises(ValueError, match="finite"):
        knn.ExactKnn(np.full((3, 4), np.nan, np.float32))
    d, i = ex.search(np.zeros((0, 8), np.float32), 3)
    assert d.shape == (0, 3) and i.shape == (0, 3)


def test_vocabulary_assign_uses_it_and_agrees_with_faiss(monkeypatch):
    rng = np.random.default_rng(3)
    C = clustered(rng, 1500, 128)
    X = clustered(rng, 800, 128)
    voc = Vocabulary(size=1500, search="exact", threads=1)
    voc.centroids_ = C
    ids, dist = voc.assign(X, 5, return_distances=True)
    if knn.available():
        assert voc._knn is not None and voc._knn.n_exact_ > 0
    flat = Vocabulary(size=1500, search="exact", threads=1)
    flat.centroids_ = C
    flat.exact_kernel = "faiss"
    fids, fdist = flat.assign(X, 5, return_distances=True)
    np.testing.assert_allclose(dist, fdist, rtol=1e-4, atol=1e-5)
    assert np.mean(ids == fids) > 0.999
    # more words than the kernel's k limit fall back to faiss
    assert voc.assign(X[:3], knn.MAX_K + 1).shape == (3, knn.MAX_K + 1)
    # new centroids are picked up
    voc.centroids_ = C[::-1].copy()
    assert np.array_equal(voc.assign(X[:50], 1)[:, 0], 1499 - ids[:50, 0])
    voc.exact_kernel = "bogus"
    with pytest.raises(DataError, match="exact_kernel"):
        voc.assign(X[:2], 1)


def test_auto_screen_dims_follow_the_words_variance():
    rng = np.random.default_rng(9)
    A = rng.standard_normal((24, 128))
    low = (rng.standard_normal((3000, 24)) @ A + 0.01 * rng.standard_normal((3000, 128))).astype(np.float32)
    iso = rng.standard_normal((3000, 128)).astype(np.float32)
    assert knn.ExactKnn(low).screen_dims == 32          # 24 axes hold nearly all the variance
    assert knn.ExactKnn(iso).screen_dims == 64          # no axis stands out: the widest screen
    assert knn.ExactKnn(iso[:, :20]).screen_dims == 20  # never more than the dimension
    assert knn.ExactKnn(iso, screen_dims=16).screen_dims == 16
