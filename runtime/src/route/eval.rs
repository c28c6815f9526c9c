//! `cairn route eval`: quality against budget on held-out text, for MoE² and three
//! baselines, from the windows `cairn route train` scored (no expert runs again), and
//! the budget violations of a request trace that does run.
//!
//! A held-out window stands for a request whose prompt is its first half and whose
//! answer is its second half: its predicted cost is a prefill of half its tokens and a
//! decode of the other half, on each expert's profile. Its quality is the bits per byte
//! of the whole window under the chosen experts' mixture (the gate's weights masked to
//! the set, mixed as in training).

use serde::Serialize;

use super::gate::{Gate, Sample};
use super::profile::Profile;
use super::router::GateModel;
use super::solve::{self, Choice, Envelope, Problem};

/// The selection methods compared.
pub const METHODS: [&str; 4] = ["moe2", "best_single", "greedy", "random"];

/// Bits per byte of an empty set: a model that knows nothing of bytes (8 bits each),
/// where greedy selection starts from.
const EMPTY_BITS: f64 = 8.0;

/// One budget's results.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub latency_budget_s: f64,
    pub energy_budget_j: f64,
    /// Bits per byte per method (in [`METHODS`] order), over the windows some set of
    /// that method fits; `None` where none fits.
    pub bits_per_byte: Vec<Option<f64>>,
    /// Windows for which no set fits the budget (the same for every method).
    pub infeasible: usize,
    /// Mean predicted latency and energy of MoE²'s sets.
    pub moe2_latency_s: f64,
    pub moe2_energy_j: f64,
}

/// Costs of the experts for one window.
struct Window<'a> {
    sample: &'a Sample,
    latency: Vec<f64>,
    energy: Vec<f64>,
}

/// Predicted (latency, energy) of each expert for a window: half its tokens as the
/// prompt, half as the answer.
fn window_costs(s: &Sample, profiles: &[Profile]) -> (Vec<f64>, Vec<f64>) {
    profiles
        .iter()
        .zip(&s.logprobs)
        .map(|(p, lp)| {
            let t = lp.len() + 1;
            // Every evaluated expert was scored, so a remote one shares a tokenizer and
            // is mixed token by token: its stepped cost.
            let c = p.predict_stepped(t / 2, t - t / 2, s.bytes);
            (c.latency_s, c.energy_j)
        })
        .unzip()
}

/// A small deterministic generator for the random baseline.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The evaluation over budgets: latency budgets with the energy unbounded, then
/// energy budgets with latency unbounded.
pub struct Eval<'a> {
    gate: &'a Gate,
    groups: Vec<usize>,
    devices: Vec<usize>,
    windows: Vec<Window<'a>>,
    /// Per window: the gate's weights over all experts and its loss table.
    weights: Vec<Vec<f64>>,
    tables: Vec<Vec<f64>>,
    /// Experts by their mean held-out bits per byte, best first (the best-single baseline).
    ranked: Vec<usize>,
}

impl<'a> Eval<'a> {
    /// `devices[i]`: expert i's device number; `held_out`: the windows to evaluate.
    /// `tables` gives each window's loss table (the router's own [`GateModel`]).
    pub fn new(
        gate: &'a Gate,
        tables: &dyn GateModel,
        devices: Vec<usize>,
        profiles: &[Profile],
        held_out: &[&'a Sample],
    ) -> crate::error::Result<Eval<'a>> {
        let n = gate.experts().len();
        let groups = gate.groups().to_vec();
        let full = ((1u64 << n) - 1) as u32;
        let mut windows = Vec::new();
        let (mut weights, mut tables_out) = (Vec::new(), Vec::new());
        let mut single = vec![(0.0f64, 0usize); n];
        for &s in held_out {
            let (latency, energy) = window_costs(s, profiles);
            weights.push(gate.weights(&s.embedding, full)?);
            tables_out.push(tables.loss_table(&s.embedding)?);
            for (i, acc) in single.iter_mut().enumerate() {
                let mut w = vec![0.0; n];
                w[i] = 1.0;
                acc.0 += Gate::mixture_bits_per_byte(&w, &s.logprobs, &groups, s.bytes)? * s.bytes as f64;
                acc.1 += s.bytes;
            }
            windows.push(Window { sample: s, latency, energy });
        }
        let mut ranked: Vec<usize> = (0..n).collect();
        ranked.sort_by(|&a, &b| {
            (single[a].0 / single[a].1.max(1) as f64).total_cmp(&(single[b].0 / single[b].1.max(1) as f64))
        });
        Ok(Eval { gate, groups, devices, windows, weights, tables: tables_out, ranked })
    }

    fn problem(&self, w: &Window, latency_budget_s: f64, energy_budget_j: f64) -> Problem {
        Problem {
            device: self.devices.clone(),
            latency_s: w.latency.clone(),
            energy_j: w.energy.clone(),
            latency_budget_s,
            energy_budget_j,
        }
    }

    /// The mask each method picks for window `k`, `None` when nothing fits.
    fn pick(&self, k: usize, p: &Problem, rng: &mut SplitMix) -> [Option<u32>; 4] {
        let n = self.devices.len();
        let table = &self.tables[k];
        let moe2 = match solve::solve(p, &Envelope::new(table)) {
            Choice::Feasible { mask, .. } => Some(mask),
            Choice::Infeasible { .. } => None,
        };
        let best_single = self.ranked.iter().map(|&i| 1u32 << i).find(|&m| p.feasible(m));
        // Greedy: add the expert with the largest predicted loss drop per joule while
        // one still fits and lowers the loss.
        let mut mask = 0u32;
        let mut loss = EMPTY_BITS;
        loop {
            let mut best: Option<(f64, u32, f64)> = None;
            for i in (0..n).filter(|i| mask >> i & 1 == 0) {
                let m = mask | 1 << i;
                if !p.feasible(m) || table[m as usize] >= loss {
                    continue;
                }
                let rate = (loss - table[m as usize]) / p.energy_j[i].max(1e-9);
                if best.is_none_or(|b| rate > b.0) {
                    best = Some((rate, m, table[m as usize]));
                }
            }
            match best {
                Some((_, m, l)) => (mask, loss) = (m, l),
                None => break,
            }
        }
        let greedy = (mask != 0).then_some(mask);
        let feasible: Vec<u32> = (1..1u32 << n).filter(|&m| p.feasible(m)).collect();
        let random = (!feasible.is_empty()).then(|| feasible[(rng.next() % feasible.len() as u64) as usize]);
        [moe2, best_single, greedy, random]
    }

    /// Bits of window `k` under the gate masked to `mask`.
    fn bits(&self, k: usize, mask: u32) -> crate::error::Result<f64> {
        let s = self.windows[k].sample;
        let mut w: Vec<f64> =
            self.weights[k].iter().enumerate().map(|(i, &w)| if mask >> i & 1 == 1 { w } else { 0.0 }).collect();
        if w.iter().sum::<f64>() <= 0.0 {
            w = (0..w.len()).map(|i| f64::from(mask >> i & 1 == 1)).collect();
        }
        Ok(Gate::mixture_bits_per_byte(&w, &s.logprobs, &self.groups, s.bytes)? * s.bytes as f64)
    }

    /// One budget point over every held-out window.
    pub fn point(&self, latency_budget_s: f64, energy_budget_j: f64, seed: u64) -> crate::error::Result<Point> {
        let mut rng = SplitMix(seed);
        let mut bits = [0.0f64; 4];
        let mut bytes = [0usize; 4];
        let (mut infeasible, mut lat, mut en, mut counted) = (0, 0.0, 0.0, 0);
        for (k, w) in self.windows.iter().enumerate() {
            let p = self.problem(w, latency_budget_s, energy_budget_j);
            let picks = self.pick(k, &p, &mut rng);
            if picks[0].is_none() {
                infeasible += 1;
            }
            for (m, pick) in picks.iter().enumerate() {
                if let Some(mask) = *pick {
                    bits[m] += self.bits(k, mask)?;
                    bytes[m] += w.sample.bytes;
                }
            }
            if let Some(mask) = picks[0] {
                let (l, e) = p.costs(mask);
                lat += l;
                en += e;
                counted += 1;
            }
        }
        let c = counted.max(1) as f64;
        Ok(Point {
            latency_budget_s,
            energy_budget_j,
            bits_per_byte: (0..4).map(|m| (bytes[m] > 0).then(|| bits[m] / bytes[m] as f64)).collect(),
            infeasible,
            moe2_latency_s: lat / c,
            moe2_energy_j: en / c,
        })
    }

    /// Budgets from below the cheapest expert alone to above all of them together,
    /// `points` of them, geometric: (latency budgets, energy budgets).
    pub fn budget_grid(&self, points: usize) -> (Vec<f64>, Vec<f64>) {
        let grid = |costs: &dyn Fn(&Window) -> (f64, f64)| {
            let (mut lo, mut hi) = (f64::MAX, 0.0f64);
            for w in &self.windows {
                let (a, b) = costs(w);
                lo = lo.min(a);
                hi = hi.max(b);
            }
            let (lo, hi) = (lo * 0.7, hi * 1.3);
            let k = points.max(2);
            (0..k).map(|j| lo * (hi / lo).powf(j as f64 / (k - 1) as f64)).collect::<Vec<f64>>()
        };
        let all = ((1u64 << self.devices.len()) - 1) as u32;
        let lat = grid(&|w| {
            let p = self.problem(w, f64::MAX, f64::MAX);
            (w.latency.iter().copied().fold(f64::MAX, f64::min), p.costs(all).0)
        });
        let en = grid(&|w| (w.energy.iter().copied().fold(f64::MAX, f64::min), w.energy.iter().sum()));
        (lat, en)
    }

    pub fn windows(&self) -> usize {
        self.windows.len()
    }

    pub fn experts(&self) -> &[String] {
        self.gate.experts()
    }
}
