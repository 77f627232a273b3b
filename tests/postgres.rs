//! PostgreSQL on keepfs: `initdb`, `pg_ctl start`, a short `pgbench` run, a clean stop and a
//! restart that finds every committed row, then the data directory from S3 alone (flush, and a
//! mount on an empty cache directory). Needs Debian's `postgresql` package and the `postgres`
//! user; prints `SKIPPED:` without them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::pg::pg_bin;
use common::{Mount, server};

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

/// What every PostgreSQL test needs: the binaries, a bucket, the mount's flags (the cache
/// directory and the database user's ownership) and a socket directory outside the mount.
struct PgSetup {
    bin: PathBuf,
    source: String,
    cache: tempfile::TempDir,
    owner: Vec<String>,
    sockets: tempfile::TempDir,
}

impl PgSetup {
    /// `None` (after a SKIPPED line) where PostgreSQL or its user is missing.
    fn new(label: &str) -> Option<PgSetup> {
        let Some(bin) = pg_bin() else {
            common::skipped(
                "PostgreSQL: no /usr/lib/postgresql/*/bin/initdb (apt-get install postgresql)",
            );
            return None;
        };
        if Command::new("id")
            .arg("postgres")
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            common::skipped("PostgreSQL: no postgres user");
            return None;
        }
        let bucket = server().bucket(label);
        // The mount belongs to the database user, as an operator would set it up: directories
        // need no marker metadata to show the owner and 0700 PostgreSQL insists on (s3s-fs
        // can't keep directory markers' metadata).
        let id = |flag: &str| {
            let out = Command::new("id")
                .args([flag, "postgres"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        let owner = [
            "--uid".to_owned(),
            id("-u"),
            "--gid".to_owned(),
            id("-g"),
            "--dir-mode".to_owned(),
            "700".to_owned(),
            "--allow-other".to_owned(),
        ]
        .to_vec();
        // The socket and server log live outside the mount, readable by postgres.
        let sockets = tempfile::Builder::new()
            .prefix("keepfs-pg-")
            .tempdir()
            .unwrap();
        Command::new("chown")
            .args(["postgres", sockets.path().to_str().unwrap()])
            .status()
            .unwrap();
        Some(PgSetup {
            bin,
            source: format!("s3://{bucket}"),
            cache: tempfile::tempdir().unwrap(),
            owner,
            sockets,
        })
    }

    /// Mounts with `cache` as the cache directory.
    fn mount_on(&self, cache: &Path) -> Mount {
        self.mount_source(&self.source, cache)
    }

    /// Mounts `source` (the setup's bucket or another) with `cache` as the cache directory.
    fn mount_source(&self, source: &str, cache: &Path) -> Mount {
        let mut args = vec!["--cache-dir".to_owned(), cache.display().to_string()];
        args.extend(self.owner.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Mount::new(source, &args)
    }

    /// Mounts with the setup's own cache directory.
    fn mount(&self) -> Mount {
        self.mount_on(self.cache.path())
    }

    /// `initdb` of `pgdata` (created, owned by postgres) on `m`.
    fn initdb(&self, m: &Mount, pgdata: &Path) {
        std::fs::create_dir(pgdata).unwrap();
        Command::new("chown")
            .args(["postgres:postgres", pgdata.to_str().unwrap()])
            .status()
            .unwrap();
        as_postgres(
            m,
            &[
                self.bin.join("initdb").to_str().unwrap(),
                "-D",
                pgdata.to_str().unwrap(),
                "--no-instructions",
                "-A",
                "trust",
            ],
        );
    }
}

#[test]
fn postgres_initdb_pgbench_and_restart_from_s3() {
    let Some(setup) = PgSetup::new("postgres") else {
        return;
    };
    let s = server();
    let (bin, sockets) = (&setup.bin, &setup.sockets);
    let m = setup.mount();
    let pgdata = m.path().join("pgdata");
    setup.initdb(&m, &pgdata);
    let mut pg = Postmaster::start(bin, &m, pgdata.clone(), sockets.path());
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
    let m = setup.mount();
    let pgdata = m.path().join("pgdata");
    let mut pg = Postmaster::start(bin, &m, pgdata, sockets.path());
    assert_eq!(pg.sql(&m, "SELECT count(*) FROM acked"), "50");
    // A snapshot of the running database; what commits after it must not be in it.
    let snapshot = Command::new(common::keepfs_bin())
        .args(["snapshot", "create", "live", m.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        snapshot.status.success(),
        "{}",
        String::from_utf8_lossy(&snapshot.stderr)
    );
    println!("{}", String::from_utf8_lossy(&snapshot.stderr).trim());
    for id in 51..=60 {
        pg.sql(&m, &format!("INSERT INTO acked VALUES ({id})"));
    }
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
    let m = setup.mount_on(empty.path());
    let pgdata = m.path().join("pgdata");
    let mut pg = Postmaster::start(bin, &m, pgdata, sockets.path());
    assert_eq!(pg.sql(&m, "SELECT count(*) FROM acked"), "60");
    assert_eq!(pg.sql(&m, "SELECT count(*) FROM pgbench_history"), "200");
    pg.stop(&m);
    let mountpoint = m.path().to_str().unwrap().to_owned();

    // The snapshot, restored into another bucket, is a database that starts (recovering as
    // after a crash) with every transaction committed before it, and none after.
    let restored = format!("s3://{}", s.bucket("postgres-restored"));
    let mut restore = Command::new(common::keepfs_bin());
    restore
        .args([
            "snapshot",
            "restore",
            "live",
            &mountpoint,
            "--to",
            &restored,
        ])
        .args(["--endpoint-url", &s.endpoint, "--force-path-style"]);
    for (k, v) in s.env() {
        restore.env(k, v);
    }
    let out = restore.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", String::from_utf8_lossy(&out.stderr).trim());
    drop(m);
    let fresh = tempfile::tempdir().unwrap();
    let m = setup.mount_source(&restored, fresh.path());
    let pgdata = m.path().join("pgdata");
    let mut pg = Postmaster::start(bin, &m, pgdata, sockets.path());
    assert_eq!(pg.sql(&m, "SELECT count(*) FROM acked"), "50");
    assert_eq!(pg.sql(&m, "SELECT max(id) FROM acked"), "50");
    assert_eq!(pg.sql(&m, "SELECT count(*) FROM pgbench_history"), "200");
    pg.stop(&m);
}

/// Kill rounds of the crash test (`KEEPFS_PG_ROUNDS`).
fn pg_rounds() -> usize {
    std::env::var("KEEPFS_PG_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

/// The postmaster's pid (first line of `postmaster.pid`) and its children's: the backends,
/// checkpointer, WAL writer.
fn postgres_processes(pgdata: &Path) -> Vec<i32> {
    let Some(postmaster) = std::fs::read_to_string(pgdata.join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
    else {
        return Vec::new();
    };
    let mut pids = vec![postmaster];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // pid (comm) state ppid ...: the fields after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(postmaster) {
            pids.push(pid);
        }
    }
    pids
}

/// A psql session inserting ids `first..` into `acked`, one autocommit transaction each; an id
/// is recorded once psql printed it, which it does only after the server's COMMIT returned.
fn start_client(
    sockets: &Path,
    first: u64,
    recorded: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<u64>>>,
) -> (std::process::Child, std::thread::JoinHandle<()>) {
    use std::io::{BufRead, Write};
    let mut child = Command::new("runuser")
        .args(["-u", "postgres", "--", "stdbuf", "-oL", "psql", "-h"])
        .arg(sockets)
        .args(["-d", "postgres", "-At", "-v", "ON_ERROR_STOP=1"])
        .env("LC_ALL", "C")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::thread::spawn(move || {
        for id in first.. {
            let sql = format!("INSERT INTO acked VALUES ({id}) RETURNING id;\n");
            if stdin.write_all(sql.as_bytes()).is_err() {
                return;
            }
        }
    });
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(id) = line.trim().parse() {
                recorded.lock().unwrap().insert(id);
            }
        }
    });
    (child, reader)
}

#[test]
fn postgres_loses_no_committed_transaction_when_keepfs_and_postgres_are_killed() {
    use rand::{Rng, SeedableRng};
    let Some(setup) = PgSetup::new("pgkill") else {
        return;
    };
    if server().kind == common::ServerKind::S3sFs {
        // A restart lists PGDATA's empty directories (pg_notify, pg_twophase, …), which live
        // on as `dir/` markers that s3s-fs never lists.
        return common::skipped(
            "PostgreSQL kill rounds: s3s-fs can't keep empty directories; CI runs it on moto",
        );
    }
    let seed = std::env::var("KEEPFS_PG_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("seed {seed} (KEEPFS_PG_SEED)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let started = std::time::Instant::now();
    let (bin, sockets) = (&setup.bin, setup.sockets.path());
    let mut m = setup.mount();
    let pgdata = |m: &Mount| m.path().join("pgdata");
    setup.initdb(&m, &pgdata(&m));
    let mut pg = Postmaster::start(bin, &m, pgdata(&m), sockets);
    pg.sql(&m, "CREATE TABLE acked (id bigint PRIMARY KEY)");
    println!("initdb and start: {:.0?}", started.elapsed());
    let recorded = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let mut next = 1;
    for round in 0..pg_rounds() {
        let (mut client, reader) = start_client(sockets, next, recorded.clone());
        std::thread::sleep(Duration::from_millis(rng.random_range(1500..4000)));
        // Everything dies at once: keepfs, the postmaster and every backend.
        let victims = postgres_processes(&pgdata(&m));
        assert!(!victims.is_empty(), "no postmaster.pid");
        for pid in &victims {
            // SAFETY: kill(2) of PostgreSQL's processes, found by pid.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        m.stop_with(libc::SIGKILL);
        let _ = client.kill();
        let _ = client.wait();
        let _ = reader.join();
        pg.running = false;
        m = setup.mount();
        // PostgreSQL refuses to start while the pid in postmaster.pid exists, a zombie not
        // yet reaped included (a pod restart gets a new pid namespace instead).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while victims
            .iter()
            .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
        {
            if std::time::Instant::now() > deadline {
                println!(
                    "round {round}: killed PostgreSQL processes not reaped; removing postmaster.pid"
                );
                std::fs::remove_file(pgdata(&m).join("postmaster.pid")).unwrap();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Crash recovery from the WAL keepfs kept.
        pg = Postmaster::start(bin, &m, pgdata(&m), sockets);
        let ids: std::collections::BTreeSet<u64> = pg
            .sql(&m, "SELECT id FROM acked")
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        let recorded = recorded.lock().unwrap().clone();
        let lost: Vec<&u64> = recorded.difference(&ids).collect();
        assert!(
            lost.is_empty(),
            "round {round}: committed ids lost: {lost:?} (seed {seed})"
        );
        println!(
            "round {round}: {} transactions acknowledged so far, all present ({} rows; {:.0?} since the start)",
            recorded.len(),
            ids.len(),
            started.elapsed()
        );
        next = ids.last().copied().unwrap_or(0) + 1;
    }
    let recorded = recorded.lock().unwrap().clone();
    assert!(
        recorded.len() >= pg_rounds(),
        "the client hardly committed: {recorded:?}"
    );
    pg.stop(&m);
    common::flush(&m);
    println!("flushed: {:.0?} since the start", started.elapsed());
    drop(m);
    // From S3 alone: an empty cache directory.
    let empty = tempfile::tempdir().unwrap();
    let m = setup.mount_on(empty.path());
    let mut pg = Postmaster::start(bin, &m, pgdata(&m), sockets);
    let ids: std::collections::BTreeSet<u64> = pg
        .sql(&m, "SELECT id FROM acked")
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert!(
        recorded.is_subset(&ids),
        "lost from S3: {:?}",
        recorded.difference(&ids)
    );
    pg.stop(&m);
    println!(
        "{} acknowledged transactions checked after {} kill rounds and from S3 alone",
        recorded.len(),
        pg_rounds()
    );
}
