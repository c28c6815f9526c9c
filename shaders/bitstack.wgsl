// y = x Wᵀ for one BitStack block W = S ⊙ (U V) (formats/FORMAT.md): m rows of sign
// bits (LSB first, a set bit is negative, ⌈n/8⌉ bytes a row), U (m × rank, f16) at
// `u_off`, V (rank × n, f16) at `v_off`, read from the block's bytes as stored. Each
// weight is rebuilt in registers, w[i, j] = ±Σ_r U[i, r] V[r, j], and used at once, so
// the dense matrix never exists: the tile's U rows sit in workgroup memory and each
// quad of V columns serves TR rows × TT tokens. Tiles as in matmul.wgsl. One dispatch
// per active block: the first writes Y, the others (`add`) add to it.
#include "common"
#include "bytes"
#include "reduce"

#if MATVEC
const TR: u32 = 8u;
const TT: u32 = 1u;
#else
const TR: u32 = 4u;
const TT: u32 = 8u;
#endif
const NACC: u32 = 32u; // TILE; TR * TT <= NACC
const MAX_RANK: u32 = 64u;

struct Params {
    n: u32,          // tokens
    k: u32,          // input width (the block's n, a multiple of 4)
    rows: u32,       // the block's m
    out_cols: u32,
    rank: u32,
    u_off: u32,
    v_off: u32,
    sign_bytes: u32, // bytes of one row of signs
    add: u32,
    _a: u32,
    _b: u32,
    _c: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> W: array<u32>;
@group(0) @binding(2) var<storage, read> X: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> Y: array<f32>;

var<workgroup> us: array<f32, 8u * MAX_RANK>; // U rows of the tile (TR <= 8)

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
    for (var e = lid; e < TR * p.rank; e += WG) {
        let i = min(r0 + e / p.rank, p.rows - 1u);
        us[e] = f16_at(p.u_off + 2u * (i * p.rank + e % p.rank));
    }
    workgroupBarrier();
    let k4 = p.k / 4u;
    var acc: array<f32, NACC>;
    var xs: array<vec4<f32>, TT>;
    for (var g = lid; g < k4; g += WG) {
        for (var t = 0u; t < TT; t++) {
            xs[t] = X[min(t0 + t, p.n - 1u) * k4 + g];
        }
        var w: array<vec4<f32>, TR>;
        for (var r = 0u; r < p.rank; r++) {
            // V[r, 4g..4g+4]: 8 bytes, 4-byte aligned (v_off is, and k is a multiple of 4).
            let o = (p.v_off >> 2u) + r * (p.k >> 1u) + 2u * g;
            let v = vec4<f32>(unpack2x16float(W[o]), unpack2x16float(W[o + 1u]));
            for (var i = 0u; i < TR; i++) {
                w[i] += us[i * p.rank + r] * v;
            }
        }
        for (var i = 0u; i < TR; i++) {
            let row = min(r0 + i, p.rows - 1u);
            // Columns 4g..4g+3: a nibble of sign byte g / 2.
            let s = (ld8(row * p.sign_bytes + (g >> 1u)) >> (4u * (g & 1u))) & 15u;
            let bits = vec4<u32>(s, s >> 1u, s >> 2u, s >> 3u) & vec4<u32>(1u);
            let wi = w[i] * (1.0 - 2.0 * vec4<f32>(bits));
            for (var t = 0u; t < TT; t++) {
                acc[i * TT + t] += dot(wi, xs[t]);
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
        let y = (t0 + t) * p.out_cols + r0 + r;
        if (p.add != 0u) {
            Y[y] += total;
        } else {
            Y[y] = total;
        }
    }
}
