//! Several sequences in one forward pass (`Runner::forward_batch`) against each
//! sequence run alone: random batch compositions on synthetic llama and Gemma models,
//! and a mixed batch (one prefill chunk beside decode tokens) on the default model.

mod common;

use common::batch::{batch_vs_alone, cache_with, compose, Seq};
use proptest::prelude::*;

use cairn::backend::cpu::CpuBackend;
use cairn::model::{self, Logits, Segment};
use cairn::synthetic::{gemma3_gguf, llama_gguf, SyntheticConfig};
use cairn::weights::ModelFile;
use cairn_formats::GgmlType;

fn llama(matrix: GgmlType, seed: u64) -> ModelFile {
    let c = SyntheticConfig { matrix_type: matrix, embed_type: GgmlType::Q8_0, ..SyntheticConfig::default() };
    ModelFile::from_bytes("batch.gguf", llama_gguf(&c, seed).unwrap()).unwrap()
}

fn gemma(window: usize, seed: u64) -> ModelFile {
    let c = SyntheticConfig { n_layers: 7, n_kv_heads: 1, ..SyntheticConfig::default() };
    ModelFile::from_bytes("batch-gemma.gguf", gemma3_gguf(&c, window, seed).unwrap()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// The f32 reference path: a batch equals its sequences alone to 1e-4.
    #[test]
    fn exact_batches_equal_sequences_alone(seed in any::<u64>()) {
        let file = llama(GgmlType::Q4_1, 1);
        let runner = model::load(&file, CpuBackend::reference(2).unwrap()).unwrap();
        let worst = batch_vs_alone(runner.as_ref(), &compose(seed, 96), 128);
        prop_assert!(worst < 1e-4, "max relative difference {worst}");
    }

    /// The integer path: activations are quantized per row, so a row's 8-bit noise does
    /// not depend on its neighbours; only the summation order of the kernels may differ.
    #[test]
    fn integer_batches_equal_sequences_alone(seed in any::<u64>(), q5 in any::<bool>()) {
        let file = llama(if q5 { GgmlType::Q5_0 } else { GgmlType::Q4_1 }, 2);
        let runner = model::load(&file, CpuBackend::new(2).unwrap()).unwrap();
        let worst = batch_vs_alone(runner.as_ref(), &compose(seed, 96), 128);
        prop_assert!(worst < 1e-4, "max relative difference {worst}");
    }

    /// Gemma: sliding-window layers (a window of 8, shorter than many prefixes) and
    /// q/k norms, batched.
    #[test]
    fn gemma_batches_equal_sequences_alone(seed in any::<u64>()) {
        let file = gemma(8, 3);
        let runner = model::load(&file, CpuBackend::reference(2).unwrap()).unwrap();
        let worst = batch_vs_alone(runner.as_ref(), &compose(seed, 96), 128);
        prop_assert!(worst < 1e-4, "max relative difference {worst}");
    }
}

#[test]
fn a_bad_segment_fails_the_batch_and_keeps_every_cache() {
    let file = llama(GgmlType::Q8_0, 4);
    let runner = model::load(&file, CpuBackend::new(2).unwrap()).unwrap();
    let mut a = cache_with(runner.as_ref(), &[1, 2, 3], 16);
    let mut b = cache_with(runner.as_ref(), &[4, 5], 8);
    let long: Vec<u32> = (0..7).collect();
    let mut batch = [
        Segment { cache: a.as_mut(), ids: &[9], logits: Some(Logits::Last) },
        Segment { cache: b.as_mut(), ids: &long, logits: Some(Logits::Last) },
    ];
    let err = runner.forward_batch(&mut batch).unwrap_err().to_string();
    assert!(err.contains("sequence 1") && err.contains("context length 8"), "{err}");
    let mut empty = [Segment { cache: a.as_mut(), ids: &[], logits: None }];
    assert!(runner.forward_batch(&mut empty).is_err());
    assert!(runner.forward_batch(&mut []).is_err());
    // A token outside the vocabulary fails the whole pass after it started.
    let mut bad = [
        Segment { cache: a.as_mut(), ids: &[9], logits: Some(Logits::Last) },
        Segment { cache: b.as_mut(), ids: &[100_000], logits: Some(Logits::Last) },
    ];
    assert!(runner.forward_batch(&mut bad).is_err());
    assert_eq!((a.len(), b.len()), (3, 2), "a failed batch must leave the caches as they were");
}

/// The default model: a prefill chunk of one request beside decode tokens of seven
/// others (cached 5 to 60 tokens), on the exact and the integer path.
#[test]
fn smollm2_mixed_batch_equals_sequences_alone() {
    let file = ModelFile::open(&common::model_path()).unwrap();
    let reference = common::reference();
    let text = common::ids(&reference["sequences"][0]["prompt_ids"]);
    let mut seqs =
        vec![Seq { prefix: Vec::new(), new: text[..40.min(text.len())].to_vec(), logits: Some(Logits::All) }];
    for i in 0..7 {
        let start = (i * 7) % text.len().saturating_sub(1).max(1);
        let prefix: Vec<u32> = text.iter().cycle().skip(start).take(5 + 8 * i).copied().collect();
        seqs.push(Seq { prefix, new: vec![text[(start + 3) % text.len()]], logits: Some(Logits::Last) });
    }
    let exact = model::load(&file, CpuBackend::reference(2).unwrap()).unwrap();
    let worst_exact = batch_vs_alone(exact.as_ref(), &seqs, 256);
    let fast = model::load(&file, CpuBackend::new(2).unwrap()).unwrap();
    let worst_fast = batch_vs_alone(fast.as_ref(), &seqs, 256);
    eprintln!("SmolLM2 mixed batch: max relative difference {worst_exact:e} exact, {worst_fast:e} integer");
    assert!(worst_exact < 1e-4, "exact path: {worst_exact}");
    // The integer path quantizes each row alone, so a batch sees the same 8-bit noise.
    assert!(worst_fast < 1e-3, "integer path: {worst_fast}");
}
