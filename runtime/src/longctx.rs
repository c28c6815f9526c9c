//! Long prompts on a token budget: GemFilter (DESIGN §5) and the baselines users compare
//! it with: SnapKV, H2O, the most recent k tokens, k random tokens.
//!
//! GemFilter and the two token baselines choose prompt tokens and run the whole model on
//! those only (positions renumbered). SnapKV and H2O run the whole prompt, then keep
//! `k` rows of every layer's cache, chosen per KV head. The selections here are pure
//! functions of host values; the passes that feed them are in `engine.rs`.

use crate::error::{Error, Result};
use crate::model::{Logits, Probe, Runner, PREFILL_CHUNK};
use crate::synthetic::SplitMix;

/// Tokens kept when no budget is given.
pub const DEFAULT_K: usize = 1024;
/// GemFilter's moving-average width over the scores.
pub const SMOOTH_WIDTH: usize = 5;
/// SnapKV: the observation window (last prompt queries, always kept) and pooling width.
pub const SNAPKV_WINDOW: usize = 32;
pub const SNAPKV_POOL: usize = 7;

/// Which layer GemFilter filters at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterLayer {
    Fixed(usize),
    /// The earliest layer that keeps the needle in nearly all calibration cases
    /// (measured once per model, then cached).
    Auto,
}

/// How a long prompt is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Full,
    GemFilter { k: usize, layer: FilterLayer },
    SnapKv { k: usize },
    H2o { k: usize },
    Recent { k: usize },
    Random { k: usize, seed: u64 },
}

pub const METHOD_NAMES: &[&str] = &["full", "gemfilter", "snapkv", "h2o", "recent", "random"];

impl Method {
    /// `--gemfilter [k=1024][,layer=N|auto]`; an empty spec takes the defaults.
    pub fn parse_gemfilter(spec: &str) -> Result<Method> {
        let (mut k, mut layer) = (DEFAULT_K, FilterLayer::Auto);
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some(("k", v)) => k = parse_k(v)?,
                Some(("layer", "auto")) => layer = FilterLayer::Auto,
                Some(("layer", v)) => {
                    layer = FilterLayer::Fixed(
                        v.parse().map_err(|_| Error::input(format!("--gemfilter: layer {v:?} is not a number")))?,
                    )
                }
                _ => {
                    return Err(Error::input(format!(
                        "--gemfilter: {part:?} is not understood (expected k=N and/or layer=N|auto)"
                    )))
                }
            }
        }
        Ok(Method::GemFilter { k, layer })
    }

    /// A method by name, at budget `k` (`layer` only matters for GemFilter).
    pub fn by_name(name: &str, k: usize, layer: FilterLayer, seed: u64) -> Result<Method> {
        if k == 0 && name != "full" {
            return Err(Error::input("a budget of k = 0 tokens keeps nothing: k must be at least 1"));
        }
        Ok(match name {
            "full" => Method::Full,
            "gemfilter" => Method::GemFilter { k, layer },
            "snapkv" => Method::SnapKv { k },
            "h2o" => Method::H2o { k },
            "recent" => Method::Recent { k },
            "random" => Method::Random { k, seed },
            other => {
                return Err(Error::input(format!("unknown method {other:?} (known: {})", METHOD_NAMES.join(", "))))
            }
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::GemFilter { .. } => "gemfilter",
            Method::SnapKv { .. } => "snapkv",
            Method::H2o { .. } => "h2o",
            Method::Recent { .. } => "recent",
            Method::Random { .. } => "random",
        }
    }

    /// The token budget (`None`: everything).
    pub fn budget(&self) -> Option<usize> {
        match *self {
            Method::Full => None,
            Method::GemFilter { k, .. }
            | Method::SnapKv { k }
            | Method::H2o { k }
            | Method::Recent { k }
            | Method::Random { k, .. } => Some(k),
        }
    }
}

fn parse_k(v: &str) -> Result<usize> {
    let k = parse_count(v).ok_or_else(|| Error::input(format!("k {v:?} is not a number of tokens")))?;
    if k == 0 {
        return Err(Error::input("k = 0 keeps no tokens: k must be at least 1"));
    }
    Ok(k)
}

/// `1024`, `1k`, `8K` → tokens.
pub fn parse_count(v: &str) -> Option<usize> {
    let v = v.trim();
    match v.strip_suffix(['k', 'K']) {
        Some(n) => n.parse::<usize>().ok()?.checked_mul(1024),
        None => v.parse().ok(),
    }
}

/// GemFilter's first pass: layers `0..=r` over all of `ids`, in chunks, on a cache of
/// those layers only (no later layer ever sees the prompt); returns layer `r`'s
/// post-RoPE query of the last token and its cached keys.
pub fn filter_pass(runner: &dyn Runner, ids: &[u32], r: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let n_layers = runner.config().n_layers;
    if r >= n_layers {
        return Err(Error::input(format!("filter layer {r} does not exist: the model has {n_layers} layers (0..)")));
    }
    if ids.is_empty() {
        return Err(Error::input("empty prompt"));
    }
    let mut cache = runner.new_partial_cache(ids.len(), r + 1)?;
    let mut probe =
        Probe { stop_after: Some(r), queries_from: Some(ids.len() - 1), queries_layer: Some(r), ..Probe::default() };
    for chunk in ids.chunks(PREFILL_CHUNK) {
        runner.forward_probe(cache.as_mut(), chunk, Logits::Last, &mut probe)?;
    }
    let q = probe.queries.get(r).cloned().ok_or_else(|| Error::model("the filter layer recorded no query"))?;
    Ok((q, runner.layer_keys(cache.as_mut(), r)?))
}

/// GemFilter's raw scores: for every key row `j`, Σ over heads `h` of `q_h · k_{g(h), j}`
/// (no scaling, no softmax). `q`: one row of `n_heads · hd`; `keys`: rows of
/// `n_kv · hd`.
pub fn gemfilter_scores(q: &[f32], keys: &[f32], n_heads: usize, n_kv: usize, hd: usize) -> Vec<f32> {
    let group = n_heads / n_kv;
    // Summing the group's queries first is the same sum with one dot per KV head.
    let mut qg = vec![0f32; n_kv * hd];
    for h in 0..n_heads {
        let g = h / group;
        for (a, b) in qg[g * hd..(g + 1) * hd].iter_mut().zip(&q[h * hd..(h + 1) * hd]) {
            *a += b;
        }
    }
    keys.chunks_exact(n_kv * hd).map(|row| dot(&qg, row)).collect()
}

/// Moving average of `width` (odd) centred on each value, zero-padded at the ends and
/// always divided by `width` (PyTorch's `avg_pool1d` with padding, as the papers use).
pub fn smooth(s: &[f32], width: usize) -> Vec<f32> {
    let half = width / 2;
    (0..s.len())
        .map(|i| s[i.saturating_sub(half)..(i + half + 1).min(s.len())].iter().sum::<f32>() / width as f32)
        .collect()
}

/// Indices of the `k` largest values (ties: the earlier index), ascending.
pub fn top_k_ascending(s: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..s.len()).collect();
    if k < s.len() {
        idx.select_nth_unstable_by(k, |&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
        idx.truncate(k);
    }
    idx.sort_unstable();
    idx
}

/// GemFilter's selection from the filter layer's last query and keys.
pub fn gemfilter_select(q: &[f32], keys: &[f32], n_heads: usize, n_kv: usize, hd: usize, k: usize) -> Vec<usize> {
    top_k_ascending(&smooth(&gemfilter_scores(q, keys, n_heads, n_kv, hd), SMOOTH_WIDTH), k)
}

/// The last `k` of `n` tokens.
pub fn recent_select(n: usize, k: usize) -> Vec<usize> {
    (n.saturating_sub(k)..n).collect()
}

/// `k` of `n` tokens uniformly at random (seeded), ascending.
pub fn random_select(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let k = k.min(n);
    let mut rng = SplitMix(seed);
    for i in 0..k {
        let j = i + (rng.next_u64() % (n - i) as u64) as usize;
        idx.swap(i, j);
    }
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// SnapKV's rows for one layer, per KV head: the last `SNAPKV_WINDOW` rows, plus the
/// `k − window` earlier rows the window's queries attend to most (softmax weights summed
/// over the window and the group's heads, average-pooled over `SNAPKV_POOL` rows).
/// `queries`: the window's query rows (`n_heads · hd` each) at rows `n − w..n`.
pub fn snapkv_select(
    queries: &[f32],
    scale: f32,
    keys: &[f32],
    shape: (usize, usize, usize),
    k: usize,
) -> Vec<Vec<usize>> {
    let (n_heads, n_kv, hd) = shape;
    let n = keys.len() / (n_kv * hd);
    if k >= n {
        return vec![(0..n).collect(); n_kv];
    }
    let w = (queries.len() / (n_heads * hd)).min(n).min(k);
    let prefix = n - w;
    let group = n_heads / n_kv;
    let key = |j: usize, g: usize| &keys[j * n_kv * hd + g * hd..j * n_kv * hd + (g + 1) * hd];
    (0..n_kv)
        .map(|g| {
            let mut votes = vec![0f32; prefix];
            let mut scores = vec![0f32; n];
            for t in 0..w {
                let pos = prefix + t;
                for h in g * group..(g + 1) * group {
                    let q = &queries[(t * n_heads + h) * hd..(t * n_heads + h + 1) * hd];
                    let mut max = f32::NEG_INFINITY;
                    for (j, s) in scores[..=pos].iter_mut().enumerate() {
                        *s = dot(q, key(j, g)) * scale;
                        max = max.max(*s);
                    }
                    let mut sum = 0f32;
                    for s in scores[..=pos].iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    for (v, s) in votes.iter_mut().zip(&scores[..prefix]) {
                        *v += s / sum;
                    }
                }
            }
            let mut keep = top_k_ascending(&smooth(&votes, SNAPKV_POOL), k - w);
            keep.extend(prefix..n);
            keep
        })
        .collect()
}

/// H2O's rows for one KV head: the most recent `k / 2`, and the rest of the budget to the
/// earlier rows with the largest accumulated attention ("heavy hitters").
pub fn h2o_select(mass: &[f32], k: usize) -> Vec<usize> {
    let n = mass.len();
    if k >= n {
        return (0..n).collect();
    }
    let recent = k / 2;
    let mut keep = top_k_ascending(&mass[..n - recent], k - recent);
    keep.extend(n - recent..n);
    keep
}

/// A dot product in eight independent lanes, so that the compiler vectorizes it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_specs() {
        assert_eq!(Method::parse_gemfilter("").unwrap(), Method::GemFilter { k: 1024, layer: FilterLayer::Auto });
        assert_eq!(
            Method::parse_gemfilter("k=512,layer=7").unwrap(),
            Method::GemFilter { k: 512, layer: FilterLayer::Fixed(7) }
        );
        assert_eq!(Method::parse_gemfilter("k=2k").unwrap(), Method::GemFilter { k: 2048, layer: FilterLayer::Auto });
        assert!(Method::parse_gemfilter("k=0").is_err());
        assert!(Method::parse_gemfilter("k=x").is_err());
        assert!(Method::parse_gemfilter("layer=-1").is_err());
        assert!(Method::parse_gemfilter("depth=3").is_err());
        assert!(Method::by_name("streaming", 8, FilterLayer::Auto, 0).is_err());
        assert!(Method::by_name("snapkv", 0, FilterLayer::Auto, 0).is_err());
    }

    #[test]
    fn smoothing_and_top_k() {
        assert_eq!(smooth(&[5.0, 0.0, 0.0, 0.0, 5.0], 5), vec![1.0, 1.0, 2.0, 1.0, 1.0]);
        assert_eq!(top_k_ascending(&[0.1, 3.0, 2.0, 3.0, -1.0], 3), vec![1, 2, 3]);
        assert_eq!(top_k_ascending(&[1.0, 1.0, 1.0], 2), vec![0, 1]);
        assert_eq!(top_k_ascending(&[1.0, 2.0], 5), vec![0, 1]);
    }

    #[test]
    fn token_baselines() {
        assert_eq!(recent_select(10, 3), vec![7, 8, 9]);
        let r = random_select(100, 10, 7);
        assert_eq!(r.len(), 10);
        assert!(r.windows(2).all(|w| w[0] < w[1]) && r[9] < 100);
        assert_eq!(random_select(100, 10, 7), r);
        assert_ne!(random_select(100, 10, 8), r);
    }

    #[test]
    fn h2o_keeps_recent_and_heavy() {
        let mass = [9.0, 0.1, 5.0, 0.2, 0.0, 0.0];
        assert_eq!(h2o_select(&mass, 4), vec![0, 2, 4, 5]);
        assert_eq!(h2o_select(&mass, 6), vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn snapkv_keeps_the_window_and_what_it_attends_to() {
        // One head, head_dim 2: keys point along x except row 3, which the queries match.
        let (hd, n) = (2, 40);
        let mut keys = vec![0f32; n * hd];
        for j in 0..n {
            keys[j * hd] = 1.0;
        }
        keys[3 * hd] = 0.0;
        keys[3 * hd + 1] = 10.0;
        let queries: Vec<f32> = (0..SNAPKV_WINDOW).flat_map(|_| [0.0, 1.0]).collect();
        let k = SNAPKV_WINDOW + 2;
        let keep = snapkv_select(&queries, 1.0, &keys, (1, 1, hd), k);
        assert_eq!(keep.len(), 1);
        let keep = &keep[0];
        assert_eq!(keep.len(), k);
        // Pooling spreads row 3's weight over its neighbours: two rows near it are kept.
        assert!(keep[0] <= 6 && keep[1] <= 6, "{keep:?}");
        assert_eq!(keep[2..], (n - SNAPKV_WINDOW..n).collect::<Vec<_>>()[..]);
        assert_eq!(snapkv_select(&queries, 1.0, &keys, (1, 1, hd), n), vec![(0..n).collect::<Vec<_>>()]);
    }
}
