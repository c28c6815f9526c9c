// y = x Wᵀ for one BitStack block W = S ⊙ (U V) (formats/src/bitstack.rs): m rows of
// sign bits (LSB first, a set bit is negative, `sign_bytes` a row), U (m × rank, f16) at
// `u_off`, V (rank × k, f16) at `v_off`, read from the block's bytes as stored. Weights
// are rebuilt on the fly, w[i, j] = ±Σ_r U[i, r] V[r, j]; the dense matrix never exists.
// One launch per active block: the first writes y, the others (`add` = 1) add to it.
#include "common.cuh"
#include "tile.cuh"

#define MAX_RANK 64

__device__ __forceinline__ float sign_of(const u8* signs, unsigned j) { return (signs[j >> 3] >> (j & 7)) & 1 ? -1.0f : 1.0f; }

// Decode: one warp per row, lanes over columns. Grid (ceil(m/4)), block 128.
extern "C" __global__ void stack_matvec(const u8* __restrict__ block, const float* __restrict__ x,
                                        float* __restrict__ y, unsigned k, unsigned m, unsigned rank,
                                        unsigned u_off, unsigned v_off, unsigned sign_bytes, unsigned add) {
    __shared__ float us[MV_ROWS][MAX_RANK];
    if (rank > MAX_RANK) return;
    unsigned tid = threadIdx.x, w = tid / 32, lane = tid % 32;
    unsigned r0 = blockIdx.x * MV_ROWS;
    for (unsigned e = tid; e < MV_ROWS * rank; e += blockDim.x) {
        unsigned i = e / rank, row = r0 + i < m ? r0 + i : m - 1;
        us[i][e % rank] = f16_at(block + u_off + 2 * ((size_t)row * rank + e % rank));
    }
    __syncthreads();
    unsigned r = r0 + w;
    if (r >= m) return;
    const unsigned short* v = (const unsigned short*)(block + v_off);
    const u8* signs = block + (size_t)r * sign_bytes;
    float acc = 0.0f;
    for (unsigned j = lane; j < k; j += 32) {
        float wv = 0.0f;
        for (unsigned rr = 0; rr < rank; rr++) wv += us[w][rr] * f16_to_f32(v[(size_t)rr * k + j]);
        acc += sign_of(signs, j) * wv * x[j];
    }
    acc = warp_sum(acc);
    if (lane == 0) y[r] = add ? y[r] + acc : acc;
}

// Prefill: the tile product of matmul.cu, the W tile rebuilt from the tile's U rows
// (kept in shared memory for the whole block) and a rank × 32 slice of V per step.
// Grid (ceil(m/64), ceil(n/64)), block 256.
extern "C" __global__ void stack_matmul(const u8* __restrict__ block, const float* __restrict__ x,
                                        float* __restrict__ y, unsigned n, unsigned k, unsigned m, unsigned rank,
                                        unsigned u_off, unsigned v_off, unsigned sign_bytes, unsigned add) {
    __shared__ float us[TM][MAX_RANK];
    __shared__ float vs[MAX_RANK][TK];
    __shared__ Tile ws;
    __shared__ Tile xs;
    if (rank > MAX_RANK) return;
    unsigned tid = threadIdx.x;
    unsigned r0 = blockIdx.x * TM, t0 = blockIdx.y * TN;
    unsigned lr = tid / 4, lq = tid % 4;
    unsigned tr = tid % 16, tt = tid / 16;
    for (unsigned e = tid; e < TM * rank; e += blockDim.x) {
        unsigned i = e / rank, row = r0 + i < m ? r0 + i : m - 1;
        us[i][e % rank] = f16_at(block + u_off + 2 * ((size_t)row * rank + e % rank));
    }
    unsigned wr = r0 + lr < m ? r0 + lr : m - 1;
    const u8* signs = block + (size_t)wr * sign_bytes;
    const unsigned short* v = (const unsigned short*)(block + v_off);
    float acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    for (unsigned k0 = 0; k0 < k; k0 += TK) {
        for (unsigned e = tid; e < rank * TK; e += blockDim.x) {
            unsigned rr = e / TK, c = e % TK;
            vs[rr][c] = k0 + c < k ? f16_to_f32(v[(size_t)rr * k + k0 + c]) : 0.0f;
        }
        unsigned j0 = k0 + 8 * lq;
        load_x(xs, x, n, k, t0 + lr, lr, lq, j0);
        __syncthreads();
        for (unsigned c = 8 * lq; c < 8 * lq + 8; c++) {
            float wv = 0.0f;
            for (unsigned rr = 0; rr < rank; rr++) wv += us[lr][rr] * vs[rr][c];
            ws[lr][c] = k0 + c < k ? sign_of(signs, k0 + c) * wv : 0.0f;
        }
        __syncthreads();
        tile_fma(ws, xs, tr, tt, acc);
        __syncthreads();
    }
    store_tile(y, acc, r0, t0, tr, tt, n, m, add);
}

CAIRN_KERNEL(stack_matvec)
CAIRN_KERNEL(stack_matmul)
