//! 32 clients doing mixed operations on one mount for a bounded time: no operation takes more
//! than 60 s (no deadlock), no file descriptor leaks, RSS stays within `--memory-limit`, and
//! at the end every byte is checked through the mount and in S3.
//!
//! `KEEPFS_LOAD_SECS` sets how long the clients run: 20 s unless set (CI), 300 for the
//! issue's long run. Against servers other than the in-process one it runs only when set.
//! It found two races where a listing made an appended file read back short (tests/write.rs,
//! tests/faults.rs).

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::{Mount, pattern, server, sha256};

const CLIENTS: u64 = 32;
/// An operation slower than this is taken for a deadlock.
const WATCHDOG: Duration = Duration::from_secs(60);
const MEMORY_LIMIT_MIB: u64 = 256;

/// The process's open descriptors but sockets (the SDK keeps idle connections to the server
/// in a pool, as many as uploads ran at once, and closes them after 90 s).
fn open_fds(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.display().to_string())
        .filter(|t| !t.starts_with("socket:"))
        .collect()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// One client: its own directory of files whose content it knows, plus creates in a shared
/// directory. Returns the files it leaves, by path relative to the mount.
/// `shared_list_errors` counts listings of the shared directory that failed (see the test).
fn client(
    root: &Path,
    id: u64,
    until: Instant,
    slowest: &AtomicU64,
    shared_list_errors: &AtomicU64,
) -> BTreeMap<String, Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(0x10ad + id);
    let dir = format!("c{id}");
    std::fs::create_dir_all(root.join(&dir)).unwrap();
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let started = Instant::now();
        let pick = files
            .keys()
            .nth(rng.random_range(0..files.len().max(1)))
            .cloned();
        let op = rng.random_range(0..9);
        if std::env::var_os("KEEPFS_LOAD_TRACE").is_some() {
            eprintln!("client {id} op {n}: {op} on {pick:?}");
        }
        match (op, pick) {
            (0 | 1, _) | (_, None) => {
                let size = if rng.random_bool(0.1) {
                    rng.random_range(1 << 20..3 << 20)
                } else {
                    rng.random_range(0..64 << 10)
                };
                let name = format!("{dir}/f{n}");
                let data = pattern(size, id << 32 | n);
                std::fs::write(root.join(&name), &data).unwrap();
                files.insert(name, data);
            }
            (2 | 3, Some(name)) => {
                let got = std::fs::read(root.join(&name)).unwrap();
                let want = &files[&name];
                let same_start = got
                    .iter()
                    .zip(want.iter())
                    .take_while(|(a, b)| a == b)
                    .count();
                assert!(
                    got == *want,
                    "{name}: read {} bytes, want {} (the same for the first {same_start})",
                    got.len(),
                    want.len()
                );
            }
            (4, Some(name)) => {
                let tail = pattern(rng.random_range(1..8192), n);
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(root.join(&name))
                    .unwrap();
                f.write_all(&tail).unwrap();
                if rng.random_bool(0.5) {
                    f.sync_all().unwrap();
                }
                files.get_mut(&name).unwrap().extend_from_slice(&tail);
            }
            (5, Some(name)) => {
                let to = format!("{dir}/r{n}");
                std::fs::rename(root.join(&name), root.join(&to)).unwrap();
                let data = files.remove(&name).unwrap();
                files.insert(to, data);
            }
            (6, Some(name)) => {
                std::fs::remove_file(root.join(&name)).unwrap();
                files.remove(&name);
            }
            (7, _) => {
                let mut listed = common::names(&root.join(&dir));
                listed.sort();
                let mut known: Vec<String> = files
                    .keys()
                    .filter_map(|k| k.strip_prefix(&format!("{dir}/")).map(str::to_owned))
                    .collect();
                known.sort();
                assert_eq!(listed, known, "client {id}'s directory");
            }
            (_, _) => {
                let name = format!("shared/{id}-{n}");
                let data = pattern(rng.random_range(0..4096), n + 7);
                std::fs::write(root.join(&name), &data).unwrap();
                if let Err(e) = std::fs::read_dir(root.join("shared"))
                    .and_then(|entries| entries.collect::<std::io::Result<Vec<_>>>())
                {
                    // A listing is whole or EIO; nothing else.
                    assert_eq!(e.raw_os_error(), Some(libc::EIO), "listing shared: {e}");
                    shared_list_errors.fetch_add(1, Ordering::Relaxed);
                }
                files.insert(name, data);
            }
        }
        slowest.fetch_max(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    files
}

#[test]
fn thirty_two_clients_mixed_operations_stay_correct_and_bounded() {
    // CI runs the short version against the in-process server; a slower server (moto) or the
    // long run only when asked.
    let asked = std::env::var("KEEPFS_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    let secs = match asked {
        Some(secs) => secs,
        None if server().kind == common::ServerKind::S3sFs => 20,
        None => {
            common::skipped("load: set KEEPFS_LOAD_SECS to run it against this server");
            return;
        }
    };
    let s = server();
    let bucket = s.bucket("load");
    let limit = format!("{MEMORY_LIMIT_MIB}M");
    let m = Mount::new(&format!("s3://{bucket}"), &["--memory-limit", &limit]);
    let pid = m.pid();
    std::fs::create_dir(m.path().join("shared")).unwrap();
    let fds_before = open_fds(pid);
    let until = Instant::now() + Duration::from_secs(secs);
    let slowest = Arc::new(AtomicU64::new(0));
    let shared_list_errors = Arc::new(AtomicU64::new(0));
    let peak_rss = Arc::new(AtomicU64::new(rss_kib(pid)));
    let workers: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let (root, slowest) = (m.path().to_owned(), slowest.clone());
            let errors = shared_list_errors.clone();
            std::thread::spawn(move || client(&root, id, until, &slowest, &errors))
        })
        .collect();
    // Watchdog: the clients stop starting operations at `until`; one still busy a minute
    // later is stuck.
    while !workers.iter().all(|w| w.is_finished()) {
        peak_rss.fetch_max(rss_kib(pid), Ordering::Relaxed);
        assert!(
            Instant::now() < until + WATCHDOG,
            "an operation has run for over {WATCHDOG:?}: deadlock?\n{}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut all: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for w in workers {
        all.extend(w.join().expect("a client failed"));
    }
    common::flush(&m);
    let slowest = Duration::from_millis(slowest.load(Ordering::Relaxed));
    let peak = peak_rss.load(Ordering::Relaxed) / 1024;
    // The kernel may keep a few descriptors for files still open in its caches; a leak grows
    // with the operations (thousands here).
    let fds_after = open_fds(pid);
    let shared_list_errors = shared_list_errors.load(Ordering::Relaxed);
    eprintln!(
        "{CLIENTS} clients for {secs} s: {} files left, slowest operation {slowest:?}, peak RSS {peak} MiB (limit {MEMORY_LIMIT_MIB}), descriptors but sockets {} -> {}, shared listings failed {shared_list_errors}",
        all.len(),
        fds_before.len(),
        fds_after.len()
    );
    // s3s-fs answers a listing with InternalError when a file in the directory goes between
    // its readdir and its stat of it (s3s-fs 0.14.1, `list_objects_with_delimiter`): under
    // this churn the shared directory's listing then fails after the SDK's retries, and keepfs
    // rightly answers EIO rather than a partial listing. Other servers must list it.
    if s.kind != common::ServerKind::S3sFs {
        assert_eq!(
            shared_list_errors, 0,
            "listings of the shared directory failed"
        );
    }
    assert!(slowest < WATCHDOG, "slowest operation {slowest:?}");
    assert!(
        fds_after.len() <= fds_before.len() + 4,
        "file descriptors {fds_before:?} -> {fds_after:?}"
    );
    assert!(
        peak <= MEMORY_LIMIT_MIB,
        "peak RSS {peak} MiB over the limit"
    );
    for (name, data) in &all {
        let want = sha256(data);
        let got = std::fs::read(m.path().join(name)).unwrap();
        assert_eq!(sha256(&got), want, "{name} through the mount");
        assert_eq!(
            s.sha256_streaming(&bucket, name).as_deref(),
            Some(want.as_str()),
            "{name} in S3"
        );
    }
}
