//! `--memory-limit`: sixteen sequential readers and sixteen writers at once keep keepfs's peak
//! RSS (`VmHWM`) within the limit, and every byte round-trips (read back on the mount, and
//! from S3 after the uploads).

mod common;

use std::io::Write;

use common::scrape::{metrics_addr, scrape, sum};
use common::{Mount, flush, pattern, server, sha256};

const STREAMS: usize = 16;
const FILE_SIZE: usize = 16 << 20;
const LIMIT_MIB: u64 = 160;

/// Peak resident set of process `pid` in bytes (`VmHWM` in `/proc/PID/status`).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

#[test]
fn sixteen_readers_and_sixteen_writers_stay_within_the_memory_limit() {
    let s = server();
    if s.kind != common::ServerKind::S3sFs {
        // The bound is keepfs's own; a slower server only makes the test take minutes longer.
        return common::skipped("memory limit: checked against the in-process server only");
    }
    let bucket = s.bucket("memory");
    let inputs: Vec<Vec<u8>> = (0..STREAMS).map(|i| pattern(FILE_SIZE, i as u64)).collect();
    for (i, data) in inputs.iter().enumerate() {
        s.put(&bucket, &format!("in/{i:02}"), data);
    }
    let limit = format!("{LIMIT_MIB}MiB");
    let m = Mount::new(
        &format!("s3://{bucket}"),
        &["--memory-limit", &limit, "--metrics-addr", "127.0.0.1:0"],
    );
    let addr = metrics_addr(&m);
    let log = m.log();
    assert!(
        log.contains("memory limit") && log.contains(&format!("limit={}", LIMIT_MIB << 20)),
        "{log}"
    );
    std::fs::create_dir(m.path().join("out")).unwrap();
    let idle = peak_rss(m.pid());
    let outputs: Vec<Vec<u8>> = (0..STREAMS)
        .map(|i| pattern(FILE_SIZE, 1000 + i as u64))
        .collect();
    std::thread::scope(|scope| {
        for (i, want) in inputs.iter().enumerate() {
            let path = m.path().join(format!("in/{i:02}"));
            scope.spawn(move || {
                let got = std::fs::read(&path).unwrap();
                assert_eq!(sha256(&got), sha256(want), "in/{i:02} read back");
            });
        }
        for (i, data) in outputs.iter().enumerate() {
            let path = m.path().join(format!("out/{i:02}"));
            scope.spawn(move || {
                let mut f = std::fs::File::create(&path).unwrap();
                for chunk in data.chunks(1 << 20) {
                    f.write_all(chunk).unwrap();
                }
            });
        }
    });
    flush(&m);
    let peak = peak_rss(m.pid());
    // Every reservation went back: nothing in transit once readers closed and uploads ended.
    let (_, samples) = scrape(&addr);
    assert_eq!(
        sum(&samples, "keepfs_memory_limit_bytes", &[]),
        (LIMIT_MIB << 20) as f64
    );
    assert_eq!(sum(&samples, "keepfs_memory_in_transit_bytes", &[]), 0.0);
    for (i, data) in outputs.iter().enumerate() {
        let key = format!("out/{i:02}");
        let got = s
            .get(&bucket, &key)
            .unwrap_or_else(|| panic!("{key} not in S3"));
        assert_eq!(sha256(&got), sha256(data), "{key} in S3");
    }
    println!(
        "peak RSS {} MiB with --memory-limit {limit} ({} MiB after mounting)",
        peak >> 20,
        idle >> 20
    );
    assert!(
        peak <= LIMIT_MIB << 20,
        "peak RSS {} MiB above --memory-limit {limit}",
        peak >> 20
    );
}

#[test]
fn a_memory_limit_too_small_to_run_in_is_refused_before_mounting() {
    let s = server();
    let bucket = s.bucket("memory-small");
    let dir = tempfile::tempdir().unwrap();
    let out = common::mount_expecting_failure(
        &format!("s3://{bucket}"),
        dir.path(),
        &["--memory-limit", "100MiB"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "--memory-limit 100MiB is too small: at least 160 MiB (128 MiB for the process itself"
        ),
        "{stderr}"
    );
    assert!(!common::is_mounted(dir.path()));
}
