// Q4_1 (20 B per 32 values): d, m (f16), qs[16] as Q4_0; y = d·q + m.
const QK: u32 = 32u;
const BB: u32 = 20u;
#include "blocks"

fn dq4_block(b: u32, j: u32) -> vec4<f32> {
    let q = (ld32(b + 4u + 4u * (j & 3u)) >> (4u * (j >> 2u))) & 0x0f0f0f0fu;
    return bytes4(q) * f16_at(b) + f16_at(b + 2u);
}
