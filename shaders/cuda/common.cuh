// Shared helpers of every kernel: f16 conversions (NVRTC has no cuda_fp16.h), unaligned
// little-endian loads from the stored weight bytes, and the warp sum. Plain CUDA C, so
// the emulator (emu/cuda_emu.h) compiles it for the host too.
#pragma once

// Kernels register themselves for the emulator by name; under NVRTC this is nothing.
#ifndef CAIRN_KERNEL
#define CAIRN_KERNEL(name)
#endif

typedef unsigned char u8;

// f16 bits to f32 (exact).
__device__ __forceinline__ float f16_to_f32(unsigned short h) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    unsigned s = (unsigned)(h & 0x8000u) << 16;
    unsigned e = (h >> 10) & 0x1fu;
    unsigned m = h & 0x3ffu;
    if (e == 0) {
        // Zero or subnormal: m · 2^-24, exact in f32.
        float v = (float)m * 5.9604644775390625e-8f;
        return __uint_as_float(__float_as_uint(v) | s);
    }
    if (e == 31) return __uint_as_float(s | 0x7f800000u | (m << 13));
    return __uint_as_float(s | ((e + 112u) << 23) | (m << 13));
#endif
}

// f32 to the nearest f16 (ties to even), as the half crate and the GPU round.
__device__ __forceinline__ unsigned short f32_to_f16(float f) {
#ifdef __CUDA_ARCH__
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    unsigned x = __float_as_uint(f);
    unsigned s = (x >> 16) & 0x8000u;
    unsigned a = x & 0x7fffffffu;
    if (a >= 0x7f800000u) return (unsigned short)(s | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
    unsigned e = a >> 23;
    if (e < 102) return (unsigned short)s; // below 2^-25: rounds to zero
    unsigned r, rem, half;
    if (e < 113) {
        // An f16 subnormal: the 24-bit significand shifted down to units of 2^-24.
        unsigned m = (a & 0x7fffffu) | 0x800000u;
        unsigned sh = 126 - e;
        r = m >> sh;
        rem = m & ((1u << sh) - 1);
        half = 1u << (sh - 1);
    } else {
        r = (a - 0x38000000u) >> 13;
        rem = a & 0x1fffu;
        half = 0x1000u;
    }
    // A carry out of the significand moves into the exponent (up to infinity): right.
    if (rem > half || (rem == half && (r & 1u))) r++;
    if (r > 0x7c00u) r = 0x7c00u;
    return (unsigned short)(s | r);
#endif
}

// Round to the nearest f16 and back: the precision of the KV cache, of queries before
// q·k and of softmax weights (as the CPU backend and llama.cpp keep them).
__device__ __forceinline__ float round_f16(float x) { return f16_to_f32(f32_to_f16(x)); }

// Little-endian loads at a 2-byte aligned address (every block of the stored types
// starts on an even byte; 32-bit loads of them would fault on the GPU).
__device__ __forceinline__ unsigned ld16(const u8* p) { return *(const unsigned short*)p; }

__device__ __forceinline__ unsigned ld32(const u8* p) {
    const unsigned short* q = (const unsigned short*)p;
    return (unsigned)q[0] | ((unsigned)q[1] << 16);
}

__device__ __forceinline__ float f16_at(const u8* p) { return f16_to_f32((unsigned short)ld16(p)); }

// The four low bits of `h` moved to bit 4 of bytes 0..3 (the 5th bit of Q5 values).
__device__ __forceinline__ unsigned spread4(unsigned h) {
    return ((h & 1u) | ((h & 2u) << 7) | ((h & 4u) << 14) | ((h & 8u) << 21)) << 4;
}

// Sum over the 32 lanes of a warp (every lane gets it). Uniform control flow only.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
