//! A model with its tokenizer and chat template, and the loops that use them:
//! prompt evaluation, streaming generation, perplexity.

use std::ops::ControlFlow;
use std::path::Path;

use crate::backend::cpu::CpuBackend;
use crate::bitstack::{self, MemoryPlan};
use crate::chat::{ChatTemplate, Message};
use crate::error::{Error, Result};
use crate::model::{self, KvState, Logits, Runner};
use crate::sampling::Sampler;
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::weights::ModelFile;

/// Tokens evaluated per forward pass during prefill: bounds the activation memory of
/// long prompts while keeping the matmuls wide.
pub const PREFILL_CHUNK: usize = 512;

#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// CPU threads (0: all cores).
    pub threads: usize,
    /// Run the f32 reference path (weights dequantized, activations never quantized)
    /// instead of the integer kernels: slower, free of 8-bit activation noise.
    pub exact: bool,
    /// Memory budget in bytes for a BitStack model (`None`: every block).
    pub memory: Option<u64>,
    /// Context the memory budget reserves a KV cache for (0: the model's).
    pub context: usize,
}

pub struct Engine {
    pub file: ModelFile,
    pub runner: Box<dyn Runner>,
    pub tokenizer: Tokenizer,
    /// `Err` keeps the reason a chat template is unavailable, to report when asked.
    pub template: std::result::Result<ChatTemplate, String>,
    /// Context length that memory budgets reserve a KV cache for.
    memory_ctx: usize,
}

impl Engine {
    pub fn load(path: &Path, opts: &EngineOptions) -> Result<Engine> {
        Self::from_file(ModelFile::open(path)?, opts)
    }

    pub fn from_file(file: ModelFile, opts: &EngineOptions) -> Result<Engine> {
        let backend = if opts.exact { CpuBackend::reference(opts.threads)? } else { CpuBackend::new(opts.threads)? };
        let runner = model::load(&file, backend)?;
        let meta = &file.metadata;
        let tokenizer =
            Tokenizer::from_metadata(meta).map_err(|e| Error::model(format!("{}: {e}", file.path.display())))?;
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
        let engine = Engine { file, runner, tokenizer, template, memory_ctx };
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
        bitstack::apply_budget(&self.file, self.runner.config(), self.memory_ctx, budget)
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

    pub fn new_session(&self, context: usize) -> Result<Session<'_>> {
        let context = if context == 0 { self.runner.config().context } else { context };
        Ok(Session { engine: self, cache: self.runner.new_cache(context)?, tokens: Vec::new() })
    }

    /// Logits at every position of `ids`, from one batched pass (chunked past
    /// [`PREFILL_CHUNK`] tokens).
    pub fn eval_all(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        let mut cache = self.runner.new_cache(ids.len())?;
        let mut out = Vec::with_capacity(ids.len() * self.vocab());
        for chunk in ids.chunks(PREFILL_CHUNK) {
            out.extend(self.runner.forward(cache.as_mut(), chunk, Logits::All)?);
        }
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
}

impl Session<'_> {
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn capacity(&self) -> usize {
        self.cache.capacity()
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
        let mut keep = self.tokens.iter().zip(ids).take_while(|(a, b)| a == b).count();
        // The last token must be evaluated again to get its logits.
        keep = keep.min(ids.len() - 1);
        let keep = self.cache.truncate(keep);
        self.tokens.truncate(keep);
        let mut logits = Vec::new();
        for chunk in ids[keep..].chunks(PREFILL_CHUNK) {
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
        mut on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let tok = &self.engine.tokenizer;
        let mut logits = self.prefill(prompt)?;
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
            let flow = if piece.is_empty() { ControlFlow::Continue(()) } else { on_text(&piece) };
            if self.tokens.len() >= self.cache.capacity() {
                break;
            }
            logits = self.engine.runner.forward(self.cache.as_mut(), &[id], Logits::Last)?;
            self.tokens.push(id);
            if flow.is_break() {
                break;
            }
        }
        let rest = decoder.finish();
        if !rest.is_empty() {
            out.text.push_str(&rest);
            let _ = on_text(&rest);
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
}

impl<'e> Chat<'e> {
    pub fn new(engine: &'e Engine, context: usize, system: Option<&str>) -> Result<Self> {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(Message::new("system", s));
        }
        Ok(Chat { session: engine.new_session(context)?, messages })
    }

    /// Whether this chat runs without a template (raw completion).
    pub fn is_raw(&self) -> bool {
        self.session.engine.template.is_err()
    }

    fn prompt_ids(&self) -> Result<Vec<u32>> {
        let engine = self.session.engine;
        match &engine.template {
            Ok(template) => {
                let prompt = template.render(&self.messages, true).map_err(|e| Error::Text(e.to_string()))?;
                Ok(engine.tokenizer.encode(&prompt, true)?)
            }
            Err(_) => engine.tokenize(&self.messages.iter().map(|m| m.content.as_str()).collect::<String>()),
        }
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
    let vocab = engine.vocab();
    let (mut nll_all, mut cnt_all, mut nll_half, mut cnt_half) = (0f64, 0usize, 0f64, 0usize);
    for w in 0..n {
        let win = &ids[w * window..(w + 1) * window];
        let logits = engine.eval_all(win)?;
        for i in 0..window - 1 {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let nll = log_sum_exp(row) - row[win[i + 1] as usize] as f64;
            nll_all += nll;
            cnt_all += 1;
            if i >= window / 2 {
                nll_half += nll;
                cnt_half += 1;
            }
        }
        progress(w + 1, n, (nll_all / cnt_all as f64).exp());
    }
    Ok(((nll_all / cnt_all as f64).exp(), (nll_half / cnt_half as f64).exp()))
}

fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln()
}
