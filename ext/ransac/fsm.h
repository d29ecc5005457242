/* Fast spatial matching (Philbin, Chum, Isard, Sivic, Zisserman, CVPR 2007) with local
 * optimisation (Chum, Matas, Kittler, DAGM 2003): one affine hypothesis per tentative
 * correspondence of two affine frames, refined by least squares and optionally a homography. */
#ifndef BOWR_FSM_H
#define BOWR_FSM_H

#include <stdint.h>

typedef struct {
    double threshold;      /* inlier distance in db-image pixels (transfer error) */
    int max_hypotheses;    /* hypotheses scored per pair: the first ones in the given order (0: all) */
    int lo_iterations;     /* least-squares re-fits per local optimisation */
    int homography;        /* 1: try a homography on the best affine inliers and keep it if better */
    double max_scale;      /* hypotheses changing the area scale by more than this^2 are skipped */
    double max_anisotropy; /* hypotheses whose singular values differ by more than this are skipped */
    int min_inliers;       /* fewer one-to-one, non-degenerate inliers than this report zero */
    double max_scale_change; /* > 1: an inlier's own frame pair must agree with the model's local scale
                                within this factor (0: no check) */
    double max_angle;      /* in (0, pi): ... and its orientation within this many radians (0: no check) */
} fsm_params;

typedef struct {
    int32_t n_inliers;
    int32_t kind;          /* 0: no model, 1: affine, 2: homography */
    int32_t n_hypotheses;  /* hypotheses actually scored */
    double model[9];       /* 3x3 row-major, query pixels -> database pixels */
} fsm_result;

/* One pair. qf / df: (m, 6) frames x, y, a11, a12, a21, a22 of the query / database feature of each
 * correspondence; qid / did: feature ids for the one-to-one rule (NULL: all distinct). inlier_mask
 * (m) receives 1 for the final one-to-one inliers. Returns 0, or -1 when out of memory (then the
 * result is zero inliers). Never reads past m, never raises: bad input gives zero inliers. */
int fsm_verify(const float *qf, const float *df, const int32_t *qid, const int32_t *did, int64_t m,
               const fsm_params *p, uint8_t *inlier_mask, fsm_result *res);

#endif
