/* Exact k-nearest-word search with an int8 lower-bound screen (see knn_core.c). */
#ifndef BOWR_KNN_CORE_H
#define BOWR_KNN_CORE_H

#include <stdint.h>

#define KNN_MAX_K 64
#define KNN_BLOCK 16 /* words per packed block (one 512-bit register of int32 sums) */

typedef struct {
    int64_t K;            /* number of words */
    int64_t K16;          /* K rounded up to a multiple of KNN_BLOCK */
    int D;                /* full descriptor dimension */
    int P;                /* screened (projected) dimensions, a multiple of 4 */
    const uint8_t *packed; /* codes + 128 of the projected words: [K16/16][P/4][16][4] */
    const float *cnorm;   /* [K16] squared norm of the dequantised codes; padding words 1e30 */
    float c_scale;        /* code = round(c_proj * c_scale) */
    float c_err;          /* max over words of ||c_proj - code / c_scale|| */
    const float *cent;    /* [K][D] the words themselves (exact distances) */
} knn_index;

/* 1 when the CPU runs the AVX-512 VNNI screen. */
int knn_cpu_supported(void);

/* For queries i in [0, n): the k nearest words of X[i] (exact squared L2 distances), nearest first,
 * ties broken by the lower word index. Xp holds the projected queries (n x P).
 * n_exact (may be NULL) receives the number of exact distances computed. Returns 0, or -1 when
 * memory runs out. */
int knn_search(const knn_index *ix, const float *X, const float *Xp, int64_t n, int k,
               int32_t *out_ids, float *out_dist, int64_t *n_exact);

/* The same with the screen chosen by hand: simd=0 runs the portable scalar screen (tests). */
int knn_search_impl(const knn_index *ix, const float *X, const float *Xp, int64_t n, int k,
                    int32_t *out_ids, float *out_dist, int64_t *n_exact, int simd);

#endif
