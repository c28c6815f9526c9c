// Element-wise ops over equal-shaped tensors: Y = f(A, B).
#include "common"

struct Params {
    len: u32,
    _a: u32,
    _b: u32,
    _c: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> A: array<f32>;
@group(0) @binding(2) var<storage, read> B: array<f32>;
@group(0) @binding(3) var<storage, read_write> Y: array<f32>;

fn silu(x: f32) -> f32 {
    return x / (1.0 + exp(-x));
}

// GELU, tanh approximation as ggml; the argument is clamped where tanh is ±1 anyway,
// so that no implementation's tanh overflows.
fn gelu(x: f32) -> f32 {
    let u = clamp(0.7978846 * x * (1.0 + 0.044715 * x * x), -15.0, 15.0);
    return 0.5 * x * (1.0 + tanh(u));
}

@compute @workgroup_size(64)
fn swiglu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = group_index(wid, nwg) * WG + lid;
    if (i < p.len) {
        Y[i] = silu(A[i]) * B[i];
    }
}

@compute @workgroup_size(64)
fn geglu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = group_index(wid, nwg) * WG + lid;
    if (i < p.len) {
        Y[i] = gelu(A[i]) * B[i];
    }
}

@compute @workgroup_size(64)
fn add(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = group_index(wid, nwg) * WG + lid;
    if (i < p.len) {
        Y[i] = A[i] + B[i];
    }
}
