/* Exact k-nearest-word search for visual-word assignment.
 *
 * Assigning a query's ~1,500 descriptors to the 5 nearest of 16k-65k words is a dense product that
 * dominates an ASMK* query. This kernel returns the same k nearest words as a flat search (exact
 * squared L2 distances, nearest first) while computing full distances for only a few hundred words
 * per descriptor:
 *
 * 1. Words and queries are rotated by the words' PCA (an orthogonal map, so distances are unchanged)
 *    and only the first P coordinates are kept; ||x_p - c_p||^2 <= ||x - c||^2 (a projection).
 * 2. Those P coordinates are quantised to int8 (queries with their own scale) and the partial
 *    distances of one descriptor to every word come from AVX-512 VNNI int8 dot products.
 * 3. With e_x, e_c the quantisation errors, ||x_p - c_p|| >= ||x^ - c^|| - ||e_x|| - ||e_c||, so
 *    the dequantised partial distance gives a lower bound of the true distance of every word.
 * 4. The k+3 words with the smallest partial distance get exact distances; T, the k-th smallest of
 *    them, bounds the k-th nearest distance from above. Every word whose lower bound is <= T gets an
 *    exact distance too (T shrinking as better words are found); all others cannot be among the k
 *    nearest. Bounds carry a small margin for float rounding.
 *
 * The result is exact, independent of the screen's accuracy: a poor screen only costs time.
 */
#include "knn_core.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define KNN_X86 1
#include <immintrin.h>
#endif

#define KNN_TILE 8 /* queries screened together (word codes are loaded once per tile) */

int knn_cpu_supported(void)
{
#ifdef KNN_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

static inline float sqdist(const float *a, const float *b, int D)
{
    float s = 0.f;
    for (int i = 0; i < D; i++) {
        float t = a[i] - b[i];
        s += t * t;
    }
    return s;
}

/* val[q][j] = ||c^_j||^2 - 2 x^_q . c^_j for the words of one tile of queries (scalar version). Word codes are stored offset by +128 as
 * unsigned bytes, so x . (c + 128) - qoff = x . c with qoff = 128 sum(x). */
static void screen_scalar(const knn_index *ix, const int8_t *q8, const int32_t *qoff, const float *gam,
                          float *val)
{
    const int P = ix->P, G = P / 4;
    const int64_t nb = ix->K16 / KNN_BLOCK;
    for (int q = 0; q < KNN_TILE; q++) {
        const int8_t *x = q8 + (size_t)q * P;
        float *v = val + (size_t)q * ix->K16;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *wb = ix->packed + b * (int64_t)G * 64;
            int32_t acc[KNN_BLOCK] = {0};
            for (int g = 0; g < G; g++)
                for (int w = 0; w < KNN_BLOCK; w++)
                    for (int t = 0; t < 4; t++)
                        acc[w] += (int32_t)wb[g * 64 + w * 4 + t] * (int32_t)x[4 * g + t];
            for (int w = 0; w < KNN_BLOCK; w++) {
                int64_t j = b * KNN_BLOCK + w;
                v[j] = ix->cnorm[j] - gam[q] * (float)(acc[w] - qoff[q]);
            }
        }
    }
}

static int64_t next_le_scalar(const float *v, int64_t pos, int64_t n, float thr)
{
    for (; pos < n; pos++)
        if (v[pos] <= thr) return pos;
    return n;
}

#ifdef KNN_X86
/* acc += w (unsigned bytes) . broadcast(*p) (signed bytes), the query word broadcast from memory
 * (GCC's intrinsic form copies the accumulators around on every step) */
#define DPBUSD_BCST(acc, w, p) __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*(p)))

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void
screen_vnni(const knn_index *ix, const int8_t *q8, const int32_t *qoff, const float *gam, float *val)
{
    const int P = ix->P, G = P / 4;
    const int64_t nb = ix->K16 / KNN_BLOCK, K16 = ix->K16;
    const int32_t *q[KNN_TILE];
    for (int t = 0; t < KNN_TILE; t++) q[t] = (const int32_t *)(q8 + (size_t)t * P);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = ix->packed + b * (int64_t)G * 64;
        __m512i acc[KNN_TILE];
#pragma GCC unroll 8
        for (int t = 0; t < KNN_TILE; t++) acc[t] = _mm512_setzero_si512();
        for (int g = 0; g < G; g++) {
            /* unsigned word codes times signed query codes (broadcast from memory) */
            __m512i w = _mm512_loadu_si512((const void *)(wb + g * 64));
#pragma GCC unroll 8
            for (int t = 0; t < KNN_TILE; t++) DPBUSD_BCST(acc[t], w, q[t] + g);
        }
        const __m512 cn = _mm512_loadu_ps(ix->cnorm + b * KNN_BLOCK);
        float *v = val + b * KNN_BLOCK;
#pragma GCC unroll 8
        for (int t = 0; t < KNN_TILE; t++)
            _mm512_store_ps(v + t * K16, _mm512_fnmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[t], _mm512_set1_epi32(qoff[t]))),
                                                          _mm512_set1_ps(gam[t]), cn));
    }
}

/* first j >= pos with v[j] <= thr (v 64-byte aligned), n when none */
__attribute__((target("avx512f"))) static int64_t next_le_avx512(const float *v, int64_t pos, int64_t n,
                                                                    float thr)
{
    const __m512 t = _mm512_set1_ps(thr);
    for (; pos < n && (pos & 15); pos++)
        if (v[pos] <= thr) return pos;
    for (; pos + 16 <= n; pos += 16) {
        __mmask16 m = _mm512_cmp_ps_mask(_mm512_load_ps(v + pos), t, _CMP_LE_OQ);
        if (m) return pos + __builtin_ctz((unsigned)m);
    }
    for (; pos < n; pos++)
        if (v[pos] <= thr) return pos;
    return n;
}
#endif

static inline int64_t next_le(const float *v, int64_t pos, int64_t n, float thr, int simd)
{
#ifdef KNN_X86
    if (simd) return next_le_avx512(v, pos, n, thr);
#endif
    return next_le_scalar(v, pos, n, thr);
}

static inline void prefetch_word(const float *c, int D)
{
#if defined(__GNUC__)
    for (int t = 0; t < D; t += 16) __builtin_prefetch(c + t, 0, 3);
#else
    (void)c;
    (void)D;
#endif
}

/* sorted insertion into the k best (d ascending, then index ascending) */
static inline int better(float d, int64_t j, float bd, int64_t bj) { return d < bd || (d == bd && j < bj); }

static inline void insert(float *bd, int32_t *bi, int *cnt, int cap, float d, int32_t j)
{
    int c = *cnt;
    if (c == cap && !better(d, j, bd[c - 1], bi[c - 1])) return;
    int p = (c < cap) ? c : cap - 1;
    while (p > 0 && better(d, j, bd[p - 1], bi[p - 1])) {
        bd[p] = bd[p - 1];
        bi[p] = bi[p - 1];
        p--;
    }
    bd[p] = d;
    bi[p] = j;
    if (c < cap) *cnt = c + 1;
}

/* the threshold on val (= partial distance - ||x^||^2) below which a word may be within distance T */
static inline float val_threshold(float T, float eps, float xn)
{
    float r = sqrtf(T) * 1.00001f + eps + 1e-6f;
    return r * r * 1.0001f + 1e-5f - xn;
}

int knn_search_impl(const knn_index *ix, const float *X, const float *Xp, int64_t n, int k,
                    int32_t *out_ids, float *out_dist, int64_t *n_exact, int simd)
{
    const int P = ix->P, D = ix->D;
    const int64_t K = ix->K, K16 = ix->K16;
    int M = k + 3;
    if (M > K) M = (int)K;
    if (k < 1 || k > KNN_MAX_K || k > K) return -2;
#ifndef KNN_X86
    simd = 0;
#endif
    float *val = (float *)aligned_alloc(64, (size_t)KNN_TILE * K16 * sizeof(float));
    int8_t *q8 = (int8_t *)aligned_alloc(64, (size_t)KNN_TILE * ((P + 63) / 64) * 64);
    if (!val || !q8) {
        free(val);
        free(q8);
        return -1;
    }
    int64_t exact = 0;
    for (int64_t i0 = 0; i0 < n; i0 += KNN_TILE) {
        int nq = (n - i0 < KNN_TILE) ? (int)(n - i0) : KNN_TILE;
        float gam[KNN_TILE], xn[KNN_TILE], ex[KNN_TILE];
        int32_t qoff[KNN_TILE];
        for (int q = 0; q < KNN_TILE; q++) { /* the last query repeats to fill a partial tile */
            const float *xp = Xp + (size_t)(i0 + (q < nq ? q : nq - 1)) * P;
            float amax = 0.f;
            for (int t = 0; t < P; t++) amax = fmaxf(amax, fabsf(xp[t]));
            float s = amax > 0.f ? 127.f / amax : 1.f;
            double e2 = 0., n2 = 0.;
            int32_t sum = 0;
            for (int t = 0; t < P; t++) {
                float c = rintf(xp[t] * s);
                c = c > 127.f ? 127.f : (c < -127.f ? -127.f : c);
                q8[q * P + t] = (int8_t)c;
                sum += (int32_t)c;
                double r = (double)c / s, e = (double)xp[t] - r;
                e2 += e * e;
                n2 += r * r;
            }
            gam[q] = 2.f / (s * ix->c_scale);
            qoff[q] = 128 * sum;
            xn[q] = (float)n2;
            ex[q] = (float)sqrt(e2);
        }
#ifdef KNN_X86
        if (simd)
            screen_vnni(ix, q8, qoff, gam, val);
        else
#endif
            screen_scalar(ix, q8, qoff, gam, val);

        for (int q = 0; q < nq; q++) {
            const int64_t i = i0 + q;
            const float *x = X + (size_t)i * D, *v = val + (size_t)q * K16;
            /* seeds: the M words with the smallest screen value */
            float sd[KNN_MAX_K + 3];
            int32_t si[KNN_MAX_K + 3];
            int sc = 0;
            float thr = INFINITY;
            int64_t pos = 0, j;
            while ((j = next_le(v, pos, K, thr, simd)) < K) {
                insert(sd, si, &sc, M, v[j], (int32_t)j);
                if (sc == M) thr = sd[M - 1];
                pos = j + 1;
            }
            /* their exact distances bound the k-th nearest distance: T */
            float bd[KNN_MAX_K];
            int32_t bi[KNN_MAX_K];
            int bc = 0;
            for (int s = 0; s < sc; s++) prefetch_word(ix->cent + (size_t)si[s] * D, D);
            for (int s = 0; s < sc; s++) insert(bd, bi, &bc, k, sqdist(x, ix->cent + (size_t)si[s] * D, D), si[s]);
            exact += sc;
            /* every other word whose lower bound is within T */
            const float eps = ex[q] + ix->c_err;
            thr = val_threshold(bd[k - 1], eps, xn[q]);
            /* one candidate of look-ahead: its word is fetched from memory while the current one is
             * computed (the look-ahead used the previous, larger threshold: it may admit a word the
             * newer one would skip, which only costs an exact distance) */
            int64_t jn = next_le(v, 0, K, thr, simd);
            if (jn < K) prefetch_word(ix->cent + (size_t)jn * D, D);
            while ((j = jn) < K) {
                jn = next_le(v, j + 1, K, thr, simd);
                if (jn < K) prefetch_word(ix->cent + (size_t)jn * D, D);
                int seen = 0;
                for (int s = 0; s < sc; s++)
                    if (si[s] == j) {
                        seen = 1;
                        break;
                    }
                if (seen) continue;
                float d = sqdist(x, ix->cent + (size_t)j * D, D);
                exact++;
                if (better(d, j, bd[k - 1], bi[k - 1])) {
                    insert(bd, bi, &bc, k, d, (int32_t)j);
                    thr = val_threshold(bd[k - 1], eps, xn[q]);
                }
            }
            memcpy(out_ids + (size_t)i * k, bi, (size_t)k * sizeof(int32_t));
            memcpy(out_dist + (size_t)i * k, bd, (size_t)k * sizeof(float));
        }
    }
    free(val);
    free(q8);
    if (n_exact) *n_exact = exact;
    return 0;
}

int knn_search(const knn_index *ix, const float *X, const float *Xp, int64_t n, int k, int32_t *out_ids,
               float *out_dist, int64_t *n_exact)
{
    return knn_search_impl(ix, X, Xp, n, k, out_ids, out_dist, n_exact, knn_cpu_supported());
}
