//! The HTTP side: routes, the API key, request bodies, answers and SSE streams. Handlers
//! never touch the model: they check a request, tokenize it, hand it to the loop, and
//! turn the loop's events into OpenAI's JSON.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method as HttpMethod, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use super::api::{self, ApiError, Endpoint, Input};
use super::scheduler::{Event, Finish, Job, Msg, Summary, TokenLogprob};
use super::App;
use crate::longctx::Method;

type Res<T> = std::result::Result<T, ApiError>;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        let mut r = (status, axum::Json(self.body())).into_response();
        if self.status == 503 {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == 401 {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/cairn/memory", post(memory))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(not_allowed)
        .layer(axum::middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// Every request: the API key (all but `/health`), the status counted, one log line
/// for the requests that generate nothing (generations log their own, with tokens).
async fn guard(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let start = Instant::now();
    let response = if path != "/health" && !authorized(&app, req.headers()) {
        ApiError {
            status: 401,
            message: "invalid or missing API key (send Authorization: Bearer KEY)".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
        .into_response()
    } else {
        next.run(req).await
    };
    let status = response.status().as_u16();
    app.metrics.count_status(status);
    let generates = path == "/v1/chat/completions" || path == "/v1/completions";
    if !generates || status != 200 {
        eprintln!("{method} {path} {status} {:.3}s", start.elapsed().as_secs_f64());
    }
    response
}

fn digest(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// Constant-time comparison of the presented key with ours (both hashed first, so that
/// not even the length leaks through timing).
fn authorized(app: &App, headers: &HeaderMap) -> bool {
    let Some(key) = &app.api_key else { return true };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let (a, b) = (digest(given.as_bytes()), digest(key.as_bytes()));
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(method: HttpMethod, uri: axum::http::Uri) -> ApiError {
    ApiError::invalid(None, format!("no route {method} {}", uri.path())).with(404, "not_found")
}

async fn not_allowed(method: HttpMethod, uri: axum::http::Uri) -> ApiError {
    ApiError::invalid(None, format!("{method} is not allowed on {}", uri.path())).with(405, "method_not_allowed")
}

async fn health(State(app): State<Arc<App>>) -> Response {
    match app.ready.get() {
        Some(_) => (StatusCode::OK, axum::Json(json!({"status": "ok"}))).into_response(),
        None => ApiError::server(503, "model_loading", "the model is still loading").into_response(),
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn models(State(app): State<Arc<App>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{ "id": app.model_name, "object": "model", "created": app.started, "owned_by": "cairn" }],
    }))
    .into_response()
}

async fn body(app: &App, b: Body) -> Res<bytes_alias::Bytes> {
    to_bytes(b, app.body_limit).await.map_err(|_| {
        ApiError::invalid(None, format!("the request body is larger than {} bytes", app.body_limit))
            .with(413, "request_too_large")
    })
}

/// `bytes::Bytes` as axum re-exports it.
mod bytes_alias {
    pub type Bytes = axum::body::Bytes;
}

fn ready(app: &App) -> Res<&super::Ready> {
    app.ready.get().ok_or_else(|| ApiError::server(503, "model_loading", "the model is still loading"))
}

async fn tokenize(State(app): State<Arc<App>>, b: Body) -> Res<Response> {
    let r = ready(&app)?;
    let v: Value = serde_json::from_slice(&body(&app, b).await?)
        .map_err(|e| ApiError::invalid(None, format!("the request body is not valid JSON: {e}")))?;
    let Some(text) = v.get("content").and_then(Value::as_str) else {
        return Err(ApiError::invalid(Some("content"), "content must be a string"));
    };
    let special = v.get("parse_special").and_then(Value::as_bool).unwrap_or(true);
    let mut ids = Vec::new();
    if v.get("add_special").and_then(Value::as_bool).unwrap_or(false) && r.engine.tokenizer.add_bos() {
        ids.extend(r.engine.tokenizer.bos_id());
    }
    ids.extend(
        r.engine.tokenizer.encode(text, special).map_err(|e| ApiError::invalid(Some("content"), e.to_string()))?,
    );
    if v.get("with_pieces").and_then(Value::as_bool).unwrap_or(false) {
        let tok = &r.engine.tokenizer;
        let pieces: Vec<Value> = ids
            .iter()
            .map(|&id| {
                let b = tok.token_to_piece(id).unwrap_or(&[]);
                json!({"id": id, "piece": String::from_utf8_lossy(b)})
            })
            .collect();
        return Ok(axum::Json(json!({ "tokens": pieces })).into_response());
    }
    Ok(axum::Json(json!({ "tokens": ids })).into_response())
}

async fn detokenize(State(app): State<Arc<App>>, b: Body) -> Res<Response> {
    let r = ready(&app)?;
    let v: Value = serde_json::from_slice(&body(&app, b).await?)
        .map_err(|e| ApiError::invalid(None, format!("the request body is not valid JSON: {e}")))?;
    let bad = || ApiError::invalid(Some("tokens"), "tokens must be a list of token ids");
    let ids: Vec<u32> = v
        .get("tokens")
        .and_then(Value::as_array)
        .ok_or_else(bad)?
        .iter()
        .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    let vocab = r.engine.vocab();
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(ApiError::invalid(Some("tokens"), format!("token id {bad} is outside the vocabulary of {vocab}")));
    }
    let text = r.engine.tokenizer.decode(&ids).map_err(|e| ApiError::invalid(Some("tokens"), e.to_string()))?;
    Ok(axum::Json(json!({ "content": text })).into_response())
}

async fn memory(State(app): State<Arc<App>>, b: Body) -> Res<Response> {
    let r = ready(&app)?;
    let v: Value = serde_json::from_slice(&body(&app, b).await?)
        .map_err(|e| ApiError::invalid(None, format!("the request body is not valid JSON: {e}")))?;
    let bytes = match v.get("bytes") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => crate::bitstack::parse_size(s).ok(),
        _ => None,
    }
    .ok_or_else(|| ApiError::invalid(Some("bytes"), "bytes must be a byte count (or a size such as \"90MB\")"))?;
    let (tx, rx) = oneshot::channel();
    r.send(Msg::Memory(bytes, tx))?;
    let plan = rx
        .await
        .map_err(|_| ApiError::server(503, "shutting_down", "the server is shutting down"))?
        .map_err(|e| ApiError::invalid(Some("bytes"), e.to_string()))?;
    Ok(axum::Json(json!({
        "budget": plan.budget,
        "blocks": plan.blocks,
        "total_blocks": plan.total_blocks,
        "stack_bytes": plan.change.stack_bytes,
        "plan": plan.to_string(),
    }))
    .into_response())
}

async fn chat(State(app): State<Arc<App>>, b: Body) -> Response {
    generate(app, b, Endpoint::Chat).await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(app): State<Arc<App>>, b: Body) -> Response {
    generate(app, b, Endpoint::Completions).await.unwrap_or_else(IntoResponse::into_response)
}

/// One line per generation, printed when it ends (or its client leaves).
struct Log {
    path: &'static str,
    start: Instant,
    summary: Option<Summary>,
    failed: bool,
}

impl Drop for Log {
    fn drop(&mut self) {
        let t = self.start.elapsed().as_secs_f64();
        match &self.summary {
            Some(s) => eprintln!(
                "POST {} 200 prompt={} cached={} gen={} ttft={:.3}s total={t:.3}s finish={}",
                self.path,
                s.prompt_tokens,
                s.cached_tokens,
                s.completion_tokens,
                s.ttft.map_or(0.0, |d| d.as_secs_f64()),
                s.finish.as_str()
            ),
            None if self.failed => eprintln!("POST {} 200 failed total={t:.3}s", self.path),
            None => eprintln!("POST {} 200 cancelled by the client total={t:.3}s", self.path),
        }
    }
}

async fn generate(app: Arc<App>, b: Body, ep: Endpoint) -> Res<Response> {
    let start = Instant::now();
    let bytes = body(&app, b).await?;
    let p = api::parse(&bytes, ep)?;
    let r = ready(&app)?;
    if let Some(m) = &p.model {
        if *m != app.model_name {
            return Err(ApiError::invalid(
                Some("model"),
                format!("model {m:?} is not served here (this server runs {:?})", app.model_name),
            )
            .with(404, "model_not_found"));
        }
    }
    if let Some(d) = r.route {
        return generate_routed(&app, r, p, ep, start, d).await;
    }
    let engine = &r.engine;
    let prompt = match &p.input {
        Input::Messages(msgs) => {
            let template = engine.template.as_ref().map_err(|why| {
                ApiError::invalid(
                    Some("messages"),
                    format!("this model has no usable chat template ({why}): use /v1/completions"),
                )
            })?;
            let text = template.render(msgs, true).map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
            engine.tokenizer.encode(&text, true).map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?
        }
        Input::Text(t) => engine.tokenize(t).map_err(|e| ApiError::invalid(Some("prompt"), e.to_string()))?,
        Input::Ids(ids) => {
            let vocab = engine.vocab();
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(ApiError::invalid(
                    Some("prompt"),
                    format!("token id {bad} is outside the vocabulary of {vocab}"),
                ));
            }
            ids.clone()
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid(Some("prompt"), "the prompt is empty"));
    }
    let method = p.knobs.method.unwrap_or(Method::Full);
    // A selecting method evaluates only what it keeps, so only that must fit.
    let evaluated = method.budget().map_or(prompt.len(), |k| k.min(prompt.len()));
    if evaluated >= r.ctx {
        return Err(ApiError::invalid(
            Some(if ep == Endpoint::Chat { "messages" } else { "prompt" }),
            format!(
                "the prompt has {} tokens; a slot's context is {} (at least one token must be left to generate)",
                prompt.len(),
                r.ctx
            ),
        )
        .with(400, "context_length_exceeded"));
    }
    let room = r.ctx - evaluated;
    let max_tokens = p.max_tokens.map_or(room, |m| m.min(room));
    let (tx, rx) = mpsc::unbounded_channel();
    let job = Job {
        prompt,
        max_tokens,
        sampling: p.sampling.clone(),
        stop: p.stop.clone(),
        logprobs: p.logprobs,
        echo: p.echo,
        method,
        memory: p.knobs.memory,
        deadline: start + app.timeout,
        arrived: start,
        events: tx,
    };
    r.submit(&app, Msg::Generate(Box::new(job)))?;
    Ok(respond(&app, &p, ep, start, rx).await)
}

/// The answer to a checked, queued request: a stream or one JSON body.
async fn respond(
    app: &App,
    p: &api::Params,
    ep: Endpoint,
    start: Instant,
    rx: mpsc::UnboundedReceiver<Event>,
) -> Response {
    let meta = Meta {
        id: format!(
            "{}-{:016x}",
            if ep == Endpoint::Chat { "chatcmpl" } else { "cmpl" },
            crate::sampling::seed_from_time()
        ),
        created: unix_now(),
        model: app.model_name.clone(),
        ep,
        token_ids: p.token_ids,
    };
    let log = Log {
        path: if ep == Endpoint::Chat { "/v1/chat/completions" } else { "/v1/completions" },
        start,
        summary: None,
        failed: false,
    };
    if p.stream {
        return stream(meta, rx, p.include_usage, p.logprobs.is_some(), log);
    }
    collect(meta, rx, p.logprobs.is_some(), log).await.unwrap_or_else(IntoResponse::into_response)
}

/// A routed server's request: its budgets from `cairn` (else the server's), the text
/// or chat handed to the router's workers, which tokenize per expert family.
async fn generate_routed(
    app: &App,
    r: &super::Ready,
    p: api::Params,
    ep: Endpoint,
    start: Instant,
    d: super::route::Defaults,
) -> Res<Response> {
    use super::route::{RouteJob, RoutedInput, DEFAULT_MAX_TOKENS};
    let (job, rx) = (|| -> Res<(RouteJob, mpsc::UnboundedReceiver<Event>)> {
        let not_here = |param: &str, what: &str| {
            ApiError::invalid(
                Some(param),
                format!("{what} is not available from a routed server (its answer mixes experts)"),
            )
            .with(400, "unsupported_parameter")
        };
        if p.logprobs.is_some() {
            return Err(not_here("logprobs", "logprobs"));
        }
        if p.echo {
            return Err(not_here("echo", "echo"));
        }
        if p.knobs.method.is_some() {
            return Err(not_here("cairn", "cairn.gemfilter"));
        }
        if p.knobs.memory.is_some() {
            return Err(not_here("cairn", "cairn.memory (each expert's is in the registry)"));
        }
        let input = match &p.input {
            Input::Messages(m) => RoutedInput::Chat(m.clone()),
            Input::Text(t) if t.is_empty() => return Err(ApiError::invalid(Some("prompt"), "the prompt is empty")),
            Input::Text(t) => RoutedInput::Text(t.clone()),
            Input::Ids(_) => return Err(not_here("prompt", "a prompt of token ids (experts differ in tokenizer)")),
        };
        let budget = crate::route::router::Budget {
            latency_s: p.knobs.latency_budget.unwrap_or(d.budget.latency_s),
            energy_j: p.knobs.energy_budget.unwrap_or(d.budget.energy_j),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let job = RouteJob {
            input,
            max_tokens: p.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS).min(r.ctx),
            sampling: p.sampling.clone(),
            stop: p.stop.clone(),
            budget,
            fallback: p.knobs.fallback.unwrap_or(d.fallback),
            deadline: start + app.timeout,
            arrived: start,
            events: tx,
        };
        Ok((job, rx))
    })()?;
    r.submit(app, Msg::Route(Box::new(job)))?;
    Ok(respond(app, &p, ep, start, rx).await)
}

/// What every chunk of one answer repeats.
struct Meta {
    id: String,
    created: u64,
    model: String,
    ep: Endpoint,
    token_ids: bool,
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.ep, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completions, _) => "text_completion",
        }
    }

    /// One choice of a chunk or answer: `text` is the delta (streamed) or the whole text.
    fn choice(&self, text: Option<&str>, role: bool, lps: Option<Value>, finish: Option<Finish>, chunk: bool) -> Value {
        let finish = finish.map(Finish::as_str);
        match self.ep {
            Endpoint::Chat => {
                let mut m = serde_json::Map::new();
                if role {
                    m.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    m.insert("content".into(), json!(t));
                }
                let key = if chunk { "delta" } else { "message" };
                json!({ "index": 0, key: m, "logprobs": lps, "finish_reason": finish })
            }
            Endpoint::Completions => {
                json!({ "index": 0, "text": text.unwrap_or(""), "logprobs": lps, "finish_reason": finish })
            }
        }
    }

    fn logprobs(&self, lps: &[TokenLogprob], offset: usize) -> Value {
        match self.ep {
            Endpoint::Chat => api::chat_logprobs(lps, self.token_ids),
            Endpoint::Completions => api::completion_logprobs(lps, offset, self.token_ids),
        }
    }

    fn wrap(&self, choices: Vec<Value>, usage: Option<Value>, chunk: bool, with_usage: bool) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": concat!("cairn-", env!("CARGO_PKG_VERSION")),
            "choices": choices,
        });
        if with_usage || usage.is_some() {
            v["usage"] = usage.unwrap_or(Value::Null);
        }
        v
    }
}

fn failure(e: &crate::error::Error) -> ApiError {
    match e {
        crate::error::Error::Input(m) => ApiError::invalid(None, m.clone()),
        other => ApiError::server(500, "inference_failed", other.to_string()),
    }
}

/// A whole answer at once.
async fn collect(meta: Meta, mut rx: mpsc::UnboundedReceiver<Event>, want_lps: bool, mut log: Log) -> Res<Response> {
    let (mut text, mut lps) = (String::new(), Vec::new());
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t, l) => {
                text.push_str(&t);
                lps.extend(l);
            }
            Event::Failed(e) => {
                log.failed = true;
                return Err(failure(&e));
            }
            Event::Done(s) => {
                let lp = want_lps.then(|| meta.logprobs(&lps, 0));
                let choice = meta.choice(Some(&text), true, lp, Some(s.finish), false);
                let usage = api::usage(s.prompt_tokens, s.completion_tokens, s.cached_tokens);
                let mut body = meta.wrap(vec![choice], Some(usage), false, true);
                if let Some(route) = &s.route {
                    body["cairn"] = json!({ "route": route });
                }
                log.summary = Some(s);
                return Ok(axum::Json(body).into_response());
            }
        }
    }
    log.failed = true;
    Err(ApiError::server(503, "shutting_down", "the server stopped before the answer was complete"))
}

struct StreamState {
    meta: Meta,
    rx: mpsc::UnboundedReceiver<Event>,
    out: VecDeque<Sse>,
    done: bool,
    usage: bool,
    want_lps: bool,
    /// Bytes of text sent (the legacy logprobs' text offsets).
    sent: usize,
    log: Log,
}

impl StreamState {
    fn data(&mut self, v: Value) {
        self.out.push_back(Sse::default().data(v.to_string()));
    }

    fn take(&mut self, ev: Option<Event>) {
        match ev {
            Some(Event::Text(t, l)) => {
                let lp = self.want_lps.then(|| self.meta.logprobs(&l, self.sent));
                self.sent += t.len();
                let c = self.meta.choice(Some(&t), false, lp, None, true);
                let v = self.meta.wrap(vec![c], None, true, self.usage);
                self.data(v);
            }
            Some(Event::Done(s)) => {
                let c = self.meta.choice(None, false, None, Some(s.finish), true);
                let c = if self.meta.ep == Endpoint::Completions {
                    self.meta.choice(Some(""), false, None, Some(s.finish), true)
                } else {
                    c
                };
                let mut v = self.meta.wrap(vec![c], None, true, self.usage);
                if let Some(route) = &s.route {
                    v["cairn"] = json!({ "route": route });
                }
                self.data(v);
                if self.usage {
                    let u = api::usage(s.prompt_tokens, s.completion_tokens, s.cached_tokens);
                    let v = self.meta.wrap(Vec::new(), Some(u), true, true);
                    self.data(v);
                }
                self.log.summary = Some(s);
                self.end();
            }
            Some(Event::Failed(e)) => {
                self.log.failed = true;
                let v = failure(&e).body();
                self.data(v);
                self.end();
            }
            None => {
                self.log.failed = true;
                let v =
                    ApiError::server(503, "shutting_down", "the server stopped before the answer was complete").body();
                self.data(v);
                self.end();
            }
        }
    }

    fn end(&mut self) {
        self.out.push_back(Sse::default().data("[DONE]"));
        self.done = true;
    }
}

/// Server-sent events as OpenAI sends them: a first chunk with the role, one chunk per
/// piece of text, a last chunk with the finish reason, the usage chunk when asked, then
/// `data: [DONE]`; comments keep an idle connection alive.
fn stream(meta: Meta, rx: mpsc::UnboundedReceiver<Event>, usage: bool, want_lps: bool, log: Log) -> Response {
    let mut st = StreamState { meta, rx, out: VecDeque::new(), done: false, usage, want_lps, sent: 0, log };
    let first = if st.meta.ep == Endpoint::Chat {
        st.meta.choice(Some(""), true, None, None, true)
    } else {
        st.meta.choice(Some(""), false, None, None, true)
    };
    let v = st.meta.wrap(vec![first], None, true, usage);
    st.data(v);
    let events = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(e) = st.out.pop_front() {
                return Some((Ok::<_, Infallible>(e), st));
            }
            if st.done {
                return None;
            }
            let ev = st.rx.recv().await;
            st.take(ev);
        }
    });
    axum::response::sse::Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)).text("keep-alive"))
        .into_response()
}

impl super::Ready {
    fn send(&self, m: Msg) -> Res<()> {
        self.tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(m)
            .map_err(|_| ApiError::server(503, "shutting_down", "the server is shutting down"))
    }

    /// Into the bounded queue, or 503 when it is full.
    fn submit(&self, app: &App, job: Msg) -> Res<()> {
        let q = &app.metrics.queued;
        if q.fetch_add(1, Ordering::SeqCst) >= app.queue as u64 {
            q.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::server(
                503,
                "queue_full",
                format!(
                    "all {} slots are busy and {} requests are waiting: try again shortly",
                    app.parallel, app.queue
                ),
            ));
        }
        if let Err(e) = self.send(job) {
            q.fetch_sub(1, Ordering::SeqCst);
            return Err(e);
        }
        Ok(())
    }
}
