"""PCA-SIFT: learned projection, shapes, persistence and errors."""
import numpy as np
import pytest

from bowretrieval.errors import ConfigError, DataError, NotFittedError
from bowretrieval.pcasift import COMMON_DIMS, PCASift


@pytest.fixture(scope="module")
def sift_like():
    """uint8 SIFT-like descriptors with a low-dimensional structure (8 latent factors), seeded."""
    rng = np.random.default_rng(0)
    basis = rng.uniform(0, 1, (8, 128)) ** 3
    w = rng.gamma(1.0, 1.0, (3000, 8))
    x = w @ basis + 0.02 * rng.uniform(0, 1, (3000, 128))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.clip(np.rint(np.minimum(x, 0.2) / np.linalg.norm(np.minimum(x, 0.2), axis=1, keepdims=True) * 512),
                   0, 255).astype(np.uint8)


@pytest.mark.parametrize("dim", COMMON_DIMS)
def test_projection_has_the_requested_dimension_and_unit_norm(sift_like, dim):
    y = PCASift(dim).fit(sift_like).transform(sift_like[:100])
    assert y.shape == (100, dim) and y.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)


def test_components_are_orthonormal_and_sorted(sift_like):
    p = PCASift(32).fit(sift_like)
    np.testing.assert_allclose(p.components_ @ p.components_.T, np.eye(32), atol=1e-5)
    assert np.all(np.diff(p.explained_variance_) <= 1e-7)
    assert p.explained_variance_ratio_[:8].sum() > 0.9  # the 8 latent factors dominate


def test_multi_region_descriptors_keep_their_layout(sift_like):
    p = PCASift(48).fit(sift_like)
    x = sift_like[:60].reshape(20, 3, 128)
    y = p.transform(x)
    assert y.shape == (20, 3, 48)
    np.testing.assert_allclose(y[:, 1], p.transform(x[:, 1]), atol=1e-6)


def test_save_load_roundtrip(tmp_path, sift_like):
    p = PCASift(64, variant="power", beta=0.4, whiten=True).fit(sift_like)
    path = p.save(tmp_path / "pca64")
    q = PCASift.load(path)
    assert q.get_params() == p.get_params()
    np.testing.assert_array_equal(q.transform(sift_like[:50]), p.transform(sift_like[:50]))


def test_refit_is_deterministic(sift_like):
    a = PCASift(32).fit(sift_like).transform(sift_like[:20])
    b = PCASift(32).fit(sift_like).transform(sift_like[:20])
    np.testing.assert_array_equal(a, b)


def test_errors(tmp_path, sift_like):
    with pytest.raises(NotFittedError):
        PCASift(32).transform(sift_like)
    with pytest.raises(ConfigError):
        PCASift(200)
    with pytest.raises(DataError):
        PCASift(32).fit(np.zeros((100, 64), np.uint8))
    with pytest.raises(DataError):
        PCASift(80).fit(sift_like[:50])
    (tmp_path / "bad.npz").write_bytes(b"not a file")
    with pytest.raises(DataError, match="refit"):
        PCASift.load(tmp_path / "bad.npz")
