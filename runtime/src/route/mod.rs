//! MoE² routing (DESIGN §5): which edge experts may answer a request within its
//! latency and energy budgets. [`registry`] names the experts, [`profile`] holds what
//! each costs, [`gate`] weighs them per prompt (trained on the local text of
//! [`corpus`]), [`solve`] is the exact subset search and [`router`] runs the chosen
//! ones. This file is the instance format `cairn route solve` reads, its checks, and
//! the answer it prints.

pub mod corpus;
pub mod eval;
pub mod gate;
pub mod plot;
pub mod profile;
pub mod registry;
#[cfg(feature = "cli")]
pub mod remote;
pub mod router;
pub mod solve;
#[cfg(feature = "cli")]
pub mod train;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use solve::{Choice, Envelope, Problem, MAX_EXPERTS};

/// One expert: a model on a device, with its cost for this request.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Expert {
    pub name: String,
    /// Experts naming the same device run one after another.
    pub device: String,
    pub latency_s: f64,
    pub energy_j: f64,
}

/// A routing request in table form: the loss of every subset of the experts, indexed
/// by bitmask (bit i set: expert i in the set; entry 0, the empty set, is never chosen).
/// A gate's expected loss becomes such a table through [`gate_loss_table`].
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    pub experts: Vec<Expert>,
    pub loss: Vec<f64>,
    pub latency_budget_s: f64,
    pub energy_budget_j: f64,
}

/// What `cairn route solve` prints.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Answer {
    pub feasible: bool,
    /// The chosen experts; when infeasible, the cheapest one alone (the fallback).
    pub chosen: Vec<String>,
    pub mask: u32,
    /// L(mask) from the table (also for the fallback).
    pub loss: f64,
    pub latency_s: f64,
    pub energy_j: f64,
}

impl Instance {
    /// Parse and check JSON text: every shape error is one message naming the field.
    pub fn from_json(text: &str) -> Result<Instance> {
        let inst: Instance =
            serde_json::from_str(text).map_err(|e| Error::input(format!("not a routing instance: {e}")))?;
        inst.check()?;
        Ok(inst)
    }

    pub fn check(&self) -> Result<()> {
        let n = self.experts.len();
        if n == 0 {
            return Err(Error::input("a routing instance needs at least one expert"));
        }
        if n > MAX_EXPERTS {
            return Err(Error::input(format!("{n} experts: at most {MAX_EXPERTS} (the loss table has 2^N entries)")));
        }
        if self.loss.len() != 1 << n {
            return Err(Error::input(format!(
                "loss has {} values; {n} experts need 2^{n} = {} (one per bitmask)",
                self.loss.len(),
                1usize << n
            )));
        }
        for (what, b) in [("latency_budget_s", self.latency_budget_s), ("energy_budget_j", self.energy_budget_j)] {
            if !(b.is_finite() && b > 0.0) {
                return Err(Error::input(format!("{what} must be a positive number, not {b}")));
            }
        }
        for (i, e) in self.experts.iter().enumerate() {
            for (what, v) in [("latency_s", e.latency_s), ("energy_j", e.energy_j)] {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(Error::input(format!("experts[{i}] ({}): {what} must be ≥ 0, not {v}", e.name)));
                }
            }
        }
        // +∞ is a set that gives nothing to go on (the empty set's entry, say); NaN or −∞
        // is a broken table.
        if let Some(i) = self.loss.iter().position(|l| l.is_nan() || *l == f64::NEG_INFINITY) {
            return Err(Error::input(format!("loss[{i}] is not a number or +∞")));
        }
        Ok(())
    }

    /// The costs and budgets, devices numbered in order of first appearance.
    pub fn problem(&self) -> Problem {
        let mut names: Vec<&str> = Vec::new();
        let device = self
            .experts
            .iter()
            .map(|e| match names.iter().position(|&d| d == e.device) {
                Some(d) => d,
                None => {
                    names.push(&e.device);
                    names.len() - 1
                }
            })
            .collect();
        Problem {
            device,
            latency_s: self.experts.iter().map(|e| e.latency_s).collect(),
            energy_j: self.experts.iter().map(|e| e.energy_j).collect(),
            latency_budget_s: self.latency_budget_s,
            energy_budget_j: self.energy_budget_j,
        }
    }

    /// Check, build the envelope, search, and say what was chosen.
    pub fn solve(&self) -> Result<Answer> {
        self.check()?;
        let p = self.problem();
        let env = Envelope::new(&self.loss);
        let (feasible, mask) = match solve::solve(&p, &env) {
            Choice::Feasible { mask, .. } => (true, mask),
            Choice::Infeasible { cheapest } => (false, 1u32 << cheapest),
        };
        let (latency_s, energy_j) = p.costs(mask);
        let chosen = (0..self.experts.len()).filter(|i| mask >> i & 1 == 1).map(|i| self.experts[i].name.clone());
        Ok(Answer { feasible, chosen: chosen.collect(), mask, loss: self.loss[mask as usize], latency_s, energy_j })
    }
}

/// The table of a gate's expected loss: for each subset S, the gate's weights masked to
/// S and renormalised (DESIGN §5 step 2) times each expert's loss,
/// L(S) = Σ_{i∈S} w_i ℓ_i / Σ_{i∈S} w_i. A subset whose weights sum to 0 gets +∞ (the
/// gate gives it nothing to go on). Such a table is not monotone in general: adding a
/// weak expert raises the mix's loss, which is why the search uses the envelope.
pub fn gate_loss_table(weights: &[f64], losses: &[f64]) -> Result<Vec<f64>> {
    let n = weights.len();
    if n != losses.len() || n == 0 || n > MAX_EXPERTS {
        return Err(Error::input(format!(
            "gate: {n} weights and {} losses (need the same count, 1..={MAX_EXPERTS})",
            losses.len()
        )));
    }
    if weights.iter().chain(losses).any(|v| !v.is_finite()) || weights.iter().any(|&w| w < 0.0) {
        return Err(Error::input("gate: weights must be finite and ≥ 0, losses finite"));
    }
    // Sums per mask from the mask without its lowest bit: O(2^N).
    let mut w = vec![0.0f64; 1 << n];
    let mut wl = vec![0.0f64; 1 << n];
    for s in 1..1usize << n {
        let i = s.trailing_zeros() as usize;
        let rest = s & (s - 1);
        w[s] = w[rest] + weights[i];
        wl[s] = wl[rest] + weights[i] * losses[i];
    }
    Ok((0..1usize << n).map(|s| if w[s] > 0.0 { wl[s] / w[s] } else { f64::INFINITY }).collect())
}

/// Build a router over `reg`'s experts: local models loaded (fetched by name if need
/// be), remote ones connected, with `gate` and the profiles beside the registry.
#[cfg(feature = "cli")]
pub fn open(reg: &registry::Registry, gate: Box<dyn router::GateModel>) -> Result<router::Router> {
    let profiles = profile::Profiles::load(&reg.side_file("profile"))
        .map_err(|e| Error::input(format!("{e} (run `cairn route profile {}` first)", reg.path.display())))?;
    let built = reg
        .experts
        .iter()
        .map(|e| build(reg, e).map_err(|err| Error::input(format!("expert {}: {err}", e.name))))
        .collect::<Result<Vec<_>>>()?;
    let energy = crate::energy::detect_here();
    log::info!("{}", energy.note);
    let devices = reg.experts.iter().map(|e| e.device.clone()).collect();
    router::Router::new(reg.names(), devices, built, reg.embedder, gate, &profiles, energy.reader)
}

/// Save the profiles `router`'s requests refined (moving averages) into the profile
/// file at `path`; a failure is a note, not an error (the answer is already out).
#[cfg(feature = "cli")]
pub fn save_profiles(path: &std::path::Path, router: &router::Router) {
    let mut ps = match profile::Profiles::load(path) {
        Ok(p) => p,
        Err(_) => return,
    };
    for (name, p) in router.names().iter().zip(router.profiles()) {
        ps.experts.insert(name.clone(), p);
    }
    if let Err(e) = ps.save(path) {
        eprintln!("note: the refined profiles were not saved: {e}");
    }
}

/// One registry entry as a router member.
#[cfg(feature = "cli")]
pub fn build(reg: &registry::Registry, e: &registry::ExpertSpec) -> Result<router::Built> {
    use registry::Place;
    Ok(match &e.place {
        Place::Local { .. } => router::Built::Local(Box::new(load_local(e)?)),
        Place::Remote { url, model, api_key, tokenizer } => router::Built::Remote {
            remote: remote::Remote::new(url, model.as_deref(), api_key.as_deref()),
            tokenizer: tokenizer.as_deref().and_then(|t| reg.find(t)),
        },
    })
}

/// Load a local expert's model with its threads, backend and memory budget.
#[cfg(feature = "cli")]
pub fn load_local(e: &registry::ExpertSpec) -> Result<crate::engine::Engine> {
    load_local_threads(e, None)
}

/// [`load_local`] with the registry's thread count replaced (0: all cores).
#[cfg(feature = "cli")]
pub fn load_local_threads(e: &registry::ExpertSpec, threads: Option<usize>) -> Result<crate::engine::Engine> {
    let registry::Place::Local { model, backend, threads: own, memory, context } = &e.place else {
        return Err(Error::input(format!("{} is not a local expert", e.name)));
    };
    let path = crate::pull::resolve_model(Some(model)).map_err(|err| Error::Fetch(err.to_string()))?;
    let opts = crate::engine::EngineOptions {
        threads: threads.unwrap_or(*own),
        backend: *backend,
        memory: *memory,
        context: *context,
        ..Default::default()
    };
    crate::engine::Engine::load(&path, &opts)
}

/// The registry's trained gate (`REGISTRY.gate.json`), for its experts.
pub fn load_gate(reg: &registry::Registry) -> Result<Box<dyn router::GateModel>> {
    let names = reg.names();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let path = reg.side_file("gate");
    if !path.exists() {
        return Err(Error::input(format!(
            "{} has no gate: run `cairn route train {}` first",
            reg.path.display(),
            reg.path.display()
        )));
    }
    let g = gate::Gate::load(&path, &names)?;
    // The scored training windows give measured mixture losses (route train keeps them);
    // without them the loss head's approximation answers.
    #[cfg(feature = "cli")]
    if let Ok(f) = train::SampleFile::load(&reg.side_file("samples"), &reg.names()) {
        return Ok(Box::new(gate::Neighbours::new(g, f.samples()?, NEIGHBOURS)?));
    }
    Ok(Box::new(g))
}

/// Training windows behind each per-request loss table.
pub const NEIGHBOURS: usize = 8;

impl router::GateModel for gate::Neighbours {
    fn weights(&self, embedding: &[f32]) -> Result<Vec<f64>> {
        router::GateModel::weights(&self.gate, embedding)
    }

    fn loss_table(&self, embedding: &[f32]) -> Result<Vec<f64>> {
        gate::Neighbours::loss_table(self, embedding)
    }
}

impl router::GateModel for gate::Gate {
    fn weights(&self, embedding: &[f32]) -> Result<Vec<f64>> {
        let all = ((1u64 << self.experts().len()) - 1) as u32;
        gate::Gate::weights(self, embedding, all)
    }

    fn loss_table(&self, embedding: &[f32]) -> Result<Vec<f64>> {
        let predicted = self.predict_loss(embedding)?;
        self.expected_loss_table(embedding, &predicted)
    }
}
