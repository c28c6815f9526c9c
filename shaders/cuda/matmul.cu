// y = x Wᵀ straight from the stored bytes of W (GGUF blocks or FineQuant rows), for
// every storage type:
//   matvec_<T>: one token (decode). One warp per weight row, each lane a strided set of
//     8-value pieces, summed with warp shuffles. The integer types take the activations
//     as 8-bit blocks (quantize.cu) and multiply codes with __dp4a, as llama.cpp's mmvq;
//     F32/F16 take f32 x. Grid (ceil(m/4)), block 128.
//   matmul_<T>: a batch (prefill). A 64-row × 32-value tile of W is decoded to f32 in
//     shared memory next to a 64-token tile of x; each thread keeps 4 rows × 4 tokens.
//     Grid (ceil(m/64), ceil(n/64)), block 256.
// `_fine` variants take the FineQuant shape (bits, sym, group) as three more arguments.
#include "common.cuh"
#include "quant.cuh"
#include "tile.cuh"

// Lane's share of row · x: integer types against 8-bit activations...
template <class D> __device__ __forceinline__ float lane_dot(const D& dec, const u8* row, unsigned k, const void* x) {
    float acc = 0.0f;
    for (unsigned q = threadIdx.x % 32; q < k / 8; q += 32) acc += qdot8(dec, row, q, (const u8*)x);
    return acc;
}

// ...F32 and F16 against f32 x (any k).
template <class D> __device__ __forceinline__ float lane_dot_f(const D& dec, const u8* row, unsigned k, const float* x) {
    float acc = 0.0f;
    for (unsigned q = threadIdx.x % 32; 8 * q < k; q += 32) {
        float v[8];
        dq8(dec, row, q, k, v);
        for (unsigned i = 0; i < 8; i++) acc += 8 * q + i < k ? v[i] * x[8 * q + i] : 0.0f;
    }
    return acc;
}

__device__ __forceinline__ float lane_dot(const F32& d, const u8* row, unsigned k, const void* x) {
    return lane_dot_f(d, row, k, (const float*)x);
}

__device__ __forceinline__ float lane_dot(const F16& d, const u8* row, unsigned k, const void* x) {
    return lane_dot_f(d, row, k, (const float*)x);
}

template <class D>
__device__ void matvec(const D& dec, const u8* w, const void* x, float* y, unsigned k, unsigned m, unsigned row_bytes) {
    unsigned r = blockIdx.x * MV_ROWS + threadIdx.x / 32;
    // The whole warp leaves together, so the shuffles below see all 32 lanes.
    if (r >= m) return;
    float s = warp_sum(lane_dot(dec, w + (size_t)r * row_bytes, k, x));
    if (threadIdx.x % 32 == 0) y[r] = s;
}

template <class D>
__device__ void matmul(const D& dec, const u8* w, const float* x, float* y, unsigned n, unsigned k, unsigned m,
                       unsigned row_bytes) {
    __shared__ Tile ws;
    __shared__ Tile xs;
    unsigned tid = threadIdx.x;
    unsigned r0 = blockIdx.x * TM, t0 = blockIdx.y * TN;
    // Loading: thread → tile row (and token) tid / 4, values 8·(tid % 4)..+8.
    unsigned lr = tid / 4, lq = tid % 4;
    unsigned wr = r0 + lr < m ? r0 + lr : m - 1;
    const u8* wrow = w + (size_t)wr * row_bytes;
    // Computing: thread → rows tr + 16i, tokens tt + 16j.
    unsigned tr = tid % 16, tt = tid / 16;
    float acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    for (unsigned k0 = 0; k0 < k; k0 += TK) {
        unsigned j0 = k0 + 8 * lq;
        float v[8];
        if (j0 < k) {
            dq8(dec, wrow, j0 / 8, k, v);
        } else {
            for (int i = 0; i < 8; i++) v[i] = 0.0f;
        }
        for (unsigned i = 0; i < 8; i++) ws[lr][8 * lq + i] = v[i];
        load_x(xs, x, n, k, t0 + lr, lr, lq, j0);
        __syncthreads();
        tile_fma(ws, xs, tr, tt, acc);
        __syncthreads();
    }
    store_tile(y, acc, r0, t0, tr, tt, n, m, 0);
}

#define CAIRN_MATMUL(NAME, DEC)                                                                                        \
    extern "C" __global__ void matvec_##NAME(const u8* __restrict__ w, const void* __restrict__ x,                     \
                                             float* __restrict__ y, unsigned k, unsigned m, unsigned row_bytes) {      \
        matvec(DEC(), w, x, y, k, m, row_bytes);                                                                       \
    }                                                                                                                  \
    extern "C" __global__ void matmul_##NAME(const u8* __restrict__ w, const float* __restrict__ x,                    \
                                             float* __restrict__ y, unsigned n, unsigned k, unsigned m,                \
                                             unsigned row_bytes) {                                                     \
        matmul(DEC(), w, x, y, n, k, m, row_bytes);                                                                    \
    }                                                                                                                  \
    CAIRN_KERNEL(matvec_##NAME)                                                                                        \
    CAIRN_KERNEL(matmul_##NAME)

CAIRN_MATMUL(f32, F32)
CAIRN_MATMUL(f16, F16)
CAIRN_MATMUL(q4_0, Q4_0)
CAIRN_MATMUL(q4_1, Q4_1)
CAIRN_MATMUL(q5_0, Q5_0)
CAIRN_MATMUL(q5_1, Q5_1)
CAIRN_MATMUL(q8_0, Q8_0)
CAIRN_MATMUL(q4_k, Q4_K)
CAIRN_MATMUL(q5_k, Q5_K)
CAIRN_MATMUL(q6_k, Q6_K)

extern "C" __global__ void matvec_fine(const u8* __restrict__ w, const void* __restrict__ x, float* __restrict__ y,
                                       unsigned k, unsigned m, unsigned row_bytes, unsigned bits, unsigned sym,
                                       unsigned group) {
    Fine f = {bits, sym, group};
    matvec(f, w, x, y, k, m, row_bytes);
}

extern "C" __global__ void matmul_fine(const u8* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,
                                       unsigned n, unsigned k, unsigned m, unsigned row_bytes, unsigned bits,
                                       unsigned sym, unsigned group) {
    Fine f = {bits, sym, group};
    matmul(f, w, x, y, n, k, m, row_bytes);
}

CAIRN_KERNEL(matvec_fine)
CAIRN_KERNEL(matmul_fine)
