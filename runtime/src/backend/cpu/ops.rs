//! Element-wise and per-row operations.

use crate::backend::RopeStyle;

pub fn rms_norm(row: &mut [f32], w: &[f32], eps: f32) {
    let ss: f32 = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    let inv = 1.0 / (ss + eps).sqrt();
    row.iter_mut().zip(w).for_each(|(v, w)| *v *= inv * w);
}

/// The (cos, sin) of every pair of a head at position `pos`. Angles follow ggml: the
/// frequency of pair i is base^(-2i/d).
pub fn rope_angles(head_dim: usize, pos: usize, base: f32, cs: &mut [(f32, f32)]) {
    for (i, c) in cs.iter_mut().enumerate() {
        let theta = pos as f64 * (base as f64).powf(-2.0 * i as f64 / head_dim as f64);
        let (sin, cos) = theta.sin_cos();
        *c = (cos as f32, sin as f32);
    }
}

/// Rotate every head of one row by the angles of its position ([`rope_angles`]).
pub fn rope_apply(row: &mut [f32], head_dim: usize, cs: &[(f32, f32)], style: RopeStyle) {
    let half = head_dim / 2;
    for head in row.chunks_mut(head_dim) {
        for (i, &(cos, sin)) in cs.iter().enumerate() {
            let (a, b) = match style {
                RopeStyle::Adjacent => (2 * i, 2 * i + 1),
                RopeStyle::Halves => (i, i + half),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos - x1 * sin;
            head[b] = x0 * sin + x1 * cos;
        }
    }
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU, tanh approximation (what ggml computes).
pub fn gelu(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x)).tanh())
}
