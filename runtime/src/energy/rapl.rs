//! Linux RAPL through powercap: `/sys/class/powercap/intel-rapl:N/` per CPU package
//! (AMD's RAPL appears under the same names), `energy_uj` a microjoule counter that
//! wraps at `max_energy_range_uj`. Only the package domains (`name` = `package-N`) are
//! summed: their subdomains (`intel-rapl:N:M`, core/uncore/dram) are parts of them, and
//! `psys` would count the platform on top of the packages.

use std::path::{Path, PathBuf};

use super::{read_int, read_trim, subdirs, under, EnergyReader};
use crate::error::{Error, Result};

const POWERCAP: &str = "/sys/class/powercap";

struct Package {
    energy: PathBuf,
    /// The counter's range: it wraps to 0 past this.
    max_uj: u64,
    last_uj: u64,
}

pub struct Rapl {
    packages: Vec<Package>,
    total_uj: f64,
}

impl Rapl {
    pub fn open(root: &Path) -> Result<Rapl> {
        let dir = under(root, POWERCAP);
        let mut packages = Vec::new();
        // Top-level zones only: `intel-rapl:N`, no second colon.
        let zones = subdirs(&dir, |n| n.strip_prefix("intel-rapl:").is_some_and(|k| k.parse::<u32>().is_ok()));
        for z in zones {
            if !read_trim(&z.join("name")).is_ok_and(|n| n.starts_with("package")) {
                continue;
            }
            let energy = z.join("energy_uj");
            let last_uj = read_int(&energy).map_err(|e| match e {
                Error::Io { source, path } if source.kind() == std::io::ErrorKind::PermissionDenied => {
                    Error::Energy(format!(
                        "{}: permission denied (energy_uj is readable by root only since Linux 5.10)",
                        path.display()
                    ))
                }
                e => e,
            })?;
            let max_uj = read_int(&z.join("max_energy_range_uj"))?;
            if max_uj <= 0 || last_uj < 0 {
                return Err(Error::Energy(format!("{}: a counter out of range", z.display())));
            }
            packages.push(Package { energy, max_uj: max_uj as u64, last_uj: last_uj as u64 });
        }
        if packages.is_empty() {
            return Err(Error::Energy(format!("no RAPL package domain under {}", dir.display())));
        }
        Ok(Rapl { packages, total_uj: 0.0 })
    }

    pub fn packages(&self) -> usize {
        self.packages.len()
    }
}

/// Microjoules from `last` to `now` on a counter that wraps past `max` (at most one
/// wrap between two reads: a package would need minutes at full power to wrap twice).
fn delta_uj(last: u64, now: u64, max: u64) -> u64 {
    if now >= last {
        now - last
    } else {
        max.saturating_sub(last) + now
    }
}

impl EnergyReader for Rapl {
    fn name(&self) -> &str {
        "rapl"
    }

    fn read_joules(&mut self) -> Result<f64> {
        for p in &mut self.packages {
            let now = read_int(&p.energy)?;
            let now = u64::try_from(now).map_err(|_| Error::Energy(format!("{}: negative", p.energy.display())))?;
            self.total_uj += delta_uj(p.last_uj, now, p.max_uj) as f64;
            p.last_uj = now;
        }
        Ok(self.total_uj * 1e-6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::energy::fixture::Tree;

    const MAX: &str = "262143328850";

    fn zone(t: &Tree, z: &str, name: &str, uj: u64) {
        t.put(&format!("{POWERCAP}/{z}/name"), name);
        t.put(&format!("{POWERCAP}/{z}/energy_uj"), &uj.to_string());
        t.put(&format!("{POWERCAP}/{z}/max_energy_range_uj"), MAX);
    }

    /// Two packages summed; their core/dram subdomains and psys are not counted.
    #[test]
    fn sums_packages_only() {
        let t = Tree::new("rapl");
        zone(&t, "intel-rapl:0", "package-0", 1_000_000);
        zone(&t, "intel-rapl:0:0", "core", 500_000);
        zone(&t, "intel-rapl:0:1", "dram", 100_000);
        zone(&t, "intel-rapl:1", "package-1", 2_000_000);
        zone(&t, "intel-rapl:2", "psys", 9_000_000);
        let mut r = Rapl::open(t.root()).unwrap();
        assert_eq!(r.packages(), 2);
        assert_eq!(r.read_joules().unwrap(), 0.0);
        zone(&t, "intel-rapl:0", "package-0", 3_500_000); // +2.5 J
        zone(&t, "intel-rapl:0:0", "core", 99_500_000); // ignored
        zone(&t, "intel-rapl:1", "package-1", 2_250_000); // +0.25 J
        zone(&t, "intel-rapl:2", "psys", 99_000_000); // ignored
        assert!((r.read_joules().unwrap() - 2.75).abs() < 1e-12);
        assert!(!r.is_estimate());
    }

    /// The counter passes max_energy_range_uj and starts again from 0.
    #[test]
    fn wraparound() {
        let t = Tree::new("rapl-wrap");
        let max: u64 = MAX.parse().unwrap();
        zone(&t, "intel-rapl:0", "package-0", max - 1_000_000);
        let mut r = Rapl::open(t.root()).unwrap();
        zone(&t, "intel-rapl:0", "package-0", 4_000_000);
        // 1 J up to the wrap, 4 J after it.
        assert!((r.read_joules().unwrap() - 5.0).abs() < 1e-9);
        zone(&t, "intel-rapl:0", "package-0", 4_500_000);
        assert!((r.read_joules().unwrap() - 5.5).abs() < 1e-9);
        assert_eq!(delta_uj(10, 3, 20), 13);
    }

    #[test]
    fn absent_and_malformed() {
        let t = Tree::new("rapl-none");
        let e = Rapl::open(t.root()).err().unwrap().to_string();
        assert!(e.contains("no RAPL package domain"), "{e}");
        zone(&t, "intel-rapl:0", "package-0", 0);
        t.put(&format!("{POWERCAP}/intel-rapl:0/energy_uj"), "lots");
        let e = Rapl::open(t.root()).err().unwrap().to_string();
        assert!(e.contains("\"lots\" is not an integer"), "{e}");
    }
}
