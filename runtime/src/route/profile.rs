//! Expert profiles (DESIGN §5 step 1): what a request costs on each expert, measured
//! once by `cairn route profile` and kept current by moving averages as requests run.
//! Stored as `REGISTRY.profile.json` beside the registry.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::energy::EnergyReader;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::sampling::{Sampler, SamplerConfig};

const FORMAT: u32 = 1;

/// Weight of a new observation in the moving averages: about the last ten requests count.
pub const EMA_ALPHA: f64 = 0.1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Prompt tokens per second past the fixed start cost.
    pub prefill_tps: f64,
    /// Generated tokens per second.
    pub decode_tps: f64,
    /// Seconds a request costs before its first prompt token (for a remote expert: the
    /// server's, the round trip is apart).
    pub start_s: f64,
    pub prefill_j_per_token: f64,
    pub decode_j_per_token: f64,
    /// The energy reader behind the joules, and whether they are an estimate.
    pub energy_source: String,
    pub energy_estimate: bool,
    /// Remote experts: the network's round trip and transfer rate (bytes/s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_bps: Option<f64>,
    /// Requests folded in since the profile was measured.
    #[serde(default)]
    pub observed: u64,
}

/// One finished request as the router saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub prefill_j: f64,
    pub decode_j: f64,
}

/// A request's predicted cost.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cost {
    pub latency_s: f64,
    pub energy_j: f64,
}

impl Profile {
    /// Latency and energy of a request of `prompt` tokens and `new` generated ones,
    /// moving `bytes` over the network if the expert is remote.
    pub fn predict(&self, prompt: usize, new: usize, bytes: usize) -> Cost {
        let net = self.rtt_s.unwrap_or(0.0) + self.transfer_bps.map_or(0.0, |r| bytes as f64 / r);
        Cost {
            latency_s: self.start_s + net + prompt as f64 / self.prefill_tps + new as f64 / self.decode_tps,
            energy_j: prompt as f64 * self.prefill_j_per_token + new as f64 * self.decode_j_per_token,
        }
    }

    /// [`Profile::predict`] for a remote expert mixed token by token: it is asked once
    /// per generated token, so each token after the first pays a round trip and the
    /// server's start cost again (a local expert's cost is unchanged).
    pub fn predict_stepped(&self, prompt: usize, new: usize, bytes: usize) -> Cost {
        let mut c = self.predict(prompt, new, bytes);
        if let Some(rtt) = self.rtt_s {
            c.latency_s += new.saturating_sub(1) as f64 * (rtt + self.start_s);
        }
        c
    }

    /// Fold a finished request into the moving averages (per-token costs; phases with
    /// no tokens leave their rates alone).
    pub fn observe(&mut self, o: &Observation) {
        let ema = |old: f64, new: f64| if new.is_finite() && new > 0.0 { old + EMA_ALPHA * (new - old) } else { old };
        if o.prompt_tokens > 0 && o.prefill_s > 0.0 {
            let spt = (o.prefill_s - self.start_s).max(0.1 * o.prefill_s) / o.prompt_tokens as f64;
            self.prefill_tps = 1.0 / ema(1.0 / self.prefill_tps, spt);
            self.prefill_j_per_token = ema(self.prefill_j_per_token, o.prefill_j / o.prompt_tokens as f64);
        }
        if o.new_tokens > 0 && o.decode_s > 0.0 {
            self.decode_tps = 1.0 / ema(1.0 / self.decode_tps, o.decode_s / o.new_tokens as f64);
            self.decode_j_per_token = ema(self.decode_j_per_token, o.decode_j / o.new_tokens as f64);
        }
        self.observed += 1;
    }

    fn check(&self, name: &str) -> Result<()> {
        let rates = [("prefill_tps", self.prefill_tps), ("decode_tps", self.decode_tps)];
        for (what, v) in rates {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::input(format!("{name}: {what} must be a positive number, not {v}")));
            }
        }
        let costs = [
            ("start_s", self.start_s),
            ("prefill_j_per_token", self.prefill_j_per_token),
            ("decode_j_per_token", self.decode_j_per_token),
            ("rtt_s", self.rtt_s.unwrap_or(0.0)),
        ];
        for (what, v) in costs {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::input(format!("{name}: {what} must be ≥ 0, not {v}")));
            }
        }
        if self.transfer_bps.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
            return Err(Error::input(format!("{name}: transfer_bps must be positive")));
        }
        Ok(())
    }
}

/// Every expert's profile, by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profiles {
    pub format: u32,
    pub experts: BTreeMap<String, Profile>,
}

impl Profiles {
    pub fn new() -> Profiles {
        Profiles { format: FORMAT, experts: BTreeMap::new() }
    }

    pub fn load(path: &Path) -> Result<Profiles> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Profiles::parse(&text).map_err(|e| Error::input(format!("{}: {e}", path.display())))
    }

    pub fn parse(text: &str) -> Result<Profiles> {
        let p: Profiles = serde_json::from_str(text).map_err(|e| Error::input(format!("not a profile file: {e}")))?;
        if p.format != FORMAT {
            return Err(Error::input(format!("profile format {} (this cairn reads {FORMAT})", p.format)));
        }
        for (name, prof) in &p.experts {
            prof.check(name)?;
        }
        Ok(p)
    }

    /// Write through a temporary file, so a crash never leaves half a profile.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text =
            serde_json::to_string_pretty(self).map_err(|e| Error::model(format!("cannot write the profile: {e}")))?;
        let tmp = path.with_extension("json.tmp");
        let io = |source| Error::Io { path: path.to_path_buf(), source };
        std::fs::write(&tmp, text + "\n").map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// The profile of each of `names`, in order; a missing one names the command that
    /// makes it.
    pub fn for_experts(&self, names: &[String]) -> Result<Vec<Profile>> {
        names
            .iter()
            .map(|n| {
                self.experts.get(n).cloned().ok_or_else(|| {
                    Error::input(format!("expert {n:?} has no profile: run `cairn route profile REGISTRY`"))
                })
            })
            .collect()
    }
}

/// Text the profiles time (English prose: no early end of text).
pub const PROFILE_TEXT: &str = "The river ran wide and slow past the old mill, where the farmers of the valley \
brought their grain every autumn. In the evenings the miller sat by the water and told the children stories of \
the floods, of the winter the ice broke the wheel, and of the summer the river nearly ran dry. ";

/// Prompt lengths the local profile times: the fixed start cost is where the line
/// through the two meets zero tokens.
const SHORT: usize = 16;
const LONG: usize = 128;
const DECODE: usize = 32;

/// Time a local expert: prefills of [`SHORT`] and [`LONG`] tokens and [`DECODE`]
/// greedy tokens, `reps` times each, the median of each taken. Energy from `energy`
/// over the same spans.
pub fn measure_local(engine: &Engine, energy: &mut dyn EnergyReader, reps: usize) -> Result<Profile> {
    let mut ids = engine.tokenize(&PROFILE_TEXT.repeat(4))?;
    if ids.len() < LONG {
        return Err(Error::model(format!("the profile text is only {} tokens for this tokenizer", ids.len())));
    }
    ids.truncate(LONG);
    let reps = reps.max(1);
    let (mut short, mut long, mut dec, mut jp, mut jd) = (vec![], vec![], vec![], vec![], vec![]);
    // One warm-up pass: page the weights in, fill the buffer pools.
    engine.new_session(LONG + DECODE + 1)?.prefill(&ids[..SHORT])?;
    for _ in 0..reps {
        let mut s = engine.new_session(LONG + DECODE + 1)?;
        let t = Instant::now();
        s.prefill(&ids[..SHORT])?;
        short.push(t.elapsed().as_secs_f64());

        let mut s = engine.new_session(LONG + DECODE + 1)?;
        let j0 = energy.read_joules()?;
        let t = Instant::now();
        let logits = s.prefill(&ids)?;
        long.push(t.elapsed().as_secs_f64());
        let j1 = energy.read_joules()?;
        let t = Instant::now();
        let mut sampler = Sampler::new(SamplerConfig::greedy());
        let g = s.decode_tokens(logits, DECODE, &mut sampler, |_, _| ControlFlow::Continue(()))?;
        let n = g.ids.len().max(1);
        dec.push(t.elapsed().as_secs_f64() / n as f64);
        let j2 = energy.read_joules()?;
        jp.push((j1 - j0) / LONG as f64);
        jd.push((j2 - j1) / n as f64);
    }
    let (ts, tl) = (median(&mut short), median(&mut long));
    let per_token = ((tl - ts) / (LONG - SHORT) as f64).max(tl / LONG as f64 * 0.05);
    Ok(Profile {
        prefill_tps: 1.0 / per_token,
        decode_tps: 1.0 / median(&mut dec),
        start_s: (ts - SHORT as f64 * per_token).max(0.0),
        prefill_j_per_token: median(&mut jp).max(0.0),
        decode_j_per_token: median(&mut jd).max(0.0),
        energy_source: energy.name().to_string(),
        energy_estimate: energy.is_estimate(),
        rtt_s: None,
        transfer_bps: None,
        observed: 0,
    })
}

/// The median (upper middle for an even count) of finite values; 0 for none.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prof() -> Profile {
        Profile {
            prefill_tps: 400.0,
            decode_tps: 100.0,
            start_s: 0.01,
            prefill_j_per_token: 0.02,
            decode_j_per_token: 0.1,
            energy_source: "cpu-estimate".into(),
            energy_estimate: true,
            rtt_s: Some(0.005),
            transfer_bps: Some(1e6),
            observed: 0,
        }
    }

    #[test]
    fn predicts_the_sum_of_its_parts() {
        let c = prof().predict(200, 50, 10_000);
        assert!((c.latency_s - (0.01 + 0.005 + 0.01 + 0.5 + 0.5)).abs() < 1e-12, "{c:?}");
        assert!((c.energy_j - (4.0 + 5.0)).abs() < 1e-12, "{c:?}");
    }

    #[test]
    fn moving_average_converges_to_what_it_observes() {
        let mut p = prof();
        let o = Observation {
            prompt_tokens: 100,
            new_tokens: 20,
            prefill_s: 0.01 + 100.0 / 250.0,
            decode_s: 20.0 / 50.0,
            prefill_j: 3.0,
            decode_j: 4.0,
        };
        for _ in 0..200 {
            p.observe(&o);
        }
        assert!((p.prefill_tps - 250.0).abs() < 0.01, "{}", p.prefill_tps);
        assert!((p.decode_tps - 50.0).abs() < 0.01, "{}", p.decode_tps);
        assert!((p.prefill_j_per_token - 0.03).abs() < 1e-6 && (p.decode_j_per_token - 0.2).abs() < 1e-6);
        assert_eq!(p.observed, 200);
        // A request with no generated tokens leaves decode alone.
        let before = p.decode_tps;
        p.observe(&Observation { new_tokens: 0, decode_s: 0.0, ..o });
        assert_eq!(p.decode_tps, before);
    }

    #[test]
    fn file_round_trip_and_bad_files() {
        let mut ps = Profiles::new();
        ps.experts.insert("a".into(), prof());
        let dir = std::env::temp_dir().join(format!("cairn-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.profile.json");
        ps.save(&path).unwrap();
        assert_eq!(Profiles::load(&path).unwrap(), ps);
        let names = ["a".to_string(), "b".to_string()];
        assert!(ps.for_experts(&names).unwrap_err().to_string().contains("cairn route profile"));
        std::fs::remove_dir_all(&dir).unwrap();
        for (text, want) in [
            ("{", "not a profile"),
            (r#"{"format": 9, "experts": {}}"#, "format 9"),
            (
                r#"{"format": 1, "experts": {"a": {"prefill_tps": 0, "decode_tps": 1, "start_s": 0,
                "prefill_j_per_token": 0, "decode_j_per_token": 0, "energy_source": "x", "energy_estimate": true}}}"#,
                "prefill_tps must be a positive",
            ),
        ] {
            let e = Profiles::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
