//! Latency recording: HDR histograms in microseconds (1 µs to 10 min, 3 significant
//! digits), one per task and merged at the end so no lock sits on the hot path, and the
//! percentile summary every scenario reports.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest recordable value, µs (larger values are clamped to it).
const MAX_US: u64 = 600_000_000;

/// One latency distribution.
#[derive(Clone, Debug)]
pub struct Latency {
    h: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Latency {
        Latency {
            // The bounds are constants that hdrhistogram accepts (low >= 1, high >= 2*low,
            // sigfig <= 5), so this cannot fail.
            h: Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds"),
        }
    }

    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(MAX_US).max(1);
        self.h.saturating_record(us.min(MAX_US));
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides: adding cannot go out of range.
        let _ = self.h.add(&other.h);
    }

    pub fn len(&self) -> u64 {
        self.h.len()
    }

    pub fn is_empty(&self) -> bool {
        self.h.len() == 0
    }

    pub fn summary(&self) -> Summary {
        let ms = |us: u64| us as f64 / 1000.0;
        if self.h.is_empty() {
            return Summary::default();
        }
        Summary {
            count: self.h.len(),
            p50_ms: ms(self.h.value_at_quantile(0.50)),
            p90_ms: ms(self.h.value_at_quantile(0.90)),
            p99_ms: ms(self.h.value_at_quantile(0.99)),
            p999_ms: ms(self.h.value_at_quantile(0.999)),
            max_ms: ms(self.h.max()),
            mean_ms: self.h.mean() / 1000.0,
        }
    }
}

/// Percentiles of one distribution, in milliseconds (µs resolution).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Summary {
    /// p50 <= p90 <= p99 <= p99.9 <= max (true for an empty one).
    pub fn is_ordered(&self) -> bool {
        self.p50_ms <= self.p90_ms
            && self.p90_ms <= self.p99_ms
            && self.p99_ms <= self.p999_ms
            && self.p999_ms <= self.max_ms
    }
}

/// Rounds to 3 decimals for display and JSON.
pub fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
