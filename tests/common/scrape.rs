//! Counting what keepfs did: its Prometheus exposition (`--metrics-addr`), scraped and summed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{Mount, http_get};

/// The address keepfs logged it serves metrics at (`--metrics-addr 127.0.0.1:0` picks a port).
pub fn metrics_addr(m: &Mount) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = m.log();
        if let Some(addr) = log
            .lines()
            .filter(|l| l.contains("serving /metrics"))
            .find_map(|l| l.split("bound=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
        {
            return addr.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no metrics address logged:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A scrape: each sample line `name{labels} value`, keyed by everything before the value.
pub fn scrape(addr: &str) -> (String, HashMap<String, f64>) {
    let (status, text) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{text}");
    let samples = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect();
    (text, samples)
}

/// The sum of every sample of `name` whose labels contain all of `labels` (`k="v"` strings).
pub fn sum(samples: &HashMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(k, _)| {
            let (n, l) = k.split_once('{').unwrap_or((k, ""));
            n == name && labels.iter().all(|want| l.contains(want))
        })
        .map(|(_, v)| v)
        .sum()
}

/// How much the samples of `name` with `labels` grew from `before` to `after`.
pub fn delta(
    before: &HashMap<String, f64>,
    after: &HashMap<String, f64>,
    name: &str,
    labels: &[&str],
) -> f64 {
    sum(after, name, labels) - sum(before, name, labels)
}
