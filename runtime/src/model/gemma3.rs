//! The gemma3 architecture (Gemma-3-270M, ...), as llama.cpp defines it: the embedding
//! scaled by √dim; per-head RMSNorm of q and k before RoPE over the two halves of each
//! head; five sliding-window (local) layers with RoPE base 10 000 for every global one
//! with the model's base; norms after attention and after the feed-forward block as well
//! as before; a GELU-gated feed-forward; tied embeddings.

use super::blocks::{Architecture, At, Attention, AttnSpec, FeedForward, Gate, Loader, Probe, Seg, Transformer};
use super::ModelConfig;
use crate::backend::{Backend, RopeStyle};
use crate::error::Result;

/// Every sixth layer attends globally; the others see a sliding window.
const GLOBAL_EVERY: usize = 6;
/// RoPE base of the local layers (llama.cpp: `rope_freq_base_train_swa`).
const LOCAL_ROPE_BASE: f32 = 10_000.0;

/// The gemma3 model: shared embedding and head, these layers.
pub type Gemma3<B> = Transformer<B, Gemma3Layers<B>>;

struct Layer<B: Backend> {
    attn_norm: B::Weight,
    attn: Attention<B>,
    post_attn_norm: B::Weight,
    ffn_norm: B::Weight,
    ffn: FeedForward<B>,
    post_ffn_norm: B::Weight,
}

pub struct Gemma3Layers<B: Backend> {
    layers: Vec<Layer<B>>,
    /// Positions a local layer sees (`gemma3.attention.sliding_window`).
    window: usize,
}

impl<B: Backend> Gemma3Layers<B> {
    fn spec(&self, c: &ModelConfig, layer: usize) -> AttnSpec {
        let global = (layer + 1).is_multiple_of(GLOBAL_EVERY);
        AttnSpec {
            rope_base: if global { c.rope_base } else { LOCAL_ROPE_BASE },
            rope_style: RopeStyle::Halves,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            window: (!global).then_some(self.window),
        }
    }
}

impl<B: Backend> Architecture<B> for Gemma3Layers<B> {
    fn load(l: &Loader<'_, B>, c: &ModelConfig) -> Result<Self> {
        let d = c.dim as u64;
        let window = l.file.meta("gemma3.attention.sliding_window").and_then(|v| v.as_u64()).unwrap_or(512) as usize;
        let mut layers = Vec::new();
        for i in 0..c.n_layers {
            let norm = |s: &str| l.weight(&format!("blk.{i}.{s}.weight"), &[d]);
            layers.push(Layer {
                attn_norm: norm("attn_norm")?,
                attn: Attention::load(l, c, i, true)?,
                post_attn_norm: norm("post_attention_norm")?,
                ffn_norm: norm("ffn_norm")?,
                ffn: FeedForward::load(l, c, i, Gate::Gelu)?,
                post_ffn_norm: norm("post_ffw_norm")?,
            });
        }
        Ok(Gemma3Layers { layers, window: window.max(1) })
    }

    fn global_attention(&self) -> bool {
        false
    }

    fn embed_scale(&self, c: &ModelConfig) -> f32 {
        (c.dim as f32).sqrt()
    }

    fn layers(
        &self,
        be: &B,
        c: &ModelConfig,
        x: &mut B::Tensor,
        segs: &mut [Seg<'_, B>],
        probe: &mut Probe,
    ) -> Result<()> {
        for (i, layer) in self.layers.iter().enumerate() {
            if probe.stops_before(i) {
                break;
            }
            let spec = self.spec(c, i);
            let at = At { layer: i, spec: &spec };
            let h = be.rms_norm(x, &layer.attn_norm, c.norm_eps);
            // None: the probe stops at this layer once its keys are cached.
            let Some(a) = layer.attn.forward(be, c, at, &h, segs, probe)? else { break };
            be.add_assign(x, &be.rms_norm(&a, &layer.post_attn_norm, c.norm_eps));
            let h = be.rms_norm(x, &layer.ffn_norm, c.norm_eps);
            let f = layer.ffn.forward(be, &h)?;
            be.add_assign(x, &be.rms_norm(&f, &layer.post_ffn_norm, c.norm_eps));
        }
        Ok(())
    }
}
