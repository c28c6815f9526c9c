//! Exact subset search (DESIGN §5, MoE² step 3): which experts may run so that a
//! request's expected loss is least while its latency and energy fit the budgets.
//!
//! Costs: experts on one device run one after another, devices in parallel, so
//! latency(S) = max over devices of Σ l_i on that device; energy(S) = Σ e_i. Both only
//! grow when an expert is added, so every subset of a feasible set is feasible.
//!
//! The loss table itself need not be monotone (a weak expert can pull a gate-weighted
//! mix down). The search runs on its monotone envelope L̂(S) = min over non-empty
//! T ⊆ S of L(T) and returns the T that attains it; see [`Envelope`] for why that is
//! exact.

/// The largest expert count a loss table may have (2^20 values, 8 MiB of f64).
pub const MAX_EXPERTS: usize = 20;

/// Costs and budgets of one request; `device[i]` is expert i's device, `0..devices`.
#[derive(Debug, Clone)]
pub struct Problem {
    pub device: Vec<usize>,
    pub latency_s: Vec<f64>,
    pub energy_j: Vec<f64>,
    pub latency_budget_s: f64,
    pub energy_budget_j: f64,
}

/// The monotone envelope of a loss table over bitmasks (bit i: expert i).
///
/// Why searching the envelope is exact: let S* minimise L̂ over the feasible sets and
/// T* ⊆ S* be the non-empty subset with L(T*) = L̂(S*). T* is feasible, because costs
/// never decrease when experts are added, so removing experts from the feasible S*
/// keeps it feasible. For any feasible S, L(S) ≥ L̂(S) ≥ L̂(S*) = L(T*): T* is an
/// optimal feasible set of L itself, with the same loss. And since L̂ never increases
/// as a set grows, the search may look at maximal feasible sets only, and L̂ of the
/// largest set still reachable is a lower bound for a whole branch.
#[derive(Debug, Clone)]
pub struct Envelope {
    n: usize,
    /// L̂ per mask; +∞ for the empty set (S must be non-empty).
    value: Vec<f64>,
    /// A subset of the mask attaining L̂ (on ties, the subset with experts dropped).
    arg: Vec<u32>,
}

impl Envelope {
    /// The standard subset-min DP, O(N·2^N): after pass i, `value[S]` is the least L
    /// over subsets of S that differ from it only in bits < i+1.
    ///
    /// `loss.len()` must be 2^N with N ≤ [`MAX_EXPERTS`] and the values not NaN
    /// (checked by [`crate::route::Instance`]; here it panics).
    pub fn new(loss: &[f64]) -> Envelope {
        let n = loss.len().trailing_zeros() as usize;
        assert!(loss.len() == 1 << n && n <= MAX_EXPERTS, "loss table of {} values is not 2^N, N <= 20", loss.len());
        let mut value = loss.to_vec();
        value[0] = f64::INFINITY;
        let mut arg: Vec<u32> = (0..loss.len() as u32).collect();
        for i in 0..n {
            let bit = 1usize << i;
            // Each block of 2·bit masks: the upper half has bit i, the lower half is the
            // same masks without it. Branch-free selects (random tables would
            // mispredict every other comparison).
            for (v, a) in value.chunks_exact_mut(2 * bit).zip(arg.chunks_exact_mut(2 * bit)) {
                let (v_lo, v_hi) = v.split_at_mut(bit);
                let (a_lo, a_hi) = a.split_at_mut(bit);
                for k in 0..bit {
                    // `<=`: on a tie prefer the smaller set (it costs no more).
                    let take = ((v_lo[k] <= v_hi[k]) as u32).wrapping_neg();
                    v_hi[k] = v_lo[k].min(v_hi[k]);
                    a_hi[k] = (a_lo[k] & take) | (a_hi[k] & !take);
                }
            }
        }
        Envelope { n, value, arg }
    }

    pub fn experts(&self) -> usize {
        self.n
    }

    /// L̂(mask).
    pub fn value(&self, mask: u32) -> f64 {
        self.value[mask as usize]
    }

    /// The subset of `mask` whose loss is L̂(mask).
    pub fn argmin(&self, mask: u32) -> u32 {
        self.arg[mask as usize]
    }
}

/// The experts chosen for a request, or why none could be.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    Feasible {
        mask: u32,
        loss: f64,
        latency_s: f64,
        energy_j: f64,
    },
    /// No non-empty set fits the budgets; `cheapest` is the expert that overruns them
    /// least (smallest max(latency/latency budget, energy/energy budget); the lower index
    /// on a tie), which answers alone if the caller allows it (MoE² step 4).
    Infeasible {
        cheapest: usize,
    },
}

impl Problem {
    pub fn experts(&self) -> usize {
        self.device.len()
    }

    fn devices(&self) -> usize {
        self.device.iter().map(|&d| d + 1).max().unwrap_or(0)
    }

    /// (latency, energy) of `mask`, summed in expert order (the search adds experts in
    /// the same order, so both compute the same floats).
    pub fn costs(&self, mask: u32) -> (f64, f64) {
        let mut load = vec![0.0f64; self.devices()];
        let mut energy = 0.0;
        for i in 0..self.experts() {
            if mask >> i & 1 == 1 {
                load[self.device[i]] += self.latency_s[i];
                energy += self.energy_j[i];
            }
        }
        (load.iter().copied().fold(0.0, f64::max), energy)
    }

    pub fn feasible(&self, mask: u32) -> bool {
        let (l, e) = self.costs(mask);
        l <= self.latency_budget_s && e <= self.energy_budget_j
    }

    /// The expert that overruns the budgets least (see [`Choice::Infeasible`]).
    pub fn cheapest(&self) -> usize {
        let over = |i: usize| (self.latency_s[i] / self.latency_budget_s).max(self.energy_j[i] / self.energy_budget_j);
        (0..self.experts()).fold(0, |best, i| if over(i) < over(best) { i } else { best })
    }
}

/// The feasible set of least loss, by branch and bound over the experts in index order
/// (include before exclude). A node is pruned when L̂ of the largest set it can still
/// reach (its experts plus every later one that fits beside them on its own) is no
/// better than the best found; a node whose largest reachable set is itself feasible
/// is settled by that set, without branching.
pub fn solve(p: &Problem, env: &Envelope) -> Choice {
    let n = p.experts();
    assert!(n <= MAX_EXPERTS && p.device.iter().all(|&d| d < n), "devices are numbered below the expert count");
    assert_eq!(n, env.experts(), "the loss table is for {} experts, the problem has {n}", env.experts());
    let mut s = Search { p, env, load: [0.0; MAX_EXPERTS], best: f64::INFINITY, best_mask: 0 };
    s.node(0, 0, 0.0);
    if s.best_mask == 0 {
        return Choice::Infeasible { cheapest: p.cheapest() };
    }
    let mask = env.argmin(s.best_mask);
    let (latency_s, energy_j) = p.costs(mask);
    Choice::Feasible { mask, loss: env.value(s.best_mask), latency_s, energy_j }
}

struct Search<'a> {
    p: &'a Problem,
    env: &'a Envelope,
    /// Latency per device of the experts included so far (devices < experts ≤ 20).
    load: [f64; MAX_EXPERTS],
    best: f64,
    /// The feasible set with L̂ = best (0: none yet).
    best_mask: u32,
}

impl Search<'_> {
    /// Experts `0..i` are decided: `inc` is included (feasible, with energy `energy`,
    /// and `self.load` its latency per device).
    fn node(&mut self, i: usize, inc: u32, energy: f64) {
        let p = self.p;
        let n = p.experts();
        if inc != 0 && self.env.value(inc) < self.best {
            self.best = self.env.value(inc);
            self.best_mask = inc;
        }
        // Later experts that fit beside `inc` on their own; and whether all of them
        // together fit (summed in index order, as `Problem::costs` does).
        let mut reach = 0u32;
        let mut load = self.load;
        let mut e_all = energy;
        for j in i..n {
            let d = p.device[j];
            if self.load[d] + p.latency_s[j] <= p.latency_budget_s && energy + p.energy_j[j] <= p.energy_budget_j {
                reach |= 1 << j;
                load[d] += p.latency_s[j];
                e_all += p.energy_j[j];
            }
        }
        if reach == 0 {
            return;
        }
        let top = inc | reach;
        if self.env.value(top) >= self.best {
            return;
        }
        if e_all <= p.energy_budget_j && load.iter().all(|&l| l <= p.latency_budget_s) {
            // Nothing below this node beats its largest reachable set.
            self.best = self.env.value(top);
            self.best_mask = top;
            return;
        }
        // Branch on the first reachable expert: with it, then without it.
        let j = reach.trailing_zeros() as usize;
        let d = p.device[j];
        let saved = self.load[d];
        self.load[d] += p.latency_s[j];
        self.node(j + 1, inc | 1 << j, energy + p.energy_j[j]);
        self.load[d] = saved;
        self.node(j + 1, inc, energy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64: a seeded stream, so that a failure names its instance.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// A random instance: float or small-integer costs (integers make sums land exactly
    /// on a budget), loss tables random, integer-valued (many ties), monotone, or a
    /// gate's mix; budgets from generous to below every single expert.
    fn instance(r: &mut Rng, n: usize) -> (Problem, Vec<f64>) {
        let devices = 1 + r.below(n as u64) as usize;
        let ints = r.below(2) == 0;
        let cost = |r: &mut Rng| if ints { r.below(5) as f64 } else { r.unit() };
        let device: Vec<usize> = (0..n).map(|_| r.below(devices as u64) as usize).collect();
        let latency_s: Vec<f64> = (0..n).map(|_| cost(r)).collect();
        let energy_j: Vec<f64> = (0..n).map(|_| cost(r)).collect();
        let loss: Vec<f64> = match r.below(4) {
            0 => (0..1 << n).map(|_| r.unit()).collect(),
            1 => (0..1 << n).map(|_| r.below(4) as f64).collect(),
            2 => {
                // Monotone: each expert subtracts its own amount.
                let gain: Vec<f64> = (0..n).map(|_| r.unit()).collect();
                (0..1u32 << n)
                    .map(|s| 10.0 - (0..n).filter(|i| s >> i & 1 == 1).map(|i| gain[i]).sum::<f64>())
                    .collect()
            }
            _ => {
                let w: Vec<f64> = (0..n).map(|_| r.unit() + 0.01).collect();
                let l: Vec<f64> = (0..n).map(|_| r.unit()).collect();
                crate::route::gate_loss_table(&w, &l).unwrap()
            }
        };
        let total_l: f64 = latency_s.iter().sum();
        let total_e: f64 = energy_j.iter().sum();
        let frac = |r: &mut Rng| match r.below(5) {
            0 => 1e-9,
            1 => 2.0,
            _ => r.unit(),
        };
        let (fl, fe) = (frac(r), frac(r));
        let mut lb = (total_l * fl).max(1e-9);
        let mut eb = (total_e * fe).max(1e-9);
        if ints && r.below(2) == 0 {
            lb = lb.round().max(1.0);
            eb = eb.round().max(1.0);
        }
        (Problem { device, latency_s, energy_j, latency_budget_s: lb, energy_budget_j: eb }, loss)
    }

    /// Every non-empty mask: the least loss over the feasible ones.
    fn brute(p: &Problem, loss: &[f64]) -> Option<f64> {
        (1..loss.len() as u32).filter(|&m| p.feasible(m)).map(|m| loss[m as usize]).reduce(f64::min)
    }

    fn brute_cheapest(p: &Problem) -> usize {
        let over: Vec<f64> = (0..p.experts())
            .map(|i| (p.latency_s[i] / p.latency_budget_s).max(p.energy_j[i] / p.energy_budget_j))
            .collect();
        let min = over.iter().copied().fold(f64::INFINITY, f64::min);
        over.iter().position(|&o| o == min).unwrap()
    }

    #[test]
    fn matches_brute_force() {
        let mut r = Rng(16);
        let (mut feasible, mut infeasible) = (0, 0);
        for case in 0..6000 {
            let n = 1 + case % 14;
            let (p, loss) = instance(&mut r, n);
            let env = Envelope::new(&loss);
            let got = solve(&p, &env);
            match (brute(&p, &loss), got) {
                (Some(best), Choice::Feasible { mask, loss: l, latency_s, energy_j }) => {
                    feasible += 1;
                    assert_eq!(l, best, "case {case} (n={n}): loss {l}, brute force {best}: {p:?}");
                    assert!(mask != 0 && p.feasible(mask), "case {case}: mask {mask:#b} is not feasible");
                    assert_eq!(loss[mask as usize], best, "case {case}: the mask's own loss differs");
                    assert_eq!((latency_s, energy_j), p.costs(mask), "case {case}");
                }
                (None, Choice::Infeasible { cheapest }) => {
                    infeasible += 1;
                    assert_eq!(cheapest, brute_cheapest(&p), "case {case}: {p:?}");
                    assert!(!p.feasible(1 << cheapest), "case {case}: a feasible single expert");
                }
                (want, got) => panic!("case {case} (n={n}): brute force {want:?}, search {got:?}: {p:?}"),
            }
        }
        println!("6000 instances, N = 1..14: {feasible} feasible, {infeasible} infeasible, all as brute force");
        // Both outcomes are exercised, many times.
        assert!(feasible > 3000 && infeasible > 300, "feasible {feasible}, infeasible {infeasible}");
    }

    #[test]
    fn envelope_is_least_over_subsets() {
        let mut r = Rng(7);
        for n in 1..=8 {
            let loss: Vec<f64> = (0..1 << n).map(|_| r.below(10) as f64).collect();
            let env = Envelope::new(&loss);
            for s in 1u32..1 << n {
                let want = (1..=s).filter(|t| t & s == *t).map(|t| loss[t as usize]).fold(f64::INFINITY, f64::min);
                assert_eq!(env.value(s), want, "n={n} s={s:#b}");
                let a = env.argmin(s);
                assert!(a != 0 && a & s == a && loss[a as usize] == want, "n={n} s={s:#b} argmin {a:#b}");
            }
            assert_eq!(env.value(0), f64::INFINITY);
        }
    }

    /// A hand-made case: the non-monotone table's best is a strict subset of a
    /// feasible set, and devices serialise their experts.
    #[test]
    fn subset_of_a_feasible_set_and_device_serialisation() {
        // Experts 0 and 1 share device 0 (latency adds), expert 2 is alone on device 1.
        let p = Problem {
            device: vec![0, 0, 1],
            latency_s: vec![1.0, 1.0, 1.5],
            energy_j: vec![1.0, 1.0, 1.0],
            latency_budget_s: 1.5,
            energy_budget_j: 10.0,
        };
        // {0,1} would be best but takes 2 s on device 0; {0,2} is feasible with loss
        // 0.5, yet {2} alone (0.3) beats it.
        let mut loss = vec![9.0; 8];
        loss[0b011] = 0.1;
        loss[0b101] = 0.5;
        loss[0b100] = 0.3;
        loss[0b110] = 0.4;
        let got = solve(&p, &Envelope::new(&loss));
        assert_eq!(got, Choice::Feasible { mask: 0b100, loss: 0.3, latency_s: 1.5, energy_j: 1.0 });
        // Budgets under every expert: infeasible; expert 0 (the first of the least overruns) is the fallback.
        let tight = Problem { latency_budget_s: 0.5, energy_budget_j: 0.5, ..p };
        assert_eq!(solve(&tight, &Envelope::new(&loss)), Choice::Infeasible { cheapest: 0 });
    }

    /// N = 16, timed (printed, never asserted): the bench is `cargo bench -p cairn-benches --bench route`.
    #[test]
    fn sixteen_experts_timing() {
        let mut r = Rng(99);
        let mut total = std::time::Duration::ZERO;
        let mut worst = std::time::Duration::ZERO;
        let cases = 300;
        for _ in 0..cases {
            let (p, loss) = instance(&mut r, 16);
            let env = Envelope::new(&loss);
            let t = std::time::Instant::now();
            let got = solve(&p, &env);
            let dt = t.elapsed();
            total += dt;
            worst = worst.max(dt);
            match (brute(&p, &loss), got) {
                (Some(best), Choice::Feasible { loss, .. }) => assert_eq!(loss, best),
                (None, Choice::Infeasible { .. }) => {}
                (want, got) => panic!("brute force {want:?}, search {got:?}"),
            }
        }
        println!("N=16 solve (envelope precomputed): mean {:?}, worst {worst:?} over {cases}", total / cases);
    }
}
