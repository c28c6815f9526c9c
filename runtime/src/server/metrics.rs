//! Counters of the server, shared by the handlers and the inference loop, and their
//! Prometheus text form (`GET /metrics`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::energy::EnergyReader;

/// Upper bounds of the time-to-first-token histogram, in seconds.
const TTFT_BUCKETS: [f64; 12] = [0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// Generation speed is averaged over this long.
const RATE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Metrics {
    /// Requests answered, by HTTP status.
    by_status: Mutex<BTreeMap<u16, u64>>,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Requests submitted and not yet in a slot (the bounded queue).
    pub queued: AtomicU64,
    /// The same, as the loop last saw it.
    pub waiting: AtomicU64,
    pub busy_slots: AtomicU64,
    pub slots: AtomicU64,
    /// Requests dropped because their client went away.
    pub cancelled: AtomicU64,
    pub finished: AtomicU64,
    pub memory_budget: AtomicU64,
    pub kv_bytes: AtomicU64,
    ttft: Mutex<Histogram>,
    rate: Mutex<Vec<(Instant, u64)>>,
    energy: Mutex<Energy>,
    /// Read at each scrape for `cairn_power_watts`; its own reader, apart from the
    /// inference loop's.
    power: Mutex<Option<Box<dyn EnergyReader>>>,
}

/// Joules from the server's energy reader (`crate::energy::detect`).
#[derive(Default)]
struct Energy {
    /// The reader's name and whether it estimates; unset: no reader, no energy lines.
    source: Option<(String, bool)>,
    /// Over every forward pass.
    total_j: f64,
    /// Over finished requests, each its share of the passes it was in.
    request_sum_j: f64,
    requests: u64,
}

#[derive(Default)]
struct Histogram {
    counts: [u64; TTFT_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Metrics {
    pub fn count_status(&self, status: u16) {
        *self.by_status.lock().unwrap_or_else(|e| e.into_inner()).entry(status).or_insert(0) += 1;
    }

    pub fn observe_ttft(&self, d: Duration) {
        let s = d.as_secs_f64();
        let mut h = self.ttft.lock().unwrap_or_else(|e| e.into_inner());
        for (c, &b) in h.counts.iter_mut().zip(&TTFT_BUCKETS) {
            if s <= b {
                *c += 1;
            }
        }
        h.count += 1;
        h.sum += s;
    }

    /// Name the energy reader (its `name()` and `is_estimate()`): the energy lines appear.
    pub fn set_energy_source(&self, name: &str, estimate: bool) {
        self.energy.lock().unwrap_or_else(|e| e.into_inner()).source = Some((name.to_string(), estimate));
    }

    /// Report the power `reader` reads, at each scrape, as `cairn_power_watts`: the
    /// board's input on a Jetson (INA3221). Readers of energy only (RAPL, NVML, the
    /// estimate) report none, and add no line.
    pub fn set_power_reader(&self, reader: Box<dyn EnergyReader>) {
        *self.power.lock().unwrap_or_else(|e| e.into_inner()) = Some(reader);
    }

    /// The power reader's watts now, with its name; `None` where it reports none.
    fn power_now(&self) -> Option<(String, f64)> {
        let mut p = self.power.lock().unwrap_or_else(|e| e.into_inner());
        let r = p.as_mut()?;
        match r.power_watts() {
            Ok(Some(w)) if w.is_finite() => Some((r.name().to_string(), w)),
            Ok(_) => None,
            Err(e) => {
                log::debug!("power: {e}");
                None
            }
        }
    }

    /// Joules one forward pass took.
    pub fn add_energy(&self, joules: f64) {
        self.energy.lock().unwrap_or_else(|e| e.into_inner()).total_j += joules;
    }

    /// A finished request's joules.
    pub fn observe_request_energy(&self, joules: f64) {
        let mut e = self.energy.lock().unwrap_or_else(|e| e.into_inner());
        e.request_sum_j += joules;
        e.requests += 1;
    }

    /// Generated tokens per second over the last [`RATE_WINDOW`].
    fn tokens_per_second(&self) -> f64 {
        let now = Instant::now();
        let total = self.generated_tokens.load(Ordering::Relaxed);
        let mut r = self.rate.lock().unwrap_or_else(|e| e.into_inner());
        r.push((now, total));
        r.retain(|(t, _)| now.duration_since(*t) <= RATE_WINDOW);
        match (r.first(), r.last()) {
            (Some(&(t0, n0)), Some(&(t1, n1))) if t1 > t0 => (n1 - n0) as f64 / (t1 - t0).as_secs_f64(),
            _ => 0.0,
        }
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        let g = |o: &mut String, name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        let _ = writeln!(o, "# HELP cairn_requests_total Requests answered, by HTTP status.");
        let _ = writeln!(o, "# TYPE cairn_requests_total counter");
        for (s, n) in self.by_status.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(o, "cairn_requests_total{{status=\"{s}\"}} {n}");
        }
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        g(&mut o, "cairn_prompt_tokens_total", "counter", "Prompt tokens evaluated.", load(&self.prompt_tokens));
        g(&mut o, "cairn_generated_tokens_total", "counter", "Tokens generated.", load(&self.generated_tokens));
        g(
            &mut o,
            "cairn_tokens_per_second",
            "gauge",
            "Generated tokens per second, last 10 s.",
            format!("{:.3}", self.tokens_per_second()),
        );
        g(&mut o, "cairn_queue_depth", "gauge", "Requests waiting for a slot.", load(&self.queued));
        g(&mut o, "cairn_slots_busy", "gauge", "Slots running a request.", load(&self.busy_slots));
        g(&mut o, "cairn_slots", "gauge", "Slots (--parallel).", load(&self.slots));
        g(
            &mut o,
            "cairn_requests_cancelled_total",
            "counter",
            "Requests whose client went away.",
            load(&self.cancelled),
        );
        g(&mut o, "cairn_requests_finished_total", "counter", "Generations run to their end.", load(&self.finished));
        g(&mut o, "cairn_memory_budget_bytes", "gauge", "BitStack memory budget (0: none).", load(&self.memory_budget));
        g(
            &mut o,
            "cairn_kv_cache_bytes_max",
            "gauge",
            "KV cache of all slots when full, as announced at start.",
            load(&self.kv_bytes),
        );
        let h = self.ttft.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(o, "# HELP cairn_time_to_first_token_seconds From request to first generated token.");
        let _ = writeln!(o, "# TYPE cairn_time_to_first_token_seconds histogram");
        for (c, b) in h.counts.iter().zip(&TTFT_BUCKETS) {
            let _ = writeln!(o, "cairn_time_to_first_token_seconds_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(o, "cairn_time_to_first_token_seconds_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(o, "cairn_time_to_first_token_seconds_sum {:.6}", h.sum);
        let _ = writeln!(o, "cairn_time_to_first_token_seconds_count {}", h.count);
        let e = self.energy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((name, estimate)) = &e.source {
            // The labels say where the joules come from; estimate="true" marks figures
            // modelled from CPU time, not measured.
            let labels = format!("{{source=\"{name}\",estimate=\"{estimate}\"}}");
            let _ = writeln!(o, "# HELP cairn_energy_joules_total Energy over forward passes.");
            let _ = writeln!(o, "# TYPE cairn_energy_joules_total counter");
            let _ = writeln!(o, "cairn_energy_joules_total{labels} {:.6}", e.total_j);
            let _ = writeln!(
                o,
                "# HELP cairn_request_energy_joules Energy per finished request: each pass's joules shared by the \
                 requests in it, by tokens fed."
            );
            let _ = writeln!(o, "# TYPE cairn_request_energy_joules summary");
            let _ = writeln!(o, "cairn_request_energy_joules_sum{labels} {:.6}", e.request_sum_j);
            let _ = writeln!(o, "cairn_request_energy_joules_count{labels} {}", e.requests);
        }
        drop(e);
        if let Some((name, w)) = self.power_now() {
            let _ = writeln!(
                o,
                "# HELP cairn_power_watts Power drawn now, read at this scrape: on a Jetson the board's input \
                 (INA3221 VDD_IN, or the module rails summed on AGX Orin)."
            );
            let _ = writeln!(o, "# TYPE cairn_power_watts gauge");
            let _ = writeln!(o, "cairn_power_watts{{source=\"{name}\"}} {w:.3}");
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::energy::detect;
    use crate::energy::fixture::Tree;

    #[test]
    fn energy_lines() {
        let m = Metrics::default();
        assert!(!m.render().contains("energy"), "no reader, no energy lines");
        m.set_energy_source("rapl", false);
        m.add_energy(3.5);
        m.observe_request_energy(1.25);
        m.observe_request_energy(2.0);
        let r = m.render();
        assert!(r.contains("cairn_energy_joules_total{source=\"rapl\",estimate=\"false\"} 3.500000\n"), "{r}");
        assert!(r.contains("cairn_request_energy_joules_sum{source=\"rapl\",estimate=\"false\"} 3.250000\n"), "{r}");
        assert!(r.contains("cairn_request_energy_joules_count{source=\"rapl\",estimate=\"false\"} 2\n"), "{r}");
        assert!(!r.contains("cairn_power_watts"), "no power reader, no power line");
    }

    fn rail(t: &Tree, hw: &str, k: u32, label: &str, mv: i64, ma: i64) {
        t.put(&format!("{hw}/in{k}_label"), label);
        t.put(&format!("{hw}/in{k}_input"), &mv.to_string());
        t.put(&format!("{hw}/curr{k}_input"), &ma.to_string());
    }

    /// A Jetson's board power reaches /metrics: `serve` gives the reader `detect` finds
    /// (here on an Orin Nano's sysfs tree), and each scrape reads the rails anew.
    #[test]
    fn jetson_board_power() {
        let t = Tree::new("metrics-orin-nano");
        let hw = "/sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3";
        rail(&t, hw, 1, "VDD_IN", 5000, 1200); // 6 W: the board
        rail(&t, hw, 2, "VDD_CPU_GPU_CV", 5000, 400);
        rail(&t, hw, 3, "VDD_SOC", 5000, 300);
        let m = Metrics::default();
        let d = detect(t.root());
        m.set_energy_source(d.reader.name(), d.reader.is_estimate());
        m.set_power_reader(detect(t.root()).reader);
        let r = m.render();
        assert!(r.contains("# TYPE cairn_power_watts gauge\ncairn_power_watts{source=\"ina3221\"} 6.000\n"), "{r}");
        assert!(r.contains("cairn_energy_joules_total{source=\"ina3221\",estimate=\"false\"} "), "{r}");
        rail(&t, hw, 1, "VDD_IN", 5080, 2500); // 12.7 W
        assert!(m.render().contains("cairn_power_watts{source=\"ina3221\"} 12.700\n"));
    }

    /// AGX Orin (no VDD_IN): the module rails summed.
    #[test]
    fn agx_orin_power_is_the_module_rails() {
        let t = Tree::new("metrics-agx-orin");
        let a = "/sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1";
        let b = "/sys/bus/i2c/drivers/ina3221/1-0041/hwmon/hwmon2";
        rail(&t, a, 1, "VDD_GPU_SOC", 19000, 500);
        rail(&t, a, 2, "VDD_CPU_CV", 19000, 200);
        rail(&t, a, 3, "VIN_SYS_5V0", 5000, 600);
        rail(&t, b, 1, "NC", 0, 0);
        rail(&t, b, 2, "VDDQ_VDD2_1V8AO", 5000, 100);
        let m = Metrics::default();
        m.set_power_reader(detect(t.root()).reader);
        let r = m.render();
        assert!(r.contains("cairn_power_watts{source=\"ina3221\"} 16.800\n"), "{r}");
    }

    /// A reader of energy only (RAPL) gives no power line, and a rail that cannot be
    /// read any more drops the line rather than failing the scrape.
    #[test]
    fn no_power_line_without_a_power_reading() {
        let t = Tree::new("metrics-rapl");
        t.put("/sys/class/powercap/intel-rapl:0/name", "package-0");
        t.put("/sys/class/powercap/intel-rapl:0/energy_uj", "1000");
        t.put("/sys/class/powercap/intel-rapl:0/max_energy_range_uj", "262143328850");
        let m = Metrics::default();
        m.set_power_reader(detect(t.root()).reader);
        assert!(!m.render().contains("cairn_power_watts"));

        let j = Tree::new("metrics-rail-gone");
        let hw = "/sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3";
        rail(&j, hw, 1, "VDD_IN", 5000, 1000);
        let m = Metrics::default();
        m.set_power_reader(detect(j.root()).reader);
        assert!(m.render().contains("cairn_power_watts{source=\"ina3221\"} 5.000\n"));
        std::fs::remove_file(j.root().join(hw.trim_start_matches('/')).join("curr1_input")).unwrap();
        assert!(!m.render().contains("cairn_power_watts"));
    }
}
