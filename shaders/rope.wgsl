// RoPE in place from a table of (cos, sin) per row and pair, computed on the host in
// f64 as the CPU backend does (f32 angles lose ~1e-3 rad at long positions).
#include "common"

struct Params {
    n: u32,      // rows
    cols: u32,
    hd: u32,
    halves: u32, // 0: adjacent pairs (x[2i], x[2i+1]); 1: halves (x[i], x[i + hd/2])
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> T: array<vec2<f32>>;
@group(0) @binding(2) var<storage, read_write> X: array<f32>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = group_index(wid, nwg) * WG + lid;
    let pairs = p.cols / 2u;
    if (i >= p.n * pairs) {
        return;
    }
    let row = i / pairs;
    let half = p.hd / 2u;
    let head = (i % pairs) / half;
    let k = (i % pairs) % half;
    let base = row * p.cols + head * p.hd;
    var a = base + 2u * k;
    var b = a + 1u;
    if (p.halves == 1u) {
        a = base + k;
        b = a + half;
    }
    let cs = T[row * half + k];
    let x0 = X[a];
    let x1 = X[b];
    X[a] = x0 * cs.x - x1 * cs.y;
    X[b] = x0 * cs.y + x1 * cs.x;
}
