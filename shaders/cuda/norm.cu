// RMSNorm of every `width`-wide slice of x (a row, or a head for per-head norms), times
// the weight: y = x / sqrt(mean(x²) + eps) · w. One block of 256 per slice: grid
// (slices), block (256).
#include "common.cuh"

#define NORM_THREADS 256

extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y,
                                    unsigned slices, unsigned width, float eps) {
    __shared__ float part[NORM_THREADS / 32];
    unsigned s = blockIdx.x;
    if (s >= slices) return;
    const float* xs = x + (size_t)s * width;
    float ss = 0.0f;
    for (unsigned i = threadIdx.x; i < width; i += blockDim.x) ss += xs[i] * xs[i];
    ss = warp_sum(ss);
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = ss;
    __syncthreads();
    float total = 0.0f;
    for (unsigned i = 0; i < blockDim.x / 32; i++) total += part[i];
    // 1/sqrt rather than rsqrtf: the approximate one is off by a few ulps.
    float inv = 1.0f / sqrtf(total / (float)width + eps);
    for (unsigned i = threadIdx.x; i < width; i += blockDim.x) y[(size_t)s * width + i] = xs[i] * (inv * w[i]);
}

CAIRN_KERNEL(rms_norm)
