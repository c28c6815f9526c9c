//! Energy counters for MoE²'s expert profiles (DESIGN §5 step 1) and `cairn serve`'s
//! energy per request: real counters where the platform has them, else an estimate
//! that says it is one.
//!
//! Every reader takes a root directory standing for `/` (tests point it at fixture
//! trees in the real sysfs formats). [`detect`] tries, in order, Linux RAPL powercap,
//! Jetson INA3221 rails, NVIDIA NVML, an Android battery, and falls back to CPU time ×
//! a per-device wattage.

mod android;
mod estimate;
mod ina3221;
mod nvml;
mod rapl;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub use android::AndroidBattery;
pub use estimate::{CpuEstimate, DEFAULT_CPU_WATTS, WATTS_ENV};
pub use ina3221::Ina3221;
pub use nvml::Nvml;
pub use rapl::Rapl;

/// A source of energy figures.
pub trait EnergyReader: Send {
    /// Short name for logs and metric labels (`rapl`, `ina3221`, `nvml`, `android`,
    /// `cpu-estimate`).
    fn name(&self) -> &str;
    /// Joules since the reader was opened, never decreasing: counters are followed
    /// through their wraparound, power readings are integrated between calls (so call
    /// it at least as often as the power changes that matter).
    fn read_joules(&mut self) -> Result<f64>;
    /// The power now, where the platform reports power rather than energy.
    fn power_watts(&mut self) -> Result<Option<f64>> {
        Ok(None)
    }
    /// True when the figures are modelled, not measured.
    fn is_estimate(&self) -> bool {
        false
    }
}

/// Seconds on a monotone clock; power readers integrate over it. Injectable so that
/// tests integrate over known intervals.
pub type Clock = Box<dyn FnMut() -> f64 + Send>;

/// The process's monotone clock.
pub fn system_clock() -> Clock {
    let t0 = std::time::Instant::now();
    Box::new(move || t0.elapsed().as_secs_f64())
}

/// Trapezoidal integration of power samples (watts at seconds) into joules.
#[derive(Debug, Default, Clone)]
pub struct Integrator {
    last: Option<(f64, f64)>,
    joules: f64,
}

impl Integrator {
    /// Add a sample; `None` (no reading, e.g. a battery that is charging) ends the
    /// current stretch: the interval up to the next reading is not counted.
    pub fn sample(&mut self, t: f64, watts: Option<f64>) -> f64 {
        if let (Some((t0, w0)), Some(w)) = (self.last, watts) {
            if t > t0 {
                self.joules += 0.5 * (w0 + w) * (t - t0);
            }
        }
        self.last = watts.map(|w| (t, w));
        self.joules
    }

    pub fn joules(&self) -> f64 {
        self.joules
    }
}

/// What [`detect`] chose, and why the others were passed over.
pub struct Detected {
    pub reader: Box<dyn EnergyReader>,
    /// One line for the log: the reader and each unavailable one with its reason.
    pub note: String,
}

/// The first real counter available under `root` (normally `/`), else the CPU-time
/// estimate.
/// [`detect`] on this machine: `/`, or the tree `CAIRN_SYSFS_ROOT` names (a fixture
/// in tests, or an empty directory to force the estimate).
pub fn detect_here() -> Detected {
    let root = std::env::var_os("CAIRN_SYSFS_ROOT").map_or_else(|| PathBuf::from("/"), Into::into);
    detect(&root)
}

pub fn detect(root: &Path) -> Detected {
    let mut skipped: Vec<String> = Vec::new();
    let mut found: Option<Box<dyn EnergyReader>> = None;
    type Open<'a> = &'a dyn Fn() -> Result<Box<dyn EnergyReader>>;
    let tries: [(&str, Open); 4] = [
        ("rapl", &|| Ok(Box::new(Rapl::open(root)?))),
        ("ina3221", &|| Ok(Box::new(Ina3221::open(root, system_clock())?))),
        ("nvml", &|| Ok(Box::new(Nvml::open()?))),
        ("android", &|| Ok(Box::new(AndroidBattery::open(root, system_clock())?))),
    ];
    for (name, open) in tries {
        match open() {
            Ok(r) => {
                found = Some(r);
                break;
            }
            Err(e) => {
                let e = e.to_string();
                // NVML's messages already start with its name.
                let named = e.to_ascii_lowercase().starts_with(name);
                skipped.push(if named { e } else { format!("{name}: {e}") });
            }
        }
    }
    let reader = found.unwrap_or_else(|| Box::new(CpuEstimate::from_env()));
    let what = if reader.is_estimate() { "an estimate" } else { "measured" };
    let mut note = format!("energy: {} ({what})", reader.name());
    if !skipped.is_empty() {
        note.push_str("; unavailable: ");
        note.push_str(&skipped.join("; "));
    }
    Detected { reader, note }
}

/// `root` joined with an absolute sysfs path.
fn under(root: &Path, abs: &str) -> PathBuf {
    root.join(abs.trim_start_matches('/'))
}

/// A sysfs file's contents, trimmed.
fn read_trim(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

/// A sysfs file holding one integer.
fn read_int(path: &Path) -> Result<i64> {
    let s = read_trim(path)?;
    s.parse().map_err(|_| Error::Energy(format!("{}: {s:?} is not an integer", path.display())))
}

/// Directories matching `dir/*` (sorted), those whose name passes `keep`.
fn subdirs(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(&keep) && e.path().is_dir())
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

#[cfg(test)]
pub(crate) mod fixture {
    //! Temporary sysfs trees.
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};

    pub struct Tree(pub PathBuf);

    impl Tree {
        pub fn new(tag: &str) -> Tree {
            static N: AtomicU64 = AtomicU64::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("cairn-energy-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Tree(p)
        }

        /// Write `text` + newline (as sysfs does) at the absolute path `abs` in the tree.
        pub fn put(&self, abs: &str, text: &str) {
            let p = self.0.join(abs.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, format!("{text}\n")).unwrap();
        }

        pub fn root(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A clock that returns the given times in turn (then stays at the last).
    pub fn clock(times: &[f64]) -> super::Clock {
        let times = times.to_vec();
        let mut i = 0;
        Box::new(move || {
            let t = times[i.min(times.len() - 1)];
            i += 1;
            t
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integrator_trapezoid_and_gaps() {
        let mut g = Integrator::default();
        assert_eq!(g.sample(0.0, Some(2.0)), 0.0);
        assert_eq!(g.sample(1.0, Some(4.0)), 3.0);
        // A gap: neither the interval into it nor out of it counts.
        assert_eq!(g.sample(2.0, None), 3.0);
        assert_eq!(g.sample(3.0, Some(10.0)), 3.0);
        assert_eq!(g.sample(3.5, Some(10.0)), 8.0);
    }

    /// A root with no counters at all: the estimate (unless this machine has NVML,
    /// which is not under the root), and the note says so and why.
    #[test]
    fn nothing_found_falls_back_to_the_estimate() {
        let t = fixture::Tree::new("empty");
        let d = detect(t.root());
        println!("{}", d.note);
        if Nvml::open().is_ok() {
            assert_eq!(d.reader.name(), "nvml");
            return;
        }
        assert!(d.reader.is_estimate());
        assert_eq!(d.reader.name(), "cpu-estimate");
        assert!(d.note.starts_with("energy: cpu-estimate (an estimate)"), "{}", d.note);
        for name in ["rapl: no RAPL", "ina3221: no INA3221", "NVML: cannot load", "android: no current_now"] {
            assert!(d.note.contains(name), "the note should say why {name} was passed over: {}", d.note);
        }
    }

    /// RAPL wins over a battery when both are present.
    #[test]
    fn detect_prefers_rapl() {
        let t = fixture::Tree::new("both");
        t.put("/sys/class/powercap/intel-rapl:0/name", "package-0");
        t.put("/sys/class/powercap/intel-rapl:0/energy_uj", "1000");
        t.put("/sys/class/powercap/intel-rapl:0/max_energy_range_uj", "262143328850");
        t.put("/sys/class/power_supply/battery/status", "Discharging");
        t.put("/sys/class/power_supply/battery/current_now", "-500000");
        t.put("/sys/class/power_supply/battery/voltage_now", "4000000");
        let d = detect(t.root());
        assert_eq!(d.reader.name(), "rapl");
        assert!(!d.reader.is_estimate());
        assert!(d.note.starts_with("energy: rapl (measured)"), "{}", d.note);
    }
}
