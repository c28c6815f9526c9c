//! Cairn against llama.cpp's outputs on the default model (`tests/reference/`).

mod common;

use common::{ids, top5};

use std::ops::ControlFlow;
use std::sync::OnceLock;

use cairn::engine::{perplexity, Engine, EngineOptions};
use cairn::sampling::{Sampler, SamplerConfig};

/// Positions where llama.cpp's top-1 leads its top-2 by more than this must agree on
/// the top-1 id (llama.cpp quantizes activations to 8 bits, so logits differ slightly).
const MARGIN: f64 = 0.25;
/// Largest allowed difference of a top-5 logit.
const LOGIT_TOL: f64 = 1.5;

/// The default engine: integer kernels with 8-bit activations, as generation runs.
fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| Engine::load(&common::model_path(), &EngineOptions::default()).expect("load the default model"))
}

/// The f32 reference path: no activation quantization.
fn exact_engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        Engine::load(&common::model_path(), &EngineOptions { exact: true, ..Default::default() }).expect("load")
    })
}

fn margin(t: &[(u32, f64)]) -> f64 {
    t[0].1 - t[1].1
}

#[test]
fn tokenization_matches_llama_cpp() {
    let r = common::reference();
    let e = engine();
    for case in r["tokenize"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(e.tokenize(text).unwrap(), ids(&case["ids"]), "tokenize {text:?}");
    }
    for s in r["sequences"].as_array().unwrap() {
        let text = s["rendered"].as_str().unwrap();
        assert_eq!(e.tokenize(text).unwrap(), ids(&s["prompt_ids"]), "prompt of {}", s["name"]);
    }
}

/// Top-5 logit differences and top-1 agreement at the positions where llama.cpp's
/// margin exceeds `MARGIN`: (sorted differences, positions agreeing, firm positions,
/// disagreements as (sequence, position, llama.cpp's margin)).
/// A top-1 disagreement: sequence, position, llama.cpp's margin there.
type Flip = (String, usize, f64);

fn compare(e: &Engine) -> (Vec<f64>, usize, usize, Vec<Flip>) {
    let r = common::reference();
    let vocab = e.vocab();
    let mut diffs = Vec::new();
    let (mut agree, mut firm, mut flips) = (0, 0, Vec::new());
    for s in r["sequences"].as_array().unwrap() {
        let name = s["name"].as_str().unwrap();
        let mut seq = ids(&s["prompt_ids"]);
        seq.extend(ids(&s["greedy_ids"]));
        let logits = e.eval_all(&seq).unwrap();
        let tops = s["top5_per_position"].as_array().unwrap();
        assert_eq!(tops.len(), seq.len());
        for (pos, t) in tops.iter().enumerate() {
            let t = top5(t);
            let row = &logits[pos * vocab..(pos + 1) * vocab];
            for &(id, l) in &t {
                let d = (row[id as usize] as f64 - l).abs();
                assert!(
                    d <= LOGIT_TOL,
                    "{name} position {pos}: logit of {id} is {} vs llama.cpp {l}",
                    row[id as usize]
                );
                diffs.push(d);
            }
            if margin(&t) > MARGIN {
                firm += 1;
                if cairn::sampling::argmax(row) == t[0].0 {
                    agree += 1;
                } else {
                    flips.push((name.to_string(), pos, margin(&t)));
                }
            }
        }
    }
    diffs.sort_by(f64::total_cmp);
    (diffs, agree, firm, flips)
}

fn report(what: &str, diffs: &[f64], agree: usize, firm: usize) {
    let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
    eprintln!(
        "{what}: top-5 logits vs llama.cpp: mean |diff| {mean:.4}, median {:.4}, max {:.4} over {} logits; top-1 equal at {agree} of {firm} positions with margin > {MARGIN}",
        diffs[diffs.len() / 2],
        diffs[diffs.len() - 1],
        diffs.len()
    );
}

/// The f32 evaluation of the weights meets the strict criterion: the same top-1 as
/// llama.cpp wherever llama.cpp's margin exceeds 0.25.
#[test]
fn exact_logits_match_llama_cpp() {
    let (diffs, agree, firm, flips) = compare(exact_engine());
    report("exact f32 path", &diffs, agree, firm);
    assert!(flips.is_empty(), "top-1 differs at {flips:?}");
}

/// 8-bit activations (llama.cpp's scheme too) move logits by about 0.17 on average
/// against the f32 evaluation, in llama.cpp as in Cairn, and roundings that fall
/// differently flip near-ties: a flip is allowed only where llama.cpp's own margin is
/// small next to that noise, and rarely.
#[test]
fn fast_logits_match_llama_cpp() {
    let (diffs, agree, firm, flips) = compare(engine());
    report("8-bit activation path", &diffs, agree, firm);
    assert!(flips.iter().all(|f| f.2 < 0.5), "top-1 differs where llama.cpp is sure: {flips:?}");
    assert!(agree * 100 >= firm * 98, "top-1 agrees at only {agree} of {firm} positions: {flips:?}");
    let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
    assert!(mean < 0.3, "mean logit difference {mean}");
}

#[test]
fn greedy_continuations_match_llama_cpp() {
    let r = common::reference();
    let e = engine();
    for s in r["sequences"].as_array().unwrap() {
        let name = s["name"].as_str().unwrap();
        let prompt = ids(&s["prompt_ids"]);
        let want = ids(&s["greedy_ids"]);
        let tops = s["top5_per_position"].as_array().unwrap();
        // The continuation must agree up to the first token llama.cpp chose by a hair,
        // or where its own greedy run disagrees with its batched top-1 (fibonacci, token
        // 13: llama.cpp's decode picks 2822, its batched pass ranks 304 first by 0.33).
        let firm = (0..want.len())
            .take_while(|&i| {
                let t = top5(&tops[prompt.len() - 1 + i]);
                margin(&t) > MARGIN && t[0].0 == want[i]
            })
            .count();
        let mut session = e.new_session(0).unwrap();
        let mut sampler = Sampler::new(SamplerConfig::greedy());
        let g = session.generate(&prompt, want.len(), &mut sampler, |_| ControlFlow::Continue(())).unwrap();
        assert_eq!(g.ids[..firm.min(g.ids.len())], want[..firm], "{name}: greedy continuation");
        eprintln!("{name}: {firm} of {} tokens firm and equal; {} equal in all", want.len(), {
            g.ids.iter().zip(&want).take_while(|(a, b)| a == b).count()
        });
    }
}

#[test]
fn perplexity_matches_llama_cpp() {
    let r = common::reference();
    let p = &r["perplexity"][0];
    let path = p["source"].as_str().unwrap().rsplit(", ").next().unwrap().to_string();
    let text = std::fs::read_to_string(&path).expect("the reference text (Debian's base-files)");
    let window = p["window"].as_u64().unwrap() as usize;
    let windows = p["windows"].as_u64().unwrap() as usize;
    let (all, half) = perplexity(engine(), &text, window, Some(windows), |_, _, _| {}).unwrap();
    let (ref_all, ref_half) = (p["ppl_all_positions"].as_f64().unwrap(), p["ppl_second_half"].as_f64().unwrap());
    eprintln!("perplexity {all:.4} vs {ref_all:.4}; second half {half:.4} vs {ref_half:.4}");
    assert!((all / ref_all - 1.0).abs() < 0.01, "perplexity {all} vs llama.cpp {ref_all}");
    assert!((half / ref_half - 1.0).abs() < 0.01, "second-half perplexity {half} vs llama.cpp {ref_half}");
}
