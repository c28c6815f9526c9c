//! Counters of the server, shared by the handlers and the inference loop, and their
//! Prometheus text form (`GET /metrics`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
        o
    }
}
