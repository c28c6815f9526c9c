//! Batched forward passes against each sequence alone, shared by the CPU tests
//! (`batch.rs`) and the wgpu ones.

use super::max_rel_diff;
use cairn::model::{KvState, Logits, Runner, Segment};
use cairn::synthetic::SplitMix;

/// One sequence of a batch: tokens already cached, tokens of this pass, logits wanted.
#[derive(Debug, Clone)]
pub struct Seq {
    pub prefix: Vec<u32>,
    pub new: Vec<u32>,
    pub logits: Option<Logits>,
}

fn rows_of(want: Option<Logits>, n: usize) -> usize {
    match want {
        None => 0,
        Some(Logits::Last) => 1,
        Some(Logits::All) => n,
    }
}

pub fn cache_with(runner: &dyn Runner, prefix: &[u32], capacity: usize) -> Box<dyn KvState> {
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
pub fn batch_vs_alone(runner: &dyn Runner, seqs: &[Seq], capacity: usize) -> f32 {
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

/// A random batch: 1-6 sequences, each with 0-40 cached tokens and 1-24 new ones (most
/// new segments are single decode tokens), any logits choice.
pub fn compose(seed: u64, vocab: u32) -> Vec<Seq> {
    let mut r = SplitMix(seed);
    let n = 1 + (r.next_u64() % 6) as usize;
    (0..n)
        .map(|_| {
            let prefix_len = (r.next_u64() % 41) as usize;
            let new_len = if r.next_u64().is_multiple_of(3) { 1 + (r.next_u64() % 24) as usize } else { 1 };
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
