// RoPE in place from a host-computed table of (cos, sin) per row and pair (f64 on the
// host, as the CPU backend: f32 angles lose ~1e-3 rad at long positions). halves = 0
// rotates adjacent pairs (x[2i], x[2i+1]), 1 the halves (x[i], x[i + hd/2]). Linear
// launch over rows·cols/2 threads, block 256.
#include "common.cuh"

extern "C" __global__ void rope(float* __restrict__ x, const float* __restrict__ table, unsigned rows, unsigned cols,
                                unsigned hd, unsigned halves) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned pairs = cols / 2, half = hd / 2;
    if (i >= rows * pairs || half == 0) return;
    unsigned row = i / pairs, head = (i % pairs) / half, k = (i % pairs) % half;
    size_t base = (size_t)row * cols + head * hd;
    size_t a = halves ? base + k : base + 2 * k;
    size_t b = halves ? a + half : a + 1;
    const float* cs = table + 2 * ((size_t)row * half + k);
    float x0 = x[a], x1 = x[b];
    x[a] = x0 * cs[0] - x1 * cs[1];
    x[b] = x0 * cs[1] + x1 * cs[0];
}

CAIRN_KERNEL(rope)
