// Q4_K (144 B per 256 values): d, dmin (f16), scales[12], qs[128]. Eight sub-blocks of
// 32 with 6-bit scale and min; chunk c (64 values) uses qs[32c..32c+32], low nibbles
// for sub-block 2c, high for 2c+1; y = d·scale·q − dmin·min.
const QK: u32 = 256u;
const BB: u32 = 144u;
#include "blocks"

// (scale, min) of sub-block `s`, unpacked as ggml's get_scale_min_k4.
fn scale_min_k4(b: u32, s: u32) -> vec2<f32> {
    if (s < 4u) {
        return vec2<f32>(f32(ld8(b + 4u + s) & 63u), f32(ld8(b + 8u + s) & 63u));
    }
    let lo = ld8(b + 8u + s);
    let sc = (lo & 15u) | ((ld8(b + s) >> 6u) << 4u);
    let mn = (lo >> 4u) | ((ld8(b + 4u + s) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(mn));
}

fn dq4_block(b: u32, j: u32) -> vec4<f32> {
    let c = j >> 4u;
    let hi = (j >> 3u) & 1u;
    let l = 4u * (j & 7u);
    let q = (ld32(b + 16u + 32u * c + l) >> (4u * hi)) & 0x0f0f0f0fu;
    let sm = scale_min_k4(b, 2u * c + hi);
    return bytes4(q) * (f16_at(b) * sm.x) - f16_at(b + 2u) * sm.y;
}
