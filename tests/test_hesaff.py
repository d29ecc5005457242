"""Hessian-Affine detector + SIFT: generated blobs and ellipses for geometry, degenerate inputs,
thread invariance, several measurement regions, and graf1/graf3 for repeatability on real photos."""
import json

import cv2
import numpy as np
import pytest

from bowretrieval.errors import ConfigError, DataError
from bowretrieval.features import MR_SIZE, get_extractor
from bowretrieval.hesaff import MULTI_REGIONS, HessianAffine


def blob_image(h=160, w=160, centre=(70.0, 90.0), sigma=(6.0, 6.0), angle=0.0, amp=150.0, base=50.0):
    """A Gaussian blob (std ``sigma`` along its axes, rotated by ``angle`` degrees) on a flat background."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dx, dy = xx - centre[0], yy - centre[1]
    c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
    u, v = c * dx + s * dy, -s * dx + c * dy
    g = np.exp(-0.5 * ((u / sigma[0]) ** 2 + (v / sigma[1]) ** 2))
    return (base + amp * g).astype(np.float32)


def nearest(frames, xy):
    d = np.hypot(frames[:, 0] - xy[0], frames[:, 1] - xy[1])
    i = int(np.argmin(d))
    return i, float(d[i])


def frame_scale(f):
    """Detected scale of a frame: sqrt(det A) / mr-size."""
    return float(np.sqrt(abs(f[2] * f[5] - f[3] * f[4])) / MR_SIZE)


@pytest.mark.parametrize("mode", ["compat", "fast"])
def test_blob_detected_at_its_centre_and_scale(mode):
    feats = HessianAffine(mode=mode).extract(blob_image(sigma=(6.0, 6.0)))
    i, dist = nearest(feats.frames, (70.0, 90.0))
    assert dist < 0.5
    # the scale-normalised det(Hessian) of a Gaussian of std s0 peaks at sigma = s0
    assert frame_scale(feats.frames[i]) == pytest.approx(6.0, rel=0.15)


def test_isotropic_blob_gives_a_circular_upright_frame():
    feats = HessianAffine().extract(blob_image(sigma=(6.0, 6.0)))
    f = feats.frames[nearest(feats.frames, (70.0, 90.0))[0]]
    A = f[2:].reshape(2, 2)
    assert A[0, 1] == 0.0  # up-right: the patch's vertical axis stays vertical
    sv = np.linalg.svd(A, compute_uv=False)
    assert sv[0] / sv[1] < 1.1


@pytest.mark.parametrize("angle", [0.0, 30.0])
def test_elongated_blob_gets_its_affine_shape(angle):
    img = blob_image(h=200, w=200, centre=(100.0, 100.0), sigma=(10.0, 5.0), angle=angle)
    feats = HessianAffine().extract(img)
    i, dist = nearest(feats.frames, (100.0, 100.0))
    assert dist < 1.0
    A = feats.frames[i, 2:].reshape(2, 2).astype(np.float64)
    # the frame's ellipse A A^T follows the blob's covariance as seen through the isotropic blur of
    # the pyramid level (differentiation scale ~ 5.6 px here): axes ratio sqrt((100 + 31) / (25 + 31))
    evals, evecs = np.linalg.eigh(A @ A.T)
    assert np.sqrt(evals[1] / evals[0]) == pytest.approx(np.sqrt(131.0 / 56.0), rel=0.1)
    major = np.rad2deg(np.arctan2(evecs[1, 1], evecs[0, 1])) % 180.0
    assert min(abs(major - angle), 180.0 - abs(major - angle)) < 4.0


def test_several_regions_give_one_descriptor_per_region():
    img = blob_image()
    one = HessianAffine(regions=(1.0,)).extract(img)
    many = HessianAffine(regions=(0.5, 1.0, 1.5)).extract(img)
    assert many.descriptors.shape == (len(many), 3, 128)
    assert many.descriptors.dtype == np.uint8
    np.testing.assert_array_equal(many.frames, one.frames)
    np.testing.assert_array_equal(many.descriptors[:, 1], one.descriptors)
    assert not np.array_equal(many.descriptors[:, 0], many.descriptors[:, 2])


def test_default_multi_region_set_is_the_documented_one():
    assert MULTI_REGIONS == (0.5, 0.75, 1.0, 1.25, 1.5)
    feats = HessianAffine(regions=MULTI_REGIONS).extract(blob_image())
    assert feats.descriptors.shape[1:] == (5, 128)


def test_sift_descriptors_are_normalised_uint8(textured_image):
    feats = HessianAffine().extract(textured_image)
    assert len(feats) > 20
    d = feats.descriptors.astype(np.float64) / 512.0
    norms = np.linalg.norm(d, axis=1)
    assert np.all(np.abs(norms - 1.0) < 0.02)  # L2 / clip 0.2 / L2, quantised


@pytest.mark.parametrize("img", [np.full((100, 120), 77.0, np.float32), np.zeros((8, 8), np.float32),
                                 np.zeros((0, 0), np.float32), blob_image(h=12, w=12, centre=(6, 6), sigma=(2, 2))])
def test_constant_or_tiny_images_give_zero_features(img):
    feats = HessianAffine(regions=(0.5, 1.0)).extract(img)
    assert feats.frames.shape == (0, 6)
    assert feats.descriptors.shape == (0, 2, 128)


def test_no_nan_or_inf_reaches_the_output():
    rng = np.random.default_rng(3)
    img = rng.uniform(0, 255, (120, 150)).astype(np.float32)
    img[5:9, 5:9] = np.nan
    img[50, 60] = np.inf
    for mode in ("compat", "fast"):
        feats = HessianAffine(mode=mode, orientation="dominant").extract(img)
        assert len(feats) > 0
        assert np.isfinite(feats.frames).all()
        assert np.isfinite(feats.descriptors.astype(np.float32)).all()


def test_frames_are_in_original_pixels_after_internal_downscaling():
    img = blob_image(h=400, w=600, centre=(420.0, 130.0), sigma=(12.0, 12.0))
    feats = HessianAffine(max_side=300).extract(img)  # works on a half-size image
    i, dist = nearest(feats.frames, (420.0, 130.0))
    assert dist < 1.5
    assert frame_scale(feats.frames[i]) == pytest.approx(12.0, rel=0.15)


def test_threads_give_identical_results(textured_image):
    a = HessianAffine(orientation="dominant", regions=(0.5, 1.0), threads=1).extract(textured_image)
    b = HessianAffine(orientation="dominant", regions=(0.5, 1.0), threads=2).extract(textured_image)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.descriptors, b.descriptors)


def test_dominant_orientation_frames_rotate_the_upright_shape(textured_image):
    up = HessianAffine(orientation="upright").extract(textured_image)
    dom = HessianAffine(orientation="dominant").extract(textured_image)
    assert len(dom) >= len(up)  # up to 4 orientations per region
    for f in dom.frames[:50]:
        i, dist = nearest(up.frames, f[:2])
        assert dist == 0.0
        A, B = f[2:].reshape(2, 2), up.frames[i, 2:].reshape(2, 2)
        np.testing.assert_allclose(A @ A.T, B @ B.T, rtol=1e-3, atol=1e-2)


def test_oriented_descriptors_survive_a_90_degree_rotation(textured_image):
    ex = HessianAffine(orientation="dominant")
    a = ex.extract(textured_image)
    rot = np.ascontiguousarray(np.rot90(textured_image, k=-1))  # clockwise: (x, y) -> (h - 1 - y, x)
    b = ex.extract(rot)
    h = textured_image.shape[0]
    proj = np.stack([h - 1 - a.frames[:, 1], a.frames[:, 0]], 1)
    da, db = a.descriptors.astype(np.float32), b.descriptors.astype(np.float32)
    good = 0
    for i in range(len(a)):
        d = np.hypot(b.frames[:, 0] - proj[i, 0], b.frames[:, 1] - proj[i, 1])
        near = np.where(d < 0.5)[0]
        if len(near) and np.min(np.linalg.norm(db[near] - da[i], axis=1)) < 0.25 * 512:
            good += 1
    assert good / len(a) > 0.8


def test_registered_and_params_are_json():
    ex = get_extractor("hesaff", mode="compat", regions=[0.5, 1.0], max_features=100)
    assert isinstance(ex, HessianAffine)
    assert json.loads(json.dumps(ex.params))["regions"] == [0.5, 1.0]


@pytest.mark.parametrize("kw", [dict(mode="slow"), dict(orientation="sideways"), dict(regions=()),
                                dict(regions=(0.0,)), dict(threshold=-1.0), dict(max_side=5),
                                dict(descriptor="surf"), dict(threads=0)])
def test_bad_parameters_raise_config_error(kw):
    with pytest.raises(ConfigError):
        HessianAffine(**kw)


def test_colour_image_is_rejected_with_a_clear_error():
    with pytest.raises(DataError, match="to_gray"):
        HessianAffine().extract(np.zeros((50, 50, 3), np.float32))


def test_max_features_keeps_the_strongest(textured_image):
    full = HessianAffine().extract(textured_image)
    few = HessianAffine(max_features=10).extract(textured_image)
    assert len(few) == 10
    strongest = np.sort(np.abs(full.meta["response"]))[::-1][:10]
    np.testing.assert_allclose(np.sort(np.abs(few.meta["response"]))[::-1], strongest)


def test_sift_patch_of_a_vertical_edge_points_along_x():
    from bowretrieval._ext import hesaff as kernel

    patch = np.zeros((41, 41), np.float32)
    patch[:, 21:] = 100.0  # gradient along +x: orientation bin 0 in every cell crossing the edge
    d = kernel.sift_patch(patch).reshape(4, 4, 8)
    assert np.linalg.norm(d) == pytest.approx(1.0, abs=1e-5)
    energy = (d ** 2).sum(axis=(0, 1))
    assert energy[0] / energy.sum() > 0.95


def _photometric(patch):
    """The reference program's photometric normalisation, written out: mean 128 and standard deviation
    50 over the pixels under the descriptor's circular mask (radius 20 for a 41x41 patch), clamped."""
    P = patch.shape[0]
    yy, xx = np.mgrid[0:P, 0:P]
    inside = (yy - P // 2) ** 2 + (xx - P // 2) ** 2 < (P // 2) ** 2
    vals = patch[inside].astype(np.float64)
    out = 128.0 + 50.0 / vals.std() * (patch.astype(np.float64) - vals.mean())
    return np.clip(out, 0.0, 255.0).astype(np.float32)


def test_sift_photometric_normalisation_only_matters_where_it_clamps():
    from bowretrieval._ext import hesaff as kernel

    yy, xx = np.mgrid[0:41, 0:41].astype(np.float32)
    soft = (100.0 + 10.0 * np.sin(xx / 4.0) + 5.0 * np.cos(yy / 3.0)).astype(np.float32)
    # a low-contrast patch stays inside 0..255 after normalisation: SIFT is unchanged
    np.testing.assert_allclose(kernel.sift_patch(soft, photometric=True), kernel.sift_patch(soft), atol=1e-5)
    # a small bright spot on it saturates at 255 after normalisation: its gradients are cut, as in
    # the reference program, and the descriptor is the plain SIFT of the clamped patch
    spot = soft.copy()
    spot[18:23, 18:23] += 400.0
    ref = kernel.sift_patch(spot, photometric=True)
    assert np.abs(ref - kernel.sift_patch(spot)).max() > 0.05
    np.testing.assert_allclose(ref, kernel.sift_patch(_photometric(spot)), atol=1e-4)


def test_compat_reproduces_the_reference_program(textured_image):
    """Same 8-bit image in, the same regions and descriptors out (pyhesaff is the reference's wheel)."""
    pyhesaff = pytest.importorskip("pyhesaff", reason="pyhesaff (benchmark-only dependency) not installed")
    from scipy.spatial import cKDTree

    g8 = np.clip(np.rint(textured_image), 0, 255).astype(np.uint8)
    kpts, ref_desc = pyhesaff.detect_feats_in_image(np.ascontiguousarray(np.dstack([g8, g8, g8])))
    ours = HessianAffine(mode="compat").extract(g8.astype(np.float32))
    assert len(ours) == len(kpts) > 50
    # its frames are (x, y, a11, a21, a22): the lower-triangular up-right frame
    dist, j = cKDTree(ours.frames[:, :2]).query(kpts[:, :2])
    A = ours.frames[j][:, [2, 4, 5]]
    shape = np.linalg.norm(A - kpts[:, 2:5], axis=1) / np.linalg.norm(kpts[:, 2:5], axis=1)
    assert np.all(dist < 0.01) and np.all(shape < 0.01)
    # descriptors agree up to the last bit of the uint8 quantisation
    diff = np.abs(ours.descriptors[j].astype(int) - ref_desc.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01


# -- real photos --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graf(shared_data):
    from bowretrieval.featureeval import load_homography
    from bowretrieval.imageio import load_gray

    d = shared_data / "pairs"
    if not (d / "graf1.png").exists():
        pytest.skip(f"{d}/graf1.png missing")
    return load_gray(d / "graf1.png").gray, load_gray(d / "graf3.png").gray, load_homography(d / "H1to3p.xml")


@pytest.mark.parametrize("mode", ["compat", "fast"])
def test_graf_repeatability_and_matches(graf, mode):
    from bowretrieval.descriptors import rootsift
    from bowretrieval.featureeval import consistent_matches, mutual_nn, repeatability

    g1, g3, H = graf
    ex = HessianAffine(mode=mode, threads=2)
    a, b = ex.extract(g1), ex.extract(g3)
    # the reference program finds 2346 regions on graf1 (its own colour -> (R+G+B)/3 path, the grey
    # we load); compat reproduces its behaviour
    assert 2100 < len(a) < 2900
    if mode == "compat":
        assert len(a) == pytest.approx(2346, rel=0.005)
    rep = repeatability(a.frames, b.frames, H, g1.shape, g3.shape)["repeatability"]
    assert rep > 0.42  # reference program: 0.437 with the same measure
    m = consistent_matches(a.frames, b.frames, mutual_nn(rootsift(a.descriptors), rootsift(b.descriptors)), H)
    assert m > 450
