//! What a run prints: a human table and one JSON line (for scripts).
//!
//! JSON shape: `{"scenario", "ok", "params": {...}, "results": {...},
//! "latency_ms": {"<name>": {count, p50_ms, p90_ms, p99_ms, p999_ms, max_ms, mean_ms}},
//! "steps": [...] (max only), "errors": [...]}`.

use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use super::stats::Summary;

/// The outcome of one scenario run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub scenario: String,
    pub params: Map<String, Value>,
    /// Scalar figures, in display order.
    pub results: Vec<(String, Value)>,
    /// Latency distributions, in display order.
    pub latencies: Vec<(String, Summary)>,
    /// Per-step rows (the `max` search).
    pub steps: Vec<Value>,
    /// The first few errors seen (and a count of the rest).
    pub errors: Vec<String>,
}

impl Report {
    pub fn new(scenario: &str) -> Report {
        Report {
            scenario: scenario.to_string(),
            ..Default::default()
        }
    }

    pub fn param(&mut self, k: &str, v: impl Into<Value>) -> &mut Self {
        self.params.insert(k.to_string(), v.into());
        self
    }

    pub fn result(&mut self, k: &str, v: impl Into<Value>) -> &mut Self {
        self.results.push((k.to_string(), v.into()));
        self
    }

    pub fn latency(&mut self, k: &str, s: Summary) -> &mut Self {
        self.latencies.push((k.to_string(), s));
        self
    }

    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// The one-line JSON form.
    pub fn json(&self) -> Value {
        let results: Map<String, Value> = self.results.iter().cloned().collect();
        let lat: Map<String, Value> = self
            .latencies
            .iter()
            .map(|(k, s)| (k.clone(), json!(s)))
            .collect();
        let mut v = json!({
            "scenario": self.scenario,
            "ok": self.ok(),
            "params": self.params,
            "results": results,
            "latency_ms": lat,
            "errors": self.errors,
        });
        if !self.steps.is_empty() {
            v["steps"] = json!(self.steps);
        }
        v
    }

    pub fn json_line(&self) -> String {
        self.json().to_string()
    }

    /// The human form: parameters, figures, a percentile table, steps, errors.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let params: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(out, "== {} ({})", self.scenario, params.join(" "));
        for (k, v) in &self.results {
            let _ = writeln!(out, "  {k:<28} {}", display(v));
        }
        if !self.latencies.is_empty() {
            let _ = writeln!(
                out,
                "  {:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max"
            );
            for (k, s) in &self.latencies {
                let _ = writeln!(
                    out,
                    "  {:<22} {:>9} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                    k, s.count, s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms
                );
            }
        }
        if !self.steps.is_empty() {
            let _ = writeln!(out, "  steps:");
            for s in &self.steps {
                let _ = writeln!(out, "    {}", s);
            }
        }
        if self.errors.is_empty() {
            let _ = writeln!(out, "  errors: none");
        } else {
            let _ = writeln!(out, "  errors:");
            for e in &self.errors {
                let _ = writeln!(out, "    {e}");
            }
        }
        out
    }
}

fn display(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Collects errors: keeps the first `KEEP` messages and counts the rest.
#[derive(Debug, Default, Clone)]
pub struct Errors {
    pub count: u64,
    pub first: Vec<String>,
}

impl Errors {
    const KEEP: usize = 10;

    pub fn push(&mut self, e: impl Into<String>) {
        self.count += 1;
        if self.first.len() < Self::KEEP {
            self.first.push(e.into());
        }
    }

    pub fn merge(&mut self, other: Errors) {
        self.count += other.count;
        for e in other.first {
            if self.first.len() < Self::KEEP {
                self.first.push(e);
            }
        }
    }

    /// The messages for a [`Report`], with a "... and n more" line when some were dropped.
    pub fn lines(&self) -> Vec<String> {
        let mut v = self.first.clone();
        let shown = v.len() as u64;
        if self.count > shown {
            v.push(format!("... and {} more", self.count - shown));
        }
        v
    }
}
