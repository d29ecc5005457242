/* Hessian-Affine detector and SIFT descriptor (Mikolajczyk & Schmid 2004; Baumberg 2000;
 * Lowe 2004), following the widely used behaviour of Perdoch's hesaff; see hesaff_core.h. */
#include "hesaff_core.h"

#include <math.h>
#include <stdlib.h>
#include <stddef.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define HS_MAX_PATCH 129
/* largest compat sampling window side: patches bigger than this are sampled from a pyramid level */
#define HS_MAX_SIDE 4096

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

void hs_default_params(hs_params *p)
{
    p->threshold = 16.0f / 3.0f;
    p->edge_ratio = 10.0f;
    p->border = 5;
    p->initial_sigma = 1.6f;
    p->smm_window = 19;
    p->max_iter = 16;
    p->max_aniso = 6.0f;
    p->conv_thr = 0.05f;
    p->mr_size = 3.0f * sqrtf(3.0f);
    p->patch_size = 41;
    p->mode = 0;
    p->oriented = 0;
    p->max_ori = HS_MAX_ORI;
    p->ori_peak = 0.8f;
    p->n_regions = 0;
    p->regions = NULL;
    p->check_region = 1.0f;
    p->shape_update = 0;
    p->ref_flags = 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Detection                                                                                  */

/* det(H) sigma^4 from 3x3 finite differences; zero on the one-pixel border. */
static void hessian_response(const float *in, int w, int h, float sigma, float *out, int threads)
{
    const float norm = sigma * sigma * sigma * sigma;
    int r;
    memset(out, 0, sizeof(float) * (size_t)w);
    if (h > 1) memset(out + (size_t)(h - 1) * w, 0, sizeof(float) * (size_t)w);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (r = 1; r < h - 1; r++) {
        const float *a = in + (size_t)(r - 1) * w, *b = a + w, *c = b + w;
        float *o = out + (size_t)r * w;
        o[0] = 0.0f;
        o[w - 1] = 0.0f;
        for (int x = 1; x < w - 1; x++) {
            const float dxx = b[x - 1] - 2.0f * b[x] + b[x + 1];
            const float dyy = a[x] - 2.0f * b[x] + c[x];
            const float dxy = 0.25f * (c[x + 1] - c[x - 1] - a[x + 1] + a[x - 1]);
            o[x] = (dxx * dyy - dxy * dxy) * norm;
        }
    }
}

/* v is >= (maxima) or <= (minima) every value of its 3x3x3 neighbourhood; its own level first,
 * where most candidates fail. */
static inline int is_extremum(const float *lo, const float *cu, const float *hi, int w, size_t i, float v, int maxima)
{
    const ptrdiff_t o[9] = {-w - 1, -w, -w + 1, -1, 0, 1, w - 1, w, w + 1};
    if (maxima) {
        for (int k = 0; k < 9; k++) if (cu[i + o[k]] > v) return 0;
        for (int k = 0; k < 9; k++) if (lo[i + o[k]] > v || hi[i + o[k]] > v) return 0;
    } else {
        for (int k = 0; k < 9; k++) if (cu[i + o[k]] < v) return 0;
        for (int k = 0; k < 9; k++) if (lo[i + o[k]] < v || hi[i + o[k]] < v) return 0;
    }
    return 1;
}

/* Solve A x = b (3x3) by Gaussian elimination with partial pivoting; returns 0 when singular. */
static int solve3(double A[9], double b[3])
{
    for (int col = 0; col < 3; col++) {
        int piv = col;
        for (int r = col + 1; r < 3; r++)
            if (fabs(A[r * 3 + col]) > fabs(A[piv * 3 + col])) piv = r;
        if (fabs(A[piv * 3 + col]) < 1e-10) return 0;
        if (piv != col) {
            for (int k = 0; k < 3; k++) {
                double t = A[col * 3 + k]; A[col * 3 + k] = A[piv * 3 + k]; A[piv * 3 + k] = t;
            }
            double t = b[col]; b[col] = b[piv]; b[piv] = t;
        }
        for (int r = col + 1; r < 3; r++) {
            double f = A[r * 3 + col] / A[col * 3 + col];
            for (int k = col; k < 3; k++) A[r * 3 + k] -= f * A[col * 3 + k];
            b[r] -= f * b[col];
        }
    }
    for (int r = 2; r >= 0; r--) {
        double s = b[r];
        for (int k = r + 1; k < 3; k++) s -= A[r * 3 + k] * b[k];
        b[r] = s / A[r * 3 + r];
    }
    return isfinite(b[0]) && isfinite(b[1]) && isfinite(b[2]);
}

/* Quadratic 3-D refinement of a candidate at (r, c) of the middle response `cu`.
 * Returns 1 and the refined (row, col, offsets, value) when it converges within bounds. */
static int localize(const float *lo, const float *cu, const float *hi, int w, int h, const hs_params *p,
                    int *pr, int *pc, double off[3], float *val)
{
    int r = *pr, c = *pc, nr = r, nc = c, converged = 0;
    /* how close to the octave border the refinement may move the point */
    const int sb = (p->ref_flags & HS_REF_SAFETY3) ? 3 : p->border;
    const double edge = (p->edge_ratio + 1.0) * (p->edge_ratio + 1.0) / p->edge_ratio;
    double v = 0.0;
    for (int iter = 0; iter < 5; iter++) {
        r = nr;
        c = nc;
        const size_t i = (size_t)r * w + c;
        const double dxx = cu[i - 1] - 2.0 * cu[i] + cu[i + 1];
        const double dyy = cu[i - w] - 2.0 * cu[i] + cu[i + w];
        const double dss = lo[i] - 2.0 * cu[i] + hi[i];
        const double dxy = 0.25 * (cu[i + w + 1] - cu[i + w - 1] - cu[i - w + 1] + cu[i - w - 1]);
        if (iter == 0) {  /* edge-like response: a saddle or one dominant curvature */
            const double det = dxx * dyy - dxy * dxy, tr = dxx + dyy;
            if (det <= 0.0 || tr * tr / det >= edge) return 0;
        }
        const double dxs = 0.25 * (hi[i + 1] - hi[i - 1] - lo[i + 1] + lo[i - 1]);
        const double dys = 0.25 * (hi[i + w] - hi[i - w] - lo[i + w] + lo[i - w]);
        double A[9] = {dxx, dxy, dxs, dxy, dyy, dys, dxs, dys, dss};
        const double dx = 0.5 * (cu[i + 1] - cu[i - 1]);
        const double dy = 0.5 * (cu[i + w] - cu[i - w]);
        const double ds = 0.5 * (hi[i] - lo[i]);
        double b[3] = {-dx, -dy, -ds};
        if (!solve3(A, b)) return 0;
        v = cu[i] + 0.5 * (dx * b[0] + dy * b[1] + ds * b[2]);
        off[0] = b[0];
        off[1] = b[1];
        off[2] = b[2];
        if (b[0] > 0.6) { if (c < w - sb) nc++; else return 0; }
        if (b[1] > 0.6) { if (r < h - sb) nr++; else return 0; }
        if (b[0] < -0.6) { if (c > sb) nc--; else return 0; }
        if (b[1] < -0.6) { if (r > sb) nr--; else return 0; }
        if (nr == r && nc == c) {
            converged = 1;
            break;
        }
    }
    /* the reference program also keeps a point still moving after the 5th step (it computes the
     * convergence flag but never tests it), at its last position */
    if (!converged && !(p->ref_flags & HS_REF_UNCONV)) return 0;
    if (fabs(off[0]) > 1.5 || fabs(off[1]) > 1.5 || fabs(off[2]) > 1.5) return 0;
    *pr = r;
    *pc = c;
    *val = (float)v;
    return 1;
}

int hs_detect_octave(const float *const *L, int w, int h, float pd, int octave, const hs_params *p,
                     int threads, hs_kp **out, int *n, int *cap)
{
    const int B = p->border > 1 ? p->border : 1;
    if (w <= 2 * B + 2 || h <= 2 * B + 2) return 0;
    const size_t npix = (size_t)w * h;
    float *R = (float *)malloc(sizeof(float) * npix * 5);
    unsigned char *cand = (unsigned char *)malloc(npix);
    unsigned char *done = (unsigned char *)calloc(npix, 1);
    if (!R || !cand || !done) {
        free(R); free(cand); free(done);
        return -1;
    }
    const float step = powf(2.0f, 1.0f / HS_LEVELS_PER_OCTAVE);
    /* octaves below a megapixel run on one thread: the parallel regions cost more than they
     * save there, and between them (serial refinement) an idle OpenMP worker spins */
    if (npix < (size_t)1 << 20) threads = 1;
    for (int k = 0; k < 5; k++)
        hessian_response(L[k], w, h, p->initial_sigma * powf(step, (float)k), R + k * npix, threads);
    const float final_thr = p->threshold * p->threshold;
    const float cand_thr = 0.8f * final_thr;
    int status = 0;
    for (int k = 1; k <= 3 && status == 0; k++) {
        const float *lo = R + (k - 1) * npix, *cu = R + k * npix, *hi = R + (k + 1) * npix;
        int r;
        /* candidates in parallel; refinement sequentially in raster order so that the
         * duplicate suppression (one point per octave pixel) does not depend on threads */
#pragma omp parallel for num_threads(threads) schedule(static)
        for (r = 0; r < h; r++) {
            unsigned char *cr = cand + (size_t)r * w;
            memset(cr, 0, (size_t)w);
            if (r < B || r >= h - B) continue;
            const float *row = cu + (size_t)r * w;
            for (int c = B; c < w - B; c++) {
                const float v = row[c];
                if (v > cand_thr) cr[c] = (unsigned char)is_extremum(lo, cu, hi, w, (size_t)r * w + c, v, 1);
                else if (v < -cand_thr) cr[c] = (unsigned char)is_extremum(lo, cu, hi, w, (size_t)r * w + c, v, 0);
            }
        }
        const float sigma = p->initial_sigma * powf(step, (float)k);
        for (size_t i = 0; i < npix; i++) {
            if (!cand[i]) continue;
            int rr = (int)(i / w), cc = (int)(i % w);
            double off[3];
            float val;
            if (!localize(lo, cu, hi, w, h, p, &rr, &cc, off, &val)) continue;
            if (fabsf(val) < final_thr || !isfinite(val)) continue;
            const size_t j = (size_t)rr * w + cc;
            if (done[j]) continue;
            done[j] = 1;
            if (*n == *cap) {
                int nc = *cap ? 2 * *cap : 1024;
                hs_kp *t = (hs_kp *)realloc(*out, sizeof(hs_kp) * (size_t)nc);
                if (!t) { status = -1; break; }
                *out = t;
                *cap = nc;
            }
            hs_kp *kp = *out + (*n)++;
            kp->x = pd * (float)(cc + off[0]);
            kp->y = pd * (float)(rr + off[1]);
            kp->s = pd * sigma * powf(2.0f, (float)off[2] / HS_LEVELS_PER_OCTAVE);
            kp->response = val;
            kp->octave = octave;
            kp->level = k;
        }
    }
    free(R);
    free(cand);
    free(done);
    return status;
}

/* ------------------------------------------------------------------------------------------ */
/* Sampling                                                                                   */

static inline float bilinear(const float *d, int w, int h, float x, float y)
{
    if (!(x >= 0.0f)) x = 0.0f;  /* also catches NaN */
    if (!(y >= 0.0f)) y = 0.0f;
    if (x > (float)(w - 1)) x = (float)(w - 1);
    if (y > (float)(h - 1)) y = (float)(h - 1);
    int x0 = (int)x, y0 = (int)y;
    int x1 = x0 + 1 < w ? x0 + 1 : x0, y1 = y0 + 1 < h ? y0 + 1 : y0;
    const float fx = x - (float)x0, fy = y - (float)y0;
    const float *r0 = d + (size_t)y0 * w, *r1 = d + (size_t)y1 * w;
    return (1.0f - fy) * ((1.0f - fx) * r0[x0] + fx * r0[x1]) + fy * ((1.0f - fx) * r1[x0] + fx * r1[x1]);
}

/* out[j][i] = img(cx + a11 u + a12 v, cy + a21 u + a22 v), u = i - half, v = j - half.
 * Samples outside the image are clamped to its border (replicate), or are 0 with `zero` (the
 * reference program: a sample needs its 2x2 bilinear support inside). */
static void warp(const float *d, int w, int h, float cx, float cy, float a11, float a12, float a21, float a22,
                 int side, float *out, int zero)
{
    const int half = side / 2;
    /* an affine map sends the window square to a parallelogram: when its corners are inside,
     * every sample is, and the clamping can be skipped */
    int in = w >= 2 && h >= 2;
    for (int k = 0; k < 4 && in; k++) {
        const float u = (k & 1) ? (float)half : -(float)half, v = (k & 2) ? (float)half : -(float)half;
        const float px = cx + a11 * u + a12 * v, py = cy + a21 * u + a22 * v;
        in = px >= 0.0f && py >= 0.0f && px < (float)(w - 1) && py < (float)(h - 1);
    }
    for (int j = 0; j < side; j++) {
        const float v = (float)(j - half);
        const float bx = cx + a12 * v - a11 * half, by = cy + a22 * v - a21 * half;
        if (in) {
            for (int i = 0; i < side; i++) {
                const float x = bx + a11 * (float)i, y = by + a21 * (float)i;
                const int x0 = (int)x, y0 = (int)y;
                const float fx = x - (float)x0, fy = y - (float)y0;
                const float *r0 = d + (size_t)y0 * w + x0, *r1 = r0 + w;
                out[i] = (1.0f - fy) * ((1.0f - fx) * r0[0] + fx * r0[1]) + fy * ((1.0f - fx) * r1[0] + fx * r1[1]);
            }
            out += side;
        } else if (zero) {
            for (int i = 0; i < side; i++) {
                const float x = bx + a11 * (float)i, y = by + a21 * (float)i;
                const float fx0 = floorf(x), fy0 = floorf(y);
                if (fx0 >= 0.0f && fy0 >= 0.0f && fx0 < (float)(w - 1) && fy0 < (float)(h - 1)) {
                    const int x0 = (int)fx0, y0 = (int)fy0;
                    const float fx = x - fx0, fy = y - fy0;
                    const float *r0 = d + (size_t)y0 * w + x0, *r1 = r0 + w;
                    *out++ = (1.0f - fy) * ((1.0f - fx) * r0[0] + fx * r0[1]) + fy * ((1.0f - fx) * r1[0] + fx * r1[1]);
                } else {
                    *out++ = 0.0f;
                }
            }
        } else {
            for (int i = 0; i < side; i++)
                *out++ = bilinear(d, w, h, bx + a11 * (float)i, by + a21 * (float)i);
        }
    }
}

/* atan2 with |error| < 1e-5 rad (minimax polynomial on [0, 1]), branch-free so that loops over it
 * vectorise; libm's atan2f was the SIFT bottleneck. */
static inline float fast_atan2(float y, float x)
{
    const float ax = fabsf(x), ay = fabsf(y);
    const float mx = ax > ay ? ax : ay, mn = ax > ay ? ay : ax;
    const float a = mn / (mx + 1e-30f), s = a * a;
    float r = ((((-0.01172120f * s + 0.05265332f) * s - 0.11643287f) * s + 0.19354346f) * s - 0.33262347f) * s * a
              + 0.99997726f * a;
    r = ay > ax ? 1.57079637f - r : r;
    r = x < 0.0f ? 3.14159274f - r : r;
    return y < 0.0f ? -r : r;
}

/* Separable Gaussian blur in place (clamped borders); tmp holds side*side floats. Radius ceil(3 sigma),
 * or with `ref` the reference program's kernel of int(6 sigma + 1) taps made odd. */
static void blur_square(float *img, int side, float sigma, float *tmp, int ref)
{
    int rad = (int)ceilf(3.0f * sigma);
    if (ref) {
        int k = (int)(6.0f * sigma + 1.0f);
        rad = (k | 1) / 2;
    }
    if (rad < 1) return;
    if (rad > 63) rad = 63;
    float k[127], sum = 0.0f;
    for (int i = -rad; i <= rad; i++) {
        k[i + rad] = expf(-(float)(i * i) / (2.0f * sigma * sigma));
        sum += k[i + rad];
    }
    for (int i = 0; i < 2 * rad + 1; i++) k[i] /= sum;
    /* rows: pad each row by replication, then a clean dot product per pixel */
    float pad[HS_MAX_SIDE + 2 * 63];
    for (int r = 0; r < side; r++) {
        const float *src = img + (size_t)r * side;
        float *dst = tmp + (size_t)r * side;
        for (int c = 0; c < rad; c++) pad[c] = src[0];
        memcpy(pad + rad, src, sizeof(float) * side);
        for (int c = 0; c < rad; c++) pad[rad + side + c] = src[side - 1];
        for (int c = 0; c < side; c++) {
            const float *p = pad + c;
            float a = 0.0f;
            for (int t = 0; t < 2 * rad + 1; t++) a += k[t] * p[t];
            dst[c] = a;
        }
    }
    /* columns: accumulate whole rows so the inner loop runs along memory */
    for (int r = 0; r < side; r++) {
        float *dst = img + (size_t)r * side;
        memset(dst, 0, sizeof(float) * side);
        for (int t = -rad; t <= rad; t++) {
            int rr = r + t;
            rr = rr < 0 ? 0 : (rr >= side ? side - 1 : rr);
            const float *src = tmp + (size_t)rr * side;
            const float kt = k[t + rad];
            for (int c = 0; c < side; c++) dst[c] += kt * src[c];
        }
    }
}

typedef struct {
    float *buf;
    size_t cap;
} scratch;

static float *scratch_get(scratch *s, size_t n)
{
    if (n > s->cap) {
        float *t = (float *)realloc(s->buf, sizeof(float) * n);
        if (!t) return NULL;
        s->buf = t;
        s->cap = n;
    }
    return s->buf;
}

/* Does the square of the patch (half-side `half` x step, through the affine U) stay inside? */
static int inside(const hs_image *im, float x, float y, const float U[4], float step, int half)
{
    const float hx = step * half;
    const float cs[4][2] = {{-hx, -hx}, {hx, -hx}, {-hx, hx}, {hx, hx}};
    for (int k = 0; k < 4; k++) {
        const float px = x + U[0] * cs[k][0] + U[1] * cs[k][1];
        const float py = y + U[2] * cs[k][0] + U[3] * cs[k][1];
        if (!(px >= 0.0f && py >= 0.0f && px <= (float)(im->w - 2) && py <= (float)(im->h - 2))) return 0;
    }
    return 1;
}

/* The reference program's border tests: the patch corners (half-side `half` x step through U) lie
 * at least 1 px inside (floor > 0, ceil < side - 2), and, with win_half > 0, the image-resolution
 * window (half-side win_half through U) has its bilinear support inside the image. */
static int inside_ref(const hs_image *im, float x, float y, const float U[4], float step, int half, int win_half)
{
    for (int k = 0; k < 4; k++) {
        const float su = (k & 1) ? 1.0f : -1.0f, sv = (k & 2) ? 1.0f : -1.0f;
        const float u = su * half * step, v = sv * half * step;
        const float px = x + U[0] * u + U[1] * v, py = y + U[2] * u + U[3] * v;
        if (!(floorf(px) > 0.0f && floorf(py) > 0.0f && ceilf(px) < (float)(im->w - 2) && ceilf(py) < (float)(im->h - 2)))
            return 0;
        if (win_half > 0) {
            const float wx = x + (U[0] * su + U[1] * sv) * win_half, wy = y + (U[2] * su + U[3] * sv) * win_half;
            if (!(floorf(wx) >= 0.0f && floorf(wy) >= 0.0f && wx < (float)(im->w - 1) && wy < (float)(im->h - 1)))
                return 0;
        }
    }
    return 1;
}

/* Reference behaviour: warp a window at image resolution, blur it by 1.5 x the subsampling step,
 * subsample to the patch. Returns -1 when out of memory. */
static int patch_compat(const hs_image *img, float x, float y, float radius, const float U[4], int P,
                        float *patch, scratch *ws, int ref_flags)
{
    const float mr = ceilf(radius);
    int side = 2 * (int)mr + 1;
    const float t = (float)side / (float)P;
    if (t > 0.4f) {
        side += 2;
        float *win = scratch_get(ws, 2 * (size_t)side * side);
        if (!win) return -1;
        warp(img->data, img->w, img->h, x, y, U[0], U[1], U[2], U[3], side, win, 0);
        blur_square(win, side, 1.5f * t, win + (size_t)side * side, ref_flags & HS_REF_BLURK);
        const float c = (float)(side / 2);
        warp(win, side, side, c, c, t, 0.0f, 0.0f, t, P, patch, 0);
    } else {
        warp(img->data, img->w, img->h, x, y, t * U[0], t * U[1], t * U[2], t * U[3], P, patch, 0);
    }
    return 0;
}

/* Fast: bilinear samples straight from the pyramid level whose blur matches the subsampling. */
static void patch_fast(const hs_image *pyr, int n_pyr, float x, float y, float radius, const float U[4], int P,
                       float *patch)
{
    const float t = (2.0f * radius + 1.0f) / (float)P;
    const float want = 1.5f * t;
    int best = 0;
    for (int i = 1; i < n_pyr; i++)
        if (pyr[i].blur <= want * 1.05f && pyr[i].blur > pyr[best].blur) best = i;
    const hs_image *im = pyr + best;
    const float q = t / im->pd;
    warp(im->data, im->w, im->h, x / im->pd, y / im->pd, q * U[0], q * U[1], q * U[2], q * U[3], P, patch, 0);
}

/* ------------------------------------------------------------------------------------------ */
/* Affine shape adaptation (Baumberg 2000; Mikolajczyk & Schmid 2004)                         */

/* Symmetric [a b; b c] -> its inverse square root normalised to det 1, in place; l1 >= l2 are the
 * eigenvalues of that normalised inverse square root. Returns 0 when not positive definite. */
static int inv_sqrt(double *a, double *b, double *c, double *l1, double *l2)
{
    double cs, sn;
    if (*b != 0.0) {
        double r = (*c - *a) / (2.0 * *b);
        double t = r >= 0 ? 1.0 / (r + sqrt(1.0 + r * r)) : -1.0 / (-r + sqrt(1.0 + r * r));
        cs = 1.0 / sqrt(1.0 + t * t);
        sn = t * cs;
    } else {
        cs = 1.0;
        sn = 0.0;
    }
    const double e1 = cs * cs * *a - 2.0 * cs * sn * *b + sn * sn * *c;
    const double e2 = sn * sn * *a + 2.0 * cs * sn * *b + cs * cs * *c;
    if (!(e1 > 0.0 && e2 > 0.0)) return 0;
    double x = 1.0 / sqrt(e1), z = 1.0 / sqrt(e2);
    const double d = sqrt(x * z);
    x /= d;
    z /= d;
    *l1 = x > z ? x : z;
    *l2 = x > z ? z : x;
    *a = cs * cs * x + sn * sn * z;
    *b = -cs * sn * x + sn * cs * z;
    *c = sn * sn * x + cs * cs * z;
    return 1;
}

/* U <- U R with R a rotation such that U's first row becomes (p, 0): the patch's vertical axis maps
 * to the image vertical ("gravity vector"); det normalised to 1. Returns 0 when degenerate. */
static int rectify_upright(float U[4])
{
    const double a = U[0], b = U[1], c = U[2], d = U[3];
    const double det = sqrt(fabs(a * d - b * c)), n = sqrt(a * a + b * b);
    if (!(det > 1e-12 && n > 1e-12)) return 0;
    U[0] = (float)(n / det);
    U[1] = 0.0f;
    U[2] = (float)((d * b + c * a) / (n * det));
    U[3] = (float)(det / n);
    return 1;
}

/* Ratio of the singular values of a 2x2 matrix (>= 1). */
static double anisotropy(const float U[4])
{
    const double a = U[0], b = U[1], c = U[2], d = U[3];
    const double s = a * a + b * b + c * c + d * d, det = fabs(a * d - b * c);
    const double disc = sqrt(fmax(0.0, s * s - 4.0 * det * det));
    const double smax = sqrt(0.5 * (s + disc)), smin2 = 0.5 * (s - disc);
    if (smin2 <= 1e-20) return INFINITY;
    return smax / sqrt(smin2);
}

/* Iterate U <- U M^-1/2 with M the second-moment matrix measured in the window warped by U,
 * sampled on the level below the detection level. Returns 1 when the shape converged. */
static int adapt_shape(const hs_image *lev, const hs_kp *kp, const hs_params *p, const float *mask,
                       float *win, float U[4])
{
    const int S = p->smm_window;
    const float lx = kp->x / lev->pd, ly = kp->y / lev->pd;
    const float ratio = kp->s / (p->initial_sigma * lev->pd);
    double ratio_act = 0.0, ratio_bef;
    U[0] = 1.0f; U[1] = 0.0f; U[2] = 0.0f; U[3] = 1.0f;
    for (int it = 0; it < p->max_iter; it++) {
        warp(lev->data, lev->w, lev->h, lx, ly, ratio * U[0], ratio * U[1], ratio * U[2], ratio * U[3], S, win,
             p->ref_flags & HS_REF_SMM_ZERO);
        /* central differences halved, one-sided at the window border; the reference program
         * leaves the central ones undivided (its border gradients weigh half) */
        const float ci = (p->ref_flags & HS_REF_SMM_GRAD) ? 1.0f : 0.5f;
        double a = 0.0, b = 0.0, c = 0.0;
        for (int r = 0; r < S; r++) {
            const float *row = win + r * S;
            const float *up = r > 0 ? row - S : row, *dn = r < S - 1 ? row + S : row;
            const float sy = (r > 0 && r < S - 1) ? ci : 1.0f;
            for (int q = 0; q < S; q++) {
                const int ql = q > 0 ? q - 1 : q, qr = q < S - 1 ? q + 1 : q;
                const float sx = (q > 0 && q < S - 1) ? ci : 1.0f;
                const double gx = sx * (row[qr] - row[ql]), gy = sy * (dn[q] - up[q]);
                const double m = mask[r * S + q];
                a += m * gx * gx;
                b += m * gx * gy;
                c += m * gy * gy;
            }
        }
        double l1, l2;
        if (!inv_sqrt(&a, &b, &c, &l1, &l2)) return 0;
        ratio_bef = ratio_act;
        ratio_act = 1.0 - l2 / l1;
        const float u11 = U[0], u12 = U[1], u21 = U[2], u22 = U[3];
        if (p->shape_update == 0) {
            /* the reference program's update, U <- M^-1/2 U, with U only normalised to det 1
             * inside the loop; it converges to the same fixed points as the right-composed form
             * but keeps (and drops) the same points as the reference */
            U[0] = (float)(a * u11 + b * u21);
            U[1] = (float)(a * u12 + b * u22);
            U[2] = (float)(b * u11 + c * u21);
            U[3] = (float)(b * u12 + c * u22);
            const double dd = sqrt(fabs((double)U[0] * U[3] - (double)U[1] * U[2]));
            if (!(dd > 1e-12)) return 0;
            for (int q = 0; q < 4; q++) U[q] = (float)(U[q] / dd);
        } else {
            /* gradients were measured in patch coordinates, so the correction composes on the right */
            U[0] = (float)(u11 * a + u12 * b);
            U[1] = (float)(u11 * b + u12 * c);
            U[2] = (float)(u21 * a + u22 * b);
            U[3] = (float)(u21 * b + u22 * c);
            if (!rectify_upright(U)) return 0;
        }
        if (p->ref_flags & HS_REF_ANISO_EIG) {
            /* the reference program: ratio of the eigenvalues of U (complex ones: rejected) */
            const double tr = (double)U[0] + U[3], det = (double)U[0] * U[3] - (double)U[1] * U[2];
            const double disc = tr * tr - 4.0 * det;
            if (!(disc >= 0.0)) return 0;
            const double e1 = 0.5 * (tr + sqrt(disc)), e2 = 0.5 * (tr - sqrt(disc));
            if (e1 / e2 > p->max_aniso || e2 / e1 > p->max_aniso) return 0;
        } else if (anisotropy(U) > p->max_aniso) return 0;
        if (ratio_act < p->conv_thr && ratio_bef < p->conv_thr) return rectify_upright(U);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Orientation and SIFT                                                                       */

typedef struct {
    int P;
    float *mask;  /* circular Gaussian falloff of the descriptor */
    int *bin0, *bin1;
    float *w0, *w1;
} sift_tables;

static int sift_tables_init(sift_tables *t, int P)
{
    t->P = P;
    t->mask = (float *)malloc(sizeof(float) * P * P);
    t->bin0 = (int *)malloc(sizeof(int) * 2 * P);
    t->w0 = (float *)malloc(sizeof(float) * 2 * P);
    if (!t->mask || !t->bin0 || !t->w0) {
        free(t->mask); free(t->bin0); free(t->w0);
        return -1;
    }
    t->bin1 = t->bin0 + P;
    t->w1 = t->w0 + P;
    const int half = P / 2;
    const float r2 = (float)(half * half), s2 = 0.9f * r2;
    for (int i = 0; i < P; i++)
        for (int j = 0; j < P; j++) {
            const float d2 = (float)((i - half) * (i - half) + (j - half) * (j - half));
            t->mask[i * P + j] = d2 < r2 ? expf(-d2 / s2) : 0.0f;
        }
    const float step = 5.0f / (float)(2 * half);  /* 4 spatial bins + the half bins at both ends */
    for (int i = 0; i < P; i++) {
        const float x = step * (float)i, xi = floorf(x);
        int b0 = (int)xi - 1, b1 = (int)xi;
        float w1 = x - xi, w0 = 1.0f - w1;
        if (b0 < 0) { b0 = 0; w0 = 0.0f; }
        if (b0 >= 4) { b0 = 3; w0 = 0.0f; }
        if (b1 < 0) { b1 = 0; w1 = 0.0f; }
        if (b1 >= 4) { b1 = 3; w1 = 0.0f; }
        t->bin0[i] = b0 * 8;
        t->bin1[i] = b1 * 8;
        t->w0[i] = w0;
        t->w1[i] = w1;
    }
    return 0;
}

static void sift_tables_free(sift_tables *t)
{
    free(t->mask);
    free(t->bin0);
    free(t->w0);
}

static inline void grad_at(const float *p, int P, int r, int c, float *gx, float *gy)
{
    const float *row = p + r * P;
    *gx = c == 0 ? row[1] - row[0] : (c == P - 1 ? row[c] - row[c - 1] : row[c + 1] - row[c - 1]);
    *gy = r == 0 ? p[P + c] - p[c] : (r == P - 1 ? row[c] - row[c - P] : row[c + P] - row[c - P]);
}


/* Gradient magnitude (times the descriptor mask) and orientation in units of 1/8 turn, [0, 8),
 * for every pixel; branch-free in the interior so the compiler vectorises it. */
static void sift_gradients(const sift_tables *t, const float *patch, float *mag, float *ori)
{
    const int P = t->P;
    const float k = 8.0f / (2.0f * (float)M_PI);
    float gx[HS_MAX_PATCH], gy[HS_MAX_PATCH];
    for (int r = 0; r < P; r++) {
        const float *row = patch + r * P;
        const float *up = r > 0 ? row - P : row, *dn = r < P - 1 ? row + P : row;
        /* one-sided differences at the patch border */
        gx[0] = row[1] - row[0];
        gx[P - 1] = row[P - 1] - row[P - 2];
        for (int c = 1; c < P - 1; c++) gx[c] = row[c + 1] - row[c - 1];
        for (int c = 0; c < P; c++) gy[c] = dn[c] - up[c];
        float *m = mag + r * P, *o = ori + r * P;
        const float *mk = t->mask + r * P;
        for (int c = 0; c < P; c++) {
            m[c] = mk[c] * sqrtf(gx[c] * gx[c] + gy[c] * gy[c]);
            float a = fast_atan2(gy[c], gx[c]) * k;
            a = a < 0.0f ? a + 8.0f : a;
            o[c] = a >= 8.0f ? 0.0f : a;
        }
    }
}

/* The reference program's photometric normalisation: mean 128 and standard deviation 50 over the
 * pixels under the descriptor mask, clamped to 0..255 (the clamping is what changes the descriptor:
 * it limits the gradients of high-contrast patches). */
static void photometric_normalise(const sift_tables *t, const float *patch, float *out)
{
    const int n = t->P * t->P;
    float sum = 0.0f, cnt = 0.0f, var = 0.0f;
    for (int i = 0; i < n; i++)
        if (t->mask[i] > 0.0f) { sum += patch[i]; cnt += 1.0f; }
    const float mean = sum / cnt;
    for (int i = 0; i < n; i++)
        if (t->mask[i] > 0.0f) var += (mean - patch[i]) * (mean - patch[i]);
    const float sd = sqrtf(var / cnt);
    if (!(sd >= 0.0001f)) {
        memcpy(out, patch, sizeof(float) * n);
        return;
    }
    const float fac = 50.0f / sd;
    for (int i = 0; i < n; i++) {
        const float v = 128.0f + fac * (patch[i] - mean);
        out[i] = v > 255.0f ? 255.0f : (v < 0.0f ? 0.0f : v);
    }
}

static int sift_describe(const sift_tables *t, const float *patch, float *vec, int ref_flags)
{
    const int P = t->P;
    float mag[HS_MAX_PATCH * HS_MAX_PATCH], ori[HS_MAX_PATCH * HS_MAX_PATCH];
    memset(vec, 0, sizeof(float) * 128);
    if (P > HS_MAX_PATCH) return 0;
    float norm[HS_MAX_PATCH * HS_MAX_PATCH];
    if (ref_flags & HS_REF_PHOTO) {
        photometric_normalise(t, patch, norm);
        patch = norm;
    }
    sift_gradients(t, patch, mag, ori);
    for (int r = 0; r < P; r++) {
        const int br0 = 4 * t->bin0[r], br1 = 4 * t->bin1[r];
        const float wr0 = t->w0[r], wr1 = t->w1[r];
        const float *m = mag + r * P, *oo = ori + r * P;
        for (int c = 0; c < P; c++) {
            const float val = m[c];
            if (!(val > 0.0f)) continue;
            const float o = oo[c];
            const int bo0 = (int)o;
            const float wo1 = o - (float)bo0, wo0 = 1.0f - wo1;
            const int bo1 = (bo0 + 1) & 7;
            const int bc0 = t->bin0[c], bc1 = t->bin1[c];
            const float wc0 = t->w0[c] * val, wc1 = t->w1[c] * val;
            float *h00 = vec + br0 + bc0, *h01 = vec + br0 + bc1, *h10 = vec + br1 + bc0, *h11 = vec + br1 + bc1;
            const float v00 = wr0 * wc0, v01 = wr0 * wc1, v10 = wr1 * wc0, v11 = wr1 * wc1;
            /* clipped bins carry weight 0 and point at valid cells, so no branches are needed */
            h00[bo0] += v00 * wo0; h00[bo1] += v00 * wo1;
            h01[bo0] += v01 * wo0; h01[bo1] += v01 * wo1;
            h10[bo0] += v10 * wo0; h10[bo1] += v10 * wo1;
            h11[bo0] += v11 * wo0; h11[bo1] += v11 * wo1;
        }
    }
    /* L2, clip at 0.2, L2 (Lowe 2004) */
    for (int pass = 0; pass < 2; pass++) {
        double n = 0.0;
        for (int i = 0; i < 128; i++) n += (double)vec[i] * vec[i];
        if (!(n > 1e-20) || !isfinite(n)) {
            memset(vec, 0, sizeof(float) * 128);
            return 0;
        }
        const float inv = (float)(1.0 / sqrt(n));
        for (int i = 0; i < 128; i++) {
            vec[i] *= inv;
            if (pass == 0 && vec[i] > 0.2f) vec[i] = 0.2f;
        }
    }
    return 1;
}

int hs_sift_patch(const float *patch, int patch_size, float *out, int ref_flags)
{
    if (patch_size > HS_MAX_PATCH) return 0;
    sift_tables t;
    if (sift_tables_init(&t, patch_size) != 0) return 0;
    int ok = sift_describe(&t, patch, out, ref_flags);
    sift_tables_free(&t);
    return ok;
}

/* Dominant gradient orientations of a patch (angles in patch coordinates, radians). */
static int orientations(const sift_tables *t, const float *patch, float peak, int maxn, float *angles)
{
    enum { NB = 36 };
    const int P = t->P;
    float hist[NB] = {0}, sm[NB];
    for (int r = 1; r < P - 1; r++)
        for (int c = 1; c < P - 1; c++) {
            const float m = t->mask[r * P + c];
            if (m == 0.0f) continue;
            float gx, gy;
            grad_at(patch, P, r, c, &gx, &gy);
            const float mag = m * sqrtf(gx * gx + gy * gy);
            if (!(mag > 0.0f)) continue;
            float a = fast_atan2(gy, gx);
            if (a < 0) a += 2.0f * (float)M_PI;
            float o = a * NB / (2.0f * (float)M_PI) - 0.5f;  /* bin i is centred on (i + 0.5) 10 deg */
            int b0 = (int)floorf(o);
            const float f = o - (float)b0;
            hist[(b0 + NB) % NB] += mag * (1.0f - f);
            hist[(b0 + 1 + NB) % NB] += mag * f;
        }
    for (int pass = 0; pass < 2; pass++) {  /* [1 4 6 4 1]/16, circular, twice */
        for (int i = 0; i < NB; i++)
            sm[i] = (hist[(i + NB - 2) % NB] + hist[(i + 2) % NB] + 4.0f * (hist[(i + NB - 1) % NB] + hist[(i + 1) % NB]) +
                     6.0f * hist[i]) / 16.0f;
        memcpy(hist, sm, sizeof(hist));
    }
    float mx = 0.0f;
    for (int i = 0; i < NB; i++) mx = hist[i] > mx ? hist[i] : mx;
    if (!(mx > 0.0f)) return 0;
    float pk_h[NB], pk_a[NB];
    int np = 0;
    for (int i = 0; i < NB; i++) {
        const float l = hist[(i + NB - 1) % NB], c = hist[i], r = hist[(i + 1) % NB];
        if (c > l && c > r && c >= peak * mx) {
            const float den = l - 2.0f * c + r;
            const float off = den != 0.0f ? 0.5f * (l - r) / den : 0.0f;
            pk_h[np] = c;
            pk_a[np] = ((float)i + 0.5f + off) * 2.0f * (float)M_PI / NB;
            np++;
        }
    }
    /* strongest first */
    for (int i = 1; i < np; i++)
        for (int j = i; j > 0 && pk_h[j] > pk_h[j - 1]; j--) {
            float th = pk_h[j]; pk_h[j] = pk_h[j - 1]; pk_h[j - 1] = th;
            float ta = pk_a[j]; pk_a[j] = pk_a[j - 1]; pk_a[j - 1] = ta;
        }
    if (np > maxn) np = maxn;
    memcpy(angles, pk_a, sizeof(float) * np);
    return np;
}

/* ------------------------------------------------------------------------------------------ */
/* Per-keypoint driver                                                                        */

static int patch_sample(const hs_image *pyr, int n_pyr, const hs_params *p, float x, float y, float radius,
                        const float U[4], float *patch, scratch *ws)
{
    /* windows wider than HS_MAX_SIDE (regions of thousands of pixels) come from the pyramid */
    if (p->mode == 0 && 2.0f * ceilf(radius) + 3.0f <= (float)HS_MAX_SIDE)
        return patch_compat(pyr, x, y, radius, U, p->patch_size, patch, ws, p->ref_flags);
    patch_fast(pyr, n_pyr, x, y, radius, U, p->patch_size, patch);
    return 0;
}

int hs_describe(const hs_image *pyr, int n_pyr, const hs_kp *kps, int n, const hs_params *p,
                int threads, float *frames, float *response, unsigned char *desc, int *count)
{
    const int P = p->patch_size, R = p->n_regions, slots = p->max_ori;
    sift_tables tab;
    float *smm_mask = (float *)malloc(sizeof(float) * p->smm_window * p->smm_window);
    if (!smm_mask || sift_tables_init(&tab, P) != 0) {
        free(smm_mask);
        return -1;
    }
    {
        const int S = p->smm_window, half = S / 2;
        const float sg = (float)half / 3.0f;  /* 3 sigma fit the half window */
        float g1[HS_MAX_PATCH];
        for (int i = 0; i <= half && i < HS_MAX_PATCH; i++) g1[i] = expf(-(float)(i * i) / (2.0f * sg * sg));
        if (p->ref_flags & HS_REF_SMM_GRAD) {
            /* the reference program folds the Gaussian's tail beyond the window (out to 5 sigma)
             * back onto its outer samples */
            const int end = (int)ceilf(5.0f * sg) - half;
            for (int i = 1; i < end && half - i >= 0; i++)
                g1[half - i] += expf(-(float)((i + half) * (i + half)) / (2.0f * sg * sg));
        }
        for (int i = 0; i < S; i++)
            for (int j = 0; j < S; j++)
                smm_mask[i * S + j] = g1[abs(i - half)] * g1[abs(j - half)];
    }
    int failed = 0;
    int i;
#pragma omp parallel num_threads(threads)
    {
        scratch ws = {NULL, 0};
        float *win = (float *)malloc(sizeof(float) * p->smm_window * p->smm_window);
        float *patch = (float *)malloc(sizeof(float) * P * P);
        float vec[128];
        if (!win || !patch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 16)
        for (i = 0; i < n; i++) {
            count[i] = 0;
            if (failed) continue;
            const hs_kp *kp = kps + i;
            const int li = 1 + HS_LEVELS_PER_OCTAVE * kp->octave + (kp->level - 1);
            if (li < 1 || li >= n_pyr) continue;
            float U[4];
            if (!adapt_shape(pyr + li, kp, p, smm_mask, win, U)) continue;
            const float radius = p->mr_size * kp->s;
            {   /* the region used for the border test must lie inside the image */
                const float cr = radius * p->check_region;
                const float t = (2.0f * ceilf(cr) + 1.0f) / (float)P;
                if (p->ref_flags & HS_REF_BORDER) {
                    if (!inside_ref(pyr, kp->x, kp->y, U, t, P / 2, p->mode == 0 && t > 0.4f ? (int)ceilf(cr) + 1 : 0))
                        continue;
                } else if (!inside(pyr, kp->x, kp->y, U, t, P / 2)) continue;
            }
            float angles[HS_MAX_ORI];
            int no = 1;
            angles[0] = 0.0f;
            if (p->oriented) {
                if (patch_sample(pyr, n_pyr, p, kp->x, kp->y, radius, U, patch, &ws) != 0) {
#pragma omp atomic write
                    failed = 1;
                    continue;
                }
                no = orientations(&tab, patch, p->ori_peak, slots < HS_MAX_ORI ? slots : HS_MAX_ORI, angles);
            }
            int filled = 0;
            for (int o = 0; o < no; o++) {
                float V[4];
                if (p->oriented) {
                    const float cs = cosf(angles[o]), sn = sinf(angles[o]);
                    V[0] = U[0] * cs + U[1] * sn;
                    V[1] = -U[0] * sn + U[1] * cs;
                    V[2] = U[2] * cs + U[3] * sn;
                    V[3] = -U[2] * sn + U[3] * cs;
                } else {
                    memcpy(V, U, sizeof(V));
                }
                const size_t slot = (size_t)i * slots + filled;
                unsigned char *dst = desc + slot * R * 128;
                int ok = 1;
                for (int g = 0; g < R && ok; g++) {
                    if (patch_sample(pyr, n_pyr, p, kp->x, kp->y, radius * p->regions[g], V, patch, &ws) != 0) {
#pragma omp atomic write
                        failed = 1;
                        ok = 0;
                        break;
                    }
                    sift_describe(&tab, patch, vec, p->ref_flags);
                    for (int k = 0; k < 128; k++) {
                        float q = (p->ref_flags & HS_REF_TRUNC) ? floorf(vec[k] * 512.0f) : rintf(vec[k] * 512.0f);
                        dst[g * 128 + k] = (unsigned char)(q > 255.0f ? 255.0f : (q < 0.0f ? 0.0f : q));
                    }
                }
                if (!ok) break;
                float *f = frames + slot * 6;
                f[0] = kp->x;
                f[1] = kp->y;
                f[2] = radius * V[0];
                f[3] = radius * V[1];
                f[4] = radius * V[2];
                f[5] = radius * V[3];
                int finite = 1;
                for (int k = 0; k < 6; k++) finite &= isfinite(f[k]) ? 1 : 0;
                if (!finite) continue;
                response[slot] = kp->response;
                filled++;
            }
            count[i] = filled;
        }
        free(ws.buf);
        free(win);
        free(patch);
    }
    sift_tables_free(&tab);
    free(smm_mask);
    return failed ? -1 : 0;
}
