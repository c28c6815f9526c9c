// RMSNorm of every `wlen`-wide slice (a row, or a head for per-head norms), times the
// weight: one workgroup per slice.
#include "common"

struct Params {
    slices: u32,
    wlen: u32,
    eps: f32,
    _a: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> Wn: array<f32>;
@group(0) @binding(3) var<storage, read_write> Y: array<f32>;

var<workgroup> part: array<f32, 64>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let s = group_index(wid, nwg);
    if (s >= p.slices) {
        return;
    }
    let base = s * p.wlen;
    var ss = 0.0;
    for (var i = lid; i < p.wlen; i += WG) {
        let v = X[base + i];
        ss += v * v;
    }
    part[lid] = ss;
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st >>= 1u) {
        if (lid < st) {
            part[lid] += part[lid + st];
        }
        workgroupBarrier();
    }
    let inv = 1.0 / sqrt(part[0] / f32(p.wlen) + p.eps);
    for (var i = lid; i < p.wlen; i += WG) {
        Y[base + i] = X[base + i] * (inv * Wn[i]);
    }
}
