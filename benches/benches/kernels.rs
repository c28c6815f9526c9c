//! The hot kernels at SmolLM2-135M's shapes: quantized matvec (decode) and matmul
//! (prefill) per weight type (ggml's and FineQuant's), attention at several context
//! lengths, norms, RoPE.

use cairn::backend::cpu::kernels::{self, Isa, Q8Acts};
use cairn::backend::cpu::CpuBackend;
use cairn::backend::{AttnParams, Backend, RopeStyle};
use cairn::synthetic::SplitMix;
use cairn_formats::{quant, FineType, GgmlType};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn random(rng: &mut SplitMix, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.next_f32()).collect()
}

fn weights(ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let mut rng = SplitMix(1);
    // Row by row: FineQuant types encode one row at a time (their last group may be short).
    let rb = ty.row_bytes(cols as u64).expect("row size") as usize;
    let mut w = vec![0u8; rows * rb];
    let x = random(&mut rng, rows * cols);
    for (dst, src) in w.chunks_exact_mut(rb).zip(x.chunks_exact(cols)) {
        quant::quantize(ty, src, dst).expect("quantize");
    }
    w
}

/// FineQuant and RTN types as `cairn convert` writes them.
fn fine(bits: u8, group: usize) -> GgmlType {
    GgmlType::Fine(FineType::new(bits, bits == 8, group).expect("fine type"))
}

/// (rows, cols) of SmolLM2's matrices: q/o, k/v, gate/up, down, the output head.
const SHAPES: [(usize, usize); 5] = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)];

fn matvec(c: &mut Criterion) {
    let mut g = c.benchmark_group("matvec");
    let mut rng = SplitMix(2);
    for isa in Isa::available() {
        let types = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q8_0, fine(4, 64), fine(4, 128)];
        let types = types.into_iter().chain([fine(8, 64), fine(3, 32), fine(2, 32)]);
        for ty in types {
            for (rows, cols) in SHAPES {
                let w = weights(ty, rows, cols);
                let mut q = Q8Acts::default();
                q.quantize(&random(&mut rng, cols), 1, cols);
                let mut out = vec![0f32; rows];
                g.throughput(Throughput::Bytes(w.len() as u64));
                let id = BenchmarkId::new(format!("{}/{ty}", isa.name()), format!("{rows}x{cols}"));
                g.bench_function(id, |b| b.iter(|| kernels::matvec(isa, ty, &w, w.len() / rows, q.row(0), &mut out)));
            }
        }
    }
}

fn matmul(c: &mut Criterion) {
    let mut g = c.benchmark_group("matmul");
    g.sample_size(10);
    let mut rng = SplitMix(3);
    let n = 64;
    for isa in Isa::available() {
        for ty in [GgmlType::Q4_1, GgmlType::Q8_0, fine(4, 64), fine(8, 64), fine(2, 32)] {
            for (rows, cols) in [(576, 576), (1536, 576), (576, 1536)] {
                let w = weights(ty, rows, cols);
                let mut q = Q8Acts::default();
                q.quantize(&random(&mut rng, n * cols), n, cols);
                let mut out = vec![0f32; rows * n];
                g.throughput(Throughput::Elements((2 * rows * cols * n) as u64));
                let id = BenchmarkId::new(format!("{}/{ty}", isa.name()), format!("{rows}x{cols}x{n}"));
                g.bench_function(id, |b| b.iter(|| kernels::matmul(isa, ty, &w, w.len() / rows, &q, &mut out)));
            }
        }
    }
}

fn attention_and_small_ops(c: &mut Criterion) {
    let be = CpuBackend::new(1).expect("backend");
    let mut rng = SplitMix(4);
    let p = AttnParams { n_heads: 9, n_kv_heads: 3, head_dim: 64, scale: 0.125, window: None };
    let mut g = c.benchmark_group("attention_decode");
    for ctx in [128, 512, 2048, 8192] {
        let mut kv = be.kv_new(3, 64, ctx + 1).expect("kv");
        let k = be.upload(&random(&mut rng, ctx * 192), ctx, 192);
        let v = be.upload(&random(&mut rng, ctx * 192), ctx, 192);
        let q = be.upload(&random(&mut rng, ctx * 576), ctx, 576);
        be.attention(&q, &k, &v, &mut kv, 0, p).expect("fill");
        let q1 = be.upload(&random(&mut rng, 576), 1, 576);
        let k1 = be.upload(&random(&mut rng, 192), 1, 192);
        g.bench_function(BenchmarkId::from_parameter(ctx), |b| {
            b.iter(|| {
                be.attention(&q1, &k1, &k1, &mut kv, ctx, p).expect("attend");
                cairn::backend::KvLayer::truncate(&mut kv, ctx);
            })
        });
    }
    drop(g);
    let mut g = c.benchmark_group("small_ops");
    let mut x = be.upload(&random(&mut rng, 576), 1, 576);
    g.bench_function("rope 9x64", |b| b.iter(|| be.rope(&mut x, 64, 100, 100000.0, RopeStyle::Adjacent)));
    let gate = be.upload(&random(&mut rng, 1536), 1, 1536);
    g.bench_function("swiglu 1536", |b| b.iter(|| be.swiglu(&gate, &gate)));
}

/// BitStack decode through int8 register tables: one block of rank k at SmolLM2's
/// shapes, the table build and the row pass (one thread) apart.
fn bitstack_lut(c: &mut Criterion) {
    use kernels::lut;
    let mut g = c.benchmark_group("bitstack_lut");
    let mut rng = SplitMix(3);
    let isa = Isa::detect();
    for k in [4usize, 8, 16] {
        for (m, n) in [(576usize, 576usize), (1536, 576), (576, 1536)] {
            let v: Vec<u8> =
                random(&mut rng, k * n).iter().flat_map(|&f| half::f16::from_f32(f).to_le_bytes()).collect();
            let rb = n.div_ceil(8);
            let signs: Vec<u8> = (0..m * rb).map(|_| (rng.next_f32() * 256.0) as u8).collect();
            let u = random(&mut rng, m * k);
            let x = random(&mut rng, n);
            let mut y = vec![0f32; m];
            g.throughput(Throughput::Elements((m * n) as u64));
            g.bench_function(BenchmarkId::new(format!("build/k{k}"), format!("{m}x{n}")), |b| {
                b.iter(|| lut::build(isa, &[(&v, n, k)], &x))
            });
            let t = lut::build(isa, &[(&v, n, k)], &x).remove(0);
            #[cfg(target_arch = "x86_64")]
            if isa != Isa::Scalar && lut::avx2_rank(k) {
                g.bench_function(BenchmarkId::new(format!("rows_avx2/k{k}"), format!("{m}x{n}")), |b| {
                    // SAFETY: an ISA above scalar on x86 has AVX2 and FMA.
                    b.iter(|| unsafe { lut::rows_avx2(&t, &signs, &u, 0, &mut y) })
                });
            }
            g.bench_function(BenchmarkId::new(format!("rows_scalar/k{k}"), format!("{m}x{n}")), |b| {
                b.iter(|| lut::rows_scalar(&t, &signs, &u, 0, &mut y))
            });
        }
    }
}

criterion_group!(benches, matvec, matmul, attention_and_small_ops, bitstack_lut);
criterion_main!(benches);
