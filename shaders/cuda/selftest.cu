// Kernels that check the emulator itself (runtime/tests/cuda_kernels.rs): a broken
// barrier, shuffle or __dp4a must fail a test rather than pass silently. Valid CUDA as
// well, so they can run on a GPU for comparison.
#include "common.cuh"

// Each round every thread writes its slot, then reads its neighbour's (written by
// another thread, in another warp at warp edges) after the barrier. Threads at or past
// `active` leave at once, as exited GPU threads do; the rest keep meeting at barriers.
// out[block, tid] = Σ over rounds of the neighbour's value.
extern "C" __global__ void selftest_barrier(unsigned* out, unsigned rounds, unsigned active) {
    __shared__ unsigned s[1024];
    unsigned tid = threadIdx.x, n = blockDim.x;
    if (tid >= active) return;
    unsigned acc = 0;
    for (unsigned r = 0; r < rounds; r++) {
        s[tid] = (r + 1) * (tid + 1) + blockIdx.x;
        __syncthreads();
        acc += s[(tid + 1) % active];
        __syncthreads();
    }
    out[blockIdx.x * n + tid] = acc;
}

// Per lane of each warp: [xor-butterfly sum, lane + 5's value (down), lane 3's value,
// value of lane ^ 1 in segments of 8].
extern "C" __global__ void selftest_shuffle(const float* in, float* out) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = in[i];
    out[4 * i] = warp_sum(v);
    out[4 * i + 1] = __shfl_down_sync(0xffffffffu, v, 5);
    out[4 * i + 2] = __shfl_sync(0xffffffffu, v, 3);
    out[4 * i + 3] = __shfl_xor_sync(0xffffffffu, v, 1, 8);
}

extern "C" __global__ void selftest_dp4a(const int* a, const int* b, const int* c, int* out, unsigned n) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __dp4a(a[i], b[i], c[i]);
}

// atomicAdd from every thread of every block into one float and one unsigned.
extern "C" __global__ void selftest_atomic(float* f, unsigned* u) {
    atomicAdd(f, 0.5f);
    atomicAdd(u, 1u);
}

CAIRN_KERNEL(selftest_barrier)
CAIRN_KERNEL(selftest_shuffle)
CAIRN_KERNEL(selftest_dp4a)
CAIRN_KERNEL(selftest_atomic)
