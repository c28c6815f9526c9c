//! BitStack block layout and stack table: round trips, reconstruction, and refusal of
//! tables that point outside the file or list blocks out of order.

use cairn_formats::bitstack::{block_name, Block, BlockShape, StackEntry, StackMatrix, StackTable, BLOCK_TYPE};
use cairn_formats::container::{reseal, PAGE};
use cairn_formats::{CairnBuilder, CairnFile};
use proptest::prelude::*;

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

fn block(shape: BlockShape, seed: u64) -> (Vec<u8>, Vec<bool>, Vec<f32>, Vec<f32>) {
    let mut s = seed;
    let signs: Vec<bool> = (0..shape.m * shape.n).map(|_| lcg(&mut s) < 0.0).collect();
    // Values exactly representable in f16, so the encoded block reads back exactly.
    let q = |x: f32| (x * 64.0).round() / 64.0;
    let u: Vec<f32> = (0..shape.m * shape.k).map(|_| q(lcg(&mut s))).collect();
    let v: Vec<f32> = (0..shape.k * shape.n).map(|_| q(lcg(&mut s))).collect();
    let bytes = shape.encode(|i, j| signs[i * shape.n + j], &u, &v).unwrap();
    (bytes, signs, u, v)
}

#[test]
fn block_layout_reads_back_and_reconstructs() {
    let shape = BlockShape::new(5, 12, 3).unwrap();
    // 5 rows of 2 sign bytes, u at 64, v at 64 + 64 (u: 30 bytes rounded up), 72 bytes of v.
    assert_eq!((shape.u_offset(), shape.v_offset(), shape.bytes()), (64, 128, 128 + 72));
    assert_eq!(shape.page_bytes(), PAGE);
    let (bytes, signs, u, v) = block(shape, 7);
    let b = Block::new(shape, &bytes).unwrap();
    let mut w = vec![0f32; 5 * 12];
    b.add_rows(0, &mut w);
    for i in 0..5 {
        for j in 0..12 {
            let s: f32 = (0..3).map(|r| u[i * 3 + r] * v[r * 12 + j]).sum();
            let want = if signs[i * 12 + j] { -s } else { s };
            assert!((w[i * 12 + j] - want).abs() < 1e-6, "({i},{j}): {} vs {want}", w[i * 12 + j]);
            assert_eq!(b.negative(i, j), signs[i * 12 + j]);
        }
    }
    assert!(Block::new(shape, &bytes[1..]).is_err());
    assert!(BlockShape::new(4, 4, 5).is_err(), "rank above min(m, n)");
    assert!(BlockShape::new(0, 4, 1).is_err());
    assert!(BlockShape::new(usize::MAX / 2, 4, 1).is_err(), "overflowing shape");
}

/// A file with `levels` blocks of each matrix, in level-major order.
fn stacked_file(shapes: &[(usize, usize)], levels: usize, k: usize) -> (Vec<u8>, StackTable) {
    let mut b = CairnBuilder::new();
    b.tensor("dense", &[4], cairn_formats::GgmlType::F32, vec![0; 16]).unwrap();
    let mut entries = Vec::new();
    let mut cum = 0;
    for level in 0..levels {
        for (mi, &(m, n)) in shapes.iter().enumerate() {
            let shape = BlockShape::new(m, n, k).unwrap();
            let (bytes, ..) = block(shape, (mi * 100 + level) as u64);
            let name = block_name(&format!("w{mi}"), level);
            b.tensor_aligned(&name, &[bytes.len() as u64], BLOCK_TYPE, bytes, PAGE).unwrap();
            cum += shape.page_bytes();
            entries.push(StackEntry {
                matrix: mi as u32,
                level: level as u32,
                tensor: 1 + entries.len() as u32,
                cumulative: cum,
            });
        }
    }
    let matrices = shapes
        .iter()
        .enumerate()
        .map(|(i, &(m, n))| StackMatrix { name: format!("w{i}"), rows: m as u64, cols: n as u64 })
        .collect();
    let table = StackTable { rank: k as u32, matrices, entries };
    b.stack_table(table.encode());
    (b.build(), table)
}

#[test]
fn stack_table_round_trips_through_the_container() {
    let (file, table) = stacked_file(&[(8, 16), (16, 8)], 3, 2);
    let c = CairnFile::parse(&file).unwrap();
    let t = StackTable::decode(c.stack_table().unwrap()).unwrap();
    assert_eq!(t, table);
    t.validate(&c).unwrap();
    assert_eq!(t.min_prefix(), 2);
    assert_eq!(t.counts(3), vec![2, 1]);
    for e in &t.entries {
        assert_eq!(c.tensors[e.tensor as usize].offset % PAGE, 0, "blocks start on pages");
    }
}

fn refused(table: &StackTable, file: &[u8]) -> String {
    let bytes = table.encode();
    match StackTable::decode(&bytes) {
        Err(e) => e.to_string(),
        Ok(t) => t.validate(&CairnFile::parse(file).unwrap()).expect_err("accepted a bad table").to_string(),
    }
}

#[test]
fn bad_stack_tables_are_refused() {
    let (file, table) = stacked_file(&[(8, 16), (16, 8)], 3, 2);
    let mut t = table.clone();
    t.entries[3].tensor = 99;
    assert!(refused(&t, &file).contains("outside the file"), "{}", refused(&t, &file));
    let mut t = table.clone();
    t.entries.swap(0, 2); // w0 level 1 before w0 level 0
    t.entries[0].cumulative = table.entries[0].cumulative;
    t.entries[2].cumulative = table.entries[2].cumulative;
    assert!(refused(&t, &file).contains("out of order"), "{}", refused(&t, &file));
    // Every block of w0 before any of w1: w0 gets level 2 while w1 lacks level 0.
    let mut t = table.clone();
    t.entries.sort_by_key(|e| (e.matrix, e.level));
    let mut cum = 0;
    let shapes: Vec<_> = (0..2).map(|m| t.shape(m).unwrap()).collect();
    for e in &mut t.entries {
        cum += shapes[e.matrix as usize].page_bytes();
        e.cumulative = cum;
    }
    assert!(refused(&t, &file).contains("lacks level 0"), "{}", refused(&t, &file));
    let mut t = table.clone();
    t.entries[1].cumulative += 1;
    assert!(refused(&t, &file).contains("cumulative"), "{}", refused(&t, &file));
    let mut t = table.clone();
    t.entries[1].tensor = t.entries[0].tensor;
    assert!(!refused(&t, &file).is_empty());
    let mut t = table.clone();
    t.entries.retain(|e| e.matrix == 0);
    t.entries.truncate(2);
    let page = t.shape(0).unwrap().page_bytes();
    for (i, e) in t.entries.iter_mut().enumerate() {
        e.cumulative = page * (i as u64 + 1);
    }
    assert!(refused(&t, &file).contains("no blocks"), "{}", refused(&t, &file));
    let mut bytes = table.encode();
    bytes[4] = 9;
    assert!(StackTable::decode(&bytes).unwrap_err().to_string().contains("version 9"));
    assert!(StackTable::decode(&bytes[..30]).is_err());
    assert!(StackTable::decode(b"nope").is_err());
}

#[test]
fn a_corrupt_table_in_a_file_is_refused_by_its_checksum_or_contents() {
    let (mut file, _) = stacked_file(&[(8, 16)], 2, 2);
    let c = CairnFile::parse(&file).unwrap();
    let (off, _) = c.stack.unwrap();
    // The first entry's tensor index (after magic, 5 words, one matrix "w0" of 8+2+16 bytes).
    let at = off as usize + 24 + 26 + 8;
    file[at] = 200;
    assert!(CairnFile::parse(&file).unwrap_err().to_string().contains("stack table: checksum mismatch"));
    reseal(&mut file);
    let c = CairnFile::parse(&file).unwrap();
    let t = StackTable::decode(c.stack_table().unwrap()).unwrap();
    assert!(t.validate(&c).unwrap_err().to_string().contains("outside the file"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The prefix for a budget never exceeds it and is the longest that fits.
    #[test]
    fn budget_maps_to_the_longest_fitting_prefix(sizes in prop::collection::vec(1u64..40, 1..40), budget in 0u64..2000) {
        let mut cum = 0;
        let entries: Vec<StackEntry> = sizes.iter().enumerate().map(|(i, s)| {
            cum += s * 4;
            StackEntry { matrix: 0, level: i as u32, tensor: i as u32, cumulative: cum }
        }).collect();
        let t = StackTable { rank: 1, matrices: vec![StackMatrix { name: "w".into(), rows: 1, cols: 1 }], entries };
        let n = t.prefix_for(budget);
        prop_assert!(t.prefix_bytes(n) <= budget);
        if n < t.entries.len() {
            prop_assert!(t.prefix_bytes(n + 1) > budget);
        }
    }

    /// Hostile table bytes are refused with an error, never a panic.
    #[test]
    fn arbitrary_table_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200), flip in 0usize..400) {
        let (_, table) = stacked_file(&[(8, 16)], 2, 2);
        let _ = StackTable::decode(&bytes);
        let mut enc = table.encode();
        let i = flip % enc.len();
        enc[i] ^= 0x5a;
        let _ = StackTable::decode(&enc);
    }
}
