# cython: language_level=3
"""Hessian-Affine kernels: thin GIL-free wrappers over ext/hesaff/hesaff_core.c.

The Python side (bowretrieval.hesaff) builds the Gaussian pyramid and validates every input; these
functions trust their arguments' dtypes and shapes (float32 C-contiguous images).
"""
import numpy as np
cimport numpy as cnp
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

cnp.import_array()


cdef extern from "hesaff_core.h" nogil:
    ctypedef struct hs_params:
        float threshold
        float edge_ratio
        int border
        float initial_sigma
        int smm_window
        int max_iter
        float max_aniso
        float conv_thr
        float mr_size
        int patch_size
        int mode
        int oriented
        int max_ori
        float ori_peak
        int n_regions
        const float *regions
        float check_region
        int shape_update
        int ref_flags

    ctypedef struct hs_image:
        const float *data
        int w
        int h
        float pd
        float blur

    ctypedef struct hs_kp:
        float x
        float y
        float s
        float response
        int octave
        int level

    void hs_default_params(hs_params *p)
    int hs_detect_octave(const float *const *L, int w, int h, float pd, int octave, const hs_params *p,
                         int threads, hs_kp **out, int *n, int *cap)
    int hs_describe(const hs_image *pyr, int n_pyr, const hs_kp *kps, int n, const hs_params *p,
                    int threads, float *frames, float *response, unsigned char *desc, int *count)
    int hs_sift_patch(const float *patch, int patch_size, float *out, int ref_flags)
    enum:
        HS_REF_PHOTO
        HS_REF_PYR_KSIZE
        HS_REF_ALL


cdef void _fill_params(hs_params *p, dict d, const float *regions, int n_regions):
    hs_default_params(p)
    p.threshold = d["threshold"]
    p.edge_ratio = d["edge_ratio"]
    p.mode = d["mode"]
    p.oriented = d["oriented"]
    p.max_ori = d["max_ori"]
    p.check_region = d["check_region"]
    p.shape_update = d.get("shape_update", 0)
    p.ref_flags = d.get("ref_flags", 0)
    p.regions = regions
    p.n_regions = n_regions


# ref_flags of the `compat` mode (every detail of the reference program reproduced), and the bit the
# Python side handles itself (pyramid blurs with the reference program's kernel sizes)
REF_ALL = HS_REF_ALL
REF_PYR_KSIZE = HS_REF_PYR_KSIZE


KP_DTYPE = np.dtype([("x", np.float32), ("y", np.float32), ("s", np.float32), ("response", np.float32),
                     ("octave", np.int32), ("level", np.int32)], align=True)


def detect_octave(list levels, float pd, int octave, dict params, int threads=1):
    """Scale-space extrema of det(Hessian) sigma^4 in one octave of 5 equally sized float32 levels.

    Returns a structured array (KP_DTYPE): x, y, s in image pixels, refined response, octave, level.
    """
    if len(levels) != 5:
        raise ValueError("detect_octave needs 5 levels")
    cdef cnp.ndarray arr
    cdef const float *L[5]
    cdef int h = levels[0].shape[0], w = levels[0].shape[1], k
    for k in range(5):
        arr = levels[k]
        if arr.dtype != np.float32 or not arr.flags.c_contiguous or arr.ndim != 2 \
                or arr.shape[0] != h or arr.shape[1] != w:
            raise ValueError("levels must be C-contiguous float32 arrays of one shape")
        L[k] = <const float *> cnp.PyArray_DATA(arr)
    cdef hs_params p
    _fill_params(&p, params, NULL, 0)
    cdef hs_kp *out = NULL
    cdef int n = 0, cap = 0, status
    with nogil:
        status = hs_detect_octave(L, w, h, pd, octave, &p, threads, &out, &n, &cap)
    try:
        if status != 0:
            raise MemoryError("hesaff: out of memory in detection")
        res = np.empty(n, KP_DTYPE)
        if n:
            memcpy(cnp.PyArray_DATA(res), out, n * sizeof(hs_kp))
        return res
    finally:
        free(out)


def describe(list pyramid, cnp.ndarray kps, dict params, const float[::1] regions, int threads=1):
    """Affine-adapt, orient and describe keypoints (KP_DTYPE array) on a pyramid.

    ``pyramid``: list of (image float32 (h, w), pixel distance, blur in image pixels); entry 0 is the
    input image, entry 1 + 3 o + k level k of octave o. Returns (frames (n, S, 6) float32,
    response (n, S) float32, desc (n, S, R, 128) uint8, count (n,) int32) with S orientation slots.
    """
    if kps.dtype != KP_DTYPE or not kps.flags.c_contiguous:
        raise ValueError("kps must be a C-contiguous KP_DTYPE array")
    cdef int n = kps.shape[0], R = regions.shape[0], S = params["max_ori"] if params["oriented"] else 1
    cdef int n_pyr = len(pyramid), i, status
    if R < 1:
        raise ValueError("at least one measurement region is needed")
    frames = np.zeros((n, S, 6), np.float32)
    resp = np.zeros((n, S), np.float32)
    desc = np.zeros((n, S, R, 128), np.uint8)
    count = np.zeros(n, np.int32)
    if n == 0 or n_pyr == 0:
        return frames, resp, desc, count
    cdef hs_image *pyr = <hs_image *> malloc(sizeof(hs_image) * n_pyr)
    if pyr == NULL:
        raise MemoryError()
    cdef cnp.ndarray arr
    keep = []
    try:
        for i in range(n_pyr):
            img, pd, blur = pyramid[i]
            arr = img
            if arr.dtype != np.float32 or not arr.flags.c_contiguous or arr.ndim != 2:
                raise ValueError("pyramid images must be C-contiguous float32 2-D arrays")
            keep.append(arr)
            pyr[i].data = <const float *> cnp.PyArray_DATA(arr)
            pyr[i].h = arr.shape[0]
            pyr[i].w = arr.shape[1]
            pyr[i].pd = pd
            pyr[i].blur = blur
        status = _describe(pyr, n_pyr, kps, dict(params, max_ori=S), regions, threads, frames, resp, desc, count)
        if status != 0:
            raise MemoryError("hesaff: out of memory while describing")
    finally:
        free(pyr)
    return frames, resp, desc, count


cdef int _describe(hs_image *pyr, int n_pyr, cnp.ndarray kps, dict params, const float[::1] regions,
                   int threads, cnp.ndarray frames, cnp.ndarray resp, cnp.ndarray desc, cnp.ndarray count):
    cdef hs_params p
    _fill_params(&p, params, &regions[0], regions.shape[0])
    cdef const hs_kp *k = <const hs_kp *> cnp.PyArray_DATA(kps)
    cdef int n = kps.shape[0], status
    cdef float *f = <float *> cnp.PyArray_DATA(frames)
    cdef float *r = <float *> cnp.PyArray_DATA(resp)
    cdef unsigned char *d = <unsigned char *> cnp.PyArray_DATA(desc)
    cdef int *c = <int *> cnp.PyArray_DATA(count)
    with nogil:
        status = hs_describe(pyr, n_pyr, k, n, &p, threads, f, r, d, c)
    return status


def sift_patch(const float[:, ::1] patch, bint photometric=False):
    """SIFT (4x4x8, L2 / clip 0.2 / L2) of one square float32 patch; zeros when it has no gradient.

    ``photometric``: normalise the patch first like the reference program (mean 128, standard
    deviation 50 under the descriptor mask, clamped to 0..255), as the ``compat`` mode does."""
    if patch.shape[0] != patch.shape[1] or patch.shape[0] < 8:
        raise ValueError("patch must be square with side >= 8")
    out = np.zeros(128, np.float32)
    cdef float[::1] o = out
    with nogil:
        hs_sift_patch(&patch[0, 0], patch.shape[0], &o[0], HS_REF_PHOTO if photometric else 0)
    return out
