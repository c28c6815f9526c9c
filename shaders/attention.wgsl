// Attention over the GPU KV cache: `store` appends a batch's keys and values, `attend`
// runs causal grouped-query attention with the CPU backend's roundings (f16 cache, the
// query rounded to f16 before q·k, softmax weights rounded to f16 before they weigh the
// values). One workgroup per (token, head); two passes over the keys: the max and sum
// of the scores, then the weighted values, 64 keys at a time. Position j lives in slot
// j mod `slots`: the whole context, or a ring for a sliding-window layer (the host
// dispatches at most slots − window + 1 queries at once, so none is overwritten early).
#include "common"
#include "kv"

struct Params {
    n: u32,
    n_heads: u32,
    group: u32,  // query heads per KV head
    hd: u32,
    pos0: u32,
    width: u32,  // KV heads × head_dim
    window: u32, // 0: none
    scale: f32,
    slots: u32,  // positions the cache holds
    _a: u32,
    _b: u32,
    _c: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> IN0: array<f32>; // queries (attend), keys (store)
@group(0) @binding(2) var<storage, read> IN1: array<f32>; // values (store)
@group(0) @binding(5) var<storage, read_write> OUT: array<f32>;

var<workgroup> qs: array<f32, 256>;
var<workgroup> pm: array<f32, 64>;
var<workgroup> ps: array<f32, 64>;

@compute @workgroup_size(64)
fn store(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = 2u * (group_index(wid, nwg) * WG + lid);
    if (i >= p.n * p.width) {
        return;
    }
    // `i` and `width` are even, so a pair never straddles two positions.
    let at = ((p.pos0 + i / p.width) % p.slots) * p.width + i % p.width;
    kv_put(at, vec2<f32>(IN0[i], IN0[i + 1u]), vec2<f32>(IN1[i], IN1[i + 1u]));
}

fn score(j: u32, kb: u32) -> f32 {
    let base = (j % p.slots) * p.width + kb;
    var s = 0.0;
    for (var d = 0u; d < p.hd; d++) {
        s += qs[d] * k_at(base + d);
    }
    return s * p.scale;
}

@compute @workgroup_size(64)
fn attend(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.x;
    let t = wid.y;
    let pos = p.pos0 + t;
    var first = 0u;
    if (p.window > 0u && pos + 1u > p.window) {
        first = pos + 1u - p.window;
    }
    let kb = (h / p.group) * p.hd;
    let qcols = p.n_heads * p.hd;
    for (var d = lid; d < p.hd; d += WG) {
        qs[d] = round_f16(IN0[t * qcols + h * p.hd + d]);
    }
    workgroupBarrier();

    // Pass 1: running max and sum of exp per thread, then merged.
    var m = -3.0e38;
    var s = 0.0;
    for (var j = first + lid; j <= pos; j += WG) {
        let x = score(j, kb);
        if (x > m) {
            s = s * exp(m - x) + 1.0;
            m = x;
        } else {
            s += exp(x - m);
        }
    }
    pm[lid] = m;
    ps[lid] = s;
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st >>= 1u) {
        if (lid < st) {
            let m1 = pm[lid];
            let m2 = pm[lid + st];
            let mm = max(m1, m2);
            ps[lid] = ps[lid] * exp(m1 - mm) + ps[lid + st] * exp(m2 - mm);
            pm[lid] = mm;
        }
        workgroupBarrier();
    }
    let mx = pm[0];
    let inv = 1.0 / ps[0];
    workgroupBarrier();

    // Pass 2: each thread owns dims lid, lid + 64, ... of the output.
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    for (var c0 = first; c0 <= pos; c0 += WG) {
        let j = c0 + lid;
        var w = 0.0;
        if (j <= pos) {
            w = round_f16(exp(score(j, kb) - mx) * inv);
        }
        ps[lid] = w;
        workgroupBarrier();
        let cnt = min(WG, pos + 1u - c0);
        for (var i = 0u; i < cnt; i++) {
            let vb = ((c0 + i) % p.slots) * p.width + kb;
            let wi = ps[i];
            for (var e = 0u; e < 4u; e++) {
                let d = lid + e * WG;
                if (d < p.hd) {
                    acc[e] += wi * v_at(vb + d);
                }
            }
        }
        workgroupBarrier();
    }
    for (var e = 0u; e < 4u; e++) {
        let d = lid + e * WG;
        if (d < p.hd) {
            OUT[t * qcols + h * p.hd + d] = acc[e];
        }
    }
}
