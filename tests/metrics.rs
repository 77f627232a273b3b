//! `--metrics-addr`: a workload through a real mount moves the Prometheus counters by exactly
//! what it did (bytes written = bytes uploaded, GETs = the server's own count), `promtool`
//! accepts the exposition, the gauges agree with `keepfs status --json`, and `/healthz` and
//! `/readyz` answer.

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::scrape::{delta, metrics_addr, scrape, sum};
use common::{Mount, flush, http_get as get, pattern, server, sha256, sha256_file};

/// Drops the kernel's page cache of `path`, so the next read reaches keepfs again.
fn drop_page_cache(path: &Path) {
    let out = Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["iflag=nocache", "count=0", "status=none"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn a_workload_moves_the_counters_by_what_it_did() {
    let s = server();
    let bucket = s.bucket("metrics");
    let seeded: Vec<(String, Vec<u8>)> = [(3 << 20) + 17, 300 << 10, 5]
        .into_iter()
        .enumerate()
        .map(|(i, len)| (format!("seed{i}.bin"), pattern(len, i as u64)))
        .collect();
    for (key, data) in &seeded {
        s.put(&bucket, key, data);
    }
    let m = Mount::new(
        &format!("s3://{bucket}"),
        &["--metrics-addr", "127.0.0.1:0", "--part-size", "5MiB"],
    );
    let addr = metrics_addr(&m);
    assert_eq!(get(&addr, "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(get(&addr, "/readyz"), (200, "ready\n".to_owned()));
    assert_eq!(get(&addr, "/nothing").0, 404);

    let (_, before) = scrape(&addr);
    let traffic_before = common::traffic(&bucket);

    // Reads: every seeded object once, through the kernel.
    let mut read_bytes = 0;
    for (key, data) in &seeded {
        assert_eq!(sha256_file(&m.path().join(key)), sha256(data), "{key}");
        read_bytes += data.len();
    }
    // A miss: lookup answers ENOENT.
    assert!(!m.path().join("absent.txt").exists());
    // Writes: a small file (PutObject) and one of two parts (multipart), each durable at close.
    let written = [pattern(10_000, 7), pattern((6 << 20) + 5, 8)];
    for (i, data) in written.iter().enumerate() {
        let mut f = fs::File::create(m.path().join(format!("new{i}.bin"))).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    }
    flush(&m);
    let (_, after) = scrape(&addr);
    let traffic_after = common::traffic(&bucket);

    let d = |name: &str, labels: &[&str]| delta(&before, &after, name, labels);
    let written_bytes: usize = written.iter().map(Vec::len).sum();
    assert_eq!(d("keepfs_written_bytes_total", &[]), written_bytes as f64);
    assert_eq!(d("keepfs_uploaded_bytes_total", &[]), written_bytes as f64);
    assert_eq!(d("keepfs_read_bytes_total", &[]), read_bytes as f64);
    let ok = "outcome=\"ok\"";
    assert_eq!(
        d("keepfs_s3_requests_total", &["operation=\"PutObject\"", ok]),
        1.0
    );
    assert_eq!(
        d(
            "keepfs_s3_requests_total",
            &["operation=\"UploadPart\"", ok]
        ),
        2.0
    );
    assert_eq!(
        d(
            "keepfs_s3_requests_total",
            &["operation=\"CompleteMultipartUpload\"", ok]
        ),
        1.0
    );
    assert!(
        d(
            "keepfs_fuse_errors_total",
            &["op=\"lookup\"", "errno=\"ENOENT\""]
        ) >= 1.0
    );
    assert!(d("keepfs_fuse_requests_total", &["op=\"write\""]) >= 2.0);
    assert!(
        d(
            "keepfs_fuse_request_duration_seconds_count",
            &["op=\"read\""]
        ) >= 3.0
    );
    // Each closed file was journalled (its record made durable) at least once.
    assert!(d("keepfs_journal_sync_duration_seconds_count", &[]) >= 2.0);
    // Every block read came from S3: the memory cache missed.
    assert!(d("keepfs_cache_misses_total", &["cache=\"memory\""]) >= 3.0);
    assert_eq!(sum(&after, "keepfs_dirty_files", &[]), 0.0);
    assert_eq!(sum(&after, "keepfs_uploads_in_flight", &[]), 0.0);
    let gets = d("keepfs_s3_requests_total", &["operation=\"GetObject\""]);
    assert!(gets >= 3.0, "one GET per object at least, got {gets}");
    // The server's own counts (the in-process server counts; others can't be asked).
    if let (Some(t0), Some(t1)) = (traffic_before, traffic_after) {
        assert_eq!(
            gets,
            (t1.gets - t0.gets) as f64,
            "GetObject: keepfs vs the server"
        );
        assert_eq!(
            d("keepfs_s3_received_bytes_total", &[]),
            (t1.downloaded - t0.downloaded) as f64
        );
        // Request bodies: the file bytes and CompleteMultipartUpload's XML.
        assert_eq!(
            d("keepfs_s3_sent_bytes_total", &[]),
            (t1.uploaded - t0.uploaded) as f64
        );
    } else {
        common::skipped(
            "GET count against the server's own count (only the in-process server counts)",
        );
    }
    // In S3, byte for byte.
    for (i, data) in written.iter().enumerate() {
        let key = format!("new{i}.bin");
        assert_eq!(
            s.get(&bucket, &key).map(|b| sha256(&b)),
            Some(sha256(data)),
            "{key}"
        );
    }

    // A re-read after the page cache is dropped is served by keepfs's memory cache.
    let (key, data) = &seeded[0];
    drop_page_cache(&m.path().join(key));
    let (_, before) = scrape(&addr);
    assert_eq!(sha256_file(&m.path().join(key)), sha256(data));
    let (_, after) = scrape(&addr);
    assert!(
        delta(
            &before,
            &after,
            "keepfs_cache_hits_total",
            &["cache=\"memory\""]
        ) >= 1.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "keepfs_cache_hit_bytes_total",
            &["cache=\"memory\""]
        ),
        data.len() as f64
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "keepfs_s3_requests_total",
            &["operation=\"GetObject\""]
        ),
        0.0
    );
    assert!(sum(&after, "keepfs_cache_size_bytes", &["cache=\"memory\""]) >= data.len() as f64);
}

#[test]
fn promtool_accepts_the_exposition() {
    let s = server();
    let bucket = s.bucket("promtool");
    s.put(&bucket, "a.txt", b"hello");
    let m = Mount::new(
        &format!("s3://{bucket}"),
        &["--metrics-addr", "127.0.0.1:0"],
    );
    let addr = metrics_addr(&m);
    // Every family gets samples: reads, a write, an error.
    assert_eq!(fs::read(m.path().join("a.txt")).unwrap(), b"hello");
    fs::write(m.path().join("b.txt"), b"world").unwrap();
    let _ = fs::metadata(m.path().join("missing"));
    flush(&m);
    let (text, samples) = scrape(&addr);
    // Counters and histograms have counted; gauges are there (0 once everything is flushed).
    for counted in [
        "keepfs_fuse_requests_total",
        "keepfs_fuse_request_duration_seconds_bucket",
        "keepfs_s3_requests_total",
        "keepfs_s3_request_duration_seconds_sum",
        "keepfs_journal_sync_duration_seconds_count",
        "keepfs_cache_size_bytes",
    ] {
        assert!(
            sum(&samples, counted, &[]) > 0.0,
            "{counted} missing or 0:\n{text}"
        );
    }
    for gauge in ["keepfs_dirty_files", "keepfs_oldest_dirty_age_seconds"] {
        assert!(samples.contains_key(gauge), "{gauge} missing:\n{text}");
    }
    let Ok(mut promtool) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        return common::skipped("promtool check metrics (install Debian's prometheus package)");
    };
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {out:?}\n{text}"
    );
}

#[test]
fn gauges_agree_with_status_json() {
    let s = server();
    let bucket = s.bucket("mstatus");
    let cache = tempfile::tempdir().unwrap();
    let cache_arg = cache.path().to_str().unwrap();
    let m = Mount::new(
        &format!("s3://{bucket}"),
        &["--metrics-addr", "127.0.0.1:0", "--cache-dir", cache_arg],
    );
    let addr = metrics_addr(&m);
    // A file held open for writing stays dirty (its upload waits for the last close), on any
    // server; one closed file is held back where the server can refuse uploads.
    let mut open = fs::File::create(m.path().join("open.log")).unwrap();
    open.write_all(&pattern(12_345, 1)).unwrap();
    open.sync_all().unwrap();
    let held = s.refuse_uploads_if_possible(&bucket);
    fs::write(m.path().join("closed.bin"), pattern(777, 2)).unwrap();
    if !held {
        flush(&m); // only the open file is left dirty
    }
    std::thread::sleep(Duration::from_millis(500));
    let out = Command::new(common::keepfs_bin())
        .args(["status", "--json", "--cache-dir", cache_arg])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (text, samples) = scrape(&addr);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let live = &status["live"];
    for (gauge, field) in [
        ("keepfs_dirty_files", "dirty_files"),
        ("keepfs_dirty_bytes", "bytes_pending"),
        ("keepfs_open_for_writing_files", "open_for_writing"),
        ("keepfs_uploads_in_flight", "uploads_in_flight"),
        ("keepfs_conflict_copies_total", "conflicts"),
        ("keepfs_resumed_bytes_total", "resumed_bytes"),
    ] {
        assert_eq!(
            sum(&samples, gauge, &[]),
            live[field].as_f64().unwrap(),
            "{gauge} vs {field}: {status}\n{text}"
        );
    }
    let (files, bytes) = if held {
        (2.0, 12_345.0 + 777.0)
    } else {
        (1.0, 12_345.0)
    };
    assert_eq!(sum(&samples, "keepfs_dirty_files", &[]), files, "{text}");
    assert_eq!(sum(&samples, "keepfs_dirty_bytes", &[]), bytes, "{text}");
    assert_eq!(
        sum(&samples, "keepfs_open_for_writing_files", &[]),
        1.0,
        "{text}"
    );
    let age = sum(&samples, "keepfs_oldest_dirty_age_seconds", &[]);
    let status_age = live["oldest_pending_ms"].as_f64().unwrap() / 1000.0;
    assert!(
        age >= 0.5 && (age - status_age).abs() < 5.0,
        "{age} vs {status_age}"
    );
    drop(open);
    if held {
        s.allow_uploads(&bucket);
    }
    flush(&m);
    let (_, samples) = scrape(&addr);
    assert_eq!(sum(&samples, "keepfs_dirty_files", &[]), 0.0);
    assert_eq!(sum(&samples, "keepfs_oldest_dirty_age_seconds", &[]), 0.0);
}

#[test]
fn a_taken_metrics_port_fails_the_mount_before_mounting() {
    let s = server();
    let bucket = s.bucket("mport");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = common::mount_expecting_failure(
        &format!("s3://{bucket}"),
        dir.path(),
        &["--metrics-addr", &addr],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot serve metrics at {addr}")),
        "{stderr}"
    );
    assert!(!common::is_mounted(dir.path()));
}
