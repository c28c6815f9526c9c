//! A model with its tokenizer and chat template, and the loops that use them:
//! prompt evaluation, streaming generation, perplexity.

use std::ops::ControlFlow;
use std::path::Path;

use crate::backend::cpu::CpuBackend;
use crate::backend::BackendKind;
use crate::bitstack::{self, MemoryPlan};
use crate::chat::{ChatTemplate, Message};
use crate::error::{Error, Result};
use crate::longctx::{self, FilterLayer, Method, SNAPKV_WINDOW};
use crate::model::{self, KvState, Logits, Probe, Runner};
use crate::sampling::Sampler;
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::weights::ModelFile;

#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// CPU threads (0: all cores).
    pub threads: usize,
    /// Run the f32 reference path (weights dequantized, activations never quantized)
    /// instead of the integer kernels: slower, free of 8-bit activation noise.
    pub exact: bool,
    /// Which backend runs the model.
    pub backend: BackendKind,
    /// Memory budget in bytes for a BitStack model (`None`: every block).
    pub memory: Option<u64>,
    /// Context the memory budget reserves a KV cache for (0: the model's).
    pub context: usize,
    /// Whether BitStack matrices may run from dense Q8_0 copies.
    pub dense_cache: crate::bitstack::DenseCache,
    /// Whether `memory` bounds the whole process (the CLI: binary, tokenizer and heap
    /// included, measured before the weights load) or only the model (a library inside
    /// an app, whose own memory is not the model's to spend).
    pub budget_counts_process: bool,
}

pub struct Engine {
    pub file: ModelFile,
    pub runner: Box<dyn Runner>,
    pub tokenizer: Tokenizer,
    /// `Err` keeps the reason a chat template is unavailable, to report when asked.
    pub template: std::result::Result<ChatTemplate, String>,
    /// Why the backend asked for is not the one running (`--backend auto` fell back).
    pub backend_note: Option<String>,
    /// Context length that memory budgets reserve a KV cache for.
    memory_ctx: usize,
    /// Resident bytes of the process before the weights loaded, when the budget counts them.
    process_bytes: u64,
}

fn load_cpu(file: &ModelFile, opts: &EngineOptions) -> Result<Box<dyn Runner>> {
    let backend = if opts.exact { CpuBackend::reference(opts.threads)? } else { CpuBackend::new(opts.threads)? };
    model::load(file, backend)
}

#[cfg(feature = "wgpu")]
fn load_wgpu(file: &ModelFile, opts: &EngineOptions) -> Result<Box<dyn Runner>> {
    if opts.exact {
        return Err(Error::input(
            "--exact runs on the CPU backend only (the wgpu backend keeps f32 activations anyway)",
        ));
    }
    model::load(file, crate::backend::wgpu::WgpuBackend::new()?)
}

#[cfg(not(feature = "wgpu"))]
fn load_wgpu(_: &ModelFile, _: &EngineOptions) -> Result<Box<dyn Runner>> {
    Err(Error::input("this build of cairn has no wgpu backend (built without the `wgpu` feature)"))
}

#[cfg(feature = "wgpu")]
fn gpu_present() -> bool {
    crate::backend::wgpu::has_gpu()
}

#[cfg(not(feature = "wgpu"))]
fn gpu_present() -> bool {
    false
}

fn load_cuda(file: &ModelFile, opts: &EngineOptions) -> Result<Box<dyn Runner>> {
    if opts.exact {
        return Err(Error::input("--exact runs on the CPU backend only"));
    }
    model::load(file, crate::backend::cuda::CudaBackend::new()?)
}

/// The model on the backend `opts` asks for, and a note when `auto` fell back.
fn load_runner(file: &ModelFile, opts: &EngineOptions) -> Result<(Box<dyn Runner>, Option<String>)> {
    match opts.backend {
        BackendKind::Cpu => Ok((load_cpu(file, opts)?, None)),
        BackendKind::Wgpu => Ok((load_wgpu(file, opts)?, None)),
        BackendKind::Cuda => Ok((load_cuda(file, opts)?, None)),
        BackendKind::Auto if opts.exact => {
            Ok((load_cpu(file, opts)?, Some("--exact: using the CPU backend".to_string())))
        }
        BackendKind::Auto => {
            let cuda = match load_cuda(file, opts) {
                Ok(r) => return Ok((r, None)),
                Err(e) => e,
            };
            // A CPU emulation of Vulkan (llvmpipe) is slower than the CPU backend itself.
            if !gpu_present() {
                let note = format!("no CUDA device ({cuda}) and no other GPU: using the CPU backend");
                return Ok((load_cpu(file, opts)?, Some(note)));
            }
            match load_wgpu(file, opts) {
                Ok(r) => Ok((r, Some(format!("no CUDA device ({cuda}): using wgpu")))),
                Err(e) => Ok((
                    load_cpu(file, opts)?,
                    Some(format!(
                        "no CUDA device ({cuda}) and the wgpu backend is unavailable ({e}): using the CPU backend"
                    )),
                )),
            }
        }
    }
}

impl Engine {
    pub fn load(path: &Path, opts: &EngineOptions) -> Result<Engine> {
        Self::from_file(ModelFile::open(path)?, opts)
    }

    pub fn from_file(file: ModelFile, opts: &EngineOptions) -> Result<Engine> {
        let meta = &file.metadata;
        // The tokenizer is built first so that the measurement below includes it; its
        // error waits until the weights have loaded, so that a broken model is reported
        // as such rather than by its tokenizer.
        let tokenizer = Tokenizer::from_metadata(meta);
        // Before any weight is touched: what the process holds besides the model.
        let process_bytes = if opts.budget_counts_process { current_rss().unwrap_or(0) } else { 0 };
        let (runner, backend_note) = load_runner(&file, opts)?;
        let tokenizer = tokenizer.map_err(|e| Error::model(format!("{}: {e}", file.path.display())))?;
        if tokenizer.vocab_size() > runner.config().vocab {
            return Err(Error::model(format!(
                "{}: the tokenizer has {} tokens but the embedding only {} rows",
                file.path.display(),
                tokenizer.vocab_size(),
                runner.config().vocab
            )));
        }
        let template = ChatTemplate::from_metadata(meta).map_err(|e| e.to_string());
        let memory_ctx = if opts.context == 0 { runner.config().context } else { opts.context };
        let engine = Engine { file, runner, tokenizer, template, backend_note, memory_ctx, process_bytes };
        if let Some(s) = &engine.file.stack {
            s.set_dense_cache(opts.dense_cache);
        }
        match (opts.memory, &engine.file.stack) {
            (Some(b), _) => {
                let plan = engine.set_memory_budget(b)?;
                eprintln!("{plan}");
            }
            (None, Some(s)) => {
                s.set_prefix(s.table.entries.len())?;
            }
            (None, None) => {}
        }
        Ok(engine)
    }

    /// Fit the model into `budget` bytes ([`bitstack::apply_budget`]) while it is in
    /// use: the next forward pass uses the new blocks, and only the blocks that change
    /// are read or released. A budget below the minimum is refused, naming the minimum.
    pub fn set_memory_budget(&self, budget: u64) -> Result<MemoryPlan> {
        bitstack::apply_budget(&self.file, self.runner.config(), self.memory_ctx, self.process_bytes, budget)
    }

    pub fn vocab(&self) -> usize {
        self.runner.config().vocab
    }

    /// Tokenize a raw prompt: special tokens parsed, BOS only where the model asks.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if self.tokenizer.add_bos() {
            ids.extend(self.tokenizer.bos_id());
        }
        ids.extend(self.tokenizer.encode(text, true)?);
        Ok(ids)
    }

    /// The prompt of a chat: `messages` in the model's template with the assistant's
    /// turn opened, or their plain text for a model without one.
    pub fn chat_ids(&self, messages: &[Message]) -> Result<Vec<u32>> {
        match &self.template {
            Ok(template) => {
                let prompt = template.render(messages, true).map_err(|e| Error::Text(e.to_string()))?;
                Ok(self.tokenizer.encode(&prompt, true)?)
            }
            Err(_) => self.tokenize(&messages.iter().map(|m| m.content.as_str()).collect::<String>()),
        }
    }

    pub fn new_session(&self, context: usize) -> Result<Session<'_>> {
        let context = if context == 0 { self.runner.config().context } else { context };
        Ok(Session {
            engine: self,
            cache: self.runner.new_cache(context)?,
            tokens: Vec::new(),
            method: Method::Full,
            h2o: None,
            selected: None,
            exact: true,
        })
    }

    /// The filter layer GemFilter uses (`Auto`: calibrated once per model, then cached).
    pub fn filter_layer(&self, layer: FilterLayer, k: usize) -> Result<usize> {
        let n_layers = self.runner.config().n_layers;
        match layer {
            FilterLayer::Fixed(r) if r < n_layers => Ok(r),
            FilterLayer::Fixed(r) => {
                Err(Error::input(format!("filter layer {r} does not exist: the model has {n_layers} layers (0..)")))
            }
            FilterLayer::Auto => crate::needle::auto_layer(self, k),
        }
    }

    /// GemFilter's first pass: layers `0..=r` over all of `ids` (chunked, on a cache of
    /// those layers only), returning layer `r`'s post-RoPE query of the last token and
    /// its keys.
    pub fn filter_pass(&self, ids: &[u32], r: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        self.check_ids(ids)?;
        longctx::filter_pass(self.runner.as_ref(), ids, r)
    }

    /// The prompt indices a token-selecting method keeps (ascending); every index for
    /// the methods that keep the whole prompt.
    pub fn select(&self, ids: &[u32], method: Method) -> Result<Vec<usize>> {
        let n = ids.len();
        let c = self.runner.config();
        Ok(match method {
            Method::GemFilter { k, .. } | Method::Recent { k } | Method::Random { k, .. } if k == 0 => {
                return Err(Error::input("k = 0 keeps no tokens: k must be at least 1"))
            }
            Method::GemFilter { k, .. } if k >= n => (0..n).collect(),
            Method::GemFilter { k, layer } => {
                let r = self.filter_layer(layer, k)?;
                let (q, keys) = self.filter_pass(ids, r)?;
                longctx::gemfilter_select(&q, &keys, c.n_heads, c.n_kv_heads, c.head_dim, k)
            }
            Method::Recent { k } => longctx::recent_select(n, k),
            Method::Random { k, seed } => longctx::random_select(n, k, seed),
            Method::Full | Method::SnapKv { .. } | Method::H2o { .. } => (0..n).collect(),
        })
    }

    /// A session over a state detached from a session of this engine (see
    /// [`Session::into_state`]).
    pub fn resume(&self, state: SessionState) -> Session<'_> {
        let SessionState { cache, tokens, method, h2o, selected, exact } = state;
        Session { engine: self, cache, tokens, method, h2o, selected, exact }
    }

    /// Logits at every position of `ids`, from one batched pass (chunked past
    /// [`model::PREFILL_CHUNK`] tokens, see [`model::prefill_chunks`]).
    pub fn eval_all(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        let mut cache = self.runner.new_cache(ids.len())?;
        let mut out = Vec::with_capacity(ids.len() * self.vocab());
        for chunk in model::prefill_chunks(ids) {
            out.extend(self.runner.forward(cache.as_mut(), chunk, Logits::All)?);
        }
        Ok(out)
    }

    /// Logits at every position of `ids`, handed to `f(position, row)` in order, from
    /// passes of [`model::logit_rows`] tokens over one cache: what is held at once stays
    /// within the memory plan, unlike [`Engine::eval_all`]'s `ids.len() × vocab` floats.
    pub fn for_each_logits(&self, ids: &[u32], f: impl FnMut(usize, &[f32]) -> Result<()>) -> Result<()> {
        self.logit_rows(ids, None, f)
    }

    /// [`Engine::for_each_logits`], with a probe watching every pass.
    fn logit_rows(
        &self,
        ids: &[u32],
        mut probe: Option<&mut Probe>,
        mut f: impl FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        self.check_ids(ids)?;
        let vocab = self.vocab();
        let rows = model::logit_rows(vocab);
        let mut cache = self.runner.new_cache(ids.len())?;
        for (c, chunk) in ids.chunks(rows).enumerate() {
            let logits = match probe.as_deref_mut() {
                Some(p) => self.runner.forward_probe(cache.as_mut(), chunk, Logits::All, p)?,
                None => self.runner.forward(cache.as_mut(), chunk, Logits::All)?,
            };
            for (i, row) in logits.chunks_exact(vocab).enumerate() {
                f(c * rows + i, row)?;
            }
        }
        Ok(())
    }

    /// The prompt embedding the MoE² gate reads (DESIGN §5): the mean over positions of
    /// the final hidden state (after the final RMSNorm, before the output head). Runs
    /// in prefill chunks on one cache, like [`Engine::eval_all`], but no logits are ever
    /// computed or held, so a long prompt costs `dim` floats beyond the cache.
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        if ids.is_empty() {
            return Err(Error::input("cannot embed an empty prompt"));
        }
        let mut cache = self.runner.new_cache(ids.len())?;
        let mut probe = Probe { hidden_sum: Some(Vec::new()), ..Probe::default() };
        for chunk in model::prefill_chunks(ids) {
            self.runner.forward_probe(cache.as_mut(), chunk, Logits::All, &mut probe)?;
        }
        self.mean_hidden(probe, ids.len())
    }

    fn mean_hidden(&self, probe: Probe, rows: usize) -> Result<Vec<f32>> {
        let sum = probe.hidden_sum.unwrap_or_default();
        if sum.len() != self.runner.config().dim {
            return Err(Error::model(format!(
                "the hidden-state probe returned {} values, the model's width is {}",
                sum.len(),
                self.runner.config().dim
            )));
        }
        Ok(sum.iter().map(|&s| (s / rows as f64) as f32).collect())
    }

    /// [`Engine::score`] and the embedding of `ids[..len - 1]` from the same pass (the
    /// last token, which nothing predicts from, is left out of both): half the work of
    /// the two apart for the gate's embedder.
    pub fn score_and_embed(&self, ids: &[u32]) -> Result<(Vec<f32>, Vec<f32>)> {
        if ids.len() < 2 {
            return Err(Error::input("scoring and embedding need at least two tokens"));
        }
        let mut out = Vec::with_capacity(ids.len() - 1);
        let mut probe = Probe { hidden_sum: Some(Vec::new()), keep_head: true, ..Probe::default() };
        self.logit_rows(&ids[..ids.len() - 1], Some(&mut probe), |i, row| {
            let next = ids[i + 1] as usize;
            out.push((row[next] as f64 - log_sum_exp(row)) as f32);
            Ok(())
        })?;
        Ok((out, self.mean_hidden(probe, ids.len() - 1)?))
    }

    /// The natural-log probability of each `ids[t]` given `ids[..t]`, for t ≥ 1
    /// (`ids.len() - 1` values; none for fewer than two tokens): what the gate's training
    /// mixes per token. Log-softmax in f64 over rows from [`Engine::for_each_logits`], so
    /// memory stays bounded for any length; the last token's logits are not computed.
    pub fn score(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        if ids.len() < 2 {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(ids.len() - 1);
        self.for_each_logits(&ids[..ids.len() - 1], |i, row| {
            let next = ids[i + 1] as usize;
            out.push((row[next] as f64 - log_sum_exp(row)) as f32);
            Ok(())
        })?;
        Ok(out)
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let (vocab, ctx) = (self.vocab(), self.runner.config().context);
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::input(format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        if ids.len() > ctx {
            return Err(Error::input(format!("{} tokens exceed the model's context length {ctx}", ids.len())));
        }
        Ok(())
    }
}

/// What a generation produced.
#[derive(Debug, Clone, Default)]
pub struct Generation {
    pub ids: Vec<u32>,
    pub text: String,
    /// Whether it ended on an end-of-generation token (rather than the length limit).
    pub stopped: bool,
}

/// One conversation or completion: a KV cache and the tokens in it.
pub struct Session<'e> {
    engine: &'e Engine,
    cache: Box<dyn KvState>,
    tokens: Vec<u32>,
    method: Method,
    /// H2O's budget and accumulated attention (per layer, KV head, cache row).
    h2o: Option<(usize, Vec<Vec<Vec<f32>>>)>,
    /// The prompt indices the last prompt kept (GemFilter, recent, random).
    pub selected: Option<Vec<usize>>,
    /// Whether the cache holds exactly `tokens` at their positions (not after an
    /// eviction or a selection): prefix reuse depends on it.
    exact: bool,
}

/// A session without its borrow of the engine, for owners that cannot hold a borrow
/// (the C ABI keeps a context's cache beside a shared engine between calls).
pub struct SessionState {
    cache: Box<dyn KvState>,
    tokens: Vec<u32>,
    method: Method,
    h2o: Option<(usize, Vec<Vec<Vec<f32>>>)>,
    selected: Option<Vec<usize>>,
    exact: bool,
}

impl SessionState {
    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

impl<'e> Session<'e> {
    pub fn into_state(self) -> SessionState {
        let Session { cache, tokens, method, h2o, selected, exact, .. } = self;
        SessionState { cache, tokens, method, h2o, selected, exact }
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn capacity(&self) -> usize {
        self.cache.capacity()
    }

    /// How later prompts are handled (default: full attention).
    pub fn set_method(&mut self, method: Method) -> Result<()> {
        if let Some(0) = method.budget() {
            return Err(Error::input("k = 0 keeps no tokens: k must be at least 1"));
        }
        self.method = method;
        Ok(())
    }

    pub fn method(&self) -> Method {
        self.method
    }

    /// Rows in the cache (fewer than the tokens seen after an eviction).
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// A session over a cache already holding `tokens` (the needle harness shares one
    /// prefill between methods); `h2o`: H2O's budget and accumulated attention.
    pub(crate) fn from_cache(
        engine: &'e Engine,
        cache: Box<dyn KvState>,
        tokens: Vec<u32>,
        h2o: Option<(usize, Vec<Vec<Vec<f32>>>)>,
    ) -> Session<'e> {
        let exact = cache.len() == tokens.len() && cache.position() == tokens.len();
        Session { engine, cache, tokens, method: Method::Full, h2o, selected: None, exact }
    }

    /// Start H2O from a full prefill's cache `full` (left as it was) and the attention
    /// mass it accumulated.
    pub(crate) fn adopt_h2o(&mut self, full: &mut dyn KvState, k: usize, mass: Vec<Vec<Vec<f32>>>) -> Result<()> {
        let keep: Vec<Vec<Vec<usize>>> =
            mass.iter().map(|heads| heads.iter().map(|m| longctx::h2o_select(m, k)).collect()).collect();
        let mass = mass
            .iter()
            .zip(&keep)
            .map(|(heads, keep)| heads.iter().zip(keep).map(|(m, keep)| keep.iter().map(|&j| m[j]).collect()).collect())
            .collect();
        self.cache = self.engine.runner.compact(full, &keep)?;
        self.h2o = Some((k, mass));
        self.exact = false;
        Ok(())
    }

    /// Start over with an empty cache.
    fn reset(&mut self) {
        self.cache.truncate(0);
        if !self.cache.is_empty() || !self.exact {
            // A compacted cache is replaced rather than emptied.
            if let Ok(c) = self.engine.runner.new_cache(self.cache.capacity()) {
                self.cache = c;
            }
        }
        self.tokens.clear();
        self.h2o = None;
        self.selected = None;
        self.exact = true;
    }

    /// Evaluate a prompt as the session's method says, leaving the cache ready to decode;
    /// returns the logits of its last token.
    pub fn prefill_method(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let method = self.method;
        if method == Method::Full {
            return self.prefill(ids);
        }
        self.engine.check_ids(ids)?;
        if ids.is_empty() {
            return Err(Error::input("empty prompt"));
        }
        if ids.len() > self.cache.capacity() {
            return Err(Error::input(format!(
                "prompt of {} tokens exceeds the context length {}",
                ids.len(),
                self.cache.capacity()
            )));
        }
        self.reset();
        let runner = &self.engine.runner;
        let c = runner.config();
        let n = ids.len();
        match method {
            Method::SnapKv { k } => {
                let mut probe = Probe { queries_from: Some(n - SNAPKV_WINDOW.min(n)), ..Probe::default() };
                let logits = self.prefill_probe(ids, &mut probe)?;
                if k < n {
                    let shape = (c.n_heads, c.n_kv_heads, c.head_dim);
                    let keep = (0..c.n_layers)
                        .map(|l| {
                            let keys = runner.layer_keys(self.cache.as_mut(), l)?;
                            let q = probe.queries.get(l).map_or(&[][..], |q| q.as_slice());
                            Ok(longctx::snapkv_select(q, probe.scales.get(l).copied().unwrap_or(1.0), &keys, shape, k))
                        })
                        .collect::<Result<Vec<_>>>()?;
                    self.cache = runner.compact(self.cache.as_mut(), &keep)?;
                    self.exact = false;
                }
                Ok(logits)
            }
            Method::H2o { k } => {
                let mut probe = Probe { mass: Some(Vec::new()), ..Probe::default() };
                let logits = self.prefill_probe(ids, &mut probe)?;
                self.h2o = Some((k, probe.mass.take().unwrap_or_default()));
                self.h2o_evict()?;
                Ok(logits)
            }
            _ => {
                let sel = self.engine.select(ids, method)?;
                let kept: Vec<u32> = sel.iter().map(|&i| ids[i]).collect();
                let logits = self.prefill(&kept)?;
                self.selected = Some(sel);
                Ok(logits)
            }
        }
    }

    /// Evaluate `ids` on an empty cache with `probe` watching.
    fn prefill_probe(&mut self, ids: &[u32], probe: &mut Probe) -> Result<Vec<f32>> {
        let mut logits = Vec::new();
        for chunk in model::prefill_chunks(ids) {
            logits = self.engine.runner.forward_probe(self.cache.as_mut(), chunk, Logits::Last, probe)?;
            self.tokens.extend_from_slice(chunk);
        }
        Ok(logits)
    }

    /// H2O: evict every layer's cache, per KV head, down to the budget.
    fn h2o_evict(&mut self) -> Result<()> {
        let Some((k, mass)) = self.h2o.as_mut() else { return Ok(()) };
        if self.cache.len() <= *k {
            return Ok(());
        }
        let keep: Vec<Vec<Vec<usize>>> =
            mass.iter().map(|heads| heads.iter().map(|m| longctx::h2o_select(m, *k)).collect()).collect();
        for (heads, keep) in mass.iter_mut().zip(&keep) {
            for (m, keep) in heads.iter_mut().zip(keep) {
                *m = keep.iter().map(|&j| m[j]).collect();
            }
        }
        self.cache = self.engine.runner.compact(self.cache.as_mut(), &keep)?;
        self.exact = false;
        Ok(())
    }

    /// Evaluate one generated token (H2O: accumulating attention, then evicting) and
    /// return the next logits.
    pub fn step(&mut self, id: u32) -> Result<Vec<f32>> {
        let runner = &self.engine.runner;
        let logits = match self.h2o.take() {
            Some((k, mass)) => {
                let mut probe = Probe { mass: Some(mass), ..Probe::default() };
                let logits = runner.forward_probe(self.cache.as_mut(), &[id], Logits::Last, &mut probe)?;
                self.h2o = Some((k, probe.mass.take().unwrap_or_default()));
                self.h2o_evict()?;
                logits
            }
            None => runner.forward(self.cache.as_mut(), &[id], Logits::Last)?,
        };
        self.tokens.push(id);
        Ok(logits)
    }

    /// Make the cache hold exactly `ids`, reusing the longest common prefix already
    /// cached, and return the logits of the last token.
    pub fn prefill(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.engine.check_ids(ids)?;
        if ids.is_empty() {
            return Err(Error::input("empty prompt"));
        }
        if ids.len() > self.cache.capacity() {
            return Err(Error::input(format!(
                "prompt of {} tokens exceeds the context length {}",
                ids.len(),
                self.cache.capacity()
            )));
        }
        if !self.exact {
            self.reset();
        }
        self.selected = None;
        let mut keep = self.tokens.iter().zip(ids).take_while(|(a, b)| a == b).count();
        // The last token must be evaluated again to get its logits.
        keep = keep.min(ids.len() - 1);
        let keep = self.cache.truncate(keep);
        self.tokens.truncate(keep);
        let mut logits = Vec::new();
        for chunk in model::prefill_chunks(&ids[keep..]) {
            logits = self.engine.runner.forward(self.cache.as_mut(), chunk, Logits::Last)?;
            self.tokens.extend_from_slice(chunk);
        }
        Ok(logits)
    }

    /// Evaluate `prompt`, then sample up to `max_new` tokens, calling `on_text` with each
    /// piece of text as soon as it forms complete characters. Returning `Break` stops.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        sampler: &mut Sampler,
        on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let logits = self.prefill_method(prompt)?;
        self.decode(logits, max_new, sampler, on_text)
    }

    /// [`Session::generate`] with a callback for every sampled token, with the text it
    /// completes (empty while a character is still incomplete), so that callers can
    /// stop between any two tokens. Text still held back at the end (an incomplete
    /// character) comes last, with no token.
    pub fn generate_tokens(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        sampler: &mut Sampler,
        on_token: impl FnMut(Option<u32>, &str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let logits = self.prefill_method(prompt)?;
        self.decode_tokens(logits, max_new, sampler, on_token)
    }

    /// Sample up to `max_new` tokens after a prefill that returned `logits`.
    pub fn decode(
        &mut self,
        logits: Vec<f32>,
        max_new: usize,
        sampler: &mut Sampler,
        mut on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        self.decode_tokens(logits, max_new, sampler, |_, piece| {
            if piece.is_empty() {
                ControlFlow::Continue(())
            } else {
                on_text(piece)
            }
        })
    }

    /// [`Session::decode`] with the per-token callback of [`Session::generate_tokens`].
    pub fn decode_tokens(
        &mut self,
        mut logits: Vec<f32>,
        max_new: usize,
        sampler: &mut Sampler,
        mut on_token: impl FnMut(Option<u32>, &str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let tok = &self.engine.tokenizer;
        let mut out = Generation::default();
        let mut decoder = StreamDecoder::skipping_special();
        for _ in 0..max_new {
            let id = sampler.sample(&mut logits, &self.tokens);
            if tok.is_eog(id) {
                out.stopped = true;
                break;
            }
            out.ids.push(id);
            let piece = decoder.push(tok, id)?;
            out.text.push_str(&piece);
            let flow = on_token(Some(id), &piece);
            if self.cache.len() >= self.cache.capacity() {
                break;
            }
            logits = self.step(id)?;
            if flow.is_break() {
                break;
            }
        }
        let rest = decoder.finish();
        if !rest.is_empty() {
            out.text.push_str(&rest);
            let _ = on_token(None, &rest);
        }
        Ok(out)
    }
}

/// A multi-turn chat: the history, re-rendered with the model's template every turn;
/// the session's prefix reuse means only the new turn is evaluated. A model without a
/// template (a base model) chats in raw completion: the history is the plain text of
/// every turn, and each reply continues it.
pub struct Chat<'e> {
    pub session: Session<'e>,
    pub messages: Vec<Message>,
    /// The ids of the last turn's whole prompt (what a selection indexes).
    pub last_prompt: Vec<u32>,
}

impl<'e> Chat<'e> {
    pub fn new(engine: &'e Engine, context: usize, system: Option<&str>) -> Result<Self> {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(Message::new("system", s));
        }
        Ok(Chat { session: engine.new_session(context)?, messages, last_prompt: Vec::new() })
    }

    /// Whether this chat runs without a template (raw completion).
    pub fn is_raw(&self) -> bool {
        self.session.engine.template.is_err()
    }

    fn prompt_ids(&self) -> Result<Vec<u32>> {
        self.session.engine.chat_ids(&self.messages)
    }

    /// Add the user's message, generate the reply (streamed through `on_text`) and keep
    /// it in the history.
    pub fn reply(
        &mut self,
        user: &str,
        max_new: usize,
        sampler: &mut Sampler,
        on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        self.messages.push(Message::new("user", user));
        let ids = match self.prompt_ids() {
            Ok(ids) => ids,
            Err(e) => {
                self.messages.pop();
                return Err(e);
            }
        };
        self.last_prompt = ids.clone();
        match self.session.generate(&ids, max_new, sampler, on_text) {
            Ok(g) => {
                // Raw completion continues the text exactly; templated turns are trimmed.
                let text = if self.is_raw() { g.text.clone() } else { g.text.trim().to_string() };
                self.messages.push(Message::new("assistant", text));
                Ok(g)
            }
            Err(e) => {
                self.messages.pop();
                Err(e)
            }
        }
    }
}

/// Perplexity as `../shared/reference/README.md` defines it: the whole text tokenized
/// without BOS or special tokens, consecutive windows of `window` tokens, a fresh cache
/// per window. Returns (over all positions, over the second half of each window).
pub fn perplexity(
    engine: &Engine,
    text: &str,
    window: usize,
    max_windows: Option<usize>,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<(f64, f64)> {
    if window < 4 {
        return Err(Error::input(format!("window of {window} tokens is too small (at least 4)")));
    }
    let ids = engine.tokenizer.encode(text, false)?;
    let available = ids.len() / window;
    let n = max_windows.map_or(available, |m| m.min(available));
    if n == 0 {
        return Err(Error::input(format!("the text has {} tokens, fewer than one window of {window}", ids.len())));
    }
    let (mut nll_all, mut cnt_all, mut nll_half, mut cnt_half) = (0f64, 0usize, 0f64, 0usize);
    for w in 0..n {
        let win = &ids[w * window..(w + 1) * window];
        // Scored a chunk of rows at a time: a window's logits are never held whole.
        engine.for_each_logits(win, |i, row| {
            let Some(&next) = win.get(i + 1) else { return Ok(()) };
            let nll = log_sum_exp(row) - row[next as usize] as f64;
            nll_all += nll;
            cnt_all += 1;
            if i >= window / 2 {
                nll_half += nll;
                cnt_half += 1;
            }
            Ok(())
        })?;
        progress(w + 1, n, (nll_all / cnt_all as f64).exp());
    }
    Ok(((nll_all / cnt_all as f64).exp(), (nll_half / cnt_half as f64).exp()))
}

fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln()
}

// Process memory, read here because memory budgets count it (`bench` re-exports these).
/// Peak resident set size (Linux: VmHWM).
pub fn peak_rss() -> Option<u64> {
    status_kb("VmHWM:")
}

/// Current resident set size (Linux: VmRSS).
pub fn current_rss() -> Option<u64> {
    status_kb("VmRSS:")
}

fn status_kb(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
