//! BitStack: the top-k solver against a dense SVD, blocks summing to what was fitted,
//! the decode and prefill kernels against the scalar reference, and a synthetic model
//! whose memory budget grows and shrinks in place.

mod common;

use cairn::backend::cpu::bitstack::{rebuild_rows, stack_matvec_f32, stack_matvec_int8, stack_matvec_int8_many};
use cairn::backend::cpu::kernels::Isa;
use cairn::backend::cpu::CpuBackend;
use cairn::bench::weight_bytes_per_token;
use cairn::bitstack::build::{decompose, global_order, Proxy, StackStats};
use cairn::bitstack::linalg::{dense_svd, top_k, IterOptions};
use cairn::bitstack::{apply_budget, fixed_bytes, parse_size, DenseCache};
use cairn::model;
use cairn::synthetic::SplitMix;
use cairn_formats::bitstack::{Block, BlockShape};
use common::stack::{logits, small_model, stacked, stacked_with};

fn random(m: usize, n: usize, seed: u64) -> Vec<f32> {
    let mut r = SplitMix(seed);
    (0..m * n).map(|_| r.next_f32()).collect()
}

/// `U diag(s) Vᵀ` of the first `k` triplets.
fn rebuild(u: &[f32], s: &[f32], vt: &[f32], m: usize, n: usize, k: usize, ku: usize) -> Vec<f32> {
    let mut a = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            a[i * n + j] = (0..k).map(|r| u[i * ku + r] * s[r] * vt[r * n + j]).sum();
        }
    }
    a
}

fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let d: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let n: f32 = b.iter().map(|y| y * y).sum();
    (d / n.max(1e-30)).sqrt()
}

#[test]
fn dense_svd_reconstructs_its_matrix() {
    let (m, n) = (23, 17);
    let a = random(m, n, 1);
    let svd = dense_svd(&a, m, n);
    assert!(svd.s.windows(2).all(|w| w[0] >= w[1]), "descending");
    assert!(rel_diff(&rebuild(&svd.u, &svd.s, &svd.vt, m, n, n, n), &a) < 1e-4);
}

#[test]
fn top_k_matches_a_dense_svd() {
    for (m, n, k, seed) in [(40, 30, 5, 2), (30, 52, 4, 3), (64, 64, 16, 4), (20, 12, 12, 5)] {
        // |A| as BitStack sees it: one dominant triplet, then a random-looking tail.
        let a: Vec<f32> = random(m, n, seed).iter().map(|x| x.abs()).collect();
        let want = dense_svd(&a, m, n);
        let got = top_k(&a, m, n, k, IterOptions { tol: 1e-9, max_iters: 2000, seed: 9 });
        for r in 0..k {
            assert!((got.s[r] - want.s[r]).abs() <= 1e-4 * want.s[0], "{m}x{n} σ{r}: {} vs {}", got.s[r], want.s[r]);
        }
        let ak = rebuild(&want.u, &want.s, &want.vt, m, n, k, m.min(n));
        let bk = rebuild(&got.u, &got.s, &got.vt, m, n, k, k);
        assert!(rel_diff(&bk, &ak) < 2e-3, "{m}x{n} k{k}: rank-k approximations differ by {}", rel_diff(&bk, &ak));
    }
}

#[test]
fn weight_after_n_blocks_is_the_sum_of_the_blocks() {
    let (m, n, k, levels) = (24, 40, 3, 5);
    let w = random(m, n, 11);
    let shape = BlockShape::new(m, n, k).unwrap();
    let st = decompose("w", w.clone(), shape, levels, None, IterOptions::default(), &|| {}).unwrap();
    let energy: f32 = w.iter().map(|x| x * x).sum();
    let mut sum = vec![0f32; m * n];
    let mut last = f64::INFINITY;
    for l in 0..levels {
        Block::new(shape, &st.blocks[l]).unwrap().add_rows(0, &mut sum);
        let err: f32 = w.iter().zip(&sum).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / energy;
        // The residual the decomposition tracked is exactly W minus the stored blocks.
        assert!((err as f64 - st.rel_err[l]).abs() < 1e-4, "level {l}: {err} vs {}", st.rel_err[l]);
        assert!(st.rel_err[l] < last, "error must fall with every block");
        last = st.rel_err[l];
    }
    assert!(last < 0.5, "five blocks remove most of the energy: {last}");
}

#[test]
fn activation_weighted_errors_are_what_the_blocks_leave() {
    let (m, n, k, levels) = (20, 48, 4, 3);
    let w = random(m, n, 5);
    let a: Vec<f32> = (0..n).map(|j| 0.25 + (j % 7) as f32).collect();
    let shape = BlockShape::new(m, n, k).unwrap();
    let st = decompose("w", w.clone(), shape, levels, Some(&a), IterOptions::default(), &|| {}).unwrap();
    let mut sum = vec![0f32; m * n];
    for l in 0..=levels {
        if l > 0 {
            Block::new(shape, &st.blocks[l - 1]).unwrap().add_rows(0, &mut sum);
        }
        let (mut e, mut ea) = (0f64, 0f64);
        for i in 0..m {
            for j in 0..n {
                let r = (w[i * n + j] - sum[i * n + j]) as f64;
                e += r * r;
                ea += r * r * (a[j] as f64).powi(2);
            }
        }
        assert!((st.energy[l] - e).abs() <= 1e-4 * st.energy[0], "level {l}: {} vs {e}", st.energy[l]);
        assert!((st.energy_act[l] - ea).abs() <= 1e-4 * st.energy_act[0], "level {l}: {} vs {ea}", st.energy_act[l]);
    }
    // The proxy is the activation-weighted error each block removes, per byte.
    for l in 0..levels {
        let want = (st.energy_act[l] - st.energy_act[l + 1]) / shape.page_bytes() as f64;
        assert!((st.gain[l] - want).abs() <= 1e-9 * want.abs().max(1e-30));
    }
}

#[test]
fn the_file_keeps_the_errors_its_order_came_from() {
    let a = stacked(&small_model(), 3);
    let stack = a.stack.as_ref().unwrap();
    let levels: Vec<usize> = stack.weights.iter().map(|w| w.levels()).collect();
    let stats = StackStats::from_file(&a, &levels).expect("errors stored");
    assert!(stats.energy.iter().all(|e| e.len() == 4 && e.windows(2).all(|p| p[1] < p[0])));
    // No calibration: no residual statistics, so the file was ordered by the activation proxy.
    assert!(stats.residual_weight.iter().all(|&w| w == 0.0));
    let pages: Vec<u64> = stack.weights.iter().map(|w| w.shape.page_bytes()).collect();
    let order = global_order(&stats.gains(Proxy::Activation, &pages));
    let table: Vec<(usize, usize)> =
        stack.table.entries.iter().map(|e| (e.matrix as usize, e.level as usize)).collect();
    assert_eq!(order, table);
}

#[test]
fn kernels_match_the_scalar_reference() {
    for (m, n, k) in [(70, 64, 16), (20, 72, 16), (16, 36, 8), (33, 20, 5)] {
        let shape = BlockShape::new(m, n, k).unwrap();
        let st = decompose("w", random(m, n, 21), shape, 2, None, IterOptions::default(), &|| {}).unwrap();
        let blocks: Vec<Block<'_>> = st.blocks.iter().map(|b| Block::new(shape, b).unwrap()).collect();
        let mut dense = vec![0f32; m * n];
        for b in &blocks {
            b.add_rows(0, &mut dense);
        }
        let x = random(1, n, 5);
        let want: Vec<f32> = dense.chunks(n).map(|r| r.iter().zip(&x).map(|(a, b)| a * b).sum()).collect();
        // The f32 tables (the exact path) equal the dense product to float rounding.
        for isa in [Isa::Scalar, Isa::detect()] {
            let mut y = vec![0f32; m];
            for b in &blocks {
                stack_matvec_f32(isa, std::slice::from_ref(b), &x, &mut y);
            }
            assert!(rel_diff(&y, &want) < 1e-5, "{m}x{n} k{k} {isa:?}: {}", rel_diff(&y, &want));
        }
        let f =
            |b: &[u8]| -> Vec<f32> { b.chunks(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect() };
        let us: Vec<Vec<f32>> = blocks.iter().map(|b| f(b.u_bytes())).collect();
        let vs: Vec<Vec<f32>> = blocks.iter().map(|b| f(b.v_bytes())).collect();
        let mut tile = vec![0f32; 7 * n];
        rebuild_rows(&blocks, &us, &vs, 3, &mut tile);
        assert!(rel_diff(&tile, &dense[3 * n..10 * n]) < 1e-6);
    }
}

/// The int8 tables (kernels/lut.rs) on odd shapes: rows not a multiple of 8 (the scalar
/// tail), sign rows not a multiple of 8 bytes (the padded tail), several scale segments,
/// and ranks with and without an AVX2 instance. The SIMD rows equal the scalar reference
/// to float rounding (1e-5 relative: the integer sums are exact, only the order of the
/// f32 scale and u products differs); both stay within 2% of the f32 tables, the cost of
/// rounding each table entry to int8 with a scale per rank and 256 inputs.
#[test]
fn int8_tables_match_the_scalar_reference() {
    for (m, n, k) in [(70, 64, 16), (21, 72, 8), (37, 300, 16), (19, 1100, 4), (33, 20, 5), (16, 36, 8), (45, 520, 4)] {
        let shape = BlockShape::new(m, n, k).unwrap();
        let st = decompose("w", random(m, n, 31), shape, 3, None, IterOptions::default(), &|| {}).unwrap();
        let blocks: Vec<Block<'_>> = st.blocks.iter().map(|b| Block::new(shape, b).unwrap()).collect();
        let x = random(1, n, 7);
        let mut exact = vec![0f32; m];
        stack_matvec_f32(Isa::Scalar, &blocks, &x, &mut exact);
        let mut reference = vec![0f32; m];
        stack_matvec_int8(Isa::Scalar, &blocks, &x, &mut reference);
        let int8_err = rel_diff(&reference, &exact);
        assert!(int8_err < 2e-2, "{m}x{n} k{k}: int8 tables {int8_err} from f32");
        assert!(int8_err > 0.0, "{m}x{n} k{k}: int8 tables should round");
        for isa in Isa::available() {
            // Accumulates into y, as every caller relies on.
            let mut y = vec![0.5f32; m];
            stack_matvec_int8(isa, &blocks, &x, &mut y);
            let y: Vec<f32> = y.iter().map(|v| v - 0.5).collect();
            let err = rel_diff(&y, &reference);
            assert!(err < 1e-5, "{m}x{n} k{k} {isa:?}: {err} from the scalar int8 reference");
        }
    }
}

/// Weights of one input sharing a table pass and a row pass (q, k, v; gate, up) give
/// each weight exactly what its own pass gives: rows are independent of how the pass
/// splits them, and every block's tables are the same.
#[test]
fn shared_passes_equal_one_weight_at_a_time() {
    let n = 200;
    let shapes = [(24usize, 4usize, 3usize), (67, 8, 2), (16, 4, 4)];
    let stacks: Vec<(BlockShape, Vec<Vec<u8>>)> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(m, k, levels))| {
            let shape = BlockShape::new(m, n, k).unwrap();
            let st = decompose("w", random(m, n, 40 + i as u64), shape, levels, None, IterOptions::default(), &|| {})
                .unwrap();
            (shape, st.blocks)
        })
        .collect();
    let blocks: Vec<Vec<Block<'_>>> =
        stacks.iter().map(|(shape, bs)| bs.iter().map(|b| Block::new(*shape, b).unwrap()).collect()).collect();
    let sets: Vec<&[Block<'_>]> = blocks.iter().map(|b| b.as_slice()).collect();
    let x = random(1, n, 9);
    for isa in Isa::available() {
        let mut outs: Vec<Vec<f32>> = shapes.iter().map(|&(m, ..)| vec![0.25f32; m]).collect();
        let mut ys: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        stack_matvec_int8_many(isa, &sets, &x, &mut ys);
        for (w, (bs, got)) in blocks.iter().zip(&outs).enumerate() {
            let mut want = vec![0.25f32; got.len()];
            stack_matvec_int8(isa, bs, &x, &mut want);
            assert_eq!(got, &want, "{isa:?} weight {w}");
        }
    }
}

#[test]
fn global_order_keeps_the_level_rule_and_prefers_gain() {
    let gains = vec![vec![5.0, 4.0, 3.0, 2.9], vec![1.0, 0.5, 0.4, 0.3], vec![9.0, 0.1, 0.05, 0.01]];
    let order = global_order(&gains);
    assert_eq!(order.len(), 12);
    assert_eq!(&order[..3], &[(2, 0), (0, 0), (1, 0)], "level 0 of every matrix first, by gain");
    assert_eq!(order[3], (0, 1));
    let mut have = [0usize; 3];
    for &(m, l) in &order {
        assert_eq!(l, have[m]);
        assert!(l <= have.iter().min().unwrap() + 1, "level {l} of {m} before every matrix has {}", l - 1);
        have[m] += 1;
    }
}

#[test]
fn live_budget_changes_equal_a_fresh_load() {
    let src = small_model();
    let ids: Vec<u32> = (0..12).map(|i| (i * 5 % 90) as u32).collect();
    let a = stacked(&src, 4);
    let stack = a.stack.as_ref().unwrap();
    let runner = model::load(&a, CpuBackend::new(2).unwrap()).unwrap();
    let cfg = runner.config().clone();
    let (dense, kv, scratch) = cairn::bitstack::fixed_bytes(&a, &cfg, 64);
    let t = &stack.table;
    let small = dense + kv + scratch + t.prefix_bytes(t.min_prefix() + 5);
    let big = dense + kv + scratch + t.prefix_bytes(t.entries.len());

    let p = apply_budget(&a, &cfg, 64, 0, small).unwrap();
    assert_eq!(p.blocks, t.min_prefix() + 5);
    let at_small = logits(runner.as_ref(), &ids);
    let grown = apply_budget(&a, &cfg, 64, 0, big).unwrap();
    // Only the blocks that joined were read.
    let joined: u64 = t.entries[p.blocks..].iter().map(|e| a.tensors[e.tensor as usize].size).sum();
    assert_eq!(grown.change.bytes_read, joined);
    assert_eq!(grown.blocks, t.entries.len());
    let at_big = logits(runner.as_ref(), &ids);
    assert_ne!(at_small, at_big, "more blocks change the model");
    let shrunk = apply_budget(&a, &cfg, 64, 0, small).unwrap();
    assert_eq!(shrunk.change.bytes_read, 0);
    assert!(shrunk.change.bytes_released > 0);
    let after = logits(runner.as_ref(), &ids);

    // Prefill (rebuilt tiles, 8-bit) agrees with the f32 reference path at this budget.
    let reference = model::load(&a, CpuBackend::reference(1).unwrap()).unwrap();
    let exact = logits(reference.as_ref(), &ids);
    assert!(rel_diff(&at_small, &exact) < 0.05, "integer vs f32 path: {}", rel_diff(&at_small, &exact));

    // A fresh load at the small budget gives the same logits, bit for bit.
    let b = stacked(&src, 4);
    let fresh = model::load(&b, CpuBackend::new(2).unwrap()).unwrap();
    apply_budget(&b, &cfg, 64, 0, small).unwrap();
    assert_eq!(after, logits(fresh.as_ref(), &ids));
    assert_eq!(after, at_small);

    // More blocks bring the logits closer to the source model's.
    let full = logits(model::load(&src, CpuBackend::reference(1).unwrap()).unwrap().as_ref(), &ids);
    assert!(
        rel_diff(&at_big, &full) < rel_diff(&at_small, &full),
        "{} vs {}",
        rel_diff(&at_big, &full),
        rel_diff(&at_small, &full)
    );
}

/// `cairn bench`'s decode bytes per token count each block in use once: growing the
/// stack adds exactly the bytes of the blocks that joined, and the whole stack reads no
/// more than the file's tensors.
#[test]
fn bench_counts_the_blocks_in_use_once() {
    let src = small_model();
    let a = stacked(&src, 4);
    let stack = a.stack.as_ref().unwrap();
    stack.set_dense_cache(DenseCache::Off);
    let runner = model::load(&a, CpuBackend::new(1).unwrap()).unwrap();
    let cfg = runner.config().clone();
    let (dense, kv, scratch) = fixed_bytes(&a, &cfg, 64);
    let t = &stack.table;
    let at = |blocks: usize| {
        apply_budget(&a, &cfg, 64, 0, dense + kv + scratch + t.prefix_bytes(blocks)).unwrap();
        weight_bytes_per_token(&a) as u64
    };
    let (lo, hi) = (at(t.min_prefix()), at(t.entries.len()));
    let joined: u64 = t.entries[t.min_prefix()..].iter().map(|e| a.tensors[e.tensor as usize].size).sum();
    assert_eq!(hi - lo, joined);
    let tensors: u64 = a.tensors.iter().map(|t| t.size).sum();
    assert!(hi <= tensors, "{hi} bytes per token from {tensors} bytes of tensors");
}

#[test]
fn bad_budgets_are_refused_with_the_minimum() {
    let a = stacked(&small_model(), 2);
    let runner = model::load(&a, CpuBackend::new(1).unwrap()).unwrap();
    let cfg = runner.config().clone();
    let (dense, kv, scratch) = cairn::bitstack::fixed_bytes(&a, &cfg, 64);
    let t = &a.stack.as_ref().unwrap().table;
    let min = dense + kv + scratch + t.prefix_bytes(t.min_prefix());
    let err = apply_budget(&a, &cfg, 64, 0, min - 1).unwrap_err().to_string();
    assert!(err.contains("below the minimum") && err.contains(&format!("{:.1} MB", min as f64 / 1e6)), "{err}");
    assert_eq!(apply_budget(&a, &cfg, 64, 0, min).unwrap().blocks, t.min_prefix());
    for bad in ["", "MB", "12 parsecs", "-5MB", "0"] {
        assert!(parse_size(bad).is_err(), "{bad:?} accepted");
    }
    assert_eq!(parse_size("90MB").unwrap(), 90_000_000);
    assert_eq!(parse_size("1.5 GiB").unwrap(), 1_610_612_736);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// Any budget: refused exactly when below the minimum; otherwise the plan never
    /// exceeds it and one more block of the table would.
    #[test]
    fn budgets_choose_the_longest_prefix_that_fits(extra in 0u64..400_000, below in proptest::bool::ANY) {
        let a = stacked(&small_model(), 3);
        let runner = model::load(&a, CpuBackend::new(1).unwrap()).unwrap();
        let cfg = runner.config().clone();
        let (dense, kv, scratch) = cairn::bitstack::fixed_bytes(&a, &cfg, 32);
        let t = &a.stack.as_ref().unwrap().table;
        let min = dense + kv + scratch + t.prefix_bytes(t.min_prefix());
        let budget = if below { min.saturating_sub(1 + extra) } else { min + extra };
        match apply_budget(&a, &cfg, 32, 0, budget) {
            Err(e) => proptest::prop_assert!(budget < min, "refused {budget} ≥ minimum {min}: {e}"),
            Ok(p) => {
                proptest::prop_assert!(budget >= min);
                let used = dense + kv + scratch + t.prefix_bytes(p.blocks);
                proptest::prop_assert!(used <= budget);
                if p.blocks < t.entries.len() {
                    proptest::prop_assert!(dense + kv + scratch + t.prefix_bytes(p.blocks + 1) > budget);
                }
                let counts = t.counts(p.blocks);
                let active: Vec<usize> = a.stack.as_ref().unwrap().weights.iter().map(|w| w.active()).collect();
                proptest::prop_assert_eq!(counts, active);
            }
        }
    }
}

/// Sum of a matrix's blocks in f32, by the scalar reference.
fn blocks_sum(w: &cairn::bitstack::StackWeight) -> Vec<f32> {
    let mut sum = vec![0f32; w.shape.m * w.shape.n];
    for l in 0..w.levels() {
        w.block(l).add_rows(0, &mut sum);
    }
    sum
}

#[test]
fn dense_copies_match_the_blocks_and_survive_live_changes() {
    let src = small_model();
    let ids: Vec<u32> = (0..12).map(|i| (i * 7 % 90) as u32).collect();
    let a = stacked(&src, 4);
    let ra = model::load(&a, CpuBackend::new(2).unwrap()).unwrap();
    let cfg = ra.config().clone();
    let (dense, kv, scratch) = cairn::bitstack::fixed_bytes(&a, &cfg, 64);
    let t = &a.stack.as_ref().unwrap().table;
    let all = dense + kv + scratch + t.prefix_bytes(t.entries.len());
    apply_budget(&a, &cfg, 64, 0, all).unwrap();
    let from_blocks = logits(ra.as_ref(), &ids);

    // The same budget with copies: every matrix whose blocks outweigh a Q8_0 copy runs
    // from one, built from all its levels, and the stack takes fewer bytes.
    let b = stacked_with(&src, 4, DenseCache::Auto);
    let stack = b.stack.as_ref().unwrap();
    let rb = model::load(&b, CpuBackend::new(2).unwrap()).unwrap();
    let plan = apply_budget(&b, &cfg, 64, 0, all).unwrap();
    assert!(plan.change.dense_matrices > 0);
    assert!(plan.change.stack_bytes < t.prefix_bytes(t.entries.len()));
    for w in &stack.weights {
        let d = w.dense().expect("at 4 levels every matrix outweighs its copy here");
        assert_eq!(w.active(), w.levels());
        assert_eq!(d.held_bytes(), w.dense_bytes().unwrap());
        assert_eq!(d.bytes().len(), w.shape.m * w.shape.n / 32 * 34);
        // The copy is the blocks' sum rounded to Q8_0: within half a step of each row block.
        let want = blocks_sum(w);
        let rows = if d.packed {
            cairn::backend::cpu::kernels::repack::unpack(
                cairn_formats::GgmlType::Q8_0,
                d.bytes(),
                w.shape.m,
                d.row_bytes,
            )
        } else {
            d.bytes().to_vec()
        };
        let mut got = vec![0f32; want.len()];
        cairn_formats::quant::dequantize(cairn_formats::GgmlType::Q8_0, &rows, &mut got).unwrap();
        for (g, wv) in got.chunks(32).zip(want.chunks(32)) {
            let amax = wv.iter().fold(0f32, |m, x| m.max(x.abs()));
            let tol = amax / 127.0 * 0.5 + amax * 1e-3 + 1e-6;
            for (x, y) in g.iter().zip(wv) {
                assert!((x - y).abs() <= tol, "{}: {x} vs {y} (tolerance {tol})", w.name);
            }
        }
    }
    let from_copies = logits(rb.as_ref(), &ids);
    let d = rel_diff(&from_copies, &from_blocks);
    eprintln!("copies vs blocks: relative logit difference {d}");
    assert!(d < 0.02, "copies vs blocks: relative logit difference {d}");

    // Shrink until matrices leave their copies, then grow back: the same logits as
    // before, and a fresh load at the small budget agrees bit for bit.
    let small = dense + kv + scratch + stack.prefix_cost(t.min_prefix() + 3);
    let shrunk = apply_budget(&b, &cfg, 64, 0, small).unwrap();
    assert!(shrunk.change.dense_matrices < plan.change.dense_matrices);
    assert!(shrunk.change.bytes_released > 0);
    let at_small = logits(rb.as_ref(), &ids);
    let regrown = apply_budget(&b, &cfg, 64, 0, all).unwrap();
    assert_eq!(regrown.change.dense_matrices, plan.change.dense_matrices);
    assert_eq!(logits(rb.as_ref(), &ids), from_copies);
    let c = stacked_with(&src, 4, DenseCache::Auto);
    let rc = model::load(&c, CpuBackend::new(2).unwrap()).unwrap();
    apply_budget(&c, &cfg, 64, 0, small).unwrap();
    assert_eq!(logits(rc.as_ref(), &ids), at_small);

    // The f32 reference path runs the copies too, close to the integer path.
    let reference = model::load(&b, CpuBackend::reference(1).unwrap()).unwrap();
    let exact = logits(reference.as_ref(), &ids);
    assert!(rel_diff(&from_copies, &exact) < 0.05, "integer vs f32 path: {}", rel_diff(&from_copies, &exact));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(16))]

    /// With copies: any budget at or above the minimum is never exceeded (copies counted
    /// at their real size), one more block would exceed it, and every matrix runs from
    /// a copy exactly when its blocks would outweigh the copy.
    #[test]
    fn budgets_with_copies_never_go_over(extra in 0u64..400_000) {
        let a = stacked_with(&small_model(), 3, DenseCache::Auto);
        let stack = a.stack.as_ref().unwrap();
        let runner = model::load(&a, CpuBackend::new(1).unwrap()).unwrap();
        let cfg = runner.config().clone();
        let (dense, kv, scratch) = cairn::bitstack::fixed_bytes(&a, &cfg, 32);
        let t = &stack.table;
        let fixed = dense + kv + scratch;
        let budget = fixed + stack.prefix_cost(t.min_prefix()) + extra;
        let p = apply_budget(&a, &cfg, 32, 0, budget).unwrap();
        // What is really held: copies' bytes plus active blocks' pages.
        let held: u64 = stack.weights.iter().map(|w| match w.dense() {
            Some(d) => d.held_bytes(),
            None => w.active() as u64 * w.shape.page_bytes(),
        }).sum();
        proptest::prop_assert_eq!(held, p.change.stack_bytes);
        proptest::prop_assert!(fixed + held <= budget, "{} over", fixed + held - budget);
        if p.blocks < t.entries.len() {
            proptest::prop_assert!(fixed + stack.prefix_cost(p.blocks + 1) > budget);
        }
        for (i, (w, c)) in stack.weights.iter().zip(t.counts(p.blocks)).enumerate() {
            let copy = stack.matrix_cost(i, c).1;
            proptest::prop_assert_eq!(w.dense().is_some(), copy);
            proptest::prop_assert_eq!(w.active(), if copy { w.levels() } else { c });
        }
    }
}
