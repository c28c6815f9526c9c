//! An Android battery: `/sys/class/power_supply/battery/` with `current_now` (µA),
//! `voltage_now` (µV) and `status`. Power is integrated between reads.
//!
//! The sign of `current_now` is the vendor's choice: Google's kernels report discharge
//! as negative, many others (Qualcomm-based, some Samsung) as positive. So the sign is
//! ignored: while `status` is `Discharging`, the battery's output is |I| × V. While it
//! is charging, full or unknown, the battery does not see what the device draws (the
//! charger supplies it); those stretches are not counted, and [`EnergyReader::power_watts`]
//! says `None`.

use std::path::{Path, PathBuf};

use super::{read_int, read_trim, under, Clock, EnergyReader, Integrator};
use crate::error::{Error, Result};

const BATTERY: &str = "/sys/class/power_supply/battery";

pub struct AndroidBattery {
    dir: PathBuf,
    clock: Clock,
    integ: Integrator,
}

impl AndroidBattery {
    pub fn open(root: &Path, clock: Clock) -> Result<AndroidBattery> {
        let dir = under(root, BATTERY);
        for f in ["current_now", "voltage_now", "status"] {
            if !dir.join(f).is_file() {
                return Err(Error::Energy(format!("no {f} in {}", dir.display())));
            }
        }
        let mut b = AndroidBattery { dir, clock, integ: Integrator::default() };
        b.read_joules()?;
        Ok(b)
    }

    /// Watts out of the battery, or `None` when it is not discharging.
    fn watts(&self) -> Result<Option<f64>> {
        if read_trim(&self.dir.join("status"))? != "Discharging" {
            return Ok(None);
        }
        let ua = read_int(&self.dir.join("current_now"))?;
        let uv = read_int(&self.dir.join("voltage_now"))?;
        Ok(Some(ua.unsigned_abs() as f64 * 1e-6 * uv.unsigned_abs() as f64 * 1e-6))
    }
}

impl EnergyReader for AndroidBattery {
    fn name(&self) -> &str {
        "android"
    }

    fn read_joules(&mut self) -> Result<f64> {
        let w = self.watts()?;
        let t = (self.clock)();
        Ok(self.integ.sample(t, w))
    }

    fn power_watts(&mut self) -> Result<Option<f64>> {
        self.watts()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::energy::fixture::{clock, Tree};

    fn battery(t: &Tree, status: &str, ua: i64, uv: i64) {
        t.put(&format!("{BATTERY}/status"), status);
        t.put(&format!("{BATTERY}/current_now"), &ua.to_string());
        t.put(&format!("{BATTERY}/voltage_now"), &uv.to_string());
    }

    /// Google's sign (discharge negative) and the opposite sign give the same joules.
    #[test]
    fn both_sign_conventions() {
        for ua in [-750_000i64, 750_000] {
            let t = Tree::new("android");
            battery(&t, "Discharging", ua, 4_000_000); // 0.75 A × 4 V = 3 W
            let mut b = AndroidBattery::open(t.root(), clock(&[0.0, 5.0])).unwrap();
            assert_eq!(b.power_watts().unwrap(), Some(3.0));
            assert!((b.read_joules().unwrap() - 15.0).abs() < 1e-9, "current_now {ua}");
        }
    }

    /// Charging stretches are not counted.
    #[test]
    fn charging_is_not_counted() {
        let t = Tree::new("android-charge");
        battery(&t, "Discharging", 500_000, 4_000_000); // 2 W
        let mut b = AndroidBattery::open(t.root(), clock(&[0.0, 1.0, 2.0, 3.0, 4.0])).unwrap();
        assert!((b.read_joules().unwrap() - 2.0).abs() < 1e-9); // 0 → 1 s
        battery(&t, "Charging", -900_000, 4_200_000);
        assert_eq!(b.power_watts().unwrap(), None);
        assert!((b.read_joules().unwrap() - 2.0).abs() < 1e-9); // 1 → 2 s: charging
        battery(&t, "Discharging", 500_000, 4_000_000);
        assert!((b.read_joules().unwrap() - 2.0).abs() < 1e-9); // 2 → 3 s: restarts
        assert!((b.read_joules().unwrap() - 4.0).abs() < 1e-9); // 3 → 4 s: 2 W
    }

    #[test]
    fn absent() {
        let t = Tree::new("android-none");
        t.put(&format!("{BATTERY}/status"), "Full");
        let e = AndroidBattery::open(t.root(), clock(&[0.0])).err().unwrap().to_string();
        assert!(e.contains("no current_now"), "{e}");
    }
}
