//! What databases need from a filesystem, through the kernel, each with a `kill -9` of keepfs
//! where durability is the point: directory fsync, `O_SYNC`/`O_DSYNC`/`fdatasync`, rename over
//! a file as an atomic replace, `flock` and `fcntl` locks between processes, shared writable
//! `mmap`, `O_DIRECT`, `fallocate` and `ftruncate`. docs/SEMANTICS.md, "Databases".

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Mount, flush, pattern, server, sha256, sha256_file};
use rand::{Rng, SeedableRng};

/// A mount of `bucket` with its cache directory in `cache` (kept across mounts).
fn mount(bucket: &str, cache: &Path) -> Mount {
    Mount::new(
        &format!("s3://{bucket}"),
        &["--cache-dir", cache.to_str().unwrap()],
    )
}

/// Kills keepfs (SIGKILL: nothing is flushed) and mounts `bucket` again on the same cache
/// directory.
fn kill_and_remount(m: &mut Mount, bucket: &str, cache: &Path) -> Mount {
    m.stop_with(libc::SIGKILL);
    mount(bucket, cache)
}

#[test]
fn a_directory_fsync_makes_new_and_renamed_names_durable() {
    let s = server();
    let bucket = s.bucket("dbdirsync");
    let cache = tempfile::tempdir().unwrap();
    let mut m = mount(&bucket, cache.path());
    let db = m.path().join("db");
    fs::create_dir(&db).unwrap();
    let held = s.refuse_uploads_if_possible(&bucket);
    // Files created and written, neither closed nor fsync'd: only the directory is synced.
    let created = pattern(5000, 1);
    let mut new = File::create(db.join("new.dat")).unwrap();
    new.write_all(&created).unwrap();
    let renamed = pattern(7000, 2);
    let mut tmp = File::create(db.join("tmp.dat")).unwrap();
    tmp.write_all(&renamed).unwrap();
    fs::rename(db.join("tmp.dat"), db.join("renamed.dat")).unwrap();
    File::open(&db).unwrap().sync_all().unwrap();

    let m2 = kill_and_remount(&mut m, &bucket, cache.path());
    drop((new, tmp)); // descriptors of the dead mount
    let db = m2.path().join("db");
    assert_eq!(common::names(&db), ["new.dat", "renamed.dat"]);
    assert_eq!(sha256_file(&db.join("new.dat")), sha256(&created));
    assert_eq!(sha256_file(&db.join("renamed.dat")), sha256(&renamed));
    if held {
        s.allow_uploads(&bucket);
    }
    flush(&m2);
    assert_eq!(
        s.get(&bucket, "db/new.dat").map(|b| sha256(&b)),
        Some(sha256(&created))
    );
    assert_eq!(
        s.get(&bucket, "db/renamed.dat").map(|b| sha256(&b)),
        Some(sha256(&renamed))
    );
    assert_eq!(s.get(&bucket, "db/tmp.dat"), None);
}

#[test]
fn o_sync_o_dsync_and_fdatasync_writes_survive_a_kill_9() {
    let s = server();
    let bucket = s.bucket("dbsync");
    let cache = tempfile::tempdir().unwrap();
    let mut m = mount(&bucket, cache.path());
    let held = s.refuse_uploads_if_possible(&bucket);
    let open = |name: &str, flags: i32| {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(flags)
            .open(m.path().join(name))
            .unwrap()
    };
    let mut files = Vec::new();
    let mut expected = Vec::new();
    for (i, (name, flags)) in [
        ("osync", libc::O_SYNC),
        ("odsync", libc::O_DSYNC),
        ("fdatasync", 0),
    ]
    .into_iter()
    .enumerate()
    {
        let mut f = open(name, flags);
        let mut content = Vec::new();
        // Several writes, the last one at an offset: each O_SYNC write is durable at its return.
        for round in 0..3 {
            let chunk = pattern(3000 + round * 100, (i * 10 + round) as u64);
            f.write_all(&chunk).unwrap();
            content.extend_from_slice(&chunk);
        }
        if flags == 0 {
            f.sync_data().unwrap();
        }
        files.push(f); // still open when keepfs dies
        expected.push((name, content));
    }
    let m2 = kill_and_remount(&mut m, &bucket, cache.path());
    drop(files);
    for (name, content) in &expected {
        assert_eq!(
            sha256_file(&m2.path().join(name)),
            sha256(content),
            "{name}"
        );
    }
    if held {
        s.allow_uploads(&bucket);
    }
    flush(&m2);
    for (name, content) in &expected {
        assert_eq!(
            s.get(&bucket, name).map(|b| sha256(&b)),
            Some(sha256(content)),
            "{name}"
        );
    }
}

/// Version `n` of the replaced file: its size and bytes differ per version.
fn version(n: u64) -> Vec<u8> {
    pattern(20_000 + (n as usize % 7) * 3_001, 1000 + n)
}

#[test]
fn rename_over_a_file_is_an_atomic_replace_across_kills() {
    let s = server();
    let bucket = s.bucket("dbrename");
    let cache = tempfile::tempdir().unwrap();
    let mut m = mount(&bucket, cache.path());
    fs::write(m.path().join("current"), version(0)).unwrap();
    let seed = std::env::var("KEEPFS_DB_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("seed {seed} (KEEPFS_DB_SEED)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut acknowledged = 0u64;
    for round in 0..5 {
        // A writer replaces the file as databases and editors do (write, fsync, rename over),
        // recording each version whose rename returned; keepfs is killed at a random moment.
        let acked = Arc::new(AtomicU64::new(acknowledged));
        let stop = Arc::new(Mutex::new(false));
        let writer = {
            let (dir, acked, stop) = (m.path().to_owned(), acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = acked.load(Ordering::SeqCst);
                while !*stop.lock().unwrap() {
                    n += 1;
                    let tmp = dir.join(format!("current.tmp{n}"));
                    let step = (|| {
                        let mut f = File::create(&tmp)?;
                        f.write_all(&version(n))?;
                        f.sync_all()?;
                        fs::rename(&tmp, dir.join("current"))
                    })();
                    if step.is_err() {
                        return; // keepfs is gone
                    }
                    acked.store(n, Ordering::SeqCst);
                }
            })
        };
        std::thread::sleep(Duration::from_millis(rng.random_range(50..800)));
        m.stop_with(libc::SIGKILL);
        *stop.lock().unwrap() = true;
        writer.join().unwrap();
        let last = acked.load(Ordering::SeqCst);
        m = mount(&bucket, cache.path());
        let got = fs::read(m.path().join("current")).unwrap();
        // The last acknowledged version, or the one whose rename was cut off: never a mix.
        let which = [last, last + 1]
            .into_iter()
            .find(|n| sha256(&version(*n)) == sha256(&got));
        assert!(
            which.is_some(),
            "round {round}: {} bytes match neither version {last} nor {} (seed {seed})",
            got.len(),
            last + 1
        );
        acknowledged = which.unwrap();
        println!("round {round}: {last} acknowledged, {acknowledged} after the restart");
    }
    flush(&m);
    assert_eq!(
        s.get(&bucket, "current").map(|b| sha256(&b)),
        Some(sha256(&version(acknowledged)))
    );
}

#[test]
fn flock_and_fcntl_locks_hold_between_processes_of_one_mount() {
    let s = server();
    let bucket = s.bucket("dblocks");
    let m = Mount::new(&format!("s3://{bucket}"), &[]);
    let path = m.path().join("lockfile");
    fs::write(&path, b"x").unwrap();
    // flock(2): per open file description, so two opens in this process already conflict.
    let a = File::open(&path).unwrap();
    let b = File::open(&path).unwrap();
    a.lock().unwrap();
    assert!(matches!(
        b.try_lock(),
        Err(std::fs::TryLockError::WouldBlock)
    ));
    a.unlock().unwrap();
    b.try_lock().unwrap();
    b.unlock().unwrap();
    // fcntl(2) byte-range locks, between processes: SQLite's own locking.
    let Ok(mut holder) = Command::new("sqlite3")
        .arg(m.path().join("locked.db"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        return common::skipped("fcntl locks through sqlite3 (apt-get install sqlite3)");
    };
    let mut stdin = holder.stdin.take().unwrap();
    stdin
        .write_all(
            b"CREATE TABLE t(x);\nBEGIN EXCLUSIVE;\nINSERT INTO t VALUES (1);\nSELECT 'holding';\n",
        )
        .unwrap();
    stdin.flush().unwrap();
    let mut out = holder.stdout.take().unwrap();
    let mut buf = [0u8; 8];
    out.read_exact(&mut buf).unwrap(); // "holding\n": the lock is taken
    let other = Command::new("sqlite3")
        .arg(m.path().join("locked.db"))
        .arg("INSERT INTO t VALUES (2);")
        .output()
        .unwrap();
    assert!(!other.status.success(), "a second writer got in: {other:?}");
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("locked"),
        "{other:?}"
    );
    stdin.write_all(b"COMMIT;\n.quit\n").unwrap();
    drop(stdin);
    assert!(holder.wait().unwrap().success());
    let after = Command::new("sqlite3")
        .arg(m.path().join("locked.db"))
        .arg("INSERT INTO t VALUES (2); SELECT count(*) FROM t;")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&after.stdout).trim(),
        "2",
        "{after:?}"
    );
}

#[test]
fn shared_writable_mmap_reaches_the_file_and_s3() {
    let s = server();
    let bucket = s.bucket("dbmmap");
    let m = Mount::new(&format!("s3://{bucket}"), &[]);
    let path = m.path().join("shm");
    let mut expected = pattern(64 << 10, 5);
    fs::write(&path, &expected).unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    // SAFETY: the file is this test's alone; nothing else maps, truncates or writes it while
    // the map lives.
    let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }.unwrap();
    for (i, at) in [0usize, 4095, 4096, 40_000, (64 << 10) - 1]
        .into_iter()
        .enumerate()
    {
        map[at] = 0xA0 + i as u8;
        expected[at] = 0xA0 + i as u8;
    }
    map.flush().unwrap(); // msync(MS_SYNC)
    // Another descriptor (and the page cache behind read) sees the stores.
    assert_eq!(sha256_file(&path), sha256(&expected));
    drop(map);
    drop(file);
    flush(&m);
    assert_eq!(
        s.get(&bucket, "shm").map(|b| sha256(&b)),
        Some(sha256(&expected))
    );
}

#[test]
fn o_direct_is_honoured() {
    let s = server();
    let bucket = s.bucket("dbdirect");
    let m = Mount::new(&format!("s3://{bucket}"), &[]);
    let path = m.path().join("direct");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .expect("O_DIRECT open");
    // Page-aligned buffers, as O_DIRECT callers use.
    let mut buf = memmap2::MmapMut::map_anon(8192).unwrap();
    buf.copy_from_slice(&pattern(8192, 6));
    f.write_all_at(&buf, 0).unwrap();
    f.write_all_at(&buf[..4096], 8192).unwrap();
    let mut back = memmap2::MmapMut::map_anon(12288).unwrap();
    f.read_exact_at(&mut back, 0).unwrap();
    let mut expected = buf.to_vec();
    expected.extend_from_slice(&buf[..4096]);
    assert_eq!(&back[..], &expected[..]);
    drop(f);
    assert_eq!(sha256_file(&path), sha256(&expected));
    flush(&m);
    assert_eq!(
        s.get(&bucket, "direct").map(|b| sha256(&b)),
        Some(sha256(&expected))
    );
}

#[test]
fn fallocate_and_ftruncate_change_the_size_durably() {
    let s = server();
    let bucket = s.bucket("dbfalloc");
    let cache = tempfile::tempdir().unwrap();
    let mut m = mount(&bucket, cache.path());
    let path = m.path().join("wal");
    let head = pattern(1000, 7);
    fs::write(&path, &head).unwrap();
    // posix_fallocate (PostgreSQL extends WAL segments so), then a shrink and an extension.
    let out = Command::new("fallocate")
        .args(["-l", "1MiB"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 1 << 20);
    f.set_len(600).unwrap();
    f.set_len(3000).unwrap();
    f.sync_all().unwrap();
    let mut expected = head[..600].to_vec();
    expected.resize(3000, 0);
    let m2 = kill_and_remount(&mut m, &bucket, cache.path());
    drop(f);
    assert_eq!(sha256_file(&m2.path().join("wal")), sha256(&expected));
    flush(&m2);
    assert_eq!(
        s.get(&bucket, "wal").map(|b| sha256(&b)),
        Some(sha256(&expected))
    );
}

#[test]
fn a_truncation_by_a_writer_is_durable_with_its_close_or_fsync_not_before() {
    let s = server();
    let bucket = s.bucket("dbtrunc");
    let cache = tempfile::tempdir().unwrap();
    let mut m = mount(&bucket, cache.path());
    let v1: Vec<Vec<u8>> = (0..4)
        .map(|n| pattern(50_000 + n * 1000, n as u64))
        .collect();
    for (n, bytes) in v1.iter().enumerate() {
        fs::write(m.path().join(format!("f{n}")), bytes).unwrap();
    }
    // The descriptors are held by a single-threaded child process: in this multi-threaded
    // test process, any other test's fork + exec would close inherited copies of them, and
    // every close is a FUSE flush, which makes the file durable.
    let script = r#"
import os, sys
d = sys.argv[1]
# f0: open(O_TRUNC) and part of a new version written, neither closed nor fsync'd.
f0 = os.open(d + "/f0", os.O_WRONLY | os.O_TRUNC)
os.write(f0, b"half of a new version")
# f1: opened with O_TRUNC and nothing written.
f1 = os.open(d + "/f1", os.O_WRONLY | os.O_TRUNC)
# f2: ftruncate by a writer, no fsync.
f2 = os.open(d + "/f2", os.O_WRONLY)
os.ftruncate(f2, 10)
# f3: truncate(2) of a file nobody has open: durable when it returns.
os.truncate(d + "/f3", 100)
print("ready", flush=True)
sys.stdin.read()
"#;
    let mut holder = Command::new("python3")
        .args(["-c", script])
        .arg(m.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready.trim(), "ready");
    // The mount shows the changes meanwhile.
    for (n, len) in [21, 0, 10, 100].into_iter().enumerate() {
        let path = m.path().join(format!("f{n}"));
        assert_eq!(fs::metadata(path).unwrap().len(), len, "f{n}");
    }

    let m2 = kill_and_remount(&mut m, &bucket, cache.path());
    drop(holder.stdin.take());
    holder.wait().unwrap();
    for (n, expected) in [&v1[0], &v1[1], &v1[2], &v1[3][..100].to_vec()]
        .into_iter()
        .enumerate()
    {
        assert_eq!(
            sha256_file(&m2.path().join(format!("f{n}"))),
            sha256(expected),
            "f{n} after kill -9"
        );
    }
    flush(&m2);
    assert_eq!(
        s.get(&bucket, "f0").map(|b| sha256(&b)),
        Some(sha256(&v1[0]))
    );
    assert_eq!(
        s.get(&bucket, "f3").map(|b| sha256(&b)),
        Some(sha256(&v1[3][..100]))
    );
}
