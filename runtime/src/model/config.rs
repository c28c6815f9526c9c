//! Hyper-parameters read from a model file's metadata.

use super::PREFILL_CHUNK;
use crate::bitstack::Footprint;
use crate::error::{Error, Result};
use crate::weights::ModelFile;

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: String,
    pub n_layers: usize,
    pub dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_dim: usize,
    pub vocab: usize,
    pub context: usize,
    pub rope_base: f32,
    pub norm_eps: f32,
}

impl ModelConfig {
    pub fn from_file(file: &ModelFile) -> Result<Self> {
        let path = file.path.display().to_string();
        let arch = file
            .meta("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::model(format!("{path}: no general.architecture in the metadata")))?
            .to_string();
        let int = |key: &str| -> Result<usize> {
            let full = format!("{arch}.{key}");
            file.meta(&full)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| Error::model(format!("{path}: metadata {full} is missing or not an integer")))
        };
        let float = |key: &str, default: f64| -> f32 {
            file.meta(&format!("{arch}.{key}")).and_then(|v| v.as_f64()).unwrap_or(default) as f32
        };
        let n_layers = int("block_count")?;
        let dim = int("embedding_length")?;
        let n_heads = int("attention.head_count")?;
        let n_kv_heads = int("attention.head_count_kv").unwrap_or(n_heads);
        let head_dim = int("attention.key_length").unwrap_or(dim.checked_div(n_heads).unwrap_or(0));
        let ffn_dim = int("feed_forward_length")?;
        let context = int("context_length")?;
        let vocab =
            file.tensor_info("token_embd.weight")
                .and_then(|t| t.dims.get(1).copied())
                .ok_or_else(|| Error::model(format!("{path}: missing tensor token_embd.weight")))? as usize;
        let c = ModelConfig {
            rope_base: float("rope.freq_base", 10000.0),
            norm_eps: float("attention.layer_norm_rms_epsilon", 1e-5),
            arch,
            n_layers,
            dim,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_dim,
            vocab,
            context,
        };
        c.validate(&path)?;
        Ok(c)
    }

    fn validate(&self, path: &str) -> Result<()> {
        let bad = |m: String| Err(Error::model(format!("{path}: {m}")));
        if self.n_layers == 0 || self.dim == 0 || self.n_heads == 0 || self.head_dim == 0 || self.ffn_dim == 0 {
            return bad(format!("degenerate hyper-parameters {self:?}"));
        }
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!("{} query heads cannot share {} KV heads", self.n_heads, self.n_kv_heads));
        }
        // Every KV-head count divides this one, so no product of heads and head size the
        // model computes can overflow once this does not.
        if self.n_heads.checked_mul(self.head_dim).is_none() {
            return bad(format!("{} heads of dimension {} overflow", self.n_heads, self.head_dim));
        }
        if self.head_dim > 512 {
            return bad(format!("head dimension {} is larger than the 512 Cairn supports", self.head_dim));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head dimension {} is odd: RoPE needs pairs", self.head_dim));
        }
        if self.context == 0 || self.vocab == 0 {
            return bad("zero context length or vocabulary".into());
        }
        Ok(())
    }
}

impl Footprint for ModelConfig {
    fn kv_bytes(&self, ctx: usize) -> usize {
        2 * self.n_layers * self.n_kv_heads * self.head_dim * ctx * 2
    }

    fn scratch_bytes(&self) -> usize {
        // Activations of a prefill chunk, the logits of one scoring pass, and slack.
        PREFILL_CHUNK * (6 * self.dim + 3 * self.ffn_dim) * 4
            + super::logit_rows(self.vocab) * self.vocab * 4
            + (4 << 20)
    }
}
