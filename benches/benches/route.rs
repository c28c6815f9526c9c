//! MoE²'s exact subset search at N = 16 experts: the envelope (once per loss table) and
//! the branch and bound (once per request), on three families of random instances.
//! `cargo bench -p cairn-benches --bench route`.

use cairn::route::{gate_loss_table, solve::solve, Envelope, Problem};
use cairn::synthetic::SplitMix;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

const N: usize = 16;

fn unit(r: &mut SplitMix) -> f64 {
    (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// `family`: "random" (a non-monotone table of uniform values), "gate" (a gate's masked
/// mix), "knapsack" (a loose latency budget, energy at a quarter of the total: the most
/// feasible sets near the boundary). Four devices, uniform costs.
fn instance(r: &mut SplitMix, family: &str) -> (Problem, Vec<f64>) {
    let device: Vec<usize> = (0..N).map(|_| (r.next_u64() % 4) as usize).collect();
    let latency_s: Vec<f64> = (0..N).map(|_| unit(r)).collect();
    let energy_j: Vec<f64> = (0..N).map(|_| unit(r)).collect();
    let loss = match family {
        "gate" => {
            let w: Vec<f64> = (0..N).map(|_| unit(r) + 0.01).collect();
            let l: Vec<f64> = (0..N).map(|_| unit(r)).collect();
            gate_loss_table(&w, &l).expect("gate table")
        }
        _ => (0..1 << N).map(|_| unit(r)).collect(),
    };
    let (lat, en): (f64, f64) = (latency_s.iter().sum(), energy_j.iter().sum());
    let (lb, eb) = if family == "knapsack" { (lat, en * 0.25) } else { (lat * 0.4 / 4.0, en * 0.4) };
    (Problem { device, latency_s, energy_j, latency_budget_s: lb, energy_budget_j: eb }, loss)
}

fn route(c: &mut Criterion) {
    let mut g = c.benchmark_group("route16");
    for family in ["random", "gate", "knapsack"] {
        let mut r = SplitMix(16);
        let cases: Vec<(Problem, Vec<f64>)> = (0..32).map(|_| instance(&mut r, family)).collect();
        let envs: Vec<Envelope> = cases.iter().map(|(_, l)| Envelope::new(l)).collect();
        g.bench_with_input(BenchmarkId::new("envelope", family), &cases, |b, cases| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % cases.len();
                Envelope::new(&cases[i].1)
            })
        });
        g.bench_with_input(BenchmarkId::new("solve", family), &cases, |b, cases| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % cases.len();
                solve(&cases[i].0, &envs[i])
            })
        });
    }
    g.finish();
}

criterion_group!(benches, route);
criterion_main!(benches);
