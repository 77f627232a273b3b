//! PostgreSQL on keepfs against PostgreSQL on the cache disk itself: `pgbench` TPS, same
//! machine, same run, the two interleaved. The data directory on keepfs is durable at each
//! COMMIT in the cache directory (keepfs's default `--durability local`), as it is on the disk.
//!
//! Run: `cargo bench --bench pgbench` (root, Debian's `postgresql` package and its `postgres`
//! user), with KEEPFS_BENCH_* set as for `benches/read.rs` or through `benches/garage.sh`.
//! Knobs: KEEPFS_BENCH_RUNS (3), KEEPFS_BENCH_PG_SCALE (10), KEEPFS_BENCH_PG_CLIENTS (4),
//! KEEPFS_BENCH_PG_SECONDS (30).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::pg::pg_bin;
use common::{KeepfsMount, env_or, target};

/// Runs `args` as the `postgres` user; its standard output (panics with the output on failure).
fn as_postgres(args: &[&str]) -> String {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn chown_postgres(path: &Path) {
    let ok = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "chown {}", path.display());
}

/// A PostgreSQL cluster in `pgdata` (created by initdb), serving on a socket in `sockets`.
struct Cluster {
    bin: PathBuf,
    pgdata: PathBuf,
    sockets: PathBuf,
}

impl Cluster {
    fn create(bin: &Path, pgdata: PathBuf, sockets: PathBuf) -> Cluster {
        std::fs::create_dir_all(&pgdata).unwrap();
        std::fs::create_dir_all(&sockets).unwrap();
        chown_postgres(&pgdata);
        chown_postgres(&sockets);
        let c = Cluster {
            bin: bin.to_owned(),
            pgdata,
            sockets,
        };
        as_postgres(&[
            c.tool("initdb").as_str(),
            "-D",
            c.pgdata.to_str().unwrap(),
            "-A",
            "trust",
            "--no-instructions",
        ]);
        let options = format!(
            "-k {} -c listen_addresses='' -c shared_buffers=128MB",
            c.sockets.display()
        );
        as_postgres(&[
            c.tool("pg_ctl").as_str(),
            "-D",
            c.pgdata.to_str().unwrap(),
            "-l",
            c.sockets.join("log").to_str().unwrap(),
            "-o",
            &options,
            "-w",
            "-t",
            "300",
            "start",
        ]);
        c
    }

    fn tool(&self, name: &str) -> String {
        self.bin.join(name).display().to_string()
    }

    fn pgbench(&self, args: &[&str]) -> String {
        let host = self.sockets.display().to_string();
        let mut all = vec![self.tool("pgbench"), "-h".into(), host];
        all.extend(args.iter().map(|a| a.to_string()));
        all.push("postgres".into());
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        as_postgres(&all)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.tool("pg_ctl"))
            .args([
                "-D",
                self.pgdata.to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "stop",
            ])
            .output();
    }
}

/// The TPS pgbench reported (`tps = N (without initial connection time)`).
fn tps(report: &str) -> f64 {
    report
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tps in:\n{report}"))
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let Some(bin) = pg_bin() else {
        println!("SKIPPED: no /usr/lib/postgresql/*/bin/pgbench (apt-get install postgresql)");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let runs = env_or("KEEPFS_BENCH_RUNS", 3);
    let scale = env_or("KEEPFS_BENCH_PG_SCALE", 10).to_string();
    let clients = env_or("KEEPFS_BENCH_PG_CLIENTS", 4).to_string();
    let seconds = env_or("KEEPFS_BENCH_PG_SECONDS", 30).to_string();
    let t = target(&rt);
    let id = |flag: &str| {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let (uid, gid) = (id("-u"), id("-g"));
    println!(
        "server: {}  pgbench: scale {scale}, {clients} clients, {seconds} s, {runs} runs",
        t.endpoint
    );
    let (mut on_keepfs, mut on_disk) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        let mount = KeepfsMount::new(
            &t,
            &t.bucket,
            &[
                "--uid",
                &uid,
                "--gid",
                &gid,
                "--dir-mode",
                "700",
                "--allow-other",
            ],
        );
        let tag = format!("run{run}-{}", std::process::id());
        // The local cluster lives beside keepfs's cache directory: the same disk.
        let local_root = PathBuf::from(format!("{}.cache-pgbench", mount.path().display()));
        let clusters = [
            (
                "keepfs",
                mount.path().join(&tag),
                std::env::temp_dir().join(format!("keepfs-pgb-k-{tag}")),
            ),
            (
                "cache disk",
                local_root.join("pgdata"),
                std::env::temp_dir().join(format!("keepfs-pgb-d-{tag}")),
            ),
        ];
        for (name, pgdata, sockets) in clusters {
            let c = Cluster::create(&bin, pgdata, sockets.clone());
            c.pgbench(&["-i", "-q", "-s", &scale]);
            let report = c.pgbench(&["-c", &clients, "-j", "2", "-T", &seconds]);
            let v = tps(&report);
            println!("run {run}/{runs}  {name:<11} {v:9.1} tps");
            if name == "keepfs" {
                on_keepfs.push(v);
            } else {
                on_disk.push(v);
            }
            drop(c);
            let _ = std::fs::remove_dir_all(&sockets);
        }
        println!("  keepfs peak RSS {} MiB", mount.peak_rss_kib() / 1024);
        let _ = std::fs::remove_dir_all(&local_root);
    }
    let (k, d) = (median(&on_keepfs), median(&on_disk));
    println!(
        "pgbench TPS, median of {runs}: keepfs {k:.1} {on_keepfs:?}, cache disk {d:.1} {on_disk:?}, ratio {:.2}",
        k / d
    );
}
