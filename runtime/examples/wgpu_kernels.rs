//! Where the time of the wgpu backend goes: each kernel at SmolLM2's shapes, timed
//! with a read-back after each call (so every figure includes one submission and wait).
//! `cargo run --release --example wgpu_kernels` (needs an adapter and the default model).

use cairn::backend::wgpu::WgpuBackend;
use cairn::backend::{AttnParams, Backend, RopeStyle};
use cairn::weights::ModelFile;

use std::time::Instant;
fn main() {
    let g = WgpuBackend::new().unwrap();
    let f = ModelFile::open(&cairn::pull::resolve_model(None).unwrap()).unwrap();
    let t = |name: &str, it: usize, mut f: Box<dyn FnMut()>| {
        f();
        let s = Instant::now();
        for _ in 0..it {
            f();
        }
        println!("{name}: {:.2} ms", s.elapsed().as_secs_f64() * 1e3 / it as f64);
    };
    let wq = g.load_weight(&f.tensor("blk.0.ffn_up.weight", &[576, 1536]).unwrap()).unwrap();
    let head = g.load_weight(&f.tensor("token_embd.weight", &[576, 49152]).unwrap()).unwrap();
    let nw = g.load_weight(&f.tensor("blk.0.attn_norm.weight", &[576]).unwrap()).unwrap();
    let x1 = g.upload(&[0.1; 576], 1, 576);
    let x16 = g.upload(&[0.1; 576 * 16], 16, 576);
    t(
        "sync only",
        20,
        Box::new(|| {
            g.to_host(g.rows(&x1, 0, 1));
        }),
    );
    t(
        "matmul up n=1",
        20,
        Box::new(|| {
            g.to_host(g.matmul(&x1, &wq));
        }),
    );
    t(
        "matmul up n=1 x10",
        5,
        Box::new(|| {
            let mut v = vec![];
            for _ in 0..10 {
                v.push(g.matmul(&x1, &wq));
            }
            g.to_host(v.pop().unwrap());
        }),
    );
    t(
        "matmul up n=16",
        5,
        Box::new(|| {
            g.to_host(g.matmul(&x16, &wq));
        }),
    );
    t(
        "matmul head n=1",
        5,
        Box::new(|| {
            g.to_host(g.matmul(&x1, &head));
        }),
    );
    t(
        "rms_norm n=16",
        20,
        Box::new(|| {
            g.to_host(g.rms_norm(&x16, &nw, 1e-5));
        }),
    );
    t(
        "swiglu n=16 x10",
        5,
        Box::new(|| {
            let mut v = vec![];
            for _ in 0..10 {
                v.push(g.swiglu(&x16, &x16));
            }
            g.to_host(v.pop().unwrap());
        }),
    );
    t(
        "rope n=16",
        20,
        Box::new(|| {
            let mut a = g.rows(&x16, 0, 16);
            g.rope(&mut a, 64, 0, 10000.0, RopeStyle::Adjacent);
            g.to_host(a);
        }),
    );
    let p = AttnParams { n_heads: 9, n_kv_heads: 3, head_dim: 64, scale: 0.125, window: None };
    let q = g.upload(&[0.1; 576 * 16], 16, 576);
    let k = g.upload(&[0.1; 192 * 16], 16, 192);
    t(
        "attention n=16",
        5,
        Box::new(|| {
            let mut kv = g.kv_new(3, 64, 64).unwrap();
            g.to_host(g.attention(&q, &k, &k, &mut kv, 0, p).unwrap());
        }),
    );
}
