//! `.cairn` files end to end: conversion of every `--quant` keeps a model's logits close
//! to the source's (f32 reference backend, synthetic model), an int4 group-of-32
//! conversion of the real model reproduces its logits exactly, and corrupt files fail
//! to load with errors that name what is wrong.

mod common;

use cairn::backend::cpu::CpuBackend;
use cairn::convert::{self, Quant};
use cairn::model::{self, Logits};
use cairn::synthetic::{llama_gguf, SyntheticConfig};
use cairn::weights::{FileKind, ModelFile};
use cairn_formats::GgmlType;

fn logits(file: &ModelFile, ids: &[u32], exact: bool) -> Vec<f32> {
    let backend = if exact { CpuBackend::reference(1) } else { CpuBackend::new(1) }.unwrap();
    let runner = model::load(file, backend).unwrap();
    let mut cache = runner.new_cache(ids.len()).unwrap();
    runner.forward(cache.as_mut(), ids, Logits::All).unwrap()
}

fn converted(src: &ModelFile, q: Quant) -> ModelFile {
    let bytes = convert::convert(src, q, &[], |_, _| {}, |_| {}).unwrap();
    let f = ModelFile::from_bytes("converted.cairn", bytes).unwrap();
    assert_eq!(f.kind, FileKind::Cairn);
    f
}

fn rms(a: &[f32]) -> f32 {
    (a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32).sqrt()
}

#[test]
fn every_quant_stays_close_to_the_source() {
    let cfg = SyntheticConfig { dim: 128, ffn_dim: 256, ..Default::default() };
    let src = ModelFile::from_bytes("synthetic.gguf", llama_gguf(&cfg, 7).unwrap()).unwrap();
    let ids: Vec<u32> = (0..24).map(|i| (i * 7 % 96) as u32).collect();
    let want = logits(&src, &ids, true);
    let scale = rms(&want);
    // Relative RMS error of the logits allowed per format: a few times each format's
    // weight rounding error on these uniform random weights.
    let cases = [
        (Quant::F16, 0.002),
        (Quant::Fine { bits: 8, group: 64 }, 0.01),
        (Quant::FineAuto { bits: 8 }, 0.01),
        (Quant::Fine { bits: 4, group: 32 }, 0.12),
        (Quant::Fine { bits: 4, group: 128 }, 0.15),
        (Quant::FineAuto { bits: 4 }, 0.15),
        (Quant::Rtn { bits: 4, group: 64 }, 0.15),
        (Quant::Rtn { bits: 3, group: 32 }, 0.3),
        (Quant::Rtn { bits: 2, group: 32 }, 0.8),
    ];
    let mut errors = Vec::new();
    for (q, tol) in cases {
        let file = converted(&src, q);
        for t in file.tensors.iter().filter(|t| convert::is_linear(t)) {
            let fine = matches!(t.ty, GgmlType::Fine(_) | GgmlType::Q4_1 | GgmlType::Q8_0);
            assert!(fine || (q == Quant::F16 && t.ty == GgmlType::F16), "{}: {} under {q:?}", t.name, t.ty);
        }
        for exact in [true, false] {
            let got = logits(&file, &ids, exact);
            let diff: Vec<f32> = got.iter().zip(&want).map(|(a, b)| a - b).collect();
            let rel = rms(&diff) / scale;
            assert!(rel < tol, "{} (exact {exact}): relative logit error {rel} over {tol}", q.label());
            if exact {
                errors.push((q.label(), rel));
            }
        }
    }
    eprintln!("relative logit error per format: {errors:?}");
    // Fewer bits, more error: the ladder must be ordered.
    let err = |l: &str| errors.iter().find(|(n, _)| n == l).unwrap().1;
    assert!(err("f16") < err("fq8 g64") && err("fq8 g64") < err("fq4 g32"), "{errors:?}");
    assert!(err("rtn4 g64") < err("rtn3 g32") && err("rtn3 g32") < err("rtn2 g32"), "{errors:?}");
}

/// The default model's weights are Q4_1: an asymmetric int4 group of 32 re-encodes each
/// block exactly, and the backend runs it as Q4_1, so the logits are bit-identical.
#[test]
fn int4_groups_of_32_reproduce_the_q4_1_model_exactly() {
    let src = ModelFile::open(&common::model_path()).unwrap();
    let file = converted(&src, Quant::Fine { bits: 4, group: 32 });
    let ids = [1u32, 9690, 28, 253, 3458, 282, 4649, 314];
    assert_eq!(logits(&file, &ids, false), logits(&src, &ids, false));
    // Provenance and metadata came along.
    assert_eq!(file.meta("general.architecture").and_then(|v| v.as_str()), Some("llama"));
}

#[test]
fn corrupt_files_fail_to_load_with_named_errors() {
    let cfg = SyntheticConfig::default();
    let src = ModelFile::from_bytes("synthetic.gguf", llama_gguf(&cfg, 3).unwrap()).unwrap();
    let bytes = convert::convert(&src, Quant::Fine { bits: 4, group: 64 }, &[], |_, _| {}, |_| {}).unwrap();
    let parsed = cairn_formats::CairnFile::parse(&bytes).unwrap();
    let victim = parsed.tensors.iter().find(|t| t.name == "blk.1.ffn_up.weight").unwrap().clone();
    drop(parsed);

    let err = |b: Vec<u8>| -> String {
        match ModelFile::from_bytes("bad.cairn", b) {
            Err(e) => e.to_string(),
            Ok(f) => match model::load(&f, CpuBackend::new(1).unwrap()) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("corrupt file loaded"),
            },
        }
    };
    let mut flipped = bytes.clone();
    flipped[(victim.offset + victim.size / 3) as usize] ^= 1;
    let e = err(flipped);
    assert!(e.contains("blk.1.ffn_up.weight") && e.contains("checksum"), "{e}");

    for cut in [10, 127, 200, bytes.len() / 2, bytes.len() - 1] {
        let e = err(bytes[..cut].to_vec());
        assert!(e.contains("truncated") || e.contains("header"), "cut at {cut}: {e}");
    }
    let mut meta = bytes.clone();
    meta[140] ^= 0x40;
    assert!(err(meta).contains("metadata section"), "metadata flip not named");
}

/// Loading a `.cairn` touches no more than loading the GGUF it came from: the same
/// tensors, verified once each (a functional check; timings are in `cairn bench`).
#[test]
fn cairn_load_verifies_each_tensor_it_maps() {
    let cfg = SyntheticConfig::default();
    let src = ModelFile::from_bytes("synthetic.gguf", llama_gguf(&cfg, 5).unwrap()).unwrap();
    let file = converted(&src, Quant::F16);
    assert_eq!(file.tensors.len(), src.tensors.len());
    for (a, b) in file.tensors.iter().zip(&src.tensors) {
        assert_eq!((&a.name, &a.dims), (&b.name, &b.dims));
        file.tensor(&a.name, &a.dims).unwrap();
    }
}
