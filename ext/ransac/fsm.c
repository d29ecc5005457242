/* Fast spatial matching with local optimisation; see fsm.h.
 *
 * Hypotheses: a frame F = [[a11 a12 x], [a21 a22 y], [0 0 1]] maps the unit circle of the
 * normalised patch to the image, so one correspondence of a query frame Fq and a database frame Fd
 * gives the affine map A = Fd Fq^-1 (query pixels -> database pixels).  Each sampled hypothesis is
 * scored by the number of correspondences whose transfer error |A q - d| is below the threshold;
 * whenever a hypothesis beats the best (locally optimised) score so far, it is refined by iterated
 * least-squares affine fits on its inliers (LO-RANSAC). Hypotheses are taken in the given order (the
 * first max_hypotheses: callers put the most distinctive correspondences first, as in PROSAC).  The best affine model can finally be
 * upgraded to a homography (normalised DLT) if that gains inliers.  The reported inliers are one to
 * one (greedy by residual: each query and database feature used once) and must not be degenerate
 * (repeated or collinear points), else the pair has zero inliers.  No randomness and ties keep the
 * first, so results do not depend on the thread count.
 */
#include "fsm.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

#define FAR_AWAY 1e18f /* coordinates given to unusable points: never within any threshold */

typedef struct {
    float *xq, *yq, *xd, *yd; /* SoA copies of the correspondence positions */
    float *ls, *cs, *sn;      /* local map M = Fd Fq^-1 of each correspondence: log scale, cos/sin angle */
    uint8_t *hyp_ok;          /* frame pair usable as a hypothesis */
    uint8_t *inl;             /* scratch inlier flags */
    float *res;               /* scratch squared residuals */
    int64_t m;
    int shape;                /* 1: inliers must also agree with the model in scale and angle */
    float log_tol, cos_tol;   /* |log scale difference| < log_tol, cos(angle difference) > cos_tol */
} work_t;

/* Log scale and angle of the rotation closest to a 2x2 map (exact for similarities s R(a)). */
static void scale_angle(const double L[4], float *ls, float *c, float *s) {
    double det = L[0] * L[3] - L[1] * L[2];
    double x = L[0] + L[3], y = L[2] - L[1], r = sqrt(x * x + y * y);
    if (!(det > 0) || !(r > 0) || !isfinite(det)) {
        *ls = 1e9f; *c = 0.0f; *s = 0.0f; /* never consistent */
        return;
    }
    *ls = (float)(0.5 * log(det));
    *c = (float)(x / r);
    *s = (float)(y / r);
}

/* ---- small dense helpers --------------------------------------------------------------------- */

static int inv2(const double a[4], double out[4]) {
    double det = a[0] * a[3] - a[1] * a[2];
    double scale = fabs(a[0]) + fabs(a[1]) + fabs(a[2]) + fabs(a[3]);
    if (!(fabs(det) > 1e-12 * scale * scale) || !isfinite(det)) return 0;
    out[0] = a[3] / det;
    out[1] = -a[1] / det;
    out[2] = -a[2] / det;
    out[3] = a[0] / det;
    return 1;
}

static void affine_to_h(const double L[4], const double t[2], double H[9]) {
    H[0] = L[0]; H[1] = L[1]; H[2] = t[0];
    H[3] = L[2]; H[4] = L[3]; H[5] = t[1];
    H[6] = 0.0;  H[7] = 0.0;  H[8] = 1.0;
}

/* Singular values of a 2x2 matrix (closed form). */
static void sv2(const double L[4], double *smax, double *smin) {
    double e = (L[0] + L[3]) / 2, f = (L[0] - L[3]) / 2, g = (L[2] + L[1]) / 2, h = (L[2] - L[1]) / 2;
    double q = sqrt(e * e + h * h), r = sqrt(f * f + g * g);
    *smax = q + r;
    *smin = fabs(q - r);
}

/* ---- counting -------------------------------------------------------------------------------- */

/* Number of correspondences with squared transfer error below thr2 under an affine map (float
 * arithmetic over the SoA arrays: the hot loop, vectorised by the compiler). */
static int64_t count_affine(const work_t *w, const float A[6], float thr2) {
    const float a0 = A[0], a1 = A[1], a2 = A[2], a3 = A[3], a4 = A[4], a5 = A[5];
    const float *xq = w->xq, *yq = w->yq, *xd = w->xd, *yd = w->yd;
    int64_t c = 0;
    if (!w->shape) {
        for (int64_t j = 0; j < w->m; j++) {
            float dx = a0 * xq[j] + a1 * yq[j] + a2 - xd[j];
            float dy = a3 * xq[j] + a4 * yq[j] + a5 - yd[j];
            c += (dx * dx + dy * dy < thr2);
        }
        return c;
    }
    double L[4] = {a0, a1, a3, a4};
    float sl, cl, snl;
    scale_angle(L, &sl, &cl, &snl);
    const float lt = w->log_tol, ct = w->cos_tol;
    const float *ls = w->ls, *cs = w->cs, *sn = w->sn;
    for (int64_t j = 0; j < w->m; j++) {
        float dx = a0 * xq[j] + a1 * yq[j] + a2 - xd[j];
        float dy = a3 * xq[j] + a4 * yq[j] + a5 - yd[j];
        float ds = ls[j] - sl;
        c += (dx * dx + dy * dy < thr2) & (ds * ds < lt * lt) & (cs[j] * cl + sn[j] * snl > ct);
    }
    return c;
}

/* Squared residuals under a 3x3 model (affine or homography), flags of those below thr2, count.
 * Points mapped to or behind the homography's line at infinity are never inliers. */
static int64_t residuals(const work_t *w, const double H[9], double thr2, float *res, uint8_t *inl) {
    int64_t c = 0;
    for (int64_t j = 0; j < w->m; j++) {
        double x = w->xq[j], y = w->yq[j];
        double hz = H[6] * x + H[7] * y + H[8];
        double r = INFINITY;
        if (hz > 1e-8) {
            double pu = (H[0] * x + H[1] * y + H[2]) / hz, pv = (H[3] * x + H[4] * y + H[5]) / hz;
            double u = pu - w->xd[j];
            double v = pv - w->yd[j];
            r = u * u + v * v;
            if (w->shape && r < thr2) { /* the model's local linear map at q (its Jacobian) */
                double J[4] = {(H[0] - pu * H[6]) / hz, (H[1] - pu * H[7]) / hz,
                               (H[3] - pv * H[6]) / hz, (H[4] - pv * H[7]) / hz};
                float sl, cl, snl;
                scale_angle(J, &sl, &cl, &snl);
                float ds = w->ls[j] - sl;
                if (!(ds * ds < w->log_tol * w->log_tol) || !(w->cs[j] * cl + w->sn[j] * snl > w->cos_tol))
                    r = INFINITY;
            }
        }
        res[j] = (float)r;
        inl[j] = (r < thr2);
        c += inl[j];
    }
    return c;
}

/* ---- estimation ------------------------------------------------------------------------------ */

/* Least-squares affine map on the flagged points (centred normal equations). 0 when fewer than 3
 * points or they are (nearly) collinear / repeated in the query image. */
static int fit_affine(const work_t *w, const uint8_t *inl, double H[9]) {
    double n = 0, mqx = 0, mqy = 0, mdx = 0, mdy = 0;
    for (int64_t j = 0; j < w->m; j++)
        if (inl[j]) {
            n += 1;
            mqx += w->xq[j]; mqy += w->yq[j]; mdx += w->xd[j]; mdy += w->yd[j];
        }
    if (n < 3) return 0;
    mqx /= n; mqy /= n; mdx /= n; mdy /= n;
    double sxx = 0, sxy = 0, syy = 0, dxx = 0, dxy = 0, dyx = 0, dyy = 0;
    for (int64_t j = 0; j < w->m; j++)
        if (inl[j]) {
            double qx = w->xq[j] - mqx, qy = w->yq[j] - mqy, dx = w->xd[j] - mdx, dy = w->yd[j] - mdy;
            sxx += qx * qx; sxy += qx * qy; syy += qy * qy;
            dxx += dx * qx; dxy += dx * qy; dyx += dy * qx; dyy += dy * qy;
        }
    double S[4] = {sxx, sxy, sxy, syy}, Si[4];
    /* collinear or repeated: the smaller spread direction has (almost) no variance */
    double tr = sxx + syy, det = sxx * syy - sxy * sxy;
    if (!(tr > 1e-6 * n) || !(det > 1e-6 * tr * tr)) return 0;
    if (!inv2(S, Si)) return 0;
    double L[4] = {dxx * Si[0] + dxy * Si[2], dxx * Si[1] + dxy * Si[3],
                   dyx * Si[0] + dyy * Si[2], dyx * Si[1] + dyy * Si[3]};
    double t[2] = {mdx - L[0] * mqx - L[1] * mqy, mdy - L[2] * mqx - L[3] * mqy};
    affine_to_h(L, t, H);
    for (int k = 0; k < 9; k++)
        if (!isfinite(H[k])) return 0;
    return 1;
}

/* Similarity normalisation (Hartley): centroid to 0, mean distance sqrt(2). */
static int normaliser(const float *x, const float *y, const uint8_t *inl, int64_t m, double T[3]) {
    double n = 0, mx = 0, my = 0, d = 0;
    for (int64_t j = 0; j < m; j++)
        if (inl[j]) { n += 1; mx += x[j]; my += y[j]; }
    if (n < 4) return 0;
    mx /= n; my /= n;
    for (int64_t j = 0; j < m; j++)
        if (inl[j]) d += sqrt((x[j] - mx) * (x[j] - mx) + (y[j] - my) * (y[j] - my));
    d /= n;
    if (!(d > 1e-6)) return 0;
    T[0] = sqrt(2.0) / d; T[1] = -mx * T[0]; T[2] = -my * T[0];
    return 1;
}

/* Gaussian elimination with partial pivoting on an n x n system (n <= 8), in place. */
static int solve(double *A, double *b, int n) {
    for (int c = 0; c < n; c++) {
        int p = c;
        for (int r = c + 1; r < n; r++)
            if (fabs(A[r * n + c]) > fabs(A[p * n + c])) p = r;
        if (!(fabs(A[p * n + c]) > 1e-12)) return 0;
        if (p != c) {
            for (int k = 0; k < n; k++) { double t = A[c * n + k]; A[c * n + k] = A[p * n + k]; A[p * n + k] = t; }
            double t = b[c]; b[c] = b[p]; b[p] = t;
        }
        for (int r = c + 1; r < n; r++) {
            double f = A[r * n + c] / A[c * n + c];
            for (int k = c; k < n; k++) A[r * n + k] -= f * A[c * n + k];
            b[r] -= f * b[c];
        }
    }
    for (int c = n - 1; c >= 0; c--) {
        double s = b[c];
        for (int k = c + 1; k < n; k++) s -= A[c * n + k] * b[k];
        b[c] = s / A[c * n + c];
    }
    return 1;
}

/* Least-squares homography (normalised DLT with h33 = 1 in normalised coordinates) on the flagged
 * points; 0 when fewer than 4 points or the system is singular. */
static int fit_homography(const work_t *w, const uint8_t *inl, double H[9]) {
    double Tq[3], Td[3];
    if (!normaliser(w->xq, w->yq, inl, w->m, Tq) || !normaliser(w->xd, w->yd, inl, w->m, Td)) return 0;
    double N[64], b[8];
    memset(N, 0, sizeof N);
    memset(b, 0, sizeof b);
    for (int64_t j = 0; j < w->m; j++) {
        if (!inl[j]) continue;
        double x = Tq[0] * w->xq[j] + Tq[1], y = Tq[0] * w->yq[j] + Tq[2];
        double u = Td[0] * w->xd[j] + Td[1], v = Td[0] * w->yd[j] + Td[2];
        double r1[8] = {x, y, 1, 0, 0, 0, -x * u, -y * u};
        double r2[8] = {0, 0, 0, x, y, 1, -x * v, -y * v};
        for (int a = 0; a < 8; a++) {
            b[a] += r1[a] * u + r2[a] * v;
            for (int c = 0; c < 8; c++) N[a * 8 + c] += r1[a] * r1[c] + r2[a] * r2[c];
        }
    }
    if (!solve(N, b, 8)) return 0;
    double Hn[9] = {b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], 1.0};
    /* H = Td^-1 Hn Tq with T = [[s 0 tx] [0 s ty] [0 0 1]] */
    double M[9];
    for (int r = 0; r < 3; r++) {
        M[r * 3 + 0] = Hn[r * 3 + 0] * Tq[0];
        M[r * 3 + 1] = Hn[r * 3 + 1] * Tq[0];
        M[r * 3 + 2] = Hn[r * 3 + 0] * Tq[1] + Hn[r * 3 + 1] * Tq[2] + Hn[r * 3 + 2];
    }
    double si = 1.0 / Td[0];
    for (int c = 0; c < 3; c++) {
        H[0 * 3 + c] = si * (M[0 * 3 + c] - Td[1] * M[2 * 3 + c]);
        H[1 * 3 + c] = si * (M[1 * 3 + c] - Td[2] * M[2 * 3 + c]);
        H[2 * 3 + c] = M[2 * 3 + c];
    }
    if (!(fabs(H[8]) > 1e-12)) return 0;
    double s = 1.0 / H[8];
    for (int k = 0; k < 9; k++) {
        H[k] *= s;
        if (!isfinite(H[k])) return 0;
    }
    return 1;
}

/* Local optimisation (LO-RANSAC with a shrinking threshold, Lebeda et al. 2012): least-squares
 * re-fits (affine, or homography when homog) on the inliers of the current model at a threshold
 * going from 3x down to 1x, each kept when it loses no inliers at the threshold, then a last fit on
 * the tighter half (points near the threshold pull a least-squares model off). H holds the start
 * model and receives the best one; returns its inlier count at the threshold. */
static int64_t local_opt(const work_t *w, double H[9], int64_t count, double thr2, int iters, int homog) {
    double G[9];
    float *res = w->res;
    uint8_t *inl = w->inl;
    for (int it = 0; it <= iters; it++) {
        double mult = it == iters ? 0.5 : (iters > 1 ? 1.0 + 2.0 * (iters - 1 - it) / (iters - 1) : 1.0);
        residuals(w, H, thr2 * mult * mult, res, inl);
        int ok = homog ? fit_homography(w, inl, G) : fit_affine(w, inl, G);
        if (!ok) continue;
        int64_t c = residuals(w, G, thr2, res, inl);
        if (c >= count) {
            count = c;
            memcpy(H, G, sizeof G);
        }
    }
    return count;
}

/* ---- one pair -------------------------------------------------------------------------------- */

typedef struct { float r; int64_t j; } rank_t;

static int cmp_rank(const void *a, const void *b) {
    const rank_t *x = a, *y = b;
    if (x->r < y->r) return -1;
    if (x->r > y->r) return 1;
    return (x->j > y->j) - (x->j < y->j);
}

/* Keep inliers one to one, best residual first; returns the number kept (flags in inl). */
static int64_t one_to_one(const work_t *w, const int32_t *qid, const int32_t *did, uint8_t *inl,
                          const float *res) {
    int64_t n = 0, kept = 0;
    int32_t maxq = -1, maxd = -1;
    for (int64_t j = 0; j < w->m; j++)
        if (inl[j]) {
            n++;
            if (qid && qid[j] > maxq) maxq = qid[j];
            if (did && did[j] > maxd) maxd = did[j];
        }
    if (!qid && !did) return n;
    rank_t *order = malloc((size_t)(n > 0 ? n : 1) * sizeof(rank_t));
    uint8_t *usedq = calloc((size_t)maxq + 2, 1), *usedd = calloc((size_t)maxd + 2, 1);
    if (!order || !usedq || !usedd) {
        free(order); free(usedq); free(usedd);
        return -1;
    }
    int64_t k = 0;
    for (int64_t j = 0; j < w->m; j++)
        if (inl[j]) { order[k].r = res[j]; order[k].j = j; k++; }
    qsort(order, (size_t)n, sizeof(rank_t), cmp_rank);
    memset(inl, 0, (size_t)w->m);
    for (int64_t i = 0; i < n; i++) {
        int64_t j = order[i].j;
        int32_t a = qid ? qid[j] : -1, b = did ? did[j] : -1;
        if ((a >= 0 && usedq[a]) || (b >= 0 && usedd[b])) continue;
        if (a >= 0) usedq[a] = 1;
        if (b >= 0) usedd[b] = 1;
        inl[j] = 1;
        kept++;
    }
    free(order); free(usedq); free(usedd);
    return kept;
}

/* Inliers must not be repeated or collinear: the smaller principal standard deviation of their
 * positions is at least MIN_SPREAD pixels (and not negligible against the larger one). */
#define MIN_SPREAD 1.0
static int spread_ok(const float *x, const float *y, const uint8_t *inl, int64_t m) {
    double n = 0, mx = 0, my = 0, sxx = 0, sxy = 0, syy = 0;
    for (int64_t j = 0; j < m; j++)
        if (inl[j]) { n += 1; mx += x[j]; my += y[j]; }
    if (n < 3) return 0;
    mx /= n; my /= n;
    for (int64_t j = 0; j < m; j++)
        if (inl[j]) {
            double a = x[j] - mx, b = y[j] - my;
            sxx += a * a; sxy += a * b; syy += b * b;
        }
    sxx /= n; sxy /= n; syy /= n;
    double tr = sxx + syy, det = sxx * syy - sxy * sxy;
    double lmin = tr / 2 - sqrt(fmax(tr * tr / 4 - det, 0.0));
    return lmin >= MIN_SPREAD * MIN_SPREAD && lmin > 1e-4 * tr;
}

static void clear(fsm_result *res, uint8_t *mask, int64_t m) {
    res->n_inliers = 0;
    res->kind = 0;
    for (int k = 0; k < 9; k++) res->model[k] = 0.0;
    if (mask && m > 0) memset(mask, 0, (size_t)m);
}

int fsm_verify(const float *qf, const float *df, const int32_t *qid, const int32_t *did, int64_t m,
               const fsm_params *p, uint8_t *inlier_mask, fsm_result *out) {
    clear(out, inlier_mask, m);
    out->n_hypotheses = 0;
    int min_inl = p->min_inliers > 3 ? p->min_inliers : 3;
    if (m < 3 || !(p->threshold > 0)) return 0;

    work_t w;
    w.m = m;
    w.xq = malloc((size_t)m * sizeof(float));
    w.yq = malloc((size_t)m * sizeof(float));
    w.xd = malloc((size_t)m * sizeof(float));
    w.yd = malloc((size_t)m * sizeof(float));
    w.res = malloc((size_t)m * sizeof(float));
    w.ls = malloc((size_t)m * sizeof(float));
    w.cs = malloc((size_t)m * sizeof(float));
    w.sn = malloc((size_t)m * sizeof(float));
    w.shape = p->max_scale_change > 1.0 || (p->max_angle > 0 && p->max_angle < M_PI);
    w.log_tol = p->max_scale_change > 1.0 ? (float)log(p->max_scale_change) : 1e30f;
    w.cos_tol = (p->max_angle > 0 && p->max_angle < M_PI) ? (float)cos(p->max_angle) : -2.0f;
    w.hyp_ok = malloc((size_t)m);
    w.inl = malloc((size_t)m);
    int64_t *hyps = malloc((size_t)m * sizeof(int64_t));
    int status = 0;
    if (!w.xq || !w.yq || !w.xd || !w.yd || !w.res || !w.ls || !w.cs || !w.sn || !w.hyp_ok || !w.inl || !hyps) {
        status = -1;
        goto done;
    }

    /* copy positions; points with non-finite values are moved far away, frames that cannot be
     * inverted (or are non-finite) make no hypothesis */
    int64_t n_valid = 0, n_hyp = 0;
    for (int64_t j = 0; j < m; j++) {
        const float *a = qf + 6 * j, *b = df + 6 * j;
        int fin_pt = isfinite(a[0]) && isfinite(a[1]) && isfinite(b[0]) && isfinite(b[1]) &&
                     fabsf(a[0]) < 1e9f && fabsf(a[1]) < 1e9f && fabsf(b[0]) < 1e9f && fabsf(b[1]) < 1e9f;
        w.xq[j] = fin_pt ? a[0] : FAR_AWAY;
        w.yq[j] = fin_pt ? a[1] : FAR_AWAY;
        w.xd[j] = fin_pt ? b[0] : -FAR_AWAY;
        w.yd[j] = fin_pt ? b[1] : -FAR_AWAY;
        n_valid += fin_pt;
        int fin_shape = fin_pt;
        for (int k = 2; k < 6; k++) fin_shape = fin_shape && isfinite(a[k]) && isfinite(b[k]);
        w.hyp_ok[j] = (uint8_t)fin_shape;
        w.ls[j] = 1e9f; w.cs[j] = 0.0f; w.sn[j] = 0.0f;
        if (fin_shape) {
            double Lq[4] = {a[2], a[3], a[4], a[5]}, Lqi[4];
            if (inv2(Lq, Lqi)) {
                double M[4] = {b[2] * Lqi[0] + b[3] * Lqi[2], b[2] * Lqi[1] + b[3] * Lqi[3],
                               b[4] * Lqi[0] + b[5] * Lqi[2], b[4] * Lqi[1] + b[5] * Lqi[3]};
                scale_angle(M, &w.ls[j], &w.cs[j], &w.sn[j]);
            }
            hyps[n_hyp++] = j;
        }
    }
    if (n_valid < min_inl) goto done;

    const double thr2 = p->threshold * p->threshold;
    const double smax_ok = p->max_scale > 0 ? p->max_scale : 1e30;
    const double aniso_ok = p->max_anisotropy > 0 ? p->max_anisotropy : 1e30;
    int64_t n_eval = n_hyp;
    if (p->max_hypotheses > 0 && n_eval > p->max_hypotheses) n_eval = p->max_hypotheses;

    double best[9];
    int64_t best_count = 0;
    int have = 0;
    for (int64_t s = 0; s < n_eval; s++) {
        /* the first n_eval usable correspondences: callers order them most distinctive first */
        int64_t j = hyps[s];
        const float *a = qf + 6 * j, *b = df + 6 * j;
        double Lq[4] = {a[2], a[3], a[4], a[5]}, Lqi[4];
        if (!inv2(Lq, Lqi)) continue;
        double L[4] = {b[2] * Lqi[0] + b[3] * Lqi[2], b[2] * Lqi[1] + b[3] * Lqi[3],
                       b[4] * Lqi[0] + b[5] * Lqi[2], b[4] * Lqi[1] + b[5] * Lqi[3]};
        double det = L[0] * L[3] - L[1] * L[2];
        if (!(det > 0)) continue; /* mirror images do not occur between photos */
        double smx, smn;
        sv2(L, &smx, &smn);
        double sc = sqrt(det);
        if (!(sc <= smax_ok && sc >= 1.0 / smax_ok) || !(smx <= aniso_ok * smn)) continue;
        double t[2] = {b[0] - L[0] * a[0] - L[1] * a[1], b[1] - L[2] * a[0] - L[3] * a[1]};
        float A[6] = {(float)L[0], (float)L[1], (float)t[0], (float)L[2], (float)L[3], (float)t[1]};
        out->n_hypotheses++;
        int64_t c = count_affine(&w, A, (float)thr2);
        if (c > best_count || (!have && c >= 1)) {
            double H[9];
            affine_to_h(L, t, H);
            c = local_opt(&w, H, c, thr2, p->lo_iterations, 0);
            if (c > best_count || !have) {
                best_count = c;
                memcpy(best, H, sizeof best);
                have = 1;
            }
        }
    }
    if (!have || best_count < min_inl) goto done;

    int kind = 1;
    if (p->homography && best_count >= 8) {
        double H[9];
        memcpy(H, best, sizeof H);
        int64_t ch = local_opt(&w, H, 0, thr2, p->lo_iterations > 0 ? p->lo_iterations : 1, 1);
        if (ch > best_count) {
            best_count = ch;
            memcpy(best, H, sizeof best);
            kind = 2;
        }
    }

    /* final inliers: one to one, and spread in both images */
    residuals(&w, best, thr2, w.res, w.inl);
    int64_t kept = one_to_one(&w, qid, did, w.inl, w.res);
    if (kept < 0) { status = -1; goto done; }
    if (kept < min_inl) goto done;
    if (!spread_ok(w.xq, w.yq, w.inl, m) || !spread_ok(w.xd, w.yd, w.inl, m)) goto done;
    out->n_inliers = (int32_t)kept;
    out->kind = kind;
    memcpy(out->model, best, sizeof best);
    if (inlier_mask) memcpy(inlier_mask, w.inl, (size_t)m);

done:
    free(w.xq); free(w.yq); free(w.xd); free(w.yd); free(w.res); free(w.ls); free(w.cs); free(w.sn);
    free(w.hyp_ok); free(w.inl); free(hyps);
    if (status != 0) clear(out, inlier_mask, m);
    return status;
}
