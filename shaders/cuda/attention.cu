// The KV cache (f16 bits) and causal grouped-query attention over it, with the CPU
// backend's roundings (shaders/attention.wgsl): the query rounded to f16 before q·k,
// the softmax weights rounded to f16 before they weigh the values. Position p lives in
// slot p mod `slots`: the whole context, or a ring for a sliding-window layer (the host
// launches at most slots − window + 1 queries at once, so none is overwritten early).
#include "common.cuh"

#define AT 128      // threads of an attend block
#define MAX_HD 256  // largest head dimension

// Rows `pos0..pos0+n` of k and v (`width` = KV heads × head_dim) into their slots.
// Linear launch over n·width threads, block 256.
extern "C" __global__ void kv_store(const float* __restrict__ k, const float* __restrict__ v,
                                    unsigned short* __restrict__ kc, unsigned short* __restrict__ vc, unsigned n,
                                    unsigned width, unsigned pos0, unsigned slots) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * width) return;
    size_t at = (size_t)((pos0 + i / width) % slots) * width + i % width;
    kc[at] = f32_to_f16(k[i]);
    vc[at] = f32_to_f16(v[i]);
}

// Merge two (running max, sum of exp) pairs.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
    float mm = fmaxf(m, m2);
    s = s * expf(m - mm) + s2 * expf(m2 - mm);
    m = mm;
}

// One block per (head, query row): grid (n_heads, n), block 128. Two passes over the
// visible keys: the max and sum of the scores, then the weighted values, 128 keys at a
// time; each thread owns output dims tid and tid + 128.
extern "C" __global__ void attend(const float* __restrict__ q, const unsigned short* __restrict__ kc,
                                  const unsigned short* __restrict__ vc, float* __restrict__ out, unsigned n,
                                  unsigned n_heads, unsigned group, unsigned hd, unsigned pos0, unsigned width,
                                  unsigned window, float scale, unsigned slots) {
    __shared__ float qs[MAX_HD];
    __shared__ float pm[AT / 32];
    __shared__ float ps[AT / 32];
    __shared__ float wts[AT];
    unsigned h = blockIdx.x, t = blockIdx.y, tid = threadIdx.x;
    // Uniform over the block: all its threads leave together.
    if (hd > MAX_HD || h >= n_heads || t >= n || group == 0 || slots == 0) return;
    unsigned pos = pos0 + t;
    unsigned first = window > 0 && pos + 1 > window ? pos + 1 - window : 0;
    unsigned kb = (h / group) * hd;
    size_t qrow = (size_t)t * n_heads * hd + (size_t)h * hd;
    for (unsigned d = tid; d < hd; d += AT) qs[d] = round_f16(q[qrow + d]);
    __syncthreads();

    // Pass 1: each thread's running max and sum of exp, merged over the warp, then the
    // block (every thread merges the four warps in the same order).
    float m = -3.0e38f, s = 0.0f;
    for (unsigned j = first + tid; j <= pos; j += AT) {
        const unsigned short* kr = kc + (size_t)(j % slots) * width + kb;
        float x = 0.0f;
        for (unsigned d = 0; d < hd; d++) x += qs[d] * f16_to_f32(kr[d]);
        x *= scale;
        if (x > m) {
            s = s * expf(m - x) + 1.0f;
            m = x;
        } else {
            s += expf(x - m);
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        float s2 = __shfl_xor_sync(0xffffffffu, s, o);
        merge(m, s, m2, s2);
    }
    if (tid % 32 == 0) {
        pm[tid / 32] = m;
        ps[tid / 32] = s;
    }
    __syncthreads();
    float mx = pm[0], sum = ps[0];
    for (unsigned w = 1; w < AT / 32; w++) merge(mx, sum, pm[w], ps[w]);
    float inv = 1.0f / sum;

    // Pass 2.
    float acc0 = 0.0f, acc1 = 0.0f;
    for (unsigned c0 = first; c0 <= pos; c0 += AT) {
        unsigned j = c0 + tid;
        float w = 0.0f;
        if (j <= pos) {
            const unsigned short* kr = kc + (size_t)(j % slots) * width + kb;
            float x = 0.0f;
            for (unsigned d = 0; d < hd; d++) x += qs[d] * f16_to_f32(kr[d]);
            w = round_f16(expf(x * scale - mx) * inv);
        }
        wts[tid] = w;
        __syncthreads();
        unsigned cnt = pos + 1 - c0 < AT ? pos + 1 - c0 : AT;
        for (unsigned i = 0; i < cnt; i++) {
            const unsigned short* vr = vc + (size_t)((c0 + i) % slots) * width + kb;
            float wi = wts[i];
            if (tid < hd) acc0 += wi * f16_to_f32(vr[tid]);
            if (tid + AT < hd) acc1 += wi * f16_to_f32(vr[tid + AT]);
        }
        __syncthreads();
    }
    if (tid < hd) out[qrow + tid] = acc0;
    if (tid + AT < hd) out[qrow + tid + AT] = acc1;
}

CAIRN_KERNEL(kv_store)
CAIRN_KERNEL(attend)
