//! Statistics: latency histograms, rate summaries, CPU time and peak RSS of this process.

use std::time::Duration;

use hdrhistogram::Histogram;
use nix::sys::resource::{UsageWho, getrusage};

use crate::report::{CpuTime, Summary};

/// Latencies recorded with microsecond resolution and 3 significant digits.
#[derive(Debug, Clone)]
pub struct Latencies {
    hist: Option<Histogram<u64>>,
    sum_s: f64,
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    /// An empty recorder.
    pub fn new() -> Self {
        Latencies {
            // Auto-resizing, 3 significant figures: fails only for invalid sigfig counts.
            hist: Histogram::<u64>::new(3).ok(),
            sum_s: 0.0,
        }
    }

    /// Records one latency.
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        if let Some(h) = &mut self.hist
            && h.record(us).is_err()
        {
            h.saturating_record(us);
        }
        self.sum_s += d.as_secs_f64();
    }

    /// Number of values.
    pub fn len(&self) -> u64 {
        self.hist.as_ref().map_or(0, Histogram::len)
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The summary in seconds, `None` when empty.
    pub fn summary(&self) -> Option<Summary> {
        let h = self.hist.as_ref()?;
        if h.is_empty() {
            return None;
        }
        let s = |us: u64| us as f64 / 1e6;
        Some(Summary {
            n: h.len(),
            median: s(h.value_at_quantile(0.5)),
            p90: s(h.value_at_quantile(0.9)),
            p99: s(h.value_at_quantile(0.99)),
            min: s(h.min()),
            max: s(h.max()),
            mean: self.sum_s / h.len() as f64,
        })
    }
}

/// Order statistics of plain values (rates: few samples, no histogram needed).
pub fn summarize(values: &[f64]) -> Option<Summary> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let q = |p: f64| {
        // Nearest rank.
        let rank = (1..=v.len())
            .find(|&r| r as f64 >= p * v.len() as f64)
            .unwrap_or(v.len());
        v[rank - 1]
    };
    Some(Summary {
        n: v.len() as u64,
        median: if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        },
        p90: q(0.9),
        p99: q(0.99),
        min: v[0],
        max: v[v.len() - 1],
        mean: v.iter().sum::<f64>() / v.len() as f64,
    })
}

/// CPU times of this process and of its reaped children at one instant.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSnapshot {
    user: f64,
    system: f64,
    children_user: f64,
    children_system: f64,
}

fn tv(t: nix::sys::time::TimeVal) -> f64 {
    t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6
}

impl CpuSnapshot {
    /// Now (zeros if getrusage fails, which it does not on Linux).
    pub fn now() -> Self {
        let mut s = CpuSnapshot::default();
        if let Ok(u) = getrusage(UsageWho::RUSAGE_SELF) {
            s.user = tv(u.user_time());
            s.system = tv(u.system_time());
        }
        if let Ok(u) = getrusage(UsageWho::RUSAGE_CHILDREN) {
            s.children_user = tv(u.user_time());
            s.children_system = tv(u.system_time());
        }
        s
    }

    /// CPU spent between `earlier` and `self`.
    pub fn since(&self, earlier: &CpuSnapshot) -> CpuTime {
        CpuTime {
            user_s: (self.user - earlier.user).max(0.0),
            system_s: (self.system - earlier.system).max(0.0),
            children_user_s: (self.children_user - earlier.children_user).max(0.0),
            children_system_s: (self.children_system - earlier.children_system).max(0.0),
        }
    }
}

/// Sums CPU times.
pub fn add_cpu(a: CpuTime, b: CpuTime) -> CpuTime {
    CpuTime {
        user_s: a.user_s + b.user_s,
        system_s: a.system_s + b.system_s,
        children_user_s: a.children_user_s + b.children_user_s,
        children_system_s: a.children_system_s + b.children_system_s,
    }
}

/// Divides CPU times by `n`.
pub fn div_cpu(a: CpuTime, n: f64) -> CpuTime {
    CpuTime {
        user_s: a.user_s / n,
        system_s: a.system_s / n,
        children_user_s: a.children_user_s / n,
        children_system_s: a.children_system_s / n,
    }
}

/// Resets this process's peak RSS to its current RSS (Linux `clear_refs` value 5). Returns
/// false where that is not possible; peaks then cover the process's whole life.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// This process's peak RSS (`VmHWM`) in bytes.
pub fn peak_rss() -> Option<u64> {
    status_kib("VmHWM:").map(|k| k * 1024)
}

/// This process's current RSS (`VmRSS`) in bytes.
pub fn current_rss() -> Option<u64> {
    status_kib("VmRSS:").map(|k| k * 1024)
}

fn status_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `/proc/loadavg`'s three load averages.
pub fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text.split_whitespace().map(|x| x.parse().unwrap_or(0.0));
    [
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_summary_orders_values() {
        let mut l = Latencies::new();
        for ms in 1..=100 {
            l.record(Duration::from_millis(ms));
        }
        let s = l.summary().expect("values");
        assert_eq!(s.n, 100);
        assert!((s.median - 0.050).abs() < 0.001, "{s:?}");
        assert!((s.p90 - 0.090).abs() < 0.001, "{s:?}");
        assert!((s.p99 - 0.099).abs() < 0.001, "{s:?}");
        assert!((s.min - 0.001).abs() < 1e-6 && (s.max - 0.100).abs() < 0.001);
        assert!((s.mean - 0.0505).abs() < 1e-9);
    }

    #[test]
    fn plain_summary() {
        let s = summarize(&[3.0, 1.0, 2.0, 4.0]).expect("values");
        assert_eq!((s.min, s.median, s.max), (1.0, 2.5, 4.0));
        assert!(summarize(&[]).is_none());
    }

    #[test]
    fn cpu_and_rss_are_readable() {
        let a = CpuSnapshot::now();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let d = CpuSnapshot::now().since(&a);
        assert!(d.user_s + d.system_s >= 0.0);
        assert!(peak_rss().is_some() && current_rss().is_some());
    }
}
