//! Model definitions: one per architecture, each written once against [`Backend`].

pub mod blocks;
pub mod config;
pub mod gemma3;
pub mod llama;

use std::any::Any;

pub use blocks::Probe;
pub use config::ModelConfig;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::weights::ModelFile;

/// Tokens evaluated per forward pass during prefill: bounds the activation memory of
/// long prompts while keeping the matmuls wide.
pub const PREFILL_CHUNK: usize = 512;

/// How many of `remaining` prompt tokens the next prefill pass takes: at most `max`, but
/// never leaving a single token for a pass of its own. A one-row pass takes the decode
/// attention path, whose float sums run in another order than the batched path's, so
/// the same prompt would get slightly different logits depending on where its chunks
/// fall (enough to flip a greedy token at a near tie). Every row of a pass of two or
/// more comes out the same whatever the rest of the pass is.
pub fn prefill_take(remaining: usize, max: usize) -> usize {
    let n = remaining.min(max);
    if remaining - n == 1 && n > 2 {
        n - 1
    } else {
        n
    }
}

/// `ids` in prefill passes of at most [`PREFILL_CHUNK`] tokens, cut by [`prefill_take`].
pub fn prefill_chunks(ids: &[u32]) -> impl Iterator<Item = &[u32]> {
    let mut rest = ids;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (chunk, tail) = rest.split_at(prefill_take(rest.len(), PREFILL_CHUNK));
        rest = tail;
        Some(chunk)
    })
}

/// Bytes of logits a pass over every position may hold: scoring a window runs its
/// tokens in chunks of [`logit_rows`], so that all-position logits (512 × 49152 floats,
/// 100 MB, for a SmolLM2 window) are never held at once, and the memory plan counts
/// this much (`Footprint::scratch_bytes`).
pub const LOGIT_BYTES: usize = 4 << 20;

/// Positions per pass when every position's logits are wanted (at least 8, so that
/// the matmuls stay batched even for a vocabulary of 262k).
pub fn logit_rows(vocab: usize) -> usize {
    (LOGIT_BYTES / (vocab.max(1) * 4)).clamp(8, PREFILL_CHUNK)
}

/// Which logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only for the last token (generation).
    Last,
    /// For every token of the batch (evaluation, perplexity).
    All,
}

/// The state of one sequence: its KV cache. Boxed behind a trait so that a context can
/// hold the cache of whatever model and backend it runs.
pub trait KvState: Send {
    /// Positions cached.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn capacity(&self) -> usize;
    /// Forget every position from `len` on (e.g. to reuse a common chat prefix);
    /// returns how many positions remain, which is less than `len` when a
    /// sliding-window layer has already dropped some of them.
    fn truncate(&mut self, len: usize) -> usize;
    /// The position the next token takes: `len()`, unless evicted rows moved it on.
    fn position(&self) -> usize;
    fn as_any_mut(&mut self) -> &mut dyn Any;
    fn as_any(&self) -> &dyn Any;
}

/// One sequence's part of a batched forward pass: its cache, the tokens that follow
/// what the cache holds, and which logits to return (`None`: a prefill chunk that is
/// not the prompt's last).
pub struct Segment<'a> {
    pub cache: &'a mut dyn KvState,
    pub ids: &'a [u32],
    pub logits: Option<Logits>,
}

/// A loaded model, backend and architecture erased.
pub trait Runner: Send + Sync {
    fn config(&self) -> &ModelConfig;
    fn backend_name(&self) -> String;
    /// A fresh cache for up to `capacity` positions (at most the model's context).
    fn new_cache(&self, capacity: usize) -> Result<Box<dyn KvState>>;
    /// Run `ids` at the positions following what `cache` holds, append them to it and
    /// return logits, `vocab` values per returned row.
    fn forward(&self, cache: &mut dyn KvState, ids: &[u32], logits: Logits) -> Result<Vec<f32>> {
        self.forward_probe(cache, ids, logits, &mut Probe::default())
    }
    /// Several sequences in one pass: every linear layer runs once over the rows of all
    /// segments (the weights are read once for the whole batch), attention per segment
    /// over its own cache. Returns each segment's logits (empty where none were asked
    /// for). Every segment is checked before anything runs; a failed pass leaves every
    /// cache as it was.
    fn forward_batch(&self, batch: &mut [Segment<'_>]) -> Result<Vec<Vec<f32>>>;
    /// A cache for only the first `n_layers` layers (GemFilter's first pass).
    fn new_partial_cache(&self, capacity: usize, n_layers: usize) -> Result<Box<dyn KvState>>;
    /// [`Runner::forward`] with hooks: stop after a layer (then no logits), record
    /// queries, accumulate attention weights.
    fn forward_probe(
        &self,
        cache: &mut dyn KvState,
        ids: &[u32],
        logits: Logits,
        probe: &mut Probe,
    ) -> Result<Vec<f32>>;
    /// The cached post-RoPE keys of `layer`, `[row][n_kv_heads · head_dim]`.
    fn layer_keys(&self, cache: &mut dyn KvState, layer: usize) -> Result<Vec<f32>>;
    /// A new cache holding, for every layer and KV head, only the rows `keep[layer][head]`
    /// (ascending, as many for every head); new tokens continue at the old positions.
    fn compact(&self, cache: &mut dyn KvState, keep: &[Vec<Vec<usize>>]) -> Result<Box<dyn KvState>>;
}

/// Architectures [`load`] can build.
const SUPPORTED_ARCHS: &[&str] = &["llama", "gemma3"];

/// Build the model described by `file` on `backend`.
pub fn load<B: Backend + 'static>(file: &ModelFile, backend: B) -> Result<Box<dyn Runner>> {
    // The architecture is checked before the hyper-parameters, so that an unknown one is
    // reported as such rather than as the `<arch>.*` keys it lacks.
    let config = match file.meta("general.architecture").and_then(|v| v.as_str()) {
        Some(arch) if !SUPPORTED_ARCHS.contains(&arch) => return Err(unsupported_arch(file, arch)),
        _ => ModelConfig::from_file(file)?,
    };
    match config.arch.as_str() {
        "llama" => Ok(Box::new(llama::Llama::<B>::load(file, config, backend)?)),
        "gemma3" => Ok(Box::new(gemma3::Gemma3::<B>::load(file, config, backend)?)),
        other => Err(unsupported_arch(file, other)),
    }
}

fn unsupported_arch(file: &ModelFile, arch: &str) -> Error {
    // Quoted with escapes and cut short: the name comes from the file and may be garbage.
    let shown: String = arch.chars().take(64).collect();
    Error::model(format!(
        "{}: architecture {shown:?} is not supported (supported: {})",
        file.path.display(),
        SUPPORTED_ARCHS.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_never_leaves_one_token_alone() {
        assert_eq!(prefill_take(1, 512), 1);
        assert_eq!(prefill_take(7, 512), 7);
        assert_eq!(prefill_take(129, 128), 127);
        assert_eq!(prefill_take(130, 128), 128);
        let ids: Vec<u32> = (0..1025).collect();
        let lens: Vec<usize> = prefill_chunks(&ids).map(<[u32]>::len).collect();
        assert_eq!(lens, [512, 511, 2]);
        let lens: Vec<usize> = prefill_chunks(&ids[..1024]).map(<[u32]>::len).collect();
        assert_eq!(lens, [512, 512]);
        assert_eq!(prefill_chunks(&ids[..1]).count(), 1);
        assert_eq!(prefill_chunks(&[]).count(), 0);
    }
}
