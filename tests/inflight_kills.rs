//! keepfs killed (SIGKILL) while the kernel is in the middle of a system call on the mount:
//! a `write`, `fsync`, `close`, a rename over a file, a directory rename. S3 sits behind a
//! proxy that delays every request (tests/common/faults.rs), so uploads, copies and deletes are
//! in flight when the kill lands. After a restart on the same cache directory every file is in
//! its old state or its new one, never a third: a file holds its last acknowledged bytes or
//! the bytes of the operation cut off, a renamed file is under exactly one of its names, a
//! renamed directory is whole under one of its names.
//!
//! `KEEPFS_INFLIGHT_KILLS` (default 24) sets the number of kills, `KEEPFS_INFLIGHT_SEED` the
//! seed (printed, so a failure reproduces).

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::faults::{Fault, FaultProxy};
use common::{Mount, pattern, server, sha256};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The system call a kill lands in.
#[derive(Debug, Clone, Copy)]
enum Call {
    /// `write` of 2 MiB into an acknowledged file (not closed: the old bytes stay promised).
    Write,
    /// `fsync` after rewriting a file.
    Fsync,
    /// `close` after rewriting a file.
    Close,
    /// `rename` of a file over another.
    RenameOver,
    /// `rename` of a directory of 12 files.
    RenameDir,
}

const CALLS: [Call; 5] = [
    Call::Write,
    Call::Fsync,
    Call::Close,
    Call::RenameOver,
    Call::RenameDir,
];

/// The states a name may be in after the restart: each a content's sha256, or `None` for
/// absent.
type Allowed = BTreeMap<String, Vec<Option<String>>>;

/// Runs `call` on a thread and kills keepfs `delay` after it started (the call returns an
/// error then, if it was still in the kernel). Returns whether it had returned success before
/// the kill: then it was acknowledged, and only its new state is allowed.
fn kill_during(
    m: &mut Mount,
    delay: Duration,
    call: impl FnOnce() -> bool + Send + 'static,
) -> bool {
    let worker = std::thread::spawn(call);
    std::thread::sleep(delay);
    let finished = worker.is_finished();
    m.stop_with(libc::SIGKILL);
    let succeeded = worker.join().unwrap_or(false);
    finished && succeeded
}

/// The name a directory rename moves `dir` to: the workload swaps between two.
fn other_dir(dir: &str) -> &'static str {
    if dir == "d0" { "d1" } else { "d0" }
}

/// Every file of `files` under directory `from`, with the name it has under `to`.
fn moved(files: &BTreeMap<String, Vec<u8>>, from: &str, to: &str) -> Vec<(String, String)> {
    files
        .keys()
        .filter_map(|k| {
            let rest = k.strip_prefix(&format!("{from}/"))?;
            Some((k.clone(), format!("{to}/{rest}")))
        })
        .collect()
}

fn write_file(path: &Path, data: &[u8], fsync: bool) -> bool {
    let run = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(path)?;
        f.write_all(data)?;
        if fsync {
            f.sync_all()?;
        }
        Ok(())
    };
    run().is_ok()
}

#[test]
fn kill_9_inside_system_calls_leaves_the_old_state_or_the_new() {
    let kills = env_or("KEEPFS_INFLIGHT_KILLS", 24);
    let seed = env_or("KEEPFS_INFLIGHT_SEED", 0x1f11);
    eprintln!("in-flight kills: {kills}, seed {seed} (KEEPFS_INFLIGHT_SEED)");
    let mut rng = StdRng::seed_from_u64(seed);
    let s = server();
    let bucket = s.bucket("inflight");
    let proxy = FaultProxy::start(&s.endpoint, seed);
    let cache = tempfile::tempdir().unwrap();
    let args = [
        "--endpoint-url",
        proxy.endpoint.as_str(),
        "--cache-dir",
        cache.path().to_str().unwrap(),
    ];
    // What each name holds now (acknowledged), by name.
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut counts: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut m = Mount::new(&format!("s3://{bucket}"), &args);
    std::fs::create_dir(m.path().join("d0")).unwrap();
    for i in 0..12 {
        let data = pattern(20_000, 900 + i);
        std::fs::write(m.path().join(format!("d0/f{i}")), &data).unwrap();
        files.insert(format!("d0/f{i}"), data);
    }
    for name in ["a", "b"] {
        let data = pattern(300_000, name.len() as u64 + 910);
        std::fs::write(m.path().join(name), &data).unwrap();
        files.insert(name.to_owned(), data);
    }
    let mut dir = "d0".to_owned();
    for round in 0..kills {
        let started = std::time::Instant::now();
        let call = CALLS[rng.random_range(0..CALLS.len())];
        // While the call runs, every request waits 50–300 ms: uploads, copies and deletes are
        // in flight for a while when the kill lands.
        proxy.inject(1.0, &[Fault::Latency]);
        // Spread over how long each call takes here, so that kills land inside it as well as
        // after it returned (while its uploads, copies and deletes are still in flight).
        let longest = match call {
            Call::Write => 10,
            Call::RenameOver => 60,
            Call::RenameDir => 150,
            Call::Fsync | Call::Close => 500,
        };
        let delay = Duration::from_millis(rng.random_range(0..longest));
        let root: PathBuf = m.path().to_owned();
        let mut allowed: Allowed = files
            .iter()
            .map(|(k, v)| (k.clone(), vec![Some(sha256(v))]))
            .collect();
        let new = pattern(rng.random_range(1..3 << 20), 1000 + round);
        let new_sha = sha256(&new);
        // The states the cut-off call may leave.
        let returned;
        match call {
            Call::Write => {
                let path = root.join("a");
                let data = new.clone();
                returned = kill_during(&mut m, delay, move || {
                    let f = std::fs::OpenOptions::new().write(true).open(&path);
                    // Never closed before the kill: the old bytes stay what is promised.
                    f.is_ok_and(|f| {
                        let ok = std::os::unix::fs::FileExt::write_all_at(&f, &data, 0).is_ok();
                        std::mem::forget(f);
                        ok
                    })
                });
            }
            Call::Fsync | Call::Close => {
                let path = root.join("a");
                let data = new.clone();
                let fsync = matches!(call, Call::Fsync);
                allowed.get_mut("a").unwrap().push(Some(new_sha.clone()));
                returned = kill_during(&mut m, delay, move || write_file(&path, &data, fsync));
                if returned {
                    allowed.insert("a".to_owned(), vec![Some(new_sha.clone())]);
                }
            }
            Call::RenameOver => {
                let (from, to) = (root.join("a"), root.join("b"));
                let moved = files["a"].clone();
                allowed.get_mut("a").unwrap().push(None);
                allowed.get_mut("b").unwrap().push(Some(sha256(&moved)));
                returned = kill_during(&mut m, delay, move || std::fs::rename(&from, &to).is_ok());
                if returned {
                    allowed.insert("a".to_owned(), vec![None]);
                    allowed.insert("b".to_owned(), vec![Some(sha256(&moved))]);
                }
            }
            Call::RenameDir => {
                let next = other_dir(&dir);
                let (from, to) = (root.join(&dir), root.join(next));
                returned = kill_during(&mut m, delay, move || std::fs::rename(&from, &to).is_ok());
                for (key, there) in moved(&files, &dir, next) {
                    let sha = Some(sha256(&files[&key]));
                    if returned {
                        allowed.insert(key, vec![None]);
                        allowed.insert(there, vec![sha]);
                    } else {
                        allowed.get_mut(&key).unwrap().push(None);
                        allowed.insert(there, vec![None, sha]);
                    }
                }
                // Whole under one name or the other: checked below, then `files` follows.
            }
        }
        let killed = started.elapsed();
        proxy.heal();
        m = Mount::new(&format!("s3://{bucket}"), &args);
        eprintln!(
            "round {round}: {call:?}, kill after {delay:?}; killed at {killed:?}, remounted at {:?}",
            started.elapsed()
        );
        let root = m.path().to_owned();
        // Files now, by name, and the check that each is in an allowed state.
        let mut now: BTreeMap<String, Option<String>> = BTreeMap::new();
        for name in allowed.keys() {
            let got = std::fs::read(root.join(name)).ok().map(|b| sha256(&b));
            now.insert(name.clone(), got);
        }
        for (name, states) in &allowed {
            assert!(
                states.contains(&now[name]),
                "round {round} ({call:?}, kill after {delay:?}): {name} is {:?}, allowed {states:?}\n{}",
                now[name].as_ref().map(|s| &s[..12]),
                m.log()
            );
        }
        // Nothing but the allowed names exists.
        let mut listed = common::names(&root);
        for sub in ["d0", "d1"] {
            if root.join(sub).is_dir() {
                listed.retain(|n| n != sub);
                listed.extend(
                    common::names(&root.join(sub))
                        .into_iter()
                        .map(|n| format!("{sub}/{n}")),
                );
            }
        }
        for name in &listed {
            assert!(
                allowed.contains_key(name),
                "round {round} ({call:?}): {name} appeared"
            );
        }
        match call {
            Call::RenameDir => {
                let next = other_dir(&dir);
                let pairs = moved(&files, &dir, next);
                let old_whole = pairs.iter().all(|(old, _)| now[old].is_some());
                let old_any = pairs.iter().any(|(old, _)| now[old].is_some());
                let new_whole = pairs.iter().all(|(_, new)| now[new].is_some());
                let new_any = now
                    .iter()
                    .any(|(k, v)| k.starts_with(&format!("{next}/")) && v.is_some());
                assert!(
                    (old_whole && !new_any) || (new_whole && !old_any),
                    "round {round}: directory {dir} -> {next} split: {now:?}"
                );
                if new_whole {
                    for (old, new) in pairs {
                        let data = files.remove(&old).unwrap();
                        files.insert(new, data);
                    }
                    dir = next.to_owned();
                }
            }
            _ => {
                // What is there now is what is promised from here on.
                let mut contents: BTreeMap<String, Vec<u8>> =
                    files.values().map(|v| (sha256(v), v.clone())).collect();
                contents.insert(new_sha.clone(), new.clone());
                for (name, sha) in &now {
                    match sha {
                        None => files.remove(name),
                        Some(sha) => files.insert(name.clone(), contents[sha].clone()),
                    };
                }
            }
        }
        // Keep the two files the calls work on.
        for name in ["a", "b"] {
            if !files.contains_key(name) {
                let data = pattern(200_000, 5000 + round);
                std::fs::write(root.join(name), &data).unwrap();
                files.insert(name.to_owned(), data);
            }
        }
        eprintln!("round {round} checked at {:?}", started.elapsed());
        let entry = counts.entry(format!("{call:?}")).or_default();
        entry.0 += 1;
        if !returned {
            entry.1 += 1;
        }
    }
    eprintln!("kills per call (and how many landed before the call returned): {counts:?}");
    proxy.heal();
    let flushing = std::time::Instant::now();
    common::flush(&m);
    eprintln!("final flush took {:?}", flushing.elapsed());
    for (name, data) in &files {
        assert_eq!(
            s.sha256_streaming(&bucket, name).as_deref(),
            Some(sha256(data).as_str()),
            "{name} in S3 after the last flush"
        );
    }
}
