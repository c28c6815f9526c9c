//! The MoE² gate (DESIGN §5, step 2): a linear softmax over the experts on a prompt
//! embedding (the smallest local model's, [`Engine::embed`]), trained once on all
//! experts and reused for any subset by masking its output and renormalising.
//!
//! Training minimises the negative log-likelihood per byte of text windows under the
//! gate's mixture. Experts that share a tokenizer (a *group*) are mixed token by token;
//! groups are mixed over the whole window, since their tokens do not line up:
//!
//! p(text) = Σ_G a_G Π_t p_{G,t},  p_{G,t} = Σ_{i∈G} (g_i / a_G) p_{i,t},  a_G = Σ_{i∈G} g_i,
//!
//! so that, with T_G the window's token count under group G's tokenizer,
//!
//! ln p(text) = logsumexp_G [ Σ_t ln Σ_{i∈G} g_i p_{i,t} − (T_G − 1) ln a_G ].
//!
//! The gate also carries a ridge-regression head predicting each expert's bits per byte
//! from the embedding, so that a request gets a loss table for the subset search
//! ([`Gate::expected_loss_table`]) before any expert has run.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::corpus::{Category, Corpus};
use super::MAX_EXPERTS;
use crate::engine::Engine;
use crate::error::{Error, Result};

/// What the gate file says it is, and the version of its layout.
const FORMAT: &str = "cairn-gate";
const VERSION: u32 = 1;

/// One training or evaluation window, as every expert saw it.
#[derive(Debug, Clone)]
pub struct Sample {
    pub category: Category,
    pub held_out: bool,
    /// The embedder's [`Engine::embed`] of the window.
    pub embedding: Vec<f32>,
    /// Per expert, the natural-log probability of each scored token
    /// ([`Engine::score`]); experts of one group have the same token count.
    pub logprobs: Vec<Vec<f32>>,
    /// The window's length in bytes (what the loss is normalised by).
    pub bytes: usize,
}

/// How [`train`] runs: full-batch Adam from a uniform gate for a fixed number of steps,
/// so that the same samples always give the same gate.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub iterations: usize,
    pub learning_rate: f64,
    /// L2 penalty on the gate's weights (not its biases), per weight.
    pub l2: f64,
    /// Ridge penalty of the loss-prediction head.
    pub ridge: f64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions { iterations: 400, learning_rate: 0.05, l2: 1e-3, ridge: 10.0 }
    }
}

/// How training went, kept in the gate file for `route eval` and for people.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainReport {
    pub iterations: usize,
    pub train_windows: usize,
    pub held_out_windows: usize,
    /// The trained gate's bits per byte on the training windows.
    pub train_bits_per_byte: f64,
    /// The same on the held-out windows (`None` without any).
    pub held_out_bits_per_byte: Option<f64>,
    /// Each expert alone on the held-out windows.
    pub held_out_single: Vec<f64>,
    /// The uniform mixture on the held-out windows.
    pub held_out_uniform: Option<f64>,
}

/// A trained gate over N experts on D-dimensional embeddings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    format: String,
    version: u32,
    experts: Vec<String>,
    /// Tokenizer family of each expert (experts of one group mix token by token).
    groups: Vec<usize>,
    dim: usize,
    /// Standardisation of the embedding, from the training windows: z = (e − mean) / std.
    mean: Vec<f64>,
    std: Vec<f64>,
    /// Softmax logits s = weight · z + bias, N × D.
    weight: Vec<Vec<f64>>,
    bias: Vec<f64>,
    /// Predicted bits per byte of each expert: loss_bias + loss_weight · z, N × D.
    loss_weight: Vec<Vec<f64>>,
    loss_bias: Vec<f64>,
    /// Training bytes per token of each expert's tokenizer (for the loss table).
    bytes_per_token: Vec<f64>,
    /// Mean training window length in bytes (for the loss table).
    window_bytes: f64,
    report: TrainReport,
}

/// `ln Σ exp(v)`, −∞ for no (or only −∞) values.
fn log_sum_exp(v: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = v.clone().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + v.map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// The experts of each group, groups in order of first appearance.
fn group_members(groups: &[usize]) -> Vec<Vec<usize>> {
    let mut labels: Vec<usize> = Vec::new();
    let mut members: Vec<Vec<usize>> = Vec::new();
    for (i, &g) in groups.iter().enumerate() {
        match labels.iter().position(|&l| l == g) {
            Some(k) => members[k].push(i),
            None => {
                labels.push(g);
                members.push(vec![i]);
            }
        }
    }
    members
}

/// ln p(text) under the mixture with log-weights `lw` (−∞: weight 0), and, when asked,
/// e_i = g_i ∂ln p/∂g_i for each expert (what the softmax gradient is made of):
/// with r_G = exp(u_G − ln p) the group's share of the window,
/// e_i = r_G [ Σ_t g_i p_{i,t} / Σ_{j∈G} g_j p_{j,t} − (T_G − 1) g_i / a_G ].
// `t` indexes the row of every expert of a group, not one slice.
#[allow(clippy::needless_range_loop)]
fn mixture_ln(lw: &[f64], logprobs: &[Vec<f32>], members: &[Vec<usize>], grad: Option<&mut [f64]>) -> f64 {
    let mut u = Vec::with_capacity(members.len());
    let mut e = vec![0.0f64; lw.len()];
    for g in members {
        let log_a = log_sum_exp(g.iter().map(|&i| lw[i]));
        if log_a == f64::NEG_INFINITY {
            u.push(f64::NEG_INFINITY);
            continue;
        }
        let t_len = logprobs[g[0]].len();
        let mut sum = 0.0;
        for t in 0..t_len {
            let m = log_sum_exp(g.iter().map(|&i| lw[i] + logprobs[i][t] as f64));
            sum += m;
            if grad.is_some() {
                for &i in g {
                    e[i] += (lw[i] + logprobs[i][t] as f64 - m).exp();
                }
            }
        }
        let tm1 = t_len as f64 - 1.0;
        for &i in g {
            e[i] -= tm1 * (lw[i] - log_a).exp();
        }
        u.push(sum - tm1 * log_a);
    }
    let lp = log_sum_exp(u.iter().copied());
    if let Some(grad) = grad {
        for (g, &ug) in members.iter().zip(&u) {
            let r = if lp.is_finite() { (ug - lp).exp() } else { 0.0 };
            for &i in g {
                grad[i] = r * e[i];
            }
        }
    }
    lp
}

/// Checks shared by every entry point that takes per-expert token log-probabilities.
fn check_logprobs(logprobs: &[Vec<f32>], groups: &[usize], what: &str) -> Result<()> {
    let n = groups.len();
    if logprobs.len() != n {
        return Err(Error::input(format!("{what}: log-probabilities of {} experts, {n} expected", logprobs.len())));
    }
    for g in group_members(groups) {
        let t = logprobs[g[0]].len();
        if let Some(&i) = g.iter().find(|&&i| logprobs[i].len() != t) {
            return Err(Error::input(format!(
                "{what}: experts {} and {i} share a tokenizer group but scored {t} and {} tokens",
                g[0],
                logprobs[i].len()
            )));
        }
    }
    if logprobs.iter().flatten().any(|v| !v.is_finite()) {
        return Err(Error::input(format!("{what}: a token log-probability is not finite")));
    }
    Ok(())
}

fn check_groups(groups: &[usize]) -> Result<()> {
    let n = groups.len();
    if n == 0 || n > MAX_EXPERTS {
        return Err(Error::input(format!("a gate needs 1..={MAX_EXPERTS} experts, not {n}")));
    }
    Ok(())
}

/// Standardised embedding.
fn standardise(emb: &[f32], mean: &[f64], std: &[f64]) -> Vec<f64> {
    emb.iter().zip(mean).zip(std).map(|((&e, &m), &s)| (e as f64 - m) / s).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// A window's loss alone under expert i, in bits per byte.
fn single_bits_per_byte(lp: &[f32], bytes: usize) -> f64 {
    -lp.iter().map(|&v| v as f64).sum::<f64>() / (bytes as f64 * std::f64::consts::LN_2)
}

/// The training objective over `z` (standardised embeddings) with parameters `p`
/// (N rows of D weights then the bias), and its gradient: total bits over total bytes,
/// plus l2/2 · Σ weight².
fn objective(p: &[f64], z: &[Vec<f64>], samples: &[&Sample], members: &[Vec<usize>], l2: f64) -> (f64, Vec<f64>) {
    let n = members.iter().map(Vec::len).sum::<usize>();
    let d = z.first().map_or(0, Vec::len);
    let total_bytes: f64 = samples.iter().map(|s| s.bytes as f64).sum();
    let scale = 1.0 / (total_bytes * std::f64::consts::LN_2);
    let mut loss = 0.0;
    let mut grad = vec![0.0f64; p.len()];
    let mut e = vec![0.0f64; n];
    for (zs, s) in z.iter().zip(samples) {
        let logits: Vec<f64> = (0..n).map(|k| dot(&p[k * (d + 1)..k * (d + 1) + d], zs) + p[k * (d + 1) + d]).collect();
        let lse = log_sum_exp(logits.iter().copied());
        let lw: Vec<f64> = logits.iter().map(|s| s - lse).collect();
        let lp = mixture_ln(&lw, &s.logprobs, members, Some(&mut e));
        loss -= lp * scale;
        // ∂(−ln p)/∂s_k = −(e_k − g_k Σ_i e_i).
        let se: f64 = e.iter().sum();
        for k in 0..n {
            let ds = -(e[k] - lw[k].exp() * se) * scale;
            let row = &mut grad[k * (d + 1)..(k + 1) * (d + 1)];
            for (g, &zv) in row[..d].iter_mut().zip(zs) {
                *g += ds * zv;
            }
            row[d] += ds;
        }
    }
    for k in 0..n {
        for j in 0..d {
            let w = p[k * (d + 1) + j];
            loss += 0.5 * l2 * w * w;
            grad[k * (d + 1) + j] += l2 * w;
        }
    }
    (loss, grad)
}

/// Solve (A + λI) X = B for a symmetric positive semi-definite `a` (m × m, row-major)
/// and `cols` right-hand sides `b` (m × cols), by Cholesky.
fn ridge_solve(mut a: Vec<f64>, m: usize, lambda: f64, mut b: Vec<f64>, cols: usize) -> Result<Vec<f64>> {
    for i in 0..m {
        a[i * m + i] += lambda;
    }
    for j in 0..m {
        let mut s = a[j * m + j];
        for k in 0..j {
            s -= a[j * m + k] * a[j * m + k];
        }
        if s.is_nan() || s <= 0.0 {
            return Err(Error::input("the loss head's ridge system is singular (ridge must be > 0)"));
        }
        let l = s.sqrt();
        a[j * m + j] = l;
        for i in j + 1..m {
            let mut s = a[i * m + j];
            for k in 0..j {
                s -= a[i * m + k] * a[j * m + k];
            }
            a[i * m + j] = s / l;
        }
    }
    for c in 0..cols {
        for i in 0..m {
            let mut s = b[i * cols + c];
            for k in 0..i {
                s -= a[i * m + k] * b[k * cols + c];
            }
            b[i * cols + c] = s / a[i * m + i];
        }
        for i in (0..m).rev() {
            let mut s = b[i * cols + c];
            for k in i + 1..m {
                s -= a[k * m + i] * b[k * cols + c];
            }
            b[i * cols + c] = s / a[i * m + i];
        }
    }
    Ok(b)
}

/// Ridge regression of centred targets `y` (n × N) on `z` (n rows of D), no intercept
/// (the caller centres): returns N × D coefficients. The n × n dual form is solved when
/// there are fewer windows than dimensions.
fn ridge(z: &[Vec<f64>], y: &[Vec<f64>], experts: usize, lambda: f64) -> Result<Vec<Vec<f64>>> {
    let (n, d) = (z.len(), z.first().map_or(0, Vec::len));
    let mut coef = vec![vec![0.0; d]; experts];
    if n < d {
        let gram: Vec<f64> = (0..n * n).map(|k| dot(&z[k / n], &z[k % n])).collect();
        let rhs: Vec<f64> = (0..n * experts).map(|k| y[k / experts][k % experts]).collect();
        let alpha = ridge_solve(gram, n, lambda, rhs, experts)?;
        for (r, zr) in z.iter().enumerate() {
            for (i, c) in coef.iter_mut().enumerate() {
                for (cj, &zj) in c.iter_mut().zip(zr) {
                    *cj += alpha[r * experts + i] * zj;
                }
            }
        }
    } else {
        let mut gram = vec![0.0; d * d];
        let mut rhs = vec![0.0; d * experts];
        for (zr, yr) in z.iter().zip(y) {
            for a in 0..d {
                for b in 0..d {
                    gram[a * d + b] += zr[a] * zr[b];
                }
                for i in 0..experts {
                    rhs[a * experts + i] += zr[a] * yr[i];
                }
            }
        }
        let beta = ridge_solve(gram, d, lambda, rhs, experts)?;
        for (i, c) in coef.iter_mut().enumerate() {
            for (j, cj) in c.iter_mut().enumerate() {
                *cj = beta[j * experts + i];
            }
        }
    }
    Ok(coef)
}

/// Check that the samples fit together: the same embedding width, one token list per
/// expert, equal counts within a group, positive byte counts.
fn check_samples(samples: &[Sample], groups: &[usize]) -> Result<usize> {
    check_groups(groups)?;
    let Some(first) = samples.first() else { return Err(Error::input("no samples to train the gate on")) };
    let d = first.embedding.len();
    if d == 0 {
        return Err(Error::input("sample 0 has an empty embedding"));
    }
    for (k, s) in samples.iter().enumerate() {
        if s.embedding.len() != d {
            return Err(Error::input(format!(
                "sample {k}: embedding of {} values, sample 0 has {d}",
                s.embedding.len()
            )));
        }
        if s.embedding.iter().any(|v| !v.is_finite()) {
            return Err(Error::input(format!("sample {k}: the embedding is not finite")));
        }
        if s.bytes == 0 {
            return Err(Error::input(format!("sample {k}: a window of 0 bytes")));
        }
        check_logprobs(&s.logprobs, groups, &format!("sample {k}"))?;
    }
    Ok(d)
}

/// Train a gate on the samples not held out (the held-out ones are only scored, in the
/// report). `groups[i]` is expert i's tokenizer family (any labels; equal labels mix
/// token by token). Experts are named `expert0`, `expert1`, … until
/// [`Gate::set_experts`] names them.
pub fn train(samples: &[Sample], groups: &[usize], opts: &TrainOptions) -> Result<Gate> {
    let d = check_samples(samples, groups)?;
    let n = groups.len();
    let train: Vec<&Sample> = samples.iter().filter(|s| !s.held_out).collect();
    let held: Vec<&Sample> = samples.iter().filter(|s| s.held_out).collect();
    if train.is_empty() {
        return Err(Error::input("every sample is held out: nothing to train the gate on"));
    }
    if !(opts.learning_rate > 0.0 && opts.l2 >= 0.0 && opts.ridge > 0.0) {
        return Err(Error::input("gate training needs learning_rate > 0, l2 ≥ 0 and ridge > 0"));
    }
    let members = group_members(groups);
    // Standardisation from the training windows.
    let m = train.len() as f64;
    let mean: Vec<f64> = (0..d).map(|j| train.iter().map(|s| s.embedding[j] as f64).sum::<f64>() / m).collect();
    let std: Vec<f64> = (0..d)
        .map(|j| {
            let v = train.iter().map(|s| (s.embedding[j] as f64 - mean[j]).powi(2)).sum::<f64>() / m;
            // A constant dimension carries nothing: leave it at 0 rather than dividing by 0.
            if v.sqrt() > 1e-8 {
                v.sqrt()
            } else {
                1.0
            }
        })
        .collect();
    let z: Vec<Vec<f64>> = train.iter().map(|s| standardise(&s.embedding, &mean, &std)).collect();

    // Adam, full batch, from zero (the uniform gate).
    let mut p = vec![0.0f64; n * (d + 1)];
    let (mut m1, mut m2) = (vec![0.0f64; p.len()], vec![0.0f64; p.len()]);
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
    for it in 1..=opts.iterations {
        let (_, g) = objective(&p, &z, &train, &members, opts.l2);
        let (c1, c2) = (1.0 - b1.powi(it as i32), 1.0 - b2.powi(it as i32));
        for k in 0..p.len() {
            m1[k] = b1 * m1[k] + (1.0 - b1) * g[k];
            m2[k] = b2 * m2[k] + (1.0 - b2) * g[k] * g[k];
            p[k] -= opts.learning_rate * (m1[k] / c1) / ((m2[k] / c2).sqrt() + eps);
        }
    }
    let weight: Vec<Vec<f64>> = (0..n).map(|k| p[k * (d + 1)..k * (d + 1) + d].to_vec()).collect();
    let bias: Vec<f64> = (0..n).map(|k| p[k * (d + 1) + d]).collect();

    // The loss head: each expert's bits per byte, centred (z is centred already, so the
    // intercept is the mean).
    let y: Vec<Vec<f64>> =
        train.iter().map(|s| s.logprobs.iter().map(|lp| single_bits_per_byte(lp, s.bytes)).collect()).collect();
    let loss_bias: Vec<f64> = (0..n).map(|i| y.iter().map(|r| r[i]).sum::<f64>() / m).collect();
    let yc: Vec<Vec<f64>> = y.iter().map(|r| r.iter().zip(&loss_bias).map(|(v, b)| v - b).collect()).collect();
    let loss_weight = ridge(&z, &yc, n, opts.ridge)?;

    let tokens: Vec<f64> = (0..n).map(|i| train.iter().map(|s| s.logprobs[i].len() as f64).sum()).collect();
    let total_bytes: f64 = train.iter().map(|s| s.bytes as f64).sum();
    let bytes_per_token = tokens.iter().map(|&t| if t > 0.0 { total_bytes / t } else { 1.0 }).collect();
    let mut gate = Gate {
        format: FORMAT.to_string(),
        version: VERSION,
        experts: (0..n).map(|i| format!("expert{i}")).collect(),
        groups: groups.to_vec(),
        dim: d,
        mean,
        std,
        weight,
        bias,
        loss_weight,
        loss_bias,
        bytes_per_token,
        window_bytes: total_bytes / m,
        report: TrainReport::default(),
    };
    let full = (1u32 << n) - 1;
    let uniform = vec![1.0 / n as f64; n];
    let single = |i: usize| -> Result<f64> {
        let w: Vec<f64> = (0..n).map(|j| if i == j { 1.0 } else { 0.0 }).collect();
        mean_bits_per_byte(&held, groups, |_| Ok(w.clone()))
    };
    gate.report = TrainReport {
        iterations: opts.iterations,
        train_windows: train.len(),
        held_out_windows: held.len(),
        train_bits_per_byte: gate.bits_per_byte(&train, full)?,
        held_out_bits_per_byte: if held.is_empty() { None } else { Some(gate.bits_per_byte(&held, full)?) },
        held_out_single: if held.is_empty() { Vec::new() } else { (0..n).map(single).collect::<Result<_>>()? },
        held_out_uniform: if held.is_empty() {
            None
        } else {
            Some(mean_bits_per_byte(&held, groups, |_| Ok(uniform.clone()))?)
        },
    };
    // A diverged run (too large a learning rate) is refused here, not when its file is
    // read back.
    let r = &gate.report;
    let scores = [r.train_bits_per_byte].into_iter().chain(r.held_out_bits_per_byte).chain(r.held_out_uniform);
    if gate.check().is_err() || scores.chain(r.held_out_single.iter().copied()).any(|v| !v.is_finite()) {
        return Err(Error::input(
            "gate training diverged (a parameter or loss is not finite): lower the learning rate",
        ));
    }
    Ok(gate)
}

/// Total bits over total bytes of `samples`, each mixed with the weights `weights` gives.
fn mean_bits_per_byte(
    samples: &[&Sample],
    groups: &[usize],
    mut weights: impl FnMut(&Sample) -> Result<Vec<f64>>,
) -> Result<f64> {
    let (mut bits, mut bytes) = (0.0, 0.0);
    for s in samples {
        let w = weights(s)?;
        bits += Gate::mixture_bits_per_byte(&w, &s.logprobs, groups, s.bytes)? * s.bytes as f64;
        bytes += s.bytes as f64;
    }
    if bytes == 0.0 {
        return Err(Error::input("no samples to score"));
    }
    Ok(bits / bytes)
}

/// Where the gate of a registry file lives: `DIR/NAME.gate.json` beside `DIR/NAME.json`.
pub fn gate_path(registry: &Path) -> PathBuf {
    let stem = registry.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "registry".into());
    registry.with_file_name(format!("{stem}.gate.json"))
}

impl Gate {
    pub fn experts(&self) -> &[String] {
        &self.experts
    }

    pub fn groups(&self) -> &[usize] {
        &self.groups
    }

    /// The embedding width the gate expects.
    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn report(&self) -> &TrainReport {
        &self.report
    }

    /// Name the experts (in training order), as a registry knows them.
    pub fn set_experts(&mut self, names: &[&str]) -> Result<()> {
        if names.len() != self.experts.len() {
            return Err(Error::input(format!("{} names for a gate over {} experts", names.len(), self.experts.len())));
        }
        self.experts = names.iter().map(|s| s.to_string()).collect();
        Ok(())
    }

    fn check_embedding(&self, emb: &[f32]) -> Result<()> {
        if emb.len() != self.dim {
            return Err(Error::input(format!(
                "an embedding of {} values; this gate was trained on {} (another embedder?)",
                emb.len(),
                self.dim
            )));
        }
        if emb.iter().any(|v| !v.is_finite()) {
            return Err(Error::input("the embedding is not finite"));
        }
        Ok(())
    }

    /// The softmax logits for an embedding.
    fn logits(&self, emb: &[f32]) -> Result<Vec<f64>> {
        self.check_embedding(emb)?;
        let z = standardise(emb, &self.mean, &self.std);
        Ok(self.weight.iter().zip(&self.bias).map(|(w, b)| dot(w, &z) + b).collect())
    }

    /// The gate's weights restricted to the subset `mask` (bit i: expert i; bits past
    /// the expert count are ignored): the softmax renormalised over the subset, 0
    /// outside it. One gate serves every subset this way (DESIGN §5 step 2).
    pub fn weights(&self, emb: &[f32], mask: u32) -> Result<Vec<f64>> {
        let n = self.experts.len();
        let mask = mask & ((1u64 << n) - 1) as u32;
        if mask == 0 {
            return Err(Error::input("the subset holds no expert of this gate"));
        }
        let s = self.logits(emb)?;
        let lse = log_sum_exp((0..n).filter(|i| mask >> i & 1 == 1).map(|i| s[i]));
        Ok((0..n).map(|i| if mask >> i & 1 == 1 { (s[i] - lse).exp() } else { 0.0 }).collect())
    }

    /// The loss of a window under the mixture with `weights` (≥ 0, summing to 1; 0 for
    /// an expert that did not run), in bits per byte: the training objective's formula
    /// (token-level within a group, window-level across groups). `logprobs[i]`: expert
    /// i's token log-probabilities; `groups[i]`: its tokenizer family.
    pub fn mixture_bits_per_byte(
        weights: &[f64],
        logprobs: &[Vec<f32>],
        groups: &[usize],
        bytes: usize,
    ) -> Result<f64> {
        check_groups(groups)?;
        if weights.len() != groups.len() {
            return Err(Error::input(format!("{} weights for {} experts", weights.len(), groups.len())));
        }
        if weights.iter().any(|w| !(w.is_finite() && *w >= 0.0)) || weights.iter().sum::<f64>() <= 0.0 {
            return Err(Error::input("mixture weights must be finite, ≥ 0 and not all 0"));
        }
        if bytes == 0 {
            return Err(Error::input("a window of 0 bytes has no loss per byte"));
        }
        check_logprobs(logprobs, groups, "mixture")?;
        let total: f64 = weights.iter().sum();
        let lw: Vec<f64> = weights.iter().map(|w| (w / total).ln()).collect();
        let lp = mixture_ln(&lw, logprobs, &group_members(groups), None);
        Ok(-lp / (bytes as f64 * std::f64::consts::LN_2))
    }

    /// Total bits over total bytes of `samples` under this gate restricted to `mask`.
    pub fn bits_per_byte(&self, samples: &[&Sample], mask: u32) -> Result<f64> {
        mean_bits_per_byte(samples, &self.groups, |s| self.weights(&s.embedding, mask))
    }

    /// Each expert's bits per byte on a prompt like this one, from the ridge head
    /// trained on the same windows (clamped at 0).
    pub fn predict_loss(&self, emb: &[f32]) -> Result<Vec<f64>> {
        self.check_embedding(emb)?;
        let z = standardise(emb, &self.mean, &self.std);
        Ok(self.loss_weight.iter().zip(&self.loss_bias).map(|(w, b)| (b + dot(w, &z)).max(0.0)).collect())
    }

    /// The expected loss (bits per byte) of every subset of the experts, by bitmask
    /// (2^N entries, entry 0 = +∞), for the subset search: for subset S, the gate's
    /// weights masked to S, mixed as [`Gate::mixture_bits_per_byte`] mixes them.
    ///
    /// Approximation: every token of expert i is taken to have the same probability,
    /// the one that gives its predicted loss ℓ_i (`predicted[i]`, e.g. from
    /// [`Gate::predict_loss`]) at its tokenizer's training bytes per token k; a group
    /// then mixes per token, ℓ_G = −log2(Σ_{i∈G∩S} q_i 2^(−k ℓ_i)) / k, and groups mix
    /// over a window of the training windows' mean length B,
    /// L(S) = −log2(Σ_G a_G 2^(−B ℓ_G)) / B. A singleton's entry is exactly ℓ_i.
    pub fn expected_loss_table(&self, emb: &[f32], predicted: &[f64]) -> Result<Vec<f64>> {
        let n = self.experts.len();
        if predicted.len() != n || predicted.iter().any(|l| !(l.is_finite() && *l >= 0.0)) {
            return Err(Error::input(format!(
                "{} predicted losses for {n} experts (each finite, ≥ 0)",
                predicted.len()
            )));
        }
        let s = self.logits(emb)?;
        let members = group_members(&self.groups);
        let ln2 = std::f64::consts::LN_2;
        let b = self.window_bytes;
        let mut table = vec![f64::INFINITY; 1 << n];
        for (mask, entry) in table.iter_mut().enumerate().skip(1) {
            let inside = |i: &usize| mask >> i & 1 == 1;
            let lse = log_sum_exp((0..n).filter(inside).map(|i| s[i]));
            let mut terms = Vec::with_capacity(members.len());
            for g in &members {
                let log_a = log_sum_exp(g.iter().filter(|i| inside(i)).map(|&i| s[i] - lse));
                if log_a == f64::NEG_INFINITY {
                    continue;
                }
                let k = self.bytes_per_token[g[0]];
                let ln_rho =
                    log_sum_exp(g.iter().filter(|i| inside(i)).map(|&i| s[i] - lse - log_a - k * predicted[i] * ln2));
                // ln of a_G 2^(−B ℓ_G), with ℓ_G = −ln ρ / (k ln 2).
                terms.push(log_a + b * ln_rho / k);
            }
            let ln_p = log_sum_exp(terms.iter().copied());
            if ln_p.is_finite() {
                *entry = -ln_p / (b * ln2);
            }
        }
        Ok(table)
    }

    pub fn to_json(&self) -> String {
        // Every value is finite (checked on the way in), so this cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Parse and check a gate file's text; `expected`: the experts the caller routes
    /// over, in its order (a gate trained on other experts is refused, not misapplied).
    pub fn from_json(text: &str, expected: &[&str]) -> Result<Gate> {
        let gate: Gate = serde_json::from_str(text).map_err(|e| Error::input(format!("not a gate file: {e}")))?;
        gate.check()?;
        if gate.experts.iter().map(String::as_str).ne(expected.iter().copied()) {
            return Err(Error::input(format!(
                "the gate was trained on experts [{}], not [{}]: train it again for these",
                gate.experts.join(", "),
                expected.join(", ")
            )));
        }
        Ok(gate)
    }

    /// Every shape and value a gate needs, one message per problem.
    fn check(&self) -> Result<()> {
        if self.format != FORMAT {
            return Err(Error::input(format!("not a gate file (format {:?}, expected {FORMAT:?})", self.format)));
        }
        if self.version != VERSION {
            return Err(Error::input(format!(
                "gate file version {} is not supported (this cairn reads version {VERSION})",
                self.version
            )));
        }
        let (n, d) = (self.experts.len(), self.dim);
        check_groups(&self.groups)?;
        if self.groups.len() != n {
            return Err(Error::input(format!("gate: {} groups for {n} experts", self.groups.len())));
        }
        if d == 0 {
            return Err(Error::input("gate: dim is 0"));
        }
        let rows = |what: &str, m: &[Vec<f64>]| -> Result<()> {
            if m.len() != n || m.iter().any(|r| r.len() != d) {
                return Err(Error::input(format!("gate: {what} must be {n} rows of {d} values")));
            }
            Ok(())
        };
        rows("weight", &self.weight)?;
        rows("loss_weight", &self.loss_weight)?;
        for (what, v, len) in [
            ("mean", &self.mean, d),
            ("std", &self.std, d),
            ("bias", &self.bias, n),
            ("loss_bias", &self.loss_bias, n),
            ("bytes_per_token", &self.bytes_per_token, n),
        ] {
            if v.len() != len {
                return Err(Error::input(format!("gate: {what} has {} values, expected {len}", v.len())));
            }
        }
        let all = self
            .mean
            .iter()
            .chain(&self.bias)
            .chain(&self.loss_bias)
            .chain(self.weight.iter().flatten())
            .chain(self.loss_weight.iter().flatten());
        if all.into_iter().any(|v| !v.is_finite()) {
            return Err(Error::input("gate: a parameter is not finite"));
        }
        let positive = |v: &f64| v.is_finite() && *v > 0.0;
        if !self.std.iter().all(positive) || !self.bytes_per_token.iter().all(positive) || !positive(&self.window_bytes)
        {
            return Err(Error::input("gate: std, bytes_per_token and window_bytes must be positive"));
        }
        Ok(())
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_json() + "\n").map_err(|source| Error::Io { path: path.to_path_buf(), source })
    }

    pub fn load(path: &Path, expected: &[&str]) -> Result<Gate> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Gate::from_json(&text, expected).map_err(|e| Error::input(format!("{}: {e}", path.display())))
    }
}

/// The ids a local expert scores a window as, and the convention a remote expert's
/// scores must follow to be comparable: BOS (where the tokenizer has one, so that the
/// first text token is scored too) and the text with no special tokens parsed.
pub fn window_ids(engine: &Engine, text: &str) -> Result<Vec<u32>> {
    let mut ids: Vec<u32> = engine.tokenizer.bos_id().into_iter().collect();
    ids.extend(engine.tokenizer.encode(text, false)?);
    Ok(ids)
}

/// Samples for local experts: every window of `corpus` embedded by `embedder` and scored
/// by each expert (the same window text, each expert's own tokenizer). `progress(done,
/// total)` after each window. A tokenizer without BOS leaves the first token unscored.
pub fn samples_local(
    embedder: &Engine,
    experts: &[&Engine],
    corpus: &Corpus,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Sample>> {
    if experts.is_empty() {
        return Err(Error::input("no experts to score the corpus with"));
    }
    let total = corpus.windows.len();
    let mut out = Vec::with_capacity(total);
    for (k, w) in corpus.windows.iter().enumerate() {
        let embedding = embedder.embed(&window_ids(embedder, &w.text)?)?;
        let logprobs = experts.iter().map(|e| e.score(&window_ids(e, &w.text)?)).collect::<Result<Vec<_>>>()?;
        out.push(Sample { category: w.category, held_out: w.held_out, embedding, logprobs, bytes: w.text.len() });
        progress(k + 1, total);
    }
    Ok(out)
}

/// Most experts for which [`Neighbours`] computes every subset's mixture (2^N mixtures
/// per neighbour); past it the loss head's approximation answers.
pub const NEIGHBOUR_EXPERTS: usize = 10;

/// The gate with a per-request loss table measured on the training windows nearest to
/// the prompt: for each subset, the mixture's real bits per byte on those windows with
/// the request's masked weights. [`Gate::expected_loss_table`] assumes every token of an
/// expert equally likely, under which a mixture can never beat its best member; real
/// experts are good at different tokens, and only measured mixtures show it.
pub struct Neighbours {
    pub gate: Gate,
    samples: Vec<Sample>,
    /// Unit-length embeddings of `samples`, for cosine similarity.
    unit: Vec<Vec<f32>>,
    pub k: usize,
}

fn unit(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt().max(1e-12);
    v.iter().map(|&x| (x as f64 / n) as f32).collect()
}

impl Neighbours {
    /// `samples`: the training windows (held-out ones are left out here).
    pub fn new(gate: Gate, samples: Vec<Sample>, k: usize) -> Result<Neighbours> {
        let samples: Vec<Sample> = samples.into_iter().filter(|s| !s.held_out).collect();
        for s in &samples {
            gate.check_embedding(&s.embedding)?;
            check_logprobs(&s.logprobs, &gate.groups, "neighbour")?;
        }
        let unit = samples.iter().map(|s| unit(&s.embedding)).collect();
        Ok(Neighbours { gate, samples, unit, k: k.max(1) })
    }

    /// Every subset's bits per byte over the `k` training windows most like `emb`.
    pub fn loss_table(&self, emb: &[f32]) -> Result<Vec<f64>> {
        let n = self.gate.experts.len();
        if n > NEIGHBOUR_EXPERTS || self.samples.is_empty() {
            let predicted = self.gate.predict_loss(emb)?;
            return self.gate.expected_loss_table(emb, &predicted);
        }
        let q = unit(emb);
        let mut order: Vec<(f32, usize)> = self
            .unit
            .iter()
            .enumerate()
            .map(|(i, u)| (-u.iter().zip(&q).map(|(a, b)| a * b).sum::<f32>(), i))
            .collect();
        order.sort_by(|a, b| a.0.total_cmp(&b.0));
        let near: Vec<&Sample> = order.iter().take(self.k).map(|&(_, i)| &self.samples[i]).collect();
        let all = self.gate.weights(emb, ((1u64 << n) - 1) as u32)?;
        let mut table = vec![f64::INFINITY; 1 << n];
        for (mask, entry) in table.iter_mut().enumerate().skip(1) {
            let w: Vec<f64> = all.iter().enumerate().map(|(i, &w)| if mask >> i & 1 == 1 { w } else { 0.0 }).collect();
            if w.iter().sum::<f64>() <= 0.0 {
                continue;
            }
            let (mut bits, mut bytes) = (0.0, 0usize);
            for s in &near {
                bits += Gate::mixture_bits_per_byte(&w, &s.logprobs, &self.gate.groups, s.bytes)? * s.bytes as f64;
                bytes += s.bytes;
            }
            *entry = bits / bytes.max(1) as f64;
        }
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64 for test data.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        }

        /// Uniform in [lo, hi).
        fn range(&mut self, lo: f64, hi: f64) -> f64 {
            lo + (hi - lo) * self.next()
        }
    }

    #[test]
    fn analytic_gradient_matches_finite_differences() {
        let mut rng = Rng(11);
        for (groups, d) in [(vec![0usize, 0, 1], 3usize), (vec![4, 2], 2), (vec![0, 0, 0, 0], 1), (vec![1, 2, 3], 4)] {
            let n = groups.len();
            let members = group_members(&groups);
            let samples: Vec<Sample> = (0..5)
                .map(|_| {
                    // Each group its own token count (1..6).
                    let counts: Vec<usize> = members.iter().map(|_| 1 + (rng.next() * 6.0) as usize).collect();
                    let mut logprobs = vec![Vec::new(); n];
                    for (g, &t) in members.iter().zip(&counts) {
                        for &i in g {
                            logprobs[i] = (0..t).map(|_| rng.range(-6.0, -0.01) as f32).collect();
                        }
                    }
                    Sample {
                        category: Category::Prose,
                        held_out: false,
                        embedding: (0..d).map(|_| rng.range(-1.0, 1.0) as f32).collect(),
                        logprobs,
                        bytes: 3 + (rng.next() * 20.0) as usize,
                    }
                })
                .collect();
            let refs: Vec<&Sample> = samples.iter().collect();
            let z: Vec<Vec<f64>> = samples.iter().map(|s| s.embedding.iter().map(|&v| v as f64).collect()).collect();
            let p: Vec<f64> = (0..n * (d + 1)).map(|_| rng.range(-1.5, 1.5)).collect();
            let (_, g) = objective(&p, &z, &refs, &members, 0.1);
            for k in 0..p.len() {
                let h = 1e-5;
                let (mut lo, mut hi) = (p.clone(), p.clone());
                lo[k] -= h;
                hi[k] += h;
                let fd = (objective(&hi, &z, &refs, &members, 0.1).0 - objective(&lo, &z, &refs, &members, 0.1).0)
                    / (2.0 * h);
                assert!(
                    (fd - g[k]).abs() <= 1e-6 * (1.0 + fd.abs()),
                    "groups {groups:?}, parameter {k}: analytic {} vs finite difference {fd}",
                    g[k]
                );
            }
        }
    }

    #[test]
    fn mixture_formula_matches_direct_probabilities() {
        // Two groups: {0, 1} with 3 tokens, {2} with 2 tokens.
        let groups = [0usize, 0, 1];
        let lp: Vec<Vec<f32>> = vec![vec![-1.0, -2.0, -0.5], vec![-0.3, -3.0, -1.0], vec![-2.5, -1.5]];
        let w = [0.5, 0.3, 0.2];
        let p = |i: usize, t: usize| (lp[i][t] as f64).exp();
        let a0 = w[0] + w[1];
        let g0: f64 = (0..3).map(|t| (w[0] * p(0, t) + w[1] * p(1, t)) / a0).product();
        let g1: f64 = (0..2).map(|t| p(2, t)).product();
        let direct = -(a0 * g0 + w[2] * g1).ln() / (10.0 * std::f64::consts::LN_2);
        let got = Gate::mixture_bits_per_byte(&w, &lp, &groups, 10).expect("mixture");
        assert!((got - direct).abs() < 1e-12, "{got} vs {direct}");
        // An expert with weight 0 is as if absent.
        let got = Gate::mixture_bits_per_byte(&[0.0, 1.0, 0.0], &lp, &groups, 10).expect("mixture");
        assert!((got - single_bits_per_byte(&lp[1], 10)).abs() < 1e-12);
        // Shape errors are errors.
        assert!(Gate::mixture_bits_per_byte(&w[..2], &lp, &groups, 10).is_err());
        assert!(Gate::mixture_bits_per_byte(&w, &lp[..2], &groups, 10).is_err());
        assert!(Gate::mixture_bits_per_byte(&w, &lp, &[0, 1, 1], 10).is_err(), "unequal counts in a group");
        assert!(Gate::mixture_bits_per_byte(&[0.0; 3], &lp, &groups, 10).is_err());
        assert!(Gate::mixture_bits_per_byte(&w, &lp, &groups, 0).is_err());
    }

    /// Category 1 embeddings near +c, category 2 near −c; expert 0 is good (p ≈ 0.6 per
    /// token) on category 1 and poor (p ≈ 0.05) on category 2, expert 1 the other way
    /// round; expert 2 (its own tokenizer, fewer tokens) is middling on both.
    fn synthetic(rng: &mut Rng, count: usize, held_out: bool) -> Vec<Sample> {
        let d = 5;
        (0..count)
            .map(|k| {
                let cat1 = k % 2 == 0;
                let sign = if cat1 { 1.0 } else { -1.0 };
                let embedding: Vec<f32> = (0..d)
                    .map(|j| (if j < 2 { sign * 0.8 } else { 0.0 } + rng.range(-0.5, 0.5) + 3.0) as f32)
                    .collect();
                let tok = |rng: &mut Rng, p: f64, t: usize| -> Vec<f32> {
                    (0..t).map(|_| (p * rng.range(0.7, 1.3)).min(0.99).ln() as f32).collect()
                };
                let (p0, p1) = if cat1 { (0.6, 0.05) } else { (0.05, 0.6) };
                let logprobs = vec![tok(rng, p0, 20), tok(rng, p1, 20), tok(rng, 0.2, 15)];
                Sample {
                    category: if cat1 { Category::Prose } else { Category::Code },
                    held_out,
                    embedding,
                    logprobs,
                    bytes: 60,
                }
            })
            .collect()
    }

    fn trained() -> (Gate, Vec<Sample>) {
        let mut rng = Rng(5);
        let mut samples = synthetic(&mut rng, 40, false);
        samples.extend(synthetic(&mut rng, 20, true));
        let gate = train(&samples, &[0, 0, 1], &TrainOptions::default()).expect("train");
        (gate, samples)
    }

    #[test]
    fn training_routes_each_category_to_its_expert() {
        let (gate, samples) = trained();
        let held: Vec<&Sample> = samples.iter().filter(|s| s.held_out).collect();
        for s in &held {
            let w = gate.weights(&s.embedding, 0b111).expect("weights");
            let best = if s.category == Category::Prose { 0 } else { 1 };
            assert!(w[best] > 0.8, "{:?}: weights {w:?}", s.category);
        }
        let mixed = gate.bits_per_byte(&held, 0b111).expect("bpb");
        let r = gate.report();
        assert_eq!((r.train_windows, r.held_out_windows, r.iterations), (40, 20, 400));
        assert!((r.held_out_bits_per_byte.expect("held out") - mixed).abs() < 1e-12);
        assert_eq!(r.held_out_single.len(), 3);
        for (i, &single) in r.held_out_single.iter().enumerate() {
            assert!(mixed < single, "trained {mixed} vs expert {i} alone {single}");
        }
        let uniform = r.held_out_uniform.expect("uniform");
        assert!(mixed < uniform, "trained {mixed} vs uniform {uniform}");
        assert!(r.train_bits_per_byte < uniform);
        // Deterministic.
        assert_eq!(trained().0, gate);
    }

    #[test]
    fn masking_renormalises_within_the_subset() {
        let (gate, samples) = trained();
        let emb = &samples[0].embedding;
        let full = gate.weights(emb, 0b111).expect("weights");
        assert!((full.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        for mask in 1u32..8 {
            let w = gate.weights(emb, mask).expect("weights");
            let inside: f64 = (0..3).filter(|i| mask >> i & 1 == 1).map(|i| full[i]).sum();
            for i in 0..3 {
                if mask >> i & 1 == 1 {
                    assert!((w[i] - full[i] / inside).abs() < 1e-12, "mask {mask:03b}, expert {i}");
                } else {
                    assert_eq!(w[i], 0.0, "mask {mask:03b}, expert {i}");
                }
            }
        }
        assert!(gate.weights(emb, 0).is_err());
        assert!(gate.weights(emb, 0b1000).is_err(), "no expert of the gate");
        assert!(gate.weights(&emb[..2], 1).is_err(), "wrong width");
    }

    #[test]
    fn loss_table_singletons_are_the_predictions() {
        let (gate, samples) = trained();
        for s in samples.iter().take(6) {
            let pred = gate.predict_loss(&s.embedding).expect("predict");
            let table = gate.expected_loss_table(&s.embedding, &pred).expect("table");
            assert_eq!(table.len(), 8);
            assert_eq!(table[0], f64::INFINITY);
            for i in 0..3 {
                assert!((table[1 << i] - pred[i]).abs() < 1e-9, "expert {i}: {} vs {}", table[1 << i], pred[i]);
            }
            assert!(table.iter().skip(1).all(|v| v.is_finite() && *v > 0.0));
            // The head has learned which expert suits which category.
            let (good, bad) = if s.category == Category::Prose { (0, 1) } else { (1, 0) };
            assert!(pred[good] < pred[bad], "{:?}: predicted {pred:?}", s.category);
            // Adding the good expert to the bad one lowers the expected loss.
            assert!(table[0b011] < table[1 << bad]);
        }
        let emb = &samples[0].embedding;
        assert!(gate.expected_loss_table(emb, &[1.0, 2.0]).is_err());
        assert!(gate.expected_loss_table(emb, &[1.0, f64::NAN, 1.0]).is_err());
    }

    #[test]
    fn loss_head_fits_a_linear_target_in_both_forms() {
        // y = 2 z0 − z1 exactly; a tiny ridge recovers it in the primal (n ≥ d) and the
        // dual (n < d, minimum-norm) forms alike.
        let mut rng = Rng(3);
        for (n, d) in [(30usize, 3usize), (2, 6)] {
            let z: Vec<Vec<f64>> = (0..n).map(|_| (0..d).map(|_| rng.range(-1.0, 1.0)).collect()).collect();
            let y: Vec<Vec<f64>> = z.iter().map(|r| vec![2.0 * r[0] - r[1], r[2]]).collect();
            let coef = ridge(&z, &y, 2, 1e-9).expect("ridge");
            for (zr, yr) in z.iter().zip(&y) {
                for i in 0..2 {
                    assert!((dot(&coef[i], zr) - yr[i]).abs() < 1e-5, "n {n}, d {d}");
                }
            }
        }
    }

    #[test]
    fn json_round_trip_and_bad_files() {
        let (mut gate, samples) = trained();
        gate.set_experts(&["a", "b", "c"]).expect("names");
        assert!(gate.set_experts(&["a"]).is_err());
        let text = gate.to_json();
        let back = Gate::from_json(&text, &["a", "b", "c"]).expect("parse");
        let emb = &samples[3].embedding;
        let (w1, w2) = (gate.weights(emb, 0b111).expect("w"), back.weights(emb, 0b111).expect("w"));
        for (a, b) in w1.iter().zip(&w2) {
            assert!((a - b).abs() < 1e-12);
        }
        assert_eq!(back.experts(), gate.experts());
        assert_eq!(back.groups(), &[0, 0, 1]);
        assert_eq!(back.report().held_out_windows, 20);

        let err = |text: &str, expected: &[&str]| match Gate::from_json(text, expected) {
            Ok(_) => panic!("accepted a bad gate file"),
            Err(e) => e.to_string(),
        };
        assert!(err(&text, &["a", "c", "b"]).contains("trained on experts [a, b, c]"));
        assert!(err(&text, &["a", "b"]).contains("trained on experts"));
        assert!(err(&text[..text.len() / 2], &["a", "b", "c"]).contains("not a gate file"));
        assert!(err("[]", &[]).contains("not a gate file"));
        let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = v.clone();
            f(&mut v);
            v.to_string()
        };
        assert!(err(&with(&|v| v["version"] = 2.into()), &["a", "b", "c"]).contains("version 2"));
        assert!(err(&with(&|v| v["format"] = "x".into()), &["a", "b", "c"]).contains("format"));
        let short = with(&|v| {
            v["weight"][1].as_array_mut().expect("row").pop();
        });
        assert!(err(&short, &["a", "b", "c"]).contains("weight must be 3 rows of 5"));
        assert!(err(&with(&|v| v["bias"] = serde_json::json!([0.0])), &["a", "b", "c"]).contains("bias"));
        assert!(err(&with(&|v| v["std"][0] = 0.0.into()), &["a", "b", "c"]).contains("positive"));
        assert!(err(&with(&|v| v["mean"][0] = "x".into()), &["a", "b", "c"]).contains("not a gate file"));
        assert!(err(&with(&|v| v["groups"] = serde_json::json!([0])), &["a", "b", "c"]).contains("groups"));
        v["extra"] = 1.into();
        assert!(err(&v.to_string(), &["a", "b", "c"]).contains("unknown field"));

        // Save and load through a file, beside a registry.
        let dir = std::env::temp_dir().join(format!("cairn-gate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = gate_path(&dir.join("experts.json"));
        assert_eq!(path, dir.join("experts.gate.json"));
        gate.save(&path).expect("save");
        assert_eq!(Gate::load(&path, &["a", "b", "c"]).expect("load").experts(), gate.experts());
        assert!(Gate::load(&dir.join("missing.gate.json"), &["a"]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_samples_are_errors() {
        let mut rng = Rng(1);
        let good = synthetic(&mut rng, 4, false);
        let o = TrainOptions::default();
        assert!(train(&[], &[0, 0, 1], &o).is_err());
        assert!(train(&good, &[0, 0], &o).is_err(), "three experts scored, two groups");
        assert!(train(&good, &[0, 0, 0], &o).is_err(), "15 vs 20 tokens in one group");
        let mut bad = good.clone();
        bad[1].embedding.pop();
        assert!(train(&bad, &[0, 0, 1], &o).is_err());
        let mut bad = good.clone();
        bad[2].bytes = 0;
        assert!(train(&bad, &[0, 0, 1], &o).is_err());
        let mut bad = good.clone();
        bad[0].logprobs[2][0] = f32::NAN;
        assert!(train(&bad, &[0, 0, 1], &o).is_err());
        let wild = TrainOptions { learning_rate: f64::MAX, ..TrainOptions::default() };
        assert!(train(&good, &[0, 0, 1], &wild).is_err(), "a diverged run is an error");
        let mut all_held = good.clone();
        all_held.iter_mut().for_each(|s| s.held_out = true);
        assert!(train(&all_held, &[0, 0, 1], &o).is_err());
    }
}
