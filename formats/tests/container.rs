//! The `.cairn` container: round trips of every tensor type and metadata kind, and
//! corrupt files (truncated, bytes flipped in each section, hostile contents behind
//! valid checksums) that must fail with an error naming what is wrong.

use cairn_formats::container::{self, CairnBuilder, CairnFile};
use cairn_formats::{FineType, GgmlType, MetaValue};
use proptest::prelude::*;

fn types() -> Vec<GgmlType> {
    use GgmlType::*;
    let mut v = vec![F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4K, Q5K, Q6K];
    for (bits, sym, g) in [(2u8, false, 32), (3, false, 128), (4, false, 64), (4, true, 96), (8, true, 256)] {
        v.push(Fine(FineType::new(bits, sym, g).unwrap()));
    }
    v
}

fn metadata() -> Vec<(String, MetaValue)> {
    vec![
        ("general.architecture".into(), MetaValue::String("llama".into())),
        ("u8".into(), MetaValue::U8(7)),
        ("i8".into(), MetaValue::I8(-7)),
        ("u16".into(), MetaValue::U16(700)),
        ("i16".into(), MetaValue::I16(-700)),
        ("u32".into(), MetaValue::U32(70_000)),
        ("i32".into(), MetaValue::I32(-70_000)),
        ("f32".into(), MetaValue::F32(1.5e-5)),
        ("bool".into(), MetaValue::Bool(true)),
        ("u64".into(), MetaValue::U64(1 << 40)),
        ("i64".into(), MetaValue::I64(-(1 << 40))),
        ("f64".into(), MetaValue::F64(1e100)),
        (
            "tokenizer.ggml.tokens".into(),
            MetaValue::array(vec![MetaValue::String("a".into()), MetaValue::String("<|im_end|>".into())]),
        ),
        ("nested".into(), MetaValue::array(vec![MetaValue::array(vec![MetaValue::U32(1), MetaValue::U32(2)])])),
    ]
}

/// Deterministic filler bytes (any bytes are valid tensor data).
fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect()
}

/// Name, dims, type and bytes of a tensor written to a sample file.
type Written = (String, Vec<u64>, GgmlType, Vec<u8>);

fn sample_file(stack: bool) -> (Vec<u8>, Vec<Written>) {
    let mut b = CairnBuilder::new();
    for (k, v) in metadata() {
        b.meta(&k, v);
    }
    let mut tensors = Vec::new();
    for (i, ty) in types().into_iter().enumerate() {
        let dims = vec![256u64, 3];
        let n = ty.row_bytes(256).unwrap() as usize * 3;
        let data = bytes(i as u64, n);
        let name = format!("blk.{i}.w");
        if i % 3 == 0 {
            b.tensor_aligned(&name, &dims, ty, data.clone(), 4096).unwrap();
        } else {
            b.tensor(&name, &dims, ty, data.clone()).unwrap();
        }
        tensors.push((name, dims, ty, data));
    }
    if stack {
        b.stack_table(b"stack table v1".to_vec());
    }
    (b.build(), tensors)
}

#[test]
fn every_type_and_metadata_kind_round_trips_bit_for_bit() {
    let (file, tensors) = sample_file(true);
    // A seed for `cargo fuzz run cairn_parse` (formats/fuzz/README), when asked for.
    if let Some(dir) = std::env::var_os("CAIRN_FUZZ_SEED_DIR") {
        std::fs::write(std::path::Path::new(&dir).join("sample.cairn"), &file).unwrap();
    }
    let c = CairnFile::parse(&file).unwrap();
    assert_eq!(c.metadata, metadata());
    assert_eq!(c.tensors.len(), tensors.len());
    for (i, (t, (name, dims, ty, data))) in c.tensors.iter().zip(&tensors).enumerate() {
        assert_eq!((&t.name, &t.dims, t.ty), (name, dims, *ty));
        assert_eq!(c.tensor_data(t), &data[..], "{name}");
        assert_eq!(t.offset % if i % 3 == 0 { 4096 } else { 64 }, 0, "{name} misaligned");
        c.verify(i).unwrap();
    }
    assert_eq!(c.stack_table(), Some(&b"stack table v1"[..]));
    assert_eq!(c.data_offset % 4096, 0);
    let (plain, _) = sample_file(false);
    assert_eq!(CairnFile::parse(&plain).unwrap().stack_table(), None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_tensors_round_trip(shapes in proptest::collection::vec((0usize..16, 1u64..9, 1u64..4), 0..6), seed: u64) {
        let all = types();
        let mut b = CairnBuilder::new();
        let mut want = Vec::new();
        for (i, (t, k, rows)) in shapes.into_iter().enumerate() {
            let ty = all[t % all.len()];
            let cols = 32 * k * if ty.block_size() == 256 { 8 } else { 1 };
            let data = bytes(seed ^ i as u64, (ty.row_bytes(cols).unwrap() * rows) as usize);
            b.tensor(&format!("t{i}"), &[cols, rows], ty, data.clone()).unwrap();
            want.push((ty, data));
        }
        let file = b.build();
        let c = CairnFile::parse(&file).unwrap();
        prop_assert_eq!(c.tensors.len(), want.len());
        for (i, (t, (ty, data))) in c.tensors.iter().zip(&want).enumerate() {
            prop_assert_eq!(t.ty, *ty);
            prop_assert_eq!(c.tensor_data(t), &data[..]);
            prop_assert!(c.verify(i).is_ok());
        }
    }
}

#[test]
fn every_truncation_is_an_error() {
    let (file, _) = sample_file(true);
    let c = CairnFile::parse(&file).unwrap();
    let dir_end = c.data_offset as usize;
    // Every length through the header and directory, then a stride through the data.
    let lens = (0..dir_end.min(file.len())).chain((dir_end..file.len()).step_by(97));
    for len in lens {
        let e = CairnFile::parse(&file[..len]).expect_err("truncated file parsed");
        let msg = e.to_string();
        assert!(
            msg.contains("truncated") || msg.contains("magic") || msg.contains("header"),
            "{len}: unclear error {msg}"
        );
    }
}

/// Flip one bit at `at` and return the error (parse or verification).
fn flipped(file: &[u8], at: usize) -> String {
    let mut f = file.to_vec();
    f[at] ^= 0x10;
    match CairnFile::parse(&f) {
        Err(e) => e.to_string(),
        Ok(c) => (0..c.tensors.len()).find_map(|i| c.verify(i).err()).map(|e| e.to_string()).unwrap_or_default(),
    }
}

fn le64(b: &[u8], at: usize) -> usize {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as usize
}

#[test]
fn flipped_bytes_are_caught_and_named() {
    let (file, tensors) = sample_file(true);
    for at in 0..container::HEADER_BYTES {
        let e = flipped(&file, at);
        assert!(e.contains("header") || e.contains("magic"), "header byte {at}: {e}");
    }
    let sections = [(24, "metadata section"), (40, "tensor directory"), (56, "stack table")];
    for (field, name) in sections {
        let (off, len) = (le64(&file, field), le64(&file, field + 8));
        for at in (off..off + len).step_by(3) {
            let e = flipped(&file, at);
            assert!(e.contains(name) && e.contains("checksum"), "{name} byte {at}: {e}");
        }
    }
    let c = CairnFile::parse(&file).unwrap();
    for (t, (name, ..)) in c.tensors.iter().zip(&tensors) {
        for at in [t.offset, t.offset + t.size / 2, t.offset + t.size - 1] {
            let e = flipped(&file, at as usize);
            assert!(e.contains(&format!("tensor {name} data")) && e.contains("checksum"), "{name} byte {at}: {e}");
        }
    }
}

/// Byte offset of the first directory entry's fields after its name and dims.
fn first_entry_fields(f: &[u8]) -> usize {
    let dir = le64(f, 40);
    let name_len = le64(f, dir + 8);
    let n_dims = u32::from_le_bytes(f[dir + 16 + name_len..dir + 20 + name_len].try_into().unwrap()) as usize;
    dir + 20 + name_len + 8 * n_dims
}

#[test]
fn hostile_contents_behind_valid_checksums_are_refused() {
    let (file, _) = sample_file(true);
    let at = first_entry_fields(&file);
    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("version", Box::new(|f| f[8] = 9)),
        ("outside the file", Box::new(|f| f[40..48].copy_from_slice(&(1u64 << 40).to_le_bytes()))),
        ("unknown type", Box::new(move |f| f[at..at + 4].copy_from_slice(&77u32.to_le_bytes()))),
        ("not aligned", Box::new(move |f| f[at + 8..at + 16].copy_from_slice(&8u64.to_le_bytes()))),
        (
            "run past the data section",
            Box::new(move |f| f[at + 8..at + 16].copy_from_slice(&(1u64 << 40).to_le_bytes())),
        ),
        ("needs", Box::new(move |f| f[at + 16..at + 24].copy_from_slice(&3u64.to_le_bytes()))),
        ("overlap", {
            // Point the second tensor at the first one's data.
            let c = CairnFile::parse(&file).unwrap();
            let first_rel = c.tensors[0].offset - c.data_offset;
            let second = at + 32 + 8 + "blk.1.w".len() + 4 + 16;
            Box::new(move |f| f[second + 8..second + 16].copy_from_slice(&first_rel.to_le_bytes()))
        }),
        ("header says", Box::new(|f| f.extend_from_slice(&[0; 5]))),
        // Found by the fuzzer: an empty stack table placed far outside the file.
        (
            "stack table",
            Box::new(|f| {
                f[56..64].copy_from_slice(&(1u64 << 40).to_le_bytes());
                f[64..72].copy_from_slice(&0u64.to_le_bytes());
            }),
        ),
    ];
    for (want, edit) in cases {
        let mut f = file.clone();
        edit(&mut f);
        container::reseal(&mut f);
        let e = CairnFile::parse(&f).expect_err(want).to_string();
        assert!(e.contains(want), "expected '{want}' in: {e}");
    }
}

#[test]
fn builder_refuses_bad_tensors() {
    let mut b = CairnBuilder::new();
    assert!(b.tensor("a", &[32, 2], GgmlType::Q4_0, vec![0; 35]).is_err());
    assert!(b.tensor_aligned("a", &[32], GgmlType::F32, vec![0; 128], 100).is_err());
    b.tensor("a", &[32], GgmlType::F32, vec![0; 128]).unwrap();
    assert!(b.tensor("a", &[32], GgmlType::F32, vec![0; 128]).is_err(), "duplicate name");
}

#[test]
fn not_a_cairn_file() {
    assert!(CairnFile::parse(b"GGUF\x03\0\0\0").unwrap_err().to_string().contains("not a .cairn file"));
    assert!(!container::is_cairn(b"GGUF"));
}
