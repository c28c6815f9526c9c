//! The MoE² gate's inputs and its training end to end, on the default model:
//! `Engine::embed` against a second computation of the same mean hidden state,
//! `Engine::score` against a brute-force log-softmax, and a gate trained on a small
//! local corpus with two variants of the model as experts.

mod common;

use std::sync::OnceLock;
use std::time::Instant;

use cairn::engine::{Engine, EngineOptions};
use cairn::model::{self, Logits, Probe};
use cairn::route::corpus::{default_sources, Category, Corpus, CorpusOptions};
use cairn::route::gate::{self, Gate, TrainOptions};
use common::max_rel_diff;

fn engine(exact: bool) -> &'static Engine {
    static NORMAL: OnceLock<Engine> = OnceLock::new();
    static EXACT: OnceLock<Engine> = OnceLock::new();
    let cell = if exact { &EXACT } else { &NORMAL };
    cell.get_or_init(|| {
        Engine::load(&common::model_path(), &EngineOptions { exact, ..Default::default() }).expect("load")
    })
}

const TEXT: &str = "The lighthouse keeper climbed the stairs every evening, counting the steps \
    aloud, and when the lamp was lit he wrote the time in a small green book.";

/// The output head as plain f32 rows (`output.weight`, or the embedding it is tied to).
fn head_rows(e: &Engine) -> Vec<f32> {
    let name = if e.file.tensor_info("output.weight").is_some() { "output.weight" } else { "token_embd.weight" };
    let t = e.file.tensor_info(name).expect("head tensor");
    e.file.tensor(name, &t.dims.clone()).expect("tensor").to_f32().expect("dequantize")
}

#[test]
fn embedding_is_the_mean_final_hidden_state() {
    let e = engine(true);
    let dim = e.runner.config().dim;
    let ids = e.tokenize(TEXT).expect("tokenize");
    assert!(ids.len() > 20);
    let emb = e.embed(&ids).expect("embed");
    assert_eq!(emb.len(), dim);
    assert!(emb.iter().all(|v| v.is_finite()));
    assert!(emb.iter().any(|v| v.abs() > 1e-3), "not all zero");

    // Second path: logits are the head applied to the normed hidden rows, a linear map,
    // so the mean of the logits over positions is the head applied to the embedding.
    let logits = e.eval_all(&ids).expect("eval");
    let vocab = e.vocab();
    let mut mean = vec![0f64; vocab];
    for row in logits.chunks_exact(vocab) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v as f64 / ids.len() as f64;
        }
    }
    let mean: Vec<f32> = mean.iter().map(|&v| v as f32).collect();
    let projected = common::f32ref::matvec(&head_rows(e), &emb);
    let d = max_rel_diff(&projected, &mean);
    assert!(d < 1e-4, "head(embed) vs mean of logits: relative difference {d}");

    // Chunk boundaries moved: the runner fed by hand in passes of 2, 5 and the rest.
    let mut cache = e.runner.new_cache(ids.len()).expect("cache");
    let mut probe = Probe { hidden_sum: Some(Vec::new()), ..Probe::default() };
    for chunk in [&ids[..2], &ids[2..7], &ids[7..]] {
        let out = e.runner.forward_probe(cache.as_mut(), chunk, Logits::All, &mut probe).expect("pass");
        assert!(out.is_empty(), "no logits while the hidden state is summed");
    }
    let sum = probe.hidden_sum.expect("sum");
    let by_hand: Vec<f32> = sum.iter().map(|&s| (s / ids.len() as f64) as f32).collect();
    let d = max_rel_diff(&by_hand, &emb);
    assert!(d < 1e-4, "chunked 2/5/rest vs embed: relative difference {d}");

    // A one-token prompt: its embedding is its own row, and the head applied to it gives
    // that token's logits.
    let one = e.embed(&ids[..1]).expect("embed one");
    let logits = e.eval_all(&ids[..1]).expect("eval one");
    let d = max_rel_diff(&common::f32ref::matvec(&head_rows(e), &one), &logits);
    assert!(d < 1e-4, "one token: relative difference {d}");

    // Different texts, different embeddings; the quantized backend agrees roughly.
    let other =
        e.embed(&e.tokenize("fn main() { let x = vec![1, 2, 3]; println!(\"{x:?}\"); }").expect("ids")).expect("embed");
    assert!(max_rel_diff(&other, &emb) > 0.05, "two unrelated texts embed alike");
    let q = engine(false).embed(&ids).expect("embed quantized");
    let d = max_rel_diff(&q, &emb);
    assert!(d < 0.1, "quantized vs exact embedding: relative difference {d}");

    assert!(e.embed(&[]).is_err(), "an empty prompt has no embedding");
    assert!(e.embed(&[u32::MAX]).is_err(), "ids outside the vocabulary");
}

#[test]
fn scores_are_the_log_softmax_of_the_logits() {
    for exact in [true, false] {
        let e = engine(exact);
        // Longer than one pass of `for_each_logits` (21 rows for this vocabulary).
        let ids = e.tokenize(&format!("{TEXT} {TEXT}")).expect("tokenize");
        assert!(ids.len() > model::logit_rows(e.vocab()) + 5);
        let lp = e.score(&ids).expect("score");
        assert_eq!(lp.len(), ids.len() - 1);
        let logits = e.eval_all(&ids).expect("eval");
        let vocab = e.vocab();
        let tol = if exact { 1e-4 } else { 0.05 };
        for (t, row) in logits.chunks_exact(vocab).take(ids.len() - 1).enumerate() {
            let max = row.iter().fold(f64::MIN, |m, &v| m.max(v as f64));
            let z: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            let want = row[ids[t + 1] as usize] as f64 - max - z.ln();
            assert!(lp[t] <= 0.0 && lp[t].is_finite());
            assert!((lp[t] as f64 - want).abs() < tol, "exact {exact}, token {}: {} vs {want}", t + 1, lp[t]);
        }
        // Repeated text is far more predictable the second time.
        let half = lp.len() / 2;
        let (a, b): (f32, f32) = (lp[..half].iter().sum(), lp[half..].iter().sum());
        assert!(b > a, "second copy {b} vs first {a}");
        assert!(e.score(&ids[..1]).expect("one token").is_empty());
        // One pass for both (`route train`'s embedder) gives what the two give apart.
        let (lp2, emb2) = e.score_and_embed(&ids).expect("score and embed");
        let emb = e.embed(&ids[..ids.len() - 1]).expect("embed");
        assert_eq!(lp2.len(), lp.len());
        for (t, (a, b)) in lp.iter().zip(&lp2).enumerate() {
            assert!((a - b).abs() < 1e-5, "exact {exact}, token {t}: {a} vs {b}");
        }
        assert_eq!(emb.len(), emb2.len());
        for (k, (a, b)) in emb.iter().zip(&emb2).enumerate() {
            assert!((a - b).abs() < 1e-5 * (1.0 + a.abs()), "exact {exact}, dim {k}: {a} vs {b}");
        }
        assert!(e.score_and_embed(&ids[..1]).is_err());
    }
}

/// The router runs experts side by side, and two requests may embed at once: one engine
/// must serve several threads with the same results. A smoke test: the CPU backend once
/// held its RoPE cache lock across its pool, where a waiting worker may run another
/// thread's pass that needs the lock; that hung this file once, rarely enough that no
/// test reproduces it on demand.
#[test]
fn one_engine_serves_several_threads_at_once() {
    let e = engine(false);
    // Enough rows (57+) that RoPE runs on the pool.
    let ids = e.tokenize(&format!("{TEXT} {TEXT} {TEXT}")).expect("tokenize");
    assert!(ids.len() >= 64);
    let want = e.embed(&ids).expect("embed");
    std::thread::scope(|s| {
        let handles: Vec<_> =
            (0..4).map(|_| s.spawn(|| (0..6).map(|_| e.embed(&ids).expect("embed")).collect::<Vec<_>>())).collect();
        for h in handles {
            for got in h.join().expect("thread") {
                assert!(max_rel_diff(&got, &want) < 1e-6, "the same prompt embeds alike from any thread");
            }
        }
    });
}

#[test]
fn gate_trains_on_a_local_corpus() {
    let start = Instant::now();
    let opts = CorpusOptions { max_windows: 3, window_bytes: 200, ..CorpusOptions::default() };
    let corpus = Corpus::gather_from(&default_sources(), &opts).expect("corpus");
    assert!(!corpus.windows.is_empty(), "no text found on this machine (missing: {:?})", corpus.missing);
    for c in Category::ALL {
        let n = corpus.windows.iter().filter(|w| w.category == c).count();
        assert!(n <= 3, "{c}: {n} windows");
        assert_eq!(n == 0, corpus.missing.contains(&c), "{c}: {n} windows, missing {:?}", corpus.missing);
    }
    assert!(corpus.split(true).count() > 0 && corpus.split(false).count() > 0);
    for w in &corpus.windows {
        eprintln!(
            "{:>12} {} {}",
            w.category.name(),
            if w.held_out { "held-out" } else { "train   " },
            w.source.display()
        );
    }

    let gathered = start.elapsed().as_secs_f64();
    let (normal, exact) = (engine(false), engine(true));
    let loaded = start.elapsed().as_secs_f64();
    let mut calls = 0;
    let samples = gate::samples_local(normal, &[normal, exact], &corpus, |done, total| {
        calls += 1;
        assert!(done <= total && total == corpus.windows.len());
    })
    .expect("samples");
    assert_eq!(calls, corpus.windows.len());
    assert_eq!(samples.len(), corpus.windows.len());
    for (s, w) in samples.iter().zip(&corpus.windows) {
        assert_eq!((s.category, s.held_out, s.bytes), (w.category, w.held_out, w.text.len()));
        assert_eq!(s.embedding.len(), normal.runner.config().dim);
        assert_eq!(s.logprobs.len(), 2);
        assert_eq!(s.logprobs[0].len(), s.logprobs[1].len(), "one tokenizer, one token count");
        assert!(s.logprobs.iter().flatten().all(|v| v.is_finite() && *v <= 1e-4));
    }

    let scored = start.elapsed().as_secs_f64();
    let g = gate::train(&samples, &[0, 0], &TrainOptions::default()).expect("train");
    let trained = start.elapsed().as_secs_f64();
    let r = g.report().clone();
    let held = r.held_out_bits_per_byte.expect("held-out windows");
    assert!(held.is_finite() && r.train_bits_per_byte.is_finite() && held > 0.0);
    assert_eq!(r.held_out_single.len(), 2);
    let worse = r.held_out_single.iter().copied().fold(f64::MIN, f64::max);
    assert!(held <= worse + 1e-9, "gate {held} bits/byte vs the worse expert's {worse}");
    // A text model's bits per byte on ordinary text: well under 8 (raw bytes).
    assert!(r.held_out_single.iter().all(|&b| b > 0.1 && b < 6.0), "{:?}", r.held_out_single);

    let emb = &samples[0].embedding;
    let w = g.weights(emb, 0b11).expect("weights");
    assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    let pred = g.predict_loss(emb).expect("predict");
    let table = g.expected_loss_table(emb, &pred).expect("table");
    assert_eq!(table[0], f64::INFINITY);
    assert!((table[1] - pred[0]).abs() < 1e-9 && (table[2] - pred[1]).abs() < 1e-9);
    assert!(table[3].is_finite());

    let text = g.to_json();
    assert!(Gate::from_json(&text, &["expert0", "expert1"]).is_ok());
    assert!(Gate::from_json(&text, &["smollm2", "smollm2-exact"]).is_err());
    eprintln!(
        "{} windows ({} held out, gathered by {gathered:.1} s, loaded by {loaded:.1} s, {} tokens scored by {scored:.1} s, trained by {trained:.1} s) in {:.1} s: held-out bits/byte gate {held:.4}, \
         experts {:?}, uniform {:?}",
        samples.len(),
        r.held_out_windows,
        samples.iter().map(|s| s.logprobs[0].len()).sum::<usize>(),
        start.elapsed().as_secs_f64(),
        r.held_out_single,
        r.held_out_uniform
    );
}
