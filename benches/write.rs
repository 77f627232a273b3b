//! Write benchmark: a 1 GiB sequential write through a `--read-write` keepfs mount.
//!
//! - until `close` returns, against writing (and fsyncing) the same bytes to a local file in the
//!   same filesystem as the cache directory: keepfs's promise is local-disk speed;
//! - until the object is in S3, against the raw aws-sdk-s3 multipart upload of the same bytes
//!   (8 MiB parts, 16 in flight);
//! - create + write + close of many 4 KiB files (files per second).
//!
//! Run: `benches/garage.sh cargo bench --bench write`, or with KEEPFS_BENCH_* set as for
//! `benches/read.rs`. Knobs: KEEPFS_BENCH_SIZE_MIB (1024), KEEPFS_BENCH_RUNS (3),
//! KEEPFS_BENCH_FILES (10000).

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{KeepfsMount, Target, env_or, multipart_upload, pattern, target};

const PART: usize = 8 << 20;
const CONCURRENCY: usize = 16;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let size = (env_or("KEEPFS_BENCH_SIZE_MIB", 1024) << 20) as usize;
    let runs = env_or("KEEPFS_BENCH_RUNS", 3);
    let files = env_or("KEEPFS_BENCH_FILES", 10_000);
    let t = target(&rt);
    println!(
        "server: {}  bucket: {}  size: {} MiB  runs: {runs}",
        t.endpoint,
        t.bucket,
        size >> 20
    );
    let data = pattern(size, 42);
    let mb = size as f64 / 1e6;
    let mut rows: Vec<(&str, Vec<f64>)> = Vec::new();
    let mut record = |name: &'static str, v: f64, unit: &str| {
        println!("  {name:<44} {v:9.1} {unit}");
        match rows.iter_mut().find(|(n, _)| *n == name) {
            Some((_, all)) => all.push(v),
            None => rows.push((name, vec![v])),
        }
    };
    for run in 1..=runs {
        println!("run {run}/{runs}");
        let mount = KeepfsMount::new(&t, &t.bucket, &["--read-write"]);
        let cache_dir = format!("{}.cache", mount.path().display());

        // Local baseline: the same bytes into a file next to the cache directory, fsynced.
        let local = std::path::PathBuf::from(format!("{cache_dir}-baseline"));
        let start = Instant::now();
        write_file(&local, &data);
        record(
            "local file write+fsync (MB/s)",
            mb / start.elapsed().as_secs_f64(),
            "MB/s",
        );
        let _ = std::fs::remove_file(&local);

        let key = format!("bench-write-run{run}-{}", std::process::id());
        let start = Instant::now();
        write_file(&mount.path().join(&key), &data);
        let closed = start.elapsed();
        record(
            "keepfs write until close (MB/s)",
            mb / closed.as_secs_f64(),
            "MB/s",
        );
        wait_uploaded(&rt, &t, &key, size);
        record(
            "keepfs write until in S3 (MB/s)",
            mb / start.elapsed().as_secs_f64(),
            "MB/s",
        );

        let raw_key = format!("{key}-raw");
        let start = Instant::now();
        rt.block_on(multipart_upload(
            &t,
            &raw_key,
            size,
            PART,
            CONCURRENCY,
            |n, len| data[n * PART..n * PART + len].to_vec(),
        ));
        record(
            "raw SDK multipart upload (MB/s)",
            mb / start.elapsed().as_secs_f64(),
            "MB/s",
        );

        let dir = mount
            .path()
            .join(format!("bench-small/run{run}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let small = pattern(4096, 7);
        let start = Instant::now();
        for i in 0..files {
            write_file_nosync(&dir.join(format!("f{i:05}")), &small);
        }
        record(
            "keepfs create+write+close 4 KiB (files/s)",
            files as f64 / start.elapsed().as_secs_f64(),
            "files/s",
        );
        println!("    keepfs peak RSS: {} MiB", mount.peak_rss_kib() / 1024);
    }
    println!("\nsummary (median of {runs} runs; all runs in brackets)");
    for (name, v) in &rows {
        let mut sorted = v.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let all: Vec<String> = v.iter().map(|x| format!("{x:.0}")).collect();
        println!(
            "  {name:<44} {:9.1}  [{}]",
            sorted[sorted.len() / 2],
            all.join(", ")
        );
    }
}

fn write_file(path: &std::path::Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for chunk in data.chunks(1 << 20) {
        f.write_all(chunk).unwrap();
    }
    f.sync_all().unwrap();
}

/// What an application does: write and close (keepfs makes it durable at close).
fn write_file_nosync(path: &std::path::Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.write_all(data).unwrap();
}

fn wait_uploaded(rt: &tokio::runtime::Runtime, t: &Target, key: &str, size: usize) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let head = rt.block_on(t.client.head_object().bucket(&t.bucket).key(key).send());
        if head.is_ok_and(|h| h.content_length() == Some(size as i64)) {
            return;
        }
        assert!(Instant::now() < deadline, "{key} not uploaded in time");
        std::thread::sleep(Duration::from_millis(20));
    }
}
