// Shared helpers of every kernel: workgroup size, f16 rounding, byte unpacking.
// Spliced in with `#include "common"`; `#if F16` / `#if SUBGROUP` select the adapter's
// variant (see runtime/src/backend/wgpu/shaders.rs).

const WG: u32 = 64u;

// Round to the nearest f16 and back: the precision the CPU backend (and llama.cpp)
// keeps queries and attention weights in.
fn round_f16(x: f32) -> f32 {
#if F16
    return f32(f16(x));
#else
    return unpack2x16float(pack2x16float(vec2<f32>(x, 0.0))).x;
#endif
}

// The four bytes of `x` as unsigned values.
fn bytes4(x: u32) -> vec4<f32> {
    return vec4<f32>(f32(x & 0xffu), f32((x >> 8u) & 0xffu), f32((x >> 16u) & 0xffu), f32(x >> 24u));
}

// The four bytes of `x` as signed (two's complement) values.
fn sbytes4(x: u32) -> vec4<f32> {
    let s = bitcast<i32>(x);
    return vec4<f32>(f32((s << 24u) >> 24u), f32((s << 16u) >> 24u), f32((s << 8u) >> 24u), f32(s >> 24u));
}

// Linear workgroup index of a dispatch spread over x and y (x is at most 65535).
fn group_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

// The four low bits of `h` moved to bit 4 of bytes 0..3 (the 5th bit of Q5 values).
fn spread4(h: u32) -> u32 {
    return ((h & 1u) | ((h & 2u) << 7u) | ((h & 4u) << 14u) | ((h & 8u) << 21u)) << 4u;
}
