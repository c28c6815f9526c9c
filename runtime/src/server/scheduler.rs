//! The inference loop: one thread owns the model and a fixed set of slots (each a KV
//! cache and the tokens in it). Every step it builds one batch from every busy slot,
//! decode tokens of running sequences plus prefill chunks of new ones (one chunk's worth
//! of prompt tokens in all), and runs it as one forward pass. HTTP handlers only enqueue requests and read the events
//! the loop sends back; a request whose receiver is gone (the client left) frees its
//! slot at the next step.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::metrics::Metrics;
use crate::bitstack::MemoryPlan;
use crate::energy::EnergyReader;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::longctx::Method;
use crate::model::{prefill_take, KvState, Logits, Segment, PREFILL_CHUNK};
use crate::sampling::{Sampler, SamplerConfig};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Prompt tokens a prefill chunk takes while other sequences are decoding: a long
/// prompt delays their next token by one chunk at most.
pub const SHARED_CHUNK: usize = 128;

/// Most alternatives `top_logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A generation request, as the loop receives it (already tokenized and checked).
pub struct Job {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplerConfig,
    pub stop: Vec<String>,
    /// `Some(n)`: report each token's log-probability and the `n` most likely.
    pub logprobs: Option<usize>,
    /// Send the prompt back first, with its tokens' log-probabilities when `logprobs`
    /// is set (every position is evaluated: no cached prefix is reused).
    pub echo: bool,
    /// Long-prompt method (GemFilter) for this prompt.
    pub method: Method,
    /// BitStack budget to apply before this request runs.
    pub memory: Option<u64>,
    /// When the server gives up on it (finish reason `length`).
    pub deadline: Instant,
    pub arrived: Instant,
    pub events: mpsc::UnboundedSender<Event>,
}

/// One alternative of a token's distribution.
#[derive(Debug, Clone)]
pub struct Alt {
    pub id: u32,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// A generated token's log-probability (under the model's distribution, before any
/// sampling transform) and the most likely alternatives at its position.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: Alt,
    pub top: Vec<Alt>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens`, the context, or the server's time limit.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub finish: Finish,
    pub prompt_tokens: usize,
    /// Prompt tokens found in the slot's cache (not evaluated again).
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub ttft: Option<Duration>,
    /// A routed answer's report (`cairn.route` in the response).
    pub route: Option<serde_json::Value>,
}

/// What the loop sends back for a request.
#[derive(Debug)]
pub enum Event {
    /// Text that can be shown (held back while it might begin a stop string), with the
    /// log-probabilities of the tokens it completes.
    Text(String, Vec<TokenLogprob>),
    Done(Summary),
    Failed(Error),
}

/// Messages to the loop.
pub enum Msg {
    Generate(Box<Job>),
    /// A request for a routed server ([`super::route`]).
    Route(Box<super::route::RouteJob>),
    /// Change a BitStack model's memory budget between two steps.
    Memory(u64, oneshot::Sender<Result<MemoryPlan>>),
}

/// A request in a slot.
struct Running {
    job: Box<Job>,
    /// Prompt tokens still to evaluate.
    pending: Vec<u32>,
    /// The token to feed at the next step (sampled, not yet in the cache).
    next: Option<u32>,
    sampler: Sampler,
    decoder: StreamDecoder,
    generated: usize,
    /// Generated text so far, and how much of it was sent.
    text: String,
    sent: usize,
    logprobs: Vec<TokenLogprob>,
    cached: usize,
    first_token: Option<Instant>,
    /// Whether a stop string cut the text.
    cut: bool,
    /// Its share of the energy of the passes it was in.
    energy_j: f64,
    /// Echo: the prompt's log-probabilities so far (the first token has none: NaN, sent
    /// as null).
    echoed: Vec<TokenLogprob>,
}

struct Slot {
    cache: Box<dyn KvState>,
    /// Exactly what the cache holds, for prefix reuse.
    tokens: Vec<u32>,
    run: Option<Running>,
    last_used: Instant,
    /// The logits after the last prompt this slot evaluated, and that prompt's length:
    /// a request repeating that prompt starts from them instead of evaluating its last
    /// token again alone (whose logits would differ from the batched ones by float
    /// rounding, enough to change a greedy answer at a near tie).
    end_logits: Option<(usize, Vec<f32>)>,
    /// How many leading cached positions were evaluated in passes of two rows or more
    /// (prefill), the only ones whose keys and values equal a fresh prefill's: a row
    /// evaluated alone (a generated token) goes through the decode attention path,
    /// whose float sums run in another order. Reusing only these keeps a greedy answer
    /// identical to `cairn chat --temp 0` whatever the slot held before.
    batched: usize,
}

pub struct Scheduler {
    engine: Arc<Engine>,
    slots: Vec<Slot>,
    waiting: VecDeque<Box<Job>>,
    metrics: Arc<Metrics>,
    /// Read around every forward pass; `None`: energy is not followed.
    energy: Option<Box<dyn EnergyReader>>,
}

impl Scheduler {
    pub fn new(engine: Arc<Engine>, parallel: usize, ctx: usize, metrics: Arc<Metrics>) -> Result<Scheduler> {
        let slots = (0..parallel)
            .map(|_| {
                Ok(Slot {
                    cache: engine.runner.new_cache(ctx)?,
                    tokens: Vec::new(),
                    run: None,
                    last_used: Instant::now(),
                    end_logits: None,
                    batched: 0,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Scheduler { engine, slots, waiting: VecDeque::new(), metrics, energy: None })
    }

    /// Follow energy with `reader`: each forward pass's joules go to `/metrics` and are
    /// shared by the requests in the pass, by tokens fed.
    pub fn set_energy(&mut self, reader: Box<dyn EnergyReader>) {
        self.metrics.set_energy_source(reader.name(), reader.is_estimate());
        self.energy = Some(reader);
    }

    /// The reader's joules now; a failed read is logged and the pass goes uncounted.
    fn read_energy(&mut self) -> Option<f64> {
        match self.energy.as_mut()?.read_joules() {
            Ok(j) => Some(j),
            Err(e) => {
                log::debug!("energy: {e}");
                None
            }
        }
    }

    /// Serve until every sender of `rx` is gone and no request is left.
    pub fn run(mut self, rx: Receiver<Msg>) {
        let mut open = true;
        loop {
            // Block only when there is nothing to do.
            let idle = self.waiting.is_empty() && self.slots.iter().all(|s| s.run.is_none());
            if idle {
                if !open {
                    return;
                }
                match rx.recv_timeout(Duration::from_millis(250)) {
                    Ok(m) => self.take(m),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => open = false,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(m) => self.take(m),
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.drop_abandoned();
            self.admit();
            self.step();
            self.publish();
        }
    }

    fn take(&mut self, m: Msg) {
        match m {
            Msg::Generate(job) => self.waiting.push_back(job),
            Msg::Route(job) => {
                self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
                let _ = job.events.send(Event::Failed(Error::model("this server runs one model, not a router")));
            }
            Msg::Memory(bytes, reply) => {
                let _ = reply.send(self.set_memory(bytes));
            }
        }
    }

    /// Take the request out of slot `i`, the gauges updated (see [`Scheduler::publish`]).
    fn free(&mut self, i: usize) -> Option<Running> {
        let run = self.slots[i].run.take();
        self.publish();
        run
    }

    fn set_memory(&self, bytes: u64) -> Result<MemoryPlan> {
        let plan = self.engine.set_memory_budget(bytes)?;
        self.metrics.memory_budget.store(bytes, Ordering::Relaxed);
        eprintln!("serve: {plan}");
        Ok(plan)
    }

    /// The gauges of `/metrics` from the slots and the queue as they are now. Called at
    /// every change, before the loop tells any client its request ended, so that a
    /// client reading `/metrics` after its answer never sees its slot still busy.
    fn publish(&self) {
        let m = &self.metrics;
        m.busy_slots.store(self.slots.iter().filter(|s| s.run.is_some()).count() as u64, Ordering::Relaxed);
        m.waiting.store(self.waiting.len() as u64, Ordering::Relaxed);
    }

    /// Requests whose client went away: out of the queue, out of their slots.
    fn drop_abandoned(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|j| !j.events.is_closed());
        let gone = before - self.waiting.len();
        self.metrics.queued.fetch_sub(gone as u64, Ordering::Relaxed);
        let mut cancelled = gone;
        for slot in &mut self.slots {
            if slot.run.as_ref().is_some_and(|r| r.job.events.is_closed()) {
                slot.run = None;
                cancelled += 1;
            }
        }
        self.metrics.cancelled.fetch_add(cancelled as u64, Ordering::Relaxed);
        if cancelled > 0 {
            self.publish();
        }
    }

    /// Move waiting requests into idle slots: each takes the idle slot whose cache shares
    /// the longest prefix with its prompt (the least recently used among equals).
    fn admit(&mut self) {
        while let Some(job) = self.waiting.pop_front() {
            self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            let best = self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.run.is_none())
                .map(|(i, s)| (common_prefix(&s.tokens, &job.prompt), std::cmp::Reverse(s.last_used), i))
                .max();
            let Some((_, _, i)) = best else {
                self.metrics.queued.fetch_add(1, Ordering::Relaxed);
                self.waiting.push_front(job);
                break;
            };
            if let Err(e) = self.start(i, job) {
                // `start` handed the error to the request.
                log::debug!("request refused at admission: {e}");
            }
        }
        self.publish();
    }

    fn start(&mut self, i: usize, job: Box<Job>) -> Result<()> {
        if let Some(bytes) = job.memory {
            if let Err(e) = self.set_memory(bytes) {
                let _ = job.events.send(Event::Failed(e.clone_msg()));
                return Err(e);
            }
        }
        let engine = self.engine.clone();
        let slot = &mut self.slots[i];
        slot.last_used = Instant::now();
        let prompt = match job.method {
            Method::Full => job.prompt.clone(),
            method => {
                // A token-selecting method picks its tokens with a first pass of its own
                // (between two steps); what it keeps is then prefilled like any prompt.
                match engine.select(&job.prompt, method) {
                    Ok(sel) => sel.iter().map(|&j| job.prompt[j]).collect(),
                    Err(e) => {
                        let _ = job.events.send(Event::Failed(e.clone_msg()));
                        return Err(e);
                    }
                }
            }
        };
        let common = common_prefix(&slot.tokens, &prompt);
        let repeat = common == prompt.len() && slot.end_logits.as_ref().is_some_and(|(n, _)| *n == prompt.len());
        // Anything else evaluates at least its last two tokens, in one pass of their own
        // (see `prefill_take`), after positions a fresh prefill would compute the same.
        let keep = if job.echo {
            0
        } else if repeat {
            common
        } else {
            common.min(slot.batched).min(prompt.len().saturating_sub(2))
        };
        let keep = slot.cache.truncate(keep);
        slot.tokens.truncate(keep);
        slot.batched = slot.batched.min(keep);
        // Stored logits past what is kept belong to tokens about to be overwritten.
        if slot.end_logits.as_ref().is_some_and(|(n, _)| *n > keep) {
            slot.end_logits = None;
        }
        let primed = if keep == prompt.len() { slot.end_logits.as_ref().map(|(_, l)| l.clone()) } else { None };
        let sampler = Sampler::new(job.sampling.clone());
        slot.run = Some(Running {
            pending: prompt[keep..].to_vec(),
            next: None,
            sampler,
            decoder: StreamDecoder::skipping_special(),
            generated: 0,
            text: String::new(),
            sent: 0,
            logprobs: Vec::new(),
            cached: keep,
            first_token: None,
            cut: false,
            energy_j: 0.0,
            echoed: Vec::new(),
            job,
        });
        self.publish();
        if let Some(mut logits) = primed {
            if let Some(how) = self.sample(i, &mut logits, Instant::now()) {
                if let Some(run) = self.free(i) {
                    finish(run, how, &self.metrics);
                }
            }
        }
        Ok(())
    }

    /// One forward pass over every busy slot.
    fn step(&mut self) {
        let decoding = self.slots.iter().filter(|s| s.run.as_ref().is_some_and(|r| r.next.is_some())).count();
        // Prefill chunks of this step: the slots that have waited longest, in arrival
        // order, up to one chunk's tokens in all, so that prompts arriving together share
        // a pass (its weights read once; on BitStack, its tiles rebuilt once).
        let mut waiting: Vec<(Instant, usize, usize)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                s.run.as_ref().filter(|r| !r.pending.is_empty()).map(|r| (r.job.arrived, i, r.pending.len()))
            })
            .collect();
        if decoding == 0 && waiting.is_empty() {
            return;
        }
        waiting.sort_unstable();
        let mut room = if decoding > 0 { SHARED_CHUNK } else { PREFILL_CHUNK };
        // slot → tokens it prefills this step
        let mut takes: Vec<(usize, usize)> = Vec::new();
        for &(_, i, pending) in &waiting {
            // A pass never gives a prompt a single row unless that is all it has left
            // (see `prefill_take`).
            if room == 0 || (room == 1 && pending > 1) {
                break;
            }
            let n = prefill_take(pending, room);
            takes.push((i, n));
            room -= n;
        }
        // (slot, tokens fed, whether logits come back)
        let mut plan: Vec<(usize, usize, bool)> = Vec::new();
        let mut batch: Vec<Segment<'_>> = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Slot { cache, run, .. } = slot;
            let Some(run) = run.as_ref() else { continue };
            if let Some(next) = run.next.as_ref() {
                batch.push(Segment {
                    cache: cache.as_mut(),
                    ids: std::slice::from_ref(next),
                    logits: Some(Logits::Last),
                });
                plan.push((i, 1, true));
            } else if let Some(&(_, n)) = takes.iter().find(|t| t.0 == i) {
                let last = n == run.pending.len();
                let logits = if run.job.echo { Some(Logits::All) } else { last.then_some(Logits::Last) };
                batch.push(Segment { cache: cache.as_mut(), ids: &run.pending[..n], logits });
                plan.push((i, n, last || run.job.echo));
            }
        }
        let j0 = self.energy.as_mut().and_then(|r| r.read_joules().ok());
        let out = self.engine.runner.forward_batch(&mut batch);
        drop(batch);
        if let (Some(j0), Some(j1)) = (j0, self.read_energy()) {
            let joules = (j1 - j0).max(0.0);
            self.metrics.add_energy(joules);
            let rows: usize = plan.iter().map(|p| p.1).sum();
            for &(i, n, _) in &plan {
                if let Some(run) = self.slots[i].run.as_mut() {
                    run.energy_j += joules * n as f64 / rows.max(1) as f64;
                }
            }
        }
        let logits = match out {
            Ok(l) => l,
            Err(e) => {
                // Checked at admission, so this is the model's failure: every request of
                // the batch gets it, and their caches start over.
                for &(i, _, _) in &plan {
                    if let Some(run) = self.free(i) {
                        let _ = run.job.events.send(Event::Failed(e.clone_msg()));
                    }
                    let slot = &mut self.slots[i];
                    slot.cache.truncate(0);
                    slot.tokens.clear();
                    slot.batched = 0;
                    slot.end_logits = None;
                }
                return;
            }
        };
        let now = Instant::now();
        for ((i, n, has_logits), mut logits) in plan.into_iter().zip(logits) {
            let slot = &mut self.slots[i];
            let Some(run) = slot.run.as_mut() else { continue };
            match run.next.take() {
                Some(fed) => slot.tokens.push(fed),
                None => {
                    if n >= 2 && slot.batched == slot.tokens.len() {
                        slot.batched += n;
                    }
                    if run.job.echo {
                        let last = n == run.pending.len();
                        logits = echo_rows(&self.engine.tokenizer, run, slot.tokens.is_empty(), n, &logits);
                        if !last {
                            slot.tokens.extend(run.pending.drain(..n));
                            self.metrics.prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
                            continue;
                        }
                        let text = prompt_text(&self.engine.tokenizer, &run.job.prompt);
                        let _ = run.job.events.send(Event::Text(text, std::mem::take(&mut run.echoed)));
                    }
                    slot.tokens.extend(run.pending.drain(..n));
                    self.metrics.prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
                    if has_logits {
                        slot.end_logits = Some((slot.tokens.len(), logits.clone()));
                    }
                }
            }
            if !has_logits {
                continue;
            }
            if run.job.max_tokens == 0 {
                // Echo only: the prompt was the answer.
                if let Some(run) = self.free(i) {
                    finish(run, Finish::Length, &self.metrics);
                }
                continue;
            }
            if let Some(done) = self.sample(i, &mut logits, now) {
                if let Some(run) = self.free(i) {
                    finish(run, done, &self.metrics);
                }
            }
        }
    }

    /// Sample slot `i`'s next token from `logits`, send what became visible; returns how
    /// the request ends if it does.
    fn sample(&mut self, i: usize, logits: &mut [f32], now: Instant) -> Option<Finish> {
        let engine = self.engine.clone();
        let tok = &engine.tokenizer;
        let slot = &mut self.slots[i];
        let cap = slot.cache.capacity();
        let run = slot.run.as_mut()?;
        // Log-probabilities under the model's own distribution: before the sampler's
        // penalties change `logits` in place.
        let lp = run.job.logprobs.map(|n| (token_logprobs(tok, logits, n), logits.to_vec()));
        let id = run.sampler.sample(logits, &slot.tokens);
        if run.first_token.is_none() {
            run.first_token = Some(now);
            self.metrics.observe_ttft(now - run.job.arrived);
        }
        if tok.is_eog(id) {
            return Some(Finish::Stop);
        }
        run.generated += 1;
        self.metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
        if let Some(((lse, top), orig)) = lp {
            let bytes = tok.token_to_piece(id).map(<[u8]>::to_vec).unwrap_or_default();
            let logprob = (orig.get(id as usize).map_or(f64::NEG_INFINITY, |&v| v as f64) - lse) as f32;
            run.logprobs.push(TokenLogprob { token: Alt { id, bytes, logprob }, top });
        }
        match run.decoder.push(tok, id) {
            Ok(piece) => run.text.push_str(&piece),
            Err(e) => {
                let e = Error::Text(e.to_string());
                if let Some(run) = self.free(i) {
                    let _ = run.job.events.send(Event::Failed(e));
                }
                return None;
            }
        }
        let ended = if run.generated >= run.job.max_tokens || slot.tokens.len() >= cap || now >= run.job.deadline {
            Some(Finish::Length)
        } else {
            None
        };
        // Stop strings: cut at the first match; otherwise hold back a tail that might
        // still become one.
        if let Some(at) = find_stop(&run.text, &run.job.stop) {
            run.text.truncate(at);
            run.cut = true;
            return Some(Finish::Stop);
        }
        let safe = if ended.is_some() { run.text.len() } else { run.text.len() - held_back(&run.text, &run.job.stop) };
        if safe > run.sent {
            let piece = run.text[run.sent..safe].to_string();
            run.sent = safe;
            let lps = std::mem::take(&mut run.logprobs);
            if run.job.events.send(Event::Text(piece, lps)).is_err() {
                // The client left: freed at the next step.
                return None;
            }
        }
        if ended.is_none() {
            run.next = Some(id);
        }
        ended
    }
}

/// The request is over: send the rest of its text and its summary.
fn finish(mut run: Running, how: Finish, metrics: &Metrics) {
    if !run.cut {
        // An incomplete character at the end, shown as the tokenizer's replacement.
        let rest = run.decoder.finish();
        run.text.push_str(&rest);
        if let Some(at) = find_stop(&run.text, &run.job.stop) {
            run.text.truncate(at);
        }
    }
    let ev = &run.job.events;
    if run.text.len() > run.sent || !run.logprobs.is_empty() {
        let piece = run.text.get(run.sent..).unwrap_or("").to_string();
        let _ = ev.send(Event::Text(piece, std::mem::take(&mut run.logprobs)));
    }
    let summary = Summary {
        finish: how,
        prompt_tokens: run.job.prompt.len(),
        cached_tokens: run.cached,
        completion_tokens: run.generated,
        ttft: run.first_token.map(|t| t - run.job.arrived),
        route: None,
    };
    metrics.finished.fetch_add(1, Ordering::Relaxed);
    metrics.observe_request_energy(run.energy_j);
    let _ = ev.send(Event::Done(summary));
}

/// The log-sum-exp of `logits` (f64, over the whole vocabulary) and the `n` most likely
/// tokens with their log-probabilities, most likely first.
fn token_logprobs(tok: &Tokenizer, logits: &[f32], n: usize) -> (f64, Vec<Alt>) {
    let key = |i: u32| {
        let v = logits[i as usize];
        if v.is_nan() {
            f32::NEG_INFINITY
        } else {
            v
        }
    };
    let max = (0..logits.len() as u32).map(key).fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + (0..logits.len() as u32).map(|i| (key(i) as f64 - max).exp()).sum::<f64>().ln();
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let n = n.min(idx.len());
    if n > 0 && n < idx.len() {
        idx.select_nth_unstable_by(n - 1, |&a, &b| key(b).total_cmp(&key(a)));
    }
    idx.truncate(n);
    idx.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    let top = idx
        .iter()
        .map(|&i| Alt {
            id: i,
            bytes: tok.token_to_piece(i).map(<[u8]>::to_vec).unwrap_or_default(),
            logprob: (key(i) as f64 - lse) as f32,
        })
        .collect();
    (lse, top)
}

/// Echo: record the log-probability of the token each of the pass's `n` rows predicts
/// (the next pending one; the first prompt token gets none), and return the last row,
/// which predicts the first generated token once the prompt is done.
fn echo_rows(tok: &Tokenizer, run: &mut Running, first: bool, n: usize, logits: &[f32]) -> Vec<f32> {
    let vocab = logits.len() / n.max(1);
    if first {
        let id = run.pending[0];
        let bytes = tok.token_to_piece(id).map(<[u8]>::to_vec).unwrap_or_default();
        run.echoed.push(TokenLogprob { token: Alt { id, bytes, logprob: f32::NAN }, top: Vec::new() });
    }
    for j in 0..n {
        let Some(&id) = run.pending.get(j + 1) else { break };
        let row = &logits[j * vocab..(j + 1) * vocab];
        let (lse, top) = token_logprobs(tok, row, run.job.logprobs.unwrap_or(0));
        let bytes = tok.token_to_piece(id).map(<[u8]>::to_vec).unwrap_or_default();
        let logprob = (row.get(id as usize).map_or(f64::NEG_INFINITY, |&v| v as f64) - lse) as f32;
        run.echoed.push(TokenLogprob { token: Alt { id, bytes, logprob }, top });
    }
    logits[(n - 1) * vocab..].to_vec()
}

/// The prompt as text, special tokens left out (what the answer's text starts with).
fn prompt_text(tok: &Tokenizer, ids: &[u32]) -> String {
    let mut d = StreamDecoder::skipping_special();
    let mut s: String = ids.iter().filter_map(|&id| d.push(tok, id).ok()).collect();
    s.push_str(&d.finish());
    s
}

pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Byte offset of the earliest stop string in `text`.
pub fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min()
}

/// How many bytes at the end of `text` could be the start of a stop string.
pub fn held_back(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|s| s.char_indices().map(|(i, _)| i).skip(1).chain(std::iter::once(s.len())).map(move |k| &s[..k]))
        .filter(|p| p.len() < text.len() + 1 && text.ends_with(*p))
        .map(str::len)
        .max()
        .unwrap_or(0)
}
