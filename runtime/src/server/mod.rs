//! `cairn serve`: an OpenAI-compatible HTTP server with continuous batching.
//!
//! One inference thread owns the model ([`scheduler`]); the HTTP handlers ([`http`],
//! axum on tokio) only check, tokenize and enqueue requests and stream back what the
//! loop sends. The port answers from the start (`/health` says 503 until the model is
//! loaded); SIGTERM or Ctrl-C stops accepting, lets running requests finish within a
//! deadline, then exits.

pub mod api;
mod http;
pub mod metrics;
pub mod route;
pub mod scheduler;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::engine::{Engine, EngineOptions};
use crate::error::{Error, Result};
use metrics::Metrics;
use scheduler::{Msg, Scheduler};

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub model: PathBuf,
    /// The id `/v1/models` lists and requests name.
    pub model_name: String,
    pub host: String,
    pub port: u16,
    /// Slots: sequences decoded together.
    pub parallel: usize,
    /// Requests that may wait for a slot; past it, 503.
    pub queue: usize,
    /// Context of each slot, in tokens (0: the model's, at most 4096).
    pub ctx: usize,
    pub api_key: Option<String>,
    pub engine: EngineOptions,
    /// Server-side limit on one request.
    pub timeout: Duration,
    /// How long SIGTERM waits for running requests.
    pub drain: Duration,
    pub body_limit: usize,
    /// Serve a MoE² router over this registry instead of one model.
    pub route: Option<RouteServe>,
}

#[derive(Debug, Clone)]
pub struct RouteServe {
    pub registry: PathBuf,
    pub defaults: route::Defaults,
}

/// What the handlers share.
pub struct App {
    ready: OnceLock<Ready>,
    metrics: Arc<Metrics>,
    model_name: String,
    api_key: Option<String>,
    parallel: usize,
    queue: usize,
    timeout: Duration,
    body_limit: usize,
    started: u64,
}

/// The loaded model and the way to its loop.
pub struct Ready {
    /// The model (a routed server: its embedder, whose tokenizer `/tokenize` speaks).
    engine: Arc<Engine>,
    tx: Mutex<std::sync::mpsc::Sender<Msg>>,
    ctx: usize,
    /// Set on a routed server: the budgets of requests that bring none.
    route: Option<route::Defaults>,
}

/// The thread that answers: one model's batching loop, or a router's workers.
enum Loop {
    One(Scheduler),
    Routed(route::RouteLoop),
}

impl Loop {
    fn run(self, rx: std::sync::mpsc::Receiver<Msg>) {
        match self {
            Loop::One(s) => s.run(rx),
            Loop::Routed(r) => r.run(rx),
        }
    }
}

/// Default context per slot when the model's is larger: a slot's cache is allocated as
/// it fills, but the budget announced at start assumes every slot full.
const DEFAULT_SLOT_CTX: usize = 4096;

/// KV cache bytes per token of `c` (f16 keys and values in every layer).
fn kv_bytes_per_token(c: &crate::model::ModelConfig) -> u64 {
    (c.n_layers * c.n_kv_heads * c.head_dim * 2 * 2) as u64
}

pub fn run(opts: ServeOptions) -> Result<()> {
    if opts.parallel == 0 {
        return Err(Error::input("--parallel must be at least 1"));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::model(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(serve(opts))
}

async fn serve(opts: ServeOptions) -> Result<()> {
    let addr: SocketAddr = format!("{}:{}", opts.host, opts.port)
        .parse()
        .or_else(|_| {
            use std::net::ToSocketAddrs;
            (opts.host.as_str(), opts.port).to_socket_addrs().ok().and_then(|mut a| a.next()).ok_or(())
        })
        .map_err(|_| Error::input(format!("--host {:?} is not an address this machine can bind", opts.host)))?;
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|e| Error::input(format!("cannot listen on {addr}: {e}")))?;
    let metrics = Arc::new(Metrics::default());
    metrics.slots.store(opts.parallel as u64, Ordering::Relaxed);
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let app = Arc::new(App {
        ready: OnceLock::new(),
        metrics: metrics.clone(),
        model_name: opts.model_name.clone(),
        api_key: opts.api_key.clone(),
        parallel: opts.parallel,
        queue: opts.queue,
        timeout: opts.timeout,
        body_limit: opts.body_limit,
        started,
    });
    eprintln!(
        "serve: listening on http://{} (loading {})",
        listener.local_addr().unwrap_or(addr),
        opts.route.as_ref().map_or(&opts.model, |r| &r.registry).display()
    );

    // The model loads beside the listener; its thread then becomes the inference loop.
    let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel::<Result<()>>();
    let loader_app = app.clone();
    let loader_opts = opts.clone();
    std::thread::Builder::new()
        .name("cairn-infer".into())
        .spawn(move || {
            let (tx, rx) = std::sync::mpsc::channel();
            let sched = match load(&loader_opts, &loader_app, tx) {
                Ok(s) => s,
                Err(e) => {
                    let _ = loaded_tx.send(Err(e));
                    return;
                }
            };
            let _ = loaded_tx.send(Ok(()));
            sched.run(rx);
        })
        .map_err(|e| Error::model(format!("cannot start the inference thread: {e}")))?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, http::router(app.clone())).with_graceful_shutdown(async move {
        shutdown_signal().await;
        eprintln!("serve: shutting down: no new connections; running requests may finish");
        let _ = stop_tx.send(true);
    });
    let drain = opts.drain;
    let deadline = async move {
        let mut rx = stop_rx;
        while !*rx.borrow() {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        tokio::time::sleep(drain).await;
    };
    let load_failed = async move {
        match loaded_rx.await {
            Ok(Err(e)) => e,
            // Loaded (or the thread ended without a word): nothing more to watch.
            _ => std::future::pending().await,
        }
    };
    tokio::select! {
        r = server => r.map_err(|e| Error::model(format!("the server failed: {e}")))?,
        _ = deadline => eprintln!("serve: the drain deadline ({}s) passed: exiting with requests still running", drain.as_secs()),
        e = load_failed => return Err(e),
    }
    eprintln!("serve: stopped");
    Ok(())
}

fn load(opts: &ServeOptions, app: &App, tx: std::sync::mpsc::Sender<Msg>) -> Result<Loop> {
    if let Some(r) = &opts.route {
        return load_router(opts, r, app, tx);
    }
    let t = std::time::Instant::now();
    // Peek at the model's context to size the slots before loading, so that a memory
    // budget reserves the KV cache of every slot.
    let file = crate::weights::ModelFile::open(&opts.model)?;
    let model_ctx = crate::model::ModelConfig::from_file(&file)?.context;
    let ctx = if opts.ctx == 0 { model_ctx.min(DEFAULT_SLOT_CTX) } else { opts.ctx.min(model_ctx) };
    let engine_opts = EngineOptions { context: ctx * opts.parallel, ..opts.engine.clone() };
    let engine = Arc::new(Engine::from_file(file, &engine_opts)?);
    let sampling = crate::pull::model_sampling(&engine.file, &crate::sampling::SamplingHints::NONE, 0);
    log::info!("serve: default sampling {}", sampling.describe());
    api::set_default_sampling(sampling.config);
    if let Some(note) = &engine.backend_note {
        eprintln!("note: {note}");
    }
    let c = engine.runner.config();
    let kv = kv_bytes_per_token(c) * (ctx * opts.parallel) as u64;
    app.metrics.kv_bytes.store(kv, Ordering::Relaxed);
    if let Some(b) = opts.engine.memory {
        app.metrics.memory_budget.store(b, Ordering::Relaxed);
    }
    let mut sched = Scheduler::new(engine.clone(), opts.parallel, ctx, app.metrics.clone())?;
    // Energy per request for /metrics: the first real counter, else the estimate.
    let energy = crate::energy::detect_here();
    eprintln!("serve: {}", energy.note);
    sched.set_energy(energy.reader);
    // The power gauge (a Jetson's board power) reads its own reader at each scrape.
    app.metrics.set_power_reader(crate::energy::detect_here().reader);
    eprintln!(
        "serve: {} on {} in {:.1}s; {} slots × {ctx} tokens (KV cache at most {:.1} MiB), queue {}",
        app.model_name,
        engine.runner.backend_name(),
        t.elapsed().as_secs_f64(),
        opts.parallel,
        kv as f64 / (1 << 20) as f64,
        opts.queue
    );
    let _ = app.ready.set(Ready { engine, tx: Mutex::new(tx), ctx, route: None });
    Ok(Loop::One(sched))
}

/// A routed server: the registry's router, `--parallel` requests answered at once.
fn load_router(opts: &ServeOptions, r: &RouteServe, app: &App, tx: std::sync::mpsc::Sender<Msg>) -> Result<Loop> {
    let t = std::time::Instant::now();
    let reg = crate::route::registry::Registry::load(&r.registry)?;
    let gate = crate::route::load_gate(&reg)?;
    let router = Arc::new(crate::route::open(&reg, gate)?);
    let engine = router.embedder_engine()?;
    // The embedder's cache length bounds a request (the router's own sessions are sized
    // per request within each expert's).
    let ctx = match &reg.experts[reg.embedder].place {
        crate::route::registry::Place::Local { context, .. } => *context,
        crate::route::registry::Place::Remote { .. } => crate::route::registry::DEFAULT_CONTEXT,
    };
    app.metrics.set_power_reader(crate::energy::detect_here().reader);
    eprintln!(
        "serve: router {} over {} experts ({}) in {:.1}s; {} at once, queue {}; default budgets {:.3} s, {:.3} J",
        app.model_name,
        reg.experts.len(),
        reg.names().join(", "),
        t.elapsed().as_secs_f64(),
        opts.parallel,
        opts.queue,
        r.defaults.budget.latency_s,
        r.defaults.budget.energy_j
    );
    let _ = app.ready.set(Ready { engine, tx: Mutex::new(tx), ctx, route: Some(r.defaults) });
    Ok(Loop::Routed(route::RouteLoop {
        router,
        workers: opts.parallel,
        metrics: app.metrics.clone(),
        profile_path: Some(reg.side_file("profile")),
        saving: Mutex::new(()),
    }))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
