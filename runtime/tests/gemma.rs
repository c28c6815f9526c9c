//! Gemma-3-270M against llama.cpp's outputs (`tests/reference/gemma-3-270m-q4_k_m.json`).

mod common;

use common::{gemma_path, gemma_reference, ids, top5};

use std::sync::OnceLock;

use cairn::backend::cpu::CpuBackend;
use cairn::model::{self, Logits, Runner};
use cairn::weights::ModelFile;

/// llama.cpp's top-1 must match where its lead over the top-2 exceeds this.
const MARGIN: f64 = 0.3;
/// Largest allowed difference of a top-5 logit.
const LOGIT_TOL: f64 = 2.0;

fn runner(exact: bool) -> &'static dyn Runner {
    static FAST: OnceLock<Box<dyn Runner>> = OnceLock::new();
    static EXACT: OnceLock<Box<dyn Runner>> = OnceLock::new();
    let cell = if exact { &EXACT } else { &FAST };
    cell.get_or_init(|| {
        let file = ModelFile::open(&gemma_path()).expect("open gemma");
        let be = if exact { CpuBackend::reference(0) } else { CpuBackend::new(0) }.expect("backend");
        model::load(&file, be).expect("load gemma")
    })
    .as_ref()
}

fn eval_all(r: &dyn Runner, seq: &[u32]) -> Vec<f32> {
    let mut cache = r.new_cache(seq.len()).unwrap();
    r.forward(cache.as_mut(), seq, Logits::All).unwrap()
}

fn check_logits(exact: bool) {
    let r = runner(exact);
    let vocab = r.config().vocab;
    let (mut diffs, mut agree, mut firm, mut flips) = (Vec::new(), 0, 0, Vec::new());
    for s in gemma_reference()["sequences"].as_array().unwrap() {
        let name = s["name"].as_str().unwrap();
        let mut seq = ids(&s["prompt_ids"]);
        seq.extend(ids(&s["greedy_ids"]));
        let logits = eval_all(r, &seq);
        for (pos, t) in s["top5_per_position"].as_array().unwrap().iter().enumerate() {
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
            if t[0].1 - t[1].1 > MARGIN {
                firm += 1;
                if cairn::sampling::argmax(row) == t[0].0 {
                    agree += 1;
                } else {
                    flips.push((name.to_string(), pos, t[0].1 - t[1].1));
                }
            }
        }
    }
    diffs.sort_by(f64::total_cmp);
    let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
    eprintln!(
        "gemma {} path: top-5 logits vs llama.cpp: mean |diff| {mean:.4}, median {:.4}, max {:.4} over {}; top-1 equal at {agree} of {firm} positions with margin > {MARGIN}; flips {flips:?}",
        if exact { "exact" } else { "8-bit" },
        diffs[diffs.len() / 2],
        diffs[diffs.len() - 1],
        diffs.len()
    );
    if exact {
        assert!(flips.is_empty(), "top-1 differs at {flips:?}");
    } else {
        assert!(flips.iter().all(|f| f.2 < 0.6), "top-1 differs where llama.cpp is sure: {flips:?}");
        assert!(agree * 100 >= firm * 97, "top-1 agrees at only {agree} of {firm}");
    }
}

#[test]
fn exact_logits_match_llama_cpp() {
    check_logits(true);
}

#[test]
fn fast_logits_match_llama_cpp() {
    check_logits(false);
}

#[test]
fn greedy_continuations_match_llama_cpp() {
    let r = runner(false);
    for s in gemma_reference()["sequences"].as_array().unwrap() {
        let name = s["name"].as_str().unwrap();
        let prompt = ids(&s["prompt_ids"]);
        let want = ids(&s["greedy_ids"]);
        let tops = s["top5_per_position"].as_array().unwrap();
        // Equal up to the first near-tie (or where llama.cpp's own greedy run departs
        // from its batched top-1).
        let firm = (0..want.len())
            .take_while(|&i| {
                let t = top5(&tops[prompt.len() - 1 + i]);
                t[0].1 - t[1].1 > MARGIN && t[0].0 == want[i]
            })
            .count();
        let mut cache = r.new_cache(prompt.len() + want.len()).unwrap();
        let mut logits = r.forward(cache.as_mut(), &prompt, Logits::Last).unwrap();
        let mut got = Vec::new();
        for _ in 0..want.len() {
            let id = cairn::sampling::argmax(&logits);
            got.push(id);
            logits = r.forward(cache.as_mut(), &[id], Logits::Last).unwrap();
        }
        let equal = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        eprintln!("{name}: {firm} of {} tokens firm; {equal} equal", want.len());
        assert!(equal >= firm, "{name}: greedy continuation departs at {equal}, before the first near-tie at {firm}");
    }
}

#[test]
fn perplexity_matches_llama_cpp() {
    let r = gemma_reference();
    let p = &r["perplexity"][0];
    let path = p["source"].as_str().unwrap().rsplit(", ").next().unwrap().to_string();
    let text = std::fs::read_to_string(&path).expect("the reference text (Debian's base-files)");
    let engine = cairn::engine::Engine::load(&gemma_path(), &Default::default()).expect("load gemma");
    let (window, windows) = (p["window"].as_u64().unwrap() as usize, p["windows"].as_u64().unwrap() as usize);
    let (all, half) = cairn::engine::perplexity(&engine, &text, window, Some(windows), |_, _, _| {}).unwrap();
    let (ref_all, ref_half) = (p["ppl_all_positions"].as_f64().unwrap(), p["ppl_second_half"].as_f64().unwrap());
    eprintln!("gemma perplexity {all:.4} vs {ref_all:.4}; second half {half:.4} vs {ref_half:.4}");
    assert!((all / ref_all - 1.0).abs() < 0.02, "perplexity {all} vs llama.cpp {ref_all}");
    assert!((half / ref_half - 1.0).abs() < 0.02, "second-half perplexity {half} vs llama.cpp {ref_half}");
}

/// `Engine::embed` on Gemma (√dim-scaled input embedding, tied head, sliding-window
/// layers): the head applied to the embedding equals the mean of the logits over
/// positions, as for llama (`tests/route_gate.rs`).
#[test]
fn embedding_is_the_mean_final_hidden_state() {
    let opts = cairn::engine::EngineOptions { exact: true, ..Default::default() };
    let e = cairn::engine::Engine::load(&gemma_path(), &opts).expect("load gemma");
    let ids = e.tokenize("Gemma reads the whole sentence before it answers.").expect("tokenize");
    let emb = e.embed(&ids).expect("embed");
    assert_eq!(emb.len(), e.runner.config().dim);
    assert!(emb.iter().all(|v| v.is_finite()) && emb.iter().any(|v| v.abs() > 1e-3));
    let logits = e.eval_all(&ids).expect("eval");
    let vocab = e.vocab();
    let mut mean = vec![0f64; vocab];
    for row in logits.chunks_exact(vocab) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v as f64 / ids.len() as f64;
        }
    }
    let mean: Vec<f32> = mean.iter().map(|&v| v as f32).collect();
    let name = if e.file.tensor_info("output.weight").is_some() { "output.weight" } else { "token_embd.weight" };
    let t = e.file.tensor_info(name).expect("head tensor");
    let head = e.file.tensor(name, &t.dims.clone()).expect("tensor").to_f32().expect("dequantize");
    let d = common::max_rel_diff(&common::f32ref::matvec(&head, &emb), &mean);
    assert!(d < 1e-4, "head(embed) vs mean of logits: relative difference {d}");
}
