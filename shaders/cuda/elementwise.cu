// Element-wise ops over equal-shaped tensors. Linear launches over len, block 256.
#include "common.cuh"

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// GELU, tanh approximation as ggml; the argument is clamped where tanh is ±1 anyway.
__device__ __forceinline__ float gelu(float x) {
    float u = fminf(fmaxf(0.7978846f * x * (1.0f + 0.044715f * x * x), -15.0f), 15.0f);
    return 0.5f * x * (1.0f + tanhf(u));
}

// y = silu(g)·u
extern "C" __global__ void swiglu(const float* __restrict__ g, const float* __restrict__ u, float* __restrict__ y,
                                  unsigned len) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) y[i] = silu(g[i]) * u[i];
}

// y = gelu(g)·u
extern "C" __global__ void geglu(const float* __restrict__ g, const float* __restrict__ u, float* __restrict__ y,
                                 unsigned len) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) y[i] = gelu(g[i]) * u[i];
}

// y = a + b; y may be a (no __restrict__ on those two).
extern "C" __global__ void add(const float* a, const float* __restrict__ b, float* y, unsigned len) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) y[i] = a[i] + b[i];
}

CAIRN_KERNEL(swiglu)
CAIRN_KERNEL(geglu)
CAIRN_KERNEL(add)
