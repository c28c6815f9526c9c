// Q8_0 (34 B per 32 values): d (f16), qs[32] as i8; y = d·q.
const QK: u32 = 32u;
const BB: u32 = 34u;
#include "blocks"

fn dq4_block(b: u32, j: u32) -> vec4<f32> {
    return sbytes4(ld32(b + 2u + 4u * j)) * f16_at(b);
}
