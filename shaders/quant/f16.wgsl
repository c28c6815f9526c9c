// F16 weights: groups of 4 values, 8 bytes.
const QK: u32 = 4u;
const BB: u32 = 8u;
#include "blocks"

fn dq4_block(b: u32, j: u32) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(W[b >> 2u]), unpack2x16float(W[(b >> 2u) + 1u]));
}
