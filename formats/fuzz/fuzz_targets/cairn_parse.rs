//! Any bytes through `CairnFile::parse`: it must return (never panic, loop or allocate
//! beyond the input's size), and whatever parses must be safe to use: every tensor's
//! data is in bounds, verifies or fails cleanly, and its first row decodes. Each input
//! is also tried with its checksums recomputed, so that mutations reach the checks
//! behind them.
#![no_main]

use cairn_formats::{container, quant, CairnFile, Metadata};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut sealed = data.to_vec();
    container::reseal(&mut sealed);
    check(&sealed);
});

fn check(data: &[u8]) {
    let Ok(c) = CairnFile::parse(data) else { return };
    for (key, _) in &c.metadata {
        assert!(c.get(key).is_some());
    }
    let _ = c.stack_table();
    for (i, t) in c.tensors.iter().enumerate() {
        let bytes = c.tensor_data(t);
        assert_eq!(bytes.len() as u64, t.size, "tensor {}", t.name);
        let _ = c.verify(i);
        if !t.ty.is_supported() {
            continue;
        }
        let row = t.ty.row_bytes(t.dims[0]).expect("checked by parse") as usize;
        if row == 0 || row > bytes.len() {
            continue;
        }
        let cols = t.dims[0] as usize;
        let mut out = vec![0f32; cols];
        quant::dequantize(t.ty, &bytes[..row], &mut out).expect("whole rows by construction");
    }
}
