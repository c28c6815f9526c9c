// The KV cache as f16: native f16 storage where the adapter offers shader-f16, else
// pairs packed into u32 (the same values, the same roundings).
#if F16
@group(0) @binding(3) var<storage, read_write> KC: array<f16>;
@group(0) @binding(4) var<storage, read_write> VC: array<f16>;

fn k_at(i: u32) -> f32 {
    return f32(KC[i]);
}

fn v_at(i: u32) -> f32 {
    return f32(VC[i]);
}

// `i` even: values i and i + 1.
fn kv_put(i: u32, k: vec2<f32>, v: vec2<f32>) {
    KC[i] = f16(k.x);
    KC[i + 1u] = f16(k.y);
    VC[i] = f16(v.x);
    VC[i + 1u] = f16(v.y);
}
#else
@group(0) @binding(3) var<storage, read_write> KC: array<u32>;
@group(0) @binding(4) var<storage, read_write> VC: array<u32>;

fn k_at(i: u32) -> f32 {
    return unpack2x16float(KC[i >> 1u])[i & 1u];
}

fn v_at(i: u32) -> f32 {
    return unpack2x16float(VC[i >> 1u])[i & 1u];
}

fn kv_put(i: u32, k: vec2<f32>, v: vec2<f32>) {
    KC[i >> 1u] = pack2x16float(k);
    VC[i >> 1u] = pack2x16float(v);
}
#endif
