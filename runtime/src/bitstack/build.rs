//! `cairn stack`: decompose every linear matrix of a model into BitStack blocks (DESIGN
//! §5), order all blocks globally, and write them with their stack table to a `.cairn`.
//!
//! 1. Activation-aware scaling (llama architecture): run the source model over the
//!    calibration text, take `s_j` = mean over windows of the L2 norm over tokens of
//!    input channel j, + 1e-3; scale the matrix's columns by `s` and fold `1/s` into what
//!    feeds it (q/k/v and gate/up: the preceding RMSNorm weight; down: the rows of up).
//!    `attn_output` stays unscaled (grouped-query attention).
//! 2. Per matrix and level: signs of the residual, top-k triplets of its absolute value
//!    ([`linalg::top_k`]), `u = U√σ`, `v = √σVᵀ` rounded to f16, and the residual update
//!    with the rounded factors (so the stored blocks sum exactly to what was fitted).
//! 3. Order: a level-0 block of every matrix first; then greedily the block with the
//!    largest *proxy*, among those that keep the rule "no matrix gets level i + 2 before
//!    every matrix has level i". The proxy is the absolute activation-weighted squared
//!    error the block removes, per page byte: `(E_l − E_{l+1}) / bytes` with
//!    `E = Σ_j a_j² Σ_i R_ij²` (the diagonal estimate of the output error `‖R X‖²` over
//!    the calibration tokens). On a scaled matrix `a_j = 1` (the scaling carries the
//!    input norms); `attn_output` uses its own recorded input norms. Not normalised by
//!    the matrix's energy: a block counts by the output error it removes, so matrices
//!    whose outputs matter more (larger outputs) are not flattened to equal weight.
//!    Every matrix's errors per level are kept in the metadata ([`META_ENERGY_ACT`]).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use cairn_formats::bitstack::{block_name, BlockShape, StackEntry, StackMatrix, StackTable, BLOCK_TYPE};
use cairn_formats::container::PAGE;
use cairn_formats::{CairnBuilder, GgmlType, MetaValue};
use half::f16;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

use super::linalg::{self, IterOptions};
use crate::backend::cpu::CpuBackend;
use crate::convert::is_linear;
use crate::error::{Error, Result};
use crate::model::{self, Logits};
use crate::tokenizer::Tokenizer;
use crate::weights::ModelFile;

#[derive(Debug, Clone)]
pub struct StackOptions {
    pub levels: usize,
    pub rank: usize,
    pub calib: Option<PathBuf>,
    pub calib_tokens: usize,
    pub iters: IterOptions,
    pub threads: usize,
    pub proxy: Proxy,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            levels: 16,
            // The rank sweep (README, BitStack): on SmolLM2 rank 4 has the lowest
            // perplexity per bit up to about 6 bits per parameter and decodes fastest.
            rank: 4,
            calib: None,
            calib_tokens: 2048,
            iters: IterOptions { tol: 1e-3, max_iters: 12, seed: 0x5eed },
            threads: 0,
            proxy: Proxy::Residual,
        }
    }
}

/// One matrix decomposed.
pub struct MatrixStack {
    pub name: String,
    pub shape: BlockShape,
    pub blocks: Vec<Vec<u8>>,
    /// The ordering proxy of each level.
    pub gain: Vec<f64>,
    /// Relative squared error `E_{l+1} / E_0` after each level.
    pub rel_err: Vec<f64>,
    /// Squared error of the stored (scaled) matrix before any level and after each:
    /// `E_0, E_1, …` (`levels + 1` values).
    pub energy: Vec<f64>,
    /// The same, activation-weighted: `Σ_j a_j² Σ_i R_ij²` with `a_j` the recorded
    /// input norm of column j in the frame the matrix runs in (1 for scaled matrices,
    /// whose scaling already carries it) — the diagonal estimate of `‖R X‖²`.
    pub energy_act: Vec<f64>,
}

/// Metadata: per matrix (table order), `levels + 1` squared errors of the stored matrix.
pub const META_ENERGY: &str = "cairn.stack.energy";
/// The same, activation-weighted.
pub const META_ENERGY_ACT: &str = "cairn.stack.energy_act";

/// Calibration window in tokens.
const CALIB_WINDOW: usize = 512;

/// Per-weight input-channel scales from running `src` over `text`.
pub fn calibrate(src: &Path, text: &str, tokens: usize, threads: usize) -> Result<HashMap<String, Vec<f32>>> {
    let file = ModelFile::open(src)?;
    let tok = Tokenizer::from_metadata(&file.metadata).map_err(|e| Error::model(e.to_string()))?;
    let mut ids = tok.encode(text, false)?;
    ids.truncate(tokens);
    if ids.len() < 16 {
        return Err(Error::input(format!("calibration text has only {} tokens (at least 16 needed)", ids.len())));
    }
    let (backend, rec) = CpuBackend::recording(threads)?;
    let runner = model::load(&file, backend)?;
    for chunk in ids.chunks(CALIB_WINDOW) {
        let mut cache = runner.new_cache(chunk.len())?;
        runner.forward(cache.as_mut(), chunk, Logits::Last)?;
    }
    let map = rec.lock().map_err(|_| Error::model("calibration statistics poisoned"))?;
    Ok(map
        .iter()
        .map(|(k, (sum, n))| (k.clone(), sum.iter().map(|s| (s / *n as f64) as f32 + 1e-3).collect()))
        .collect())
}

/// Decompose one (already scaled) matrix.
pub fn decompose(
    name: &str,
    mut r: Vec<f32>,
    shape: BlockShape,
    levels: usize,
    act: Option<&[f32]>,
    iters: IterOptions,
    tick: &(dyn Fn() + Sync),
) -> Result<MatrixStack> {
    let BlockShape { m, n, k } = shape;
    let energy = |r: &[f32]| r.par_iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
    let a2: Vec<f64> = match act {
        Some(a) if a.len() == n => a.iter().map(|&a| (a as f64) * (a as f64)).collect(),
        _ => vec![1.0; n],
    };
    let energy_act = |r: &[f32]| {
        r.par_chunks(n).map(|row| row.iter().zip(&a2).map(|(&x, a)| (x as f64) * (x as f64) * a).sum::<f64>()).sum()
    };
    let e0 = energy(&r).max(1e-30);
    let mut out = MatrixStack {
        name: name.into(),
        shape,
        blocks: Vec::new(),
        gain: Vec::new(),
        rel_err: Vec::new(),
        energy: vec![e0],
        energy_act: vec![energy_act(&r)],
    };
    for level in 0..levels {
        let abs: Vec<f32> = r.par_iter().map(|x| x.abs()).collect();
        let svd = linalg::top_k(&abs, m, n, k, IterOptions { seed: iters.seed ^ (level as u64) << 32, ..iters });
        drop(abs);
        let round = |x: f32| f16::from_f32(x).to_f32();
        let mut u = vec![0f32; m * k];
        let mut v = vec![0f32; k * n];
        for i in 0..m {
            for j in 0..k {
                u[i * k + j] = round(svd.u[i * k + j] * svd.s[j].max(0.0).sqrt());
            }
        }
        for j in 0..k {
            for c in 0..n {
                v[j * n + c] = round(svd.vt[j * n + c] * svd.s[j].max(0.0).sqrt());
            }
        }
        let block = shape.encode(|i, j| r[i * n + j] < 0.0, &u, &v).map_err(|e| Error::model(e.to_string()))?;
        r.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            let mut tmp = vec![0f32; n];
            for j in 0..k {
                let a = u[i * k + j];
                for (t, &vv) in tmp.iter_mut().zip(&v[j * n..(j + 1) * n]) {
                    *t += a * vv;
                }
            }
            for (x, t) in row.iter_mut().zip(&tmp) {
                *x -= if *x < 0.0 { -t } else { *t };
            }
        });
        let e = energy(&r);
        let ea = energy_act(&r);
        let ea_prev = out.energy_act[level];
        out.gain.push((ea_prev - ea) / shape.page_bytes() as f64);
        out.rel_err.push(e / e0);
        out.energy.push(e);
        out.energy_act.push(ea);
        out.blocks.push(block);
        tick();
    }
    Ok(out)
}

/// Ordering proxies (each per page byte of the block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxy {
    /// Squared error removed relative to the matrix's own energy (the first version).
    Relative,
    /// Absolute activation-weighted squared error removed.
    Activation,
    /// The effect on the residual stream: the relative output error the block removes,
    /// times the output energy of the matrix that writes its sub-layer's result into the
    /// residual stream (`attn_output` for q/k/v/o, `ffn_down` for gate/up/down), over the
    /// residual stream's energy there (the next norm's recorded input). For the writers
    /// themselves this is their absolute activation-weighted error over the residual's.
    Residual,
}

impl Proxy {
    pub fn parse(s: &str) -> Result<Proxy> {
        match s {
            "rel" | "relative" => Ok(Proxy::Relative),
            "act" | "activation" => Ok(Proxy::Activation),
            "res" | "residual" => Ok(Proxy::Residual),
            _ => Err(Error::input(format!("unknown proxy {s:?} (rel, act, res)"))),
        }
    }
}

/// What every proxy needs, per matrix: errors after each level (both frames), and the
/// residual weight of [`Proxy::Residual`] (`0` where the statistics are missing).
#[derive(Debug, Clone, Default)]
pub struct StackStats {
    pub energy: Vec<Vec<f64>>,
    pub energy_act: Vec<Vec<f64>>,
    pub residual_weight: Vec<f64>,
}

/// Metadata: per matrix, the factor that turns its activation-weighted error into the
/// residual stream's relative error ([`Proxy::Residual`]).
pub const META_RESIDUAL: &str = "cairn.stack.residual_weight";

impl StackStats {
    /// Read back what `cairn stack` stored; `None` for files made before it did.
    pub fn from_file(file: &ModelFile, levels: &[usize]) -> Option<StackStats> {
        let floats = |key: &str| -> Option<Vec<f64>> {
            match file.meta(key)? {
                MetaValue::Array(a) => (0..a.len()).map(|i| a.f64(i)).collect(),
                _ => None,
            }
        };
        let split = |flat: Vec<f64>| -> Option<Vec<Vec<f64>>> {
            let mut out = Vec::with_capacity(levels.len());
            let mut at = 0;
            for &l in levels {
                out.push(flat.get(at..at + l + 1)?.to_vec());
                at += l + 1;
            }
            (at == flat.len()).then_some(out)
        };
        let residual_weight = floats(META_RESIDUAL)?;
        (residual_weight.len() == levels.len()).then_some(())?;
        Some(StackStats {
            energy: split(floats(META_ENERGY)?)?,
            energy_act: split(floats(META_ENERGY_ACT)?)?,
            residual_weight,
        })
    }

    /// Every block's proxy value, per matrix and level.
    pub fn gains(&self, proxy: Proxy, page_bytes: &[u64]) -> Vec<Vec<f64>> {
        (0..self.energy.len())
            .map(|i| {
                let (e, ea, b) = (&self.energy[i], &self.energy_act[i], page_bytes[i] as f64);
                (0..e.len().saturating_sub(1))
                    .map(|l| match proxy {
                        Proxy::Relative => (e[l] - e[l + 1]) / e[0].max(1e-30) / b,
                        Proxy::Activation => (ea[l] - ea[l + 1]) / b,
                        Proxy::Residual => (ea[l] - ea[l + 1]) * self.residual_weight[i] / b,
                    })
                    .collect()
            })
            .collect()
    }
}

/// [`Proxy::Residual`]'s factor for matrix `name` whose activation-weighted energy is
/// `e0`: `E(writer) / (e0 · E(residual))`, from the calibration statistics (`scales`:
/// per weight, mean L2 norm of each input channel; a norm's input is the residual).
fn residual_weight(
    name: &str,
    e0: f64,
    writer_e0: &dyn Fn(&str) -> Option<f64>,
    scales: &HashMap<String, Vec<f32>>,
    n_layers: usize,
) -> f64 {
    let Some(rest) = name.strip_prefix("blk.") else { return 0.0 };
    let Some((layer, _)) = rest.split_once('.') else { return 0.0 };
    let Ok(l) = layer.parse::<usize>() else { return 0.0 };
    let (writer, target) = if name.contains(".attn_") {
        (format!("blk.{l}.attn_output.weight"), format!("blk.{l}.ffn_norm.weight"))
    } else if l + 1 < n_layers {
        (format!("blk.{l}.ffn_down.weight"), format!("blk.{}.attn_norm.weight", l + 1))
    } else {
        (format!("blk.{l}.ffn_down.weight"), "output_norm.weight".to_string())
    };
    let (Some(w), Some(r)) = (writer_e0(&writer), scales.get(&target)) else { return 0.0 };
    let res: f64 = r.iter().map(|&s| (s as f64) * (s as f64)).sum();
    if res <= 0.0 || e0 <= 0.0 {
        return 0.0;
    }
    w / (e0 * res)
}

/// The global order of blocks: `(matrix, level)` pairs. Level 0 of every matrix first
/// (by gain), then the largest gain among the blocks the level rule allows.
pub fn global_order(gains: &[Vec<f64>]) -> Vec<(usize, usize)> {
    let mut next = vec![0usize; gains.len()];
    let total: usize = gains.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(total);
    while out.len() < total {
        let lowest = next.iter().copied().min().unwrap_or(0);
        let best = (0..gains.len())
            .filter(|&i| next[i] < gains[i].len() && next[i] <= lowest + 1 && (lowest > 0 || next[i] == 0))
            .max_by(|&a, &b| gains[a][next[a]].total_cmp(&gains[b][next[b]]).then(b.cmp(&a)));
        let Some(i) = best else { break };
        out.push((i, next[i]));
        next[i] += 1;
    }
    out
}

/// Whether a tensor is a norm that scaling folds into (`attn_norm`, `ffn_norm`).
fn scaled_norm(name: &str) -> bool {
    name.ends_with(".attn_norm.weight") || name.ends_with(".ffn_norm.weight")
}

/// Build the stacked `.cairn` bytes. `scales`: per weight name, its input-channel
/// scales (empty: no scaling).
pub fn build(
    src: &ModelFile,
    scales: &HashMap<String, Vec<f32>>,
    opts: &StackOptions,
    extra: &[(String, MetaValue)],
    bar: &ProgressBar,
) -> Result<(Vec<u8>, Vec<MatrixStack>)> {
    let arch = src.meta("general.architecture").and_then(|v| v.as_str()).unwrap_or("");
    if !scales.is_empty() && arch != "llama" {
        return Err(Error::input(format!(
            "activation-aware scaling supports the llama architecture, not {arch:?}; run without --calib"
        )));
    }
    // Which scale multiplies a matrix's columns, and which divides its rows or a norm.
    let col_scale = |name: &str| -> Option<&Vec<f32>> {
        let blk = name.rsplit_once('.').map(|(a, _)| a)?.rsplit_once('.').map(|(a, _)| a)?;
        let key = if name.contains(".attn_q.") || name.contains(".attn_k.") || name.contains(".attn_v.") {
            format!("{blk}.attn_q.weight")
        } else if name.contains(".ffn_gate.") || name.contains(".ffn_up.") {
            format!("{blk}.ffn_gate.weight")
        } else if name.contains(".ffn_down.") {
            format!("{blk}.ffn_down.weight")
        } else {
            return None;
        };
        scales.get(&key)
    };
    let linear: Vec<_> = src.tensors.iter().filter(|t| is_linear(t)).collect();
    for t in &linear {
        let (m, n) = (t.dims[1] as usize, t.dims[0] as usize);
        BlockShape::new(m, n, opts.rank).map_err(|e| Error::input(format!("{}: {e}", t.name)))?;
    }
    let units: u64 = linear.iter().map(|t| t.n_elements()).sum::<u64>() * opts.levels as u64;
    bar.set_length(units.max(1));
    let mut order: Vec<usize> = (0..linear.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(linear[i].n_elements()));
    let mut stacks: Vec<(usize, MatrixStack)> = order
        .par_iter()
        .map(|&i| {
            let t = linear[i];
            let (m, n) = (t.dims[1] as usize, t.dims[0] as usize);
            let mut w = src.tensor(&t.name, &t.dims)?.to_f32()?;
            if let Some(s) = col_scale(&t.name) {
                for row in w.chunks_mut(n) {
                    row.iter_mut().zip(s).for_each(|(x, s)| *x *= s);
                }
            }
            if t.name.contains(".ffn_up.") {
                let down = t.name.replace(".ffn_up.", ".ffn_down.");
                if let Some(s) = scales.get(&down) {
                    for (row, s) in w.chunks_mut(n).zip(s) {
                        row.iter_mut().for_each(|x| *x /= s);
                    }
                }
            }
            let shape = BlockShape::new(m, n, opts.rank).map_err(|e| Error::model(e.to_string()))?;
            let tick = || bar.inc((m * n) as u64);
            // Unscaled matrices weigh their error by their own recorded input norms.
            let act = if col_scale(&t.name).is_none() { scales.get(&t.name).map(Vec::as_slice) } else { None };
            Ok((i, decompose(&t.name, w, shape, opts.levels, act, opts.iters, &tick)?))
        })
        .collect::<Result<_>>()?;
    stacks.sort_by_key(|(i, _)| *i);
    let mut stacks: Vec<MatrixStack> = stacks.into_iter().map(|(_, s)| s).collect();

    let mut b = CairnBuilder::new();
    for (k, v) in &src.metadata {
        if k != "general.alignment" {
            b.meta(k, v.clone());
        }
    }
    for (k, v) in extra {
        b.meta(k, v.clone());
    }
    let mut n_dense = 0u32;
    for t in src.tensors.iter().filter(|t| !is_linear(t)) {
        let host = src.tensor(&t.name, &t.dims)?;
        let key = if t.name.ends_with(".attn_norm.weight") {
            t.name.replace(".attn_norm.", ".attn_q.")
        } else {
            t.name.replace(".ffn_norm.", ".ffn_gate.")
        };
        match scales.get(&key).filter(|_| scaled_norm(&t.name)) {
            Some(s) => {
                let w: Vec<f32> = host.to_f32()?.iter().zip(s).map(|(w, s)| w / s).collect();
                let bytes = w.iter().flat_map(|x| x.to_le_bytes()).collect();
                b.tensor(&t.name, &t.dims, GgmlType::F32, bytes).map_err(|e| Error::model(e.to_string()))?;
            }
            None => {
                b.tensor(&t.name, &t.dims, t.ty, host.bytes().to_vec()).map_err(|e| Error::model(e.to_string()))?;
            }
        }
        n_dense += 1;
    }
    let n_layers = src.tensors.iter().filter(|t| t.name.ends_with(".attn_norm.weight")).count();
    let e0_of: HashMap<String, f64> = stacks.iter().map(|s| (s.name.clone(), s.energy_act[0])).collect();
    let stats = StackStats {
        energy: stacks.iter().map(|s| s.energy.clone()).collect(),
        energy_act: stacks.iter().map(|s| s.energy_act.clone()).collect(),
        residual_weight: stacks
            .iter()
            .map(|s| residual_weight(&s.name, s.energy_act[0], &|w| e0_of.get(w).copied(), scales, n_layers))
            .collect(),
    };
    let pages: Vec<u64> = stacks.iter().map(|s| s.shape.page_bytes()).collect();
    // Without calibration there is no residual statistic: fall back to the activation proxy.
    let proxy = if opts.proxy == Proxy::Residual && stats.residual_weight.iter().any(|&w| w <= 0.0) {
        Proxy::Activation
    } else {
        opts.proxy
    };
    for (s, g) in stacks.iter_mut().zip(stats.gains(proxy, &pages)) {
        s.gain = g;
    }
    b.meta(META_RESIDUAL, MetaValue::array(stats.residual_weight.iter().map(|&w| MetaValue::F64(w)).collect()));
    b.meta("cairn.stack.proxy", MetaValue::String(format!("{proxy:?}")));
    // Every matrix's error after each level, so other orders can be tried without a
    // reconversion (`stack-eval --order`).
    let flat = |f: &dyn Fn(&MatrixStack) -> &Vec<f64>| {
        MetaValue::array(stacks.iter().flat_map(|s| f(s).iter().map(|&e| MetaValue::F64(e))).collect())
    };
    b.meta(META_ENERGY, flat(&|s| &s.energy));
    b.meta(META_ENERGY_ACT, flat(&|s| &s.energy_act));
    let gains: Vec<Vec<f64>> = stacks.iter().map(|s| s.gain.clone()).collect();
    let global = global_order(&gains);
    let mut entries = Vec::with_capacity(global.len());
    let mut cumulative = 0u64;
    for (pos, &(mi, level)) in global.iter().enumerate() {
        let s = &mut stacks[mi];
        let data = std::mem::take(&mut s.blocks[level]);
        let len = data.len() as u64;
        b.tensor_aligned(&block_name(&s.name, level), &[len], BLOCK_TYPE, data, PAGE)
            .map_err(|e| Error::model(e.to_string()))?;
        cumulative += s.shape.page_bytes();
        entries.push(StackEntry { matrix: mi as u32, level: level as u32, tensor: n_dense + pos as u32, cumulative });
    }
    let table = StackTable {
        rank: opts.rank as u32,
        matrices: stacks
            .iter()
            .map(|s| StackMatrix { name: s.name.clone(), rows: s.shape.m as u64, cols: s.shape.n as u64 })
            .collect(),
        entries,
    };
    b.stack_table(table.encode());
    Ok((b.build(), stacks))
}

/// The whole command: calibrate, decompose, order, write atomically, report.
pub fn run(input: &Path, output: &Path, opts: &StackOptions) -> Result<()> {
    let t0 = Instant::now();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(if opts.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            opts.threads
        })
        .build()
        .map_err(|e| Error::model(format!("cannot start threads: {e}")))?;
    let scales = match &opts.calib {
        Some(p) => {
            let text = std::fs::read(p).map_err(|source| Error::Io { path: p.clone(), source })?;
            let s = calibrate(input, &String::from_utf8_lossy(&text), opts.calib_tokens, opts.threads)?;
            eprintln!(
                "calibration: {} weights' input statistics from {} ({:.1} s)",
                s.len(),
                p.display(),
                t0.elapsed().as_secs_f64()
            );
            s
        }
        None => HashMap::new(),
    };
    let src = ModelFile::open(input)?;
    let name = input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let calib =
        opts.calib.as_ref().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let extra = vec![
        ("cairn.source.file".to_string(), MetaValue::String(name)),
        ("cairn.convert.quant".to_string(), MetaValue::String(format!("bitstack k{} x{}", opts.rank, opts.levels))),
        ("cairn.stack.rank".to_string(), MetaValue::U32(opts.rank as u32)),
        ("cairn.stack.levels".to_string(), MetaValue::U32(opts.levels as u32)),
        ("cairn.stack.calib".to_string(), MetaValue::String(calib)),
        ("cairn.convert.tool".to_string(), MetaValue::String(format!("cairn {}", env!("CARGO_PKG_VERSION")))),
    ];
    let bar = ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:30}] {percent}% {elapsed_precise} eta {eta_precise}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(format!("stacking {} levels of rank {}", opts.levels, opts.rank));
    let t1 = Instant::now();
    let (data, stacks) = pool.install(|| build(&src, &scales, opts, &extra, &bar))?;
    bar.finish_and_clear();
    let decompose_s = t1.elapsed().as_secs_f64();
    for s in &stacks {
        let errs: Vec<String> = s.rel_err.iter().step_by(4).map(|e| format!("{e:.3}")).collect();
        log::info!("{:<28} relative error by level: {}", s.name, errs.join(" "));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let part = output.with_extension("cairn.part");
    let mut f = std::fs::File::create(&part).map_err(io(&part))?;
    f.write_all(&data).map_err(io(&part))?;
    f.sync_all().map_err(io(&part))?;
    std::fs::rename(&part, output).map_err(io(output))?;
    let mean_err = |l: usize| {
        stacks.iter().map(|s| s.rel_err.get(l).copied().unwrap_or(0.0)).sum::<f64>() / stacks.len().max(1) as f64
    };
    eprintln!(
        "wrote {} ({} bytes): {} matrices × {} levels, rank {}; mean relative error after level 1: {:.3}, after all: {:.4}; decomposition {:.1} s, total {:.1} s",
        output.display(),
        data.len(),
        stacks.len(),
        opts.levels,
        opts.rank,
        mean_err(0),
        mean_err(opts.levels.saturating_sub(1)),
        decompose_s,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
