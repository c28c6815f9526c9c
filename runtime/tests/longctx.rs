//! Long prompts on a budget: GemFilter's selection against a brute-force f64 reference
//! on a synthetic model, k ≥ n giving exactly the full result, positions renumbered,
//! the SnapKV/H2O cache hooks, and bad input refused.

mod common;

use std::ops::ControlFlow;

use common::f32ref::{attend, matvec, rms_norm};

use cairn::backend::cpu::CpuBackend;
use cairn::engine::{Engine, EngineOptions};
use cairn::longctx::{self, FilterLayer, Method};
use cairn::model::{self, Logits, Probe};
use cairn::sampling::{Sampler, SamplerConfig};
use cairn::synthetic::{llama_gguf, SplitMix, SyntheticConfig};
use cairn::weights::ModelFile;
use cairn_formats::quant;

fn deq(file: &ModelFile, name: &str) -> Vec<f32> {
    let t = file.tensor_info(name).unwrap();
    let mut out = vec![0f32; t.n_elements() as usize];
    quant::dequantize(t.ty, file.tensor_bytes(t), &mut out).unwrap();
    out
}

fn rope(x: &mut [f32], hd: usize, pos: usize, base: f32) {
    for head in x.chunks_mut(hd) {
        for i in 0..hd / 2 {
            let theta = pos as f64 / (base as f64).powf(2.0 * i as f64 / hd as f64);
            let (a, b) = (head[2 * i] as f64, head[2 * i + 1] as f64);
            head[2 * i] = (a * theta.cos() - b * theta.sin()) as f32;
            head[2 * i + 1] = (a * theta.sin() + b * theta.cos()) as f32;
        }
    }
}

/// Plain loops: layer `r`'s post-RoPE queries and keys at every position.
fn reference_qk(file: &ModelFile, ids: &[u32], r: usize) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let c = model::ModelConfig::from_file(file).unwrap();
    let (d, hd) = (c.dim, c.head_dim);
    let embed = deq(file, "token_embd.weight");
    let mut xs: Vec<Vec<f32>> = ids.iter().map(|&t| embed[t as usize * d..(t as usize + 1) * d].to_vec()).collect();
    for i in 0..=r {
        let names =
            ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"];
        let ws: Vec<Vec<f32>> = names.iter().map(|n| deq(file, &format!("blk.{i}.{n}.weight"))).collect();
        let w = |n: &str| &ws[names.iter().position(|m| *m == n).unwrap()];
        let (qs, ks, vs): (Vec<_>, Vec<_>, Vec<_>) = xs
            .iter()
            .enumerate()
            .map(|(pos, x)| {
                let h = rms_norm(x, w("attn_norm"), c.norm_eps);
                let (mut q, mut k) = (matvec(w("attn_q"), &h), matvec(w("attn_k"), &h));
                rope(&mut q, hd, pos, c.rope_base);
                rope(&mut k, hd, pos, c.rope_base);
                (q, k, matvec(w("attn_v"), &h))
            })
            .fold((vec![], vec![], vec![]), |(mut a, mut b, mut c), (q, k, v)| {
                a.push(q);
                b.push(k);
                c.push(v);
                (a, b, c)
            });
        if i == r {
            return (qs, ks);
        }
        for (pos, x) in xs.iter_mut().enumerate() {
            let att = attend(&qs[pos], &ks, &vs, 0..=pos, c.n_heads, c.n_kv_heads, hd);
            x.iter_mut().zip(&matvec(w("attn_output"), &att)).for_each(|(a, b)| *a += b);
            let h = rms_norm(x, w("ffn_norm"), c.norm_eps);
            let (g, u) = (matvec(w("ffn_gate"), &h), matvec(w("ffn_up"), &h));
            let a: Vec<f32> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            x.iter_mut().zip(&matvec(w("ffn_down"), &a)).for_each(|(a, b)| *a += b);
        }
    }
    unreachable!()
}

fn synthetic() -> (ModelFile, SyntheticConfig) {
    let cfg = SyntheticConfig { n_layers: 3, context: 640, vocab: 120, ..SyntheticConfig::default() };
    (ModelFile::from_bytes("synthetic.gguf", llama_gguf(&cfg, 11).unwrap()).unwrap(), cfg)
}

fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = SplitMix(seed);
    (0..n).map(|_| (rng.next_u64() % vocab as u64) as u32).collect()
}

#[test]
fn selection_equals_brute_force() {
    let (file, cfg) = synthetic();
    let runner = model::load(&file, CpuBackend::reference(2).unwrap()).unwrap();
    let c = runner.config().clone();
    // Long enough to span two prefill chunks.
    let ids = random_ids(600.min(c.context), cfg.vocab, 5);
    let ids = &ids[..c.context.min(ids.len())];
    let n = ids.len();
    let group = c.n_heads / c.n_kv_heads;
    for r in 0..c.n_layers {
        let (q, keys) = longctx::filter_pass(runner.as_ref(), ids, r).unwrap();
        let (rq, rk) = reference_qk(&file, ids, r);
        // Brute force: every (head, key) product, summed over heads, in f64.
        let last = &rq[n - 1];
        let raw: Vec<f64> = (0..n)
            .map(|j| {
                (0..c.n_heads)
                    .map(|h| {
                        let g = h / group;
                        (0..c.head_dim)
                            .map(|i| last[h * c.head_dim + i] as f64 * rk[j][g * c.head_dim + i] as f64)
                            .sum::<f64>()
                    })
                    .sum()
            })
            .collect();
        let smooth: Vec<f64> = (0..n)
            .map(|j| (j as i64 - 2..=j as i64 + 2).filter_map(|i| raw.get(i as usize)).sum::<f64>() / 5.0)
            .collect();
        let got = longctx::smooth(&longctx::gemfilter_scores(&q, &keys, c.n_heads, c.n_kv_heads, c.head_dim), 5);
        let scale = smooth.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (a, b) in got.iter().zip(&smooth) {
            assert!((*a as f64 - b).abs() < 1e-4 * scale, "layer {r}: score {a} vs reference {b}");
        }
        for k in [1, 17, 64, n - 1] {
            let sel = longctx::gemfilter_select(&q, &keys, c.n_heads, c.n_kv_heads, c.head_dim, k);
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| smooth[b].total_cmp(&smooth[a]));
            let mut want = order[..k].to_vec();
            want.sort_unstable();
            assert_eq!(sel.len(), k);
            assert!(sel.windows(2).all(|w| w[0] < w[1]), "ascending");
            // Equal, except for members whose reference scores tie with the k-th to rounding.
            let kth = smooth[order[k - 1]];
            for i in sel.iter().filter(|i| !want.contains(i)).chain(want.iter().filter(|i| !sel.contains(i))) {
                assert!((smooth[*i] - kth).abs() < 1e-4 * scale, "layer {r}, k {k}: {i} differs from brute force");
            }
        }
    }
    // The first pass runs on a cache of layers 0..=r only, and refuses a layer past the model.
    assert!(longctx::filter_pass(runner.as_ref(), ids, c.n_layers).is_err());
}

#[test]
fn mass_sums_to_one_per_query_and_head() {
    let (file, cfg) = synthetic();
    let runner = model::load(&file, CpuBackend::new(2).unwrap()).unwrap();
    let c = runner.config().clone();
    let ids = random_ids(40, cfg.vocab, 9);
    let mut cache = runner.new_cache(64).unwrap();
    let mut probe = Probe { mass: Some(Vec::new()), ..Probe::default() };
    let plain = runner.forward(runner.new_cache(64).unwrap().as_mut(), &ids[..30], Logits::Last).unwrap();
    let with = runner.forward_probe(cache.as_mut(), &ids[..30], Logits::Last, &mut probe).unwrap();
    assert_eq!(plain, with, "recording attention must not change the result");
    for id in &ids[30..] {
        runner.forward_probe(cache.as_mut(), &[*id], Logits::Last, &mut probe).unwrap();
    }
    let mass = probe.mass.unwrap();
    assert_eq!(mass.len(), c.n_layers);
    let group = (c.n_heads / c.n_kv_heads) as f32;
    for layer in &mass {
        for m in layer {
            assert_eq!(m.len(), 40);
            let total: f32 = m.iter().sum();
            assert!((total - 40.0 * group).abs() < 1e-3 * total, "{total}");
            // Causal: the last key was seen by one query row only.
            assert!(m[39] <= group + 1e-4);
        }
    }
}

#[test]
fn compaction_keeps_positions() {
    let (file, cfg) = synthetic();
    let runner = model::load(&file, CpuBackend::new(2).unwrap()).unwrap();
    let c = runner.config().clone();
    let ids = random_ids(50, cfg.vocab, 3);
    let mut full = runner.new_cache(64).unwrap();
    runner.forward(full.as_mut(), &ids[..49], Logits::Last).unwrap();
    // Keeping every row is the same cache: the next token's logits are identical.
    let all: Vec<Vec<Vec<usize>>> = vec![vec![(0..49).collect(); c.n_kv_heads]; c.n_layers];
    let mut copy = runner.compact(full.as_mut(), &all).unwrap();
    assert_eq!(copy.position(), 49);
    let a = runner.forward(copy.as_mut(), &ids[49..], Logits::Last).unwrap();
    let b = runner.forward(full.as_mut(), &ids[49..], Logits::Last).unwrap();
    assert_eq!(a, b);
    // Evicting rows leaves the next token at its true position.
    let some: Vec<Vec<Vec<usize>>> = vec![vec![(10..50).collect(); c.n_kv_heads]; c.n_layers];
    let mut small = runner.compact(full.as_mut(), &some).unwrap();
    assert_eq!((small.len(), small.position()), (40, 50));
    runner.forward(small.as_mut(), &ids[..1], Logits::Last).unwrap();
    assert_eq!((small.len(), small.position()), (41, 51));
    // Bad selections are refused.
    let ragged = vec![vec![vec![0, 1], vec![0]]; c.n_layers];
    assert!(runner.compact(full.as_mut(), &ragged).is_err());
    let outside = vec![vec![vec![0, 999]; c.n_kv_heads]; c.n_layers];
    assert!(runner.compact(full.as_mut(), &outside).is_err());
}

fn engine() -> Engine {
    Engine::load(&common::model_path(), &EngineOptions { threads: 2, ..Default::default() }).unwrap()
}

fn prompt(engine: &Engine) -> Vec<u32> {
    let text = "The lighthouse keeper wrote in his log every evening. On the ninth day the fog \
                came in thick and grey, and the ships stayed in the harbor. The secret word is \
                marmalade. He lit the lamp early and waited for the morning. What is the secret word?";
    engine.tokenize(text).unwrap()
}

fn greedy() -> Sampler {
    Sampler::new(SamplerConfig { temperature: 0.0, ..SamplerConfig::default() })
}

#[test]
fn k_at_least_n_is_exactly_full() {
    let engine = engine();
    let ids = prompt(&engine);
    let run = |method: Method| {
        let mut s = engine.new_session(256).unwrap();
        s.set_method(method).unwrap();
        let logits = s.prefill_method(&ids).unwrap();
        let g = s.decode(logits.clone(), 8, &mut greedy(), |_| ControlFlow::Continue(())).unwrap();
        (logits, g.ids)
    };
    let full = run(Method::Full);
    for m in [
        Method::GemFilter { k: ids.len(), layer: FilterLayer::Fixed(5) },
        Method::GemFilter { k: 4096, layer: FilterLayer::Fixed(5) },
        Method::SnapKv { k: ids.len() },
        Method::H2o { k: 4096 },
        Method::Recent { k: ids.len() },
        Method::Random { k: 5000, seed: 1 },
    ] {
        assert_eq!(run(m), full, "{m:?}");
    }
}

#[test]
fn gemfilter_renumbers_positions() {
    let engine = engine();
    let ids = prompt(&engine);
    let k = 16;
    let mut s = engine.new_session(256).unwrap();
    s.set_method(Method::GemFilter { k, layer: FilterLayer::Fixed(8) }).unwrap();
    let logits = s.prefill_method(&ids).unwrap();
    let sel = s.selected.clone().unwrap();
    assert_eq!(sel.len(), k);
    assert_eq!(sel, engine.select(&ids, Method::GemFilter { k, layer: FilterLayer::Fixed(8) }).unwrap());
    assert_eq!(s.cached(), k);
    // The second pass is the kept tokens alone at positions 0..k.
    let kept: Vec<u32> = sel.iter().map(|&i| ids[i]).collect();
    let mut fresh = engine.runner.new_cache(k).unwrap();
    assert_eq!(logits, engine.runner.forward(fresh.as_mut(), &kept, Logits::Last).unwrap());
    let mut whole = engine.runner.new_cache(ids.len()).unwrap();
    assert_ne!(logits, engine.runner.forward(whole.as_mut(), &ids, Logits::Last).unwrap());
}

#[test]
fn budgets_hold_while_decoding() {
    let engine = engine();
    let ids = prompt(&engine);
    for (m, rows_after_prefill) in
        [(Method::SnapKv { k: 40 }, 40), (Method::H2o { k: 40 }, 40), (Method::Recent { k: 20 }, 20)]
    {
        let mut s = engine.new_session(256).unwrap();
        s.set_method(m).unwrap();
        let logits = s.prefill_method(&ids).unwrap();
        assert_eq!(s.cached(), rows_after_prefill, "{m:?}");
        let g = s.decode(logits, 6, &mut greedy(), |_| ControlFlow::Continue(())).unwrap();
        let n = g.ids.len();
        match m {
            // H2O evicts as it goes: the cache stays at the budget.
            Method::H2o { k } => assert_eq!(s.cached(), k),
            _ => assert_eq!(s.cached(), rows_after_prefill + n),
        }
    }
}

#[test]
fn bad_input_is_refused() {
    let engine = engine();
    let ids = prompt(&engine);
    let mut s = engine.new_session(32).unwrap();
    s.set_method(Method::GemFilter { k: 8, layer: FilterLayer::Fixed(3) }).unwrap();
    let e = s.prefill_method(&ids).unwrap_err().to_string();
    assert!(e.contains("exceeds the context length 32"), "{e}");
    let mut s = engine.new_session(0).unwrap();
    assert!(s.set_method(Method::GemFilter { k: 0, layer: FilterLayer::Auto }).is_err());
    assert!(s.set_method(Method::SnapKv { k: 0 }).is_err());
    s.set_method(Method::GemFilter { k: 8, layer: FilterLayer::Fixed(99) }).unwrap();
    let e = s.prefill_method(&ids).unwrap_err().to_string();
    assert!(e.contains("layer 99 does not exist"), "{e}");
    assert!(Method::by_name("streamingllm", 8, FilterLayer::Auto, 0).is_err());
    assert!(Method::parse_gemfilter("k=0").is_err());
    let too_long = vec![ids[0]; engine.runner.config().context + 1];
    assert!(engine.select(&too_long, Method::GemFilter { k: 8, layer: FilterLayer::Fixed(1) }).is_err());
}

fn cairn(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cairn")).args(args).output().unwrap()
}

#[test]
fn cli_refuses_bad_methods() {
    let model = common::model_path();
    let m = model.to_str().unwrap();
    for (args, want) in [
        (vec!["generate", "-m", m, "-p", "hi", "--gemfilter", "k=0"], "k = 0"),
        (vec!["generate", "-m", m, "-p", "hi", "--baseline", "streamingllm"], "unknown method"),
        (vec!["generate", "-m", m, "-p", "hi", "--gemfilter", "layer=x"], "not a number"),
        (vec!["needle", "-m", m, "--method", "full,oracle", "--lengths", "64"], "unknown method"),
        (vec!["generate", "-m", m, "-c", "8", "-p", "one two three four five six seven eight nine ten"], "exceeds"),
    ] {
        let o = cairn(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(want) && err.starts_with("error:"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
