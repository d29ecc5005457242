# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Kernels of the multi-vocabulary encoder: the per-vocabulary nearest word from one fused product.

The bundle's centroids are stacked into one matrix C (W, d); the caller computes the dot products
S = X C^T with one BLAS call, and ``block_argmin`` finds, for every descriptor and every vocabulary
block [offsets[b], offsets[b+1]), the word minimising ||c||^2 - 2 x.c (= ||x - c||^2 - ||x||^2).
"""
import numpy as np
cimport numpy as cnp
from cython.parallel cimport prange
from libc.stdint cimport int32_t, int64_t

cnp.import_array()


def block_argmin(const float[:, ::1] dots, const float[::1] sqnorms, const int64_t[::1] offsets,
                 int32_t[:, ::1] out, int threads=1):
    """out[i, b] = argmin_{j in block b} sqnorms[j] - 2 dots[i, j], as a word index within block b."""
    cdef Py_ssize_t n = dots.shape[0], W = dots.shape[1], nb = offsets.shape[0] - 1
    cdef Py_ssize_t i, b, j, best
    cdef float v, bestv
    if sqnorms.shape[0] != W or offsets[nb] != W or offsets[0] != 0:
        raise ValueError("sqnorms / offsets do not match the width of dots")
    if out.shape[0] != n or out.shape[1] != nb:
        raise ValueError("out must be (n_descriptors, n_blocks)")
    for b in range(nb):
        if offsets[b + 1] <= offsets[b]:
            raise ValueError("empty vocabulary block")
    with nogil:
        for i in prange(n, num_threads=max(threads, 1), schedule="static"):
            for b in range(nb):
                best = offsets[b]
                bestv = sqnorms[best] - 2.0 * dots[i, best]
                for j in range(offsets[b] + 1, offsets[b + 1]):
                    v = sqnorms[j] - 2.0 * dots[i, j]
                    if v < bestv:
                        bestv = v
                        best = j
                out[i, b] = <int32_t>(best - offsets[b])
