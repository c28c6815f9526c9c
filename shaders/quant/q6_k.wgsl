// Q6_K (210 B per 256 values): ql[128], qh[64], scales[16] (i8), d (f16). Half h (128
// values) uses ql[64h..], qh[32h..]; for l < 32 the values 32k + l (k < 4) take their
// low 4 bits from ql[l + 32(k & 1)] (nibble k >> 1) and their top 2 from bits 2k of
// qh[l]; every 16 values share a scale; y = d·scale·(q − 32).
const QK: u32 = 256u;
const BB: u32 = 210u;
#include "blocks"

fn dq4_block(b: u32, j: u32) -> vec4<f32> {
    let h = j >> 5u;
    let k = (j >> 3u) & 3u;
    let l = 4u * (j & 7u);
    let ql = (ld32(b + 64u * h + l + 32u * (k & 1u)) >> (4u * (k >> 1u))) & 0x0f0f0f0fu;
    let qh = (ld32(b + 128u + 32u * h + l) >> (2u * k)) & 0x03030303u;
    let sc = f32((bitcast<i32>(ld8(b + 192u + 8u * h + l / 16u + 2u * k)) << 24u) >> 24u);
    return (bytes4(ql | (qh << 4u)) - 32.0) * (f16_at(b + 208u) * sc);
}
