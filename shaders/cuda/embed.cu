// Rows of an embedding table decoded from its stored blocks, times a scale: out[t, j] =
// scale · table[ids[t], j], each value with the CPU decoder's roundings (quant.cuh), so
// the rows equal the CPU backend's bit for bit. Linear launch over n_ids·dim threads,
// block 256. The ids must be rows of the table (the host checks them).
#include "common.cuh"
#include "quant.cuh"

template <class D>
__device__ void embed(const D& dec, const u8* table, const unsigned* ids, float* out, unsigned n_ids, unsigned dim,
                      unsigned row_bytes, float scale) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_ids * dim) return;
    unsigned t = i / dim, j = i % dim;
    float v[8];
    dq8(dec, table + (size_t)ids[t] * row_bytes, j / 8, dim, v);
    out[i] = v[j % 8] * scale;
}

#define CAIRN_EMBED(NAME, DEC)                                                                                         \
    extern "C" __global__ void embed_##NAME(const u8* __restrict__ table, const unsigned* __restrict__ ids,            \
                                            float* __restrict__ out, unsigned n_ids, unsigned dim,                     \
                                            unsigned row_bytes, float scale) {                                         \
        embed(DEC(), table, ids, out, n_ids, dim, row_bytes, scale);                                                   \
    }                                                                                                                  \
    CAIRN_KERNEL(embed_##NAME)

CAIRN_EMBED(f32, F32)
CAIRN_EMBED(f16, F16)
CAIRN_EMBED(q4_0, Q4_0)
CAIRN_EMBED(q4_1, Q4_1)
CAIRN_EMBED(q5_0, Q5_0)
CAIRN_EMBED(q5_1, Q5_1)
CAIRN_EMBED(q8_0, Q8_0)
CAIRN_EMBED(q4_k, Q4_K)
CAIRN_EMBED(q5_k, Q5_K)
CAIRN_EMBED(q6_k, Q6_K)

extern "C" __global__ void embed_fine(const u8* __restrict__ table, const unsigned* __restrict__ ids,
                                      float* __restrict__ out, unsigned n_ids, unsigned dim, unsigned row_bytes,
                                      float scale, unsigned bits, unsigned sym, unsigned group) {
    Fine f = {bits, sym, group};
    embed(f, table, ids, out, n_ids, dim, row_bytes, scale);
}

CAIRN_KERNEL(embed_fine)
