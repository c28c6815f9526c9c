//! The CUDA kernels of `shaders/cuda/`, run on the host emulator (`EmuDevice`), against
//! the CPU backend: every kernel of the launch contract (shaders/cuda/README.md) with
//! the contract's launch configurations, every storage type on odd shapes, attention
//! with GQA, windows and a ring cache over several calls; and the emulator itself
//! (barriers, shuffles, dp4a, atomics), so that a broken emulator cannot pass silently.
//! Skipped with a message where g++ is missing, unless CAIRN_REQUIRE_TOOLS=1.
#![cfg(unix)]

mod common;

use std::sync::OnceLock;

use cairn::backend::cpu::CpuBackend;
use cairn::backend::cuda::device::{Arg, DevPtr, Device, Launch};
use cairn::backend::cuda::emu::EmuDevice;
use cairn::backend::{AttnParams, Backend, RopeStyle};
use cairn_formats::bitstack::{Block, BlockShape};
use cairn_formats::{FineType, GgmlType};
use common::max_rel_diff;
use common::weights::{f32_bytes, norm_weight, random, weight_file};

/// f32 results where only the summation order differs (as runtime/tests/wgpu.rs).
const OP_TOL: f32 = 1e-4;
/// Attention: both sides round q, the cache and the softmax weights to f16, but `exp`
/// differs by an ulp now and then, which can move a weight by one f16 step.
const ATTN_TOL: f32 = 2e-3;

fn emu() -> Option<&'static EmuDevice> {
    static D: OnceLock<Option<EmuDevice>> = OnceLock::new();
    D.get_or_init(|| {
        let have = std::process::Command::new("g++").arg("--version").output().is_ok_and(|o| o.status.success());
        if !have {
            assert!(std::env::var_os("CAIRN_REQUIRE_TOOLS").is_none(), "CAIRN_REQUIRE_TOOLS is set but g++ is missing");
            eprintln!("skipping: no g++ on this machine to build the CUDA emulator");
            return None;
        }
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda-emu");
        Some(EmuDevice::new(&dir).expect("g++ is present, so the emulator must build"))
    })
    .as_ref()
}

/// Device memory freed on drop.
struct Buf<'a> {
    dev: &'a EmuDevice,
    ptr: DevPtr,
    len: usize,
}

impl Drop for Buf<'_> {
    fn drop(&mut self) {
        self.dev.free(self.ptr);
    }
}

impl Buf<'_> {
    fn arg(&self) -> Arg {
        Arg::Ptr(self.ptr)
    }

    fn bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        self.dev.download(self.ptr, &mut v).unwrap();
        v
    }

    fn f32s(&self) -> Vec<f32> {
        self.bytes().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }
}

fn bytes<'a>(d: &'a EmuDevice, b: &[u8]) -> Buf<'a> {
    let ptr = d.alloc(b.len()).unwrap();
    d.upload(ptr, b).unwrap();
    Buf { dev: d, ptr, len: b.len() }
}

fn floats<'a>(d: &'a EmuDevice, v: &[f32]) -> Buf<'a> {
    bytes(d, &f32_bytes(v))
}

fn u32s<'a>(d: &'a EmuDevice, v: &[u32]) -> Buf<'a> {
    bytes(d, &v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>())
}

fn zeros(d: &EmuDevice, len: usize) -> Buf<'_> {
    Buf { dev: d, ptr: d.alloc(len).unwrap(), len }
}

fn u(x: usize) -> Arg {
    Arg::U32(x as u32)
}

fn cpu_ref() -> CpuBackend {
    CpuBackend::reference(2).unwrap()
}

/// The kernel suffix of a type, and the FineQuant arguments (bits, sym, group).
fn kernel_type(ty: GgmlType) -> (&'static str, Vec<Arg>) {
    let name = match ty {
        GgmlType::F32 => "f32",
        GgmlType::F16 => "f16",
        GgmlType::Q4_0 => "q4_0",
        GgmlType::Q4_1 => "q4_1",
        GgmlType::Q5_0 => "q5_0",
        GgmlType::Q5_1 => "q5_1",
        GgmlType::Q8_0 => "q8_0",
        GgmlType::Q4K => "q4_k",
        GgmlType::Q5K => "q5_k",
        GgmlType::Q6K => "q6_k",
        GgmlType::Fine(f) => return ("fine", vec![u(f.bits() as usize), u(f.sym() as usize), u(f.group())]),
        other => panic!("no kernel for {other:?}"),
    };
    (name, vec![])
}

const TYPES: [GgmlType; 10] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// Every FineQuant width and symmetry, groups of 32 and 64 over rows of 512, and groups
/// of 128 over rows of 576 (a short last group of 64).
fn fine_types() -> Vec<(GgmlType, usize)> {
    let mut v = Vec::new();
    for (bits, sym) in [(2u8, false), (3, false), (4, false), (4, true), (8, true)] {
        for (group, k) in [(32, 512), (64, 512), (128, 576)] {
            v.push((GgmlType::Fine(FineType::new(bits, sym, group).unwrap()), k));
        }
    }
    v
}

/// The 8-bit activations quantize_q8 must produce, as (bytes, x dequantized from them).
fn q8_host(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let (mut out, mut deq) = (Vec::new(), Vec::new());
    for b in x.chunks_exact(32) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let d = amax / 127.0;
        out.extend(d.to_le_bytes());
        for &v in b {
            let q = (v * inv).round_ties_even() as i8;
            out.push(q as u8);
            deq.push(d * q as f32);
        }
    }
    (out, deq)
}

/// matvec_<T> (n = 1, 8-bit activations for the integer types) and matmul_<T> (every n
/// of `ns`) of a random `k`-wide matrix of `m` rows stored as `ty`, against the CPU's f32
/// reference path. The matvec of an integer type is compared with the CPU on x as the
/// kernel sees it (dequantized from its 8-bit blocks), so the comparison stays tight.
fn check_matmul(d: &EmuDevice, ty: GgmlType, k: usize, m: usize, ns: &[usize]) {
    let c = cpu_ref();
    let file = weight_file(ty, k, m, 7 + ty.id() as u64 + k as u64);
    let t = file.tensor("w", &[k as u64, m as u64]).unwrap();
    let wc = c.load_weight(&t).unwrap();
    let rb = ty.row_bytes(k as u64).unwrap() as usize;
    let w = bytes(d, t.bytes());
    let (name, extra) = kernel_type(ty);
    let integer = !matches!(ty, GgmlType::F32 | GgmlType::F16);

    let x = random(k, 3);
    let xb = floats(d, &x);
    let y = zeros(d, 4 * m);
    let xin = if integer {
        let xq = zeros(d, k / 32 * 36);
        d.launch("quantize_q8", Launch::linear(k / 32, 256), &[xb.arg(), xq.arg(), u(1), u(k)]).unwrap();
        xq
    } else {
        floats(d, &x)
    };
    let mut args = vec![w.arg(), xin.arg(), y.arg(), u(k), u(m), u(rb)];
    args.extend(&extra);
    d.launch(&format!("matvec_{name}"), Launch::grid2(m.div_ceil(4), 1, 128), &args).unwrap();
    let xs = if integer { q8_host(&x).1 } else { x.clone() };
    let want = c.to_host(c.matmul(&c.upload(&xs, 1, k), &wc));
    let diff = max_rel_diff(&y.f32s(), &want);
    assert!(diff < OP_TOL, "{ty} matvec 1x{k} by {m}: relative difference {diff}");

    for &n in ns {
        let x = random(n * k, n as u64);
        let (xb, y) = (floats(d, &x), zeros(d, 4 * n * m));
        let mut args = vec![w.arg(), xb.arg(), y.arg(), u(n), u(k), u(m), u(rb)];
        args.extend(&extra);
        d.launch(&format!("matmul_{name}"), Launch::grid2(m.div_ceil(64), n.div_ceil(64), 256), &args).unwrap();
        let want = c.to_host(c.matmul(&c.upload(&x, n, k), &wc));
        let diff = max_rel_diff(&y.f32s(), &want);
        assert!(diff < OP_TOL, "{ty} matmul {n}x{k} by {m}: relative difference {diff}");
    }
}

/// embed_<T> of a 30-row table against the CPU's rows: equal to the bit.
fn check_embed(d: &EmuDevice, ty: GgmlType, dim: usize) {
    let c = cpu_ref();
    let file = weight_file(ty, dim, 30, 11);
    let t = file.tensor("w", &[dim as u64, 30]).unwrap();
    let wc = c.load_weight(&t).unwrap();
    let ids = [3u32, 0, 29, 3, 17];
    let (table, idb, out) = (bytes(d, t.bytes()), u32s(d, &ids), zeros(d, 4 * ids.len() * dim));
    let (name, extra) = kernel_type(ty);
    let rb = ty.row_bytes(dim as u64).unwrap() as usize;
    let mut args = vec![table.arg(), idb.arg(), out.arg(), u(ids.len()), u(dim), u(rb), Arg::F32(0.5)];
    args.extend(extra);
    d.launch(&format!("embed_{name}"), Launch::linear(ids.len() * dim, 256), &args).unwrap();
    let want = c.to_host(c.embed(&wc, &ids, 0.5).unwrap());
    assert_eq!(out.f32s(), want, "{ty} embedding");
}

#[test]
fn quantize_q8_matches_the_host_rule() {
    let Some(d) = emu() else { return };
    let (n, k) = (3, 96);
    let mut x = random(n * k, 9);
    x[32..64].fill(0.0); // an all-zero block: scale 0, codes 0
    x[70] = 2.5; // a block whose maximum sits mid-block
    let (xb, xq) = (floats(d, &x), zeros(d, n * k / 32 * 36));
    d.launch("quantize_q8", Launch::linear(n * k / 32, 256), &[xb.arg(), xq.arg(), u(n), u(k)]).unwrap();
    assert_eq!(xq.bytes(), q8_host(&x).0);
}

#[test]
fn matmul_every_type() {
    let Some(d) = emu() else { return };
    for ty in TYPES {
        // 37 rows: a partial row tile and a partial last warp block; 1 and 19 tokens:
        // one partial token tile; 70: two token tiles.
        check_matmul(d, ty, 512, 37, &[1, 19, 70]);
    }
    // F32 and F16 rows of any width (pieces cut short at the end of the row).
    for ty in [GgmlType::F32, GgmlType::F16] {
        check_matmul(d, ty, 100, 37, &[1, 19]);
    }
    // Several row tiles, the last one partial.
    check_matmul(d, GgmlType::Q4K, 256, 130, &[19]);
}

#[test]
fn fine_matmul_every_width_and_group() {
    let Some(d) = emu() else { return };
    for (ty, k) in fine_types() {
        check_matmul(d, ty, k, 37, &[1, 19]);
    }
}

#[test]
fn embed_every_type_equals_the_cpu() {
    let Some(d) = emu() else { return };
    for ty in TYPES {
        check_embed(d, ty, 512);
    }
    check_embed(d, GgmlType::F16, 100);
    for (ty, k) in fine_types() {
        check_embed(d, ty, k);
    }
}

/// The (cos, sin) table the backend computes on the host: rows pos0.., hd/2 pairs, f64.
fn rope_table(pos0: usize, n: usize, hd: usize, base: f32) -> Vec<f32> {
    let mut t = Vec::new();
    for r in 0..n {
        for i in 0..hd / 2 {
            let theta = (pos0 + r) as f64 * (base as f64).powf(-2.0 * i as f64 / hd as f64);
            let (sin, cos) = theta.sin_cos();
            t.extend([cos as f32, sin as f32]);
        }
    }
    t
}

#[test]
fn small_ops_match_the_cpu() {
    let Some(d) = emu() else { return };
    let c = cpu_ref();
    let (n, cols) = (7, 192);
    let x = random(n * cols, 1);
    let yv = random(n * cols, 2);
    let (xc, yc) = (c.upload(&x, n, cols), c.upload(&yv, n, cols));
    let (xb, yb) = (floats(d, &x), floats(d, &yv));
    let close = |what: &str, got: Vec<f32>, want: &[f32]| {
        let diff = max_rel_diff(&got, want);
        assert!(diff < OP_TOL, "{what}: relative difference {diff}");
    };
    // A whole-row norm, a per-head one, and a row wider than the block.
    for (rows, len) in [(n, cols), (n * 3, 64), (1, 700)] {
        let xs = random(rows * len, 4);
        let f = norm_weight(len);
        let t = f.tensor("n", &[len as u64]).unwrap();
        let wc = c.load_weight(&t).unwrap();
        let (xb, wb, out) = (floats(d, &xs), bytes(d, t.bytes()), zeros(d, 4 * rows * len));
        let args = [xb.arg(), wb.arg(), out.arg(), u(rows), u(len), Arg::F32(1e-5)];
        d.launch("rms_norm", Launch::grid2(rows, 1, 256), &args).unwrap();
        close(&format!("rms_norm {len}"), out.f32s(), &c.rms_norm(&c.upload(&xs, rows, len), &wc, 1e-5).data);
    }
    for (style, halves) in [(RopeStyle::Adjacent, 0), (RopeStyle::Halves, 1)] {
        let (hd, pos0) = (64, 1000);
        let mut b = c.upload(&x, n, cols);
        c.rope(&mut b, hd, pos0, 10000.0, style);
        let (xg, tb) = (floats(d, &x), floats(d, &rope_table(pos0, n, hd, 10000.0)));
        let args = [xg.arg(), tb.arg(), u(n), u(cols), u(hd), u(halves)];
        d.launch("rope", Launch::linear(n * cols / 2, 256), &args).unwrap();
        close(&format!("rope {style:?}"), xg.f32s(), &b.data);
    }
    let len = n * cols;
    let out = zeros(d, 4 * len);
    d.launch("swiglu", Launch::linear(len, 256), &[xb.arg(), yb.arg(), out.arg(), u(len)]).unwrap();
    close("swiglu", out.f32s(), &c.swiglu(&xc, &yc).data);
    // Large arguments too: tanh saturates.
    let big: Vec<f32> = x.iter().map(|v| v * 30.0).collect();
    let bb = floats(d, &big);
    d.launch("geglu", Launch::linear(len, 256), &[bb.arg(), yb.arg(), out.arg(), u(len)]).unwrap();
    close("geglu", out.f32s(), &c.geglu(&c.upload(&big, n, cols), &yc).data);
    // add in place: y is a.
    let mut want = c.upload(&x, n, cols);
    c.add_assign(&mut want, &yc);
    let a = floats(d, &x);
    d.launch("add", Launch::linear(len, 256), &[a.arg(), yb.arg(), a.arg(), u(len)]).unwrap();
    close("add", a.f32s(), &want.data);
}

/// A KV cache on the emulator: `slots` positions of `width` f16 values.
struct Cache<'a> {
    kc: Buf<'a>,
    vc: Buf<'a>,
    slots: usize,
}

/// Append `n` rows at `pos0` and attend for them, `chunk` query rows per launch (a ring
/// needs chunk ≤ slots − window + 1), as the backend launches kv_store and attend.
#[allow(clippy::too_many_arguments)]
fn emu_attention(
    d: &EmuDevice,
    cache: &Cache,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    pos0: usize,
    p: AttnParams,
    chunk: usize,
) -> Vec<f32> {
    let (qw, kw) = (p.n_heads * p.head_dim, p.n_kv_heads * p.head_dim);
    let mut out = Vec::new();
    for c0 in (0..n).step_by(chunk) {
        let cn = chunk.min(n - c0);
        let (kb, vb) = (floats(d, &k[c0 * kw..(c0 + cn) * kw]), floats(d, &v[c0 * kw..(c0 + cn) * kw]));
        let args = [kb.arg(), vb.arg(), cache.kc.arg(), cache.vc.arg(), u(cn), u(kw), u(pos0 + c0), u(cache.slots)];
        d.launch("kv_store", Launch::linear(cn * kw, 256), &args).unwrap();
        let (qb, ob) = (floats(d, &q[c0 * qw..(c0 + cn) * qw]), zeros(d, 4 * cn * qw));
        let args = [
            qb.arg(),
            cache.kc.arg(),
            cache.vc.arg(),
            ob.arg(),
            u(cn),
            u(p.n_heads),
            u(p.n_heads / p.n_kv_heads),
            u(p.head_dim),
            u(pos0 + c0),
            u(kw),
            u(p.window.unwrap_or(0)),
            Arg::F32(p.scale),
            u(cache.slots),
        ];
        d.launch("attend", Launch::grid2(p.n_heads, cn, 128), &args).unwrap();
        out.extend(ob.f32s());
    }
    out
}

/// Calls of `steps` rows each (prefills and decode steps) through the emulator and the
/// CPU's fast path (f16 cache and roundings), compared call by call.
fn check_attention(d: &EmuDevice, p: AttnParams, steps: &[usize], slots: usize, chunk: usize, what: &str) {
    let c = CpuBackend::new(2).unwrap();
    let (qw, kw) = (p.n_heads * p.head_dim, p.n_kv_heads * p.head_dim);
    let total: usize = steps.iter().sum();
    let mut kc = c.kv_new(p.n_kv_heads, p.head_dim, total).unwrap();
    let cache = Cache { kc: zeros(d, 2 * slots * kw), vc: zeros(d, 2 * slots * kw), slots };
    let mut pos = 0;
    for (step, &n) in steps.iter().enumerate() {
        let s = 100 * step as u64 + p.head_dim as u64;
        let (q, k, v) = (random(n * qw, 10 + s), random(n * kw, 20 + s), random(n * kw, 30 + s));
        let got = emu_attention(d, &cache, &q, &k, &v, n, pos, p, chunk);
        let want =
            c.attention(&c.upload(&q, n, qw), &c.upload(&k, n, kw), &c.upload(&v, n, kw), &mut kc, pos, p).unwrap();
        let diff = max_rel_diff(&got, &want.data);
        assert!(diff < ATTN_TOL, "{what}, call {step} ({n} rows at {pos}): relative difference {diff}");
        pos += n;
    }
}

#[test]
fn attention_matches_the_cpu() {
    let Some(d) = emu() else { return };
    // A prefill, decode steps, then a second prefill after the cached positions.
    let steps = [9, 1, 1, 1, 5];
    for (window, n_heads, n_kv_heads, head_dim) in
        [(None, 6, 2, 64), (Some(5), 6, 2, 64), (None, 6, 2, 128), (None, 2, 1, 256), (None, 3, 3, 64)]
    {
        let p = AttnParams { n_heads, n_kv_heads, head_dim, scale: 1.0 / (head_dim as f32).sqrt(), window };
        let what = format!("attention {n_heads}/{n_kv_heads} heads of {head_dim}, window {window:?}");
        check_attention(d, p, &steps, 32, 32, &what);
    }
    // More positions than one block's 128 threads (several pass-2 chunks).
    let p = AttnParams { n_heads: 4, n_kv_heads: 2, head_dim: 64, scale: 0.125, window: None };
    check_attention(d, p, &[150, 1, 1], 160, 160, "attention over 150 positions");
}

/// A sliding-window layer's ring of window + chunk − 1 slots: a prefill longer than the
/// ring (launched 8 queries at a time) and decode steps past its wrap.
#[test]
fn sliding_window_ring_matches_the_cpu() {
    let Some(d) = emu() else { return };
    let (window, chunk) = (5, 8);
    let p = AttnParams { n_heads: 6, n_kv_heads: 2, head_dim: 64, scale: 0.125, window: Some(window) };
    check_attention(d, p, &[30, 1, 1, 1, 4], window + chunk - 1, chunk, "ring attention");
}

/// Every active block of a BitStack matrix through stack_matvec / stack_matmul (the
/// first writes, the others add), against the CPU backend at several active counts.
#[cfg(feature = "cli")]
#[test]
fn bitstack_matches_the_cpu() {
    use common::stack::{small_model, stacked};
    let Some(d) = emu() else { return };
    let c = cpu_ref();
    let a = stacked(&small_model(), 3);
    let stack = a.stack.as_ref().unwrap();
    let levels: Vec<usize> = stack.weights.iter().map(|w| w.levels()).collect();
    for name in ["blk.0.attn_q.weight", "blk.1.ffn_down.weight", "blk.1.ffn_up.weight"] {
        let i = stack.weights.iter().position(|w| w.name == name).unwrap();
        let w = &stack.weights[i];
        let wc = c.load_stack(w).unwrap();
        let s = w.shape;
        let blocks: Vec<Buf> = (0..w.levels()).map(|l| bytes(d, w.block(l).bytes)).collect();
        for active in [1, 3, 2] {
            let mut counts = levels.clone();
            counts[i] = active;
            stack.set_counts(&counts).unwrap();
            for n in [1, 19] {
                let x = random(n * s.n, 40 + n as u64);
                let want = c.to_host(c.matmul(&c.upload(&x, n, s.n), &wc));
                let got = stack_product(d, &blocks[..active], s, &x, n);
                let diff = max_rel_diff(&got, &want);
                assert!(diff < OP_TOL, "{name} with {active} blocks, {n} tokens: relative difference {diff}");
            }
        }
    }
}

/// y = x Wᵀ over the given blocks of one shape, as the backend launches them.
fn stack_product(d: &EmuDevice, blocks: &[Buf], s: BlockShape, x: &[f32], n: usize) -> Vec<f32> {
    let (xb, y) = (floats(d, x), zeros(d, 4 * n * s.m));
    for (level, b) in blocks.iter().enumerate() {
        let tail = [u(s.k), u(s.u_offset()), u(s.v_offset()), u(s.sign_row_bytes()), u(usize::from(level > 0))];
        if n == 1 {
            let mut args = vec![b.arg(), xb.arg(), y.arg(), u(s.n), u(s.m)];
            args.extend(tail);
            d.launch("stack_matvec", Launch::grid2(s.m.div_ceil(4), 1, 128), &args).unwrap();
        } else {
            let mut args = vec![b.arg(), xb.arg(), y.arg(), u(n), u(s.n), u(s.m)];
            args.extend(tail);
            d.launch("stack_matmul", Launch::grid2(s.m.div_ceil(64), n.div_ceil(64), 256), &args).unwrap();
        }
    }
    y.f32s()
}

/// Odd BitStack shapes (37 rows, 100 inputs: a sign row ending mid-byte, a partial
/// k step; rank 5 and the largest rank, 64) against the block's own definition in the
/// formats crate, summed in f64.
#[test]
fn bitstack_odd_shapes_match_the_format() {
    let Some(d) = emu() else { return };
    for (m, k, rank) in [(37, 100, 5), (70, 96, 64)] {
        let s = BlockShape::new(m, k, rank).unwrap();
        let neg = |i: usize, j: usize| (i * 7 + j * 3) % 5 < 2;
        let encoded = [
            s.encode(neg, &random(m * rank, 1), &random(rank * k, 2)).unwrap(),
            s.encode(|i, j| !neg(i, j), &random(m * rank, 3), &random(rank * k, 4)).unwrap(),
        ];
        let blocks: Vec<Buf> = encoded.iter().map(|e| bytes(d, e)).collect();
        for n in [1, 19, 70] {
            let x = random(n * k, 5 + n as u64);
            let mut want = vec![0f64; n * m];
            for e in &encoded {
                let b = Block::new(s, e).unwrap();
                for t in 0..n {
                    for i in 0..m {
                        for j in 0..k {
                            let w: f64 = (0..rank).map(|r| b.u(i, r) as f64 * b.v(r, j) as f64).sum();
                            let w = if b.negative(i, j) { -w } else { w };
                            want[t * m + i] += w * x[t * k + j] as f64;
                        }
                    }
                }
            }
            let want: Vec<f32> = want.into_iter().map(|v| v as f32).collect();
            let diff = max_rel_diff(&stack_product(d, &blocks, s, &x, n), &want);
            assert!(diff < OP_TOL, "BitStack {m}x{k} rank {rank}, {n} tokens: relative difference {diff}");
        }
    }
}

/// kv_store rounds to f16 exactly as the half crate: ties to even, subnormals,
/// overflow to infinity, NaN kept.
#[test]
fn f16_rounding_matches_the_half_crate() {
    let Some(d) = emu() else { return };
    let mut x = vec![
        0.0,
        -0.0,
        1.0,
        65504.0,
        65519.0,
        65520.0,
        1e6,
        -1e6,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        6.1e-5,
        5.96e-8,
        2.98e-8,
        2.9802322e-8,
        1e-10,
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
        -3.3333,
        f32::MIN_POSITIVE,
    ];
    // Every f16 boundary region: random values over many binades.
    x.extend(random(4000, 8).iter().enumerate().map(|(i, v)| v * 2f32.powi(i as i32 % 60 - 35)));
    let n = x.len();
    let (kb, kc, vc) = (floats(d, &x), zeros(d, 2 * n), zeros(d, 2 * n));
    let args = [kb.arg(), kb.arg(), kc.arg(), vc.arg(), u(1), u(n), u(0), u(1)];
    d.launch("kv_store", Launch::linear(n, 256), &args).unwrap();
    let got: Vec<u16> = kc.bytes().chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
    for (i, (&g, &v)) in got.iter().zip(&x).enumerate() {
        let want = half::f16::from_f32(v);
        if want.is_nan() {
            assert!(half::f16::from_bits(g).is_nan(), "value {i} ({v}): {g:#06x} is not NaN");
        } else {
            assert_eq!(g, want.to_bits(), "value {i} ({v:e})");
        }
    }
}

#[test]
fn emulator_barrier_holds_every_thread() {
    let Some(d) = emu() else { return };
    let (blocks, threads, rounds) = (3usize, 256usize, 5usize);
    for active in [threads, 200, 37] {
        let out = zeros(d, 4 * blocks * threads);
        d.launch("selftest_barrier", Launch::grid2(blocks, 1, threads as u32), &[out.arg(), u(rounds), u(active)])
            .unwrap();
        let got: Vec<u32> = out.bytes().chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        for b in 0..blocks {
            for t in 0..active {
                let nb = (t + 1) % active;
                let want: usize = (0..rounds).map(|r| (r + 1) * (nb + 1) + b).sum();
                assert_eq!(got[b * threads + t] as usize, want, "block {b} thread {t} ({active} active)");
            }
        }
    }
}

#[test]
fn emulator_shuffles_stay_in_their_warp() {
    let Some(d) = emu() else { return };
    let n = 128;
    let x: Vec<f32> = (0..n).map(|i| (i * i % 97) as f32).collect();
    let (xb, out) = (floats(d, &x), zeros(d, 16 * n));
    d.launch("selftest_shuffle", Launch::grid2(2, 1, 64), &[xb.arg(), out.arg()]).unwrap();
    let got = out.f32s();
    for i in 0..n {
        let (w, lane) = (i / 32 * 32, i % 32);
        let sum: f32 = x[w..w + 32].iter().sum();
        let down = if lane + 5 < 32 { x[i + 5] } else { x[i] };
        assert_eq!(got[4 * i..4 * i + 4], [sum, down, x[w + 3], x[i ^ 1]], "lane {i}");
    }
}

#[test]
fn emulator_dp4a_and_atomics() {
    let Some(d) = emu() else { return };
    let vals = random(300, 12);
    let a: Vec<i32> = vals.iter().map(|v| (v * 2e9) as i32).collect();
    let b: Vec<i32> = vals.iter().rev().map(|v| (v * 1.7e9) as i32).collect();
    let c: Vec<i32> = (0..300).map(|i| i * 1000 - 150_000).collect();
    let up = |v: &[i32]| bytes(d, &v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>());
    let (ab, bb, cb, out) = (up(&a), up(&b), up(&c), zeros(d, 4 * 300));
    d.launch("selftest_dp4a", Launch::linear(300, 256), &[ab.arg(), bb.arg(), cb.arg(), out.arg(), u(300)]).unwrap();
    let got: Vec<i32> = out.bytes().chunks_exact(4).map(|x| i32::from_le_bytes([x[0], x[1], x[2], x[3]])).collect();
    for i in 0..300 {
        let (x, y) = (a[i].to_le_bytes(), b[i].to_le_bytes());
        let want = c[i] + (0..4).map(|j| x[j] as i8 as i32 * y[j] as i8 as i32).sum::<i32>();
        assert_eq!(got[i], want, "dp4a {i}");
    }
    let (f, n) = (zeros(d, 4), zeros(d, 4));
    d.launch("selftest_atomic", Launch::grid2(5, 1, 256), &[f.arg(), n.arg()]).unwrap();
    assert_eq!(f.f32s(), [640.0]);
    assert_eq!(n.bytes(), 1280u32.to_le_bytes());
}

#[test]
fn emulator_refuses_bad_launches() {
    let Some(d) = emu() else { return };
    let y = zeros(d, 64);
    let ok = [y.arg(), y.arg(), y.arg(), u(4)];
    assert!(d.launch("no_such_kernel", Launch::linear(4, 256), &ok).is_err());
    assert!(d.launch("add", Launch::linear(4, 256), &ok[..3]).is_err(), "too few arguments");
    assert!(d.launch("add", Launch { grid: [1, 1, 1], block: [2048, 1, 1] }, &ok).is_err(), "block too large");
    assert!(d.launch("add", Launch::linear(4, 256), &[y.arg(), Arg::Ptr(8), y.arg(), u(4)]).is_err(), "wild pointer");
    assert!(d.upload(y.ptr + 60, &[0u8; 8]).is_err(), "upload past the end");
    assert!(d.copy(y.ptr, y.ptr + 32, 64).is_err(), "copy past the end");
    d.launch("add", Launch::linear(4, 256), &ok).unwrap();
    d.sync().unwrap();
}
