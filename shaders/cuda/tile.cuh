// The shared-memory tile product of the prefill kernels (matmul.cu, bitstack.cu): a
// 64-row × 32-value tile of W (decoded to f32) against a 64-token × 32-value tile of
// x, each of the 256 threads accumulating rows tr + 16i × tokens tt + 16j (i, j < 4).
#pragma once
#include "common.cuh"

#define MV_ROWS 4 // warps (rows) per matvec block of 128
#define TM 64     // weight rows per matmul block
#define TN 64     // tokens per matmul block
#define TK 32     // values per step along k

// +1: the 16 rows (tokens) a half-warp reads at one kk fall in distinct banks.
typedef float Tile[TM][TK + 1];

// Values j0..j0+8 of x's token row `xt` (zero past n or k) into the tile row `lr`.
__device__ __forceinline__ void load_x(Tile& xs, const float* x, unsigned n, unsigned k, unsigned xt, unsigned lr,
                                       unsigned lq, unsigned j0) {
    const float* xrow = x + (size_t)(xt < n ? xt : 0) * k;
    for (unsigned i = 0; i < 8; i++) xs[lr][8 * lq + i] = xt < n && j0 + i < k ? xrow[j0 + i] : 0.0f;
}

__device__ __forceinline__ void tile_fma(const Tile& ws, const Tile& xs, unsigned tr, unsigned tt, float acc[4][4]) {
    for (unsigned kk = 0; kk < TK; kk++) {
        float a[4], b[4];
        for (int i = 0; i < 4; i++) a[i] = ws[tr + 16 * i][kk];
        for (int j = 0; j < 4; j++) b[j] = xs[tt + 16 * j][kk];
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
    }
}

// y[t, r] for the block's tile (or += when `add`), rows and tokens past the edge dropped.
__device__ __forceinline__ void store_tile(float* y, const float acc[4][4], unsigned r0, unsigned t0, unsigned tr,
                                           unsigned tt, unsigned n, unsigned m, unsigned add) {
    for (unsigned i = 0; i < 4; i++) {
        for (unsigned j = 0; j < 4; j++) {
            unsigned r = r0 + tr + 16 * i, t = t0 + tt + 16 * j;
            if (r < m && t < n) {
                float* o = y + (size_t)t * m + r;
                *o = add ? *o + acc[i][j] : acc[i][j];
            }
        }
    }
}
