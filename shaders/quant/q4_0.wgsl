// Q4_0 (18 B per 32 values): d (f16), qs[16]; value i < 16 is the low nibble of qs[i],
// value i + 16 the high one; y = d·(q − 8).
const QK: u32 = 32u;
const BB: u32 = 18u;
#include "blocks"

// Values 4j..4j+3 of the block at byte `b`.
fn dq4_block(b: u32, j: u32) -> vec4<f32> {
    let q = (ld32(b + 2u + 4u * (j & 3u)) >> (4u * (j >> 2u))) & 0x0f0f0f0fu;
    return (bytes4(q) - 8.0) * f16_at(b);
}
