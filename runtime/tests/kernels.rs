//! Every SIMD kernel against the scalar reference, and the reference against plain f32
//! arithmetic, on random inputs of awkward sizes.

use cairn::backend::cpu::kernels::{self, Isa, Q8Acts, QK};
use cairn::synthetic::SplitMix;
use cairn_formats::{quant, GgmlType};

const TYPES: [GgmlType; 5] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0];
const K_TYPES: [GgmlType; 3] = [GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K];

fn random(rng: &mut SplitMix, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.next_f32() * scale).collect()
}

/// Random weights, encoded row by row (FineQuant rows may end in a short group).
fn weights(rng: &mut SplitMix, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let rb = ty.row_bytes(cols as u64).unwrap() as usize;
    let mut w = vec![0u8; rows * rb];
    let x = random(rng, rows * cols, 0.5);
    for (dst, src) in w.chunks_exact_mut(rb).zip(x.chunks_exact(cols)) {
        quant::quantize(ty, src, dst).unwrap();
    }
    w
}

/// The ggml types with integer kernels and every FineQuant type.
fn all_types() -> Vec<GgmlType> {
    TYPES.into_iter().chain(fine_types()).collect()
}

fn close(a: f32, b: f32, what: &str) {
    let tol = 1e-5 * b.abs().max(1.0);
    assert!((a - b).abs() <= tol, "{what}: {a} vs reference {b}");
}

/// The scalar kernel on one row computes w · x̂ for the 8-bit activations x̂, up to
/// ggml's f16 rounding of the per-block sums that asymmetric types' min term uses;
/// returns the kernel's result.
fn check_scalar_row(ty: GgmlType, w: &[u8], x: &[f32]) -> f32 {
    let cols = x.len();
    let mut q = Q8Acts::default();
    q.quantize(x, 1, cols);
    let xh: Vec<f32> = (0..cols).map(|i| q.qs[i] as f32 * q.d[i / QK]).collect();
    let mut wf = vec![0f32; cols];
    quant::dequantize(ty, w, &mut wf).unwrap();
    let want: f64 = wf.iter().zip(&xh).map(|(a, b)| *a as f64 * *b as f64).sum();
    let size: f64 = wf.iter().zip(&xh).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
    let mut got = [0f32];
    kernels::matvec(Isa::Scalar, ty, w, w.len(), q.row(0), &mut got);
    assert!((got[0] as f64 - want).abs() < 1e-3 * size, "{ty}: {} vs {want}", got[0]);
    got[0]
}

#[test]
fn scalar_reference_equals_f32_math() {
    let mut rng = SplitMix(1);
    for ty in TYPES {
        let cols = 96;
        let w = weights(&mut rng, ty, 1, cols);
        let x = random(&mut rng, cols, 3.0);
        let got = check_scalar_row(ty, &w, &x);
        // And the 8-bit activations stay close to the exact ones.
        let mut wf = vec![0f32; cols];
        quant::dequantize(ty, &w, &mut wf).unwrap();
        let exact: f64 = wf.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
        let scale: f64 = wf.iter().zip(&x).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
        assert!((got as f64 - exact).abs() < 0.02 * scale, "{ty}: 8-bit activations drift too far");
    }
}

#[test]
fn simd_matvec_equals_scalar() {
    let mut rng = SplitMix(2);
    for isa in Isa::available() {
        for ty in all_types() {
            for (rows, cols) in [(1, 32), (3, 64), (4, 96), (7, 576), (13, 160), (9, 1536)] {
                let w = weights(&mut rng, ty, rows, cols);
                let rb = w.len() / rows;
                let mut q = Q8Acts::default();
                q.quantize(&random(&mut rng, cols, 2.0), 1, cols);
                let (mut got, mut want) = (vec![0f32; rows], vec![0f32; rows]);
                kernels::matvec(isa, ty, &w, rb, q.row(0), &mut got);
                kernels::matvec(Isa::Scalar, ty, &w, rb, q.row(0), &mut want);
                for r in 0..rows {
                    close(got[r], want[r], &format!("{} {ty} matvec {rows}x{cols} row {r}", isa.name()));
                }
            }
        }
    }
}

#[test]
fn simd_matmul_equals_scalar() {
    let mut rng = SplitMix(3);
    for isa in Isa::available() {
        for ty in all_types() {
            for (rows, n, cols) in [(4, 4, 32), (5, 7, 64), (8, 3, 96), (9, 9, 576), (1, 6, 32)] {
                let w = weights(&mut rng, ty, rows, cols);
                let rb = w.len() / rows;
                let mut q = Q8Acts::default();
                q.quantize(&random(&mut rng, n * cols, 2.0), n, cols);
                let (mut got, mut want) = (vec![0f32; rows * n], vec![0f32; rows * n]);
                kernels::matmul(isa, ty, &w, rb, &q, &mut got);
                kernels::matmul(Isa::Scalar, ty, &w, rb, &q, &mut want);
                for i in 0..rows * n {
                    close(got[i], want[i], &format!("{} {ty} matmul {rows}x{n}x{cols} at {i}", isa.name()));
                }
            }
        }
    }
}

#[test]
fn activation_quantization_round_trips() {
    let mut rng = SplitMix(4);
    let x = random(&mut rng, 4 * 64, 10.0);
    let mut q = Q8Acts::default();
    q.quantize(&x, 4, 64);
    for (i, v) in x.iter().enumerate() {
        let d = q.d[i / QK];
        // Half a step, plus the f16 rounding of the scale over 127 steps.
        assert!((q.qs[i] as f32 * d - v).abs() <= d * 0.57 + 1e-6, "value {i}");
    }
    for b in 0..q.d.len() {
        assert_eq!(q.sum[b], q.qs[b * QK..(b + 1) * QK].iter().map(|&v| v as i32).sum::<i32>());
        assert_eq!(q.sum16[b], q.qs[b * QK..b * QK + 16].iter().map(|&v| v as i32).sum::<i32>());
        assert!((q.s[b] - q.d[b] * q.sum[b] as f32).abs() <= 2e-3 * q.s[b].abs() + 1e-6);
    }
    // All zeros: scale zero, no NaN.
    q.quantize(&[0.0; 32], 1, 32);
    assert_eq!(q.d[0], 0.0);
    assert!(q.qs.iter().all(|&v| v == 0));
}

/// Every instruction set quantizes activations exactly as the scalar reference does,
/// ties (values landing on half steps) included.
#[test]
fn simd_quantization_equals_scalar() {
    let mut rng = SplitMix(41);
    let mut x = random(&mut rng, 7 * 96, 3.0);
    // Block 1: exact ties at ±k.5 steps of 127/amax = 1 (amax = 127).
    for (i, v) in x[32..64].iter_mut().enumerate() {
        *v = if i == 0 { 127.0 } else { (i as f32 - 16.0) + 0.5 };
    }
    x[64..96].fill(0.0);
    let mut want = Q8Acts::default();
    want.quantize_with(Isa::Scalar, &x, 7, 96);
    for isa in Isa::available() {
        let mut got = Q8Acts::default();
        got.quantize_with(isa, &x, 7, 96);
        assert_eq!(got.qs, want.qs, "{} values", isa.name());
        assert_eq!(got.sum, want.sum, "{} sums", isa.name());
        assert_eq!(got.sum16, want.sum16, "{} half sums", isa.name());
        assert_eq!(got.d, want.d, "{} scales", isa.name());
        assert_eq!(got.s, want.s, "{} d·sum", isa.name());
    }
}

/// The f16 attention kernels equal converting each cached row and running the f32
/// dot and axpy on it: the values bit for bit (same order of sums), the scores to float
/// rounding (eight keys' dot products are reduced together); odd head sizes and key
/// counts off the tile of 8 included.
#[test]
fn f16_attention_kernels_equal_converted_rows() {
    use half::f16;
    let mut rng = SplitMix(43);
    for isa in Isa::available() {
        for (heads, hd, n, stride) in
            [(3, 64, 17, 192), (1, 256, 5, 256), (2, 40, 9, 100), (4, 8, 1, 8), (2, 300, 3, 300), (4, 36, 24, 40)]
        {
            let q = random(&mut rng, heads * hd, 1.0);
            let k: Vec<f16> = random(&mut rng, n * stride, 1.0).into_iter().map(f16::from_f32).collect();
            let mut got = vec![0f32; heads * n];
            kernels::scores_f16(isa, &q, heads, hd, &k, stride, n, 0.125, &mut got);
            let p = random(&mut rng, heads * n, 1.0);
            let (mut o, mut want_o) = (random(&mut rng, heads * hd, 1.0), Vec::new());
            want_o.clone_from(&o);
            kernels::values_f16(isa, &p, heads, hd, &k, stride, n, &mut o);
            for j in 0..n {
                let row: Vec<f32> = k[j * stride..j * stride + hd].iter().map(|x| x.to_f32()).collect();
                for h in 0..heads {
                    let want = kernels::dot_f32(isa, &q[h * hd..(h + 1) * hd], &row) * 0.125;
                    close(got[h * n + j], want, &format!("{} scores {heads}x{hd} key {j}", isa.name()));
                    kernels::axpy(isa, &mut want_o[h * hd..(h + 1) * hd], p[h * n + j], &row);
                }
            }
            assert_eq!(o, want_o, "{} values {heads}x{hd}x{n}", isa.name());
        }
        let mut x = random(&mut rng, 37, 100.0);
        let want: Vec<f32> = x.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        kernels::round_f16_slice(isa, &mut x);
        assert_eq!(x, want, "{} f16 rounding", isa.name());
    }
}

/// Which instruction sets the comparisons above ran on (`--nocapture` shows it);
/// `CAIRN_EXPECT_ISA=neon` (set by `.ci/aarch64`) fails the run when that one is missing,
/// so an emulator without the extension cannot skip the SIMD checks unnoticed.
#[test]
fn isa_available() {
    let names: Vec<&str> = Isa::available().into_iter().map(Isa::name).collect();
    eprintln!("Isa::available() = {names:?}, detected {}", Isa::detect().name());
    if let Ok(want) = std::env::var("CAIRN_EXPECT_ISA") {
        assert!(names.contains(&want.as_str()), "CAIRN_EXPECT_ISA={want} but only {names:?} available");
    }
}

#[test]
fn repack_round_trips_and_refuses_odd_shapes() {
    use cairn::backend::cpu::kernels::repack;
    let mut rng = SplitMix(5);
    for ty in TYPES {
        for (rows, cols) in [(8, 32), (16, 96), (24, 576)] {
            let w = weights(&mut rng, ty, rows, cols);
            let rb = w.len() / rows;
            let p = repack::repack(ty, &w, rows, rb).expect("repackable");
            assert_eq!(p.len(), w.len());
            assert_eq!(repack::unpack(ty, &p, rows, rb), w, "{ty} {rows}x{cols}");
        }
        let w = weights(&mut rng, ty, 12, 64);
        assert!(repack::repack(ty, &w, 12, w.len() / 12).is_none(), "12 rows are not whole groups of 8");
    }
    for ty in K_TYPES {
        for (rows, cols) in [(8, 256), (16, 768)] {
            let w = weights(&mut rng, ty, rows, cols);
            let rb = w.len() / rows;
            let p = repack::repack(ty, &w, rows, rb).expect("repackable");
            assert_eq!(p.len(), w.len());
            assert_ne!(p, w, "{ty}: the layout changed");
            assert_eq!(repack::unpack(ty, &p, rows, rb), w, "{ty} {rows}x{cols}");
        }
    }
    let w = weights(&mut rng, GgmlType::F16, 8, 64);
    assert!(repack::repack(GgmlType::F16, &w, 8, w.len() / 8).is_none(), "F16 has no repacked layout");
}

#[test]
fn repacked_kernels_equal_scalar() {
    use cairn::backend::cpu::kernels::repack;
    let mut rng = SplitMix(6);
    let k_shapes = [(8, 1, 256), (16, 3, 512), (8, 8, 256), (24, 11, 768), (8, 16, 256)];
    let shapes = [
        (8, 1, 32),
        (16, 1, 576),
        (8, 2, 32),
        (8, 3, 64),
        (24, 4, 96),
        (16, 7, 64),
        (8, 8, 32),
        (16, 9, 1536),
        (8, 11, 96),
        (64, 5, 576),
        (16, 16, 576),
        (8, 19, 64),
    ];
    let cases: Vec<(GgmlType, (usize, usize, usize))> = K_TYPES
        .into_iter()
        .flat_map(|ty| k_shapes.into_iter().map(move |s| (ty, s)))
        .chain(TYPES.into_iter().flat_map(|ty| shapes.into_iter().map(move |s| (ty, s))))
        .collect();
    for isa in Isa::available().into_iter().filter(|&i| kernels::has_packed(i)) {
        for &(ty, (rows, n, cols)) in &cases {
            let w = weights(&mut rng, ty, rows, cols);
            let rb = w.len() / rows;
            let p = repack::repack(ty, &w, rows, rb).expect("repackable");
            let mut q = Q8Acts::default();
            q.quantize(&random(&mut rng, n * cols, 2.0), n, cols);
            let (mut got, mut want) = (vec![0f32; rows * n], vec![0f32; rows * n]);
            kernels::packed(isa, ty, &p, rows, &q, &mut got);
            kernels::matmul(Isa::Scalar, ty, &w, rb, &q, &mut want);
            for i in 0..rows * n {
                close(got[i], want[i], &format!("{} repacked {ty} {rows}x{n}x{cols} at {i}", isa.name()));
            }
        }
    }
}

/// The k-quants (Q4_K, Q5_K: a scale and min per 32 values; Q6_K: a scale per 16)
/// through the same kernels: the scalar reference against f32 math on the dequantized
/// weights (1e-4 of Σ|w·x|), and every SIMD version against the scalar reference (1e-5
/// relative, [`close`]), on row counts off the tiles of 4 and 8.
#[test]
fn k_quant_kernels() {
    let mut rng = SplitMix(7);
    for ty in K_TYPES {
        for (rows, n, cols) in [(1, 1, 256), (5, 3, 512), (8, 4, 1536), (13, 6, 256), (3, 9, 768)] {
            let w = weights(&mut rng, ty, rows, cols);
            let rb = w.len() / rows;
            let mut q = Q8Acts::default();
            q.quantize(&random(&mut rng, n * cols, 2.0), n, cols);
            let mut want = vec![0f32; rows * n];
            kernels::matmul(Isa::Scalar, ty, &w, rb, &q, &mut want);
            // Scalar reference = dequantized weights · dequantized activations.
            let mut wf = vec![0f32; rows * cols];
            quant::dequantize(ty, &w, &mut wf).unwrap();
            for r in 0..rows {
                for t in 0..n {
                    let xh = |i: usize| q.qs[t * cols + i] as f64 * q.d[(t * cols + i) / QK] as f64;
                    let exact: f64 = (0..cols).map(|i| wf[r * cols + i] as f64 * xh(i)).sum();
                    let size: f64 = (0..cols).map(|i| (wf[r * cols + i] as f64 * xh(i)).abs()).sum();
                    let got = want[t * rows + r] as f64;
                    assert!(
                        (got - exact).abs() < 1e-4 * size.max(1e-3),
                        "{ty} scalar {rows}x{n}x{cols} ({r},{t}): {got} vs {exact}"
                    );
                }
            }
            for isa in Isa::available().into_iter().filter(|&i| kernels::supports(i, ty)) {
                let mut got = vec![0f32; rows * n];
                kernels::matmul(isa, ty, &w, rb, &q, &mut got);
                for i in 0..rows * n {
                    close(got[i], want[i], &format!("{} {ty} matmul {rows}x{n}x{cols} at {i}", isa.name()));
                }
                let mut one = vec![0f32; rows];
                kernels::matvec(isa, ty, &w, rb, q.row(0), &mut one);
                for r in 0..rows {
                    close(one[r], want[r], &format!("{} {ty} matvec {rows}x{cols} row {r}", isa.name()));
                }
            }
        }
    }
}

/// Every FineQuant code width, symmetric and not, with groups that divide the rows and
/// groups that leave a short last group (576 = 4·128 + 64).
fn fine_types() -> Vec<GgmlType> {
    let mut v = Vec::new();
    for (bits, sym) in [(2u8, false), (3, false), (4, false), (4, true), (8, true)] {
        for group in [32, 64, 96, 128, 256] {
            v.push(GgmlType::Fine(cairn_formats::FineType::new(bits, sym, group).unwrap()));
        }
    }
    v
}

#[test]
fn fine_scalar_kernel_equals_dequantized_math() {
    let mut rng = SplitMix(11);
    for ty in fine_types() {
        let w = weights(&mut rng, ty, 1, 576);
        check_scalar_row(ty, &w, &random(&mut rng, 576, 3.0));
    }
}

/// An asymmetric int4 group of 32 is a Q4_1 block and a symmetric int8 one a Q8_0
/// block, byte for byte: the backends run them as those types.
#[test]
fn fine_groups_of_32_are_ggml_blocks() {
    let mut rng = SplitMix(13);
    for (bits, sym, ggml) in [(4u8, false, GgmlType::Q4_1), (8, true, GgmlType::Q8_0)] {
        let ty = GgmlType::Fine(cairn_formats::FineType::new(bits, sym, 32).unwrap());
        assert_eq!(ty.canonical(), ggml);
        let w = weights(&mut rng, ty, 1, 256);
        let (mut a, mut b) = (vec![0f32; 256], vec![0f32; 256]);
        quant::dequantize(ty, &w, &mut a).unwrap();
        quant::dequantize(ggml, &w, &mut b).unwrap();
        assert_eq!(a, b, "{ty} vs {ggml}");
    }
}

/// The f32 path's row decoder equals the reference decoder for every type and ISA
/// (F16 takes F16C where detected).
#[test]
fn row_decoder_equals_reference() {
    let mut rng = SplitMix(14);
    for isa in Isa::available() {
        for ty in [GgmlType::F16, GgmlType::BF16, GgmlType::Q4_1, GgmlType::Q6K] {
            for cols in [256, 768, 1536] {
                let w = weights(&mut rng, ty, 1, cols);
                let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
                kernels::dequantize_row(isa, ty, &w, &mut a).unwrap();
                quant::dequantize(ty, &w, &mut b).unwrap();
                assert_eq!(a, b, "{} {ty} {cols}", isa.name());
            }
        }
    }
}

/// One BitStack block row added to a rebuilt row (`±Σ_r u_r v_r[j]`): every instruction
/// set against plain f32 arithmetic, on widths with and without a tail of under 8.
#[test]
fn sign_rank_row_equals_plain_arithmetic() {
    let mut rng = SplitMix(41);
    for (n, k) in [(576, 4), (37, 16), (8, 1), (1539, 8), (5, 3)] {
        let u = random(&mut rng, k, 1.0);
        let v = random(&mut rng, k * n, 1.0);
        let signs: Vec<u8> = (0..n.div_ceil(8)).map(|_| (rng.next_f32().abs() * 255.0) as u8).collect();
        let base = random(&mut rng, n, 1.0);
        let want: Vec<f32> = (0..n)
            .map(|j| {
                let t: f32 = (0..k).map(|r| u[r] * v[r * n + j]).sum();
                base[j] + if signs[j / 8] >> (j % 8) & 1 == 1 { -t } else { t }
            })
            .collect();
        for isa in Isa::available() {
            let mut got = base.clone();
            kernels::sign_rank_row(isa, &u, &v, &signs, &mut got);
            for (j, (&g, &w)) in got.iter().zip(&want).enumerate() {
                close(g, w, &format!("{} n{n} k{k} [{j}]", isa.name()));
            }
        }
    }
}

/// Rebuilt tiles rounded to Q8_0: every instruction set's bytes decode to within half a
/// step of the input plus the f16 rounding of the scale (at most 127 · 2⁻¹¹ of a step),
/// the scales equal the reference's and the values differ from it by one at most.
#[test]
fn q8_0_tile_rounding_matches_the_reference() {
    let mut rng = SplitMix(43);
    let x = random(&mut rng, 7 * 64, 3.0);
    let rb = 34;
    let mut want = vec![0u8; x.len() / 32 * rb];
    quant::quantize(GgmlType::Q8_0, &x, &mut want).unwrap();
    for isa in Isa::available() {
        let mut got = vec![0u8; want.len()];
        kernels::quantize_q8_0(isa, &x, &mut got);
        let mut back = vec![0f32; x.len()];
        quant::dequantize(GgmlType::Q8_0, &got, &mut back).unwrap();
        for (b, (gb, wb)) in got.chunks(rb).zip(want.chunks(rb)).enumerate() {
            assert_eq!(gb[..2], wb[..2], "{} block {b}: scale", isa.name());
            let d = half::f16::from_le_bytes([gb[0], gb[1]]).to_f32();
            for j in 0..32 {
                let i = b * 32 + j;
                assert!((back[i] - x[i]).abs() <= 0.57 * d, "{} [{i}]: {} vs {}", isa.name(), back[i], x[i]);
                let (g, w) = (gb[2 + j] as i8, wb[2 + j] as i8);
                assert!((g as i32 - w as i32).abs() <= 1, "{} [{i}]: {g} vs reference {w}", isa.name());
            }
        }
    }
}

/// BitStack's int8 sign tables (kernels/lut.rs) on every instruction set: each table
/// builder equals the scalar one byte for byte and scale for scale; the row kernels'
/// integer sums equal the scalar reference's exactly (with every scale and u set to 1,
/// each result is a sum of integers, exact in f32 in any order), and with the real
/// scales and u they agree to 1e-5 relative ([`close`]: only the order of the f32 scale
/// and u products differs). Odd shapes: row counts off the groups of 8 (the scalar tail),
/// a first row off a group, sign rows not a multiple of 8 bytes (the padded tail) or of 16
/// (a last run of 8 bytes), several scale segments, ranks with and without a SIMD instance.
#[test]
fn lut_kernels_equal_scalar() {
    use cairn::backend::cpu::kernels::lut;
    let mut rng = SplitMix(17);
    let shapes: [(usize, usize, usize); 10] = [
        (70, 64, 16),
        (19, 576, 4),
        (24, 192, 8),
        (21, 72, 8),
        (37, 300, 16),
        (19, 1100, 4),
        (33, 20, 5),
        (16, 36, 8),
        (45, 520, 4),
        (11, 2056, 16),
    ];
    for (m, n, k) in shapes {
        let bytes = n.div_ceil(8);
        let v: Vec<u8> =
            random(&mut rng, k * n, 0.5).into_iter().flat_map(|f| half::f16::from_f32(f).to_le_bytes()).collect();
        let x = random(&mut rng, n, 2.0);
        let signs: Vec<u8> = (0..m * bytes).map(|_| (rng.next_u64() >> 56) as u8).collect();
        let u = random(&mut rng, m * k, 1.0);
        let want_t = lut::build(Isa::Scalar, &[(&v, n, k)], &x).remove(0);
        let mut ones = want_t.clone();
        ones.scale.fill(1.0);
        let u1 = vec![1f32; m * k];
        let mut exact = vec![0f32; m];
        lut::rows_scalar(&ones, &signs, &u1, 0, &mut exact);
        assert!(exact.iter().all(|v| v.fract() == 0.0 && v.abs() < 1e6), "integer sums");
        let i0 = 3;
        let mut want = vec![0.25f32; m - i0];
        lut::rows_scalar(&want_t, &signs, &u[i0 * k..], i0, &mut want);
        for isa in Isa::available() {
            let what = format!("{} {m}x{n} k{k}", isa.name());
            let t = lut::build(isa, &[(&v, n, k)], &x).remove(0);
            assert_eq!(t.tab, want_t.tab, "{what}: table entries");
            assert_eq!(t.scale, want_t.scale, "{what}: table scales");
            let mut got = vec![0f32; m];
            lut::rows(isa, &ones, &signs, &u1, 0, &mut got);
            assert_eq!(got, exact, "{what}: integer sums");
            let mut got = vec![0.25f32; m - i0];
            lut::rows(isa, &t, &signs, &u[i0 * k..], i0, &mut got);
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                close(g, w, &format!("{what} row {}", i0 + i));
            }
        }
    }
}
