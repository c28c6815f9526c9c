//! `cairn serve --route REGISTRY`: a served model that is itself a MoE² router. Each
//! request runs [`Router::answer`] on one of `--parallel` worker threads, with the
//! budgets of its `cairn` object (else the server's), and sends the loop's usual
//! [`Event`]s back, so that answers and streams look like any other model's. The
//! routing report rides along as `cairn.route` in the answer (and in a stream's last
//! chunk).

use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;

use super::metrics::Metrics;
use super::scheduler::{find_stop, held_back, Event, Finish, Msg, Summary};
use crate::chat::Message;
use crate::error::Error;
use crate::route::router::{Budget, Fallback, Prompt, Router};
use crate::sampling::SamplerConfig;

/// Max tokens of a routed request that names none: the subset search prices every
/// expert for this many, so "the rest of the context" would price them all out.
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// What a routed request asks.
pub enum RoutedInput {
    Text(String),
    Chat(Vec<Message>),
}

pub struct RouteJob {
    pub input: RoutedInput,
    pub max_tokens: usize,
    pub sampling: SamplerConfig,
    pub stop: Vec<String>,
    pub budget: Budget,
    pub fallback: Fallback,
    /// When the server gives up on it (finish reason `length`).
    pub deadline: Instant,
    pub arrived: Instant,
    pub events: mpsc::UnboundedSender<Event>,
}

/// The server's budgets for requests that bring none.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub budget: Budget,
    pub fallback: Fallback,
}

/// The routed server's loop: workers answering jobs until every sender is gone.
pub struct RouteLoop {
    pub router: Arc<Router>,
    pub workers: usize,
    pub metrics: Arc<Metrics>,
    /// Where the refined profiles are saved after each answer (moving averages).
    pub profile_path: Option<std::path::PathBuf>,
    /// One save at a time.
    pub saving: Mutex<()>,
}

impl RouteLoop {
    pub fn run(self, rx: Receiver<Msg>) {
        let rx = Arc::new(Mutex::new(rx));
        let this = Arc::new(self);
        let handles: Vec<_> = (0..this.workers.max(1))
            .map(|k| {
                let (rx, this) = (rx.clone(), this.clone());
                std::thread::Builder::new().name(format!("cairn-route-{k}")).spawn(move || loop {
                    // The lock is held only while waiting for the next message.
                    let m = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    match m {
                        Ok(Msg::Route(job)) => this.answer(*job),
                        Ok(Msg::Generate(job)) => {
                            this.metrics.queued.fetch_sub(1, Ordering::Relaxed);
                            let _ = job.events.send(Event::Failed(Error::model("a routed server takes routed jobs")));
                        }
                        Ok(Msg::Memory(_, reply)) => {
                            let _ = reply.send(Err(Error::input(
                                "a routed server has no one memory budget: set each expert's in its registry",
                            )));
                        }
                        Err(_) => return,
                    }
                })
            })
            .collect();
        for h in handles.into_iter().flatten() {
            let _ = h.join();
        }
    }

    fn answer(&self, job: RouteJob) {
        let m = &self.metrics;
        m.queued.fetch_sub(1, Ordering::Relaxed);
        if job.events.is_closed() {
            m.cancelled.fetch_add(1, Ordering::Relaxed);
            return;
        }
        m.busy_slots.fetch_add(1, Ordering::Relaxed);
        let (mut text, mut sent, mut stopped, mut first) = (String::new(), 0usize, false, None);
        let events = job.events.clone();
        let stop = job.stop.clone();
        let deadline = job.deadline;
        // Text goes out as it comes, held back while it might begin a stop string.
        let on_text = |piece: &str| -> bool {
            if stopped || events.is_closed() {
                return false;
            }
            text.push_str(piece);
            if let Some(at) = find_stop(&text, &stop) {
                text.truncate(at);
                stopped = true;
            }
            let safe = if stopped { text.len() } else { text.len() - held_back(&text, &stop) };
            if safe > sent {
                first.get_or_insert_with(Instant::now);
                let _ = events.send(Event::Text(text[sent..safe].to_string(), Vec::new()));
                sent = safe;
            }
            !stopped && Instant::now() < deadline
        };
        let prompt = match &job.input {
            RoutedInput::Text(t) => Prompt::Text(t),
            RoutedInput::Chat(msgs) => Prompt::Chat(msgs),
        };
        let out = self.router.answer(prompt, job.max_tokens, &job.sampling, job.budget, job.fallback, on_text);
        m.busy_slots.fetch_sub(1, Ordering::Relaxed);
        let a = match out {
            Ok(a) => a,
            Err(e) => {
                let _ = job.events.send(Event::Failed(e));
                return;
            }
        };
        if !stopped && text.len() > sent {
            let _ = job.events.send(Event::Text(text[sent..].to_string(), Vec::new()));
        }
        let r = &a.report;
        m.prompt_tokens.fetch_add(r.prompt_tokens as u64, Ordering::Relaxed);
        m.generated_tokens.fetch_add(r.new_tokens as u64, Ordering::Relaxed);
        m.finished.fetch_add(1, Ordering::Relaxed);
        m.observe_request_energy(r.measured.energy_j);
        if let Some(t) = first {
            m.observe_ttft(t - job.arrived);
        }
        let finish = if !stopped && r.new_tokens >= job.max_tokens || Instant::now() >= deadline {
            Finish::Length
        } else {
            Finish::Stop
        };
        eprintln!(
            "route: {} answered ({}); predicted {:.2} s {:.2} J, measured {:.2} s {:.2} J{}",
            r.answered.join(" + "),
            r.chosen.join(", "),
            r.predicted.latency_s,
            r.predicted.energy_j,
            r.measured.latency_s,
            r.measured.energy_j,
            if r.energy_estimate { " (estimated)" } else { "" }
        );
        let _ = job.events.send(Event::Done(Summary {
            finish,
            prompt_tokens: r.prompt_tokens,
            cached_tokens: 0,
            completion_tokens: r.new_tokens,
            ttft: first.map(|t| t - job.arrived),
            route: Some(r.to_json()),
        }));
        if let Some(path) = &self.profile_path {
            let _one = self.saving.lock().unwrap_or_else(|e| e.into_inner());
            crate::route::save_profiles(path, &self.router);
        }
    }
}
