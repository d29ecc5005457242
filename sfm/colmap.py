"""The only module that talks to pycolmap (pinned to 4.2.1: its API changes between releases).

Writes a COLMAP database from our features and verified pairs, and runs incremental mapping per
connected component in a child process with a hard timeout, so that a crash or hang of COLMAP in
one component cannot stop the others. Reconstructions are returned as plain arrays
(``export_model``) so that nothing else in the package needs pycolmap.

Run as ``python -m bowretrieval.sfm.colmap JOB.json`` (the child side of ``map_components``).
"""
from __future__ import annotations

import zlib  # noqa: F401  must precede pycolmap: pycolmap 4.2 exports its own zlib (see docs/sfm.md)

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from bowretrieval.errors import BowRetrievalError, ConfigError

PYCOLMAP_VERSION = "4.2.1"


class SfmError(BowRetrievalError):
    """Structure-from-motion failed or its inputs are unusable (names the file and the fix)."""


def _pycolmap():
    try:
        import pycolmap
    except ImportError as exc:
        raise SfmError("pycolmap is not installed; install the sfm extra: pip install 'bowretrieval[sfm]' "
                       f"(pycolmap=={PYCOLMAP_VERSION})") from exc
    version = getattr(pycolmap, "__version__", "?")
    if version != PYCOLMAP_VERSION:
        raise SfmError(f"pycolmap {version} is installed but bowretrieval.sfm is written against "
                       f"{PYCOLMAP_VERSION} (the API changes between releases); "
                       f"pip install pycolmap=={PYCOLMAP_VERSION}")
    return pycolmap


def check_pycolmap() -> str:
    """The pycolmap version, or an SfmError explaining how to install the supported one."""
    return _pycolmap().__version__


# --------------------------------------------------------------------------------------------------
# database
# --------------------------------------------------------------------------------------------------
@dataclass
class DbImage:
    name: str  # path relative to the image root
    width: int
    height: int
    keypoints: np.ndarray  # (N, 2) float, OpenCV convention (pixel centres at integers)
    descriptors: np.ndarray  # (N, 128) uint8 SIFT
    focal: float = 0.0  # prior focal length in pixels (0: COLMAP's default 1.2 x max side)


@dataclass
class DbPair:
    i: int  # indices into the image list
    j: int
    matches: np.ndarray  # (M, 2) tentative correspondences (feature indices)
    inliers: np.ndarray  # (K, 2) epipolar inliers
    F: np.ndarray | None = None


def write_database(path, images, pairs) -> dict:
    """Create a fresh COLMAP database at ``path``; returns {image name: COLMAP image id}.

    One SIMPLE_RADIAL camera per image (unknown photos), keypoints shifted by +0.5 px (COLMAP puts
    the pixel origin at the corner), uint8 descriptors, raw matches and two-view geometries
    (mapping needs the latter: raw matches alone give "no images with matches").
    """
    pycolmap = _pycolmap()
    path = os.fspath(path)
    if os.path.exists(path):
        os.remove(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    db = pycolmap.Database.open(path)
    ids = {}
    try:
        for im in images:
            w, h = int(im.width), int(im.height)
            f = float(im.focal) if im.focal > 0 else 1.2 * max(w, h)
            cam = pycolmap.Camera(model="SIMPLE_RADIAL", width=w, height=h,
                                  params=[f, w / 2.0, h / 2.0, 0.0], has_prior_focal_length=im.focal > 0)
            cam_id = db.write_camera(cam)
            image_id = db.write_image(pycolmap.Image(name=im.name, camera_id=cam_id))
            ids[im.name] = image_id
            kp = np.asarray(im.keypoints, np.float32).reshape(-1, 2) + 0.5
            db.write_keypoints(image_id, np.ascontiguousarray(kp))
            desc = np.ascontiguousarray(np.asarray(im.descriptors, np.uint8).reshape(-1, 128))
            db.write_descriptors(image_id, pycolmap.FeatureDescriptors(pycolmap.FeatureExtractorType.SIFT, desc))
        done = set()
        for p in pairs:
            a, b = ids[images[p.i].name], ids[images[p.j].name]
            key = (min(a, b), max(a, b))
            if a == b or key in done:
                continue  # rewriting an existing pair raises in pycolmap
            done.add(key)
            m = np.asarray(p.matches, np.uint32).reshape(-1, 2)
            inl = np.asarray(p.inliers, np.uint32).reshape(-1, 2)
            db.write_matches(a, b, np.ascontiguousarray(m))
            tvg = pycolmap.TwoViewGeometry()
            tvg.config = pycolmap.TwoViewGeometryConfiguration.UNCALIBRATED
            if p.F is not None:
                tvg.F = np.asarray(p.F, np.float64)
            tvg.inlier_matches = np.ascontiguousarray(inl)
            db.write_two_view_geometry(a, b, tvg)
    finally:
        db.close()
    return ids


# --------------------------------------------------------------------------------------------------
# child-process jobs: matching and mapping run under a hard timeout (a hung pycolmap ignores SIGTERM)
# --------------------------------------------------------------------------------------------------
@dataclass
class JobResult:
    ok: bool
    seconds: float
    message: str = ""
    data: dict = field(default_factory=dict)


def _child_env():
    env = dict(os.environ)
    # the child must import this very package, also from a source checkout
    root = os.path.dirname(os.path.dirname(os.path.abspath(__import__("bowretrieval").__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_job(job: dict, workdir, timeout: float | None = None) -> JobResult:
    """Run one adapter job (a JSON-able dict with a 'kind') in a fresh Python process.

    The child is killed with SIGKILL after ``timeout`` seconds. Never raises for a failing job:
    the failure is described in the result so that a batch can go on with the next one.
    """
    os.makedirs(workdir, exist_ok=True)
    name = job.get("name", job["kind"])
    job_path = os.path.join(workdir, f"{name}.job.json")
    result_path = os.path.join(workdir, f"{name}.result.json")
    log_path = os.path.join(workdir, f"{name}.log")
    if os.path.exists(result_path):
        os.remove(result_path)
    with open(job_path, "w") as fh:
        json.dump(dict(job, result=result_path), fh, indent=1)
    t0 = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bowretrieval.sfm.colmap", job_path],
                                stdout=log, stderr=subprocess.STDOUT, env=_child_env())
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # SIGKILL
            proc.wait()
            return JobResult(False, time.time() - t0, f"{name}: killed after the {timeout:.0f} s timeout "
                             f"(log: {log_path}); raise sfm.colmap_timeout if the component is large")
    seconds = time.time() - t0
    if rc != 0 or not os.path.exists(result_path):
        tail = ""
        try:
            with open(log_path, "rb") as fh:
                lines = [ln for ln in fh.read().decode("utf8", "replace").splitlines() if ln.strip()]
            tail = lines[-1] if lines else ""
        except OSError:
            pass
        how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
        return JobResult(False, seconds, f"{name}: COLMAP process failed ({how}): {tail} (log: {log_path})")
    with open(result_path) as fh:
        data = json.load(fh)
    return JobResult(True, seconds, "", data)


def _matching_options(pycolmap, job):
    mo = pycolmap.FeatureMatchingOptions()
    mo.num_threads = int(job.get("threads", 1))
    mo.use_gpu = False
    mo.sift.max_ratio = float(job.get("max_ratio", 0.8))
    mo.sift.cross_check = True
    vo = pycolmap.TwoViewGeometryOptions()
    vo.min_num_inliers = int(job.get("min_inliers", 15))
    vo.ransac.max_error = float(job.get("max_error", 4.0))
    vo.ransac.random_seed = int(job.get("seed", 0))
    return mo, vo


def _job_match(pycolmap, job):
    """Match the listed pairs (or all pairs) with COLMAP's SIFT matcher and verify them."""
    mo, vo = _matching_options(pycolmap, job)
    if job.get("exhaustive"):
        pycolmap.match_exhaustive(job["database"], matching_options=mo, verification_options=vo,
                                  device=pycolmap.Device.cpu)
    else:
        po = pycolmap.ImportedPairingOptions()
        po.match_list_path = job["pairs_file"]
        pycolmap.match_image_pairs(job["database"], matching_options=mo, pairing_options=po,
                                   verification_options=vo, device=pycolmap.Device.cpu)
    db = pycolmap.Database.open(job["database"])
    try:
        names = {im.image_id: im.name for im in db.read_all_images()}
        pair_ids, counts = db.read_two_view_geometry_num_inliers()
        verified = []
        for pid, n in zip(pair_ids, counts):
            a, b = pycolmap.pair_id_to_image_pair(pid)
            verified.append([names[a], names[b], int(n)])
        return dict(matched_pairs=int(db.num_matched_image_pairs()), verified=verified)
    finally:
        db.close()


def _job_map(pycolmap, job):
    """Incremental mapping restricted to one component's images; models exported as arrays."""
    db = pycolmap.Database.open(job["database"])
    try:
        known = {im.name for im in db.read_all_images()}
    finally:
        db.close()
    missing = [n for n in job["images"] if n not in known]
    if missing:
        raise SfmError(f"{job['database']}: {len(missing)} component images are not in the database "
                       f"(e.g. {missing[0]!r}); rebuild the database")
    pycolmap.set_random_seed(int(job.get("seed", 0)))
    o = pycolmap.IncrementalPipelineOptions()
    o.image_names = list(job["images"])
    o.random_seed = int(job.get("seed", 0))
    o.num_threads = int(job.get("threads", 1))
    o.min_model_size = int(job.get("min_model_size", 3))
    o.multiple_models = True
    o.extract_colors = False
    o.min_num_matches = int(job.get("min_num_matches", 15))
    o.mapper.init_min_num_inliers = int(job.get("init_min_num_inliers", 30))
    o.mapper.init_min_tri_angle = float(job.get("init_min_tri_angle", 4.0))
    o.mapper.abs_pose_min_num_inliers = int(job.get("abs_pose_min_num_inliers", 20))
    o.mapper.random_seed = o.random_seed
    o.triangulation.random_seed = o.random_seed
    out = job["output"]
    os.makedirs(out, exist_ok=True)
    recs = pycolmap.incremental_mapping(job["database"], job.get("image_root", "."), out, o)
    models = []
    for k, rec in sorted(recs.items()):
        d = os.path.join(out, str(k))
        os.makedirs(d, exist_ok=True)
        rec.write(d)
        arrays = _model_arrays(rec)
        np.savez(os.path.join(d, "model.npz"), **arrays)
        models.append(dict(path=d, registered=int(rec.num_reg_images()), points=int(rec.num_points3D()),
                           reprojection_error=float(rec.compute_mean_reprojection_error())))
    return dict(models=models)


def _model_arrays(rec) -> dict:
    """Plain arrays of one reconstruction: cameras, 3-D points and who observes what (CSR)."""
    images = sorted(rec.images.values(), key=lambda im: im.name)
    images = [im for im in images if im.has_pose]
    pids = sorted(rec.points3D.keys())
    pindex = {p: i for i, p in enumerate(pids)}
    xyz = np.array([rec.points3D[p].xyz for p in pids], np.float64).reshape(-1, 3)
    names, C, R, focal, size, indptr, obs, depth, kp_xy = [], [], [], [], [], [0], [], [], []
    for im in images:
        cam = rec.cameras[im.camera_id]
        T = im.cam_from_world()
        Rm = np.asarray(T.rotation.matrix(), np.float64)
        t = np.asarray(T.translation, np.float64)
        names.append(im.name)
        R.append(Rm)
        C.append(-Rm.T @ t)
        focal.append(float(cam.mean_focal_length()))
        size.append([cam.width, cam.height])
        ids = []
        xy = []
        for p2 in im.points2D:
            if p2.has_point3D():
                ids.append(pindex[p2.point3D_id])
                xy.append(np.asarray(p2.xy, np.float64) - 0.5)  # back to the OpenCV pixel convention
        ids = np.asarray(ids, np.int64)
        ids, first = np.unique(ids, return_index=True)
        obs.append(ids)
        depth.append((xyz[ids] @ Rm.T + t)[:, 2] if len(ids) else np.zeros(0))
        kp_xy.append(np.asarray(xy, np.float64).reshape(-1, 2)[first])
        indptr.append(indptr[-1] + len(ids))
    cat = lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape)  # noqa: E731
    errors = np.array([rec.points3D[p].error for p in pids], np.float64)
    return dict(names=np.array(names, dtype=str), C=np.array(C, np.float64).reshape(-1, 3),
                R=np.array(R, np.float64).reshape(-1, 3, 3), focal=np.array(focal, np.float64),
                size=np.array(size, np.int64).reshape(-1, 2), points=xyz, point_error=errors,
                obs_indptr=np.array(indptr, np.int64), obs_point=cat(obs, (0,)).astype(np.int64),
                obs_depth=cat(depth, (0,)).astype(np.float64), obs_xy=cat(kp_xy, (0, 2)).astype(np.float64))


_JOBS = {"match": _job_match, "map": _job_map}


def _child_main(job_path) -> int:
    with open(job_path) as fh:
        job = json.load(fh)
    kind = job.get("kind")
    if kind not in _JOBS:
        raise ConfigError(f"{job_path}: unknown job kind {kind!r}")
    pycolmap = _pycolmap()
    if job.get("quiet", True):
        try:
            pycolmap.logging.minloglevel = 2  # warnings and errors only
        except Exception:
            pass
    data = _JOBS[kind](pycolmap, job)
    tmp = job["result"] + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, job["result"])
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m bowretrieval.sfm.colmap JOB.json", file=sys.stderr)
        sys.exit(2)
    try:
        sys.exit(_child_main(sys.argv[1]))
    except BowRetrievalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
