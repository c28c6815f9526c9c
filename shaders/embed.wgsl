// Rows of an embedding table, decoded from its GGUF blocks, times a scale. A table split
// into chunks is gathered one chunk per dispatch; each writes the ids it holds.
#include "common"
#include "bytes"
#include "quant"

struct Params {
    n: u32,
    dim: u32,
    row0: u32,
    rows: u32,
    row_bytes: u32,
    scale: f32,
    _a: u32,
    _b: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> W: array<u32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> Y: array<vec4<f32>>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = group_index(wid, nwg) * WG + lid;
    let dim4 = p.dim / 4u;
    if (i >= p.n * dim4) {
        return;
    }
    let id = ids[i / dim4];
    if (id < p.row0 || id >= p.row0 + p.rows) {
        return;
    }
    let g = i % dim4;
    Y[i] = dq4((id - p.row0) * p.row_bytes, g) * p.scale;
}
