//! The llama architecture (SmolLM2, Llama 2/3, TinyLlama, ...): pre-norm blocks of
//! grouped-query attention with adjacent-pair RoPE and a SwiGLU feed-forward.

use super::blocks::{Architecture, At, Attention, AttnSpec, FeedForward, Gate, Loader, Probe, Seg, Transformer};
use super::ModelConfig;
use crate::backend::{Backend, RopeStyle};
use crate::error::Result;

/// The llama model: shared embedding and head, these layers.
pub type Llama<B> = Transformer<B, LlamaLayers<B>>;

struct Layer<B: Backend> {
    attn_norm: B::Weight,
    attn: Attention<B>,
    ffn_norm: B::Weight,
    ffn: FeedForward<B>,
}

pub struct LlamaLayers<B: Backend>(Vec<Layer<B>>);

impl<B: Backend> Architecture<B> for LlamaLayers<B> {
    fn load(l: &Loader<'_, B>, c: &ModelConfig) -> Result<Self> {
        let d = c.dim as u64;
        // Not `with_capacity(n_layers)`: the count comes from the file, and a corrupt one
        // must fail on its first missing tensor, not on a huge allocation.
        let mut layers = Vec::new();
        for i in 0..c.n_layers {
            layers.push(Layer {
                attn_norm: l.weight(&format!("blk.{i}.attn_norm.weight"), &[d])?,
                attn: Attention::load(l, c, i, false)?,
                ffn_norm: l.weight(&format!("blk.{i}.ffn_norm.weight"), &[d])?,
                ffn: FeedForward::load(l, c, i, Gate::Silu)?,
            });
        }
        Ok(LlamaLayers(layers))
    }

    fn layers(
        &self,
        be: &B,
        c: &ModelConfig,
        x: &mut B::Tensor,
        segs: &mut [Seg<'_, B>],
        probe: &mut Probe,
    ) -> Result<()> {
        let spec = AttnSpec {
            rope_base: c.rope_base,
            rope_style: RopeStyle::Adjacent,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            window: None,
        };
        for (i, layer) in self.0.iter().enumerate() {
            if probe.stops_before(i) {
                break;
            }
            let at = At { layer: i, spec: &spec };
            let h = be.rms_norm(x, &layer.attn_norm, c.norm_eps);
            // None: the probe stops at this layer once its keys are cached.
            let Some(a) = layer.attn.forward(be, c, at, &h, segs, probe)? else { break };
            be.add_assign(x, &a);
            let h = be.rms_norm(x, &layer.ffn_norm, c.norm_eps);
            be.add_assign(x, &layer.ffn.forward(be, &h)?);
        }
        Ok(())
    }
}
