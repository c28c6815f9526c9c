//! The commands themselves: load what they need, do one job, print the result.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::ModelArgs;
use crate::engine::{self, Chat, Engine, EngineOptions};
use crate::error::{Error, Result};
use crate::longctx::{FilterLayer, Method};
use crate::needle::{self, NeedleOptions};
use crate::pull::{self, PullOptions};
use crate::sampling::{Sampler, SamplingHints};
use crate::weights::ModelFile;

fn model_path(m: &ModelArgs) -> Result<PathBuf> {
    resolve_model(m.model.as_deref())
}

/// A model name (fetched if needed) or a path.
pub fn resolve_model(name: Option<&str>) -> Result<PathBuf> {
    pull::resolve_model(name).map_err(|e| Error::Fetch(e.to_string()))
}

fn engine_options(m: &ModelArgs) -> Result<EngineOptions> {
    let memory = m.memory.as_deref().map(crate::bitstack::parse_size).transpose()?;
    let dense_cache = crate::bitstack::DenseCache::parse(&m.dense_cache)?;
    Ok(EngineOptions {
        threads: m.threads,
        exact: m.exact,
        backend: m.backend,
        memory,
        context: m.ctx_size,
        dense_cache,
        // `--memory` bounds what the command's process holds (its peak RSS).
        budget_counts_process: true,
    })
}

fn load(m: &ModelArgs) -> Result<Engine> {
    load_for(m, m.ctx_size)
}

/// Load with a memory budget that reserves a cache of `context` tokens (0: the
/// model's): what the command will actually hold, so a budget is neither refused for
/// a context the command never uses nor exceeded by one it does.
fn load_for(m: &ModelArgs, context: usize) -> Result<Engine> {
    let opts = EngineOptions { context, ..engine_options(m)? };
    let engine = Engine::load(&model_path(m)?, &opts)?;
    if let Some(note) = &engine.backend_note {
        eprintln!("note: {note}");
    }
    Ok(engine)
}

fn flush(s: &str) -> ControlFlow<()> {
    let mut out = std::io::stdout().lock();
    // A closed stdout (`| head`) ends the generation rather than the process.
    match out.write_all(s.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => ControlFlow::Continue(()),
        Err(_) => ControlFlow::Break(()),
    }
}

pub fn pull(name: Option<&str>, verify: bool) -> Result<()> {
    let name = name.unwrap_or(pull::default_model());
    let opts = PullOptions { verify, ..PullOptions::default() };
    let path = pull::pull(name, &opts).map_err(|e| Error::Fetch(e.to_string()))?;
    println!("{}", path.display());
    Ok(())
}

/// How each answer is produced.
pub struct Turn {
    pub max_new: usize,
    /// The sampling flags given; the rest come from the model ([`pull::model_sampling`]).
    pub flags: SamplingHints,
    pub seed: u64,
    pub method: Method,
    pub show_selected: bool,
}

/// The kept prompt text, runs of consecutive tokens joined by " … ".
fn show_selected(engine: &Engine, ids: &[u32], sel: Option<&[usize]>) {
    let Some(sel) = sel else {
        eprintln!("[selected: the whole prompt of {} tokens was kept]", ids.len());
        return;
    };
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut last = None;
    for &i in sel {
        if last.is_none_or(|l: usize| l + 1 != i) {
            runs.push(Vec::new());
        }
        if let (Some(run), Some(&id)) = (runs.last_mut(), ids.get(i)) {
            run.push(id);
        }
        last = Some(i);
    }
    let text: Vec<String> = runs.iter().map(|r| engine.tokenizer.decode(r).unwrap_or_default()).collect();
    eprintln!(
        "[selected {} of {} tokens in {} runs]\n{}\n[end of selection]",
        sel.len(),
        ids.len(),
        runs.len(),
        text.join(" … ")
    );
}

fn describe(engine: &Engine, method: Method) {
    if let Method::GemFilter { k, layer } = method {
        let r = match layer {
            FilterLayer::Fixed(r) => r.to_string(),
            FilterLayer::Auto => "auto".into(),
        };
        log::info!("gemfilter: k={k}, layer={r} of {}", engine.runner.config().n_layers);
    }
}

/// The sampler for `engine`'s model under the user's `flags`.
fn sampler_for(engine: &Engine, flags: &SamplingHints, seed: u64) -> Sampler {
    let d = pull::model_sampling(&engine.file, flags, seed);
    log::info!("sampling: {}", d.describe());
    Sampler::new(d.config)
}

pub fn chat(m: &ModelArgs, prompt: Option<&str>, system: Option<&str>, turn: Turn) -> Result<()> {
    let Turn { max_new, flags, seed, method, show_selected: show } = turn;
    let engine = load(m)?;
    describe(&engine, method);
    let mut chat = Chat::new(&engine, m.ctx_size, system)?;
    chat.session.set_method(method)?;
    match &engine.template {
        Err(why) if why.contains("no chat template") => {
            eprintln!(
                "note: this model has no chat template (a base model): chat continues your text as raw completion"
            )
        }
        Err(why) => {
            eprintln!("note: the chat template is unusable ({why}): chat continues your text as raw completion")
        }
        Ok(_) => {}
    }
    let mut sampler = sampler_for(&engine, &flags, seed);
    if let Some(p) = prompt {
        chat.reply(p, max_new, &mut sampler, flush)?;
        println!();
        if show {
            show_selected(&engine, &chat.last_prompt, chat.session.selected.as_deref());
        }
        return Ok(());
    }
    eprintln!(
        "Chatting with {} ({}). Type /exit or Ctrl-D to quit, /reset to start over, /memory SIZE to change the budget.",
        engine.file.path.display(),
        engine.runner.backend_name()
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).map_err(|e| Error::Input(e.to_string()))? == 0 {
            eprintln!();
            return Ok(());
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => return Ok(()),
            "/reset" => {
                chat = Chat::new(&engine, m.ctx_size, system)?;
                chat.session.set_method(method)?;
                continue;
            }
            l if l.starts_with("/memory") => {
                // The chat and its cache stay: the next token already uses the new blocks.
                match crate::bitstack::parse_size(l.trim_start_matches("/memory"))
                    .and_then(|b| engine.set_memory_budget(b))
                {
                    Ok(plan) => eprintln!("{plan}"),
                    Err(e) => eprintln!("error: {e}"),
                }
                continue;
            }
            _ => {}
        }
        let t = Instant::now();
        match chat.reply(line, max_new, &mut sampler, flush) {
            Ok(g) => {
                println!();
                if show {
                    show_selected(&engine, &chat.last_prompt, chat.session.selected.as_deref());
                }
                let s = t.elapsed().as_secs_f64();
                log::info!("{} tokens in {s:.2} s", g.ids.len());
            }
            // A turn that cannot run (context full, ...) is reported; the chat goes on.
            Err(e) => eprintln!("\nerror: {e}"),
        }
    }
}

pub fn generate(m: &ModelArgs, prompt: &str, head: Option<usize>, turn: Turn, json: bool, stats: bool) -> Result<()> {
    let Turn { max_new, flags, seed, method, show_selected: show } = turn;
    let engine = load(m)?;
    describe(&engine, method);
    let mut ids = engine.tokenize(prompt)?;
    if let Some(h) = head {
        if h == 0 {
            return Err(Error::input("--head-tokens must be at least 1"));
        }
        ids.truncate(h);
    }
    let mut session = engine.new_session(m.ctx_size)?;
    session.set_method(method)?;
    let mut sampler = sampler_for(&engine, &flags, seed);
    let (t, cpu0) = (Instant::now(), cpu_seconds());
    let logits = session.prefill_method(&ids)?;
    let ttft = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds().zip(cpu0).map(|(b, a)| b - a);
    if stats {
        let v = serde_json::json!({
            "method": method.name(), "k": method.budget(), "prompt_tokens": ids.len(),
            "kept": session.selected.as_ref().map_or(session.cached(), |s| s.len()),
            "ttft_s": ttft, "prefill_cpu_s": cpu, "peak_rss_mib": crate::bench::peak_rss().map(|b| b as f64 / 1048576.0),
        });
        eprintln!("{v}");
    }
    if show {
        show_selected(&engine, &ids, session.selected.as_deref());
    }
    if json {
        let g = session.decode(logits, max_new, &mut sampler, |_| ControlFlow::Continue(()))?;
        let v = serde_json::json!({ "prompt_ids": ids, "ids": g.ids, "text": g.text });
        println!("{v}");
    } else {
        if head.is_none() {
            let _ = flush(prompt);
        }
        session.decode(logits, max_new, &mut sampler, flush)?;
        println!();
    }
    Ok(())
}

/// CPU time this process has used (Linux: utime + stime from /proc/self/stat, at the
/// usual 100 ticks per second): on a shared machine it measures the work where wall
/// time measures the neighbours.
fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

pub fn tokenize(m: &ModelArgs, text: &str, json: bool) -> Result<()> {
    // No cache at all: a budget need not reserve one.
    let engine = load_for(m, m.ctx_size.max(1))?;
    let ids = engine.tokenize(text)?;
    if json {
        println!("{}", serde_json::json!({ "ids": ids }));
    } else {
        for id in ids {
            let piece = engine.tokenizer.token_to_piece(id)?;
            println!("{id:6} {:?}", String::from_utf8_lossy(piece));
        }
    }
    Ok(())
}

pub fn eval(m: &ModelArgs, ids: &[u32], top: usize, json: bool, method: Option<Method>) -> Result<()> {
    let ctx = if m.ctx_size == 0 { ids.len() } else { m.ctx_size };
    if ids.len() > ctx {
        return Err(Error::input(format!("{} ids exceed the context of {ctx} tokens (-c)", ids.len())));
    }
    let engine = load_for(m, ctx)?;
    let sel: Vec<usize> = match method {
        Some(method) => engine.select(ids, method)?,
        None => (0..ids.len()).collect(),
    };
    let kept: Vec<u32> = sel.iter().filter_map(|&i| ids.get(i).copied()).collect();
    // Only each row's top entries are kept, never every position's logits.
    let mut tops: Vec<Vec<(u32, f32)>> = Vec::with_capacity(kept.len());
    engine.for_each_logits(&kept, |_, row| {
        tops.push(top_k(row, top));
        Ok(())
    })?;
    if json {
        let v: Vec<Vec<serde_json::Value>> =
            tops.iter().map(|t| t.iter().map(|&(id, l)| serde_json::json!([id, l])).collect()).collect();
        let mut out = serde_json::json!({ "top": v });
        if method.is_some() {
            out["kept"] = serde_json::json!(sel);
        }
        println!("{out}");
    } else {
        for (pos, t) in sel.iter().zip(&tops) {
            let cells: Vec<String> = t.iter().map(|(id, l)| format!("{id}:{l:.3}")).collect();
            println!("{pos:4} {}", cells.join(" "));
        }
    }
    Ok(())
}

pub fn needle(
    m: &ModelArgs,
    opts: &NeedleOptions,
    haystack: Option<&Path>,
    output: Option<&Path>,
    save_auto: bool,
) -> Result<()> {
    needle::check_methods(opts)?;
    // A case holds its full cache and one method's session beside it.
    let longest = opts.lengths.iter().copied().max().unwrap_or(0) + opts.max_new;
    let engine = load_for(m, if m.ctx_size == 0 { 2 * longest } else { m.ctx_size })?;
    let (hay, paths) = needle::haystack(haystack)?;
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    eprintln!("haystack: {} ({} bytes)", names.join(" + "), hay.len());
    let t = Instant::now();
    let report = needle::run(&engine, &hay, opts, |c| {
        let answers: Vec<String> =
            c.answers.iter().map(|a| format!("{}={}", a.method, if a.correct { "ok" } else { "miss" })).collect();
        eprintln!(
            "length {} depth {} seed {} ({} tokens, value {}): {} [{:.0} s]",
            c.length,
            c.depth,
            c.seed,
            c.prompt_tokens,
            c.value,
            answers.join(" "),
            t.elapsed().as_secs_f64()
        );
    })?;
    print!("{}", report.markdown());
    if save_auto {
        let r = needle::earliest_layer(&report.recall_by_layer)
            .ok_or_else(|| Error::input("no layer kept the value in 90% of the cases: nothing saved"))?;
        needle::save_auto(&engine, r, &report)?;
        eprintln!("layer=auto for this model is now {r}");
    }
    if let Some(path) = output {
        let mut v = serde_json::to_value(&report).map_err(|e| Error::Input(e.to_string()))?;
        v["haystack"] = serde_json::json!(names);
        v["model"] = serde_json::json!(engine.file.path.display().to_string());
        let text = serde_json::to_string_pretty(&v).map_err(|e| Error::Input(e.to_string()))?;
        std::fs::write(path, text).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    }
    Ok(())
}

/// The `k` largest logits, largest first (ties: lower id first).
pub fn top_k(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
    idx.truncate(k);
    idx.into_iter().map(|i| (i, row[i as usize])).collect()
}

/// The window of perplexity and stack-eval: `-c`/`--ctx`, else 512 tokens.
pub fn window(m: &ModelArgs) -> usize {
    if m.ctx_size == 0 {
        512
    } else {
        m.ctx_size
    }
}

pub fn perplexity(m: &ModelArgs, file: &Path, windows: Option<usize>) -> Result<()> {
    let window = window(m);
    // The window is the one cache held: it is what a budget reserves.
    let engine = load_for(m, window)?;
    let text = std::fs::read(file).map_err(|source| Error::Io { path: file.to_path_buf(), source })?;
    let text = String::from_utf8_lossy(&text);
    let t = Instant::now();
    let (all, half) = engine::perplexity(&engine, &text, window, windows, |w, n, ppl| {
        eprintln!("window {w}/{n}: running ppl {ppl:.4} ({:.1} s)", t.elapsed().as_secs_f64());
    })?;
    println!("ppl = {all:.4} (second half: {half:.4})");
    Ok(())
}

/// The GPU adapters the wgpu backend can use, with what it needs to know of them.
pub fn devices() -> Result<()> {
    #[cfg(feature = "cuda")]
    match crate::backend::cuda::driver::devices() {
        Ok(list) => {
            for d in list {
                println!(
                    "cuda [{}] {} (compute {}.{}, {} MiB, {}{})",
                    d.ordinal,
                    d.name,
                    d.compute.0,
                    d.compute.1,
                    d.memory >> 20,
                    if d.integrated { "integrated" } else { "discrete" },
                    if d.host_register { ", host memory usable in place" } else { "" }
                );
            }
        }
        Err(e) => println!("no CUDA devices: {e}; --backend cuda is unavailable"),
    }
    #[cfg(not(feature = "cuda"))]
    println!("this build of cairn has no CUDA backend (built without the `cuda` feature)");
    #[cfg(feature = "wgpu")]
    {
        let list = crate::backend::wgpu::list_adapters();
        if list.is_empty() {
            println!("no GPU adapters (no Vulkan/Metal/DX12 driver found); --backend wgpu is unavailable");
        }
        for a in list {
            println!("[{}] {} ({}, {}, driver: {})", a.index, a.name, a.device_type, a.backend, a.driver);
            println!(
                "    shader-f16: {}, subgroups: {} (size {}..{}), max storage binding {} MiB, max buffer {} MiB, workgroup memory {} KiB, {} invocations",
                if a.shader_f16 { "yes" } else { "no" },
                if a.subgroups { "yes" } else { "no" },
                a.subgroup_sizes.0,
                a.subgroup_sizes.1,
                a.max_storage_binding >> 20,
                a.max_buffer >> 20,
                a.max_workgroup_storage >> 10,
                a.max_invocations
            );
        }
    }
    #[cfg(not(feature = "wgpu"))]
    println!("this build of cairn has no wgpu backend (built without the `wgpu` feature)");
    Ok(())
}

pub fn info(m: &ModelArgs) -> Result<()> {
    let path = model_path(m)?;
    let file = ModelFile::open(&path)?;
    let c = crate::model::ModelConfig::from_file(&file);
    println!("file: {} ({} bytes, {:?})", path.display(), file.file_bytes(), file.kind);
    let verified = file.verify_all()?;
    if verified > 0 {
        println!("checksums: all {verified} tensors verified");
    }
    for key in ["general.name", "general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre"] {
        if let Some(v) = file.meta(key).and_then(|v| v.as_str()) {
            println!("{key}: {v}");
        }
    }
    if let Some(spec) = pull::spec_for_file(&file) {
        println!("registry: {}", spec.name);
    }
    // What chat and generate sample with when no flag is given (seed aside).
    println!("sampling defaults: {}", pull::model_sampling(&file, &SamplingHints::NONE, 0).describe());
    match c {
        Ok(c) => {
            println!("layers {}, hidden {}, heads {} (kv {}), head dim {}, ffn {}, vocab {}, context {}, rope base {}, norm eps {:e}",
                c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab, c.context, c.rope_base, c.norm_eps);
        }
        Err(e) => println!("hyper-parameters: {e}"),
    }
    let mut by_type: BTreeMap<String, (usize, u64, u64)> = BTreeMap::new();
    let (mut lin_bytes, mut lin_params) = (0u64, 0u64);
    for t in &file.tensors {
        let e = by_type.entry(t.ty.to_string()).or_default();
        e.0 += 1;
        e.1 += t.n_elements();
        e.2 += t.size;
        if crate::convert::is_linear(t) {
            lin_bytes += t.size;
            lin_params += t.n_elements();
        }
    }
    for (k, v) in file.metadata.iter().filter(|(k, _)| k.starts_with("cairn.")) {
        println!("{k}: {v}");
    }
    // A BitStack file's matrices are its blocks (I8 tensors), at the whole stack.
    if let Some(s) = &file.stack {
        lin_bytes += s.weights.iter().map(|w| w.block_bytes(w.levels())).sum::<u64>();
        lin_params += s.weights.iter().map(|w| (w.shape.m * w.shape.n) as u64).sum::<u64>();
    }
    println!(
        "linear weights: {lin_bytes} bytes, {lin_params} params, {:.3} bits/param",
        lin_bytes as f64 * 8.0 / lin_params.max(1) as f64
    );
    println!("{} tensors:", file.tensors.len());
    for (ty, (n, elems, bytes)) in by_type {
        println!(
            "  {ty:10} {n:4} tensors {elems:>12} values {bytes:>12} bytes ({:.2} bits/value)",
            bytes as f64 * 8.0 / elems as f64
        );
    }
    Ok(())
}

pub fn bench(m: &ModelArgs, prompt: usize, gen: usize, reps: usize, parallel: usize, output: &str) -> Result<()> {
    let path = model_path(m)?;
    let memory = m.memory.as_deref().map(crate::bitstack::parse_size).transpose()?;
    let dense_cache = crate::bitstack::DenseCache::parse(&m.dense_cache)?;
    let opts = crate::bench::BenchOptions {
        prompt,
        gen,
        threads: m.threads,
        reps: reps.max(1),
        backend: m.backend,
        memory,
        dense_cache,
        parallel: parallel.max(1),
    };
    let report = crate::bench::run(&path, &opts)?;
    if output == "json" {
        println!("{}", serde_json::to_string(&report).map_err(|e| Error::Input(e.to_string()))?);
    } else {
        print!("{}", report.markdown());
    }
    Ok(())
}

/// One point of the BitStack memory curve.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CurvePoint {
    /// The block order the point was taken in.
    pub order: String,
    pub blocks: usize,
    pub stack_bytes: u64,
    pub total_bytes: u64,
    pub bits_per_param: f64,
    /// Matrices running from dense Q8_0 copies.
    pub dense_matrices: usize,
    pub ppl: f64,
    pub tg_tokens_per_s: Option<f64>,
    pub bytes_read: u64,
    pub bytes_released: u64,
    /// Resident set after the point's evaluation.
    pub rss_bytes: Option<u64>,
}

pub struct StackEvalOptions {
    pub points: usize,
    pub window: usize,
    pub windows: usize,
    pub tg: usize,
    pub proxy_check: usize,
    /// Bits per linear parameter of the prefix the proxy check removes blocks from.
    pub proxy_bits: f64,
    pub max_bits: Option<f64>,
    /// Block orders to compare at equal bytes: `table` (the file's), `res`, `act`,
    /// `rel` (proxies recomputed from the stored errors), `rr` (level-major round robin).
    pub orders: Vec<String>,
}

/// A block order: the matrix each step adds (its next level).
struct BlockOrder {
    name: String,
    steps: Vec<usize>,
}

impl BlockOrder {
    fn counts(&self, n: usize, m: usize) -> Vec<usize> {
        let mut c = vec![0; m];
        for &i in &self.steps[..n.min(self.steps.len())] {
            c[i] += 1;
        }
        c
    }

    /// The longest prefix whose cost fits in `bytes` (costs never fall with `n`).
    fn prefix_for(&self, stack: &crate::bitstack::Stack, bytes: u64) -> usize {
        let m = stack.weights.len();
        let (mut lo, mut hi) = (0, self.steps.len());
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if stack.cost(&self.counts(mid, m)) <= bytes {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }
}

fn block_order(stack: &crate::bitstack::Stack, name: &str, file: &ModelFile) -> Result<BlockOrder> {
    use crate::bitstack::build::{global_order, Proxy, StackStats};
    let levels: Vec<usize> = stack.weights.iter().map(|w| w.levels()).collect();
    let steps = match name {
        "table" => stack.table.entries.iter().map(|e| e.matrix as usize).collect(),
        "rr" => {
            let top = levels.iter().copied().max().unwrap_or(0);
            let levels = &levels;
            (0..top).flat_map(|l| (0..levels.len()).filter(move |&i| l < levels[i])).collect::<Vec<_>>()
        }
        p => {
            let proxy = Proxy::parse(p)?;
            let stats = StackStats::from_file(file, &levels).ok_or_else(|| {
                Error::input(format!("--order {p}: this file stores no per-level errors (made before they were kept)"))
            })?;
            let pages: Vec<u64> = stack.weights.iter().map(|w| w.shape.page_bytes()).collect();
            global_order(&stats.gains(proxy, &pages)).into_iter().map(|(i, _)| i).collect()
        }
    };
    Ok(BlockOrder { name: name.to_string(), steps })
}

/// Points run from every block down to the smallest prefix, so each step is a live
/// shrink (the RSS column shows memory given back). With several orders, each point's
/// byte budget is evaluated under every order (the longest prefix of that order that
/// fits), so orders compare at equal bytes.
pub fn stack_eval(m: &ModelArgs, file: &Path, o: &StackEvalOptions, json: Option<&Path>) -> Result<()> {
    // One cache at a time: a window, or the decode-rate test's.
    let engine = load_for(m, o.window.max(o.tg + 1))?;
    let Some(stack) = &engine.file.stack else {
        return Err(Error::input(format!(
            "{} has no BitStack (make one with `cairn stack`)",
            engine.file.path.display()
        )));
    };
    let text = std::fs::read(file).map_err(|source| Error::Io { path: file.to_path_buf(), source })?;
    let text = String::from_utf8_lossy(&text);
    let t = &stack.table;
    let params: u64 = t.matrices.iter().map(|m| m.rows * m.cols).sum();
    let (lo, mut hi) = (stack.prefix_cost(t.min_prefix()), stack.prefix_cost(t.entries.len()));
    if let Some(b) = o.max_bits {
        hi = hi.min((b * params as f64 / 8.0) as u64).max(lo);
    }
    // Under --memory the curve stays within the budget: its largest point is the plan's.
    if m.memory.is_some() {
        hi = hi.min(stack.prefix_cost(stack.prefix())).max(lo);
    }
    let orders: Vec<BlockOrder> =
        o.orders.iter().map(|n| block_order(stack, n, &engine.file)).collect::<Result<_>>()?;
    let points = o.points.max(2);
    let mut budgets: Vec<u64> = (0..points).map(|p| lo + (hi - lo) * p as u64 / (points as u64 - 1)).collect();
    budgets.dedup();
    budgets.reverse();
    let dense = engine.file.dense_bytes();
    let mut curve = Vec::new();
    println!("| order | blocks | BitStack MB | total MB | bits/param | Q8_0 copies | ppl | tg t/s | read MB | released MB | RSS MB |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &budget in &budgets {
        for ord in &orders {
            let n = ord.prefix_for(stack, budget).max(t.min_prefix());
            let change = if ord.name == "table" {
                stack.set_prefix(n)?
            } else {
                stack.set_counts(&ord.counts(n, stack.weights.len()))?
            };
            // --windows 0: a speed-only curve.
            let ppl = if o.windows == 0 {
                f64::NAN
            } else {
                engine::perplexity(&engine, &text, o.window, Some(o.windows), |_, _, _| {})?.0
            };
            let tg_rate = if o.tg > 0 { Some(decode_rate(&engine, o.tg)?) } else { None };
            let p = CurvePoint {
                order: ord.name.clone(),
                blocks: n,
                stack_bytes: change.stack_bytes,
                total_bytes: change.stack_bytes + dense,
                bits_per_param: change.stack_bytes as f64 * 8.0 / params.max(1) as f64,
                dense_matrices: change.dense_matrices,
                ppl,
                tg_tokens_per_s: tg_rate,
                bytes_read: change.bytes_read,
                bytes_released: change.bytes_released,
                rss_bytes: crate::bench::current_rss(),
            };
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.3} | {} | {:.3} | {} | {:.1} | {:.1} | {} |",
                p.order,
                p.blocks,
                p.stack_bytes as f64 / 1e6,
                p.total_bytes as f64 / 1e6,
                p.bits_per_param,
                p.dense_matrices,
                p.ppl,
                p.tg_tokens_per_s.map_or("-".into(), |r| format!("{r:.2}")),
                p.bytes_read as f64 / 1e6,
                p.bytes_released as f64 / 1e6,
                p.rss_bytes.map_or("-".into(), |r| format!("{:.1}", r as f64 / 1e6))
            );
            curve.push(p);
        }
    }
    let proxy = if o.proxy_check > 0 { Some(proxy_check(&engine, &text, o)?) } else { None };
    if let Some(path) = json {
        let v = serde_json::json!({ "model": engine.file.path.display().to_string(), "text": file.display().to_string(),
            "window": o.window, "windows": o.windows, "dense_bytes": dense, "linear_params": params, "points": curve,
            "proxy_check": proxy });
        std::fs::write(path, v.to_string()).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    }
    Ok(())
}

/// Spearman's rank correlation (ties broken by position).
fn spearman(a: &[f64], b: &[f64]) -> f64 {
    let ranks = |v: &[f64]| -> Vec<f64> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&x, &y| v[y].total_cmp(&v[x]));
        let mut r = vec![0f64; v.len()];
        for (rank, &i) in idx.iter().enumerate() {
            r[i] = rank as f64;
        }
        r
    };
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f64;
    let d2: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - y).powi(2)).sum();
    1.0 - 6.0 * d2 / (n * (n * n - 1.0))
}

/// What a block is worth, measured: from the table's prefix at `--proxy-bits`, remove
/// the top active block of each of N matrices (spread over the model) in turn and
/// measure the perplexity loss per byte over `--windows` windows; then rank-correlate
/// with every proxy's value for that block (Spearman). Runs from blocks (no copies).
fn proxy_check(engine: &Engine, text: &str, o: &StackEvalOptions) -> Result<serde_json::Value> {
    use crate::bitstack::build::{Proxy, StackStats};
    let Some(stack) = &engine.file.stack else { return Ok(serde_json::Value::Null) };
    let policy = stack.dense_cache();
    stack.set_dense_cache(crate::bitstack::DenseCache::Off);
    let t = &stack.table;
    let params: u64 = t.matrices.iter().map(|m| m.rows * m.cols).sum();
    let base_n = t.prefix_for((o.proxy_bits * params as f64 / 8.0) as u64).max(t.min_prefix());
    let base = t.counts(base_n);
    let levels: Vec<usize> = stack.weights.iter().map(|w| w.levels()).collect();
    let stats = StackStats::from_file(&engine.file, &levels);
    let pages: Vec<u64> = stack.weights.iter().map(|w| w.shape.page_bytes()).collect();
    let candidates: Vec<usize> = (0..base.len()).filter(|&i| base[i] >= 2).collect();
    let k = o.proxy_check.min(candidates.len());
    if k < 2 {
        return Err(Error::input("--proxy-check needs at least 2 matrices with 2 or more blocks at --proxy-bits"));
    }
    let picked: Vec<usize> = (0..k).map(|i| candidates[i * candidates.len() / k]).collect();
    let windows = o.windows.max(1);
    let ppl = |counts: &[usize]| -> Result<f64> {
        stack.set_counts(counts)?;
        Ok(engine::perplexity(engine, text, o.window, Some(windows), |_, _, _| {})?.0)
    };
    let p0 = ppl(&base)?;
    eprintln!("proxy check: base ppl {p0:.3} ({base_n} blocks, {windows} windows)");
    let mut measured = Vec::new();
    for &mi in &picked {
        let mut c = base.clone();
        c[mi] -= 1;
        let p = ppl(&c)?;
        let gain = (p.ln() - p0.ln()) / pages[mi] as f64;
        eprintln!("  {:<28} level {} removed: ppl {p:.3}  loss/MB {:.4}", stack.weights[mi].name, c[mi], gain * 1e6);
        measured.push(gain);
    }
    let mut by_proxy = serde_json::Map::new();
    for (name, proxy) in [("rel", Proxy::Relative), ("act", Proxy::Activation), ("res", Proxy::Residual)] {
        let Some(stats) = &stats else { break };
        let gains = stats.gains(proxy, &pages);
        let predicted: Vec<f64> = picked.iter().map(|&i| gains[i][base[i] - 1]).collect();
        let rho = spearman(&predicted, &measured);
        println!("proxy check ({name}): Spearman rank correlation with the measured ppl loss per byte over {k} blocks: {rho:.3}");
        by_proxy.insert(name.into(), serde_json::json!({ "predicted": predicted, "spearman": rho }));
    }
    stack.set_dense_cache(policy);
    stack.set_prefix(t.entries.len())?;
    let names: Vec<&str> = picked.iter().map(|&i| stack.weights[i].name.as_str()).collect();
    let removed: Vec<usize> = picked.iter().map(|&i| base[i] - 1).collect();
    Ok(serde_json::json!({ "base_ppl": p0, "base_blocks": base_n, "windows": windows, "blocks": names,
        "levels_removed": removed, "measured_loss_per_byte": measured, "proxies": by_proxy }))
}

/// Greedy decode of `n` tokens after a one-token prompt: tokens per second.
fn decode_rate(engine: &Engine, n: usize) -> Result<f64> {
    let runner = &engine.runner;
    let mut cache = runner.new_cache(n + 1)?;
    let vocab = engine.vocab();
    let mut logits = runner.forward(cache.as_mut(), &[1], crate::model::Logits::Last)?;
    let t = Instant::now();
    for _ in 0..n {
        let next = (0..vocab).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap_or(0) as u32;
        logits = runner.forward(cache.as_mut(), &[next], crate::model::Logits::Last)?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// `cairn serve`'s own flags.
#[cfg(feature = "server")]
pub struct ServeArgs {
    pub host: String,
    pub port: u16,
    pub parallel: usize,
    pub queue: usize,
    pub api_key: Option<String>,
    pub timeout: u64,
    pub drain: u64,
    pub route: Option<Routed>,
}

#[cfg(feature = "server")]
pub fn serve(m: &ModelArgs, a: ServeArgs) -> Result<()> {
    if let Some(r) = a.route {
        // The id clients name: the registry's stem.
        let model_name = r.registry.file_stem().map_or_else(|| "router".into(), |s| s.to_string_lossy().into_owned());
        let defaults = crate::server::route::Defaults { budget: r.budget, fallback: r.fallback };
        let opts = crate::server::ServeOptions {
            model: r.registry.clone(),
            model_name,
            host: a.host,
            port: a.port,
            parallel: a.parallel,
            queue: a.queue,
            ctx: 0,
            api_key: a.api_key,
            engine: engine_options(m)?,
            timeout: std::time::Duration::from_secs(a.timeout.max(1)),
            drain: std::time::Duration::from_secs(a.drain),
            body_limit: 4 << 20,
            route: Some(crate::server::RouteServe { registry: r.registry, defaults }),
        };
        return crate::server::run(opts);
    }
    let path = model_path(m)?;
    // The id clients name: the registry name given, else the file's stem.
    let model_name = match m.model.as_deref() {
        Some(n) if !std::path::Path::new(n).exists() => n.to_string(),
        _ => path.file_stem().map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned()),
    };
    let opts = crate::server::ServeOptions {
        model: path,
        model_name,
        host: a.host,
        port: a.port,
        parallel: a.parallel,
        queue: a.queue,
        ctx: m.ctx_size,
        api_key: a.api_key,
        engine: engine_options(m)?,
        timeout: std::time::Duration::from_secs(a.timeout.max(1)),
        drain: std::time::Duration::from_secs(a.drain),
        body_limit: 4 << 20,
        route: None,
    };
    crate::server::run(opts)
}

/// `cairn route solve`: one JSON line on stdout.
pub fn route_solve(path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let inst =
        crate::route::Instance::from_json(&text).map_err(|e| Error::input(format!("{}: {e}", path.display())))?;
    let answer = inst.solve()?;
    let line = serde_json::to_string(&answer).map_err(|e| Error::model(format!("cannot print the answer: {e}")))?;
    println!("{line}");
    Ok(())
}

/// A `--route` request's settings.
pub struct Routed {
    pub registry: PathBuf,
    pub budget: crate::route::router::Budget,
    pub fallback: crate::route::router::Fallback,
    pub json: bool,
}

fn open_router(r: &Routed) -> Result<(crate::route::registry::Registry, crate::route::router::Router)> {
    let reg = crate::route::registry::Registry::load(&r.registry)?;
    let gate = crate::route::load_gate(&reg)?;
    let router = crate::route::open(&reg, gate)?;
    Ok((reg, router))
}

/// The routing report: one JSON line, or a short line for people.
fn print_report(r: &crate::route::router::Report, json: bool) {
    if json {
        eprintln!("{}", r.to_json());
        return;
    }
    if let Some(f) = &r.fallback {
        eprintln!("note: {f}; it answers anyway (--fallback refuse to refuse)");
    }
    for (n, why) in &r.dropped {
        eprintln!("note: dropped {n}: {why}");
    }
    if let Some(why) = &r.rescue {
        eprintln!("note: {why}");
    }
    let est = if r.energy_estimate { " (estimated)" } else { "" };
    eprintln!(
        "route: {} (weights {}); predicted {:.2} s, {:.2} J; measured {:.2} s, {:.2} J{est}",
        r.answered.join(" + "),
        r.weights.iter().map(|w| format!("{w:.2}")).collect::<Vec<_>>().join("/"),
        r.predicted.latency_s,
        r.predicted.energy_j,
        r.measured.latency_s,
        r.measured.energy_j
    );
}

/// Save the profiles the requests refined (moving averages), beside the registry.
fn save_profiles(reg: &crate::route::registry::Registry, router: &crate::route::router::Router) {
    crate::route::save_profiles(&reg.side_file("profile"), router);
}

/// `generate --route`: one routed raw completion.
pub fn route_generate(
    r: &Routed,
    prompt: &str,
    max_new: usize,
    flags: &SamplingHints,
    seed: u64,
    json: bool,
) -> Result<()> {
    use crate::route::router::Prompt;
    let (reg, router) = open_router(r)?;
    let sampling = crate::sampling::SamplingDefaults::resolve(&[(crate::sampling::Origin::Flag, flags)], seed).config;
    let a = router
        .answer(Prompt::Text(prompt), max_new, &sampling, r.budget, r.fallback, |t| json || flush(t).is_continue())?;
    if json {
        println!("{}", serde_json::json!({"text": a.text, "chosen": a.report.chosen}));
    } else {
        println!();
    }
    print_report(&a.report, r.json);
    save_profiles(&reg, &router);
    Ok(())
}

/// `chat --route`: each turn routed anew over the whole history.
pub fn route_chat(
    r: &Routed,
    prompt: Option<&str>,
    system: Option<&str>,
    max_new: usize,
    flags: &SamplingHints,
    seed: u64,
) -> Result<()> {
    use crate::chat::Message;
    use crate::route::router::Prompt;
    let (reg, router) = open_router(r)?;
    let sampling = crate::sampling::SamplingDefaults::resolve(&[(crate::sampling::Origin::Flag, flags)], seed).config;
    let mut messages: Vec<Message> = system.map(|s| Message::new("system", s)).into_iter().collect();
    let turn = |messages: &mut Vec<Message>, user: &str| -> Result<()> {
        messages.push(Message::new("user", user));
        match router
            .answer(Prompt::Chat(messages), max_new, &sampling, r.budget, r.fallback, |t| flush(t).is_continue())
        {
            Ok(a) => {
                println!();
                print_report(&a.report, r.json);
                messages.push(Message::new("assistant", a.text.trim()));
                Ok(())
            }
            Err(e) => {
                messages.pop();
                Err(e)
            }
        }
    };
    if let Some(p) = prompt {
        turn(&mut messages, p)?;
        save_profiles(&reg, &router);
        return Ok(());
    }
    eprintln!(
        "Chatting with the router over {} ({} experts). Type /exit or Ctrl-D to quit.",
        r.registry.display(),
        router.names().len()
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).map_err(|e| Error::Input(e.to_string()))? == 0 {
            eprintln!();
            break;
        }
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            l => {
                if let Err(e) = turn(&mut messages, l) {
                    eprintln!("error: {e}");
                }
            }
        }
    }
    save_profiles(&reg, &router);
    Ok(())
}

/// `cairn route profile`: measure each expert in turn, print a table, save the file.
pub fn route_profile(path: &Path, reps: usize, remote_watts: f64) -> Result<()> {
    use crate::route::registry::{Place, Registry};
    use crate::route::{profile, remote};
    let reg = Registry::load(path)?;
    let mut energy = crate::energy::detect_here();
    eprintln!("{}", energy.note);
    let out = reg.side_file("profile");
    let mut ps = profile::Profiles::load(&out).unwrap_or_else(|_| profile::Profiles::new());
    let n = reg.experts.len();
    println!(
        "{:<16} {:>9} {:>9} {:>8} {:>10} {:>10} {:>8} {:>9}  energy",
        "expert", "pp t/s", "tg t/s", "start ms", "pp mJ/tok", "tg mJ/tok", "rtt ms", "MB/s"
    );
    for (k, e) in reg.experts.iter().enumerate() {
        eprintln!("[{}/{n}] profiling {} ...", k + 1, e.name);
        let p = match &e.place {
            Place::Local { .. } => {
                let engine = crate::route::load_local(e)?;
                profile::measure_local(&engine, energy.reader.as_mut(), reps)?
            }
            Place::Remote { url, model, api_key, tokenizer } => {
                let r = remote::Remote::new(url, model.as_deref(), api_key.as_deref());
                // Fail fast on an unreachable server, before any model loads.
                r.ping(std::time::Duration::from_secs(10))
                    .map_err(|err| Error::input(format!("expert {}: unreachable: {err}", e.name)))?;
                let tok_expert = tokenizer.as_deref().and_then(|t| reg.find(t)).unwrap_or(reg.embedder);
                let engine = crate::route::load_local(&reg.experts[tok_expert])?;
                remote::measure(&r, &|t| engine.tokenize(t), reps, remote_watts)
                    .map_err(|err| Error::input(format!("expert {}: {err}", e.name)))?
            }
        };
        println!(
            "{:<16} {:>9.1} {:>9.1} {:>8.1} {:>10.2} {:>10.2} {:>8} {:>9}  {}{}",
            e.name,
            p.prefill_tps,
            p.decode_tps,
            p.start_s * 1e3,
            p.prefill_j_per_token * 1e3,
            p.decode_j_per_token * 1e3,
            p.rtt_s.map_or("-".into(), |r| format!("{:.2}", r * 1e3)),
            p.transfer_bps.map_or("-".into(), |r| format!("{:.1}", r / 1e6)),
            p.energy_source,
            if p.energy_estimate { " (estimate)" } else { "" }
        );
        ps.experts.insert(e.name.clone(), p);
    }
    ps.experts.retain(|name, _| reg.find(name).is_some());
    ps.save(&out)?;
    eprintln!("saved {}", out.display());
    Ok(())
}

/// `cairn route train`: score, train, and show the held-out result.
pub fn route_train(path: &Path, windows: usize, seed: u64) -> Result<()> {
    let reg = crate::route::registry::Registry::load(path)?;
    if windows == 0 {
        return Err(Error::input("--windows must be at least 1"));
    }
    let t = Instant::now();
    let g = crate::route::train::train(&reg, windows, seed, &crate::route::gate::TrainOptions::default())?;
    let r = g.report();
    println!(
        "trained on {} windows ({} held out) in {:.0} s",
        r.train_windows,
        r.held_out_windows,
        t.elapsed().as_secs_f64()
    );
    println!("{:<20} {:>12}", "held-out", "bits/byte");
    if let Some(b) = r.held_out_bits_per_byte {
        println!("{:<20} {b:>12.4}", "gate (all experts)");
    }
    if let Some(b) = r.held_out_uniform {
        println!("{:<20} {b:>12.4}", "uniform mixture");
    }
    for (name, b) in g.experts().iter().zip(&r.held_out_single) {
        println!("{name:<20} {b:>12.4}");
    }
    eprintln!("saved {} and {}", reg.side_file("gate").display(), reg.side_file("samples").display());
    Ok(())
}

pub struct EvalOptions {
    pub points: usize,
    pub trace: usize,
    pub trace_tokens: usize,
    pub json: Option<PathBuf>,
    pub plot: Option<PathBuf>,
    pub seed: u64,
}

/// `cairn route eval`: the curves (tables, JSON, SVG) and the violation trace.
pub fn route_eval(path: &Path, o: &EvalOptions) -> Result<()> {
    use crate::route::eval::{Eval, METHODS};
    use crate::route::plot::{Chart, Series};
    let reg = crate::route::registry::Registry::load(path)?;
    let names = reg.names();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let gate = crate::route::gate::Gate::load(&reg.side_file("gate"), &refs)?;
    let profiles = crate::route::profile::Profiles::load(&reg.side_file("profile"))?.for_experts(&names)?;
    let file = crate::route::train::SampleFile::load(&reg.side_file("samples"), &names)?;
    let samples = file.samples()?;
    let held: Vec<_> = samples.iter().filter(|s| s.held_out).collect();
    if held.is_empty() {
        return Err(Error::input("no held-out windows were scored: run `cairn route train` with more windows"));
    }
    let mut dev_names: Vec<&str> = Vec::new();
    let devices = reg
        .experts
        .iter()
        .map(|e| match dev_names.iter().position(|&d| d == e.device) {
            Some(d) => d,
            None => {
                dev_names.push(&e.device);
                dev_names.len() - 1
            }
        })
        .collect();
    let near = crate::route::gate::Neighbours::new(gate.clone(), samples.clone(), crate::route::NEIGHBOURS)?;
    let ev = Eval::new(&gate, &near, devices, &profiles, &held)?;
    let (lat, en) = ev.budget_grid(o.points);
    let mut curves = Vec::new();
    for (what, budgets) in [("latency", &lat), ("energy", &en)] {
        let unit = if what == "latency" { "s" } else { "J" };
        println!(
            "\nheld-out bits/byte against the {what} budget ({} windows; the other budget unbounded)",
            ev.windows()
        );
        println!(
            "{:>12} {:>9} {:>12} {:>9} {:>9} {:>11}",
            format!("budget {unit}"),
            "MoE²",
            "best single",
            "greedy",
            "random",
            "infeasible"
        );
        let mut points = Vec::new();
        for &b in budgets {
            let (l, e) = if what == "latency" { (b, f64::MAX) } else { (f64::MAX, b) };
            let p = ev.point(l, e, o.seed)?;
            let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
            println!(
                "{b:>12.4} {:>9} {:>12} {:>9} {:>9} {:>11}",
                cell(p.bits_per_byte[0]),
                cell(p.bits_per_byte[1]),
                cell(p.bits_per_byte[2]),
                cell(p.bits_per_byte[3]),
                p.infeasible
            );
            points.push(p);
        }
        curves.push((what, unit, points));
    }
    // The trace: routed requests of mixed categories and budgets, measured.
    let mut trace = Vec::new();
    if o.trace > 0 {
        let router = crate::route::open(&reg, crate::route::load_gate(&reg)?)?;
        let sampling = crate::sampling::SamplerConfig::greedy();
        let mut state = o.seed ^ 0x5eed;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as usize
        };
        let heads: Vec<&crate::route::train::SavedSample> = file.windows.iter().filter(|w| w.held_out).collect();
        eprintln!("trace: {} routed requests of {} tokens", o.trace, o.trace_tokens);
        for k in 0..o.trace {
            let w = heads[next() % heads.len()];
            // Budgets from the middle of the curves' ranges, where the choice matters.
            let lb = lat[1 + next() % (lat.len() - 2).max(1)];
            let eb = en[1 + next() % (en.len() - 2).max(1)];
            let budget = crate::route::router::Budget { latency_s: lb, energy_j: eb };
            let prompt = crate::route::train::head(&w.head, 200);
            let r = router.answer(
                crate::route::router::Prompt::Text(prompt),
                o.trace_tokens,
                &sampling,
                budget,
                crate::route::router::Fallback::Cheapest,
                |_| true,
            )?;
            let rep = r.report;
            eprintln!(
                "  [{}/{}] {:<12} budget {:.3} s {:.3} J -> {} measured {:.3} s {:.3} J{}",
                k + 1,
                o.trace,
                w.category,
                lb,
                eb,
                rep.answered.join("+"),
                rep.measured.latency_s,
                rep.measured.energy_j,
                if rep.fallback.is_some() { " (fallback)" } else { "" }
            );
            trace.push(serde_json::json!({
                "category": w.category,
                "latency_budget_s": lb,
                "energy_budget_j": eb,
                "chosen": rep.chosen,
                "answered": rep.answered,
                "dropped": rep.dropped.len(),
                "fallback": rep.fallback.is_some(),
                "predicted": {"latency_s": rep.predicted.latency_s, "energy_j": rep.predicted.energy_j},
                "measured": {"latency_s": rep.measured.latency_s, "energy_j": rep.measured.energy_j, "estimate": rep.energy_estimate},
                "latency_violated": rep.measured.latency_s > lb,
                "energy_violated": rep.measured.energy_j > eb,
            }));
        }
        let share = |key: &str| trace.iter().filter(|t| t[key] == true).count() as f64 / trace.len() as f64;
        let either = trace.iter().filter(|t| t["latency_violated"] == true || t["energy_violated"] == true).count();
        println!(
            "\ntrace of {} requests: latency budget broken by {:.1}%, energy budget by {:.1}%, either by {:.1}% (measured); fallbacks {}",
            trace.len(),
            100.0 * share("latency_violated"),
            100.0 * share("energy_violated"),
            100.0 * either as f64 / trace.len() as f64,
            trace.iter().filter(|t| t["fallback"] == true).count()
        );
        save_profiles(&reg, &router);
    }
    if let Some(prefix) = &o.plot {
        for (what, unit, points) in &curves {
            let series = METHODS
                .iter()
                .enumerate()
                .map(|(m, name)| Series {
                    name: (*name).to_string(),
                    points: points
                        .iter()
                        .map(|p| {
                            (
                                if *what == "latency" { p.latency_budget_s } else { p.energy_budget_j },
                                p.bits_per_byte[m].unwrap_or(f64::NAN),
                            )
                        })
                        .collect(),
                })
                .collect();
            let chart = Chart {
                title: format!("held-out bits/byte against the {what} budget"),
                x_label: format!("{what} budget ({unit})"),
                y_label: "bits per byte".into(),
                log_x: true,
                series,
            };
            let out = PathBuf::from(format!("{}-{what}.svg", prefix.display()));
            std::fs::write(&out, chart.to_svg()).map_err(|source| Error::Io { path: out.clone(), source })?;
            eprintln!("wrote {}", out.display());
        }
    }
    if let Some(out) = &o.json {
        let v = serde_json::json!({
            "experts": names,
            "held_out_windows": ev.windows(),
            "methods": METHODS,
            "curves": curves.iter().map(|(what, _, points)| serde_json::json!({"budget": what, "points": points})).collect::<Vec<_>>(),
            "trace": trace,
        });
        std::fs::write(out, format!("{v:#}\n")).map_err(|source| Error::Io { path: out.clone(), source })?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}
