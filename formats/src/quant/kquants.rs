//! k-quants: 256-value super-blocks with quantized per-sub-block scales.
//!
//! Byte layouts (little-endian, f16 scales), as `block_q*_K` in ggml-common.h:
//! - Q4_K (144 B): d, dmin, scales[12], qs[128]. Eight sub-blocks of 32 with a 6-bit
//!   scale and a 6-bit min each, packed as in [`scale_min`]. Each 64-value chunk c uses
//!   qs[32c..32c+32]: low nibbles are sub-block 2c, high nibbles sub-block 2c+1.
//!   y = d·scale·q − dmin·min.
//! - Q5_K (176 B): d, dmin, scales[12], qh[32], qs[128]. As Q4_K plus a 5th bit: for
//!   chunk c, bit 2c of qh[l] belongs to the low-nibble value l, bit 2c+1 to the high one.
//! - Q6_K (210 B): ql[128], qh[64], scales[16] as i8, d. Sixteen sub-blocks of 16 with an
//!   8-bit signed scale; y = d·scale·(q − 32), see [`dequant_q6_k`] for the bit order.
//!
//! Every function gets exactly one block (the caller checked the lengths). The quantizers
//! follow ggml's `quantize_row_q*_K_ref`: a weighted scale/min search per sub-block, the
//! scales quantized against the block maximum, then the values re-rounded against the
//! scales the decoder will actually see.

use super::num::{abs, as_f16, f16_at, nearest_int, put_f16, sqrt};

const QK_K: usize = crate::types::QK_K;

/// ggml's `GROUP_MAX_EPS`: below this a group counts as all zeros.
const GROUP_MAX_EPS: f32 = 1e-15;

/// Scale and min (both 6-bit) of sub-block `j` (0..8) from the 12 packed bytes: bytes
/// 0..4 hold scales 0..4, bytes 4..8 mins 0..4 (low 6 bits each); sub-blocks 4..8 keep
/// their low nibbles in bytes 8..12 and their top 2 bits in the spare top bits of 0..8.
fn scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// The inverse of [`scale_min`]: packs eight 6-bit (scale, min) pairs into 12 bytes.
fn pack_scale_min(ls: &[u8; 8], lm: &[u8; 8], s: &mut [u8]) {
    s.fill(0);
    for j in 0..8 {
        if j < 4 {
            s[j] |= ls[j];
            s[j + 4] |= lm[j];
        } else {
            s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
}

/// Shared decoder of Q4_K and Q5_K; `qh` is empty for Q4_K.
fn dequant_k(d: f32, dmin: f32, scales: &[u8], qh: &[u8], qs: &[u8], y: &mut [f32]) {
    for c in 0..4 {
        let q = &qs[32 * c..32 * c + 32];
        for half in 0..2 {
            let (sc, m) = scale_min(2 * c + half, scales);
            let (d1, m1) = (d * f32::from(sc), dmin * f32::from(m));
            let out = &mut y[64 * c + 32 * half..64 * c + 32 * half + 32];
            for (l, out) in out.iter_mut().enumerate() {
                let mut v = if half == 0 { q[l] & 0xF } else { q[l] >> 4 };
                if !qh.is_empty() {
                    v |= ((qh[l] >> (2 * c + half)) & 1) << 4;
                }
                *out = d1 * f32::from(v) - m1;
            }
        }
    }
}

pub(super) fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    dequant_k(f16_at(b, 0), f16_at(b, 2), &b[4..16], &[], &b[16..144], y);
}

pub(super) fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    dequant_k(f16_at(b, 0), f16_at(b, 2), &b[4..16], &b[16..48], &b[48..176], y);
}

/// Q6_K: each 128-value half h uses ql[64h..64h+64] and qh[32h..32h+32]. For l in 0..32,
/// the four values l, l+32, l+64, l+96 take their low 4 bits from the low nibble of
/// ql[l], ql[l+32], then the high nibble of ql[l], ql[l+32], and their top 2 bits from
/// bits 0-1, 2-3, 4-5, 6-7 of qh[l]. Every 16 values share one i8 scale.
pub(super) fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for h in 0..2 {
        let ql = &b[64 * h..64 * h + 64];
        let qh = &b[128 + 32 * h..128 + 32 * h + 32];
        let sc = &b[192 + 8 * h..192 + 8 * h + 8];
        for l in 0..32 {
            let lows = [ql[l] & 0xF, ql[l + 32] & 0xF, ql[l] >> 4, ql[l + 32] >> 4];
            for (k, low) in lows.into_iter().enumerate() {
                let q = i32::from(low | (((qh[l] >> (2 * k)) & 3) << 4)) - 32;
                let scale = f32::from(sc[l / 16 + 2 * k] as i8);
                y[128 * h + 32 * k + l] = d * scale * q as f32;
            }
        }
    }
}

/// Fits `x ≈ scale·l − min` with levels `l` in 0..=nmax and `min` ≥ 0, minimizing the
/// `w`-weighted squared error over a sweep of candidate scales (ggml's
/// `make_qkx2_quants`). Returns (scale, min); `l` receives the levels.
fn fit_scale_min(x: &[f32], w: &[f32], nmax: i32, (rmin, rdelta, nstep): (f32, f32, i32), l: &mut [u8]) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let (mut sum_w, mut sum_x) = (0.0f32, 0.0f32);
    for (&v, &w) in x.iter().zip(w) {
        min = if v < min { v } else { min };
        max = if v > max { v } else { max };
        sum_w += w;
        sum_x += w * v;
    }
    // The offset only ever subtracts: a block of positive values keeps min at 0.
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let level = |iscale: f32, v: f32, min: f32| nearest_int(iscale * (v - min)).clamp(0, nmax);

    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best = 0.0f32;
    for i in 0..n {
        l[i] = level(iscale, x[i], min) as u8;
        let diff = scale * f32::from(l[i]) + min - x[i];
        best += w[i] * diff * diff;
    }
    let mut laux = [0u8; 32];
    let laux = &mut laux[..n];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let q = level(iscale, x[i], min);
            laux[i] = q as u8;
            let q = q as f32;
            sum_l += w[i] * q;
            sum_l2 += w[i] * q * q;
            sum_xl += w[i] * q * x[i];
        }
        // Weighted least squares for (scale, min) given the levels.
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut err = 0.0f32;
            for i in 0..n {
                let diff = this_scale * f32::from(laux[i]) + this_min - x[i];
                err += w[i] * diff * diff;
            }
            if err < best {
                l.copy_from_slice(laux);
                best = err;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Shared quantizer of Q4_K (`nmax` 15) and Q5_K (`nmax` 31): returns d, dmin, the packed
/// scales and the 256 levels, which the caller packs into its bit layout.
fn quant_k(x: &[f32], nmax: i32, search: (f32, f32, i32), s: &mut [u8], l: &mut [u8; QK_K]) -> (f32, f32) {
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        // Weight big values more, but never let small ones drop to zero weight.
        let av_x = sqrt(xs.iter().map(|v| v * v).sum::<f32>() / 32.0);
        let mut w = [0.0f32; 32];
        for (w, &v) in w.iter_mut().zip(xs) {
            *w = av_x + abs(v);
        }
        (scales[j], mins[j]) = fit_scale_min(xs, &w, nmax, search, &mut l[32 * j..32 * j + 32]);
    }
    let max_scale = scales.iter().fold(0.0f32, |a, &b| if b > a { b } else { a });
    let max_min = mins.iter().fold(0.0f32, |a, &b| if b > a { b } else { a });
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        ls[j] = nearest_int(inv_scale * scales[j]).clamp(0, 63) as u8;
        lm[j] = nearest_int(inv_min * mins[j]).clamp(0, 63) as u8;
    }
    pack_scale_min(&ls, &lm, s);
    let (d, dmin) = (max_scale / 63.0, max_min / 63.0);

    // Re-round every value against the scales as stored (f16 block scales, 6-bit
    // sub-block scales), not the ideal ones the search found.
    let (dq, dminq) = (as_f16(d), as_f16(dmin));
    for j in 0..8 {
        let sd = dq * f32::from(ls[j]);
        if sd == 0.0 {
            continue;
        }
        let dm = dminq * f32::from(lm[j]);
        for i in 32 * j..32 * j + 32 {
            l[i] = nearest_int((x[i] + dm) / sd).clamp(0, nmax) as u8;
        }
    }
    (d, dmin)
}

pub(super) fn quant_q4_k(x: &[f32], b: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let (d, dmin) = quant_k(x, 15, (-1.0, 0.1, 20), &mut b[4..16], &mut l);
    put_f16(b, 0, d);
    put_f16(b, 2, dmin);
    let qs = &mut b[16..144];
    for c in 0..4 {
        for i in 0..32 {
            qs[32 * c + i] = l[64 * c + i] | (l[64 * c + 32 + i] << 4);
        }
    }
}

pub(super) fn quant_q5_k(x: &[f32], b: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let (d, dmin) = quant_k(x, 31, (-0.5, 0.1, 15), &mut b[4..16], &mut l);
    put_f16(b, 0, d);
    put_f16(b, 2, dmin);
    let (qh, qs) = b[16..176].split_at_mut(32);
    qh.fill(0);
    for c in 0..4 {
        for i in 0..32 {
            let (lo, hi) = (l[64 * c + i], l[64 * c + 32 + i]);
            qs[32 * c + i] = (lo & 0xF) | ((hi & 0xF) << 4);
            qh[i] |= ((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1));
        }
    }
}

/// Symmetric scale for 16 values with levels in −nmax..nmax−1 (stored offset by nmax into
/// `l`), chosen by an x²-weighted least-squares sweep over candidate scales (ggml's
/// `make_qx_quants` with `rmse_type` 1).
fn fit_scale_sym(x: &[f32], nmax: i32, l: &mut [u8]) -> f32 {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        if abs(v) > amax {
            amax = abs(v);
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    // Least-squares scale and its score (sumlx²/suml2, higher is better) for one candidate.
    let fit = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let q = level(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        (sumlx, suml2)
    };
    let store = |iscale: f32, l: &mut [u8]| {
        for (l, &v) in l.iter_mut().zip(x) {
            *l = (level(iscale, v) + nmax) as u8;
        }
    };
    let iscale = -(nmax as f32) / max;
    store(iscale, l);
    let (sumlx, suml2) = fit(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&is| is != 0) {
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = fit(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            store(iscale, l);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

pub(super) fn quant_q6_k(x: &[f32], b: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let mut scales = [0.0f32; 16];
    let (mut max_scale, mut max_abs) = (0.0f32, 0.0f32);
    for (j, scale) in scales.iter_mut().enumerate() {
        *scale = fit_scale_sym(&x[16 * j..16 * j + 16], 32, &mut l[16 * j..16 * j + 16]);
        if abs(*scale) > max_abs {
            max_abs = abs(*scale);
            max_scale = *scale;
        }
    }
    b.fill(0);
    if max_abs < GROUP_MAX_EPS {
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = 1.0 / iscale;
    put_f16(b, 208, d);
    let dq = as_f16(d);
    for (j, &scale) in scales.iter().enumerate() {
        let sc = nearest_int(iscale * scale).clamp(-128, 127);
        b[192 + j] = sc as i8 as u8;
        // Re-round against the scale as stored, as in Q4_K/Q5_K.
        let sd = dq * sc as f32;
        if sd == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            l[i] = (nearest_int(x[i] / sd).clamp(-32, 31) + 32) as u8;
        }
    }
    for h in 0..2 {
        let l = &l[128 * h..128 * h + 128];
        for i in 0..32 {
            let [a, c, e, g] = [l[i], l[i + 32], l[i + 64], l[i + 96]];
            b[64 * h + i] = (a & 0xF) | ((e & 0xF) << 4);
            b[64 * h + i + 32] = (c & 0xF) | ((g & 0xF) << 4);
            b[128 + 32 * h + i] = (a >> 4) | ((c >> 4) << 2) | ((e >> 4) << 4) | ((g >> 4) << 6);
        }
    }
}
