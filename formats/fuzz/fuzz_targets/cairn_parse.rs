//! Any bytes through `CairnFile::parse`: it must return (never panic, loop or allocate
//! beyond the input's size), and whatever parses must be safe to use: every tensor's
//! data is in bounds, verifies or fails cleanly, and its first row decodes. Each input
//! is also tried with its checksums recomputed, so that mutations reach the checks
//! behind them. A stack table, if any, goes through its own decoder and validation.
#![no_main]

use cairn_formats::bitstack::{Block, StackTable};
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
    // A stack table that decodes and validates must be safe to use: every block's
    // tensor exists and has exactly the block's bytes.
    if let Some(Ok(table)) = c.stack_table().map(StackTable::decode) {
        if table.validate(&c).is_ok() {
            for e in &table.entries {
                let shape = table.shape(e.matrix as usize).expect("checked by decode");
                let t = &c.tensors[e.tensor as usize];
                let block = Block::new(shape, c.tensor_data(t)).expect("checked by validate");
                let _ = block.negative(shape.m - 1, shape.n - 1);
            }
            let n = table.prefix_for(u64::MAX);
            assert_eq!(n, table.entries.len());
        }
    }
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
