// Rows made of fixed-size blocks (every ggml type): `QK` values in `BB` bytes, decoded
// four at a time by the type's `dq4_block(block byte, j)`. Kernels call `dq4(row, g)`:
// values 4g..4g+3 of the row starting at byte `row`, whatever the layout (FineQuant's
// groups of varying size are located by `quant/fine.wgsl` instead).

fn dq4(row: u32, g: u32) -> vec4<f32> {
    let gpb = QK / 4u;
    return dq4_block(row + (g / gpb) * BB, g % gpb);
}
