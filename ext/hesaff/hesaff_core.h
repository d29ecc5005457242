/* Hessian-Affine detector with SIFT description: the per-pixel and per-keypoint arithmetic.
 *
 * Whole-image work (grey conversion, Gaussian pyramid) is done by the caller; this file computes
 * Hessian responses, 3x3x3 extrema with quadratic refinement (one octave per call), Baumberg affine
 * shape adaptation, dominant orientations, normalised patches and 4x4x8 SIFT descriptors.
 * Coordinates: pixel centres at integer positions; octave pixel i is image pixel i * pd (every
 * second pixel of the previous octave). Nothing here touches Python; every function is reentrant.
 */
#ifndef HESAFF_CORE_H
#define HESAFF_CORE_H

#include <stddef.h>

#define HS_LEVELS_PER_OCTAVE 3
#define HS_MAX_ORI 4

typedef struct {
    float threshold;      /* response threshold t: keep |det H| sigma^4 > t^2 (reference: 16/3) */
    float edge_ratio;     /* eigenvalue ratio of the edge test (10) */
    int border;           /* detection border in octave pixels (5) */
    float initial_sigma;  /* scale of the first level of an octave (1.6) */
    int smm_window;       /* side of the second-moment window (19) */
    int max_iter;         /* affine adaptation iterations (16) */
    float max_aniso;      /* reject shapes more elongated than this (6) */
    float conv_thr;       /* converged when 1 - l_min/l_max below this twice in a row (0.05) */
    float mr_size;        /* measurement-region radius / detected scale (3 sqrt 3) */
    int patch_size;       /* side of the normalised patch (41) */
    int mode;             /* 0: compat (patches at image resolution), 1: fast (pyramid level) */
    int oriented;         /* 0: up-right frames, 1: up to max_ori dominant orientations */
    int max_ori;
    float ori_peak;       /* orientation peaks above this fraction of the highest (0.8) */
    int n_regions;
    const float *regions; /* relative measurement-region sizes, n_regions of them */
    float check_region;   /* relative size whose square must fit in the image (border test) */
    int shape_update;     /* 0: reference U <- M^-1/2 U; 1: U <- U M^-1/2 (patch-frame gradients) */
    int ref_flags;        /* HS_REF_* bits: details of the reference program reproduced (compat) */
} hs_params;

#define HS_REF_SMM_GRAD 1     /* SMM: undivided central differences, Gaussian window with folded tail */
#define HS_REF_SMM_ZERO 2     /* SMM window: zeros outside the image */
#define HS_REF_ANISO_EIG 4    /* anisotropy from the eigenvalues of U (complex: rejected) */
#define HS_REF_BORDER 8       /* reference border tests: patch corners 1 px inside, window inside */
#define HS_REF_PHOTO 16       /* SIFT: photometric normalisation (mean 128, std 50, clamped to 0..255) */
#define HS_REF_TRUNC 32       /* SIFT: uint8 by truncation */
#define HS_REF_BLURK 64       /* patch blur kernel of int(6 sigma + 1) taps (odd) */
#define HS_REF_SAFETY3 128    /* refinement may move to 3 px from the octave border */
#define HS_REF_PYR_KSIZE 256  /* (Python side) pyramid blurs with kernels of int(6 sigma + 1) taps (odd) */
#define HS_REF_UNCONV 512     /* keep points whose refinement still moves after 5 steps (last offset <= 1.5) */
#define HS_REF_ALL 1023       /* all of them: the `compat` mode */

typedef struct {
    const float *data;  /* row-major h x w */
    int w, h;
    float pd;           /* image pixels per pixel of this image */
    float blur;         /* Gaussian blur of this image, in image pixels */
} hs_image;

typedef struct {
    float x, y, s, response;  /* position and scale in image pixels, refined response */
    int octave, level;        /* level 1..3 of its octave */
} hs_kp;

void hs_default_params(hs_params *p);

/* Detect one octave. L: 5 blurred levels (sigma_k = initial_sigma * 2^(k/3) in octave pixels),
 * each w x h. Appends keypoints to *out (realloc'ed; *n and *cap track it). Returns 0, or -1 when
 * out of memory. */
int hs_detect_octave(const float *const *L, int w, int h, float pd, int octave, const hs_params *p,
                     int threads, hs_kp **out, int *n, int *cap);

/* Affine-adapt, orient and describe keypoints. pyr[0] is the input image (pd 1, blur 0.5);
 * pyr[1 + 3 o + k] is level k (0..2) of octave o. Outputs have max_ori slots per keypoint:
 * frames (n, max_ori, 6), response (n, max_ori), desc (n, max_ori, n_regions, 128) uint8 raw SIFT;
 * count[i] = number of filled slots of keypoint i (0: dropped). Returns 0, or -1 out of memory. */
int hs_describe(const hs_image *pyr, int n_pyr, const hs_kp *kps, int n, const hs_params *p,
                int threads, float *frames, float *response, unsigned char *desc, int *count);

/* SIFT of one square patch (side patch_size) into 128 floats, L2 / clip 0.2 / L2 normalised; with
 * HS_REF_PHOTO in ref_flags the patch is first normalised photometrically like the reference program.
 * Exposed for tests. Returns 0 when the patch has no gradient (descriptor all zero). */
int hs_sift_patch(const float *patch, int patch_size, float *out, int ref_flags);

#endif
