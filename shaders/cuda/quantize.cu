// Activations to 8 bits for the decode matvec (matmul.cu): each 32 values of a row
// become one 36-byte block, f32 d = max|x| / 127 then 32 i8 q = x·127/max|x| rounded to
// nearest (ties to even, as the CPU backend's SIMD path). llama.cpp's q8_1 without the
// sum: the kernels get it from the codes with one __dp4a. Linear launch over n·k/32
// threads (one per block), block 256.
#include "common.cuh"
#include "quant.cuh"

extern "C" __global__ void quantize_q8(const float* __restrict__ x, u8* __restrict__ xq, unsigned n, unsigned k) {
    unsigned b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= n * (k / 32)) return;
    const float* src = x + (size_t)b * 32;
    float amax = 0.0f;
    for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(src[i]));
    float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    u8* dst = xq + (size_t)b * Q8_BLOCK;
    *(float*)dst = amax / 127.0f;
    for (int w = 0; w < 8; w++) {
        unsigned word = 0;
        for (int i = 0; i < 4; i++) {
            int q = (int)rintf(src[4 * w + i] * inv);
            word |= (unsigned)(q & 0xff) << (8 * i);
        }
        ((unsigned*)(dst + 4))[w] = word;
    }
}

CAIRN_KERNEL(quantize_q8)
