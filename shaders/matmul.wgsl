// y = x W^T straight from the GGUF blocks of W (no dequantized copy). One workgroup per
// weight row and tile of up to TILE tokens: each weight group is decoded once and used
// for every token of the tile. A decode step (one token) is the matvec case.
#include "common"
#include "bytes"
#include "quant"
#include "reduce"

struct Params {
    n: u32,         // tokens
    k: u32,         // input width
    rows: u32,      // weight rows in this chunk
    out_cols: u32,  // output width (all chunks)
    row0: u32,      // first output column of this chunk
    row_bytes: u32,
    _a: u32,
    _b: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> W: array<u32>;
@group(0) @binding(2) var<storage, read> X: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> Y: array<f32>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
#if SUBGROUP
    @builtin(subgroup_invocation_id) sg_lane: u32,
#endif
) {
    let r = wid.x;
    let t0 = wid.y * TILE;
    let nt = min(TILE, p.n - t0);
    let rb = r * p.row_bytes;
    let k4 = p.k / 4u;
    let gpb = QK / 4u;
    var acc: array<f32, 8>;
    for (var g = lid; g < k4; g += WG) {
        let w = dq4(rb + (g / gpb) * BB, g % gpb);
        for (var t = 0u; t < nt; t++) {
            acc[t] += dot(w, X[(t0 + t) * k4 + g]);
        }
    }
#if SUBGROUP
    let total = reduce_tile(&acc, lid, nt, sg_lane);
#else
    let total = reduce_tile(&acc, lid, nt);
#endif
    if (lid < nt) {
        Y[(t0 + lid) * p.out_cols + p.row0 + r] = total;
    }
}
