//! Jetson power rails: the INA3221 monitors under
//! `/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/`, three channels each with
//! `inK_label`, `inK_input` (bus voltage, mV) and `currK_input` (mA). They report power,
//! so joules are power integrated between reads.
//!
//! What counts as the board: Orin Nano/NX (and older boards, as `POM_5V_IN`) have a
//! total input rail, `VDD_IN`, and that alone is used (the others are parts of it). AGX
//! Orin has none: its module rails (VDD_GPU_SOC, VDD_CPU_CV, VIN_SYS_5V0,
//! VDDQ_VDD2_1V8AO) are summed, as jtop does; unconnected channels (`NC`) are skipped.

use std::path::{Path, PathBuf};

use super::{read_int, read_trim, subdirs, under, Clock, EnergyReader, Integrator};
use crate::error::{Error, Result};

const DRIVER: &str = "/sys/bus/i2c/drivers/ina3221";
/// Rails that carry the whole board's input.
const TOTAL_RAILS: [&str; 2] = ["VDD_IN", "POM_5V_IN"];

#[derive(Debug, Clone)]
struct Rail {
    label: String,
    volts_mv: PathBuf,
    amps_ma: PathBuf,
}

pub struct Ina3221 {
    /// The rails summed for the board's power.
    rails: Vec<Rail>,
    clock: Clock,
    integ: Integrator,
}

impl Ina3221 {
    pub fn open(root: &Path, clock: Clock) -> Result<Ina3221> {
        let dir = under(root, DRIVER);
        let mut all = Vec::new();
        for dev in subdirs(&dir, |_| true) {
            for hw in subdirs(&dev.join("hwmon"), |n| n.starts_with("hwmon")) {
                for k in 1..=8 {
                    let Ok(label) = read_trim(&hw.join(format!("in{k}_label"))) else { continue };
                    let (v, c) = (hw.join(format!("in{k}_input")), hw.join(format!("curr{k}_input")));
                    if label.is_empty() || label == "NC" || !v.exists() || !c.exists() {
                        continue;
                    }
                    all.push(Rail { label, volts_mv: v, amps_ma: c });
                }
            }
        }
        if all.is_empty() {
            return Err(Error::Energy(format!("no INA3221 rail under {}", dir.display())));
        }
        let rails = match all.iter().find(|r| TOTAL_RAILS.contains(&r.label.as_str())) {
            Some(total) => vec![total.clone()],
            None => all,
        };
        let mut r = Ina3221 { rails, clock, integ: Integrator::default() };
        // The first sample starts the integration.
        r.read_joules()?;
        Ok(r)
    }

    /// The labels of the rails summed.
    pub fn rails(&self) -> Vec<&str> {
        self.rails.iter().map(|r| r.label.as_str()).collect()
    }

    fn watts(&self) -> Result<f64> {
        let mut w = 0.0;
        for r in &self.rails {
            let (mv, ma) = (read_int(&r.volts_mv)?, read_int(&r.amps_ma)?);
            w += mv as f64 * ma as f64 * 1e-6;
        }
        Ok(w)
    }
}

impl EnergyReader for Ina3221 {
    fn name(&self) -> &str {
        "ina3221"
    }

    fn read_joules(&mut self) -> Result<f64> {
        let w = self.watts()?;
        let t = (self.clock)();
        Ok(self.integ.sample(t, Some(w)))
    }

    fn power_watts(&mut self) -> Result<Option<f64>> {
        self.watts().map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::energy::fixture::{clock, Tree};

    fn channel(t: &Tree, hw: &str, k: u32, label: &str, mv: i64, ma: i64) {
        t.put(&format!("{hw}/in{k}_label"), label);
        t.put(&format!("{hw}/in{k}_input"), &mv.to_string());
        t.put(&format!("{hw}/curr{k}_input"), &ma.to_string());
    }

    /// Orin Nano/NX: VDD_IN is the board; the other rails are inside it.
    #[test]
    fn orin_nano_uses_vdd_in() {
        let t = Tree::new("orin-nano");
        let hw = format!("{DRIVER}/1-0040/hwmon/hwmon3");
        channel(&t, &hw, 1, "VDD_IN", 5000, 1200); // 6 W
        channel(&t, &hw, 2, "VDD_CPU_GPU_CV", 5000, 400);
        channel(&t, &hw, 3, "VDD_SOC", 5000, 300);
        let mut r = Ina3221::open(t.root(), clock(&[0.0, 2.0, 3.0])).unwrap();
        assert_eq!(r.rails(), ["VDD_IN"]);
        assert!((r.power_watts().unwrap().unwrap() - 6.0).abs() < 1e-12);
        // 6 W for 2 s.
        assert!((r.read_joules().unwrap() - 12.0).abs() < 1e-9);
        channel(&t, &hw, 1, "VDD_IN", 5000, 2000); // 10 W: the trapezoid over 1 s is 8 J
        assert!((r.read_joules().unwrap() - 20.0).abs() < 1e-9);
    }

    /// AGX Orin: two monitors, no VDD_IN; the module rails summed, NC skipped.
    #[test]
    fn agx_orin_sums_rails() {
        let t = Tree::new("agx-orin");
        let a = format!("{DRIVER}/1-0040/hwmon/hwmon1");
        let b = format!("{DRIVER}/1-0041/hwmon/hwmon2");
        channel(&t, &a, 1, "VDD_GPU_SOC", 19000, 500); // 9.5 W
        channel(&t, &a, 2, "VDD_CPU_CV", 19000, 200); // 3.8 W
        channel(&t, &a, 3, "VIN_SYS_5V0", 5000, 600); // 3 W
        channel(&t, &b, 1, "NC", 0, 0);
        channel(&t, &b, 2, "VDDQ_VDD2_1V8AO", 5000, 100); // 0.5 W
        channel(&t, &b, 3, "NC", 9999, 9999);
        let mut r = Ina3221::open(t.root(), clock(&[10.0, 14.0])).unwrap();
        assert_eq!(r.rails(), ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"]);
        let w = r.power_watts().unwrap().unwrap();
        assert!((w - 16.8).abs() < 1e-9, "{w}");
        assert!((r.read_joules().unwrap() - 4.0 * 16.8).abs() < 1e-9);
    }

    #[test]
    fn absent() {
        let t = Tree::new("ina-none");
        let e = Ina3221::open(t.root(), clock(&[0.0])).err().unwrap().to_string();
        assert!(e.contains("no INA3221 rail"), "{e}");
    }
}
