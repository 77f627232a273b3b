//! Sequential read benchmark: keepfs through the kernel against the raw aws-sdk-s3 client doing
//! parallel ranged GETs of the same objects (the limit keepfs can reach).
//!
//! Measures, per run: one reader of a 1 GiB object (cold, then a warm re-read served by keepfs's
//! memory cache with the kernel page cache dropped), and four readers of four 1 GiB objects.
//! Prints MB/s, the ratio keepfs/raw and keepfs's peak RSS.
//!
//! Run against Garage (see benches/garage.sh): `benches/garage.sh`
//! or against any server: KEEPFS_BENCH_ENDPOINT=http://... KEEPFS_BENCH_BUCKET=... AWS_ACCESS_KEY_ID=...
//! AWS_SECRET_ACCESS_KEY=... cargo bench --bench read
//! Knobs: KEEPFS_BENCH_SIZE_MIB (default 1024), KEEPFS_BENCH_RUNS (default 3).
//! Without KEEPFS_BENCH_ENDPOINT it falls back to the in-process s3s-fs server, which only
//! measures s3s-fs itself.

mod common;

use std::io::Read;
use std::path::Path;
use std::time::Instant;

use aws_sdk_s3::Client;
use common::{KeepfsMount, env_or, target};

const RAW_PART: u64 = 8 << 20;
const RAW_CONCURRENCY: usize = 16;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let size = env_or("KEEPFS_BENCH_SIZE_MIB", 1024) << 20;
    let runs = env_or("KEEPFS_BENCH_RUNS", 3);
    let target = target(&rt);
    println!(
        "server: {}  bucket: {}  object size: {} MiB  runs: {runs}",
        target.endpoint,
        target.bucket,
        size >> 20
    );

    let keys: Vec<String> = (0..4)
        .map(|i| format!("bench/obj{i}-{}", size >> 20))
        .collect();
    for (i, key) in keys.iter().enumerate() {
        rt.block_on(common::ensure_object(&target, key, size, i as u64));
    }

    let server_pid = std::env::var("KEEPFS_BENCH_SERVER_PID").ok();
    let mut rows: Vec<(String, Vec<Sample>)> = Vec::new();
    let mut record = |name: &str, sample: Sample| {
        println!("  {name:<40} {sample}");
        match rows.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => v.push(sample),
            None => rows.push((name.to_owned(), vec![sample])),
        }
    };
    let mut peak_rss_kib = 0u64;
    let raw_one = || {
        rt.block_on(raw_read(
            target.client.clone(),
            target.bucket.clone(),
            keys[0].clone(),
            size,
        ))
    };
    let raw_four = || {
        rt.block_on(async {
            let tasks: Vec<_> = keys
                .iter()
                .map(|k| {
                    raw_read(
                        target.client.clone(),
                        target.bucket.clone(),
                        k.clone(),
                        size,
                    )
                })
                .collect();
            futures_join_all(tasks).await;
        })
    };
    for run in 1..=runs {
        println!("run {run}/{runs}");
        let raw = Meter::start(&["self"], server_pid.as_deref());
        raw_one();
        record("raw SDK, 1 object", raw.finish(size));

        let mount = KeepfsMount::new(&target, &target.bucket, &[]);
        let path = mount.path().join(&keys[0]);
        let pid = mount.pid();
        let meter = Meter::start(&["self", &pid], server_pid.as_deref());
        read_file(&path);
        record("keepfs cold, 1 reader", meter.finish(size));
        let name = if drop_page_cache() {
            "keepfs warm (memory cache), 1 reader"
        } else {
            "keepfs warm (page cache kept), 1 reader"
        };
        let meter = Meter::start(&["self", &pid], server_pid.as_deref());
        read_file(&path);
        record(name, meter.finish(size));
        peak_rss_kib = peak_rss_kib.max(mount.peak_rss_kib());
        drop(mount);

        let raw = Meter::start(&["self"], server_pid.as_deref());
        raw_four();
        record("raw SDK, 4 objects", raw.finish(4 * size));
        let mount = KeepfsMount::new(&target, &target.bucket, &[]);
        let pid = mount.pid();
        let meter = Meter::start(&["self", &pid], server_pid.as_deref());
        std::thread::scope(|s| {
            for k in &keys {
                let p = mount.path().join(k);
                s.spawn(move || read_file(&p));
            }
        });
        record("keepfs cold, 4 readers", meter.finish(4 * size));
        peak_rss_kib = peak_rss_kib.max(mount.peak_rss_kib());
    }

    println!("\nsummary (median of {runs} runs; MB/s of all runs in brackets)");
    let median = |v: &[Sample], f: fn(&Sample) -> f64| {
        let mut s: Vec<f64> = v.iter().map(f).collect();
        s.sort_by(|a, b| a.total_cmp(b));
        s[s.len() / 2]
    };
    let get = |name: &str| {
        rows.iter()
            .find(|(n, _)| n.starts_with(name))
            .map(|(_, v)| median(v, |s| s.mbps))
    };
    for (name, v) in &rows {
        let all: Vec<String> = v.iter().map(|x| format!("{:.0}", x.mbps)).collect();
        println!(
            "  {name:<40} {:7.1} MB/s  client CPU {:.2} s/GiB  server CPU {:.2} s/GiB  [{}]",
            median(v, |s| s.mbps),
            median(v, |s| s.client_cpu_per_gib),
            median(v, |s| s.server_cpu_per_gib),
            all.join(", ")
        );
    }
    if let (Some(k), Some(r)) = (get("keepfs cold, 1"), get("raw SDK, 1")) {
        println!("  ratio keepfs/raw, 1 reader cold:  {:.2}", k / r);
    }
    if let (Some(k), Some(r)) = (get("keepfs cold, 4"), get("raw SDK, 4")) {
        println!("  ratio keepfs/raw, 4 readers cold: {:.2}", k / r);
    }
    println!("  keepfs peak RSS: {} MiB", peak_rss_kib / 1024);
}

/// One measurement: throughput and the CPU time it cost, per GiB moved.
#[derive(Debug, Clone, Copy)]
struct Sample {
    mbps: f64,
    /// CPU of the reading side: the bench process, plus keepfs when reading through it.
    client_cpu_per_gib: f64,
    /// CPU of the S3 server (when KEEPFS_BENCH_SERVER_PID is set).
    server_cpu_per_gib: f64,
}

impl std::fmt::Display for Sample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:8.1} MB/s  client CPU {:.2} s/GiB  server CPU {:.2} s/GiB",
            self.mbps, self.client_cpu_per_gib, self.server_cpu_per_gib
        )
    }
}

/// Wall time and CPU time of a set of processes over one measurement.
struct Meter {
    start: Instant,
    client: Vec<(String, f64)>,
    server: Option<(String, f64)>,
}

impl Meter {
    fn start(client_pids: &[&str], server_pid: Option<&str>) -> Self {
        Meter {
            client: client_pids
                .iter()
                .map(|p| (p.to_string(), cpu_seconds(p)))
                .collect(),
            server: server_pid.map(|p| (p.to_owned(), cpu_seconds(p))),
            start: Instant::now(),
        }
    }

    fn finish(self, bytes: u64) -> Sample {
        let secs = self.start.elapsed().as_secs_f64();
        let gib = bytes as f64 / (1u64 << 30) as f64;
        let client: f64 = self.client.iter().map(|(p, c)| cpu_seconds(p) - c).sum();
        let server = self.server.map(|(p, c)| cpu_seconds(&p) - c).unwrap_or(0.0);
        Sample {
            mbps: bytes as f64 / 1e6 / secs,
            client_cpu_per_gib: client / gib,
            server_cpu_per_gib: server / gib,
        }
    }
}

/// User + system CPU seconds of process `pid` ("self" for this one), from /proc.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at field 3.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15: indexes 11 and 12 here. Linux reports 100 ticks/s.
    (ticks(11) + ticks(12)) / 100.0
}

async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(tasks: Vec<F>) {
    let handles: Vec<_> = tasks.into_iter().map(tokio::spawn).collect();
    for h in handles {
        h.await.unwrap();
    }
}

/// Reads `key` with RAW_CONCURRENCY ranged GETs of RAW_PART in flight, discarding the bytes.
async fn raw_read(client: Client, bucket: String, key: String, size: u64) {
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(RAW_CONCURRENCY));
    let mut handles = Vec::new();
    let mut offset = 0;
    while offset < size {
        let end = (offset + RAW_PART).min(size);
        let permit = sem.clone().acquire_owned().await.unwrap();
        let (client, bucket, key) = (client.clone(), bucket.to_owned(), key.to_owned());
        handles.push(tokio::spawn(async move {
            let out = client
                .get_object()
                .bucket(bucket)
                .key(key)
                .range(format!("bytes={offset}-{}", end - 1))
                .send()
                .await
                .expect("raw GET");
            let mut body = out.body;
            let mut n = 0u64;
            while let Some(chunk) = body.try_next().await.expect("raw body") {
                n += chunk.len() as u64;
            }
            assert_eq!(n, end - offset);
            drop(permit);
        }));
        offset = end;
    }
    for h in handles {
        h.await.unwrap();
    }
}

fn read_file(path: &Path) {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf).unwrap() > 0 {}
}

/// Drops the kernel page cache so a re-read goes to keepfs (root only).
fn drop_page_cache() -> bool {
    std::fs::write("/proc/sys/vm/drop_caches", "1").is_ok()
}
