# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Exact k-nearest-word search with an int8 lower-bound screen (C kernel in ext/knn/knn_core.c).

``search`` takes the packed screen built by ``bowretrieval.knn.ExactKnn`` and returns the k nearest
words of every descriptor with their exact squared distances. Rows are split into chunks that run
in parallel (``threads``) without the GIL.
"""
import numpy as np
cimport numpy as cnp
from cython.parallel cimport prange
from libc.stdint cimport uint8_t, int32_t, int64_t

cnp.import_array()

cdef extern from "knn_core.h" nogil:
    ctypedef struct knn_index:
        int64_t K
        int64_t K16
        int D
        int P
        const uint8_t *packed
        const float *cnorm
        float c_scale
        float c_err
        const float *cent
    int KNN_MAX_K
    int KNN_BLOCK
    int knn_cpu_supported()
    int knn_search_impl(const knn_index *ix, const float *X, const float *Xp, int64_t n, int k,
                        int32_t *out_ids, float *out_dist, int64_t *n_exact, int simd)

MAX_K = KNN_MAX_K
BLOCK = KNN_BLOCK


def cpu_supported():
    """True when this CPU runs the AVX-512 VNNI screen (otherwise callers use a flat search)."""
    return bool(knn_cpu_supported())


def search(const float[:, ::1] X, const float[:, ::1] Xp, const uint8_t[::1] packed,
           const float[::1] cnorm, float c_scale, float c_err,
           const float[:, ::1] cent, int k, int threads=1, bint simd=True, Py_ssize_t chunk=256):
    """(ids (n, k) int32, squared distances (n, k) float32, exact distances computed)."""
    cdef Py_ssize_t n = X.shape[0], K = cent.shape[0], D = cent.shape[1], P = Xp.shape[1]
    cdef Py_ssize_t K16 = cnorm.shape[0]
    if X.shape[1] != D:
        raise ValueError(f"descriptors have {X.shape[1]} dimensions, the words {D}")
    if Xp.shape[0] != n or P % 4 != 0 or P <= 0:
        raise ValueError("projected descriptors must be (n, P) with P a positive multiple of 4")
    if K16 % KNN_BLOCK != 0 or K16 < K or packed.shape[0] != K16 * P:
        raise ValueError("packed screen does not match the words")
    if not 1 <= k <= min(K, KNN_MAX_K):
        raise ValueError(f"k={k} must be between 1 and min(number of words, {KNN_MAX_K})")
    ids = np.empty((n, k), np.int32)
    dist = np.empty((n, k), np.float32)
    if n == 0:
        return ids, dist, 0
    cdef int32_t[:, ::1] ids_v = ids
    cdef float[:, ::1] dist_v = dist
    cdef knn_index ix
    ix.K = K
    ix.K16 = K16
    ix.D = <int>D
    ix.P = <int>P
    ix.packed = &packed[0]
    ix.cnorm = &cnorm[0]
    ix.c_scale = c_scale
    ix.c_err = c_err
    ix.cent = &cent[0, 0]
    cdef int use_simd = 1 if (simd and knn_cpu_supported()) else 0
    cdef Py_ssize_t nchunks = (n + chunk - 1) // chunk, c, lo, hi
    cdef int64_t[::1] exact = np.zeros(nchunks, np.int64)
    cdef int32_t[::1] rc = np.zeros(nchunks, np.int32)
    with nogil:
        for c in prange(nchunks, num_threads=max(threads, 1), schedule="dynamic"):
            lo = c * chunk
            hi = min(n, lo + chunk)
            rc[c] = knn_search_impl(&ix, &X[lo, 0], &Xp[lo, 0], hi - lo, k, &ids_v[lo, 0],
                                    &dist_v[lo, 0], &exact[c], use_simd)
    if min(rc) != 0:
        raise MemoryError("k-nearest-word search: out of memory")
    return ids, dist, int(np.sum(exact))
