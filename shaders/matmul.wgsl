// y = x W^T straight from the stored bytes of W (GGUF blocks or FineQuant groups; no
// dequantized copy). One workgroup per tile of TR weight rows × TT tokens: 8 rows of
// one token for a decode step (MATVEC), 4 rows × 8 tokens for a batch, so each decoded
// weight group serves 8 products. The tile is a compile-time constant so loops unroll
// and accumulators stay in registers; rows and tokens past the edge are clamped and
// their sums dropped.
#include "common"
#include "bytes"
#include "quant"
#include "reduce"

#if MATVEC
const TR: u32 = 8u;
const TT: u32 = 1u;
#else
const TR: u32 = 4u;
const TT: u32 = 8u;
#endif
const NACC: u32 = 32u; // TILE; TR * TT <= NACC

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
    let r0 = wid.x * TR;
    let t0 = wid.y * TT;
    let nr = min(TR, p.rows - r0);
    let nt = min(TT, p.n - t0);
    let k4 = p.k / 4u;
    var acc: array<f32, NACC>;
    var xs: array<vec4<f32>, TT>;
    for (var g = lid; g < k4; g += WG) {
        for (var t = 0u; t < TT; t++) {
            xs[t] = X[min(t0 + t, p.n - 1u) * k4 + g];
        }
        for (var r = 0u; r < TR; r++) {
            let w = dq4(min(r0 + r, p.rows - 1u) * p.row_bytes, g);
            for (var t = 0u; t < TT; t++) {
                acc[r * TT + t] += dot(w, xs[t]);
            }
        }
    }
#if SUBGROUP
    let total = reduce_tile(&acc, lid, TR * TT, sg_lane);
#else
    let total = reduce_tile(&acc, lid, TR * TT);
#endif
    let r = lid / TT;
    let t = lid % TT;
    if (r < nr && t < nt) {
        Y[(t0 + t) * p.out_cols + p.row0 + r0 + r] = total;
    }
}
