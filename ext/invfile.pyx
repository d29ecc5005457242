# cython: language_level=3
"""Kernels of the inverted file (``bowretrieval.invfile``): posting-list scoring with sparse
accumulation and partial top-k, residual binarisation, self-similarities and correspondences.

Layout (CSR over visual words): ``indptr`` int64 (n_words + 1); per entry ``ids`` uint32 image id,
and a payload: float32 term frequency (BoW) or a 128-bit signature as two uint64 (SMK*/ASMK*/HQE).
Within a word, entries are sorted by image id (and by feature id for non-aggregated signatures).

Every scoring kernel computes, for a batch of sparse queries (CSR over ``q_words``),

    s(q, d) = inv_norm[d] * sum_{a in q} sum_{j in list(q_words[a]), ids[j] = d} q_weight[a] * k(a, j)

with k = tf (BoW) or k = lut[hamming(q_sig[a], sig[j])] (zero above the Hamming threshold), and
returns the ``top`` best images per query (score desc, then id asc). Untouched images score 0 and
fill the tail of a ranking in id order. The GIL is released; queries run in parallel threads.
"""
import numpy as np
cimport numpy as cnp
from cython.parallel cimport parallel, prange, threadid
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

cnp.import_array()


cdef extern from *:
    """
    static inline int bowr_popcount128(unsigned long long a0, unsigned long long a1) {
        return __builtin_popcountll(a0) + __builtin_popcountll(a1);
    }
    """
    int bowr_popcount128(unsigned long long a0, unsigned long long a1) nogil


# -- partial top-k on a min-heap of (score, id); "worse" = lower score, or equal score and larger id --
cdef inline bint _worse(float sa, int64_t ia, float sb, int64_t ib) noexcept nogil:
    return sa < sb or (sa == sb and ia > ib)


cdef void _sift_down(float* hs, int64_t* hi, Py_ssize_t n, Py_ssize_t i) noexcept nogil:
    cdef Py_ssize_t c
    cdef float ts
    cdef int64_t ti
    while True:
        c = 2 * i + 1
        if c >= n:
            return
        if c + 1 < n and _worse(hs[c + 1], hi[c + 1], hs[c], hi[c]):
            c += 1
        if _worse(hs[c], hi[c], hs[i], hi[i]):
            ts = hs[c]; hs[c] = hs[i]; hs[i] = ts
            ti = hi[c]; hi[c] = hi[i]; hi[i] = ti
            i = c
        else:
            return


cdef void _finish(float* acc, uint8_t* mark, const uint32_t* touched, Py_ssize_t nt, const float* inv_norm,
                  float q_scale, Py_ssize_t n_img, Py_ssize_t top, float* out_s, int64_t* out_i) noexcept nogil:
    """Top ``top`` of the touched images (acc reset to zero on the way), then untouched ones at 0."""
    cdef Py_ssize_t n = 0, t, j, k, npos, nz
    cdef float s, ts
    cdef int64_t d, ti
    for t in range(nt):
        d = touched[t]
        s = acc[d] * inv_norm[d] * q_scale
        acc[d] = 0
        if s == 0:  # no contribution passed the threshold: ranks like an untouched image
            mark[d] = 0
            continue
        if n < top:
            out_s[n] = s
            out_i[n] = d
            n += 1
            if n == top:  # heapify
                j = top // 2
                while j > 0:
                    j -= 1
                    _sift_down(out_s, out_i, n, j)
        elif _worse(out_s[0], out_i[0], s, d):
            out_s[0] = s
            out_i[0] = d
            _sift_down(out_s, out_i, n, 0)
    if n == top and top > 0:  # heap -> sorted best first (heap sort with the min at the root)
        k = n
        while k > 1:
            k -= 1
            ts = out_s[0]; out_s[0] = out_s[k]; out_s[k] = ts
            ti = out_i[0]; out_i[0] = out_i[k]; out_i[k] = ti
            _sift_down(out_s, out_i, k, 0)
    else:  # fewer scored than top: insertion sort, then zero-score images in id order before negatives
        for j in range(1, n):
            s = out_s[j]; d = out_i[j]
            k = j
            while k > 0 and _worse(out_s[k - 1], out_i[k - 1], s, d):
                out_s[k] = out_s[k - 1]; out_i[k] = out_i[k - 1]
                k -= 1
            out_s[k] = s; out_i[k] = d
        npos = 0
        while npos < n and out_s[npos] > 0:
            npos += 1
        nz = top - n  # zero-score images to insert (each image is either scored or zero)
        k = n
        while k > npos:  # shift negative scores to the tail
            k -= 1
            out_s[k + nz] = out_s[k]; out_i[k + nz] = out_i[k]
        j = npos
        d = 0
        while j < npos + nz and d < n_img:
            if not mark[d]:
                out_s[j] = 0
                out_i[j] = d
                j += 1
            d += 1
    for t in range(nt):
        mark[touched[t]] = 0


cdef inline void _finish_query(float* acc, uint8_t* mark, const uint32_t* touched, Py_ssize_t nt, bint dense,
                               const uint32_t* every, const float* inv_norm, float q_scale, Py_ssize_t n_img,
                               Py_ssize_t top, float* out_s, int64_t* out_i) noexcept nogil:
    """_finish over the touched list, or, for a dense query, over every image (``every`` = 0..n_img-1):
    all count as touched and those at 0 fall back to untouched in _finish."""
    if dense:
        memset(mark, 1, n_img)
        _finish(acc, mark, every, n_img, inv_norm, q_scale, n_img, top, out_s, out_i)
    else:
        _finish(acc, mark, touched, nt, inv_norm, q_scale, n_img, top, out_s, out_i)


cdef inline bint _dense(const int32_t* qw, Py_ssize_t nq, const int64_t* indptr, Py_ssize_t n_img) noexcept nogil:
    """Whether a query scans at least half as many entries as there are images: then nearly every
    image is touched, and accumulating without the touched list (then finishing over all images,
    untouched ones having acc 0, which ranks exactly like untouched) saves a random access per entry."""
    cdef Py_ssize_t a, scan = 0
    for a in range(nq):
        scan += indptr[qw[a] + 1] - indptr[qw[a]]
    return 2 * scan >= n_img


cdef Py_ssize_t _acc_tf(const int32_t* qw, const float* qv, Py_ssize_t nq, const int64_t* indptr,
                        const uint32_t* ids, const float* tf, float* acc, uint8_t* mark,
                        uint32_t* touched, bint dense) noexcept nogil:
    cdef Py_ssize_t a, j, nt = 0
    cdef uint32_t d
    cdef float v
    for a in range(nq):
        v = qv[a]
        if dense:
            for j in range(indptr[qw[a]], indptr[qw[a] + 1]):
                acc[ids[j]] += v * tf[j]
            continue
        for j in range(indptr[qw[a]], indptr[qw[a] + 1]):
            d = ids[j]
            touched[nt] = d
            nt += 1 - mark[d]
            mark[d] = 1
            acc[d] += v * tf[j]
    return nt


cdef Py_ssize_t _acc_sig(const int32_t* qw, const uint64_t* qs, const float* qv, Py_ssize_t nq,
                         const int64_t* indptr, const uint32_t* ids, const uint64_t* sigs,
                         const float* lut, int ht, float* acc, uint8_t* mark,
                         uint32_t* touched, bint dense) noexcept nogil:
    cdef Py_ssize_t a, j, nt = 0
    cdef uint32_t d
    cdef uint64_t q0, q1
    cdef int h
    cdef float v
    for a in range(nq):
        v = qv[a]
        q0 = qs[2 * a]
        q1 = qs[2 * a + 1]
        # branch-free: signatures of unrelated features pass a threshold near half the time, a
        # branch on it would be mispredicted that often (lut is 0 above ht)
        if dense:
            for j in range(indptr[qw[a]], indptr[qw[a] + 1]):
                h = bowr_popcount128(q0 ^ sigs[2 * j], q1 ^ sigs[2 * j + 1])
                acc[ids[j]] += v * lut[h]
            continue
        for j in range(indptr[qw[a]], indptr[qw[a] + 1]):
            h = bowr_popcount128(q0 ^ sigs[2 * j], q1 ^ sigs[2 * j + 1])
            d = ids[j]
            touched[nt] = d
            nt += 1 - mark[d]
            mark[d] = 1
            acc[d] += v * lut[h]
    return nt


def _check_batch(q_indptr, q_words, n_words, top, n_img):
    if q_words.shape[0] != q_indptr[q_indptr.shape[0] - 1]:
        raise ValueError("q_indptr[-1] must equal the number of query entries")
    if top < 0 or top > n_img:
        raise ValueError(f"top={top} must lie in [0, {n_img}]")


def search_tf(const int64_t[::1] q_indptr, const int32_t[::1] q_words, const float[::1] q_weights,
              const int64_t[::1] indptr, const uint32_t[::1] ids, const float[::1] tf,
              const float[::1] inv_norm, const float[::1] q_scale, Py_ssize_t top, int threads=1):
    """BoW scoring: ``q_weights`` already include idf and the query norm. Returns (ids, scores)."""
    cdef Py_ssize_t nq = q_indptr.shape[0] - 1, n_img = inv_norm.shape[0], i, t, nth
    _check_batch(q_indptr, q_words, indptr.shape[0] - 1, top, n_img)
    out_i = np.zeros((nq, top), np.int64)
    out_s = np.zeros((nq, top), np.float32)
    cdef int64_t[:, ::1] oi = out_i
    cdef float[:, ::1] os_ = out_s
    nth = max(1, min(threads, nq)) if nq else 1
    acc = np.zeros((nth, max(n_img, 1)), np.float32)
    mark = np.zeros((nth, max(n_img, 1)), np.uint8)
    touched = np.zeros((nth, n_img + 1), np.uint32)  # +1: the branch-free append writes touched[nt] even when all are in
    ident = np.arange(max(n_img, 1), dtype=np.uint32)  # the touched list of a dense query: every image
    cdef float[:, ::1] acc_v = acc
    cdef uint8_t[:, ::1] mark_v = mark
    cdef uint32_t[:, ::1] tch = touched
    cdef Py_ssize_t nt
    cdef bint dense
    cdef uint32_t[::1] ident_v = ident
    cdef const uint32_t* idn = &ident_v[0]
    if nq == 0 or n_img == 0:
        return out_i, out_s
    for i in prange(nq, nogil=True, num_threads=nth, schedule="dynamic"):
        t = threadid()
        dense = _dense(&q_words[0] + q_indptr[i], q_indptr[i + 1] - q_indptr[i], &indptr[0], n_img) \
            if q_indptr[i + 1] > q_indptr[i] else False
        nt = _acc_tf(&q_words[0] + q_indptr[i], &q_weights[0] + q_indptr[i], q_indptr[i + 1] - q_indptr[i],
                     &indptr[0], &ids[0], &tf[0], &acc_v[t, 0], &mark_v[t, 0], &tch[t, 0], dense) \
            if q_indptr[i + 1] > q_indptr[i] else 0
        _finish_query(&acc_v[t, 0], &mark_v[t, 0], &tch[t, 0], nt, dense, idn, &inv_norm[0], q_scale[i],
                      n_img, top, &os_[i, 0] if top > 0 else NULL, &oi[i, 0] if top > 0 else NULL)
    return out_i, out_s


def search_sig(const int64_t[::1] q_indptr, const int32_t[::1] q_words, const uint64_t[:, ::1] q_sigs,
               const float[::1] q_weights, const int64_t[::1] indptr, const uint32_t[::1] ids,
               const uint64_t[:, ::1] sigs, const float[::1] inv_norm, const float[::1] q_scale,
               const float[::1] lut, int ht, Py_ssize_t top, int threads=1):
    """Signature scoring (SMK*, ASMK*, HQE): contribution q_weights[a] * lut[h] for Hamming
    distance h <= ht. ``lut`` has 129 entries. Returns (ids (nq, top) int64, scores float32)."""
    cdef Py_ssize_t nq = q_indptr.shape[0] - 1, n_img = inv_norm.shape[0], i, t, nth
    _check_batch(q_indptr, q_words, indptr.shape[0] - 1, top, n_img)
    if lut.shape[0] != 129:
        raise ValueError("lut must have 129 entries (Hamming distances 0..128)")
    if q_sigs.shape[0] != q_words.shape[0] or (q_sigs.shape[0] and q_sigs.shape[1] != 2):
        raise ValueError("q_sigs must be (n_entries, 2) uint64")
    if sigs.shape[0] != ids.shape[0]:
        raise ValueError("sigs must have one row per posting entry")
    out_i = np.zeros((nq, top), np.int64)
    out_s = np.zeros((nq, top), np.float32)
    cdef int64_t[:, ::1] oi = out_i
    cdef float[:, ::1] os_ = out_s
    nth = max(1, min(threads, nq)) if nq else 1
    acc = np.zeros((nth, max(n_img, 1)), np.float32)
    mark = np.zeros((nth, max(n_img, 1)), np.uint8)
    touched = np.zeros((nth, n_img + 1), np.uint32)  # +1: the branch-free append writes touched[nt] even when all are in
    ident = np.arange(max(n_img, 1), dtype=np.uint32)  # the touched list of a dense query: every image
    cdef float[:, ::1] acc_v = acc
    cdef uint8_t[:, ::1] mark_v = mark
    cdef uint32_t[:, ::1] tch = touched
    cdef Py_ssize_t nt
    cdef const uint64_t* sp = &sigs[0, 0] if sigs.shape[0] else NULL
    cdef const uint64_t* qsp = &q_sigs[0, 0] if q_sigs.shape[0] else NULL
    cdef const uint32_t* idp = &ids[0] if ids.shape[0] else NULL
    cdef const int32_t* qwp = &q_words[0] if q_words.shape[0] else NULL
    cdef const float* qvp = &q_weights[0] if q_weights.shape[0] else NULL
    cdef bint dense
    cdef uint32_t[::1] ident_v = ident
    cdef const uint32_t* idn = &ident_v[0]
    if nq == 0 or n_img == 0:
        return out_i, out_s
    for i in prange(nq, nogil=True, num_threads=nth, schedule="dynamic"):
        t = threadid()
        dense = _dense(qwp + q_indptr[i], q_indptr[i + 1] - q_indptr[i], &indptr[0], n_img) \
            if q_indptr[i + 1] > q_indptr[i] else False
        nt = _acc_sig(qwp + q_indptr[i], qsp + 2 * q_indptr[i], qvp + q_indptr[i],
                      q_indptr[i + 1] - q_indptr[i], &indptr[0], idp, sp, &lut[0], ht,
                      &acc_v[t, 0], &mark_v[t, 0], &tch[t, 0], dense) if q_indptr[i + 1] > q_indptr[i] else 0
        _finish_query(&acc_v[t, 0], &mark_v[t, 0], &tch[t, 0], nt, dense, idn, &inv_norm[0], q_scale[i],
                      n_img, top, &os_[i, 0] if top > 0 else NULL, &oi[i, 0] if top > 0 else NULL)
    return out_i, out_s


def hamming(const uint64_t[:, ::1] a, const uint64_t[:, ::1] b):
    """Pairwise Hamming distances (len(a), len(b)) int32 of 128-bit signatures."""
    out = np.empty((a.shape[0], b.shape[0]), np.int32)
    cdef int32_t[:, ::1] o = out
    cdef Py_ssize_t i, j
    with nogil:
        for i in range(a.shape[0]):
            for j in range(b.shape[0]):
                o[i, j] = bowr_popcount128(a[i, 0] ^ b[j, 0], a[i, 1] ^ b[j, 1])
    return out


def self_similarity(const int64_t[::1] indptr, const uint32_t[::1] ids, const uint64_t[:, ::1] sigs,
                    const float[::1] word_weight, const float[::1] lut, int ht, Py_ssize_t n_img,
                    out=None):
    """Per-image self-similarity sum_w word_weight[w] sum_{i, j in X_w(d)} lut[h(i, j)] (float64):
    the SMK normaliser. All ordered pairs within a word of one image count, i == j included.
    ``out`` (float64, n_img) accumulates in place, word after word: calling this on consecutive
    word ranges gives the same sums, bit for bit, as one call on all words."""
    if out is None:
        out = np.zeros(n_img, np.float64)
    elif out.dtype != np.float64 or out.shape != (n_img,):
        raise ValueError(f"out must be float64 of shape ({n_img},)")
    cdef double[::1] o = out
    cdef Py_ssize_t w, a, b, c, e, e2, nw = indptr.shape[0] - 1
    cdef double s
    cdef int h
    cdef uint32_t d
    with nogil:
        for w in range(nw):
            a = indptr[w]
            e = indptr[w + 1]
            while a < e:
                d = ids[a]
                b = a
                while b < e and ids[b] == d:
                    b += 1
                s = 0
                for c in range(a, b):
                    s += lut[0]
                    for e2 in range(c + 1, b):
                        h = bowr_popcount128(sigs[c, 0] ^ sigs[e2, 0], sigs[c, 1] ^ sigs[e2, 1])
                        if h <= ht:
                            s += 2 * lut[h]
                o[d] += word_weight[w] * s
                a = b
    return out


def residual_signatures(const float[:, ::1] X, const int64_t[::1] member, const int64_t[::1] group_ptr,
                        const int32_t[::1] group_word, const float[:, ::1] centroids,
                        const float[:, ::1] projection, const float[:, ::1] medians, int threads=1):
    """128-bit signatures of aggregated residuals, one per group.

    Group g holds descriptors X[member[group_ptr[g]:group_ptr[g+1]]] assigned to word group_word[g];
    its mean residual r = mean(x - c_w) is binarised as bit_b = (P r)_b > m_w,b with a projection P
    (128, D) and per-word medians m (n_words, 128), or bit_b = r_b > 0 when ``projection`` is empty
    (then D must be 128). Bit b lives in word b // 64 at position b % 64.
    """
    cdef Py_ssize_t G = group_ptr.shape[0] - 1, D = X.shape[1], g, m, k, b, i
    cdef bint proj = projection.shape[0] > 0
    cdef bint med = medians.shape[0] > 0
    if proj and (projection.shape[0] != 128 or projection.shape[1] != D):
        raise ValueError(f"projection must be (128, {D})")
    if not proj and D != 128:
        raise ValueError(f"sign binarisation needs 128-D descriptors, got {D}; learn a projection")
    if med and medians.shape[1] != 128:
        raise ValueError("medians must be (n_words, 128)")
    if centroids.shape[1] != D:
        raise ValueError("centroids and descriptors differ in dimension")
    out = np.zeros((G, 2), np.uint64)
    cdef uint64_t[:, ::1] o = out
    cdef float* r
    cdef float z, inv
    cdef int32_t w
    cdef uint64_t bits
    cdef int nth = max(1, threads)
    with nogil, parallel(num_threads=nth):
        r = <float*>malloc(D * sizeof(float))   # one residual buffer per thread
        for g in prange(G, schedule="static"):
            memset(r, 0, D * sizeof(float))
            w = group_word[g]
            for m in range(group_ptr[g], group_ptr[g + 1]):
                i = member[m]
                for k in range(D):
                    r[k] += X[i, k] - centroids[w, k]
            inv = 1.0 / max(group_ptr[g + 1] - group_ptr[g], 1)
            # bits set without branches (residual signs are unpredictable)
            for b in range(128):
                if proj:
                    z = 0
                    for k in range(D):
                        z = z + projection[b, k] * r[k]
                    z = z * inv
                else:
                    z = r[b] * inv
                if med:
                    bits = <uint64_t>(z > medians[w, b])
                else:
                    bits = <uint64_t>(z > 0)
                if b < 64:
                    o[g, 0] = o[g, 0] | (bits << b)
                else:
                    o[g, 1] = o[g, 1] | (bits << (b - 64))
        free(r)
    return out


def correspondences(const int32_t[::1] q_words, const uint64_t[:, ::1] q_sigs, const int64_t[::1] indptr,
                    const uint32_t[::1] ids, const uint64_t[:, ::1] sigs, const uint8_t[::1] image_mask,
                    int ht):
    """Pairs (query entry a, posting entry j) with ids[j] in the mask and Hamming distance <= ht,
    and their distances: the tentative correspondences of one query with a set of images."""
    cdef Py_ssize_t a, j, n = 0, pass_
    cdef int h
    cdef int64_t[::1] oa
    cdef int64_t[::1] oj
    cdef int32_t[::1] oh
    out_a = out_j = out_h = None
    for pass_ in range(2):
        if pass_ == 1:
            out_a = np.empty(n, np.int64)
            out_j = np.empty(n, np.int64)
            out_h = np.empty(n, np.int32)
            oa = out_a
            oj = out_j
            oh = out_h
            n = 0
        with nogil:
            for a in range(q_words.shape[0]):
                for j in range(indptr[q_words[a]], indptr[q_words[a] + 1]):
                    if image_mask[ids[j]]:
                        h = bowr_popcount128(q_sigs[a, 0] ^ sigs[j, 0], q_sigs[a, 1] ^ sigs[j, 1])
                        if h <= ht:
                            if pass_ == 1:
                                oa[n] = a
                                oj[n] = j
                                oh[n] = h
                            n += 1
    return out_a, out_j, out_h


def locate(const int64_t[::1] indptr, const uint32_t[::1] ids, const int32_t[::1] words,
           const uint32_t[::1] images):
    """Entry ranges [start, end) of image images[i] in the posting list of words[i] (binary search;
    an empty range where the image has no entry in that word)."""
    cdef Py_ssize_t n = words.shape[0], i
    start = np.empty(n, np.int64)
    end = np.empty(n, np.int64)
    cdef int64_t[::1] s = start
    cdef int64_t[::1] e = end
    cdef int64_t lo, hi, mid, a, b
    cdef uint32_t d
    with nogil:
        for i in range(n):
            d = images[i]
            a = indptr[words[i]]
            b = indptr[words[i] + 1]
            lo = a; hi = b
            while lo < hi:
                mid = (lo + hi) >> 1
                if ids[mid] < d:
                    lo = mid + 1
                else:
                    hi = mid
            s[i] = lo
            hi = b
            while lo < hi:
                mid = (lo + hi) >> 1
                if ids[mid] <= d:
                    lo = mid + 1
                else:
                    hi = mid
            e[i] = lo
    return start, end


def count_pairs(const int64_t[::1] image_ids, const int32_t[::1] words):
    """Sparse per-(image, word) counts from one entry per assigned feature, given entries already
    sorted by (word, image): returns the start index of each run and its length."""
    cdef Py_ssize_t m = image_ids.shape[0], i, u = 0
    starts = np.empty(m, np.int64)
    cdef int64_t[::1] st = starts
    with nogil:
        for i in range(m):
            if i == 0 or words[i] != words[i - 1] or image_ids[i] != image_ids[i - 1]:
                st[u] = i
                u += 1
    starts = starts[:u]
    counts = np.diff(np.append(starts, m))
    return starts, counts


def counting_order(const int32_t[::1] words, Py_ssize_t n_words):
    """Stable order of entries by word (counting sort, O(n)): entries already in image order come
    out in (word, image) order, the posting-list layout."""
    cdef Py_ssize_t n = words.shape[0], i
    counts = np.zeros(n_words + 1, np.int64)
    order = np.empty(n, np.int64)
    cdef int64_t[::1] c = counts
    cdef int64_t[::1] o = order
    with nogil:
        for i in range(n):
            c[words[i] + 1] += 1
        for i in range(n_words):
            c[i + 1] += c[i]
        for i in range(n):
            o[c[words[i]]] = i
            c[words[i]] += 1
    return order
