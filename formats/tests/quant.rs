//! Tests of the quant block kernels: hand-built blocks with values worked out from the
//! layouts, digests cross-checked against an independent implementation (the `gguf`
//! Python package's numpy kernels, which mirror ggml), round-trip error bounds derived
//! from each type's step size, dot/dequantize consistency, length checks, and property
//! tests that arbitrary bytes never panic.

use cairn_formats::quant::{dequantize, dot, quantize};
use cairn_formats::{Error, GgmlType};
use proptest::prelude::*;

const ALL: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

fn f16_bits(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}

fn deq(ty: GgmlType, b: &[u8]) -> Vec<f32> {
    let mut y = vec![0.0; b.len() / ty.type_size() * ty.block_size()];
    dequantize(ty, b, &mut y).unwrap();
    y
}

fn quant(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut b = vec![0u8; x.len() / ty.block_size() * ty.type_size()];
    quantize(ty, x, &mut b).unwrap();
    b
}

/// Asserts `dot` equals the f64 dot of the dequantized row with `x` to 1e-4 of the sum of
/// absolute products (a relative bound that cancellation cannot defeat). Rows whose
/// values are not finite (NaN/inf scales in arbitrary bytes) only have to return Ok.
fn assert_dot_consistent(ty: GgmlType, b: &[u8], x: &[f32]) {
    let y = deq(ty, b);
    let got = dot(ty, b, x).unwrap();
    let exact: f64 = y.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum();
    let mag: f64 = y.iter().zip(x).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
    if !mag.is_finite() || mag > 1e30 {
        return;
    }
    assert!(
        (got as f64 - exact).abs() <= 1e-4 * mag + 1e-30,
        "{ty}: dot {got} vs dequantized dot {exact} (magnitude {mag})"
    );
}

// ---------------------------------------------------------------- hand-built blocks

#[test]
fn float_types_decode_known_values() {
    let mut b = Vec::new();
    for v in [1.5f32, -0.0, f32::INFINITY, 3.0e-39] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    let y = deq(GgmlType::F32, &b);
    assert_eq!(y[..2], [1.5, -0.0]);
    assert_eq!(y[2], f32::INFINITY);
    assert_eq!(y[3], 3.0e-39);

    // f16: 1.0, -2.0, smallest subnormal 2^-24, 65504 (max), NaN.
    let b = [0x00, 0x3C, 0x00, 0xC0, 0x01, 0x00, 0xFF, 0x7B, 0x01, 0x7E];
    let y = deq(GgmlType::F16, &b);
    assert_eq!(y[..4], [1.0, -2.0, 2f32.powi(-24), 65504.0]);
    assert!(y[4].is_nan());

    // bf16 is the top half of an f32: 0x3F80 = 1.0, 0x4049 = 3.140625, 0xC2F7 = -123.5.
    let b = [0x80, 0x3F, 0x49, 0x40, 0xF7, 0xC2];
    assert_eq!(deq(GgmlType::BF16, &b), [1.0, 3.140625, -123.5]);
}

#[test]
fn q4_0_decodes_known_block() {
    let mut b = vec![0x88u8; 18]; // every nibble 8 decodes to 0
    b[..2].copy_from_slice(&f16_bits(0.5));
    b[2] = 0x1F; // value 0: (15-8)*0.5, value 16: (1-8)*0.5
    b[2 + 5] = 0x80; // value 5: (0-8)*0.5, value 21: 0
    let y = deq(GgmlType::Q4_0, &b);
    let mut want = [0.0f32; 32];
    want[0] = 3.5;
    want[16] = -3.5;
    want[5] = -4.0;
    assert_eq!(y, want);
}

#[test]
fn q4_0_quantizes_ramp_like_ggml() {
    // x_j = j - 16: the largest magnitude is x_0 = -16, so d = -16/-8 = 2 and level
    // q_j = trunc(x_j/2 + 8.5) = trunc(j/2 + 0.5), clamped to 15 (only j = 31 clamps).
    let x: Vec<f32> = (0..32).map(|j| j as f32 - 16.0).collect();
    let b = quant(GgmlType::Q4_0, &x);
    assert_eq!(b[..2], f16_bits(2.0));
    let q = |j: usize| j.div_ceil(2).min(15) as u8;
    for j in 0..16 {
        assert_eq!(b[2 + j], q(j) | (q(j + 16) << 4), "byte {j}");
    }
    let y = deq(GgmlType::Q4_0, &b);
    for (j, &v) in y.iter().enumerate() {
        assert_eq!(v, (q(j) as f32 - 8.0) * 2.0);
    }
}

#[test]
fn q4_1_decodes_known_block() {
    let mut b = vec![0u8; 20];
    b[..2].copy_from_slice(&f16_bits(0.25));
    b[2..4].copy_from_slice(&f16_bits(-1.0));
    b[4 + 3] = 0xA5; // value 3: 5*0.25 - 1, value 19: 10*0.25 - 1
    let y = deq(GgmlType::Q4_1, &b);
    let mut want = [-1.0f32; 32];
    want[3] = 0.25;
    want[19] = 1.5;
    assert_eq!(y, want);
}

#[test]
fn q5_0_decodes_known_block() {
    let mut b = vec![0u8; 22];
    b[..2].copy_from_slice(&f16_bits(1.0));
    b[2..6].copy_from_slice(&((1u32 << 2) | (1 << 20)).to_le_bytes());
    b[6 + 2] = 0x03; // value 2: (3 | 16) - 16 = 3; value 18: 0 - 16
    b[6 + 4] = 0x70; // value 4: 0 - 16;          value 20: (7 | 16) - 16 = 7
    let y = deq(GgmlType::Q5_0, &b);
    let mut want = [-16.0f32; 32];
    want[2] = 3.0;
    want[20] = 7.0;
    assert_eq!(y, want);
}

#[test]
fn q5_1_decodes_known_block() {
    let mut b = vec![0u8; 24];
    b[..2].copy_from_slice(&f16_bits(0.5));
    b[2..4].copy_from_slice(&f16_bits(2.0));
    b[4..8].copy_from_slice(&(1u32 << 31).to_le_bytes());
    b[8 + 15] = 0xF1; // value 15: 1*0.5 + 2; value 31: (15 | 16)*0.5 + 2
    let y = deq(GgmlType::Q5_1, &b);
    let mut want = [2.0f32; 32];
    want[15] = 2.5;
    want[31] = 17.5;
    assert_eq!(y, want);
}

#[test]
fn q8_0_decodes_known_block() {
    let mut b = vec![0u8; 34];
    b[..2].copy_from_slice(&f16_bits(0.125));
    b[2] = 0x80; // -128
    b[2 + 5] = 0xFF; // -1
    b[2 + 31] = 0x7F; // 127
    let y = deq(GgmlType::Q8_0, &b);
    let mut want = [0.0f32; 32];
    want[0] = -16.0;
    want[5] = -0.125;
    want[31] = 15.875;
    assert_eq!(y, want);
}

#[test]
fn q4_k_decodes_known_block() {
    let mut b = vec![0u8; 144];
    b[..2].copy_from_slice(&f16_bits(1.0)); // d
    b[2..4].copy_from_slice(&f16_bits(0.5)); // dmin
    let s = &mut b[4..16];
    s[0] = 2; // sub-block 0: scale 2
    s[4] = 3; //              min 3
              // Sub-block 5: scale 33 = 0b10_0001 (low nibble in s[9], top bits in s[1] bits 6-7),
              // min 19 = 0b01_0011 (high nibble of s[9], top bits in s[5] bits 6-7). Sub-block 1
              // reads s[1] & 63 and s[5] & 63 and so keeps scale 0, min 0.
    s[9] = 0x31;
    s[1] = 0x80;
    s[5] = 0x40;
    let qs = &mut b[16..];
    qs[0] = 0x07; // value 0 (sub-block 0, low nibble) = 7; value 32 (sub-block 1) = 0
    qs[64 + 4] = 0xA0; // chunk 2: value 128+4 (sub-block 4) = 0, value 160+4 (sub-block 5) = 10
    let y = deq(GgmlType::Q4K, &b);
    let mut want = [0.0f32; 256];
    want[..32].fill(-1.5); // 2*0 - 0.5*3
    want[0] = 12.5; // 2*7 - 1.5
    want[160..192].fill(-9.5); // 33*0 - 0.5*19
    want[164] = 320.5; // 33*10 - 9.5
    assert_eq!(y, want);
}

#[test]
fn q5_k_decodes_known_block() {
    let mut b = vec![0u8; 176];
    b[..2].copy_from_slice(&f16_bits(1.0));
    b[2..4].copy_from_slice(&f16_bits(1.0));
    let s = &mut b[4..16];
    s[0] = 1; // sub-block 0: scale 1, min 4
    s[4] = 4;
    s[1] = 2; // sub-block 1: scale 2, min 0
    s[2] = 3; // sub-block 2: scale 3, min 1
    s[6] = 1;
    let qh = &mut b[16..48];
    qh[3] = 0b11; // 5th bit of value 3 (bit 0) and value 32+3 (bit 1)
    qh[0] = 0b100; // chunk 1, low nibbles: 5th bit of value 64
    qh[4] = 0b10; // only value 32+4 (high nibble) gets a 5th bit, value 4 does not
    b[48 + 3] = 0x52; // value 3: 2 | 16; value 35: 5 | 16
    let y = deq(GgmlType::Q5K, &b);
    let mut want = [0.0f32; 256];
    want[..32].fill(-4.0);
    want[3] = 14.0; // 1*18 - 4
    want[35] = 42.0; // 2*21 - 0
    want[36] = 32.0; // 2*16 - 0
    want[64..96].fill(-1.0);
    want[64] = 47.0; // 3*16 - 1
    assert_eq!(y, want);
}

#[test]
fn q6_k_decodes_known_block() {
    let mut b = vec![0u8; 210];
    b[208..].copy_from_slice(&f16_bits(0.5));
    let sc = |i: usize| 192 + i;
    b[sc(0)] = 2; // values 0..16
    b[sc(2)] = (-1i8) as u8; // values 32..48
    b[sc(4)] = 1; // values 64..80
    b[sc(8)] = 4; // values 128..144
    b[0] = 0x21; // value 0 low bits 1, value 64 low bits 2
    b[32] = 0x0F; // value 32 low bits 15, value 96 low bits 0
    b[128] = 0b00_00_11_10; // top bits: value 0 -> 2, value 32 -> 3, values 64, 96 -> 0
    b[64] = 0x05; // second half: value 128 low bits 5, top bits 0
    let y = deq(GgmlType::Q6K, &b);
    let mut want = [0.0f32; 256];
    want[..16].fill(0.5 * 2.0 * -32.0);
    want[0] = 0.5 * 2.0 * 1.0; // (1 | 2<<4) - 32 = 1
    want[32..48].fill(-0.5 * -32.0); // scale -1
    want[32] = -0.5 * 31.0; // (15 | 3<<4) - 32 = 31
    want[64..80].fill(0.5 * -32.0);
    want[64] = 0.5 * -30.0; // 2 - 32
    want[128..144].fill(0.5 * 4.0 * -32.0);
    want[128] = 0.5 * 4.0 * -27.0; // 5 - 32
    assert_eq!(y, want);
}

// ---------------------------------------------------- digests from an independent decoder

/// The generator also used to compute the digests below in Python.
struct Rng(u32);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(1664525).wrapping_add(1013904223);
        self.0 ^ (self.0 >> 15)
    }

    /// Uniform in [-4, 4) scaled by 2^(block % 5 - 2), every step exact in f32.
    fn floats(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v = (self.next() >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                v * 8.0 * 2f32.powi((i / 32 % 5) as i32 - 2)
            })
            .collect()
    }
}

fn fnv(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf29ce484222325, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// Random blocks (256 values, 8 blocks for the block types) with the f16 scale fields
/// replaced by values in [2^-4, 1) and float exponents capped so no value is inf/NaN.
fn random_blocks(ty: GgmlType, seed: u32) -> Vec<u8> {
    let (bs, ts) = ty.block_geometry();
    let n = if bs == 1 { 256 } else { 8 * bs };
    let mut r = Rng(seed);
    let mut b: Vec<u8> = (0..n / bs * ts).map(|_| (r.next() >> 24) as u8).collect();
    let scales: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q6K => &[208],
        _ => &[],
    };
    for blk in b.chunks_exact_mut(ts) {
        for &at in scales {
            let bits = 0x2C00 + (r.next() >> 20) as u16;
            blk[at..at + 2].copy_from_slice(&bits.to_le_bytes());
        }
        match ty {
            GgmlType::F32 => blk[3] &= 0xBF,
            GgmlType::F16 | GgmlType::BF16 => blk[1] &= 0xBF,
            _ => {}
        }
    }
    b
}

#[test]
fn dequantize_matches_reference_digests() {
    // FNV-1a of the little-endian f32 values that gguf-py's numpy dequantizer produced
    // for the same bytes: equal digests mean bit-identical output.
    let want: [(GgmlType, u64); 11] = [
        (GgmlType::F32, 0xa5b60c384d1474ce),
        (GgmlType::F16, 0xc35fa1e1759e7a7d),
        (GgmlType::BF16, 0x8eeb1ada174cf17a),
        (GgmlType::Q4_0, 0x87af4af952b807c5),
        (GgmlType::Q4_1, 0xaa21a2de13ac3547),
        (GgmlType::Q5_0, 0x7c2ea071834daf83),
        (GgmlType::Q5_1, 0xd443d73db0f6d496),
        (GgmlType::Q8_0, 0xb2580dd2c391fd89),
        (GgmlType::Q4K, 0x2380738894bbf4bd),
        (GgmlType::Q5K, 0x67e857f0c05c5df1),
        (GgmlType::Q6K, 0x363979ab5bcc7628),
    ];
    for (ty, digest) in want {
        let b = random_blocks(ty, 0x1234 + ty.id());
        let y = deq(ty, &b);
        let got = fnv(y.iter().flat_map(|v| v.to_le_bytes()));
        assert_eq!(got, digest, "{ty}: dequantized values differ from the reference");
    }
}

#[test]
fn quantize_matches_reference_digests() {
    // FNV-1a of the bytes gguf-py's quantizers (ports of ggml's quantize_row_*_ref)
    // wrote for the same 512 inputs.
    let want: [(GgmlType, u64); 7] = [
        (GgmlType::F16, 0x7eb0363daf31fdde),
        (GgmlType::BF16, 0x57a6fdf8c4ca09cc),
        (GgmlType::Q4_0, 0x2f32d9e122eaae07),
        (GgmlType::Q4_1, 0x4776b5d5b7e69081),
        (GgmlType::Q5_0, 0xeeda76e41b3b79df),
        (GgmlType::Q5_1, 0xfb86d60de34d89b1),
        (GgmlType::Q8_0, 0xc5bb28b7af946811),
    ];
    for (ty, digest) in want {
        let x = Rng(0xBEEF + ty.id()).floats(512);
        let got = fnv(quant(ty, &x));
        assert_eq!(got, digest, "{ty}: quantized bytes differ from the reference");
    }
}

// ------------------------------------------------------------------ round-trip bounds

/// Error of rounding `v` to f16: half an ulp, which below 2^-14 (subnormals) is fixed at
/// 2^-25.
fn f16_err(v: f32) -> f32 {
    (v.abs() / 2048.0).max(2f32.powi(-25))
}

/// The largest error a round trip may leave in one block `x`, derived from the type's
/// step `d`: rounding to the nearest level costs half a step, and the stored f16 scale
/// is off by up to f16_err(d), which the largest level multiplies (and the stored f16
/// min by f16_err(min)). Returns (max error, RMS error); the RMS bound is only
/// tighter for the k-quants.
fn bound(ty: GgmlType, x: &[f32]) -> (f32, f32) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let min = x.iter().fold(f32::MAX, |a, &v| a.min(v));
    let max = x.iter().fold(-f32::MAX, |a, &v| a.max(v));
    let tiny = 1e-6 * amax + 1e-30;
    // Symmetric types map the signed extreme to the most negative level -n, so the
    // opposite extreme lands one past the top level n-1 and is clamped: a full step.
    let symmetric = |n: f32| {
        let d = amax / n;
        d + n * f16_err(d) + tiny
    };
    let affine = |n: f32| {
        let d = (max - min) / n;
        d / 2.0 + n * f16_err(d) + f16_err(min) + tiny
    };
    let max_err = match ty {
        GgmlType::F32 => 0.0,
        GgmlType::F16 => f16_err(amax),
        GgmlType::BF16 => amax / 256.0,
        GgmlType::Q4_0 => symmetric(8.0),
        GgmlType::Q5_0 => symmetric(16.0),
        // Q8_0 is symmetric around 0 (levels -127..127): half a step.
        GgmlType::Q8_0 => {
            let d = amax / 127.0;
            d / 2.0 + 127.0 * f16_err(d) + tiny
        }
        GgmlType::Q4_1 => affine(15.0),
        GgmlType::Q5_1 => affine(31.0),
        // The k-quants fit each sub-block's scale (and min) by minimizing a weighted
        // squared error, which may clip an outlier by about a step in favour of the
        // bulk, and then store the scales in 6 or 8 bits against the block maximum.
        // Worst seen over varied and sparse inputs: about 1.06 steps of the whole
        // block's range, so 1.5 steps. Their scales are f16 times up to 63 (or 128),
        // so f16 errors of the block scale are multiplied by that too.
        GgmlType::Q4K | GgmlType::Q5K => {
            let n = if ty == GgmlType::Q4K { 15.0 } else { 31.0 };
            let step = (max - min.min(0.0)) / n;
            let f16 = n * 63.0 * f16_err(step / 63.0) + 63.0 * f16_err(min.abs() / 63.0);
            return k_bounds(step, f16 + tiny);
        }
        GgmlType::Q6K => {
            let step = amax / 32.0;
            return k_bounds(step, 32.0 * 128.0 * f16_err(step / 128.0) + tiny);
        }
        _ => unreachable!(),
    };
    (max_err, max_err)
}

/// Max and RMS bounds of a k-quant block: the bulk must be rounded, not clipped, and
/// rounding to nearest leaves an RMS error of step/√12 ≈ 0.29 step.
fn k_bounds(step: f32, f16_terms: f32) -> (f32, f32) {
    (1.5 * step + f16_terms, 0.4 * step + f16_terms)
}

fn assert_round_trip(ty: GgmlType, x: &[f32]) {
    let y = deq(ty, &quant(ty, x));
    let bs = ty.block_size();
    for (i, (xb, yb)) in x.chunks(bs).zip(y.chunks(bs)).enumerate() {
        let (limit, rms_limit) = bound(ty, xb);
        let mut sq = 0.0f64;
        for (j, (&a, &b)) in xb.iter().zip(yb).enumerate() {
            assert!((a - b).abs() <= limit, "{ty} block {i} value {j}: {a} came back as {b} (bound {limit})");
            sq += ((a - b) as f64).powi(2);
        }
        let rms = (sq / xb.len() as f64).sqrt() as f32;
        assert!(rms <= rms_limit, "{ty} block {i}: RMS error {rms} (bound {rms_limit})");
    }
}

#[test]
fn round_trip_error_is_bounded() {
    for ty in ALL {
        for seed in 0..50u32 {
            let mut x = Rng(seed).floats(4 * 256);
            // Plain uniform, all positive (the min matters), sparse outliers (the scale
            // search matters), a peaked distribution like real weights, and a constant
            // offset with a few spread values (where the k-quants' weighted fit clips
            // the most).
            match seed % 5 {
                1 => x.iter_mut().for_each(|v| *v = v.abs() + 1.0),
                2 => x.iter_mut().step_by(37).for_each(|v| *v *= 20.0),
                3 => x.iter_mut().for_each(|v| *v *= v.abs()),
                4 => x.iter_mut().enumerate().for_each(|(i, v)| *v = if i % 7 == 0 { *v / 4.0 - 0.8 } else { -0.8 }),
                _ => {}
            }
            assert_round_trip(ty, &x);
        }
    }
}

#[test]
fn special_blocks_round_trip() {
    for ty in ALL {
        let n = 2 * ty.block_size().max(256);
        // All zeros must come back exactly (no 0/0 in the scale computations).
        assert!(deq(ty, &quant(ty, &vec![0.0; n])).iter().all(|&v| v == 0.0), "{ty}");
        assert_round_trip(ty, &vec![0.75; n]);
        assert_round_trip(ty, &vec![-3.0; n]);
        let mut spike = vec![0.0; n];
        spike[7] = 100.0;
        spike[300] = -0.001;
        assert_round_trip(ty, &spike);
        let tiny: Vec<f32> = (0..n).map(|i| (i as f32 - 200.0) * 1e-6).collect();
        assert_round_trip(ty, &tiny);
    }
}

#[test]
fn quantize_never_panics_on_non_finite_input() {
    for ty in ALL {
        let n = ty.block_size().max(256);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, -f32::MAX] {
            let mut x = Rng(1).floats(n);
            x[3] = bad;
            let y = deq(ty, &quant(ty, &x));
            assert_eq!(y.len(), n);
            let all_bad = vec![bad; n];
            deq(ty, &quant(ty, &all_bad));
        }
    }
}

// --------------------------------------------------------------------- dot products

#[test]
fn dot_matches_dequantized_row() {
    for ty in ALL {
        for seed in 0..10u32 {
            let mut r = Rng(seed);
            let w = r.floats(4 * 256);
            let x = r.floats(8 * 256);
            assert_dot_consistent(ty, &quant(ty, &w), &x[..w.len()]);
            let b = random_blocks(ty, seed);
            let n = b.len() / ty.type_size() * ty.block_size();
            assert_dot_consistent(ty, &b, &x[..n]);
        }
    }
}

#[test]
fn dot_of_known_rows() {
    // Q8_0 with d = 0.5 and levels 0..32 against x = 1: 0.5 * (0 + 1 + ... + 31) = 248.
    let mut b = vec![0u8; 34];
    b[..2].copy_from_slice(&f16_bits(0.5));
    for j in 0..32 {
        b[2 + j] = j as u8;
    }
    assert_eq!(dot(GgmlType::Q8_0, &b, &[1.0; 32]).unwrap(), 248.0);
    // Q4_1 with d = 1, m = -1 and every level 2: every value is 1, so the dot is Σx.
    let mut b = vec![0x22u8; 20];
    b[..2].copy_from_slice(&f16_bits(1.0));
    b[2..4].copy_from_slice(&f16_bits(-1.0));
    let x: Vec<f32> = (0..32).map(|i| i as f32).collect();
    assert_eq!(dot(GgmlType::Q4_1, &b, &x).unwrap(), 496.0);
    // F16 [1, -2] · [3, 4] = -5.
    assert_eq!(dot(GgmlType::F16, &[0x00, 0x3C, 0x00, 0xC0], &[3.0, 4.0]).unwrap(), -5.0);
    // An empty row has dot 0.
    for ty in ALL {
        assert_eq!(dot(ty, &[], &[]).unwrap(), 0.0);
    }
}

// --------------------------------------------------------------------- length checks

#[test]
fn length_mismatches_are_errors() {
    let invalid = |r: Result<(), Error>| matches!(r, Err(Error::Invalid(_)));
    for ty in ALL {
        let (bs, ts) = ty.block_geometry();
        let b = vec![0u8; 2 * ts];
        let mut y = vec![0.0f32; 2 * bs + 1];
        // Partial block, too few values, too many values.
        assert!(invalid(dequantize(ty, &b[..2 * ts - 1], &mut y[..2 * bs])), "{ty}");
        assert!(invalid(dequantize(ty, &b, &mut y[..2 * bs - 1])), "{ty}");
        assert!(invalid(dequantize(ty, &b, &mut y)), "{ty}");
        assert!(dequantize(ty, &b, &mut y[..2 * bs]).is_ok(), "{ty}");

        assert!(invalid(dot(ty, &b[..2 * ts - 1], &y[..2 * bs]).map(|_| ())), "{ty}");
        assert!(invalid(dot(ty, &b, &y[..2 * bs - 1]).map(|_| ())), "{ty}");
        assert!(invalid(dot(ty, &b, &y).map(|_| ())), "{ty}");

        let mut out = vec![0u8; 2 * ts + 1];
        assert!(invalid(quantize(ty, &y, &mut out[..2 * ts])), "{ty}");
        assert!(invalid(quantize(ty, &y[..2 * bs], &mut out)), "{ty}");
        assert!(invalid(quantize(ty, &y[..2 * bs], &mut out[..2 * ts - 1])), "{ty}");
        assert!(quantize(ty, &y[..2 * bs], &mut out[..2 * ts]).is_ok(), "{ty}");
    }
}

#[test]
fn unsupported_types_are_refused() {
    for ty in [GgmlType::Q2K, GgmlType::Q8_1, GgmlType::IQ4NL, GgmlType::I32] {
        let (bs, ts) = ty.block_geometry();
        let b = vec![0u8; ts];
        let mut y = vec![0.0f32; bs];
        let unsupported = Error::UnsupportedType(ty.name());
        assert_eq!(dequantize(ty, &b, &mut y), Err(unsupported.clone()));
        assert_eq!(dot(ty, &b, &y), Err(unsupported.clone()));
        assert_eq!(quantize(ty, &y, &mut vec![0u8; ts]), Err(unsupported));
    }
}

// ------------------------------------------------------------------ property tests

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary bytes (NaN and inf scales included) decode without panicking, and the
    /// dot product agrees with the decoded values wherever they are finite.
    #[test]
    fn arbitrary_bytes_decode(bytes in proptest::collection::vec(any::<u8>(), 0..3 * 210), seed in any::<u32>()) {
        for ty in ALL {
            let (bs, ts) = ty.block_geometry();
            let b = &bytes[..bytes.len() / ts * ts];
            let n = b.len() / ts * bs;
            let x: Vec<f32> = Rng(seed).floats(n);
            prop_assert_eq!(deq(ty, b).len(), n);
            assert_dot_consistent(ty, b, &x);
        }
    }

    /// Any f32 bit patterns quantize without panicking, and decode again.
    #[test]
    fn arbitrary_floats_quantize(bits in proptest::collection::vec(any::<u32>(), 512)) {
        let x: Vec<f32> = bits.into_iter().map(f32::from_bits).collect();
        for ty in ALL {
            let n = 512 / ty.block_size() * ty.block_size();
            prop_assert_eq!(deq(ty, &quant(ty, &x[..n])).len(), n);
        }
    }

    /// Finite values of any sign and magnitude come back within the type's bound.
    #[test]
    fn finite_values_round_trip(
        x in proptest::collection::vec(-1.0f32..1.0, 512),
        scale_exp in -12i32..12,
        offset in -2.0f32..2.0,
    ) {
        let s = 2f32.powi(scale_exp);
        let x: Vec<f32> = x.iter().map(|v| (v + offset) * s).collect();
        for ty in ALL {
            assert_round_trip(ty, &x);
        }
    }
}
