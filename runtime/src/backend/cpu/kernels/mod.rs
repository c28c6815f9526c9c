//! Integer dot-product kernels: weights in their block type, activations quantized to
//! 8 bits per block of 32 (as llama.cpp does), one implementation per instruction set.
//!
//! Every weight type with a kernel here is reduced to the same shape per block: 32
//! unsigned bytes `u`, a scale `d` and an offset `m`, so that a block contributes
//! `d·dx·Σ u·x + m·dx·Σ x` (Q4_0: m = −8d; Q5_0: −16d; Q8_0: u = w + 128, m = −128d).
//! The k-quants (Q4_K, Q5_K, Q6_K) are runs of 32 of the same shape inside super-blocks
//! of 256, with a scale (and for Q4_K/Q5_K a min) per run, Q6_K a scale per 16 values.
//! The scalar code is the reference; SIMD versions must agree with it exactly in the
//! integer part and to float rounding in the sums.
//!
//! Where rows come in whole groups of 8 the backend repacks them at load (`repack`, one
//! layout per type for every architecture) and the AVX2, AVX-512 VNNI and NEON kernels
//! read that layout ([`packed`]); [`matvec`] and [`matmul`] take the ggml rows as stored.

pub mod act;
pub mod attn;
pub mod lut;
#[cfg(target_arch = "aarch64")]
mod neon;
pub mod repack;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::OnceLock;

use cairn_formats::GgmlType;

/// Values per activation block.
pub const QK: usize = 32;

/// The instruction sets with kernels, best last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 (F, BW, VL) with VNNI: `vpdpbusd` on 256-bit vectors.
    Avx512Vnni,
    /// aarch64 NEON with the dot-product extension.
    NeonDot,
}

impl Isa {
    /// The best instruction set of this CPU (`CAIRN_ISA=scalar|avx2|avx512vnni|neon`
    /// lowers it, for comparisons).
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Self::available().into_iter().max().unwrap_or(Isa::Scalar);
            match std::env::var("CAIRN_ISA").ok().as_deref() {
                Some(name) => Self::available().into_iter().find(|i| i.name() == name).unwrap_or(best),
                None => best,
            }
        })
    }

    /// Every instruction set this CPU can run, the scalar reference first.
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                v.push(Isa::Avx2);
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
                {
                    v.push(Isa::Avx512Vnni);
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("neon") && std::arch::is_aarch64_feature_detected!("dotprod") {
                v.push(Isa::NeonDot);
            }
        }
        v
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::NeonDot => "neon",
        }
    }
}

/// Whether `ty` has integer kernels on `isa` (otherwise the backend dequantizes to f32).
/// Every instruction set has the same types today (the scalar reference included); the
/// parameter stays for the day one does not.
pub fn supports(isa: Isa, ty: GgmlType) -> bool {
    let _ = isa;
    matches!(
        ty,
        GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K
            | GgmlType::Fine(_)
    )
}

/// Rows of activations quantized to 8 bits the way ggml's `q8_1` does it on x86
/// (scale 127/amax, ties to even, scale stored as f16): per block of 32, the scale `d`,
/// the integer sum of the values, and `s = d·sum` rounded to f16 as ggml stores it for
/// the min term of Q4_1/Q5_1. Matching ggml bit for bit keeps logits within its noise.
#[derive(Debug, Clone, Default)]
pub struct Q8Acts {
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub sum: Vec<i32>,
    /// Sum of each block's first 16 values (Q6_K's scales cover 16 values each).
    pub sum16: Vec<i32>,
    pub s: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

/// One row of [`Q8Acts`].
#[derive(Debug, Clone, Copy)]
pub struct Q8Row<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub sum: &'a [i32],
    pub sum16: &'a [i32],
    pub s: &'a [f32],
}

/// Round half to even, as `vroundps` does, without a libm call: adding 1.5·2²³ pushes
/// the fraction out of the mantissa under the default rounding mode (|x| ≤ 127 here).
fn round_ties_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

fn round_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// Whether a block type has its own minimum (its offset term uses `s`).
pub fn has_min(ty: GgmlType) -> bool {
    match ty {
        GgmlType::Fine(ft) => !ft.sym(),
        _ => matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1),
    }
}

/// The scalar reference of one activation block: its 8-bit values, absolute maximum
/// and sum.
fn quantize_block(src: &[f32], q: &mut [i8]) -> (f32, i32, i32) {
    let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = [0i32; 2];
    for (i, (q, v)) in q.iter_mut().zip(src).enumerate() {
        *q = round_ties_even(v * inv) as i8;
        sum[i / 16] += *q as i32;
    }
    (amax, sum[0] + sum[1], sum[0])
}

impl Q8Acts {
    /// Quantize `rows` rows of `cols` values (`cols` a multiple of 32), reusing buffers.
    /// The result does not depend on the instruction set, so the best one is used.
    pub fn quantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        self.quantize_with(Isa::detect(), x, rows, cols)
    }

    /// [`Q8Acts::quantize`] with the given instruction set (tests compare them).
    pub fn quantize_with(&mut self, isa: Isa, x: &[f32], rows: usize, cols: usize) {
        debug_assert_eq!(cols % QK, 0);
        debug_assert_eq!(x.len(), rows * cols);
        let nb = rows * cols / QK;
        self.qs.resize(rows * cols, 0);
        self.d.resize(nb, 0.0);
        self.sum.resize(nb, 0);
        self.sum16.resize(nb, 0);
        self.s.resize(nb, 0.0);
        (self.rows, self.cols) = (rows, cols);
        for (b, (src, q)) in x.chunks_exact(QK).zip(self.qs.chunks_exact_mut(QK)).enumerate() {
            let (amax, sum, sum16) = match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 | Isa::Avx512Vnni => x86::quantize_block(src, q),
                _ => quantize_block(src, q),
            };
            let d = amax / 127.0;
            self.d[b] = round_f16(d);
            self.sum[b] = sum;
            self.sum16[b] = sum16;
            self.s[b] = round_f16(d * sum as f32);
        }
    }

    pub fn row(&self, r: usize) -> Q8Row<'_> {
        let nb = self.cols / QK;
        Q8Row {
            qs: &self.qs[r * self.cols..(r + 1) * self.cols],
            d: &self.d[r * nb..(r + 1) * nb],
            sum: &self.sum[r * nb..(r + 1) * nb],
            sum16: &self.sum16[r * nb..(r + 1) * nb],
            s: &self.s[r * nb..(r + 1) * nb],
        }
    }
}

pub use scalar::dot_f32 as scalar_dot_f32;

/// f32 dot product (attention scores, the f32 matmul path).
pub fn dot_f32(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => x86::dot_f32(a, b),
        _ => scalar::dot_f32(a, b),
    }
}

/// One weight row decoded to f32 for the f32 matmul path: F16 rows with F16C where the
/// CPU has it (the scalar conversion would make f16 models crawl), everything else
/// through the formats crate's reference decoders.
pub fn dequantize_row(isa: Isa, ty: GgmlType, src: &[u8], dst: &mut [f32]) -> cairn_formats::Result<()> {
    match (isa, ty) {
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2 | Isa::Avx512Vnni, GgmlType::F16) if src.len() == 2 * dst.len() => {
            x86::f16_to_f32(src, dst);
            Ok(())
        }
        _ => cairn_formats::quant::dequantize(ty, src, dst),
    }
}

/// f16 values (the KV cache) to f32: with F16C inline where the CPU has it, since
/// half's slice conversion pays a call per eight values in attention's inner loop.
pub fn halfs_to_f32(isa: Isa, src: &[half::f16], dst: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => x86::halfs_to_f32(src, dst),
        _ => {
            use half::slice::HalfFloatSliceExt;
            let n = src.len().min(dst.len());
            src[..n].convert_to_f32_slice(&mut dst[..n]);
        }
    }
}

/// Decode attention's scores over an f16 cache: `out[h * n + j] = scale · q_h · k_j` for
/// `heads` queries of `hd` values (contiguous in `q`) and `n` keys `stride` apart in `k`.
/// Equals converting each key and calling [`dot_f32`] to float rounding (SIMD paths sum
/// eight keys' products together, in another order).
#[allow(clippy::too_many_arguments)]
pub fn scores_f16(
    isa: Isa,
    q: &[f32],
    heads: usize,
    hd: usize,
    k: &[half::f16],
    stride: usize,
    n: usize,
    scale: f32,
    out: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni if hd <= x86::MAX_HEAD => x86::scores_f16(q, heads, hd, k, stride, n, scale, out),
        _ => {
            let mut row = vec![0f32; hd];
            for j in 0..n {
                halfs_to_f32(isa, &k[j * stride..j * stride + hd], &mut row);
                for h in 0..heads {
                    out[h * n + j] = dot_f32(isa, &q[h * hd..(h + 1) * hd], &row) * scale;
                }
            }
        }
    }
}

/// Decode attention's weighted values over an f16 cache: `o_h += Σ_j p[h * n + j] · v_j`
/// (layout as [`scores_f16`]), equal to converting each row and calling [`axpy`].
#[allow(clippy::too_many_arguments)]
pub fn values_f16(
    isa: Isa,
    p: &[f32],
    heads: usize,
    hd: usize,
    v: &[half::f16],
    stride: usize,
    n: usize,
    o: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni if hd <= x86::MAX_HEAD => x86::values_f16(p, heads, hd, v, stride, n, o),
        _ => {
            let mut row = vec![0f32; hd];
            for j in 0..n {
                halfs_to_f32(isa, &v[j * stride..j * stride + hd], &mut row);
                for h in 0..heads {
                    axpy(isa, &mut o[h * hd..(h + 1) * hd], p[h * n + j], &row);
                }
            }
        }
    }
}

/// Rows of 32-value blocks (`src.len()` a multiple of 32) to ggml Q8_0 bytes, as a
/// rebuilt BitStack tile is rounded for the integer kernels. The SIMD path scales by
/// 127/amax with ties to even (as the activations), the scalar one is ggml's reference:
/// they differ only at exact halves.
pub fn quantize_q8_0(isa: Isa, src: &[f32], dst: &mut [u8]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => x86::quantize_q8_0(src, dst),
        // Lengths match by the caller's construction: Q8_0 rows of whole blocks.
        _ => {
            let _ = cairn_formats::quant::quantize(GgmlType::Q8_0, src, dst);
        }
    }
}

/// `out[j] += ±Σ_r u[r]·v[r·n + j]` (minus where bit `j` of `signs` is set): one row of
/// a BitStack block `S ⊙ (u vᵀ)` added to a rebuilt row of `n = out.len()` values.
pub fn sign_rank_row(isa: Isa, u: &[f32], v: &[f32], signs: &[u8], out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => x86::sign_rank_row(u, v, signs, out),
        _ => scalar::sign_rank_row(u, v, signs, out),
    }
}

/// Round every value to the nearest f16 (ties to even) and back, as the f16 cache path
/// rounds queries and softmax weights.
pub fn round_f16_slice(isa: Isa, x: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => x86::round_f16_slice(x),
        _ => x.iter_mut().for_each(|v| *v = round_f16(*v)),
    }
}

/// `y += a · x` (attention's weighted sum of values).
pub fn axpy(isa: Isa, y: &mut [f32], a: f32, x: &[f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => x86::axpy(y, a, x),
        _ => scalar::axpy(y, a, x),
    }
}

/// `out[i] = w_i · x` for consecutive weight rows of `row_bytes` bytes each.
/// `ty` must satisfy [`supports`]; lengths are the caller's invariant.
pub fn matvec(isa: Isa, ty: GgmlType, w: &[u8], row_bytes: usize, x: Q8Row<'_>, out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => x86::matvec(isa, ty, w, row_bytes, x, out),
        #[cfg(target_arch = "aarch64")]
        Isa::NeonDot => neon::matvec(ty, w, row_bytes, x, out),
        _ => scalar::matvec(ty, w, row_bytes, x, out),
    }
}

/// Whether this instruction set has kernels for weights repacked by [`repack::repack`].
pub fn has_packed(isa: Isa) -> bool {
    matches!(isa, Isa::Avx2 | Isa::Avx512Vnni | Isa::NeonDot)
}

/// Repacked weights × every row of `x` (`out[t * rows + r]`); only where [`has_packed`].
pub fn packed(isa: Isa, ty: GgmlType, packed: &[u8], rows: usize, x: &Q8Acts, out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => x86::packed(isa, ty, packed, rows, x, out),
        #[cfg(target_arch = "aarch64")]
        Isa::NeonDot => neon::packed(ty, packed, rows, x, out),
        _ => {
            let _ = (ty, packed, rows, x, out);
            unreachable!("no repacked kernels for {}", isa.name())
        }
    }
}

/// `out[t * rows + r] = w_r · x_t` for every weight row r and activation row t: the
/// tile loop of prefill.
pub fn matmul(isa: Isa, ty: GgmlType, w: &[u8], row_bytes: usize, x: &Q8Acts, out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => x86::matmul(isa, ty, w, row_bytes, x, out),
        _ => {
            let rows = w.len() / row_bytes;
            for r in 0..rows {
                for t in 0..x.rows {
                    let mut o = [0f32];
                    matvec(isa, ty, &w[r * row_bytes..(r + 1) * row_bytes], row_bytes, x.row(t), &mut o);
                    out[t * rows + r] = o[0];
                }
            }
        }
    }
}
