// Q5_1 (24 B per 32 values): d, m (f16), qh (u32), qs[16] as Q5_0; y = d·q + m.
const QK: u32 = 32u;
const BB: u32 = 24u;
#include "blocks"

fn dq4_block(b: u32, j: u32) -> vec4<f32> {
    let lo = (ld32(b + 8u + 4u * (j & 3u)) >> (4u * (j >> 2u))) & 0x0f0f0f0fu;
    let hi = spread4(ld32(b + 4u) >> (4u * j));
    return bytes4(lo | hi) * f16_at(b) + f16_at(b + 2u);
}
