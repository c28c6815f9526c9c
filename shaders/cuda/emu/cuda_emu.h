// Host emulation of the little CUDA C the kernels of shaders/cuda/ use, so that the
// same sources run on a CPU and their arithmetic is tested without a GPU. Force-included
// before every .cu (`g++ -include cuda_emu.h`); the runtime (fiber scheduler, barriers,
// kernel table, the C ABI) is in cuda_emu.cpp.
//
// Model: a launch runs its blocks one after another; a block's threads are fibers on
// the launching thread, each with its own threadIdx/blockIdx. `__syncthreads()` is a
// barrier over the block, the shuffles exchange values through a per-warp slot array
// between two per-warp barriers. A thread that returns early leaves the barriers (as
// an exited GPU thread no longer holds them up). `__shared__` is `static`: one block
// runs at a time, and launches are serialised.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#define CAIRN_EMU 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static

struct uint3 {
    unsigned x, y, z;
};
typedef uint3 dim3;

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local uint3 blockDim;
extern thread_local uint3 gridDim;

namespace cairn_emu {

// The calling thread's block barrier and its warp's exchange (cuda_emu.cpp).
void sync_block();
// Lane `src` of the value each lane of the calling thread's warp puts in.
uint64_t warp_exchange(uint64_t mine, unsigned src);
unsigned lane_id();

template <typename T> inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}

template <typename T> inline T from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

// A kernel's entry as the table holds it: unpacks `args` (pointers to each argument's
// value, as cuLaunchKernel takes them) by the kernel's parameter types.
typedef void (*Entry)(void** args);

template <typename F> struct Unpack;

template <typename... A> struct Unpack<void (*)(A...)> {
    template <size_t... I> static void call(void (*f)(A...), void** args, std::index_sequence<I...>) {
        f(*static_cast<A*>(args[I])...);
    }
    static void run(void (*f)(A...), void** args) { call(f, args, std::index_sequence_for<A...>{}); }
    static constexpr unsigned arity = sizeof...(A);
};

template <auto F> void entry(void** args) { Unpack<decltype(F)>::run(F, args); }

struct Register {
    Register(const char* name, Entry e, unsigned arity);
};

} // namespace cairn_emu

#define CAIRN_KERNEL(name)                                                                                             \
    static cairn_emu::Register cairn_reg_##name(#name, &cairn_emu::entry<&name>,                                     \
                                                cairn_emu::Unpack<decltype(&name)>::arity);

inline void __syncthreads() { cairn_emu::sync_block(); }

// Every lane of the warp must take part (the kernels only use full masks).
template <typename T> inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
    unsigned lane = cairn_emu::lane_id();
    unsigned base = lane & ~(unsigned)(width - 1);
    return cairn_emu::from_bits<T>(cairn_emu::warp_exchange(cairn_emu::to_bits(v), base + ((unsigned)src & (width - 1))));
}

template <typename T> inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
    unsigned lane = cairn_emu::lane_id();
    unsigned src = lane ^ (unsigned)mask;
    // Outside the lane's segment of `width`: its own value, as on the GPU.
    if ((src & ~(unsigned)(width - 1)) != (lane & ~(unsigned)(width - 1))) src = lane;
    return cairn_emu::from_bits<T>(cairn_emu::warp_exchange(cairn_emu::to_bits(v), src));
}

template <typename T> inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
    unsigned lane = cairn_emu::lane_id();
    unsigned src = lane + delta;
    if ((src & ~(unsigned)(width - 1)) != (lane & ~(unsigned)(width - 1))) src = lane;
    return cairn_emu::from_bits<T>(cairn_emu::warp_exchange(cairn_emu::to_bits(v), src));
}

// Four signed byte products of a and b, plus c.
inline int __dp4a(int a, int b, int c) {
    for (int i = 0; i < 4; i++) {
        c += (int)(signed char)(a >> (8 * i)) * (int)(signed char)(b >> (8 * i));
    }
    return c;
}

inline int __dp4a(unsigned a, unsigned b, int c) { return __dp4a((int)a, (int)b, c); }

// Kernels run one block at a time, but atomics must still hold across its threads.
inline float atomicAdd(float* p, float v) {
    float old, want;
    __atomic_load(p, &old, __ATOMIC_SEQ_CST);
    do {
        want = old + v;
    } while (!__atomic_compare_exchange(p, &old, &want, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    return old;
}
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }

inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fmul_rn(float a, float b) {
    volatile float r = a * b;
    return r;
}
inline float __fadd_rn(float a, float b) {
    volatile float r = a + b;
    return r;
}
template <typename T> inline T __ldg(const T* p) { return *p; }

inline unsigned __float_as_uint(float x) { return cairn_emu::from_bits<unsigned>(cairn_emu::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return cairn_emu::from_bits<float>(cairn_emu::to_bits(x)); }
inline int __float_as_int(float x) { return cairn_emu::from_bits<int>(cairn_emu::to_bits(x)); }
inline float __int_as_float(int x) { return cairn_emu::from_bits<float>(cairn_emu::to_bits(x)); }
