//! PostgreSQL on keepfs: `initdb`, `pg_ctl start`, a short `pgbench` run, a clean stop and a
//! restart that finds every committed row, then the data directory from S3 alone (flush, and a
//! mount on an empty cache directory). Needs Debian's `postgresql` package and the `postgres`
//! user; prints `SKIPPED:` without them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Mount, server};

/// The directory holding `initdb`, `pg_ctl` and `pgbench`, if PostgreSQL is installed.
fn pg_bin() -> Option<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(root)
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists() && bin.join("pgbench").exists())
        .collect();
    versions.sort();
    versions.pop()
}

/// Runs `args` as the `postgres` user; panics with the output (and keepfs's log) on failure.
fn as_postgres(m: &Mount, args: &[&str]) -> Output {
    as_postgres_or_show(m, args, None)
}

/// [`as_postgres`], showing the file `log` too on failure (the server's log).
fn as_postgres_or_show(m: &Mount, args: &[&str], log: Option<&Path>) -> Output {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .unwrap();
    let server_log = log
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|l| tail(&l, 30))
        .unwrap_or_default();
    assert!(
        out.status.success(),
        "{args:?} failed:\n{}\n{}\n--- server log ---\n{server_log}\n--- keepfs log (tail) ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        tail(&m.log(), 60)
    );
    out
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A running postmaster; stopped (immediately) if the test fails while it runs.
struct Postmaster<'a> {
    bin: &'a Path,
    pgdata: PathBuf,
    socket_dir: PathBuf,
    running: bool,
}

impl<'a> Postmaster<'a> {
    fn start(bin: &'a Path, m: &Mount, pgdata: PathBuf, socket_dir: &Path) -> Self {
        let log = socket_dir.join("postmaster.log");
        let options = format!(
            "-k {} -c listen_addresses='' -c shared_buffers=16MB",
            socket_dir.display()
        );
        as_postgres_or_show(
            m,
            &[
                bin.join("pg_ctl").to_str().unwrap(),
                "-D",
                pgdata.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &options,
                "-w",
                "-t",
                "120",
                "start",
            ],
            Some(&log),
        );
        Postmaster {
            bin,
            pgdata,
            socket_dir: socket_dir.to_owned(),
            running: true,
        }
    }

    fn sql(&self, m: &Mount, sql: &str) -> String {
        let out = as_postgres(
            m,
            &[
                "psql",
                "-h",
                self.socket_dir.to_str().unwrap(),
                "-d",
                "postgres",
                "-At",
                "-c",
                sql,
            ],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn stop(&mut self, m: &Mount) {
        as_postgres(
            m,
            &[
                self.bin.join("pg_ctl").to_str().unwrap(),
                "-D",
                self.pgdata.to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
        self.running = false;
    }
}

impl Drop for Postmaster<'_> {
    fn drop(&mut self) {
        if self.running {
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"))
                .args([
                    "-D",
                    self.pgdata.to_str().unwrap(),
                    "-m",
                    "immediate",
                    "stop",
                ])
                .output();
        }
    }
}

#[test]
fn postgres_initdb_pgbench_and_restart_from_s3() {
    let Some(bin) = pg_bin() else {
        common::skipped(
            "PostgreSQL: no /usr/lib/postgresql/*/bin/initdb (apt-get install postgresql)",
        );
        return;
    };
    if Command::new("id")
        .arg("postgres")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        common::skipped("PostgreSQL: no postgres user");
        return;
    }
    let s = server();
    let bucket = s.bucket("postgres");
    let cache = tempfile::tempdir().unwrap();
    let source = format!("s3://{bucket}");
    // The mount belongs to the database user, as an operator would set it up: directories
    // need no marker metadata to show the owner and 0700 PostgreSQL insists on (s3s-fs can't
    // keep directory markers' metadata).
    let id = |flag: &str| {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let (uid, gid) = (id("-u"), id("-g"));
    let owner = [
        "--uid",
        &uid,
        "--gid",
        &gid,
        "--dir-mode",
        "700",
        "--allow-other",
    ];
    let args = [&["--cache-dir", cache.path().to_str().unwrap()][..], &owner].concat();
    // The socket and server log live outside the mount, readable by postgres.
    let sockets = tempfile::Builder::new()
        .prefix("keepfs-pg-")
        .tempdir()
        .unwrap();
    Command::new("chown")
        .args(["postgres", sockets.path().to_str().unwrap()])
        .status()
        .unwrap();

    let m = Mount::new(&source, &args);
    let pgdata = m.path().join("pgdata");
    std::fs::create_dir(&pgdata).unwrap();
    Command::new("chown")
        .args(["postgres:postgres", pgdata.to_str().unwrap()])
        .status()
        .unwrap();
    as_postgres(
        &m,
        &[
            bin.join("initdb").to_str().unwrap(),
            "-D",
            pgdata.to_str().unwrap(),
            "--no-instructions",
            "-A",
            "trust",
        ],
    );
    let mut pg = Postmaster::start(&bin, &m, pgdata.clone(), sockets.path());
    let host = sockets.path().to_str().unwrap().to_owned();
    as_postgres(
        &m,
        &[
            bin.join("pgbench").to_str().unwrap(),
            "-h",
            &host,
            "-i",
            "-s",
            "1",
            "postgres",
        ],
    );
    let bench = as_postgres(
        &m,
        &[
            bin.join("pgbench").to_str().unwrap(),
            "-h",
            &host,
            "-c",
            "2",
            "-t",
            "100",
            "postgres",
        ],
    );
    let report = String::from_utf8_lossy(&bench.stdout);
    println!("pgbench on keepfs:\n{report}");
    assert!(
        report.contains("number of transactions actually processed: 200/200"),
        "{report}"
    );
    pg.sql(&m, "CREATE TABLE acked (id int PRIMARY KEY)");
    for id in 1..=50 {
        pg.sql(&m, &format!("INSERT INTO acked VALUES ({id})"));
    }
    let history = pg.sql(&m, "SELECT count(*) FROM pgbench_history");
    assert_eq!(history, "200");
    pg.stop(&m);

    // A restart on the same cache directory, then from S3 alone. PostgreSQL keeps empty
    // directories (pg_notify, ...), which live on as `dir/` markers: s3s-fs never lists them.
    drop(m);
    if s.kind == common::ServerKind::S3sFs {
        common::skipped(
            "PostgreSQL restart: s3s-fs can't keep empty directories (no marker listing); CI runs it on moto",
        );
        return;
    }
    let m = Mount::new(&source, &args);
    let pgdata = m.path().join("pgdata");
    let mut pg = Postmaster::start(&bin, &m, pgdata, sockets.path());
    assert_eq!(pg.sql(&m, "SELECT count(*) FROM acked"), "50");
    pg.stop(&m);
    let flushed = Command::new(common::keepfs_bin())
        .args(["flush", m.path().to_str().unwrap(), "--timeout", "120s"])
        .output()
        .unwrap();
    assert!(
        flushed.status.success(),
        "{}",
        String::from_utf8_lossy(&flushed.stderr)
    );
    drop(m);

    let empty = tempfile::tempdir().unwrap();
    let fresh = [&["--cache-dir", empty.path().to_str().unwrap()][..], &owner].concat();
    let m = Mount::new(&source, &fresh);
    let pgdata = m.path().join("pgdata");
    let mut pg = Postmaster::start(&bin, &m, pgdata, sockets.path());
    assert_eq!(pg.sql(&m, "SELECT count(*) FROM acked"), "50");
    assert_eq!(pg.sql(&m, "SELECT count(*) FROM pgbench_history"), "200");
    pg.stop(&m);
}
