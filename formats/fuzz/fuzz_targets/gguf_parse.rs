//! Any bytes through `Gguf::parse`: it must return (never panic, loop or allocate beyond
//! the input's size), and whatever parses must be safe to use: every tensor's data is in
//! bounds, and the first row of each tensor with kernels dequantizes and dots.
#![no_main]

use cairn_formats::{quant, Gguf};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = Gguf::parse(data) else { return };
    for (key, v) in &g.metadata {
        assert!(g.get(key).is_some());
        let _ = (v.as_u64(), v.as_i64(), v.as_f64(), v.as_bool(), v.as_str(), v.as_array());
    }
    for t in &g.tensors {
        let bytes = g.tensor_data(t);
        assert_eq!(bytes.len() as u64, t.size, "tensor {}", t.name);
        assert!(g.tensor(&t.name).is_some());
        if !t.ty.is_supported() {
            continue;
        }
        // The first row, when the tensor has one (a zero outer dimension leaves none).
        let row = t.ty.row_bytes(t.dims[0]).expect("checked by parse") as usize;
        if row == 0 || row > bytes.len() {
            continue;
        }
        let cols = t.dims[0] as usize;
        let mut out = vec![0f32; cols];
        quant::dequantize(t.ty, &bytes[..row], &mut out).expect("whole blocks by construction");
        let x = vec![1.0f32; cols];
        quant::dot(t.ty, &bytes[..row], &x).expect("whole blocks by construction");
    }
});
