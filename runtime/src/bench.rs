//! `cairn bench`: prompt processing and text generation speed as llama-bench measures
//! them (tokenization and sampling excluded), the load time, peak memory, and the
//! streaming-read bandwidth that bounds decoding.

use std::time::Instant;

use serde::Serialize;

use crate::engine::{Engine, EngineOptions};
use crate::error::Result;
use crate::model::{Logits, Segment, PREFILL_CHUNK};
use crate::synthetic::SplitMix;
use crate::weights::ModelFile;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub prompt: usize,
    pub gen: usize,
    pub threads: usize,
    pub backend: crate::backend::BackendKind,
    pub reps: usize,
    /// Memory budget for a BitStack model (`None`: every block).
    pub memory: Option<u64>,
    pub dense_cache: crate::bitstack::DenseCache,
    /// Sequences decoded together in the generation test (one batched pass per step,
    /// as `cairn serve` runs its slots); tg then reports their aggregate tokens/s.
    pub parallel: usize,
}

/// Mean and sample standard deviation of a set of measurements.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stat {
    pub mean: f64,
    pub stddev: f64,
}

impl Stat {
    pub fn of(xs: &[f64]) -> Stat {
        let n = xs.len().max(1) as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = if xs.len() > 1 { xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
        Stat { mean, stddev: var.sqrt() }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub model_bytes: usize,
    /// Bytes of weights read per decoded token (every matrix once, plus the output head).
    pub weight_bytes_per_token: usize,
    pub backend: String,
    pub threads: usize,
    pub load_seconds: f64,
    pub pp_tokens: usize,
    pub pp_tps: Option<Stat>,
    pub tg_tokens: usize,
    pub tg_tps: Option<Stat>,
    /// Streaming-read bandwidth with the same threads, GB/s.
    pub read_gbps: f64,
    /// Weight bytes per token ÷ time per token, as a fraction of `read_gbps`.
    pub tg_bandwidth_fraction: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
}

pub fn run(path: &std::path::Path, o: &BenchOptions) -> Result<BenchReport> {
    let t = Instant::now();
    // The budget reserves the caches this holds at once: `parallel` of prompt or gen
    // length (the planner refuses small budgets for the model's whole context).
    let held = (o.prompt.max(o.gen) + 1) * o.parallel.max(1);
    let engine = Engine::load(
        path,
        &EngineOptions {
            threads: o.threads,
            backend: o.backend,
            memory: o.memory,
            dense_cache: o.dense_cache,
            context: held,
            budget_counts_process: true,
            ..Default::default()
        },
    )?;
    let load_seconds = t.elapsed().as_secs_f64();
    let c = engine.runner.config().clone();
    let mut rng = SplitMix(0xBE7C);
    let mut random_ids = |n: usize| -> Vec<u32> { (0..n).map(|_| (rng.next_u64() % c.vocab as u64) as u32).collect() };
    let context = (o.prompt.max(o.gen) + 1).min(c.context);

    // One warm-up of each, as llama-bench does, so page faults and lazy setup stay out.
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    for rep in 0..=o.reps {
        if o.prompt > 0 {
            let ids = random_ids(o.prompt.min(c.context));
            let mut cache = engine.runner.new_cache(context)?;
            let t = Instant::now();
            for chunk in ids.chunks(PREFILL_CHUNK) {
                engine.runner.forward(cache.as_mut(), chunk, Logits::Last)?;
            }
            if rep > 0 {
                pp.push(ids.len() as f64 / t.elapsed().as_secs_f64());
            }
        }
        if o.gen > 0 && o.parallel <= 1 {
            let ids = random_ids(o.gen.min(c.context));
            let mut cache = engine.runner.new_cache(context)?;
            let t = Instant::now();
            for &id in &ids {
                engine.runner.forward(cache.as_mut(), &[id], Logits::Last)?;
            }
            if rep > 0 {
                tg.push(ids.len() as f64 / t.elapsed().as_secs_f64());
            }
        } else if o.gen > 0 {
            let seqs: Vec<Vec<u32>> = (0..o.parallel).map(|_| random_ids(o.gen.min(c.context))).collect();
            let mut caches = (0..o.parallel).map(|_| engine.runner.new_cache(context)).collect::<Result<Vec<_>>>()?;
            let t = Instant::now();
            for step in 0..seqs[0].len() {
                let mut batch: Vec<Segment<'_>> = caches
                    .iter_mut()
                    .zip(&seqs)
                    .map(|(c, s)| Segment { cache: c.as_mut(), ids: &s[step..step + 1], logits: Some(Logits::Last) })
                    .collect();
                engine.runner.forward_batch(&mut batch)?;
            }
            if rep > 0 {
                tg.push((seqs.len() * seqs[0].len()) as f64 / t.elapsed().as_secs_f64());
            }
        }
    }
    let weight_bytes_per_token = weight_bytes_per_token(&engine.file);
    // Before the bandwidth test, whose buffer is not the model's memory.
    let peak_rss_bytes = peak_rss();
    let threads = if o.threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { o.threads };
    let (model_bytes, backend) = (engine.file.file_bytes(), engine.runner.backend_name());
    // The model goes first, and under a budget the buffer fits in what the process
    // does not hold by then: it stays within its budget through the bandwidth test too.
    drop(engine);
    let room = o.memory.map(|b| b.saturating_sub(current_rss().unwrap_or(0)) as usize);
    let read_gbps = read_bandwidth_in(threads, room.map_or(BANDWIDTH_BYTES, |r| r.min(BANDWIDTH_BYTES)));
    let tg_tps = (!tg.is_empty()).then(|| Stat::of(&tg));
    Ok(BenchReport {
        model: path.display().to_string(),
        model_bytes,
        weight_bytes_per_token,
        backend,
        threads,
        load_seconds,
        pp_tokens: o.prompt,
        pp_tps: (!pp.is_empty()).then(|| Stat::of(&pp)),
        tg_tokens: o.gen,
        tg_bandwidth_fraction: tg_tps.map(|s| weight_bytes_per_token as f64 * s.mean / 1e9 / read_gbps),
        tg_tps,
        read_gbps,
        peak_rss_bytes,
    })
}

/// Weight bytes a decode step reads: every matrix of the layers once, plus the output
/// head; one embedding row is noise.
pub fn weight_bytes_per_token(f: &ModelFile) -> usize {
    // A BitStack file's layers read only the blocks its budget keeps (or their copies),
    // counted below: neither the blocks' tensors nor their matrices count here.
    let stacked = |name: &str| {
        let name = cairn_formats::bitstack::block_of(name).map_or(name, |(m, _)| m);
        f.stack.as_ref().and_then(|s| s.weight(name)).is_some()
    };
    let mut bytes: u64 =
        f.tensors.iter().filter(|t| t.name.starts_with("blk.") && !stacked(&t.name)).map(|t| t.size).sum();
    if let Some(s) = &f.stack {
        // The bytes of the blocks in use (not their page-rounded residency), or of the
        // dense copy a matrix runs from.
        for (i, w) in s.weights.iter().enumerate() {
            let c = w.active();
            bytes += match s.matrix_cost(i, c) {
                (copy, true) => copy,
                _ => w.block_bytes(c),
            };
        }
    }
    let head = f.tensor_info("output.weight").or_else(|| f.tensor_info("token_embd.weight"));
    bytes += head.map_or(0, |t| t.size);
    bytes as usize
}

/// Streaming read of a buffer much larger than the caches, split across `threads`
/// threads; the best of a few passes, in GB/s.
pub fn read_bandwidth(threads: usize) -> f64 {
    read_bandwidth_in(threads, BANDWIDTH_BYTES)
}

/// The bandwidth test's buffer: far larger than any cache.
const BANDWIDTH_BYTES: usize = 256 << 20;

/// [`read_bandwidth`] over a buffer of `bytes` (at least 32 MiB, past the caches).
fn read_bandwidth_in(threads: usize, bytes: usize) -> f64 {
    let threads = threads.max(1);
    let words: usize = bytes.max(32 << 20) / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let sum: u64 = std::thread::scope(|s| {
            let chunk = words.div_ceil(threads);
            let handles: Vec<_> = buf
                .chunks(chunk)
                .map(|c| s.spawn(move || c.chunks_exact(8).fold(0u64, |a, w| a ^ w[0] ^ w[3] ^ w[5] ^ w[7])))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).fold(0, |a, b| a ^ b)
        });
        std::hint::black_box(sum);
        best = best.max((words * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

pub use crate::engine::{current_rss, peak_rss};

impl BenchReport {
    pub fn markdown(&self) -> String {
        let f = |s: &Option<Stat>| s.map_or("-".into(), |s| format!("{:.2} ± {:.2}", s.mean, s.stddev));
        let mut out = String::new();
        out.push_str("| model | backend | threads | test | t/s |\n| --- | --- | ---: | --- | ---: |\n");
        let name =
            std::path::Path::new(&self.model).file_name().map_or(self.model.clone(), |n| n.to_string_lossy().into());
        if self.pp_tokens > 0 {
            out.push_str(&format!(
                "| {name} | {} | {} | pp{} | {} |\n",
                self.backend,
                self.threads,
                self.pp_tokens,
                f(&self.pp_tps)
            ));
        }
        if self.tg_tokens > 0 {
            out.push_str(&format!(
                "| {name} | {} | {} | tg{} | {} |\n",
                self.backend,
                self.threads,
                self.tg_tokens,
                f(&self.tg_tps)
            ));
        }
        out.push_str(&format!(
            "\nload {:.3} s; peak RSS {}; streaming read {:.1} GB/s",
            self.load_seconds,
            self.peak_rss_bytes.map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / (1 << 20) as f64)),
            self.read_gbps
        ));
        if let Some(frac) = self.tg_bandwidth_fraction {
            out.push_str(&format!(
                "; decode reads {:.1} MB/token = {:.0}% of the read bandwidth",
                self.weight_bytes_per_token as f64 / 1e6,
                frac * 100.0
            ));
        }
        out.push('\n');
        out
    }
}
