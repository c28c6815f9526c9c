//! Remote experts: any OpenAI-compatible server (`cairn serve`, llama-server, vLLM),
//! spoken to over its legacy completions endpoint with token-id prompts, so that a
//! router sharing its tokenizer can mix its next-token distribution with local ones.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::profile::{median, Profile, PROFILE_TEXT};
use crate::chat::Message;
use crate::error::{Error, Result};

/// One remote expert's connection.
pub struct Remote {
    agent: ureq::Agent,
    url: String,
    model: Option<String>,
    api_key: Option<String>,
}

/// What one completion call returned.
#[derive(Debug, Clone, Default)]
pub struct Completion {
    pub text: String,
    /// Per generated token: the alternatives the server listed, by token id when it
    /// names them `token_id:N` (vLLM's form, which `cairn serve` also speaks) or by text.
    pub top: Vec<Vec<(Token, f32)>>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub finish: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Token {
    Id(u32),
    Text(String),
}

impl Remote {
    pub fn new(url: &str, model: Option<&str>, api_key: Option<&str>) -> Remote {
        // No proxy: an edge server is on the local network, and a proxy from the
        // environment would route loopback and 10.x addresses through it.
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .timeout_connect(Some(Duration::from_secs(10)))
            .user_agent(concat!("cairn/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Remote {
            agent,
            url: url.trim_end_matches('/').to_string(),
            model: model.map(str::to_string),
            api_key: api_key.map(str::to_string),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::Fetch(format!("{}: {what}: {e}", self.url))
    }

    /// GET `path`, its body as text (within `timeout`).
    fn get(&self, path: &str, timeout: Duration) -> Result<String> {
        let mut req = self.agent.get(format!("{}{path}", self.url)).config().timeout_global(Some(timeout)).build();
        if let Some(k) = &self.api_key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let resp = req.call().map_err(|e| self.err(path, e))?;
        let status = resp.status().as_u16();
        let text = resp.into_body().read_to_string().map_err(|e| self.err(path, e))?;
        if !(200..300).contains(&status) {
            return Err(self.err(path, format!("HTTP {status}: {}", text.chars().take(200).collect::<String>())));
        }
        Ok(text)
    }

    /// Seconds for one round trip to the server (its `/health`, else `/v1/models`).
    pub fn ping(&self, timeout: Duration) -> Result<f64> {
        let t = Instant::now();
        if self.get("/health", timeout).is_err() {
            let t = Instant::now();
            self.get("/v1/models", timeout)?;
            return Ok(t.elapsed().as_secs_f64());
        }
        Ok(t.elapsed().as_secs_f64())
    }

    /// A completion of the token ids `prompt` (greedy unless `temperature` > 0), with
    /// `logprobs` alternatives per token when asked; `pad` bytes of ignored `user`
    /// field measure the link's transfer rate.
    pub fn complete(
        &self,
        prompt: &[u32],
        max_tokens: usize,
        temperature: f32,
        logprobs: Option<usize>,
        pad: usize,
        timeout: Duration,
    ) -> Result<Completion> {
        let mut body = self.body(json!(prompt), max_tokens, temperature);
        if let Some(n) = logprobs {
            body["logprobs"] = json!(n);
            body["return_tokens_as_token_ids"] = json!(true);
        }
        if pad > 0 {
            body["user"] = json!("x".repeat(pad));
        }
        let text = self.post("/v1/completions", &body, timeout)?;
        parse_completion(&text).map_err(|e| self.err("/v1/completions", e))
    }

    /// The log-probability of each token of `ids` after the first (`echo` with
    /// `max_tokens: 0`, as lm-eval scores through an OpenAI server): `ids.len() − 1`
    /// values, as [`crate::engine::Engine::score`] gives locally.
    pub fn score(&self, ids: &[u32], timeout: Duration) -> Result<Vec<f32>> {
        let mut body = self.body(json!(ids), 1, 0.0);
        body["max_tokens"] = json!(0);
        body["echo"] = json!(true);
        body["logprobs"] = json!(0);
        let text = self.post("/v1/completions", &body, timeout)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| self.err("/v1/completions", e))?;
        let lps = v
            .pointer("/choices/0/logprobs/token_logprobs")
            .and_then(Value::as_array)
            .ok_or_else(|| self.err("echo", "the answer has no token_logprobs (does the server support echo?)"))?;
        if lps.len() != ids.len() {
            return Err(self.err("echo", format!("{} logprobs for {} prompt tokens", lps.len(), ids.len())));
        }
        lps[1..]
            .iter()
            .map(|x| x.as_f64().map(|x| x as f32).ok_or_else(|| self.err("echo", "a logprob is not a number")))
            .collect()
    }

    /// A completion of raw text (a server whose tokenizer the router does not share).
    pub fn complete_text(
        &self,
        prompt: &str,
        max_tokens: usize,
        temperature: f32,
        timeout: Duration,
    ) -> Result<Completion> {
        let body = self.body(json!(prompt), max_tokens, temperature);
        let text = self.post("/v1/completions", &body, timeout)?;
        parse_completion(&text).map_err(|e| self.err("/v1/completions", e))
    }

    /// A chat completion in the server's own template.
    pub fn chat(
        &self,
        messages: &[Message],
        max_tokens: usize,
        temperature: f32,
        timeout: Duration,
    ) -> Result<Completion> {
        let msgs: Vec<Value> = messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect();
        let mut body = self.body(Value::Null, max_tokens, temperature);
        if let Some(o) = body.as_object_mut() {
            o.remove("prompt");
            o.insert("messages".into(), json!(msgs));
        }
        let text = self.post("/v1/chat/completions", &body, timeout)?;
        parse_completion(&text).map_err(|e| self.err("/v1/chat/completions", e))
    }

    fn body(&self, prompt: Value, max_tokens: usize, temperature: f32) -> Value {
        let mut b = json!({
            "prompt": prompt,
            "max_tokens": max_tokens.max(1),
            "temperature": temperature,
            "seed": 1,
        });
        if let Some(m) = &self.model {
            b["model"] = json!(m);
        }
        b
    }

    fn post(&self, path: &str, body: &Value, timeout: Duration) -> Result<String> {
        let mut req = self
            .agent
            .post(format!("{}{path}", self.url))
            .config()
            .timeout_global(Some(timeout))
            .build()
            .header("Content-Type", "application/json");
        if let Some(k) = &self.api_key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let resp = req.send(body.to_string()).map_err(|e| self.err(path, e))?;
        let status = resp.status().as_u16();
        let text = resp.into_body().read_to_string().map_err(|e| self.err(path, e))?;
        if !(200..300).contains(&status) {
            return Err(self.err(path, format!("HTTP {status}: {}", text.chars().take(300).collect::<String>())));
        }
        Ok(text)
    }

    /// The server's energy counter, where it is `cairn serve` (its `/metrics`):
    /// (joules, source, estimate).
    pub fn joules(&self) -> Option<(f64, String, bool)> {
        let text = self.get("/metrics", Duration::from_secs(5)).ok()?;
        parse_energy(&text)
    }
}

/// The `choices[0]` text, logprobs and usage of a completions answer.
pub fn parse_completion(text: &str) -> std::result::Result<Completion, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let c = v.get("choices").and_then(|c| c.get(0)).ok_or("no choices in the answer")?;
    let mut out = Completion {
        text: c
            .get("text")
            .or_else(|| c.get("message").and_then(|m| m.get("content")))
            .and_then(Value::as_str)
            .ok_or("choices[0] has no text or message.content")?
            .to_string(),
        finish: c.get("finish_reason").and_then(Value::as_str).unwrap_or("").to_string(),
        ..Completion::default()
    };
    if let Some(u) = v.get("usage") {
        let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
        out.prompt_tokens = n("prompt_tokens");
        out.completion_tokens = n("completion_tokens");
    }
    if let Some(tops) = c.get("logprobs").and_then(|l| l.get("top_logprobs")).and_then(Value::as_array) {
        for t in tops {
            let Some(m) = t.as_object() else { continue };
            let mut alts: Vec<(Token, f32)> =
                m.iter().filter_map(|(k, lp)| Some((token_name(k), lp.as_f64()? as f32))).collect();
            alts.sort_by(|a, b| b.1.total_cmp(&a.1));
            out.top.push(alts);
        }
    }
    Ok(out)
}

fn token_name(k: &str) -> Token {
    match k.strip_prefix("token_id:").and_then(|n| n.parse().ok()) {
        Some(id) => Token::Id(id),
        None => Token::Text(k.to_string()),
    }
}

/// `cairn_energy_joules_total{source="…",estimate="…"} V` from a metrics page.
pub fn parse_energy(text: &str) -> Option<(f64, String, bool)> {
    let line = text.lines().find(|l| l.starts_with("cairn_energy_joules_total"))?;
    let (labels, value) = line.rsplit_once(' ')?;
    let label = |k: &str| {
        let at = labels.find(&format!("{k}=\""))? + k.len() + 2;
        let end = labels[at..].find('"')?;
        Some(labels[at..at + end].to_string())
    };
    Some((value.parse().ok()?, label("source").unwrap_or_else(|| "remote".into()), label("estimate")? == "true"))
}

/// Token text → id for a server that names its alternatives by text (llama-server):
/// the router's own tokenizer's pieces, where they are unambiguous.
pub fn piece_map(pieces: impl Iterator<Item = (u32, Vec<u8>)>) -> HashMap<String, u32> {
    let mut m: HashMap<String, Option<u32>> = HashMap::new();
    for (id, b) in pieces {
        if let Ok(s) = String::from_utf8(b) {
            m.entry(s).and_modify(|v| *v = None).or_insert(Some(id));
        }
    }
    m.into_iter().filter_map(|(k, v)| Some((k, v?))).collect()
}

/// Profile a remote expert: round trips, a padded request for the transfer rate, and
/// prefill and decode timings, the server's own compute taken apart from the network.
/// Energy is the server's (`/metrics` deltas) where it reports it, else `watts` × the
/// server's busy time, marked as an estimate.
pub fn measure(
    remote: &Remote,
    tokenize: &dyn Fn(&str) -> Result<Vec<u32>>,
    reps: usize,
    watts: f64,
) -> Result<Profile> {
    let timeout = Duration::from_secs(120);
    let mut ids = tokenize(&PROFILE_TEXT.repeat(4))?;
    ids.truncate(128);
    if ids.len() < 128 {
        return Err(Error::model("the profile text is too short for this tokenizer"));
    }
    let reps = reps.max(1);
    let mut rtt: Vec<f64> = (0..5).map(|_| remote.ping(timeout)).collect::<Result<_>>()?;
    let rtt = median(&mut rtt);
    let time = |prompt: &[u32], max: usize, pad: usize| -> Result<(f64, Completion)> {
        let t = Instant::now();
        let c = remote.complete(prompt, max, 0.0, None, pad, timeout)?;
        Ok((t.elapsed().as_secs_f64(), c))
    };
    // Warm-up (the server pages its weights in); different prompts defeat its prefix cache.
    time(&ids[..16], 1, 0)?;
    const PAD: usize = 1 << 20;
    let (mut short, mut long, mut dec, mut padded, mut plain) = (vec![], vec![], vec![], vec![], vec![]);
    let j0 = remote.joules();
    // The server's compute time over the timed requests (for the energy estimate).
    let mut busy = 0.0;
    let (mut ptoks, mut dtoks) = (0usize, 0usize);
    for r in 0..reps {
        // A different first token for every request: no prefix of an earlier one is
        // cached on the server (its prefix reuse would hide the prefill being timed).
        let salt = |v: &[u32], k: usize| {
            let mut v = v.to_vec();
            v[0] = ids[(r * 3 + k) % ids.len()];
            v
        };
        let (t, _) = time(&salt(&ids[..16], 1), 1, 0)?;
        short.push(t - rtt);
        let (t, _) = time(&salt(&ids, 2), 1, 0)?;
        long.push(t - rtt);
        let (t, c) = time(&salt(&ids, 3), 33, 0)?;
        let n = c.completion_tokens.max(2);
        dec.push(((t - rtt) - long[long.len() - 1]).max(1e-6) / (n - 1) as f64);
        busy += short[short.len() - 1] + long[long.len() - 1] + (t - rtt);
        ptoks += 16 + 2 * 128;
        dtoks += n;
        let (t, _) = time(&ids[..8], 1, PAD)?;
        padded.push(t);
        let (t, _) = time(&ids[..8], 1, 0)?;
        plain.push(t);
        busy += 2.0 * (t - rtt).max(0.0);
        ptoks += 16;
    }
    let j1 = remote.joules();
    let (ts, tl) = (median(&mut short), median(&mut long));
    let per_token = ((tl - ts) / 112.0).max(tl / 128.0 * 0.05);
    let extra = (median(&mut padded) - median(&mut plain)).max(1e-6);
    let decode_tps = 1.0 / median(&mut dec);
    let prefill_tps = 1.0 / per_token;
    // Split the joules between the phases by their share of the busy time.
    let (joules, source, estimate) = match (j0, j1) {
        (Some((a, src, est)), Some((b, _, _))) if b >= a => (b - a, format!("remote {src}"), est),
        _ => (watts * busy, "remote estimate".to_string(), true),
    };
    let t_prefill = ptoks as f64 / prefill_tps;
    let t_decode = dtoks as f64 / decode_tps;
    let share = t_prefill / (t_prefill + t_decode).max(1e-9);
    Ok(Profile {
        prefill_tps,
        decode_tps,
        start_s: (ts - 16.0 * per_token).max(0.0),
        prefill_j_per_token: joules * share / ptoks.max(1) as f64,
        decode_j_per_token: joules * (1.0 - share) / dtoks.max(1) as f64,
        energy_source: source,
        energy_estimate: estimate,
        rtt_s: Some(rtt),
        transfer_bps: Some(PAD as f64 / extra),
        observed: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_with_token_ids() {
        let c = parse_completion(
            r#"{"choices":[{"text":" Paris","finish_reason":"length","logprobs":{"tokens":["token_id:7"],
            "top_logprobs":[{"token_id:7":-0.1,"token_id:9":-2.5,"hello":-3.0}]}}],
            "usage":{"prompt_tokens":5,"completion_tokens":1}}"#,
        )
        .unwrap();
        assert_eq!(c.text, " Paris");
        assert_eq!((c.prompt_tokens, c.completion_tokens), (5, 1));
        assert_eq!(c.top[0], vec![(Token::Id(7), -0.1), (Token::Id(9), -2.5), (Token::Text("hello".into()), -3.0)]);
        assert!(parse_completion("{}").is_err());
        assert!(parse_completion("<html>").is_err());
    }

    #[test]
    fn energy_from_metrics() {
        let m = "# HELP x\ncairn_energy_joules_total{source=\"rapl\",estimate=\"false\"} 12.500000\n";
        assert_eq!(parse_energy(m), Some((12.5, "rapl".into(), false)));
        assert_eq!(parse_energy("cairn_requests_total 3\n"), None);
    }

    #[test]
    fn ambiguous_pieces_are_left_out() {
        let m = piece_map([(1, b"a".to_vec()), (2, b"b".to_vec()), (3, b"a".to_vec())].into_iter());
        assert_eq!(m.get("b"), Some(&2));
        assert_eq!(m.get("a"), None);
    }
}
