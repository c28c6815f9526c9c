//! The CUDA backend end to end against the CPU backend: small synthetic models
//! (llama with Q4_1/Q8_0 weights, FineQuant, BitStack under live budget changes, gemma3
//! with its sliding window), batches against sequences alone, and the in-place weight
//! path. Everything runs on the host emulator (the `.cu` sources compiled as C++ by
//! g++), and also on a real device when one is present; CAIRN_REQUIRE_CUDA=1 makes a
//! missing device a failure. On a real device SmolLM2 also runs the reference sequences.
//! Kernel-level checks of every op and storage type are in `cuda_kernels.rs`.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::max_rel_diff;
use common::stack::{logits, small_model, stacked};

use cairn::backend::cpu::CpuBackend;
use cairn::backend::cuda::device::Device;
use cairn::backend::cuda::emu::EmuDevice;
use cairn::backend::cuda::CudaBackend;
use cairn::backend::Backend;
use cairn::bitstack::apply_budget;
use cairn::convert::{self, Quant};
use cairn::model::{self, Logits};
use cairn::synthetic::{llama_gguf, SyntheticConfig};
use cairn::weights::ModelFile;
use cairn_formats::GgmlType;

/// Small models: largest logit difference relative to the largest logit, against the
/// CPU's f32 path (the cache and attention weights are f16 on both; decode activations
/// are 8-bit on the CUDA side, as on the CPU's integer path).
const SMALL_MODEL_TOL: f32 = 2e-2;
/// Batches against sequences alone: a lone decode row runs the 8-bit dp4a matvec, the
/// same row inside a batch the f32 tiled matmul, so they differ by the activations'
/// 8-bit rounding (a slip in splitting or joining the batch would be of order one).
const BATCH_TOL: f32 = 2e-2;

fn emu_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/cuda-emu")
}

/// The emulated device, or `None` (with a message) where g++ is missing.
fn emulator() -> Option<Arc<dyn Device>> {
    match EmuDevice::new(&emu_dir()) {
        Ok(d) => Some(Arc::new(d)),
        Err(e) => {
            assert!(std::env::var("CAIRN_REQUIRE_TOOLS").as_deref() != Ok("1"), "no CUDA emulator: {e}");
            eprintln!("skipping the emulated CUDA backend: {e}");
            None
        }
    }
}

/// The real device, when there is one.
fn real() -> Option<CudaBackend> {
    match CudaBackend::new() {
        Ok(b) => Some(b),
        Err(e) => {
            assert!(std::env::var("CAIRN_REQUIRE_CUDA").as_deref() != Ok("1"), "CAIRN_REQUIRE_CUDA=1 but {e}");
            None
        }
    }
}

/// Every CUDA backend to test, each with its name: the emulator and the real device.
fn backends() -> Vec<(String, CudaBackend)> {
    let mut v = Vec::new();
    if let Some(d) = emulator() {
        v.push(("emulator".to_string(), CudaBackend::on(d)));
    }
    if let Some(b) = real() {
        v.push((b.name(), b));
    }
    v
}

fn cpu_ref() -> CpuBackend {
    CpuBackend::reference(2).unwrap()
}

fn check_model(file: &ModelFile, ids: &[u32], what: &str) {
    let want = logits(model::load(file, cpu_ref()).unwrap().as_ref(), ids);
    for (name, b) in backends() {
        let got = logits(model::load(file, b).unwrap().as_ref(), ids);
        let d = max_rel_diff(&got, &want);
        eprintln!("{what} on {name}: largest relative logit difference {d:.2e}");
        assert!(d < SMALL_MODEL_TOL, "{what} on {name}: relative difference {d}");
    }
}

/// A llama model with Q4_1 matrices and a Q8_0 embedding: prefill then decode steps
/// (matmul and the dp4a matvecs, the cache across calls).
#[test]
fn llama_model_matches_the_cpu() {
    let c = SyntheticConfig { matrix_type: GgmlType::Q4_1, embed_type: GgmlType::Q8_0, ..SyntheticConfig::default() };
    let file = ModelFile::from_bytes("q.gguf", llama_gguf(&c, 3).unwrap()).unwrap();
    let ids: Vec<u32> = (0..9).map(|i| (i * 13 % 90) as u32).collect();
    let cpu = model::load(&file, cpu_ref()).unwrap();
    let mut cc = cpu.new_cache(ids.len()).unwrap();
    let want = cpu.forward(cc.as_mut(), &ids, Logits::All).unwrap();
    for (name, b) in backends() {
        let r = model::load(&file, b).unwrap();
        let mut gc = r.new_cache(ids.len()).unwrap();
        let mut got = r.forward(gc.as_mut(), &ids[..5], Logits::All).unwrap();
        for &id in &ids[5..] {
            got.extend(r.forward(gc.as_mut(), &[id], Logits::Last).unwrap());
        }
        let d = max_rel_diff(&got, &want);
        eprintln!("llama Q4_1 on {name}: prefill + decode, largest relative logit difference {d:.2e}");
        assert!(d < SMALL_MODEL_TOL, "{name}: relative difference {d}");
    }
}

/// FineQuant int4/g64, int8/g128 and RTN int3/g32 (rows of 96 and 160 values: short
/// last groups).
#[test]
fn fine_model_matches_the_cpu() {
    let cfg = SyntheticConfig { dim: 96, n_heads: 4, n_kv_heads: 2, ffn_dim: 160, ..Default::default() };
    let src = ModelFile::from_bytes("s.gguf", llama_gguf(&cfg, 5).unwrap()).unwrap();
    let ids: Vec<u32> = (0..11).map(|i| (i * 7 % 90) as u32).collect();
    for q in
        [Quant::Fine { bits: 4, group: 64 }, Quant::Fine { bits: 8, group: 128 }, Quant::Rtn { bits: 3, group: 32 }]
    {
        let bytes = convert::convert(&src, q, &[], |_, _| {}, |_| {}).unwrap();
        let file = ModelFile::from_bytes("s.cairn", bytes).unwrap();
        check_model(&file, &ids, &q.label());
    }
}

/// A small gemma3 model (local layers with a window of 8) over 40 positions: the ring
/// and the window mask.
#[test]
fn gemma_window_model_matches_the_cpu() {
    let cfg = SyntheticConfig { n_layers: 3, context: 256, ..Default::default() };
    let file = ModelFile::from_bytes("g.gguf", cairn::synthetic::gemma3_gguf(&cfg, 8, 9).unwrap()).unwrap();
    let ids: Vec<u32> = (0..40).map(|i| (i * 11 % 90) as u32).collect();
    check_model(&file, &ids, "gemma3 window 8");
}

/// A BitStack model while its budget grows and shrinks: joining blocks are uploaded,
/// leaving ones freed, without a reload.
#[test]
fn bitstack_model_follows_its_budget() {
    let a = stacked(&small_model(), 3);
    let stack = a.stack.as_ref().unwrap();
    let cpu = model::load(&a, CpuBackend::reference(1).unwrap()).unwrap();
    for (name, b) in backends() {
        let gpu = model::load(&a, b).unwrap();
        let cfg = gpu.config().clone();
        let (dense, kv, scratch) = cairn::bitstack::fixed_bytes(&a, &cfg, 64);
        let t = &stack.table;
        let small = dense + kv + scratch + t.prefix_bytes(t.min_prefix() + 5);
        let big = dense + kv + scratch + t.prefix_bytes(t.entries.len());
        let ids: Vec<u32> = (0..12).map(|i| (i * 5 % 90) as u32).collect();
        let mut seen = Vec::new();
        for budget in [small, big, small] {
            apply_budget(&a, &cfg, 64, 0, budget).unwrap();
            let (got, want) = (logits(gpu.as_ref(), &ids), logits(cpu.as_ref(), &ids));
            let d = max_rel_diff(&got, &want);
            eprintln!("BitStack at {budget} bytes on {name}: largest relative logit difference {d:.2e}");
            assert!(d < SMALL_MODEL_TOL, "{name}, budget {budget}: relative difference {d}");
            seen.push(got);
        }
        assert_ne!(seen[0], seen[1], "more blocks change the model");
        assert_eq!(seen[0], seen[2], "shrinking back gives the first budget's logits");
    }
}

/// Several sequences in one pass (rows split for attention and joined again by
/// `concat`) equal each sequence alone.
#[test]
fn batches_equal_sequences_alone() {
    let c = SyntheticConfig { matrix_type: GgmlType::Q4_1, embed_type: GgmlType::Q8_0, ..SyntheticConfig::default() };
    let file = ModelFile::from_bytes("batch.gguf", llama_gguf(&c, 21).unwrap()).unwrap();
    for (name, b) in backends() {
        let runner = model::load(&file, b).unwrap();
        for seed in 0..2 {
            let worst = common::batch::batch_vs_alone(runner.as_ref(), &common::batch::compose(seed, 96), 128);
            assert!(worst < BATCH_TOL, "{name}, batch {seed}: max relative difference {worst}");
        }
    }
}

/// Errors, not panics: a token outside the vocabulary, a cache past its capacity, a
/// weight type without kernels.
#[test]
fn bad_input_is_an_error() {
    let c = SyntheticConfig::default();
    let file = ModelFile::from_bytes("e.gguf", llama_gguf(&c, 4).unwrap()).unwrap();
    for (name, b) in backends() {
        let r = model::load(&file, b).unwrap();
        let mut cache = r.new_cache(4).unwrap();
        let e = r.forward(cache.as_mut(), &[100_000], Logits::Last).expect_err("id outside the vocabulary");
        assert!(e.to_string().contains("vocabulary"), "{name}: {e}");
        let e = r.forward(cache.as_mut(), &[1, 2, 3, 4, 5], Logits::Last).expect_err("past the context");
        assert!(e.to_string().contains("context"), "{name}: {e}");
    }
}

/// On a real device only: SmolLM2 on llama.cpp's reference sequences, top-1 wherever
/// llama.cpp's margin exceeds 0.25.
#[test]
fn smollm2_reference_top1_on_a_device() {
    let Some(b) = real() else {
        eprintln!("skipping: no CUDA device");
        return;
    };
    let r = common::reference();
    let file = ModelFile::open(&common::model_path()).unwrap();
    let runner = model::load(&file, b).unwrap();
    let (mut firm, mut agree) = (0, 0);
    for s in r["sequences"].as_array().unwrap() {
        let prompt = common::ids(&s["prompt_ids"]);
        let greedy = common::ids(&s["greedy_ids"]);
        let all: Vec<u32> = prompt.iter().chain(&greedy).copied().collect();
        let mut cache = runner.new_cache(all.len()).unwrap();
        let got = runner.forward(cache.as_mut(), &all, Logits::All).unwrap();
        let vocab = got.len() / all.len();
        let tops = s["top5_per_position"].as_array().unwrap();
        for (pos, t) in tops.iter().enumerate().take(all.len()) {
            let want = common::top5(t);
            if want.len() < 2 || want[0].1 - want[1].1 <= 0.25 {
                continue;
            }
            let row = &got[pos * vocab..][..vocab];
            let top = (0..vocab).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as u32;
            firm += 1;
            agree += usize::from(top == want[0].0);
        }
    }
    eprintln!("SmolLM2 on the device: top-1 agrees at {agree} of {firm} firm positions");
    assert_eq!(agree, firm, "top-1 must agree wherever llama.cpp's margin exceeds 0.25");
}
