//! The OpenAI wire format: request bodies checked field by field (a field Cairn cannot
//! honour is refused by name, never ignored), errors in OpenAI's shape, and the JSON of
//! answers and stream chunks.

use serde_json::{json, Map, Value};

use super::scheduler::{Alt, TokenLogprob, MAX_TOP_LOGPROBS};
use crate::chat::Message;
use crate::longctx::Method;
use crate::sampling::SamplerConfig;

/// The served model's default sampling ([`crate::pull::model_sampling`]) for the fields
/// a request leaves out. Set once when the server loads its model (one per process);
/// unset, llama.cpp's generic defaults.
static DEFAULT_SAMPLING: std::sync::OnceLock<SamplerConfig> = std::sync::OnceLock::new();

/// Use `cfg` (seed aside) for every field a request leaves out; the first call wins.
pub fn set_default_sampling(cfg: SamplerConfig) {
    let _ = DEFAULT_SAMPLING.set(cfg);
}

/// An error answer: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn with(mut self, status: u16, code: &'static str) -> ApiError {
        self.status = status;
        self.code = Some(code);
        self
    }

    pub fn server(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), kind: "server_error", param: None, code: Some(code) }
    }

    pub fn body(&self) -> Value {
        json!({ "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code } })
    }
}

type Res<T> = std::result::Result<T, ApiError>;

/// What the prompt is.
#[derive(Debug)]
pub enum Input {
    Messages(Vec<Message>),
    Text(String),
    Ids(Vec<u32>),
}

/// Cairn's own knobs, under `"cairn"`.
#[derive(Debug, Default)]
pub struct Knobs {
    pub method: Option<Method>,
    pub memory: Option<u64>,
    /// A routed server's budgets for this request (seconds, joules) and fallback.
    pub latency_budget: Option<f64>,
    pub energy_budget: Option<f64>,
    pub fallback: Option<crate::route::router::Fallback>,
}

/// A checked request of either endpoint.
#[derive(Debug)]
pub struct Params {
    pub model: Option<String>,
    pub input: Input,
    pub stream: bool,
    pub include_usage: bool,
    pub max_tokens: Option<usize>,
    pub sampling: SamplerConfig,
    pub stop: Vec<String>,
    /// `Some(n)`: log-probabilities with `n` alternatives per token.
    pub logprobs: Option<usize>,
    /// Completions' `echo`: the prompt comes back before the answer, with its tokens'
    /// log-probabilities when `logprobs` is set (how a client scores text; with
    /// `max_tokens: 0`, scoring only).
    pub echo: bool,
    /// vLLM's `return_tokens_as_token_ids`: log-probability tokens as `token_id:N`, so
    /// that a client sharing the tokenizer (a MoE² router mixing token by token) knows
    /// the ids without decoding text.
    pub token_ids: bool,
    pub knobs: Knobs,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// Fields either endpoint takes.
const COMMON: &[&str] = &[
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "logprobs",
    "n",
    "cairn",
    "user",
    "return_tokens_as_token_ids",
];
const CHAT_ONLY: &[&str] = &["messages", "max_completion_tokens", "top_logprobs"];
const COMPLETIONS_ONLY: &[&str] = &["prompt", "echo", "suffix", "best_of"];

fn present<'a>(o: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    o.get(k).filter(|v| !v.is_null())
}

fn number(o: &Map<String, Value>, k: &str, lo: f64, hi: f64) -> Res<Option<f32>> {
    match present(o, k) {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && (lo..=hi).contains(&x) => Ok(Some(x as f32)),
            Some(_) => Err(ApiError::invalid(Some(k), format!("{k} must be between {lo} and {hi}"))),
            None => Err(ApiError::invalid(Some(k), format!("{k} must be a number"))),
        },
    }
}

fn count(o: &Map<String, Value>, k: &str) -> Res<Option<u64>> {
    match present(o, k) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| ApiError::invalid(Some(k), format!("{k} must be a non-negative integer"))),
    }
}

fn flag(o: &Map<String, Value>, k: &str) -> Res<bool> {
    match present(o, k) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::invalid(Some(k), format!("{k} must be true or false"))),
    }
}

/// Parse and check a request body for `ep`.
pub fn parse(body: &[u8], ep: Endpoint) -> Res<Params> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("the request body is not valid JSON: {e}")))?;
    let Value::Object(o) = v else {
        return Err(ApiError::invalid(None, "the request body must be a JSON object"));
    };
    let own = if ep == Endpoint::Chat { CHAT_ONLY } else { COMPLETIONS_ONLY };
    if let Some(k) = o.keys().find(|k| !COMMON.contains(&k.as_str()) && !own.contains(&k.as_str())) {
        let why = match k.as_str() {
            "tools" | "tool_choice" | "functions" | "function_call" | "parallel_tool_calls" => {
                "tool calls are not supported"
            }
            "response_format" => "structured output is not supported",
            "logit_bias" => "logit_bias is not supported",
            _ => "this field is not supported by cairn",
        };
        return Err(ApiError::invalid(Some(k), format!("{k}: {why}")).with(400, "unsupported_parameter"));
    }
    if let Some(n) = present(&o, "n") {
        if n.as_u64() != Some(1) {
            return Err(ApiError::invalid(Some("n"), "n: only n = 1 is supported").with(400, "unsupported_parameter"));
        }
    }
    let model = match present(&o, "model") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::invalid(Some("model"), "model must be a string")),
    };
    let input = match ep {
        Endpoint::Chat => Input::Messages(messages(present(&o, "messages"))?),
        Endpoint::Completions => {
            if present(&o, "suffix").is_some() {
                return Err(
                    ApiError::invalid(Some("suffix"), "suffix is not supported").with(400, "unsupported_parameter")
                );
            }
            if present(&o, "best_of").is_some_and(|b| b.as_u64() != Some(1)) {
                return Err(ApiError::invalid(Some("best_of"), "only best_of = 1 is supported")
                    .with(400, "unsupported_parameter"));
            }
            prompt(present(&o, "prompt"))?
        }
    };
    let stream = flag(&o, "stream")?;
    let include_usage = match present(&o, "stream_options") {
        None => false,
        Some(Value::Object(so)) => {
            if let Some(k) = so.keys().find(|k| *k != "include_usage") {
                return Err(ApiError::invalid(Some("stream_options"), format!("stream_options.{k} is not supported")));
            }
            if !stream {
                return Err(ApiError::invalid(Some("stream_options"), "stream_options needs stream: true"));
            }
            flag(so, "include_usage")?
        }
        Some(_) => return Err(ApiError::invalid(Some("stream_options"), "stream_options must be an object")),
    };
    let mut max_tokens = count(&o, "max_tokens")?;
    if ep == Endpoint::Chat {
        if let Some(m) = count(&o, "max_completion_tokens")? {
            max_tokens = Some(m);
        }
    }
    let echo = ep == Endpoint::Completions && flag(&o, "echo")?;
    if max_tokens == Some(0) && !echo {
        return Err(ApiError::invalid(Some("max_tokens"), "max_tokens must be at least 1 (0 only with echo)"));
    }
    let d = DEFAULT_SAMPLING.get().cloned().unwrap_or_default();
    let sampling = SamplerConfig {
        temperature: number(&o, "temperature", 0.0, 100.0)?.unwrap_or(d.temperature),
        top_k: count(&o, "top_k")?.map_or(d.top_k, |k| k as usize),
        top_p: number(&o, "top_p", 0.0, 1.0)?.unwrap_or(d.top_p),
        min_p: number(&o, "min_p", 0.0, 1.0)?.unwrap_or(d.min_p),
        presence_penalty: number(&o, "presence_penalty", -2.0, 2.0)?.unwrap_or(0.0),
        frequency_penalty: number(&o, "frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0),
        seed: match present(&o, "seed") {
            None => crate::sampling::seed_from_time(),
            Some(v) => v
                .as_i64()
                .map(|s| s as u64)
                .or_else(|| v.as_u64())
                .ok_or_else(|| ApiError::invalid(Some("seed"), "seed must be an integer"))?,
        },
        ..d
    };
    let stop = match present(&o, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 16 => a
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::invalid(Some("stop"), "stop must be a string or a list of strings"))?,
        Some(Value::Array(_)) => return Err(ApiError::invalid(Some("stop"), "stop takes at most 16 strings")),
        Some(_) => return Err(ApiError::invalid(Some("stop"), "stop must be a string or a list of strings")),
    };
    let logprobs = match ep {
        Endpoint::Chat => {
            let top = count(&o, "top_logprobs")?;
            match (flag(&o, "logprobs")?, top) {
                (true, t) => Some(t.unwrap_or(0) as usize),
                (false, Some(_)) => {
                    return Err(ApiError::invalid(Some("top_logprobs"), "top_logprobs needs logprobs: true"))
                }
                (false, None) => None,
            }
        }
        // The legacy endpoint's `logprobs` is the number of alternatives (0..=5).
        Endpoint::Completions => count(&o, "logprobs")?.map(|n| n as usize),
    };
    if let Some(n) = logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
        let p = if ep == Endpoint::Chat { "top_logprobs" } else { "logprobs" };
        return Err(ApiError::invalid(Some(p), format!("{p}: {n} alternatives asked, at most {MAX_TOP_LOGPROBS}")));
    }
    let knobs = knobs(present(&o, "cairn"))?;
    let max_tokens = max_tokens.map(|m| m as usize);
    let token_ids = flag(&o, "return_tokens_as_token_ids")?;
    Ok(Params { model, input, stream, include_usage, max_tokens, sampling, stop, logprobs, echo, token_ids, knobs })
}

fn messages(v: Option<&Value>) -> Res<Vec<Message>> {
    let p = Some("messages");
    let Some(Value::Array(a)) = v else {
        return Err(ApiError::invalid(p, "messages must be a list of {role, content} objects"));
    };
    if a.is_empty() {
        return Err(ApiError::invalid(p, "messages must not be empty"));
    }
    a.iter()
        .enumerate()
        .map(|(i, m)| {
            let Value::Object(m) = m else {
                return Err(ApiError::invalid(p, format!("messages[{i}] must be an object")));
            };
            if let Some(k) = m.keys().find(|k| *k != "role" && *k != "content") {
                return Err(ApiError::invalid(p, format!("messages[{i}].{k} is not supported"))
                    .with(400, "unsupported_parameter"));
            }
            let role = match m.get("role").and_then(Value::as_str) {
                Some(r @ ("system" | "user" | "assistant")) => r,
                Some("developer") => "system",
                Some(r) => return Err(ApiError::invalid(p, format!("messages[{i}]: role {r:?} is not supported"))),
                None => return Err(ApiError::invalid(p, format!("messages[{i}].role must be a string"))),
            };
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None if role == "assistant" => String::new(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|part| {
                        match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => Ok(t),
                            _ => Err(ApiError::invalid(
                                p,
                                format!("messages[{i}]: only text content parts are supported"),
                            )),
                        }
                    })
                    .collect::<Res<Vec<_>>>()?
                    .concat(),
                _ => return Err(ApiError::invalid(p, format!("messages[{i}].content must be a string"))),
            };
            Ok(Message::new(role, content))
        })
        .collect()
}

fn prompt(v: Option<&Value>) -> Res<Input> {
    let p = Some("prompt");
    let bad = || ApiError::invalid(p, "prompt must be a string, a list of one string, or a list of token ids");
    match v {
        Some(Value::String(s)) => Ok(Input::Text(s.clone())),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Ok(Input::Text(a[0].as_str().unwrap_or("").into()))
        }
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_u64) => a
            .iter()
            .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect::<Option<_>>()
            .map(Input::Ids)
            .ok_or_else(bad),
        Some(Value::Array(a)) if a.len() > 1 && a.iter().all(Value::is_string) => {
            Err(ApiError::invalid(p, "a batch of prompts is not supported: send one per request")
                .with(400, "unsupported_parameter"))
        }
        None => Err(ApiError::invalid(p, "prompt is required")),
        _ => Err(bad()),
    }
}

fn knobs(v: Option<&Value>) -> Res<Knobs> {
    let p = Some("cairn");
    let Some(v) = v else { return Ok(Knobs::default()) };
    let Value::Object(o) = v else {
        return Err(ApiError::invalid(
            p,
            "cairn must be an object: {\"gemfilter\": \"k=N,layer=N|auto\", \"memory\": bytes}",
        ));
    };
    let mut k = Knobs::default();
    for (key, val) in o {
        match (key.as_str(), val) {
            ("gemfilter", Value::String(spec)) => {
                k.method = Some(
                    Method::parse_gemfilter(spec).map_err(|e| ApiError::invalid(p, format!("cairn.gemfilter: {e}")))?,
                )
            }
            ("gemfilter", Value::Bool(true)) => {
                k.method = Some(Method::parse_gemfilter("").map_err(|e| ApiError::invalid(p, e.to_string()))?)
            }
            ("gemfilter", Value::Bool(false) | Value::Null) => {}
            ("memory", Value::Number(n)) => {
                k.memory = Some(n.as_u64().ok_or_else(|| ApiError::invalid(p, "cairn.memory must be a byte count"))?)
            }
            ("memory", Value::String(s)) => {
                k.memory = Some(
                    crate::bitstack::parse_size(s).map_err(|e| ApiError::invalid(p, format!("cairn.memory: {e}")))?,
                )
            }
            ("latency_budget" | "energy_budget", v) => {
                let parsed = match v {
                    Value::String(s) if key == "latency_budget" => crate::route::router::parse_seconds(s),
                    Value::String(s) => crate::route::router::parse_joules(s),
                    Value::Number(n) => match n.as_f64() {
                        Some(x) if x.is_finite() && x > 0.0 => Ok(x),
                        _ => Err(crate::error::Error::input(format!("the {key} must be more than 0, not {n}"))),
                    },
                    _ => return Err(ApiError::invalid(p, format!("cairn.{key} must be a number or a string such as \"2s\" or \"3J\""))),
                };
                let x = parsed.map_err(|e| ApiError::invalid(p, format!("cairn.{key}: {e}")))?;
                if key == "latency_budget" {
                    k.latency_budget = Some(x);
                } else {
                    k.energy_budget = Some(x);
                }
            }
            ("fallback", Value::String(f)) => {
                k.fallback = Some(f.parse().map_err(|e: String| ApiError::invalid(p, format!("cairn.fallback: {e}")))?)
            }
            ("gemfilter" | "memory" | "fallback", _) => {
                return Err(ApiError::invalid(p, format!("cairn.{key} has the wrong type")));
            }
            _ => {
                return Err(ApiError::invalid(
                    p,
                    format!(
                        "cairn.{key} is not a cairn option (gemfilter, memory; routed: latency_budget, energy_budget, fallback)"
                    ),
                ))
            }
        }
    }
    Ok(k)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// How a token is named in log-probabilities: its text, or `token_id:N`.
fn name(a: &Alt, ids: bool) -> String {
    if ids {
        format!("token_id:{}", a.id)
    } else {
        lossy(&a.bytes)
    }
}

/// Chat's `logprobs.content` entries.
pub fn chat_logprobs(lps: &[TokenLogprob], ids: bool) -> Value {
    let entries: Vec<Value> = lps
        .iter()
        .map(|t| {
            json!({
                "token": name(&t.token, ids),
                "logprob": t.token.logprob,
                "bytes": t.token.bytes,
                "top_logprobs": t.top.iter().map(|a| json!({"token": name(a, ids), "logprob": a.logprob, "bytes": a.bytes})).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "content": entries })
}

/// The completions endpoint's `logprobs` object (`text_offset` counts from `offset`).
pub fn completion_logprobs(lps: &[TokenLogprob], offset: usize, ids: bool) -> Value {
    let mut at = offset;
    let mut offsets = Vec::with_capacity(lps.len());
    for t in lps {
        offsets.push(at);
        at += lossy(&t.token.bytes).len();
    }
    json!({
        "tokens": lps.iter().map(|t| name(&t.token, ids)).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|t| t.token.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|t| {
            let mut m = Map::new();
            for a in &t.top {
                m.entry(name(a, ids)).or_insert(json!(a.logprob));
            }
            Value::Object(m)
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

pub fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": { "cached_tokens": cached },
    })
}
