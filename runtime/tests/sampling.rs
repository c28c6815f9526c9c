//! The sampler: greedy decoding, reproducibility, and that top-k/top-p/min-p/temperature
//! and the penalties produce exactly the distribution llama.cpp's chain defines.

use cairn::sampling::{argmax, Rng, Sampler, SamplerConfig};

/// Deterministic pseudo-logits in roughly [-5, 5).
fn logits(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| (rng.next_f64() * 10.0 - 5.0) as f32).collect()
}

fn cfg(temperature: f32, top_k: usize, top_p: f32, min_p: f32, seed: u64) -> SamplerConfig {
    SamplerConfig { temperature, top_k, top_p, min_p, seed, ..SamplerConfig::default() }
}

#[test]
fn greedy_is_argmax_with_lowest_id_on_ties() {
    let mut s = Sampler::new(SamplerConfig::greedy());
    for seed in 0..50 {
        let l = logits(1000, seed);
        let best = (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b]).then(b.cmp(&a))).unwrap();
        assert_eq!(s.sample(&mut l.clone(), &[]), best as u32);
    }
    assert_eq!(s.sample(&mut [1.0, 3.0, 3.0, 2.0], &[]), 1);
    assert_eq!(s.sample(&mut [f32::NAN, -1.0, f32::NAN], &[]), 1);
    assert_eq!(s.sample(&mut [], &[]), 0);
    assert_eq!(argmax(&[-1.0, -1.0]), 0);
    // Ties in different lanes and in the tail, NaN, all -inf: the first maximum, NaN never.
    let mut v = vec![0f32; 37];
    v[35] = 2.0;
    v[19] = 2.0;
    assert_eq!(argmax(&v), 19);
    v[3] = f32::NAN;
    v[36] = f32::INFINITY;
    assert_eq!(argmax(&v), 36);
    assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY, f32::NEG_INFINITY]), 1);
    assert_eq!(argmax(&[f32::NEG_INFINITY; 20]), 0);
    // Negative temperature is greedy too.
    let mut s = Sampler::new(cfg(-1.0, 0, 1.0, 0.0, 7));
    assert_eq!(s.sample(&mut [0.0, 0.5, 0.4], &[]), 1);
}

#[test]
fn top_k_one_is_greedy_at_any_temperature() {
    for (i, t) in [0.01f32, 0.5, 1.0, 2.0, 100.0].into_iter().enumerate() {
        let mut s = Sampler::new(cfg(t, 1, 1.0, 0.0, i as u64));
        for seed in 0..20 {
            let l = logits(500, seed + 100);
            assert_eq!(s.sample(&mut l.clone(), &[]), argmax(&l), "t={t}");
        }
    }
}

#[test]
fn same_seed_same_tokens_different_seed_different_tokens() {
    let run = |seed: u64| -> Vec<u32> {
        let mut s = Sampler::new(cfg(1.0, 0, 1.0, 0.0, seed));
        (0..200).map(|i| s.sample(&mut logits(64, i), &[])).collect()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
    // Reseeding restarts the stream.
    let mut s = Sampler::new(cfg(1.0, 0, 1.0, 0.0, 1));
    let first: Vec<u32> = (0..200).map(|i| s.sample(&mut logits(64, i), &[])).collect();
    s.reseed(1);
    let again: Vec<u32> = (0..200).map(|i| s.sample(&mut logits(64, i), &[])).collect();
    assert_eq!(first, again);
}

fn softmax(l: &[f64]) -> Vec<f64> {
    let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = l.iter().map(|x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

/// The allowed set and final probabilities, computed the slow obvious way:
/// top-k, then top-p and min-p on the untempered probabilities, then temperature.
fn brute_force(l: &[f32], c: &SamplerConfig) -> Vec<f64> {
    let n = l.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
    let mut allowed: Vec<usize> = order.clone();
    if c.top_k > 0 {
        allowed.truncate(c.top_k);
    }
    if c.top_p < 1.0 {
        let p = softmax(&allowed.iter().map(|&i| l[i] as f64).collect::<Vec<_>>());
        let mut cum = 0.0;
        let mut keep = allowed.len();
        for (j, pj) in p.iter().enumerate() {
            cum += pj;
            if cum >= c.top_p as f64 {
                keep = j + 1;
                break;
            }
        }
        allowed.truncate(keep);
    }
    if c.min_p > 0.0 {
        let p = softmax(&allowed.iter().map(|&i| l[i] as f64).collect::<Vec<_>>());
        let pmax = p.iter().cloned().fold(0.0, f64::max);
        allowed = allowed
            .iter()
            .zip(&p)
            .filter(|(_, &pj)| pj >= c.min_p as f64 * pmax * (1.0 - 1e-6))
            .map(|(&i, _)| i)
            .collect();
    }
    let p = softmax(&allowed.iter().map(|&i| l[i] as f64 / c.temperature as f64).collect::<Vec<_>>());
    let mut full = vec![0.0; n];
    for (&i, pj) in allowed.iter().zip(p) {
        full[i] = pj;
    }
    full
}

/// Sample many times and compare with the brute-force distribution: tokens outside the
/// allowed set never appear, and frequencies match within 5 standard errors.
fn check_distribution(l: &[f32], c: SamplerConfig) {
    let want = brute_force(l, &c);
    let excluded = want.iter().filter(|&&p| p == 0.0).count();
    assert!(excluded > 0 && excluded < l.len(), "test case must exclude some tokens: {c:?}");
    let draws = 40_000;
    let mut counts = vec![0usize; l.len()];
    let mut s = Sampler::new(c.clone());
    for _ in 0..draws {
        counts[s.sample(&mut l.to_vec(), &[]) as usize] += 1;
    }
    for (i, (&n, &p)) in counts.iter().zip(&want).enumerate() {
        if p == 0.0 {
            assert_eq!(n, 0, "token {i} must be excluded ({c:?})");
        } else {
            let freq = n as f64 / draws as f64;
            let se = (p * (1.0 - p) / draws as f64).sqrt();
            assert!((freq - p).abs() <= 5.0 * se + 1e-3, "token {i}: freq {freq:.4} vs p {p:.4} ({c:?})");
        }
    }
}

#[test]
fn top_p_keeps_exactly_the_nucleus() {
    let l = logits(40, 3);
    check_distribution(&l, cfg(1.0, 0, 0.8, 0.0, 11));
    check_distribution(&l, cfg(0.6, 0, 0.5, 0.0, 12));
    check_distribution(&l, cfg(1.7, 0, 0.9, 0.0, 13));
}

#[test]
fn min_p_keeps_tokens_near_the_top() {
    let l = logits(40, 4);
    check_distribution(&l, cfg(1.0, 0, 1.0, 0.1, 21));
    check_distribution(&l, cfg(0.5, 0, 1.0, 0.3, 22));
}

#[test]
fn top_k_and_the_whole_chain() {
    let l = logits(60, 5);
    check_distribution(&l, cfg(1.0, 7, 1.0, 0.0, 31));
    check_distribution(&l, cfg(0.8, 20, 0.9, 0.05, 32));
    // llama.cpp's defaults.
    check_distribution(&l, SamplerConfig { seed: 33, ..SamplerConfig::default() });
}

#[test]
fn temperature_reshapes_without_excluding() {
    // No truncation: every token keeps a share, sharpened or flattened by temperature.
    let l: Vec<f32> = vec![2.0, 1.0, 0.5, 0.0, -1.0];
    for t in [0.5f32, 1.0, 2.0] {
        let c = cfg(t, 0, 1.0, 0.0, 41);
        let want = softmax(&l.iter().map(|&x| x as f64 / t as f64).collect::<Vec<_>>());
        let mut s = Sampler::new(c);
        let draws = 40_000;
        let mut counts = [0usize; 5];
        for _ in 0..draws {
            counts[s.sample(&mut l.clone(), &[]) as usize] += 1;
        }
        for i in 0..5 {
            let freq = counts[i] as f64 / draws as f64;
            let se = (want[i] * (1.0 - want[i]) / draws as f64).sqrt();
            assert!((freq - want[i]).abs() <= 5.0 * se + 1e-3, "t={t} token {i}: {freq} vs {}", want[i]);
        }
    }
}

fn penalties(repeat: f32, last_n: usize, presence: f32, frequency: f32) -> SamplerConfig {
    SamplerConfig {
        repeat_penalty: repeat,
        repeat_last_n: last_n,
        presence_penalty: presence,
        frequency_penalty: frequency,
        ..SamplerConfig::greedy()
    }
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative() {
    let mut s = Sampler::new(penalties(2.0, 64, 0.0, 0.0));
    let mut l = vec![2.0, -2.0, 1.5, 0.5, 0.0];
    // Token 0 seen twice is still penalized once; 4 has logit 0 (stays 0).
    assert_eq!(s.sample(&mut l, &[0, 1, 0, 4]), 2);
    assert_eq!(l, vec![1.0, -4.0, 1.5, 0.5, 0.0]);
}

#[test]
fn penalty_window_is_the_last_n_tokens() {
    let mut s = Sampler::new(penalties(2.0, 2, 0.0, 0.0));
    let mut l = vec![4.0, 4.0, 4.0, 4.0];
    s.sample(&mut l, &[0, 1, 2, 2]);
    assert_eq!(l, vec![4.0, 4.0, 2.0, 4.0]);
    // 0 disables penalties entirely.
    let mut s = Sampler::new(penalties(2.0, 0, 1.0, 1.0));
    let mut l = vec![4.0, 4.0];
    s.sample(&mut l, &[0, 1]);
    assert_eq!(l, vec![4.0, 4.0]);
}

#[test]
fn presence_and_frequency_penalties_subtract() {
    let mut s = Sampler::new(penalties(1.0, 64, 0.5, 0.25));
    let mut l = vec![1.0, 1.0, 1.0];
    // Out-of-range ids in the history are ignored, not a panic.
    assert_eq!(s.sample(&mut l, &[0, 0, 1, 99]), 2);
    assert_eq!(l, vec![0.0, 0.25, 1.0]);
}

#[test]
fn penalties_apply_before_sampling_too() {
    // The only allowed token after the penalty pushes the favourite below min-p.
    let mut s = Sampler::new(SamplerConfig {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.5,
        repeat_penalty: 1.0,
        presence_penalty: 10.0,
        ..SamplerConfig::default()
    });
    for _ in 0..100 {
        assert_eq!(s.sample(&mut [5.0, 4.9, -10.0], &[0]), 1);
    }
}

#[cfg(feature = "cli")]
/// Model defaults: `general.sampling.*` metadata first, then the registry entry the file
/// matches (here by its file name), then built in; flags override all three.
#[test]
fn model_defaults_metadata_over_registry_flags_over_both() {
    use cairn::sampling::{Origin, SamplingHints};
    use cairn_formats::MetaValue;
    let cfg = cairn::synthetic::SyntheticConfig::default();
    let bytes = cairn::synthetic::llama_gguf(&cfg, 1).unwrap();
    let mut file = cairn::weights::ModelFile::from_bytes("SmolLM2-135M-Instruct.Q4_1.gguf", bytes).unwrap();
    assert_eq!(cairn::pull::spec_for_file(&file).map(|s| s.name), Some("smollm2-135m-instruct"));

    // Registry only: the model card's temperature 0.2 and top-p 0.9, the rest built in.
    let d = cairn::pull::model_sampling(&file, &SamplingHints::NONE, 7);
    assert_eq!((d.config.temperature, d.config.top_p, d.config.top_k, d.config.seed), (0.2, 0.9, 40, 7));
    assert_eq!(&d.origins[..3], &[Origin::Registry, Origin::BuiltIn, Origin::Registry]);

    // Metadata wins over the registry; a bad value is ignored, not fatal.
    file.metadata.push(("general.sampling.temp".into(), MetaValue::F32(0.6)));
    file.metadata.push(("general.sampling.top_k".into(), MetaValue::U32(20)));
    file.metadata.push(("general.sampling.min_p".into(), MetaValue::F32(7.0)));
    file.metadata.push(("general.sampling.penalty_repeat".into(), MetaValue::F64(1.05)));
    let d = cairn::pull::model_sampling(&file, &SamplingHints::NONE, 7);
    let c = &d.config;
    assert_eq!((c.temperature, c.top_k, c.top_p, c.min_p, c.repeat_penalty), (0.6, 20, 0.9, 0.05, 1.05));
    assert_eq!(
        &d.origins[..5],
        &[Origin::Metadata, Origin::Metadata, Origin::Registry, Origin::BuiltIn, Origin::Metadata]
    );
    assert!(
        d.describe().starts_with("temp 0.6 (metadata), top-k 20 (metadata), top-p 0.9 (registry)"),
        "{}",
        d.describe()
    );

    // Flags win over both.
    let flags = SamplingHints { temperature: Some(0.0), top_p: Some(0.5), ..SamplingHints::NONE };
    let d = cairn::pull::model_sampling(&file, &flags, 7);
    assert_eq!((d.config.temperature, d.config.top_k, d.config.top_p), (0.0, 20, 0.5));
    assert_eq!(&d.origins[..3], &[Origin::Flag, Origin::Metadata, Origin::Flag]);

    // A file the registry does not know: metadata, else llama.cpp's defaults.
    let other =
        cairn::weights::ModelFile::from_bytes("mine.gguf", cairn::synthetic::llama_gguf(&cfg, 1).unwrap()).unwrap();
    assert!(cairn::pull::spec_for_file(&other).is_none());
    assert_eq!(cairn::pull::model_sampling(&other, &SamplingHints::NONE, 0x5EED).config, SamplerConfig::default());
}
