"""Multiple vocabularies, joint PCA-whitening and the short-vector index (small generated data)."""
import numpy as np
import pytest
import scipy.sparse as sp

from bowretrieval.errors import ConfigError, DataError, NotFittedError
from bowretrieval.multivocab import MultiVocabulary, load_bundle_config, vocabulary_weight
from bowretrieval.shortvec import ShortVectorEncoder, ShortVectorIndex, expand_queries
from bowretrieval.vocabulary import Vocabulary
from bowretrieval.whitening import PCAWhitening


def _images(n_images=30, seed=0, regions=0):
    """Raw uint8 SIFT-like descriptors drawn around 40 prototypes, 60..140 per image."""
    rng = np.random.default_rng(seed)
    protos = rng.gamma(0.6, 40.0, size=(40, 128))
    out = []
    for _ in range(n_images):
        n = int(rng.integers(60, 140))
        d = protos[rng.integers(0, 40, n)] + rng.normal(0, 6, (n, 128))
        if regions:
            d = np.stack([d + rng.normal(0, 3, (n, 128)) for _ in range(regions)], axis=1)
        out.append(np.clip(d, 0, 255).astype(np.uint8))
    return out


BUNDLE = dict(name="t", iterations=8, short_dims=8, members=[
    dict(name="root", descriptor="rootsift", sizes=[64, 16], seed=1),
    dict(name="b04", descriptor="power", beta=0.4, sizes=[32], seed=2),
])


@pytest.fixture(scope="module")
def train():
    return _images(40, seed=1)


@pytest.fixture(scope="module")
def encoder(train):
    return ShortVectorEncoder(MultiVocabulary(BUNDLE, threads=1)).fit(train)


# -- PCA-whitening ---------------------------------------------------------------------------------
def _dense_reference(X, k):
    Xd = X.toarray() if sp.issparse(X) else X
    mu = Xd.mean(axis=0)
    C = np.cov(Xd.T)
    s, P = np.linalg.eigh(C)
    s, P = s[::-1][:k], P[:, ::-1][:, :k]
    Y = (Xd - mu) @ P / np.sqrt(s)
    return s, Y


def _sign_align(A, B):
    return B * np.sign(np.sum(A * B, axis=0))[None, :]


def test_dual_whitening_matches_dense_reference():
    X = sp.random(50, 400, density=0.08, random_state=3, format="csr")  # D > n: dual Gram + Lanczos
    w = PCAWhitening(12, method="auto").fit(X)
    assert w.method_ == "dual"
    s, Y = _dense_reference(X, 12)
    np.testing.assert_allclose(w.explained_variance_, s, rtol=1e-8)
    np.testing.assert_allclose(_sign_align(Y, w.project(X)), Y, atol=1e-6)  # float32 storage


def test_dual_and_primal_whitening_agree():
    X = sp.random(300, 700, density=0.05, random_state=4, format="csr")
    a = PCAWhitening(16, method="dual").fit(X)
    b = PCAWhitening(16, method="primal").fit(X)
    np.testing.assert_allclose(a.explained_variance_, b.explained_variance_, rtol=1e-8)
    np.testing.assert_allclose(a.transform(X), b.transform(X), atol=1e-5)


def test_whitened_training_vectors_have_identity_covariance():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(400, 30)) @ rng.normal(size=(30, 30))  # correlated, D < n: covariance method
    w = PCAWhitening(10).fit(X)
    assert w.method_ == "primal"
    Y = w.project(X)
    np.testing.assert_allclose(Y.mean(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(np.cov(Y.T), np.eye(10), atol=1e-5)


def test_whitening_output_is_l2_normalised():
    X = np.random.default_rng(6).normal(size=(100, 20))
    Y = PCAWhitening(5).fit(X).transform(X)
    assert Y.dtype == np.float32 and Y.shape == (100, 5)
    np.testing.assert_allclose(np.linalg.norm(Y, axis=1), 1, atol=1e-5)


def test_whitening_needs_more_vectors_than_components():
    with pytest.raises(DataError, match="cannot give 8 principal components"):
        PCAWhitening(8).fit(np.random.default_rng(0).normal(size=(8, 50)))


def test_whitening_rejects_nan_and_wrong_dimension():
    X = np.random.default_rng(0).normal(size=(30, 10))
    w = PCAWhitening(4).fit(X)
    Xn = X.copy()
    Xn[3, 2] = np.nan
    with pytest.raises(DataError, match="NaN"):
        PCAWhitening(4).fit(Xn)
    with pytest.raises(DataError, match="dimension 9 does not match"):
        w.transform(X[:, :9])


# -- bundle encoding ---------------------------------------------------------------------------------
def test_blocks_are_weighted_by_log_size(encoder, train):
    b = encoder.bundle
    idx, val = b.encode(train[0])
    dense = np.zeros(b.dim)
    dense[idx] = val
    base = 0
    for _, size, _ in b.blocks():
        np.testing.assert_allclose(np.linalg.norm(dense[base:base + size]), np.log(size), rtol=1e-6)
        base += size
    assert vocabulary_weight(2048) == pytest.approx(np.log(2048))


def test_block_values_are_square_rooted_counts(encoder, train):
    b = encoder.bundle
    words = b.assign(train[2])[0]  # first vocabulary (64 words)
    counts = np.bincount(words, minlength=64).astype(float)
    expect = np.sqrt(counts) / np.linalg.norm(np.sqrt(counts)) * np.log(64)
    row = b.transform([train[2]]).toarray()[0, :64]
    np.testing.assert_allclose(row, expect, rtol=1e-6)


def test_fused_assignment_equals_exact_per_vocabulary_search(encoder, train):
    b = encoder.bundle
    desc = train[3]
    fused = b.assign(desc)
    j = 0
    for mi, m in enumerate(b.members):
        X = b.member_descriptors(mi, desc)
        for _ in m.sizes:
            np.testing.assert_array_equal(fused[j], b.vocabularies_[j].assign(X)[:, 0])
            j += 1


def test_encoder_save_load_roundtrip(encoder, train, tmp_path):
    path = encoder.save(tmp_path / "enc.npz")
    again = ShortVectorEncoder.load(path)
    np.testing.assert_array_equal(again.transform(train[:5]), encoder.transform(train[:5]))
    assert again.bundle.config.members[0].name == "root"


def test_pca_sift_projection_is_stored_with_the_bundle(train, tmp_path):
    cfg = dict(name="p", iterations=4, members=[dict(name="pca24", pca_dims=24, sizes=[16], seed=3)])
    b = MultiVocabulary(cfg).fit(train)
    assert b.vocabularies_[0].dim == 24
    b2 = MultiVocabulary.load(b.save(tmp_path / "b.npz"))
    np.testing.assert_array_equal(b2.transform(train[:3]).toarray(), b.transform(train[:3]).toarray())


def test_measurement_region_members_read_their_region(tmp_path):
    imgs = _images(20, seed=2, regions=3)
    cfg = dict(name="mr", iterations=4, members=[dict(name="r0", region=0, sizes=[16], seed=1),
                                                  dict(name="r2", region=2, sizes=[16], seed=1)])
    b = MultiVocabulary(cfg).fit(imgs)
    X0, X2 = b.member_descriptors(0, imgs[0]), b.member_descriptors(1, imgs[0])
    assert not np.array_equal(X0, X2)
    from bowretrieval.descriptors import rootsift
    np.testing.assert_allclose(X2, rootsift(imgs[0][:, 2, :]))


def test_image_without_features_has_zero_vector_and_ranks_last(encoder, train):
    db = train[:10] + [np.zeros((0, 128), np.uint8)] + train[10:15]
    V = encoder.transform(db)
    assert np.all(V[10] == 0) and np.isfinite(V).all()
    ids, sims = ShortVectorIndex().fit(V).search(V[:4])
    assert (ids[:, -1] == 10).all() and np.isneginf(sims[:, -1]).all()


# -- bad input ---------------------------------------------------------------------------------------
def test_too_few_descriptors_for_the_vocabulary_size():
    cfg = dict(name="big", members=[dict(name="m", sizes=[5000])])
    with pytest.raises(DataError, match=r"member 'm'.*only \d+ training descriptors for a vocabulary of 5000"):
        MultiVocabulary(cfg).fit(_images(3))


def test_nan_descriptors_are_rejected(encoder):
    bad = np.full((5, 128), 10.0, np.float32)
    bad[2, 7] = np.nan
    with pytest.raises(DataError, match="NaN"):
        encoder.transform([bad])


def test_descriptor_dimension_must_match_the_vocabularies(encoder):
    with pytest.raises(DataError, match="dimension 64 does not match"):
        encoder.bundle.assign(np.ones((4, 64), np.float32))


def test_region_member_needs_region_axis(train):
    cfg = dict(name="mr", iterations=2, members=[dict(name="r1", region=1, sizes=[8])])
    with pytest.raises(DataError, match="no region axis"):
        MultiVocabulary(cfg).fit(train[:3])


def test_bad_bundle_config_names_the_field(tmp_path):
    p = tmp_path / "b.yaml"
    p.write_text("name: x\nmembers:\n  - {name: a, descriptor: hog, sizes: [64]}\n")
    with pytest.raises(ConfigError, match=r"members\[0\].descriptor"):
        load_bundle_config(p)
    p.write_text("name: x\nmembers:\n  - {name: a, sizez: [64]}\n")
    with pytest.raises(ConfigError, match="unknown key 'members\\[0\\].sizez'"):
        load_bundle_config(p)


def test_shipped_bundle_configs_load():
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent / "configs"
    dims = {n: MultiVocabulary(load_bundle_config(root / f"{n}.yaml")).dim
            for n in ("single8k", "mvocab", "mmeasreg", "mrootsift", "mpcasift")}
    assert dims == {"single8k": 8192, "mvocab": 32768, "mmeasreg": 10240, "mrootsift": 15872, "mpcasift": 15872}


def test_unfitted_encoder_raises():
    with pytest.raises(NotFittedError):
        ShortVectorEncoder(MultiVocabulary(BUNDLE)).transform([np.ones((3, 128))])


# -- index and query expansion ------------------------------------------------------------------------
def test_alpha_qe_weights_neighbours_by_powered_similarity():
    q = np.array([[1.0, 0.0]], np.float32)
    X = np.array([[0.8, 0.6], [0.6, -0.8], [-1.0, 0.0]], np.float32)
    ranks, sims = np.array([[0, 1, 2]]), np.array([[0.8, 0.6, -1.0]])
    got = expand_queries(q, X, ranks, sims, alpha=3.0, nqe=3)
    expect = q[0] + 0.8 ** 3 * X[0] + 0.6 ** 3 * X[1]  # negative similarity gets weight 0
    np.testing.assert_allclose(got[0], expect / np.linalg.norm(expect), rtol=1e-6)


def test_alpha_zero_is_average_query_expansion():
    q = np.array([[1.0, 0.0]], np.float32)
    X = np.array([[0.8, 0.6], [0.6, -0.8], [0.0, 1.0]], np.float32)
    got = expand_queries(q, X, np.array([[0, 1, 2]]), np.array([[0.8, 0.6, 0.0]]), alpha=0.0, nqe=2)
    expect = q[0] + X[0] + X[1]
    np.testing.assert_allclose(got[0], expect / np.linalg.norm(expect), rtol=1e-6)


def test_index_ranks_by_inner_product_and_roundtrips(tmp_path):
    rng = np.random.default_rng(8)
    V = rng.normal(size=(50, 16)).astype(np.float32)
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    Q = V[:5] + 0.1 * rng.normal(size=(5, 16)).astype(np.float32)
    index = ShortVectorIndex(qe_alpha=3, nqe=5).fit(V)
    ids, sims = index.search(Q)
    np.testing.assert_array_equal(ids, np.argsort(-(Q @ V.T), axis=1, kind="stable"))
    again = ShortVectorIndex.load(index.save(tmp_path / "idx", names=[f"im{i}" for i in range(50)]))
    np.testing.assert_array_equal(again.search(Q, qe=True)[0], index.search(Q, qe=True)[0])
    assert again.names_[3] == "im3"


def test_pq_storage_bytes_per_image():
    V = np.random.default_rng(9).normal(size=(600, 32)).astype(np.float32)
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    pq = ShortVectorIndex("pq", pq_m=8, pq_bits=8).fit(V)
    assert pq.bytes_per_image == 8 and ShortVectorIndex().fit(V).bytes_per_image == 128
    top1 = pq.search(V[:50], top=1)[0][:, 0]
    assert np.mean(top1 == np.arange(50)) > 0.8


def test_query_dimension_must_match_index():
    index = ShortVectorIndex().fit(np.eye(8, dtype=np.float32))
    with pytest.raises(DataError, match="dimension 4 does not match"):
        index.search(np.ones((1, 4), np.float32))


# -- vocabulary assignment ---------------------------------------------------------------------------
def test_hnsw_assignment_recall_against_exact():
    rng = np.random.default_rng(10)
    X = (rng.normal(size=(30000, 32)) + 3 * rng.normal(size=(300, 32))[rng.integers(0, 300, 30000)]).astype(np.float32)
    voc = Vocabulary(1024, iterations=4, seed=0, search="hnsw", hnsw_ef_search=128).fit(X[:20000])
    recall = voc.assignment_recall(X[20000:])
    assert 0.95 <= recall <= 1.0
    exact = Vocabulary(**dict(voc.get_params(), search="exact"))
    exact.centroids_ = voc.centroids_
    assert exact.assignment_recall(X[20000:]) == 1.0


def test_truncated_search_skips_images_without_features():
    V = np.array([[1, 0], [0, 0], [-0.6, 0.8], [-1, 0]], np.float32)  # image 1 has no features
    ids, sims = ShortVectorIndex().fit(V).search(np.array([[-0.1, -0.995]], np.float32), top=2)
    # scores 0.1, 0 (no features), -0.1, -0.74: the image without features never enters a top list
    np.testing.assert_array_equal(ids[0], [3, 0])


def test_very_sparse_input_takes_the_sparse_gram_path_with_the_same_result():
    X = sp.random(120, 3000, density=0.004, random_state=11, format="csr")
    a = PCAWhitening(10, method="dual").fit(X)
    b = PCAWhitening(10, method="dual").fit(X.toarray())
    np.testing.assert_allclose(a.explained_variance_, b.explained_variance_, rtol=1e-8)


def test_real_photos_retrieve_themselves(shared_data):
    """Integration: OpenCV SIFT of a few train photos, a two-member bundle, 128-D -> 4-D whitening."""
    from bowretrieval.features import get_extractor
    from bowretrieval.imageio import list_images, load_gray

    paths = list_images(shared_data / "train-photos")[:8]
    if len(paths) < 8:
        pytest.skip("train-photos has fewer than 8 photos")
    sift = get_extractor("sift")
    descs = [sift.extract(load_gray(p, max_side=400).gray).descriptors for p in paths]
    cfg = dict(name="real", iterations=5, short_dims=4, members=[
        dict(name="root", descriptor="rootsift", sizes=[64, 16], seed=1),
        dict(name="b06", descriptor="power", beta=0.6, sizes=[32], seed=2)])
    enc = ShortVectorEncoder(MultiVocabulary(cfg)).fit(descs)
    V = enc.transform(descs)
    np.testing.assert_allclose(np.linalg.norm(V, axis=1), 1, atol=1e-5)
    ids, _ = ShortVectorIndex().fit(V).search(V, top=1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(8))
