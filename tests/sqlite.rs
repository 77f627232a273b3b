//! SQLite survives kill -9: a writer commits rows one by one (recording each id only once its
//! COMMIT returned), a reader queries meanwhile, and keepfs and the writer are killed at a
//! random moment, round after round. After each restart on the same cache directory
//! `PRAGMA integrity_check` is `ok` and every recorded row is there; at the end the same holds
//! on a mount with an empty cache directory (the database only from S3). WAL and
//! rollback-journal modes. Needs `sqlite3` (Debian package); prints SKIPPED without it.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Mount, flush, server};
use rand::{Rng, SeedableRng};

/// Kill rounds per journal mode (`KEEPFS_SQLITE_ROUNDS`).
fn rounds() -> usize {
    std::env::var("KEEPFS_SQLITE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

fn sqlite3_available() -> bool {
    Command::new("sqlite3").arg("-version").output().is_ok()
        && Command::new("stdbuf").arg("--version").output().is_ok()
}

/// Runs `sql` on `db` with the sqlite3 shell; its standard output (panics on failure).
fn query(db: &Path, sql: &str) -> String {
    let out = Command::new("sqlite3").arg(db).arg(sql).output().unwrap();
    assert!(out.status.success(), "sqlite3 {sql:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Checks the database's integrity and that every id in `recorded` is in it; returns the
/// largest id it holds.
fn check(db: &Path, recorded: &BTreeSet<u64>, what: &str) -> u64 {
    assert_eq!(query(db, "PRAGMA integrity_check;").trim(), "ok", "{what}");
    let ids: BTreeSet<u64> = query(db, "SELECT id FROM t;")
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let lost: Vec<&u64> = recorded.difference(&ids).collect();
    assert!(lost.is_empty(), "{what}: committed rows lost: {lost:?}");
    ids.last().copied().unwrap_or(0)
}

/// A sqlite3 shell inserting rows `first..` one transaction each; the ids it printed after
/// each commit are collected in `acknowledged`.
struct Writer {
    child: Child,
    /// What the shell printed on stderr before the kill (an error while keepfs was alive).
    errors: Arc<Mutex<Vec<String>>>,
    killing: Arc<std::sync::atomic::AtomicBool>,
    feeder: std::thread::JoinHandle<()>,
    reader: std::thread::JoinHandle<()>,
}

impl Writer {
    fn start(db: &Path, first: u64, acknowledged: Arc<Mutex<BTreeSet<u64>>>) -> Writer {
        // Line-buffered output: an id is seen as soon as its commit returned.
        let mut child = Command::new("stdbuf")
            // -bail: a failed INSERT stops the shell before it prints the id.
            .args(["-oL", "sqlite3", "-bail"])
            .arg(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let errors = Arc::new(Mutex::new(Vec::new()));
        let killing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let (errors, killing) = (errors.clone(), killing.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    println!("writer: {line}");
                    if !killing.load(std::sync::atomic::Ordering::SeqCst) {
                        errors.lock().unwrap().push(line);
                    }
                }
            });
        }
        let mut stdin = child.stdin.take().unwrap();
        let feeder = std::thread::spawn(move || {
            // FULL: a commit in WAL mode is durable when it returns, as in rollback mode.
            if stdin
                .write_all(b"PRAGMA synchronous=FULL;\n.timeout 10000\n")
                .is_err()
            {
                return;
            }
            for id in first.. {
                let sql = format!(
                    "INSERT INTO t(id, v) VALUES ({id}, randomblob(300 + {id} % 700));\nSELECT {id};\n"
                );
                if stdin.write_all(sql.as_bytes()).is_err() {
                    return; // the writer is gone
                }
            }
        });
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Ok(id) = line.trim().parse() {
                    acknowledged.lock().unwrap().insert(id);
                }
            }
        });
        Writer {
            child,
            errors,
            killing,
            feeder,
            reader,
        }
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.feeder.join();
        let _ = self.reader.join();
    }
}

fn crash_rounds(journal_mode: &str) {
    if !sqlite3_available() {
        return common::skipped(
            "SQLite crash test: sqlite3 and stdbuf are needed (apt-get install sqlite3)",
        );
    }
    let s = server();
    let bucket = s.bucket(&format!("sqlite{}", journal_mode.to_lowercase()));
    let cache = tempfile::tempdir().unwrap();
    let cache_arg = cache.path().to_str().unwrap().to_owned();
    let seed = std::env::var("KEEPFS_SQLITE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("{journal_mode}: seed {seed} (KEEPFS_SQLITE_SEED)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let source = format!("s3://{bucket}");
    let mut m = Mount::new(&source, &["--cache-dir", &cache_arg]);
    let db = |m: &Mount| m.path().join("app.db");
    let mode = query(
        &db(&m),
        &format!(
            "PRAGMA journal_mode={journal_mode}; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);"
        ),
    );
    assert_eq!(mode.trim().to_lowercase(), journal_mode.to_lowercase());
    let acknowledged = Arc::new(Mutex::new(BTreeSet::new()));
    let mut next = 1;
    for round in 0..rounds() {
        let writer = Writer::start(&db(&m), next, Arc::clone(&acknowledged));
        // A reader meanwhile: it sees a consistent count whenever it looks.
        let until = std::time::Instant::now() + Duration::from_millis(rng.random_range(300..1500));
        let mut reads = 0;
        while std::time::Instant::now() < until {
            let out = Command::new("sqlite3")
                .arg(db(&m))
                .arg("PRAGMA busy_timeout=10000; SELECT count(*) FROM t;")
                .output()
                .unwrap();
            assert!(out.status.success(), "reader: {out:?}");
            reads += 1;
        }
        // keepfs and the writer die together, mid-transaction or between two.
        writer
            .killing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let early = writer.errors.lock().unwrap().clone();
        if !early.is_empty() {
            // SQLite failed while keepfs was alive: show what keepfs said meanwhile.
            println!("{journal_mode} round {round}: writer failed before the kill: {early:?}");
            for line in m
                .log()
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            {
                println!("  keepfs: {line}");
            }
        }
        m.stop_with(libc::SIGKILL);
        writer.kill();
        m = Mount::new(&source, &["--cache-dir", &cache_arg]);
        let recorded = acknowledged.lock().unwrap().clone();
        let largest = check(&db(&m), &recorded, &format!("{journal_mode} round {round}"));
        println!(
            "{journal_mode} round {round}: {} rows acknowledged in all, {largest} in the database, {reads} reads",
            recorded.len()
        );
        next = largest + 1;
    }
    let recorded = acknowledged.lock().unwrap().clone();
    assert!(
        recorded.len() >= rounds(),
        "the writer hardly wrote: {recorded:?}"
    );
    // Everything in S3, then a mount that has only S3: an empty cache directory.
    flush(&m);
    drop(m);
    let fresh = Mount::new(&source, &[]);
    check(
        &db(&fresh),
        &recorded,
        &format!("{journal_mode} from S3 alone"),
    );
    println!(
        "{journal_mode}: {} acknowledged rows checked after {} kill rounds and from S3 alone",
        recorded.len(),
        rounds()
    );
}

#[test]
fn sqlite_in_wal_mode_loses_no_committed_row_across_kills() {
    crash_rounds("WAL");
}

#[test]
fn sqlite_in_rollback_journal_mode_loses_no_committed_row_across_kills() {
    crash_rounds("DELETE");
}
