// Q5_0 (22 B per 32 values): d (f16), qh (u32: bit i is the 5th bit of value i),
// qs[16] as Q4_0; y = d·(q − 16).
const QK: u32 = 32u;
const BB: u32 = 22u;
#include "blocks"

fn dq4_block(b: u32, j: u32) -> vec4<f32> {
    let lo = (ld32(b + 6u + 4u * (j & 3u)) >> (4u * (j >> 2u))) & 0x0f0f0f0fu;
    let hi = spread4(ld32(b + 2u) >> (4u * j));
    return (bytes4(lo | hi) - 16.0) * f16_at(b);
}
