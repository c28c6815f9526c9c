//! Several sequences in one forward pass (`Runner::forward_batch`) against each
//! sequence run alone: random batch compositions on synthetic llama and Gemma models,
//! and a mixed batch (one prefill chunk beside decode tokens) on the default model.

mod common;

use common::max_rel_diff;
use proptest::prelude::*;

use cairn::backend::cpu::CpuBackend;
use cairn::model::{self, KvState, Logits, Runner, Segment};
use cairn::synthetic::{gemma3_gguf, llama_gguf, SplitMix, SyntheticConfig};
use cairn::weights::ModelFile;
use cairn_formats::GgmlType;

/// One sequence of a batch: tokens already cached, tokens of this pass, logits wanted.
#[derive(Debug, Clone)]
struct Seq {
    prefix: Vec<u32>,
    new: Vec<u32>,
    logits: Option<Logits>,
}

fn rows_of(want: Option<Logits>, n: usize) -> usize {
    match want {
        None => 0,
        Some(Logits::Last) => 1,
        Some(Logits::All) => n,
    }
}

fn cache_with(runner: &dyn Runner, prefix: &[u32], capacity: usize) -> Box<dyn KvState> {
    let mut cache = runner.new_cache(capacity).unwrap();
    if !prefix.is_empty() {
        runner.forward(cache.as_mut(), prefix, Logits::Last).unwrap();
    }
    cache
}

/// Each sequence alone: its logits for the new tokens, and for one more token after.
fn alone(runner: &dyn Runner, s: &Seq, capacity: usize, next: u32) -> (Vec<f32>, Vec<f32>) {
    let mut cache = cache_with(runner, &s.prefix, capacity);
    let all = runner.forward(cache.as_mut(), &s.new, Logits::All).unwrap();
    let vocab = runner.config().vocab;
    let n = s.new.len();
    let logits = match s.logits {
        None => Vec::new(),
        Some(Logits::Last) => all[(n - 1) * vocab..].to_vec(),
        Some(Logits::All) => all,
    };
    let after = runner.forward(cache.as_mut(), &[next], Logits::Last).unwrap();
    (logits, after)
}

/// The batch in one pass, then one more token per sequence in a second batch (the caches
/// must have grown exactly as alone); returns the largest relative difference.
fn batch_vs_alone(runner: &dyn Runner, seqs: &[Seq], capacity: usize) -> f32 {
    let vocab = runner.config().vocab;
    let mut caches: Vec<_> = seqs.iter().map(|s| cache_with(runner, &s.prefix, capacity)).collect();
    let mut batch: Vec<Segment> = caches
        .iter_mut()
        .zip(seqs)
        .map(|(c, s)| Segment { cache: c.as_mut(), ids: &s.new, logits: s.logits })
        .collect();
    let got = runner.forward_batch(&mut batch).unwrap();
    assert_eq!(got.len(), seqs.len());
    let next: Vec<[u32; 1]> = seqs.iter().enumerate().map(|(i, _)| [(i as u32 * 7 + 3) % vocab as u32]).collect();
    let mut step: Vec<Segment> = caches
        .iter_mut()
        .zip(&next)
        .map(|(c, id)| Segment { cache: c.as_mut(), ids: id, logits: Some(Logits::Last) })
        .collect();
    let after = runner.forward_batch(&mut step).unwrap();
    let mut worst = 0f32;
    for (i, s) in seqs.iter().enumerate() {
        assert_eq!(got[i].len(), rows_of(s.logits, s.new.len()) * vocab, "sequence {i}: logits of the wrong size");
        let (want, want_after) = alone(runner, s, capacity, next[i][0]);
        for (g, w) in got[i].chunks(vocab).zip(want.chunks(vocab)) {
            worst = worst.max(max_rel_diff(g, w));
        }
        worst = worst.max(max_rel_diff(&after[i], &want_after));
        assert_eq!(caches[i].len(), s.prefix.len() + s.new.len() + 1, "sequence {i}: cache length");
    }
    worst
}

fn llama(matrix: GgmlType, seed: u64) -> ModelFile {
    let c = SyntheticConfig { matrix_type: matrix, embed_type: GgmlType::Q8_0, ..SyntheticConfig::default() };
    ModelFile::from_bytes("batch.gguf", llama_gguf(&c, seed).unwrap()).unwrap()
}

fn gemma(window: usize, seed: u64) -> ModelFile {
    let c = SyntheticConfig { n_layers: 7, n_kv_heads: 1, ..SyntheticConfig::default() };
    ModelFile::from_bytes("batch-gemma.gguf", gemma3_gguf(&c, window, seed).unwrap()).unwrap()
}

/// A random batch: 1-6 sequences, each with 0-40 cached tokens and 1-24 new ones (most
/// new segments are single decode tokens), any logits choice.
fn compose(seed: u64, vocab: u32) -> Vec<Seq> {
    let mut r = SplitMix(seed);
    let n = 1 + (r.next_u64() % 6) as usize;
    (0..n)
        .map(|_| {
            let prefix_len = (r.next_u64() % 41) as usize;
            let new_len = if r.next_u64() % 3 == 0 { 1 + (r.next_u64() % 24) as usize } else { 1 };
            let logits = match r.next_u64() % 4 {
                0 => None,
                1 => Some(Logits::All),
                _ => Some(Logits::Last),
            };
            let mut tok = || (r.next_u64() % vocab as u64) as u32;
            Seq { prefix: (0..prefix_len).map(|_| tok()).collect(), new: (0..new_len).map(|_| tok()).collect(), logits }
        })
        .collect()
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
