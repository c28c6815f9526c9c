// F32 weights: groups of 4 values, 16 bytes.
const QK: u32 = 4u;
const BB: u32 = 16u;
#include "blocks"

fn dq4_block(b: u32, j: u32) -> vec4<f32> {
    let i = b >> 2u;
    return bitcast<vec4<f32>>(vec4<u32>(W[i], W[i + 1u], W[i + 2u], W[i + 3u]));
}
