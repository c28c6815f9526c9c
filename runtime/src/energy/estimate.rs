//! The fallback where no counter exists: this process's CPU time (user + system, from
//! getrusage) × a wattage per busy core. Default [`DEFAULT_CPU_WATTS`], 5 W per
//! CPU-second (one laptop or server core under load; a phone's big core is nearer 1–2
//! W): set [`WATTS_ENV`] to the device's own figure. Every number it gives is an
//! estimate ([`EnergyReader::is_estimate`]), and it does not see the GPU or the rest of
//! the board.

use super::EnergyReader;
use crate::error::{Error, Result};

pub const DEFAULT_CPU_WATTS: f64 = 5.0;
pub const WATTS_ENV: &str = "CAIRN_CPU_WATTS";

pub struct CpuEstimate {
    watts: f64,
    start_s: f64,
    name: String,
}

impl CpuEstimate {
    pub fn new(watts_per_core: f64) -> CpuEstimate {
        CpuEstimate { watts: watts_per_core, start_s: cpu_seconds().unwrap_or(0.0), name: "cpu-estimate".into() }
    }

    /// The wattage from [`WATTS_ENV`] when it is a positive number, else the default
    /// (a bad value is logged, not fatal: the estimate is only an estimate).
    pub fn from_env() -> CpuEstimate {
        let w = match std::env::var(WATTS_ENV) {
            Ok(v) => match v.trim().parse::<f64>() {
                Ok(w) if w.is_finite() && w > 0.0 => w,
                _ => {
                    log::warn!("{WATTS_ENV}={v:?} is not a positive number of watts; using {DEFAULT_CPU_WATTS}");
                    DEFAULT_CPU_WATTS
                }
            },
            Err(_) => DEFAULT_CPU_WATTS,
        };
        CpuEstimate::new(w)
    }

    pub fn watts_per_core(&self) -> f64 {
        self.watts
    }
}

/// User + system CPU seconds of this process, all threads.
#[cfg(unix)]
pub fn cpu_seconds() -> Result<f64> {
    // SAFETY: getrusage writes one `rusage` into the zeroed struct it is given.
    let (r, u) = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        (libc::getrusage(libc::RUSAGE_SELF, &mut u), u)
    };
    if r != 0 {
        return Err(Error::Energy(format!("getrusage: {}", std::io::Error::last_os_error())));
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Ok(tv(u.ru_utime) + tv(u.ru_stime))
}

#[cfg(not(unix))]
pub fn cpu_seconds() -> Result<f64> {
    Err(Error::Energy("CPU time is only read on Unix-like systems".into()))
}

impl EnergyReader for CpuEstimate {
    fn name(&self) -> &str {
        &self.name
    }

    fn read_joules(&mut self) -> Result<f64> {
        Ok((cpu_seconds()? - self.start_s).max(0.0) * self.watts)
    }

    fn is_estimate(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Busy work raises the estimate by at most its CPU time × the wattage.
    #[test]
    fn follows_cpu_time() {
        let mut e = CpuEstimate::new(2.0);
        assert!(e.is_estimate());
        let a = e.read_joules().unwrap();
        let c0 = cpu_seconds().unwrap();
        let mut x = 0u64;
        while cpu_seconds().unwrap() - c0 < 0.05 {
            for i in 0..10_000u64 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
            }
        }
        std::hint::black_box(x);
        let b = e.read_joules().unwrap();
        // At least 0.05 CPU-s × 2 W of this thread's own work (other test threads may add more).
        assert!(b - a >= 0.1 - 1e-9, "{a} -> {b}");
    }

    #[test]
    fn default_wattage() {
        assert_eq!(CpuEstimate::new(DEFAULT_CPU_WATTS).watts_per_core(), 5.0);
    }
}
