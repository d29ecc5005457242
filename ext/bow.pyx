# cython: language_level=3
"""Kernels of the baseline BoW tf-idf index: CSR posting-list construction and cosine scoring.

Posting lists hold uint32 image ids and float32 weights (tf * idf / ||v_d||), so a query's score
for image d is sum over its words w of q_w * weight(w, d), accumulated sparsely per query.
"""
import numpy as np
cimport numpy as cnp
from cython.parallel cimport prange
from libc.stdint cimport int32_t, int64_t, uint32_t
from libc.string cimport memset

cnp.import_array()


def histograms(const int64_t[::1] image_ids, const int32_t[::1] words, int64_t n_words):
    """Sparse per-(image, word) counts from one entry per assigned feature.

    Returns (img, word, count) arrays sorted by word then image: the coordinate form of the
    posting lists. Entries with a word outside [0, n_words) raise ValueError.
    """
    cdef Py_ssize_t m = image_ids.shape[0], i, u
    if words.shape[0] != m:
        raise ValueError("image_ids and words differ in length")
    cdef int64_t w
    for i in range(m):
        w = words[i]
        if w < 0 or w >= n_words:
            raise ValueError(f"word {w} outside the vocabulary of {n_words}")
    order = np.lexsort((np.asarray(image_ids), np.asarray(words)))
    cdef int64_t[::1] o = order.astype(np.int64)
    out_img = np.empty(m, np.int64)
    out_word = np.empty(m, np.int32)
    out_cnt = np.empty(m, np.float32)
    cdef int64_t[::1] oi = out_img
    cdef int32_t[::1] ow = out_word
    cdef float[::1] oc = out_cnt
    u = -1
    with nogil:
        for i in range(m):
            if u >= 0 and ow[u] == words[o[i]] and oi[u] == image_ids[o[i]]:
                oc[u] += 1
            else:
                u += 1
                oi[u] = image_ids[o[i]]
                ow[u] = words[o[i]]
                oc[u] = 1
    return out_img[:u + 1], out_word[:u + 1], out_cnt[:u + 1]


cdef void _score_one(const int32_t* qw, const float* qv, Py_ssize_t nq, const int64_t* indptr,
                     const uint32_t* ids, const float* weights, float* scores) noexcept nogil:
    cdef Py_ssize_t a, j
    cdef int32_t w
    cdef float v
    for a in range(nq):
        w = qw[a]
        v = qv[a]
        for j in range(indptr[w], indptr[w + 1]):
            scores[ids[j]] += v * weights[j]


def score_batch(const int64_t[::1] q_indptr, const int32_t[::1] q_words, const float[::1] q_weights,
                const int64_t[::1] indptr, const uint32_t[::1] ids, const float[::1] weights,
                float[:, ::1] scores, int threads=1):
    """Scores of a batch of sparse queries (CSR: q_indptr over q_words/q_weights) against the
    posting lists; ``scores`` (n_queries, n_images) is overwritten. Word ids must be in range
    (checked by the Python wrapper). Runs without the GIL, one query per thread."""
    cdef Py_ssize_t nq = q_indptr.shape[0] - 1, i, n_img = scores.shape[1]
    if scores.shape[0] != nq:
        raise ValueError("scores must have one row per query")
    if threads < 1:
        threads = 1
    for i in prange(nq, nogil=True, num_threads=threads, schedule="dynamic"):
        memset(&scores[i, 0], 0, n_img * sizeof(float))
        _score_one(&q_words[q_indptr[i]], &q_weights[q_indptr[i]], q_indptr[i + 1] - q_indptr[i],
                   &indptr[0], &ids[0], &weights[0], &scores[i, 0])
