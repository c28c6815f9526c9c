//! Needle in a haystack: a random key and value hidden at some depth of real text, a
//! question about it at the end, the answer scored by exact match of the value. One
//! full-attention prefill per case feeds every method (the first r+1 layers of GemFilter's
//! pass are those of the full pass, bit for bit; SnapKV and H2O compact copies of its
//! cache), so a table costs one long prefill per case plus the short second passes.
//! Also the filter-stage recall by layer, and `layer=auto`'s calibration.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::chat::Message;
use crate::engine::{Engine, Session};
use crate::error::{Error, Result};
use crate::longctx::{self, FilterLayer, Method, SNAPKV_WINDOW};
use crate::model::{Logits, Probe, PREFILL_CHUNK};
use crate::sampling::{Sampler, SamplerConfig};
use crate::synthetic::SplitMix;

/// Real text that exists on a Debian/Ubuntu machine, concatenated in this order.
pub const HAYSTACK_FILES: &[&str] = &[
    "/usr/share/common-licenses/GPL-3",
    "/usr/share/common-licenses/GPL-2",
    "/usr/share/common-licenses/Apache-2.0",
    "/usr/share/common-licenses/LGPL-2.1",
    "/usr/share/common-licenses/MPL-2.0",
];

/// Tokens left free after the prompt for the answer.
const ANSWER_ROOM: usize = 16;
/// Calibration of `layer=auto`: prompts of this many tokens, budget `n / 8` (the ratio
/// of k = 1024 at 8k), these depths; a layer passes when it keeps the whole value in at
/// least `AUTO_PASS` of the cases.
const AUTO_LENGTH: usize = 2048;
const AUTO_DEPTHS: &[f64] = &[0.1, 0.3, 0.5, 0.7, 0.9];
const AUTO_PASS: f64 = 0.9;

const ADJECTIVES: &[&str] =
    &["crimson", "silent", "amber", "northern", "hollow", "copper", "velvet", "frozen", "gilded", "restless"];
const NOUNS: &[&str] = &["otter", "lantern", "harbor", "falcon", "orchard", "glacier", "compass", "meadow", "anvil"];

/// The haystack: `path`, or [`HAYSTACK_FILES`] (those present).
pub fn haystack(path: Option<&Path>) -> Result<(String, Vec<PathBuf>)> {
    let paths: Vec<PathBuf> = match path {
        Some(p) => vec![p.to_path_buf()],
        None => HAYSTACK_FILES.iter().map(PathBuf::from).filter(|p| p.exists()).collect(),
    };
    let mut text = String::new();
    for p in &paths {
        let bytes = std::fs::read(p).map_err(|source| Error::Io { path: p.clone(), source })?;
        text.push_str(&String::from_utf8_lossy(&bytes));
        text.push_str("\n\n");
    }
    if text.trim().is_empty() {
        return Err(Error::input(format!(
            "no haystack text: none of {} exists; pass --haystack FILE",
            HAYSTACK_FILES.join(", ")
        )));
    }
    Ok((text, paths))
}

/// One needle test: the prompt and where the needle is in it.
#[derive(Debug, Clone)]
pub struct Case {
    pub length: usize,
    pub depth: f64,
    pub seed: u64,
    pub key: String,
    pub value: String,
    pub ids: Vec<u32>,
    /// Prompt indices of the tokens that spell the value.
    pub value_tokens: Vec<usize>,
    /// Prompt indices of the whole needle sentence.
    pub needle_tokens: Vec<usize>,
}

/// Build the case of `length` prompt tokens (at most; the answer has room after it)
/// with the needle at `depth` (0: start of the haystack, 1: its end).
pub fn make_case(engine: &Engine, hay_ids: &[u32], length: usize, depth: f64, seed: u64) -> Result<Case> {
    let mut rng = SplitMix(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ (length as u64) ^ depth.to_bits());
    let key = format!(
        "{}-{}",
        ADJECTIVES[(rng.next_u64() % ADJECTIVES.len() as u64) as usize],
        NOUNS[(rng.next_u64() % NOUNS.len() as u64) as usize]
    );
    let value = format!("{}", 1_000_000 + rng.next_u64() % 9_000_000);
    let needle = format!(" The secret passcode of the {key} vault is {value}. ");
    let question = format!("What is the secret passcode of the {key} vault?");
    let answer_prefix = format!("The secret passcode of the {key} vault is");
    let target = length.min(engine.runner.config().context).saturating_sub(ANSWER_ROOM);
    let tok = &engine.tokenizer;
    let mut hay_len = target.min(hay_ids.len());
    for _ in 0..4 {
        let hay = tok.decode(&hay_ids[..hay_len])?;
        // At a line or sentence boundary at or before the depth.
        let want = ((hay.len() as f64) * depth.clamp(0.0, 1.0)) as usize;
        let mut at = want.min(hay.len());
        while !hay.is_char_boundary(at) {
            at -= 1;
        }
        let at = hay[..at].rfind(['\n', '.']).map_or(0, |i| i + 1);
        let text = format!("{}{needle}{}\n\n{question}", &hay[..at], &hay[at..]);
        let (prompt, needle_at) = render(engine, &text, &answer_prefix)?;
        let ids = tok.encode(&prompt, true)?;
        let ids = if tok.add_bos() { tok.bos_id().into_iter().chain(ids).collect() } else { ids };
        if ids.len() > target && hay_len > 0 {
            hay_len = hay_len.saturating_sub(ids.len() - target);
            continue;
        }
        // Token spans from the pieces' byte lengths.
        let mut ends = Vec::with_capacity(ids.len());
        let mut off = 0;
        for &id in &ids {
            off += tok.token_to_piece(id)?.len();
            ends.push(off);
        }
        let start = needle_at + at;
        let span = |a: usize, b: usize| -> Vec<usize> {
            (0..ids.len()).filter(|&i| ends[i] > a && (i == 0 || ends[i - 1] < b)).collect()
        };
        let v_at = start + needle.find(&value).unwrap_or(0);
        return Ok(Case {
            length,
            depth,
            seed,
            value_tokens: span(v_at, v_at + value.len()),
            needle_tokens: span(start + 1, start + needle.len() - 1),
            key,
            value,
            ids,
        });
    }
    Err(Error::input(format!("could not fit a needle prompt into {length} tokens")))
}

/// The prompt text (template applied where the model has one) ending in the answer's
/// first words, and the byte offset at which `text` starts in it (BOS not counted).
fn render(engine: &Engine, text: &str, answer_prefix: &str) -> Result<(String, usize)> {
    const MARK: &str = "\u{1}CAIRN-HAYSTACK\u{1}";
    let body = match &engine.template {
        Ok(t) => {
            let s = t.render(&[Message::new("user", MARK)], true).map_err(|e| Error::Text(e.to_string()))?;
            format!("{s}{answer_prefix}")
        }
        Err(_) => format!("{MARK}\n{answer_prefix}"),
    };
    let at = body.find(MARK).ok_or_else(|| Error::Text("the chat template dropped the message".into()))?;
    // Without BOS text: `encode` adds none and the BOS id is prepended separately.
    Ok((body.replacen(MARK, text, 1), at))
}

/// The first run of digits in `answer`.
pub fn first_number(answer: &str) -> String {
    answer.chars().skip_while(|c| !c.is_ascii_digit()).take_while(|c| c.is_ascii_digit()).collect()
}

/// What one method answered in one case.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub method: String,
    pub answer: String,
    pub correct: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub length: usize,
    pub depth: f64,
    pub seed: u64,
    pub prompt_tokens: usize,
    pub key: String,
    pub value: String,
    pub answers: Vec<Answer>,
    /// Per layer: the fraction of the needle sentence's tokens GemFilter's top-k keeps
    /// there, and whether it keeps every token of the value.
    pub needle_recall: Vec<f64>,
    pub value_kept: Vec<bool>,
}

/// The harness's settings.
#[derive(Debug, Clone)]
pub struct NeedleOptions {
    pub lengths: Vec<usize>,
    pub depths: Vec<f64>,
    pub seeds: usize,
    pub methods: Vec<String>,
    pub k: usize,
    pub layer: FilterLayer,
    pub max_new: usize,
}

/// Run one case: one full prefill (recording what every method needs), then each
/// method's answer, and GemFilter's recall at every layer.
pub fn run_case(engine: &Engine, case: &Case, opts: &NeedleOptions, layer: Option<usize>) -> Result<CaseResult> {
    let runner = &engine.runner;
    let c = runner.config().clone();
    let n = case.ids.len();
    let want = |m: &str| opts.methods.iter().any(|x| x == m);
    let mut cache = runner.new_cache(n + opts.max_new)?;
    let mut probe =
        Probe { queries_from: Some(n - SNAPKV_WINDOW.min(n)), mass: want("h2o").then(Vec::new), ..Probe::default() };
    let mut logits = Vec::new();
    for chunk in case.ids.chunks(PREFILL_CHUNK) {
        logits = runner.forward_probe(cache.as_mut(), chunk, Logits::Last, &mut probe)?;
    }
    // GemFilter's selection at every layer, from the same pass.
    let mut selections = Vec::with_capacity(c.n_layers);
    for l in 0..c.n_layers {
        let q = probe.queries.get(l).ok_or_else(|| Error::model("no query recorded"))?;
        let last = &q[q.len() - c.n_heads * c.head_dim..];
        let keys = runner.layer_keys(cache.as_mut(), l)?;
        selections.push(longctx::gemfilter_select(last, &keys, c.n_heads, c.n_kv_heads, c.head_dim, opts.k));
    }
    let kept = |sel: &[usize], toks: &[usize]| toks.iter().filter(|t| sel.binary_search(t).is_ok()).count();
    let needle_recall = selections
        .iter()
        .map(|s| kept(s, &case.needle_tokens) as f64 / case.needle_tokens.len().max(1) as f64)
        .collect();
    let value_kept = selections.iter().map(|s| kept(s, &case.value_tokens) == case.value_tokens.len()).collect();

    let greedy = || Sampler::new(SamplerConfig { temperature: 0.0, ..SamplerConfig::default() });
    let mut answers = Vec::new();
    let mut record = |method: &str, session: &mut Session<'_>, logits: Vec<f32>| -> Result<()> {
        let g = session.decode(logits, opts.max_new, &mut greedy(), |_| ControlFlow::Continue(()))?;
        let got = first_number(&g.text);
        answers.push(Answer { method: method.into(), correct: got == case.value, answer: g.text });
        Ok(())
    };
    // Compacted copies first: the full answer then appends to the original cache.
    if want("snapkv") {
        let shape = (c.n_heads, c.n_kv_heads, c.head_dim);
        let keep = (0..c.n_layers)
            .map(|l| {
                let keys = runner.layer_keys(cache.as_mut(), l)?;
                Ok(longctx::snapkv_select(&probe.queries[l], probe.scales[l], &keys, shape, opts.k))
            })
            .collect::<Result<Vec<_>>>()?;
        let compact = runner.compact(cache.as_mut(), &keep)?;
        record("snapkv", &mut Session::from_cache(engine, compact, case.ids.clone(), None), logits.clone())?;
    }
    if let (true, Some(mass)) = (want("h2o"), probe.mass.take()) {
        let mut s = Session::from_cache(engine, runner.new_cache(1)?, case.ids.clone(), None);
        s.adopt_h2o(cache.as_mut(), opts.k, mass)?;
        record("h2o", &mut s, logits.clone())?;
    }
    let selected_run = |method: Method| -> Result<(Session<'_>, Vec<f32>)> {
        let mut s = engine.new_session(n + opts.max_new)?;
        let sel = match method {
            Method::GemFilter { .. } => {
                let r = layer.ok_or_else(|| Error::input("no filter layer"))?;
                if opts.k >= n {
                    (0..n).collect()
                } else {
                    selections[r].clone()
                }
            }
            m => engine.select(&case.ids, m)?,
        };
        let ids: Vec<u32> = sel.iter().map(|&i| case.ids[i]).collect();
        let logits = s.prefill(&ids)?;
        Ok((s, logits))
    };
    // `gemfilter@N`: GemFilter at filter layer N, from the same first pass.
    for m in &opts.methods {
        if let Some(r) = fixed_layer(m) {
            let sel = selections.get(r).ok_or_else(|| Error::input(format!("{m}: no such layer")))?;
            let sel = if opts.k >= n { (0..n).collect() } else { sel.clone() };
            let mut s = engine.new_session(n + opts.max_new)?;
            let l = s.prefill(&sel.iter().map(|&i| case.ids[i]).collect::<Vec<_>>())?;
            record(m, &mut s, l)?;
        }
    }
    for m in ["gemfilter", "recent", "random"] {
        if want(m) {
            let method = Method::by_name(m, opts.k, opts.layer, case.seed ^ 0x5EED)?;
            let (mut s, l) = selected_run(method)?;
            record(m, &mut s, l)?;
        }
    }
    if want("full") {
        record("full", &mut Session::from_cache(engine, cache, case.ids.clone(), None), logits)?;
    }
    answers.sort_by_key(|a| opts.methods.iter().position(|m| *m == a.method));
    Ok(CaseResult {
        length: case.length,
        depth: case.depth,
        seed: case.seed,
        prompt_tokens: n,
        key: case.key.clone(),
        value: case.value.clone(),
        answers,
        needle_recall,
        value_kept,
    })
}

/// The layer of a `gemfilter@N` method name.
pub fn fixed_layer(method: &str) -> Option<usize> {
    method.strip_prefix("gemfilter@")?.parse().ok()
}

/// Refuse unknown method names before any work.
pub fn check_methods(opts: &NeedleOptions) -> Result<()> {
    for m in &opts.methods {
        if fixed_layer(m).is_none() {
            Method::by_name(m, opts.k, opts.layer, 0)?;
        }
    }
    Ok(())
}

/// The whole grid, reporting each case as it finishes.
pub fn run(engine: &Engine, hay: &str, opts: &NeedleOptions, mut progress: impl FnMut(&CaseResult)) -> Result<Report> {
    check_methods(opts)?;
    let ctx = engine.runner.config().context;
    if let Some(&l) = opts.lengths.iter().find(|&&l| l > ctx) {
        return Err(Error::input(format!("length {l} exceeds the model's context length {ctx}")));
    }
    let layer = if opts.methods.iter().any(|m| m == "gemfilter") {
        Some(engine.filter_layer(opts.layer, opts.k)?)
    } else {
        None
    };
    let hay_ids = engine.tokenizer.encode(hay, false)?;
    let mut cases = Vec::new();
    for &length in &opts.lengths {
        for &depth in &opts.depths {
            for seed in 0..opts.seeds as u64 {
                let case = make_case(engine, &hay_ids, length, depth, seed)?;
                let r = run_case(engine, &case, opts, layer)?;
                progress(&r);
                cases.push(r);
            }
        }
    }
    Ok(Report::new(opts, layer, cases))
}

/// Accuracy tables and recall by layer.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub k: usize,
    pub filter_layer: Option<usize>,
    pub lengths: Vec<usize>,
    pub depths: Vec<f64>,
    pub seeds: usize,
    /// method → [length][depth] accuracy in percent.
    pub accuracy: BTreeMap<String, Vec<Vec<f64>>>,
    /// method → overall accuracy in percent.
    pub overall: BTreeMap<String, f64>,
    /// Per layer: mean needle-token recall, and the fraction of cases keeping the value.
    pub recall_by_layer: Vec<(f64, f64)>,
    pub cases: Vec<CaseResult>,
}

impl Report {
    fn new(opts: &NeedleOptions, layer: Option<usize>, cases: Vec<CaseResult>) -> Report {
        let mut accuracy = BTreeMap::new();
        let mut overall = BTreeMap::new();
        for m in &opts.methods {
            let hit = |c: &CaseResult| c.answers.iter().any(|a| a.method == *m && a.correct);
            let table = opts
                .lengths
                .iter()
                .map(|&l| {
                    opts.depths
                        .iter()
                        .map(|&d| {
                            let cs: Vec<_> = cases.iter().filter(|c| c.length == l && c.depth == d).collect();
                            100.0 * cs.iter().filter(|c| hit(c)).count() as f64 / cs.len().max(1) as f64
                        })
                        .collect()
                })
                .collect();
            accuracy.insert(m.clone(), table);
            overall
                .insert(m.clone(), 100.0 * cases.iter().filter(|c| hit(c)).count() as f64 / cases.len().max(1) as f64);
        }
        let n_layers = cases.first().map_or(0, |c| c.needle_recall.len());
        let recall_by_layer = (0..n_layers)
            .map(|l| {
                let n = cases.len().max(1) as f64;
                (
                    cases.iter().map(|c| c.needle_recall[l]).sum::<f64>() / n,
                    cases.iter().filter(|c| c.value_kept[l]).count() as f64 / n,
                )
            })
            .collect();
        Report {
            k: opts.k,
            filter_layer: layer,
            lengths: opts.lengths.clone(),
            depths: opts.depths.clone(),
            seeds: opts.seeds,
            accuracy,
            overall,
            recall_by_layer,
            cases,
        }
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        for (m, table) in &self.accuracy {
            let layer = match (m.as_str(), self.filter_layer, fixed_layer(m)) {
                ("gemfilter", Some(r), _) => format!(", layer {r} (auto)"),
                (_, _, Some(r)) => format!(", layer {r}"),
                _ => String::new(),
            };
            let budget = if m == "full" { String::new() } else { format!(" (k = {}{layer})", self.k) };
            s += &format!("\n{m}{budget}: {:.0}% overall\n\n| length |", self.overall[m]);
            for d in &self.depths {
                s += &format!(" {d} |");
            }
            s += "\n| ---: |";
            s += &" ---: |".repeat(self.depths.len());
            s += "\n";
            for (l, row) in self.lengths.iter().zip(table) {
                s += &format!("| {l} |");
                for v in row {
                    s += &format!(" {v:.0} |");
                }
                s += "\n";
            }
        }
        s += &format!("\nGemFilter filter-stage recall by layer (k = {}):\n\n| layer | needle tokens kept | value kept |\n| ---: | ---: | ---: |\n", self.k);
        for (l, (r, v)) in self.recall_by_layer.iter().enumerate() {
            s += &format!("| {l} | {:.1}% | {:.0}% |\n", r * 100.0, v * 100.0);
        }
        s
    }
}

/// The earliest layer whose recall meets [`AUTO_PASS`], from a report.
pub fn earliest_layer(recall_by_layer: &[(f64, f64)]) -> Option<usize> {
    recall_by_layer.iter().position(|&(_, v)| v >= AUTO_PASS)
}

/// `layer=auto`: the cached choice for this model, or a calibration run (then cached
/// under `$CAIRN_HOME/gemfilter/`).
pub fn auto_layer(engine: &Engine, _k: usize) -> Result<usize> {
    let path = auto_cache_path(engine);
    if let Some(r) = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v["layer"].as_u64())
        .filter(|&r| (r as usize) < engine.runner.config().n_layers)
    {
        return Ok(r as usize);
    }
    let length = AUTO_LENGTH.min(engine.runner.config().context);
    eprintln!("gemfilter: calibrating the filter layer for this model (once; cached in {})", path.display());
    let (hay, _) = haystack(None)?;
    let opts = NeedleOptions {
        lengths: vec![length],
        depths: AUTO_DEPTHS.to_vec(),
        seeds: 1,
        methods: Vec::new(),
        k: (length / 8).max(1),
        layer: FilterLayer::Fixed(0),
        max_new: 1,
    };
    let report = run(engine, &hay, &opts, |c| eprintln!("  calibration case at depth {} done", c.depth))?;
    let r = earliest_layer(&report.recall_by_layer).unwrap_or(engine.runner.config().n_layers - 1);
    save_auto(engine, r, &report)?;
    Ok(r)
}

fn auto_cache_path(engine: &Engine) -> PathBuf {
    let name = engine.file.path.file_name().map_or("model".into(), |n| n.to_string_lossy().into_owned());
    crate::weights::cairn_home().join("gemfilter").join(format!("{name}-{}.json", engine.file.file_bytes()))
}

/// Cache `layer` as this model's automatic filter layer, with the recall that chose it.
pub fn save_auto(engine: &Engine, layer: usize, report: &Report) -> Result<()> {
    let path = auto_cache_path(engine);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
    }
    let v = serde_json::json!({
        "layer": layer,
        "criterion": format!("earliest layer keeping every value token in >= {}% of cases", AUTO_PASS * 100.0),
        "k": report.k, "lengths": report.lengths, "depths": report.depths,
        "recall_by_layer": report.recall_by_layer,
    });
    std::fs::write(&path, v.to_string()).map_err(|source| Error::Io { path: path.clone(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_layers() {
        assert_eq!(first_number(" 1234567. And"), "1234567");
        assert_eq!(first_number(" none"), "");
        assert_eq!(earliest_layer(&[(0.5, 0.2), (0.9, 0.95), (1.0, 1.0)]), Some(1));
        assert_eq!(earliest_layer(&[(0.5, 0.2)]), None);
    }
}
