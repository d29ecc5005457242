# cython: language_level=3
"""Kernel of spatial verification: fast spatial matching with local optimisation (ext/ransac/fsm.c)
over a batch of image pairs, one pair per thread, without the GIL.

A batch is given in CSR form: the correspondences of pair p are rows offsets[p]:offsets[p+1] of
q_frames / d_frames (the frames of the matched query and database features) and q_ids / d_ids
(their feature ids, used to keep the inliers one to one).
"""
import numpy as np
cimport numpy as cnp
from cython.parallel cimport prange
from libc.stdint cimport int32_t, int64_t, uint8_t
from libc.stdlib cimport free, malloc

cnp.import_array()


cdef extern from "fsm.h" nogil:
    ctypedef struct fsm_params:
        double threshold
        int max_hypotheses
        int lo_iterations
        int homography
        double max_scale
        double max_anisotropy
        int min_inliers
        double max_scale_change
        double max_angle

    ctypedef struct fsm_result:
        int32_t n_inliers
        int32_t kind
        int32_t n_hypotheses
        double model[9]

    int fsm_verify(const float *qf, const float *df, const int32_t *qid, const int32_t *did, int64_t m,
                   const fsm_params *p, uint8_t *inlier_mask, fsm_result *res)


def verify_batch(const float[:, ::1] q_frames, const float[:, ::1] d_frames,
                 const int32_t[::1] q_ids, const int32_t[::1] d_ids, const int64_t[::1] offsets,
                 const double[::1] thresholds, int max_hypotheses=0, int lo_iterations=4,
                 bint homography=True, double max_scale=10.0, double max_anisotropy=10.0,
                 int min_inliers=3, double max_scale_change=0.0, double max_angle=0.0, int threads=1):
    """Verify every pair of the batch. Returns (n_inliers int32 (P,), kind int32 (P,),
    models float64 (P, 3, 3), inlier mask uint8 (M,), hypotheses scored int32 (P,)).

    Shapes and offsets are checked here; frame values are not (NaN / degenerate frames give zero
    inliers in the kernel)."""
    cdef Py_ssize_t m = q_frames.shape[0], npair = offsets.shape[0] - 1, p
    if q_frames.shape[1] != 6 or d_frames.shape[1] != 6 or d_frames.shape[0] != m:
        raise ValueError("q_frames and d_frames must both be (M, 6)")
    if q_ids.shape[0] != m or d_ids.shape[0] != m:
        raise ValueError("q_ids and d_ids must have one entry per correspondence")
    if npair < 0 or thresholds.shape[0] != npair:
        raise ValueError("thresholds must have one entry per pair (len(offsets) - 1)")
    if npair > 0 and (offsets[0] != 0 or offsets[npair] != m):
        raise ValueError("offsets must start at 0 and end at the number of correspondences")
    for p in range(npair):
        if offsets[p + 1] < offsets[p]:
            raise ValueError("offsets must be non-decreasing")
    n_inl = np.zeros(max(npair, 0), np.int32)
    kinds = np.zeros(max(npair, 0), np.int32)
    n_hyp = np.zeros(max(npair, 0), np.int32)
    models = np.zeros((max(npair, 0), 3, 3), np.float64)
    mask = np.zeros(m, np.uint8)
    cdef int32_t[::1] vn = n_inl, vk = kinds, vh = n_hyp
    cdef double[:, :, ::1] vm = models
    cdef uint8_t[::1] vmask = mask
    cdef fsm_params prm
    prm.max_hypotheses = max_hypotheses
    prm.lo_iterations = lo_iterations
    prm.homography = 1 if homography else 0
    prm.max_scale = max_scale
    prm.max_anisotropy = max_anisotropy
    prm.min_inliers = min_inliers
    prm.max_scale_change = max_scale_change
    prm.max_angle = max_angle
    if threads < 1:
        threads = 1
    cdef fsm_result *res = <fsm_result *> malloc(max(npair, 1) * sizeof(fsm_result))
    if res == NULL:
        raise MemoryError()
    cdef fsm_params pp
    cdef int k
    cdef int64_t a, n
    cdef float dummy_f[6]
    cdef int32_t dummy_i[1]
    cdef uint8_t dummy_u[1]
    for p in prange(npair, nogil=True, num_threads=threads, schedule="dynamic"):
        pp = prm
        pp.threshold = thresholds[p]
        a = offsets[p]
        n = offsets[p + 1] - a
        if n > 0:
            fsm_verify(&q_frames[a, 0], &d_frames[a, 0], &q_ids[a], &d_ids[a], n, &pp, &vmask[a], &res[p])
        else:
            fsm_verify(dummy_f, dummy_f, dummy_i, dummy_i, 0, &pp, dummy_u, &res[p])
    for p in range(npair):
        vn[p] = res[p].n_inliers
        vk[p] = res[p].kind
        vh[p] = res[p].n_hypotheses
        for k in range(9):
            vm[p, k // 3, k % 3] = res[p].model[k]
    free(res)
    return n_inl, kinds, models, mask, n_hyp
