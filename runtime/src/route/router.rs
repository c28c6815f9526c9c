//! Routing at run time (DESIGN §5 step 4): per request, embed the prompt, ask the gate
//! for weights and expected losses, search the best subset of experts that fits the
//! budgets, run the chosen ones in parallel, and mix them.
//!
//! Experts that share a tokenizer (a *family*) are mixed token by token: every step
//! each one gives its next-token distribution (local: the full softmax; remote: the
//! server's top alternatives), the gate's weights renormalised over the live ones mix
//! them, and the drawn token goes to all. Families are mixed by answer: each writes its
//! own, and the one with the most gate weight among those that finished is taken. An
//! expert that errs or misses its step deadline is dropped and the others go on.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::profile::{Cost, Observation, Profile, Profiles};
#[cfg(feature = "cli")]
use super::remote::{Remote, Token};
use super::{Expert, Instance};
use crate::chat::Message;
use crate::energy::EnergyReader;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::sampling::{Sampler, SamplerConfig};
use crate::tokenizer::StreamDecoder;

/// What the gate tells the router about one prompt.
pub trait GateModel: Send + Sync {
    /// The softmax over every expert (the subset search masks and renormalises it).
    fn weights(&self, embedding: &[f32]) -> Result<Vec<f64>>;
    /// The loss of every subset, by bitmask (entry 0 unused).
    fn loss_table(&self, embedding: &[f32]) -> Result<Vec<f64>>;
}

/// When no subset fits the budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The cheapest expert answers anyway (and the report says so).
    Cheapest,
    /// The request fails with the reason.
    Refuse,
}

impl std::str::FromStr for Fallback {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Fallback, String> {
        match s {
            "cheapest" => Ok(Fallback::Cheapest),
            "refuse" => Ok(Fallback::Refuse),
            _ => Err(format!("unknown fallback {s:?} (cheapest or refuse)")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub latency_s: f64,
    pub energy_j: f64,
}

impl Budget {
    pub fn check(&self) -> Result<()> {
        for (what, v) in [("latency budget", self.latency_s), ("energy budget", self.energy_j)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::input(format!("the {what} must be more than 0, not {v}")));
            }
        }
        Ok(())
    }
}

/// A request's prompt: raw text to continue, or a chat in each model's template.
#[derive(Debug, Clone, Copy)]
pub enum Prompt<'a> {
    Text(&'a str),
    Chat(&'a [Message]),
}

/// How a routed answer came about.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// The experts the search chose (with the fallback: the cheapest alone).
    pub chosen: Vec<String>,
    /// Their gate weights, renormalised over the chosen set.
    pub weights: Vec<f64>,
    /// Those whose tokens or answer made the reply (the chosen minus the dropped, and
    /// for mixed families only the family taken).
    pub answered: Vec<String>,
    /// Dropped experts and why.
    pub dropped: Vec<(String, String)>,
    /// Set when nothing fit the budgets and the cheapest expert answered.
    pub fallback: Option<String>,
    /// Set when every chosen expert was dropped and a spare local one answered.
    pub rescue: Option<String>,
    pub expected_loss: f64,
    pub predicted: Cost,
    pub measured: Cost,
    /// Whether the measured energy is (partly) an estimate.
    pub energy_estimate: bool,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
}

impl Report {
    /// The report as one JSON object (`--route-json`, and `cairn.route` in served answers).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "chosen": self.chosen,
            "weights": self.weights,
            "answered": self.answered,
            "dropped": self.dropped.iter().map(|(n, why)| serde_json::json!({"expert": n, "why": why})).collect::<Vec<_>>(),
            "fallback": self.fallback,
            "rescue": self.rescue,
            "expected_loss": self.expected_loss,
            "predicted": {"latency_s": self.predicted.latency_s, "energy_j": self.predicted.energy_j},
            "measured": {"latency_s": self.measured.latency_s, "energy_j": self.measured.energy_j, "energy_estimate": self.energy_estimate},
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
        })
    }
}

pub struct Answer {
    pub text: String,
    pub report: Report,
}

enum Member {
    Local(Arc<Engine>),
    #[cfg(feature = "cli")]
    Remote(Arc<Remote>),
}

/// A router over a registry's experts.
pub struct Router {
    names: Vec<String>,
    devices: Vec<String>,
    members: Vec<Member>,
    /// Tokenizer family per expert; a family's first local member tokenizes for it.
    family: Vec<usize>,
    rep: Vec<Option<usize>>,
    embedder: usize,
    gate: Box<dyn GateModel>,
    profiles: Mutex<Vec<Profile>>,
    energy: Mutex<Box<dyn EnergyReader>>,
    locks: HashMap<String, Arc<Mutex<()>>>,
    /// Per family, piece text → id, for servers that name alternatives by text
    /// (llama-server); built on first use.
    #[cfg(feature = "cli")]
    pieces: Vec<std::sync::OnceLock<Arc<HashMap<String, u32>>>>,
    /// Token-id alternatives a remote expert is asked for per step.
    pub top_logprobs: usize,
}

/// One expert of a [`Router`] as its caller builds it.
pub enum Built {
    Local(Box<Engine>),
    /// A remote expert; `tokenizer`: the local expert whose tokenizer it shares (mixed
    /// token by token with that family), or none (it answers by text).
    #[cfg(feature = "cli")]
    Remote {
        remote: Remote,
        tokenizer: Option<usize>,
    },
}

/// The tokenizer family of each expert: local ones by their vocabulary (same pieces,
/// same family), a remote one with the family of the local expert it names as its
/// tokenizer (`tokenizer_of[i]`, for local ones ignored), else a family of its own.
pub fn families(engines: &[Option<&Engine>], tokenizer_of: &[Option<usize>]) -> Result<Vec<usize>> {
    let n = engines.len();
    let mut family = vec![usize::MAX; n];
    let mut fingerprints: Vec<(usize, u64)> = Vec::new();
    for (i, e) in engines.iter().enumerate() {
        if let Some(e) = e {
            let fp = vocab_hash(e);
            family[i] = fingerprints.iter().position(|x| *x == fp).unwrap_or_else(|| {
                fingerprints.push(fp);
                fingerprints.len() - 1
            });
        }
    }
    let mut next = fingerprints.len();
    for i in 0..n {
        if engines[i].is_some() {
            continue;
        }
        family[i] = match tokenizer_of.get(i).copied().flatten() {
            Some(t) if t < n && engines[t].is_some() => family[t],
            Some(t) => return Err(Error::input(format!("expert {i}: its tokenizer expert {t} is not local"))),
            None => {
                next += 1;
                next - 1
            }
        };
    }
    Ok(family)
}

/// A fingerprint of a tokenizer: its size and every piece.
fn vocab_hash(e: &Engine) -> (usize, u64) {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let n = e.tokenizer.vocab_size();
    for id in 0..n as u32 {
        e.tokenizer.token_to_piece(id).unwrap_or(&[]).hash(&mut h);
    }
    (n, h.finish())
}

impl Router {
    /// `experts[i]` is expert `i` of `names`/`devices`; `embedder` must be local.
    pub fn new(
        names: Vec<String>,
        devices: Vec<String>,
        experts: Vec<Built>,
        embedder: usize,
        gate: Box<dyn GateModel>,
        profiles: &Profiles,
        energy: Box<dyn EnergyReader>,
    ) -> Result<Router> {
        let n = experts.len();
        if names.len() != n || devices.len() != n || n == 0 || n > super::MAX_EXPERTS {
            return Err(Error::input(format!(
                "a router needs 1..={} experts, names and devices alike",
                super::MAX_EXPERTS
            )));
        }
        let profiles = profiles.for_experts(&names)?;
        let mut members = Vec::with_capacity(n);
        let mut tokenizer_of = Vec::with_capacity(n);
        for b in experts {
            match b {
                Built::Local(e) => {
                    members.push(Member::Local(Arc::new(*e)));
                    tokenizer_of.push(None);
                }
                #[cfg(feature = "cli")]
                Built::Remote { remote, tokenizer } => {
                    members.push(Member::Remote(Arc::new(remote)));
                    tokenizer_of.push(tokenizer);
                }
            }
        }
        let engines: Vec<Option<&Engine>> = members
            .iter()
            .map(|m| match m {
                Member::Local(e) => Some(&**e),
                #[cfg(feature = "cli")]
                Member::Remote(_) => None,
            })
            .collect();
        let family = families(&engines, &tokenizer_of)?;
        let count = family.iter().max().map_or(0, |m| m + 1);
        let rep: Vec<Option<usize>> =
            (0..count).map(|f| (0..n).find(|&i| family[i] == f && engines[i].is_some())).collect();
        drop(engines);
        if !matches!(members.get(embedder), Some(Member::Local(_))) {
            return Err(Error::input("the embedder must be a local expert"));
        }
        let locks = devices.iter().map(|d| (d.clone(), Arc::new(Mutex::new(())))).collect();
        Ok(Router {
            names,
            devices,
            members,
            family,
            rep,
            embedder,
            gate,
            profiles: Mutex::new(profiles),
            energy: Mutex::new(energy),
            locks,
            #[cfg(feature = "cli")]
            pieces: (0..count).map(|_| std::sync::OnceLock::new()).collect(),
            top_logprobs: 20,
        })
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The embedder's engine: the tokenizer a routed server's `/tokenize` speaks.
    pub fn embedder_engine(&self) -> Result<Arc<Engine>> {
        self.local(self.embedder).cloned().ok_or_else(|| Error::model("the embedder is not local"))
    }

    /// The profiles as requests have refined them.
    pub fn profiles(&self) -> Vec<Profile> {
        self.profiles.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn local(&self, i: usize) -> Option<&Arc<Engine>> {
        match &self.members[i] {
            Member::Local(e) => Some(e),
            #[cfg(feature = "cli")]
            Member::Remote(_) => None,
        }
    }

    /// The prompt's ids in family `f`'s tokenizer and template (none for a text family).
    fn ids(&self, f: usize, prompt: Prompt) -> Result<Option<Vec<u32>>> {
        let Some(r) = self.rep[f] else { return Ok(None) };
        let e = self.local(r).ok_or_else(|| Error::model("a family's representative is not local"))?;
        Ok(Some(match prompt {
            Prompt::Text(t) => e.tokenize(t)?,
            Prompt::Chat(m) => e.chat_ids(m)?,
        }))
    }

    /// The subset search for one request: the chosen mask, its table loss, the costs,
    /// and the fallback note. Exposed for `route eval` and tests.
    pub fn plan(&self, prompt: Prompt, max_tokens: usize, budget: Budget, fallback: Fallback) -> Result<Plan> {
        budget.check()?;
        let emb_ids = self.ids(self.family[self.embedder], prompt)?.unwrap_or_default();
        let embedder = self.local(self.embedder).ok_or_else(|| Error::model("the embedder is not local"))?;
        let emb = embedder.embed(&emb_ids)?;
        let weights = self.gate.weights(&emb)?;
        let loss = self.gate.loss_table(&emb)?;
        let n = self.names.len();
        if weights.len() != n || loss.len() != 1 << n {
            return Err(Error::model(format!("the gate is for {} experts, the registry has {n}", weights.len())));
        }
        let bytes = match prompt {
            Prompt::Text(t) => t.len(),
            Prompt::Chat(m) => m.iter().map(|m| m.content.len() + 16).sum(),
        };
        let mut counts = vec![0usize; self.rep.len()];
        for (f, c) in counts.iter_mut().enumerate() {
            *c = match self.ids(f, prompt)? {
                Some(ids) => ids.len(),
                None => bytes / 4 + 1,
            };
        }
        let profiles = self.profiles();
        let experts: Vec<Expert> = (0..n)
            .map(|i| {
                let c = self.cost(i, &profiles[i], counts[self.family[i]], max_tokens, bytes);
                Expert {
                    name: self.names[i].clone(),
                    device: self.devices[i].clone(),
                    latency_s: c.latency_s,
                    energy_j: c.energy_j,
                }
            })
            .collect();
        let inst = Instance { experts, loss, latency_budget_s: budget.latency_s, energy_budget_j: budget.energy_j };
        let a = inst.solve()?;
        let fallback_note = (!a.feasible).then(|| {
            format!(
                "no set of experts fits {:.3} s and {:.3} J: the cheapest, {}, needs {:.3} s and {:.3} J",
                budget.latency_s, budget.energy_j, a.chosen[0], a.latency_s, a.energy_j
            )
        });
        if let (Some(why), Fallback::Refuse) = (&fallback_note, fallback) {
            return Err(Error::input(format!("request refused: {why}")));
        }
        Ok(Plan {
            mask: a.mask,
            loss: a.loss,
            predicted: Cost { latency_s: a.latency_s, energy_j: a.energy_j },
            weights,
            fallback: fallback_note,
            prompt_tokens: counts[self.family[self.embedder]],
        })
    }

    /// Expert `i`'s predicted cost: its profile, plus for a remote expert mixed token
    /// by token one round trip per generated token (it is asked once per step).
    fn cost(&self, i: usize, p: &Profile, prompt: usize, new: usize, bytes: usize) -> Cost {
        if self.rep[self.family[i]].is_some() && self.local(i).is_none() {
            p.predict_stepped(prompt, new, bytes)
        } else {
            p.predict(prompt, new, bytes)
        }
    }

    /// Route one request and generate its answer, streaming text through `on_text`
    /// when a single family answers (several families: the taken answer at the end);
    /// `on_text` returning false ends the answer there (a stop string, a client gone).
    pub fn answer(
        &self,
        prompt: Prompt,
        max_tokens: usize,
        sampling: &SamplerConfig,
        budget: Budget,
        fallback: Fallback,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Answer> {
        let t0 = Instant::now();
        let j0 = self.energy.lock().unwrap_or_else(|e| e.into_inner()).read_joules()?;
        let plan = self.plan(prompt, max_tokens, budget, fallback)?;
        let n = self.names.len();
        let chosen: Vec<usize> = (0..n).filter(|i| plan.mask >> i & 1 == 1).collect();
        let wsum: f64 = chosen.iter().map(|&i| plan.weights[i]).sum();
        let w: Vec<f64> = chosen
            .iter()
            .map(|&i| if wsum > 0.0 { plan.weights[i] / wsum } else { 1.0 / chosen.len() as f64 })
            .collect();
        let mut families: Vec<usize> = chosen.iter().map(|&i| self.family[i]).collect();
        families.sort_unstable();
        families.dedup();
        let remote_j0: Vec<Option<f64>> = chosen.iter().map(|&i| self.remote_joules(i)).collect();
        let deadline = t0 + Duration::from_secs_f64(budget.latency_s);
        let profiles = self.profiles();
        // One family runs here, streaming; several run in parallel and one is taken.
        let outcomes: Vec<(usize, Result<FamilyRun>)> = if let [f] = families[..] {
            let members: Vec<(usize, f64)> = chosen.iter().copied().zip(w.iter().copied()).collect();
            vec![(
                f,
                self.run_family(f, &members, prompt, max_tokens, sampling, &profiles, deadline, Some(&mut on_text)),
            )]
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = families
                    .iter()
                    .map(|&f| {
                        let members: Vec<(usize, f64)> = chosen
                            .iter()
                            .zip(&w)
                            .filter(|(&i, _)| self.family[i] == f)
                            .map(|(&i, &w)| (i, w))
                            .collect();
                        let profiles = &profiles;
                        let run = move || {
                            self.run_family(f, &members, prompt, max_tokens, sampling, profiles, deadline, None)
                        };
                        (f, s.spawn(run))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|(f, h)| (f, h.join().unwrap_or_else(|_| Err(Error::model("an expert's thread panicked")))))
                    .collect()
            })
        };
        let mut report = Report {
            chosen: chosen.iter().map(|&i| self.names[i].clone()).collect(),
            weights: w.clone(),
            fallback: plan.fallback.clone(),
            expected_loss: plan.loss,
            predicted: plan.predicted,
            prompt_tokens: plan.prompt_tokens,
            ..Report::default()
        };
        // The family with the most gate weight among those that answered.
        let mut best: Option<(f64, FamilyRun)> = None;
        let mut errors = Vec::new();
        for (f, out) in outcomes {
            match out {
                Ok(run) => {
                    report.dropped.extend(run.dropped.iter().cloned());
                    let weight: f64 = chosen.iter().zip(&w).filter(|(&i, _)| self.family[i] == f).map(|(_, w)| w).sum();
                    if best.as_ref().is_none_or(|(bw, _)| weight > *bw) {
                        if let Some((_, old)) = best.take() {
                            for &i in &old.live {
                                report
                                    .dropped
                                    .push((self.names[i].clone(), "its family's answer was not taken".into()));
                            }
                        }
                        best = Some((weight, run));
                    } else {
                        for &i in &run.live {
                            report.dropped.push((self.names[i].clone(), "its family's answer was not taken".into()));
                        }
                    }
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        let run = match best {
            Some((_, run)) => run,
            None => {
                // No family answered at all (a text family's server died, say): the
                // cheapest local expert not chosen answers from the start, once.
                let why = errors.join("; ");
                let spare = (0..n).filter(|&i| self.local(i).is_some() && !chosen.contains(&i)).min_by(|&a, &b| {
                    let cost = |i: usize| self.cost(i, &profiles[i], plan.prompt_tokens, max_tokens, 0).latency_s;
                    cost(a).total_cmp(&cost(b))
                });
                let Some(i) = spare else {
                    return Err(Error::model(format!("no expert answered: {why}")));
                };
                let mut run = self
                    .run_family(
                        self.family[i],
                        &[(i, 1.0)],
                        prompt,
                        max_tokens,
                        sampling,
                        &profiles,
                        deadline,
                        Some(&mut on_text),
                    )
                    .map_err(|e| Error::model(format!("no expert answered ({why}), nor {}: {e}", self.names[i])))?;
                for &c in &chosen {
                    if !report.dropped.iter().any(|d| d.0 == self.names[c]) {
                        report.dropped.push((self.names[c].clone(), why.clone()));
                    }
                }
                run.rescue = Some(format!("no chosen expert answered; {} answered from the start", self.names[i]));
                run
            }
        };
        if !run.streamed {
            let _ = on_text(&run.text);
        }
        report.answered = run.live.iter().map(|&i| self.names[i].clone()).collect();
        report.rescue = run.rescue.clone();
        report.new_tokens = run.tokens;
        // Measured: wall time; this device's energy, plus each remote's own counter.
        let j1 = self.energy.lock().unwrap_or_else(|e| e.into_inner()).read_joules()?;
        let mut joules = (j1 - j0).max(0.0);
        let mut estimate = self.energy.lock().unwrap_or_else(|e| e.into_inner()).is_estimate();
        for (k, &i) in chosen.iter().enumerate() {
            if self.local(i).is_some() {
                continue;
            }
            match (remote_j0[k], self.remote_joules(i)) {
                (Some(a), Some(b)) if b >= a => joules += b - a,
                _ => {
                    let c = self.cost(i, &profiles[i], plan.prompt_tokens, run.tokens, 0);
                    joules += c.energy_j;
                    estimate = true;
                }
            }
        }
        report.measured = Cost { latency_s: t0.elapsed().as_secs_f64(), energy_j: joules };
        report.energy_estimate = estimate;
        self.fold(&run, &chosen, plan.prompt_tokens, joules);
        Ok(Answer { text: run.text, report })
    }

    /// Family `f`'s piece map (empty for a family without a local tokenizer).
    #[cfg(feature = "cli")]
    fn pieces_of(&self, f: usize) -> Arc<HashMap<String, u32>> {
        self.pieces[f]
            .get_or_init(|| {
                let Some(e) = self.rep[f].and_then(|r| self.local(r)) else { return Arc::default() };
                let t = &e.tokenizer;
                let all = (0..t.vocab_size() as u32).map(|id| (id, t.token_to_piece(id).unwrap_or(&[]).to_vec()));
                Arc::new(super::remote::piece_map(all))
            })
            .clone()
    }

    #[cfg(feature = "cli")]
    fn remote_joules(&self, i: usize) -> Option<f64> {
        match &self.members[i] {
            Member::Remote(r) => r.joules().map(|j| j.0),
            Member::Local(_) => None,
        }
    }

    #[cfg(not(feature = "cli"))]
    fn remote_joules(&self, _i: usize) -> Option<f64> {
        None
    }

    /// Refresh the profiles of the experts that ran with what this request measured
    /// (energy split by busy time).
    fn fold(&self, run: &FamilyRun, chosen: &[usize], prompt: usize, joules: f64) {
        let busy: f64 = run.timing.values().map(|t| t.0 + t.1).sum();
        let mut profiles = self.profiles.lock().unwrap_or_else(|e| e.into_inner());
        for &i in chosen {
            let Some(&(prefill_s, decode_s, steps)) = run.timing.get(&i) else { continue };
            let share = if busy > 0.0 { (prefill_s + decode_s) / busy } else { 0.0 };
            let j = joules * share;
            let pj = if prefill_s + decode_s > 0.0 { j * prefill_s / (prefill_s + decode_s) } else { 0.0 };
            profiles[i].observe(&Observation {
                prompt_tokens: prompt,
                new_tokens: steps,
                prefill_s,
                decode_s,
                prefill_j: pj,
                decode_j: j - pj,
            });
        }
    }

    /// Generate family `f`'s answer with `members` (expert, weight) mixed token by
    /// token; a text family (a remote expert without a shared tokenizer) answers whole.
    #[allow(clippy::too_many_arguments)]
    fn run_family(
        &self,
        f: usize,
        members: &[(usize, f64)],
        prompt: Prompt,
        max_tokens: usize,
        sampling: &SamplerConfig,
        profiles: &[Profile],
        deadline: Instant,
        mut on_text: Option<&mut dyn FnMut(&str) -> bool>,
    ) -> Result<FamilyRun> {
        let Some(ids) = self.ids(f, prompt)? else {
            return self.run_text(members, prompt, max_tokens, sampling, deadline);
        };
        let rep = self.rep[f].and_then(|r| self.local(r)).ok_or_else(|| Error::model("no local tokenizer"))?;
        let tok = &rep.tokenizer;
        let vocab = rep.vocab();
        let context = ids.len() + max_tokens + 1;
        // One worker per expert, fed token ids, answering with next-token distributions.
        let mut workers: Vec<Worker> =
            members.iter().map(|&(i, w)| self.spawn_worker(i, w, ids.len(), context, profiles, deadline)).collect();
        let mut dropped = Vec::new();
        let mut rescue = None;
        let mut stopped = false;
        let mut sampler = Sampler::new(sampling.clone());
        let mut history = ids.clone();
        let mut feed = ids;
        let mut decoder = StreamDecoder::skipping_special();
        let mut text = String::new();
        let mut tokens = 0;
        let mut mix = vec![0f64; vocab];
        let mut logits = vec![0f32; vocab];
        let mut timing = HashMap::new();
        for step in 0..=max_tokens {
            workers.retain(|wk| {
                wk.tx.send(feed.clone()).is_ok() || {
                    dropped.push((self.names[wk.i].clone(), "its worker stopped".into()));
                    false
                }
            });
            let mut dists: Vec<(f64, Dist)> = Vec::new();
            let mut keep = Vec::new();
            for mut wk in workers.drain(..) {
                let allow = if step == 0 { wk.first } else { wk.step };
                match wk.rx.recv_timeout(Duration::from_secs_f64(allow)) {
                    Ok(Ok((d, secs))) => {
                        if step == 0 {
                            wk.timing.0 += secs;
                        } else {
                            wk.timing.1 += secs;
                            wk.timing.2 += 1;
                        }
                        dists.push((wk.w, d));
                        keep.push(wk);
                    }
                    Ok(Err(e)) => dropped.push((self.names[wk.i].clone(), e.to_string())),
                    Err(RecvTimeoutError::Timeout) => {
                        dropped.push((self.names[wk.i].clone(), format!("missed its step deadline ({allow:.2} s)")))
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        dropped.push((self.names[wk.i].clone(), "its worker stopped".into()))
                    }
                }
            }
            workers = keep;
            for wk in &workers {
                timing.insert(wk.i, wk.timing);
            }
            if dists.is_empty() {
                // Every expert of the answer is gone (a server died, a link broke): the
                // family's cheapest local expert not yet tried goes on from the tokens so
                // far, once.
                let why = dropped.iter().map(|(n, e)| format!("{n}: {e}")).collect::<Vec<_>>().join("; ");
                let tried: Vec<usize> = members.iter().map(|m| m.0).collect();
                let spare = (0..self.names.len())
                    .filter(|&i| self.family[i] == f && self.local(i).is_some() && !tried.contains(&i))
                    .min_by(|&a, &b| {
                        let cost = |i: usize| self.cost(i, &profiles[i], history.len(), max_tokens - step, 0).latency_s;
                        cost(a).total_cmp(&cost(b))
                    });
                let (Some(i), None) = (spare, &rescue) else {
                    return Err(Error::model(format!("every expert of the answer was dropped ({why})")));
                };
                let wk =
                    self.spawn_worker(i, 1.0, history.len(), history.len() + max_tokens - step + 1, profiles, deadline);
                let t = Instant::now();
                let ok = wk.tx.send(history.clone()).is_ok();
                match wk.rx.recv_timeout(Duration::from_secs_f64(wk.first)) {
                    Ok(Ok((d, secs))) if ok => {
                        let mut wk = wk;
                        wk.timing.0 += secs;
                        timing.insert(i, wk.timing);
                        dists.push((1.0, d));
                        workers.push(wk);
                    }
                    other => {
                        let e = match other {
                            Ok(Err(e)) => e.to_string(),
                            _ => format!("it did not answer in {:.2} s", t.elapsed().as_secs_f64()),
                        };
                        return Err(Error::model(format!(
                            "every expert of the answer was dropped ({why}), and {} could not go on: {e}",
                            self.names[i]
                        )));
                    }
                }
                rescue = Some(format!(
                    "every chosen expert was dropped after {tokens} tokens; {} went on from there",
                    self.names[i]
                ));
            }
            if step == max_tokens {
                break;
            }
            let total: f64 = dists.iter().map(|d| d.0).sum();
            mix.iter_mut().for_each(|m| *m = 0.0);
            for (w, d) in &dists {
                d.add_to(&mut mix, w / total.max(1e-300));
            }
            for (l, &p) in logits.iter_mut().zip(&mix) {
                *l = if p > 0.0 { p.ln() as f32 } else { -1e30 };
            }
            let id = sampler.sample(&mut logits, &history);
            if tok.is_eog(id) {
                break;
            }
            history.push(id);
            tokens += 1;
            let piece = decoder.push(tok, id)?;
            text.push_str(&piece);
            if let Some(f) = on_text.as_mut() {
                if !f(&piece) {
                    stopped = true;
                    break;
                }
            }
            feed = vec![id];
        }
        if !stopped {
            let rest = decoder.finish();
            if let Some(f) = on_text.as_mut() {
                let _ = f(&rest);
            }
            text.push_str(&rest);
        }
        let live = workers.iter().map(|w| w.i).collect();
        Ok(FamilyRun { text, tokens, live, dropped, timing, streamed: on_text.is_some(), rescue })
    }

    /// A worker thread for expert `i`, with step deadlines from its profile.
    fn spawn_worker(
        &self,
        i: usize,
        w: f64,
        prompt: usize,
        context: usize,
        profiles: &[Profile],
        deadline: Instant,
    ) -> Worker {
        let (tx, rx_cmd) = mpsc::channel::<Vec<u32>>();
        let (tx_dist, rx) = mpsc::channel::<Result<(Dist, f64)>>();
        let lock = self.locks.get(&self.devices[i]).cloned().unwrap_or_default();
        match &self.members[i] {
            Member::Local(e) => {
                let e = Arc::clone(e);
                std::thread::spawn(move || local_worker(&e, context, rx_cmd, tx_dist, &lock));
            }
            #[cfg(feature = "cli")]
            Member::Remote(r) => {
                let r = Arc::clone(r);
                let top = self.top_logprobs;
                let pieces = self.pieces_of(self.family[i]);
                std::thread::spawn(move || remote_worker(&r, top, &pieces, rx_cmd, tx_dist, &lock, deadline));
            }
        }
        let p = &profiles[i];
        let rtt = p.rtt_s.unwrap_or(0.0);
        // Generous step deadlines: a slow step is noise, a dead expert is not.
        let first = 3.0 * (p.start_s + rtt + prompt as f64 / p.prefill_tps) + 0.5;
        let step = 4.0 * (rtt + 1.0 / p.decode_tps) + 0.25;
        let _ = deadline;
        Worker { i, w, tx, rx, first, step, timing: (0.0, 0.0, 0) }
    }

    /// A text family: its one remote expert writes the whole answer.
    fn run_text(
        &self,
        members: &[(usize, f64)],
        prompt: Prompt,
        max_tokens: usize,
        sampling: &SamplerConfig,
        deadline: Instant,
    ) -> Result<FamilyRun> {
        #[cfg(feature = "cli")]
        if let [(i, _)] = members {
            if let Member::Remote(r) = &self.members[*i] {
                let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
                let t = Instant::now();
                let c = match prompt {
                    Prompt::Text(p) => r.complete_text(p, max_tokens, sampling.temperature, left),
                    Prompt::Chat(m) => r.chat(m, max_tokens, sampling.temperature, left),
                };
                return match c {
                    Ok(c) => {
                        let secs = t.elapsed().as_secs_f64();
                        let timing = HashMap::from([(*i, (0.0, secs, c.completion_tokens))]);
                        Ok(FamilyRun {
                            text: c.text,
                            tokens: c.completion_tokens,
                            live: vec![*i],
                            dropped: vec![],
                            timing,
                            streamed: false,
                            rescue: None,
                        })
                    }
                    Err(e) => Err(Error::model(format!("{}: {e}", self.names[*i]))),
                };
            }
        }
        let _ = (prompt, max_tokens, sampling, deadline);
        Err(Error::model(format!("a text family has {} experts (one remote expert expected)", members.len())))
    }
}

/// The search's result for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub mask: u32,
    pub loss: f64,
    pub predicted: Cost,
    /// The gate's weights over every expert.
    pub weights: Vec<f64>,
    pub fallback: Option<String>,
    /// Prompt tokens in the embedder's tokenizer.
    pub prompt_tokens: usize,
}

struct Worker {
    i: usize,
    w: f64,
    tx: Sender<Vec<u32>>,
    rx: Receiver<Result<(Dist, f64)>>,
    /// Seconds allowed for the first step (the prompt) and each later one.
    first: f64,
    step: f64,
    /// (prefill seconds, decode seconds, decode steps).
    timing: (f64, f64, usize),
}

struct FamilyRun {
    text: String,
    tokens: usize,
    live: Vec<usize>,
    dropped: Vec<(String, String)>,
    timing: HashMap<usize, (f64, f64, usize)>,
    streamed: bool,
    /// Set when a spare local expert went on after every chosen one was dropped.
    rescue: Option<String>,
}

/// A next-token distribution.
enum Dist {
    /// Probabilities over the whole vocabulary.
    Dense(Vec<f32>),
    /// The listed alternatives' probabilities; the mass left over is spread evenly
    /// over the rest of the vocabulary.
    Sparse(Vec<(u32, f32)>),
}

impl Dist {
    fn add_to(&self, mix: &mut [f64], w: f64) {
        match self {
            Dist::Dense(p) => mix.iter_mut().zip(p).for_each(|(m, &p)| *m += w * p as f64),
            Dist::Sparse(alts) => {
                let listed: f64 = alts.iter().map(|a| a.1 as f64).sum::<f64>().min(1.0);
                let rest = (1.0 - listed) / (mix.len().saturating_sub(alts.len()).max(1)) as f64;
                if rest > 0.0 {
                    mix.iter_mut().for_each(|m| *m += w * rest);
                }
                for &(id, p) in alts {
                    if let Some(m) = mix.get_mut(id as usize) {
                        *m += w * (p as f64 - rest);
                    }
                }
            }
        }
    }
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let s: f32 = p.iter().sum();
    p.iter_mut().for_each(|v| *v /= s);
    p
}

fn local_worker(e: &Engine, context: usize, rx: Receiver<Vec<u32>>, tx: Sender<Result<(Dist, f64)>>, lock: &Mutex<()>) {
    let mut session = match e.new_session(context) {
        Ok(s) => s,
        Err(err) => {
            let _ = tx.send(Err(err));
            return;
        }
    };
    let mut first = true;
    while let Ok(ids) = rx.recv() {
        let _device = lock.lock().unwrap_or_else(|e| e.into_inner());
        let t = Instant::now();
        let logits = if first {
            first = false;
            session.prefill(&ids)
        } else {
            match ids.as_slice() {
                [id] => session.step(*id),
                _ => Err(Error::model("a decode step takes one token")),
            }
        };
        let secs = t.elapsed().as_secs_f64();
        let out = logits.map(|l| (Dist::Dense(softmax(&l)), secs));
        let failed = out.is_err();
        if tx.send(out).is_err() || failed {
            return;
        }
    }
}

#[cfg(feature = "cli")]
fn remote_worker(
    r: &Remote,
    top: usize,
    pieces: &HashMap<String, u32>,
    rx: Receiver<Vec<u32>>,
    tx: Sender<Result<(Dist, f64)>>,
    lock: &Mutex<()>,
    deadline: Instant,
) {
    let mut ids: Vec<u32> = Vec::new();
    while let Ok(more) = rx.recv() {
        ids.extend(more);
        let _device = lock.lock().unwrap_or_else(|e| e.into_inner());
        // The HTTP call ends by the request's deadline (plus a margin) whatever happens
        // to the server: a dropped expert's thread does not linger.
        let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(2);
        let t = Instant::now();
        let out = r.complete(&ids, 1, 0.0, Some(top), 0, left).and_then(|c| {
            let alts = c.top.into_iter().next().ok_or_else(|| Error::model("the server sent no logprobs"))?;
            let sparse = alts
                .into_iter()
                .filter_map(|(t, lp)| match t {
                    Token::Id(id) => Some((id, lp.exp())),
                    // A server naming alternatives by text (llama-server): the shared
                    // tokenizer's unambiguous pieces give the ids.
                    Token::Text(s) => pieces.get(&s).map(|&id| (id, lp.exp())),
                })
                .collect::<Vec<_>>();
            if sparse.is_empty() {
                return Err(Error::model(
                    "the server's logprobs name no token of the shared tokenizer (neither ids nor known pieces)",
                ));
            }
            Ok((Dist::Sparse(sparse), t.elapsed().as_secs_f64()))
        });
        let failed = out.is_err();
        if tx.send(out).is_err() || failed {
            return;
        }
    }
}

/// A duration in seconds: `2s`, `1.5 s`, `500ms`, or a bare number of seconds.
pub fn parse_seconds(s: &str) -> Result<f64> {
    parse_unit(s, "latency budget", &[("ms", 1e-3), ("s", 1.0), ("", 1.0)], "2s or 500ms")
}

/// Energy in joules: `3J`, `500mJ`, `1.2kJ`, or a bare number of joules.
pub fn parse_joules(s: &str) -> Result<f64> {
    parse_unit(s, "energy budget", &[("mj", 1e-3), ("kj", 1e3), ("j", 1.0), ("", 1.0)], "3J or 500mJ")
}

fn parse_unit(s: &str, what: &str, units: &[(&str, f64)], example: &str) -> Result<f64> {
    let t = s.trim().to_ascii_lowercase();
    for &(u, mult) in units {
        if let Some(num) = t.strip_suffix(u) {
            if let Ok(v) = num.trim().parse::<f64>() {
                if !(v.is_finite() && v > 0.0) {
                    return Err(Error::input(format!("the {what} must be more than 0, not {s:?}")));
                }
                return Ok(v * mult);
            }
        }
    }
    Err(Error::input(format!("the {what} {s:?} is not a number with a unit (e.g. {example})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_with_units_and_refuse_zero_or_negative() {
        assert_eq!(parse_seconds("2s").unwrap(), 2.0);
        assert_eq!(parse_seconds("500ms").unwrap(), 0.5);
        assert_eq!(parse_seconds(" 1.5 S").unwrap(), 1.5);
        assert_eq!(parse_joules("3J").unwrap(), 3.0);
        assert!((parse_joules("250mJ").unwrap() - 0.25).abs() < 1e-12);
        assert_eq!(parse_joules("1.2kJ").unwrap(), 1200.0);
        for bad in ["0s", "-1s", "0"] {
            let e = parse_seconds(bad).unwrap_err().to_string();
            assert!(e.contains("more than 0"), "{bad}: {e}");
        }
        for bad in ["0J", "-3J", "-0.5mJ"] {
            let e = parse_joules(bad).unwrap_err().to_string();
            assert!(e.contains("more than 0"), "{bad}: {e}");
        }
        for bad in ["fast", "2 hours", "", "NaN"] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
        assert!(Budget { latency_s: 1.0, energy_j: 0.0 }.check().is_err());
    }

    /// A server that names its alternatives by text (llama-server's completions): the
    /// remote worker maps them through the shared tokenizer's pieces; unknown ones drop.
    #[cfg(feature = "cli")]
    #[test]
    fn text_named_alternatives_map_to_ids() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for conn in l.incoming().take(1) {
                let mut c = conn.unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                // Headers, then the JSON body (ends with its closing brace).
                while !req.ends_with(b"}") {
                    let k = c.read(&mut buf).unwrap();
                    if k == 0 {
                        break;
                    }
                    req.extend_from_slice(&buf[..k]);
                }
                let body = r#"{"choices":[{"text":" Paris","logprobs":{"tokens":[" Paris"],"token_logprobs":[-0.1],"top_logprobs":[{" Paris":-0.1," London":-2.5,"zzqx":-4.0}]}}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#;
                let head = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                c.write_all(head.as_bytes()).unwrap();
                c.write_all(body.as_bytes()).unwrap();
            }
        });
        let r = Remote::new(&url, None, None);
        let pieces = super::super::remote::piece_map(
            [(7u32, b" Paris".to_vec()), (9, b" London".to_vec()), (11, b" Rome".to_vec())].into_iter(),
        );
        let (tx, rx_cmd) = mpsc::channel();
        let (tx_dist, rx) = mpsc::channel();
        let lock = Mutex::new(());
        let deadline = Instant::now() + Duration::from_secs(20);
        tx.send(vec![1, 2, 3]).unwrap();
        drop(tx);
        remote_worker(&r, 5, &pieces, rx_cmd, tx_dist, &lock, deadline);
        let (d, _) = rx.recv().unwrap().unwrap();
        let Dist::Sparse(alts) = d else { panic!("a remote answers sparse") };
        assert_eq!(alts.len(), 2, "{alts:?}");
        assert!(alts[0].0 == 7 && (alts[0].1 - (-0.1f32).exp()).abs() < 1e-6, "{alts:?}");
        assert!(alts[1].0 == 9 && (alts[1].1 - (-2.5f32).exp()).abs() < 1e-6, "{alts:?}");
    }

    #[test]
    fn sparse_distributions_keep_their_mass() {
        let mut mix = vec![0f64; 10];
        Dist::Sparse(vec![(3, 0.5), (7, 0.25)]).add_to(&mut mix, 1.0);
        assert!((mix.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((mix[3] - 0.5).abs() < 1e-12 && (mix[7] - 0.25).abs() < 1e-12);
        assert!((mix[0] - 0.25 / 8.0).abs() < 1e-12);
        let mut mix = vec![0f64; 4];
        Dist::Dense(vec![0.1, 0.2, 0.3, 0.4]).add_to(&mut mix, 0.5);
        Dist::Sparse(vec![(0, 1.0)]).add_to(&mut mix, 0.5);
        assert!((mix[0] - 0.55).abs() < 1e-7 && (mix.iter().sum::<f64>() - 1.0).abs() < 1e-7);
    }
}
