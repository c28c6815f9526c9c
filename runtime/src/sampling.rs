//! Choosing the next token from the model's logits.
//!
//! The chain and its defaults follow llama.cpp's (`common_params_sampling`), so that
//! settings users know from llama.cpp mean the same here:
//! repetition penalties → top-k → top-p → min-p → temperature → draw.
//! Temperature comes last, as in llama.cpp: top-p and min-p pick the allowed set from
//! the untempered distribution, and temperature only reshapes the odds inside it.
//! A temperature ≤ 0 means greedy decoding (argmax after the penalties).

/// Sampling settings. `Default` gives llama.cpp's defaults; [`SamplerConfig::greedy`]
/// gives plain argmax decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerConfig {
    /// Divides logits before drawing; ≤ 0 means greedy.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one's probability; 0 keeps all.
    pub min_p: f32,
    /// Seen tokens: positive logits divided by this, negative ones multiplied; 1 disables.
    pub repeat_penalty: f32,
    /// How many of the most recent history tokens the penalties look at; 0 disables them.
    pub repeat_last_n: usize,
    /// Subtracted once from the logit of every token seen in the window.
    pub presence_penalty: f32,
    /// Subtracted from a seen token's logit once per occurrence in the window.
    pub frequency_penalty: f32,
    /// Seed of the random generator: same seed, same logits → same tokens.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0x5EED,
        }
    }
}

impl SamplerConfig {
    /// Argmax decoding with no penalties: what the llama.cpp reference outputs use.
    pub fn greedy() -> Self {
        SamplerConfig { temperature: 0.0, ..SamplerConfig::default() }
    }

    fn penalties_active(&self) -> bool {
        self.repeat_last_n > 0
            && (self.repeat_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0)
    }
}

/// Where a sampling setting came from, so that `cairn info` can say why a model
/// samples the way it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A command-line flag or request field.
    Flag,
    /// The model file's `general.sampling.*` metadata (its author's recommendation).
    Metadata,
    /// Cairn's registry entry for a known model.
    Registry,
    /// [`SamplerConfig::default`] (llama.cpp's generic defaults).
    BuiltIn,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Origin::Flag => "flag",
            Origin::Metadata => "metadata",
            Origin::Registry => "registry",
            Origin::BuiltIn => "built-in",
        })
    }
}

/// Sampling settings that may each be absent: what a model file, a registry entry or
/// the user asks for. Layers of them resolve into one [`SamplerConfig`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplingHints {
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub repeat_last_n: Option<usize>,
    pub presence_penalty: Option<f32>,
}

/// The `general.sampling.*` keys llama.cpp defines (gguf-py `Keys.General.SAMPLING_*`)
/// that this sampler implements; mirostat, XTC and the sequence key are not.
pub const META_TEMP: &str = "general.sampling.temp";
pub const META_TOP_K: &str = "general.sampling.top_k";
pub const META_TOP_P: &str = "general.sampling.top_p";
pub const META_MIN_P: &str = "general.sampling.min_p";
pub const META_PENALTY_REPEAT: &str = "general.sampling.penalty_repeat";
pub const META_PENALTY_LAST_N: &str = "general.sampling.penalty_last_n";

/// The settings [`SamplingHints`] carries, in the order `cairn info` shows them.
pub const SETTINGS: [&str; 7] =
    ["temp", "top-k", "top-p", "min-p", "repeat-penalty", "repeat-last-n", "presence-penalty"];

impl SamplingHints {
    /// Nothing recommended (a `const` [`Default`], for static tables).
    pub const NONE: SamplingHints = SamplingHints {
        temperature: None,
        top_k: None,
        top_p: None,
        min_p: None,
        repeat_penalty: None,
        repeat_last_n: None,
        presence_penalty: None,
    };

    /// The recommendations in a model's metadata. A value of the wrong type or out of
    /// range is ignored (with a warning): a bad key must not make a model unusable.
    pub fn from_metadata(meta: &[(String, cairn_formats::MetaValue)]) -> SamplingHints {
        let get = |key: &str| meta.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        let float = |key: &str, ok: fn(f64) -> bool| -> Option<f32> {
            let v = get(key)?;
            match v.as_f64().filter(|&x| x.is_finite() && ok(x)) {
                Some(x) => Some(x as f32),
                None => {
                    log::warn!("ignoring {key} = {v:?}: not a number in range");
                    None
                }
            }
        };
        let count = |key: &str| -> Option<usize> {
            let v = get(key)?;
            // llama.cpp writes -1 for "the whole context"; Cairn has no such setting.
            match v.as_u64() {
                Some(x) => usize::try_from(x).ok(),
                None => {
                    log::warn!("ignoring {key} = {v:?}: not a count");
                    None
                }
            }
        };
        SamplingHints {
            temperature: float(META_TEMP, |x| x >= 0.0),
            top_k: count(META_TOP_K),
            top_p: float(META_TOP_P, |x| (0.0..=1.0).contains(&x)),
            min_p: float(META_MIN_P, |x| (0.0..=1.0).contains(&x)),
            repeat_penalty: float(META_PENALTY_REPEAT, |x| x > 0.0),
            repeat_last_n: count(META_PENALTY_LAST_N),
            presence_penalty: None,
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == SamplingHints::default()
    }
}

/// A resolved configuration and, per entry of [`SETTINGS`], where its value came from.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingDefaults {
    pub config: SamplerConfig,
    pub origins: [Origin; 7],
}

impl SamplingDefaults {
    /// Each setting from the first layer that has it (e.g. flags, then metadata, then
    /// the registry), else built in; the seed is `seed`.
    pub fn resolve(layers: &[(Origin, &SamplingHints)], seed: u64) -> SamplingDefaults {
        let d = SamplerConfig::default();
        let mut origins = [Origin::BuiltIn; 7];
        fn pick<T: Copy>(
            layers: &[(Origin, &SamplingHints)],
            origin: &mut Origin,
            get: impl Fn(&SamplingHints) -> Option<T>,
            default: T,
        ) -> T {
            for (o, h) in layers {
                if let Some(v) = get(h) {
                    *origin = *o;
                    return v;
                }
            }
            default
        }
        let [o0, o1, o2, o3, o4, o5, o6] = &mut origins;
        let config = SamplerConfig {
            temperature: pick(layers, o0, |h| h.temperature, d.temperature),
            top_k: pick(layers, o1, |h| h.top_k, d.top_k),
            top_p: pick(layers, o2, |h| h.top_p, d.top_p),
            min_p: pick(layers, o3, |h| h.min_p, d.min_p),
            repeat_penalty: pick(layers, o4, |h| h.repeat_penalty, d.repeat_penalty),
            repeat_last_n: pick(layers, o5, |h| h.repeat_last_n, d.repeat_last_n),
            presence_penalty: pick(layers, o6, |h| h.presence_penalty, d.presence_penalty),
            seed,
            ..d
        };
        SamplingDefaults { config, origins }
    }

    /// `temp 0.2 (registry), top-k 40 (built-in), ...`.
    pub fn describe(&self) -> String {
        let c = &self.config;
        let values = [
            c.temperature.to_string(),
            c.top_k.to_string(),
            c.top_p.to_string(),
            c.min_p.to_string(),
            c.repeat_penalty.to_string(),
            c.repeat_last_n.to_string(),
            c.presence_penalty.to_string(),
        ];
        SETTINGS
            .iter()
            .zip(&values)
            .zip(&self.origins)
            .map(|((name, v), o)| format!("{name} {v} ({o})"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A seed from the clock and the process, for callers that want a different draw on
/// every run (llama.cpp's default).
pub fn seed_from_time() -> u64 {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    SplitMix64(nanos ^ (u64::from(std::process::id()) << 32)).next()
}

/// SplitMix64: spreads a seed over the 256 bits xoshiro needs (any seed, even 0, works).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// xoshiro256**: small, fast and statistically strong; a dependency-free PRNG whose
/// stream is fixed by its seed on every platform.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut sm = SplitMix64(seed);
        Rng { s: [sm.next(), sm.next(), sm.next(), sm.next()] }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1), 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A token id with its (possibly adjusted) logit.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    id: u32,
    logit: f32,
}

/// Highest logit first; equal logits by lower id, so results never depend on sort
/// stability.
fn by_logit_desc(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// Draws tokens according to a [`SamplerConfig`]. Keeps its random state between calls,
/// and scratch buffers so that a step allocates nothing after the first.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: SamplerConfig,
    rng: Rng,
    candidates: Vec<Candidate>,
    counts: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Sampler {
        let rng = Rng::new(cfg.seed);
        Sampler { cfg, rng, candidates: Vec::new(), counts: Default::default() }
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Restart the random stream (e.g. for a new request with the same settings).
    pub fn reseed(&mut self, seed: u64) {
        self.cfg.seed = seed;
        self.rng = Rng::new(seed);
    }

    /// Pick the next token. `logits` (one per vocabulary entry) are modified in place by
    /// the penalties; `history` is the sequence so far (prompt and generated tokens),
    /// of which the last `repeat_last_n` are penalized. NaN logits count as −∞. An
    /// empty `logits` slice yields 0.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        for l in logits.iter_mut() {
            if l.is_nan() {
                *l = f32::NEG_INFINITY;
            }
        }
        self.apply_penalties(logits, history);
        if self.cfg.temperature <= 0.0 || self.cfg.top_k == 1 {
            return argmax(logits);
        }

        let cfg = &self.cfg;
        let c = &mut self.candidates;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| **l > f32::NEG_INFINITY)
                .map(|(i, &logit)| Candidate { id: i as u32, logit }),
        );
        if c.is_empty() {
            return argmax(logits);
        }

        // top-k
        if cfg.top_k > 0 && cfg.top_k < c.len() {
            c.select_nth_unstable_by(cfg.top_k - 1, by_logit_desc);
            c.truncate(cfg.top_k);
        }
        // top-p: the shortest prefix (most likely first) whose mass reaches p.
        if cfg.top_p < 1.0 {
            c.sort_unstable_by(by_logit_desc);
            let probs = softmax(c.iter().map(|x| x.logit), 1.0);
            let target = f64::from(cfg.top_p);
            let mut cum = 0.0;
            let mut keep = c.len();
            for (i, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= target {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep.max(1));
        }
        // min-p: p_i ≥ min_p · p_max ⇔ logit_i ≥ logit_max + ln(min_p).
        if cfg.min_p > 0.0 {
            let max = c.iter().map(|x| x.logit).fold(f32::NEG_INFINITY, f32::max);
            let threshold = max + cfg.min_p.ln();
            c.retain(|x| x.logit >= threshold);
        }

        // temperature, then draw
        let probs = softmax(c.iter().map(|x| x.logit), cfg.temperature);
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.next_f64() * total;
        for (x, p) in c.iter().zip(&probs) {
            if r < *p {
                return x.id;
            }
            r -= p;
        }
        // Rounding left r just above the total: the last candidate.
        c.last().map_or(0, |x| x.id)
    }

    /// llama.cpp's repetition, frequency and presence penalties over the window.
    fn apply_penalties(&mut self, logits: &mut [f32], history: &[u32]) {
        if !self.cfg.penalties_active() {
            return;
        }
        let window = &history[history.len().saturating_sub(self.cfg.repeat_last_n)..];
        self.counts.clear();
        for &t in window {
            *self.counts.entry(t).or_insert(0) += 1;
        }
        for (&id, &count) in &self.counts {
            let Some(l) = logits.get_mut(id as usize) else {
                continue;
            };
            // Dividing a negative logit would make the token *more* likely.
            if *l <= 0.0 {
                *l *= self.cfg.repeat_penalty;
            } else {
                *l /= self.cfg.repeat_penalty;
            }
            *l -= count as f32 * self.cfg.frequency_penalty + self.cfg.presence_penalty;
        }
    }
}

/// Index of the largest logit; the lowest index among equals; NaN never wins; 0 for an
/// empty slice. Two passes that vectorize (the maximum, then its first index): a serving
/// step runs this over the whole vocabulary for every greedy slot.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = logits.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = lanes.iter().chain(tail).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    logits.iter().position(|&l| l == max).unwrap_or(0) as u32
}

/// Probabilities of `logits / temperature`, in f64 so that long tails still sum to ~1.
fn softmax(logits: impl Iterator<Item = f32> + Clone, temperature: f32) -> Vec<f64> {
    let t = f64::from(temperature);
    let max = logits.clone().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<f64> = logits.map(|l| ((f64::from(l) - f64::from(max)) / t).exp()).collect();
    let sum: f64 = p.iter().sum();
    if sum > 0.0 {
        p.iter_mut().for_each(|x| *x /= sum);
    }
    p
}
