//! Synthetic BitStack models, shared by the CPU tests (`bitstack.rs`) and the wgpu ones.

use std::collections::HashMap;

use cairn::bitstack::build::{self, StackOptions};
use cairn::bitstack::DenseCache;
use cairn::model::{self, Logits};
use cairn::synthetic::{llama_gguf, SyntheticConfig};
use cairn::weights::ModelFile;

/// A small random llama model (64 wide, feed-forward 128).
pub fn small_model() -> ModelFile {
    let cfg = SyntheticConfig { dim: 64, ffn_dim: 128, ..Default::default() };
    ModelFile::from_bytes("synthetic.gguf", llama_gguf(&cfg, 3).unwrap()).unwrap()
}

/// `src` with every linear matrix stacked as `levels` blocks of rank 4, always run from
/// its blocks (no dense copies).
pub fn stacked(src: &ModelFile, levels: usize) -> ModelFile {
    stacked_with(src, levels, DenseCache::Off)
}

/// [`stacked`] with a dense-copy policy.
pub fn stacked_with(src: &ModelFile, levels: usize, cache: DenseCache) -> ModelFile {
    let opts = StackOptions { levels, rank: 4, ..Default::default() };
    let bar = indicatif::ProgressBar::hidden();
    let (bytes, _) = build::build(src, &HashMap::new(), &opts, &[], &bar).unwrap();
    let f = ModelFile::from_bytes("stacked.cairn", bytes).unwrap();
    if let Some(stack) = f.stack.as_ref() {
        stack.set_dense_cache(cache);
    }
    f
}

/// Logits of every position of `ids`: all but the last three as one batch, then three
/// decode steps (so both the batch and the single-token kernels run).
pub fn logits(runner: &dyn model::Runner, ids: &[u32]) -> Vec<f32> {
    let mut cache = runner.new_cache(ids.len()).unwrap();
    let mut out = runner.forward(cache.as_mut(), &ids[..ids.len() - 3], Logits::All).unwrap();
    for &id in &ids[ids.len() - 3..] {
        out.extend(runner.forward(cache.as_mut(), &[id], Logits::Last).unwrap());
    }
    out
}
