//! The top-k singular triplets of a matrix without a full SVD: randomized subspace
//! iteration (a block of k + 8 vectors, products with A and Aᵀ split across threads),
//! stopped when the Ritz values settle, then Rayleigh–Ritz on the k + 8 dimensional
//! subspace through a small symmetric Jacobi eigensolver. A full SVD of a 1536 × 576
//! matrix costs about as much as 40 products with a 24-wide block, and BitStack needs
//! one per matrix and level.

use rayon::prelude::*;

/// Extra vectors beyond k: the gap they open makes the top k converge quickly.
const OVERSAMPLE: usize = 8;

/// `A ≈ U diag(s) Vᵀ`: `u` is `m × k`, `vt` is `k × n`, both row-major; `s` descending.
#[derive(Debug, Clone)]
pub struct Svd {
    pub u: Vec<f32>,
    pub s: Vec<f32>,
    pub vt: Vec<f32>,
}

/// When subspace iteration stops.
#[derive(Debug, Clone, Copy)]
pub struct IterOptions {
    /// Stop when every one of the top k Ritz values moved by at most this fraction.
    pub tol: f64,
    pub max_iters: usize,
    pub seed: u64,
}

impl Default for IterOptions {
    fn default() -> Self {
        IterOptions { tol: 1e-4, max_iters: 30, seed: 0x5eed }
    }
}

/// A small deterministic generator (xorshift64*), so conversions are reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

/// `A Q`: `A` is `m × n`, `Q` is `n × b` → `m × b` (all row-major).
pub fn a_times(a: &[f32], m: usize, n: usize, q: &[f32], b: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * b];
    y.par_chunks_mut(b * 8).enumerate().for_each(|(c, ys)| {
        for (di, yr) in ys.chunks_exact_mut(b).enumerate() {
            let ar = &a[(c * 8 + di) * n..(c * 8 + di + 1) * n];
            for (&aij, qr) in ar.iter().zip(q.chunks_exact(b)) {
                for (y, &q) in yr.iter_mut().zip(qr) {
                    *y += aij * q;
                }
            }
        }
    });
    debug_assert_eq!(y.len(), m * b);
    y
}

/// `Aᵀ Y`: `A` is `m × n`, `Y` is `m × b` → `n × b`; threads own runs of columns.
pub fn at_times(a: &[f32], m: usize, n: usize, y: &[f32], b: usize) -> Vec<f32> {
    const COLS: usize = 32;
    let mut z = vec![0f32; n * b];
    z.par_chunks_mut(COLS * b).enumerate().for_each(|(c, zs)| {
        let j0 = c * COLS;
        let w = zs.len() / b;
        for i in 0..m {
            let ar = &a[i * n + j0..i * n + j0 + w];
            let yr = &y[i * b..(i + 1) * b];
            for (&aij, zr) in ar.iter().zip(zs.chunks_exact_mut(b)) {
                for (z, &y) in zr.iter_mut().zip(yr) {
                    *z += aij * y;
                }
            }
        }
    });
    z
}

/// Orthonormalize the `b` columns of a row-major `rows × b` matrix (modified
/// Gram–Schmidt, twice: "twice is enough" for f32). A column that vanishes (rank
/// deficiency) is replaced by a random one.
fn orthonormalize(q: &mut [f32], rows: usize, b: usize, rng: &mut Rng) {
    for _pass in 0..2 {
        for c in 0..b {
            for p in 0..c {
                let d: f64 = (0..rows).map(|i| q[i * b + c] as f64 * q[i * b + p] as f64).sum();
                for i in 0..rows {
                    q[i * b + c] -= (d * q[i * b + p] as f64) as f32;
                }
            }
            let mut norm: f64 = (0..rows).map(|i| (q[i * b + c] as f64).powi(2)).sum::<f64>().sqrt();
            if norm < 1e-20 {
                for i in 0..rows {
                    q[i * b + c] = rng.next();
                }
                for p in 0..c {
                    let d: f64 = (0..rows).map(|i| q[i * b + c] as f64 * q[i * b + p] as f64).sum();
                    for i in 0..rows {
                        q[i * b + c] -= (d * q[i * b + p] as f64) as f32;
                    }
                }
                norm = (0..rows).map(|i| (q[i * b + c] as f64).powi(2)).sum::<f64>().sqrt().max(1e-30);
            }
            for i in 0..rows {
                q[i * b + c] = (q[i * b + c] as f64 / norm) as f32;
            }
        }
    }
}

/// Eigen-decomposition of a symmetric `b × b` matrix (row-major) by cyclic Jacobi:
/// eigenvalues descending and the eigenvectors as columns of a row-major `b × b`.
pub fn sym_eig(g: &[f64], b: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = g.to_vec();
    let mut v = vec![0f64; b * b];
    for i in 0..b {
        v[i * b + i] = 1.0;
    }
    let total: f64 = a.iter().map(|x| x * x).sum();
    for _sweep in 0..100 {
        let off: f64 = (0..b)
            .flat_map(|i| (0..b).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * b + j].powi(2))
            .sum();
        if off <= 1e-30 * total.max(1e-300) {
            break;
        }
        for p in 0..b {
            for q in p + 1..b {
                let apq = a[p * b + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * b + q] - a[p * b + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..b {
                    let (akp, akq) = (a[k * b + p], a[k * b + q]);
                    a[k * b + p] = c * akp - s * akq;
                    a[k * b + q] = s * akp + c * akq;
                }
                for k in 0..b {
                    let (apk, aqk) = (a[p * b + k], a[q * b + k]);
                    a[p * b + k] = c * apk - s * aqk;
                    a[q * b + k] = s * apk + c * aqk;
                }
                for k in 0..b {
                    let (vkp, vkq) = (v[k * b + p], v[k * b + q]);
                    v[k * b + p] = c * vkp - s * vkq;
                    v[k * b + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..b).collect();
    order.sort_by(|&x, &y| a[y * b + y].total_cmp(&a[x * b + x]));
    let vals = order.iter().map(|&i| a[i * b + i]).collect();
    let mut vecs = vec![0f64; b * b];
    for (c, &i) in order.iter().enumerate() {
        for r in 0..b {
            vecs[r * b + c] = v[r * b + i];
        }
    }
    (vals, vecs)
}

/// `ZᵀZ` of a row-major `rows × b` matrix, in f64.
fn gram(z: &[f32], b: usize) -> Vec<f64> {
    let mut g = vec![0f64; b * b];
    for zr in z.chunks_exact(b) {
        for p in 0..b {
            let zp = zr[p] as f64;
            for q in p..b {
                g[p * b + q] += zp * zr[q] as f64;
            }
        }
    }
    for p in 0..b {
        for q in 0..p {
            g[p * b + q] = g[q * b + p];
        }
    }
    g
}

/// The Ritz triplets of `A` on the subspace spanned by the orthonormal `y` (`m × b`),
/// given `z = Aᵀ y`: `A ≈ y yᵀ A = y zᵀ`, so the SVD of `zᵀ` gives them.
fn ritz(y: &[f32], z: &[f32], m: usize, n: usize, b: usize, k: usize) -> (Svd, Vec<f64>) {
    let (vals, w) = sym_eig(&gram(z, b), b);
    let sig: Vec<f64> = vals.iter().map(|&l| l.max(0.0).sqrt()).collect();
    let mut u = vec![0f32; m * k];
    for (ur, yr) in u.chunks_exact_mut(k).zip(y.chunks_exact(b)) {
        for (r, o) in ur.iter_mut().enumerate() {
            *o = (0..b).map(|c| yr[c] as f64 * w[c * b + r]).sum::<f64>() as f32;
        }
    }
    let mut vt = vec![0f32; k * n];
    for r in 0..k {
        let inv = if sig[r] > 0.0 { 1.0 / sig[r] } else { 0.0 };
        for (j, zr) in z.chunks_exact(b).enumerate() {
            vt[r * n + j] = ((0..b).map(|c| zr[c] as f64 * w[c * b + r]).sum::<f64>() * inv) as f32;
        }
    }
    let s = sig[..k].iter().map(|&x| x as f32).collect();
    (Svd { u, s, vt }, sig)
}

/// The top `k` singular triplets of the row-major `m × n` matrix `a`.
pub fn top_k(a: &[f32], m: usize, n: usize, k: usize, opts: IterOptions) -> Svd {
    assert!(k >= 1 && k <= m.min(n) && a.len() == m * n, "top_k: bad shape");
    let b = (k + OVERSAMPLE).min(m.min(n));
    let mut rng = Rng(opts.seed | 1);
    let mut q: Vec<f32> = (0..n * b).map(|_| rng.next()).collect();
    orthonormalize(&mut q, n, b, &mut rng);
    let mut prev: Option<Vec<f64>> = None;
    for it in 0..opts.max_iters.max(1) {
        let mut y = a_times(a, m, n, &q, b);
        orthonormalize(&mut y, m, b, &mut rng);
        let z = at_times(a, m, n, &y, b);
        let sig: Vec<f64> = {
            let (vals, _) = sym_eig(&gram(&z, b), b);
            vals.iter().map(|&l| l.max(0.0).sqrt()).collect()
        };
        let settled = prev
            .as_ref()
            .is_some_and(|p| (0..k).all(|i| (sig[i] - p[i]).abs() <= opts.tol * sig[i].max(sig[0] * 1e-12)));
        if settled || it + 1 == opts.max_iters.max(1) {
            return ritz(&y, &z, m, n, b, k).0;
        }
        prev = Some(sig);
        q = z;
        orthonormalize(&mut q, n, b, &mut rng);
    }
    unreachable!("the loop returns on its last iteration")
}

/// A full SVD through the eigen-decomposition of `AᵀA` in f64: the reference for
/// tests on small matrices (`n` up to a few hundred).
pub fn dense_svd(a: &[f32], m: usize, n: usize) -> Svd {
    let mut g = vec![0f64; n * n];
    for ar in a.chunks_exact(n) {
        for p in 0..n {
            for q in 0..n {
                g[p * n + q] += ar[p] as f64 * ar[q] as f64;
            }
        }
    }
    let (vals, w) = sym_eig(&g, n);
    let k = m.min(n);
    let s: Vec<f64> = vals[..k].iter().map(|&l| l.max(0.0).sqrt()).collect();
    let mut vt = vec![0f32; k * n];
    let mut u = vec![0f32; m * k];
    for r in 0..k {
        for j in 0..n {
            vt[r * n + j] = w[j * n + r] as f32;
        }
        for i in 0..m {
            let d: f64 = (0..n).map(|j| a[i * n + j] as f64 * w[j * n + r]).sum();
            u[i * k + r] = if s[r] > 0.0 { (d / s[r]) as f32 } else { 0.0 };
        }
    }
    Svd { u, s: s.iter().map(|&x| x as f32).collect(), vt }
}
