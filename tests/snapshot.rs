//! Snapshots (`keepfs snapshot`, `keepfs mount --snapshot`), on an unversioned bucket and — on
//! servers that keep versions (moto) — on a versioned one: what a snapshot holds, its
//! read-only view, restore into a new prefix and in place, the barrier under a write workload,
//! and the multipart copy used above 5 GiB.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Mount, ServerKind, pattern, server, sha256, sha256_file};

/// Held by each test for its whole run. Tests that keep files open for writing check exactly
/// which versions are acknowledged; a `fork` + `exec` by a test running beside them (keepfs
/// commands) would close inherited copies of those descriptors, and every close is a FUSE
/// flush, which acknowledges the file as it is.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `keepfs snapshot ARGS` wired to the test server.
fn snapshot(args: &[&str]) -> Output {
    let server = server();
    let mut cmd = std::process::Command::new(common::keepfs_bin());
    cmd.arg("snapshot")
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL");
    for (k, v) in server.env() {
        cmd.env(k, v);
    }
    cmd.output().expect("run keepfs snapshot")
}

/// `snapshot(args)`, which must succeed; returns its stderr.
fn snapshot_ok(args: &[&str]) -> String {
    let out = snapshot(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "keepfs snapshot {args:?} failed: {stderr}"
    );
    stderr
}

/// Takes snapshot `name` of mount `m` through its control socket, as `keepfs snapshot create`
/// does, but without starting a process: a child would inherit the descriptors the test's
/// writers hold open, and its exec would close them, which is a `close` (FUSE flush) to keepfs
/// that acknowledges whatever those files hold at that moment.
fn snapshot_in_process(m: &Mount, name: &str) {
    use std::io::{BufRead, Write};
    let socket = common::default_test_cache(m.path()).join("control.sock");
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    writeln!(stream, "snapshot {name} 120000").unwrap();
    for line in std::io::BufReader::new(stream).lines() {
        let reply: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if reply.get("progress").is_some() {
            continue;
        }
        assert!(reply.get("snapshot").is_some(), "snapshot {name}: {reply}");
        return;
    }
    panic!(
        "snapshot {name}: the mount closed the connection\n{}",
        m.log()
    );
}

/// The s3:// flags of `keepfs snapshot` for the test server.
fn s3_flags() -> Vec<String> {
    vec![
        "--endpoint-url".into(),
        server().endpoint.clone(),
        "--force-path-style".into(),
    ]
}

/// The bucket kinds this server offers: unversioned always, versioned where it keeps versions
/// (asked once of servers not known here: Garage answers PutBucketVersioning with 501).
fn bucket_kinds() -> Vec<bool> {
    static VERSIONS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let versions = *VERSIONS.get_or_init(|| match server().kind {
        ServerKind::Moto => true,
        ServerKind::S3sFs => false,
        ServerKind::Other => {
            let probe = server().bucket("versioning-probe");
            let asked = common::embedded::try_enable_versioning(server().client(), &probe);
            common::rt().block_on(asked).is_ok()
        }
    });
    if versions {
        vec![false, true]
    } else {
        common::skipped("versioned buckets: this server keeps no versions");
        vec![false]
    }
}

fn new_bucket(label: &str, versioned: bool) -> String {
    let bucket = server().bucket(label);
    if versioned {
        common::rt().block_on(common::embedded::enable_versioning(
            server().client(),
            &bucket,
        ));
    }
    bucket
}

/// What a tree holds: relative path → (kind and mode, sha256 or link target).
fn tree(root: &Path) -> BTreeMap<String, (String, String)> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let mode = format!("{:o}", meta.mode());
            let value = if meta.file_type().is_symlink() {
                std::fs::read_link(&path)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            } else if meta.is_dir() {
                dirs.push(path.clone());
                String::new()
            } else {
                sha256_file(&path)
            };
            out.insert(rel, (mode, value));
        }
    }
    out
}

/// Writes the tree the round-trip test snapshots.
fn write_tree(root: &Path) {
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    std::fs::create_dir(root.join("empty")).unwrap();
    std::fs::write(root.join("small.txt"), b"hello snapshot\n").unwrap();
    std::fs::write(root.join("empty.bin"), b"").unwrap();
    std::fs::write(root.join("a/one.bin"), pattern(300_000, 1)).unwrap();
    // Multipart (above the 8 MiB part size).
    std::fs::write(root.join("a/b/big.bin"), pattern(12 << 20, 2)).unwrap();
    std::fs::write(root.join("a/b/secret"), b"mode 600").unwrap();
    std::fs::set_permissions(root.join("a/b/secret"), PermissionsExt::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("one.bin", root.join("a/link")).unwrap();
    std::fs::write(root.join("doomed.txt"), b"deleted after the snapshot").unwrap();
    // Names a listing must encode and decode exactly (s3s-fs only echoes EncodingType).
    std::fs::write(root.join("a/plus+percent%41 space.txt"), b"odd name").unwrap();
}

#[test]
fn snapshot_list_view_restore_and_delete() {
    let _serial = one_at_a_time();
    for versioned in bucket_kinds() {
        round_trip(versioned);
    }
}

/// `keepfs snapshot` by URL, without a mount: names a listing must encode and decode exactly
/// are recorded and restored as they are (the command probes how the server encodes
/// listings, as a mount does; s3s-fs only echoes `EncodingType`).
#[test]
fn a_snapshot_by_url_keeps_names_that_need_encoding() {
    let _one = one_at_a_time();
    let s = server();
    let bucket = s.bucket("snap-names");
    let names = [
        "plus+sign",
        "percent%41",
        "space in it",
        "caf\u{e9}",
        "a/b%2Fc+d",
    ];
    for (i, name) in names.iter().enumerate() {
        s.put(
            &bucket,
            &format!("vol/{name}"),
            &pattern(1000 + i, i as u64),
        );
    }
    let flags = s3_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let source = format!("s3://{bucket}/vol");
    let mut create = vec!["create", "n1", &source];
    create.extend(&flags);
    snapshot_ok(&create);
    let to = format!("s3://{bucket}/back");
    let mut restore = vec!["restore", "n1", &source, "--to", &to];
    restore.extend(&flags);
    snapshot_ok(&restore);
    for (i, name) in names.iter().enumerate() {
        assert_eq!(
            s.get(&bucket, &format!("back/{name}")).map(|b| sha256(&b)),
            Some(sha256(&pattern(1000 + i, i as u64))),
            "{name} restored"
        );
    }
}

fn round_trip(versioned: bool) {
    let bucket = new_bucket("snap-round", versioned);
    let source = format!("s3://{bucket}/vol");
    let mut m = Mount::new(&source, &[]);
    let mnt = m.path().to_str().unwrap().to_owned();
    write_tree(m.path());

    let bad = snapshot(&["create", "../x", &mnt]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("invalid snapshot name"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let said = snapshot_ok(&["create", "s1", &mnt]);
    assert!(said.contains("s1 of"), "{said}");
    let again = snapshot(&["create", "s1", &mnt]);
    assert!(!again.status.success(), "a second s1 was taken");
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));
    let mut at_snapshot = tree(m.path());
    if !server().keeps_markers() {
        at_snapshot.remove("empty"); // s3s-fs keeps no empty directory
    }

    // Changes after the snapshot: none may reach it.
    std::fs::write(m.path().join("small.txt"), b"changed later\n").unwrap();
    std::fs::remove_file(m.path().join("doomed.txt")).unwrap();
    std::fs::write(m.path().join("new.txt"), b"created later").unwrap();
    std::fs::create_dir(m.path().join("later")).unwrap();
    // The reserved directory is neither shown nor creatable.
    assert!(!common::names(m.path()).contains(&".keepfs".to_owned()));
    let err = std::fs::create_dir(m.path().join(".keepfs")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    assert_eq!(
        std::fs::metadata(m.path().join(".keepfs"))
            .unwrap_err()
            .kind(),
        std::io::ErrorKind::NotFound
    );
    common::flush(&m);

    let listed = snapshot(&["list", &mnt, "--json"]);
    assert!(listed.status.success());
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed[0]["name"], "s1", "{listed}");
    assert_eq!(listed[0]["manifest"]["versioned"], versioned, "{listed}");
    let objects = listed[0]["manifest"]["objects"].as_u64().unwrap();
    assert!(objects >= 7, "{listed}");

    // The read-only view shows the tree as it was.
    let view = Mount::new(&source, &["--snapshot", "s1"]);
    assert_eq!(
        tree(view.path()),
        at_snapshot,
        "snapshot view (versioned {versioned})"
    );
    let err = std::fs::write(view.path().join("small.txt"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    drop(view);

    // Restore into a new prefix: equal by sha256, modes and link targets.
    let flags = s3_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let to = format!("s3://{bucket}/restored");
    let mut args = vec!["restore", "s1", &mnt, "--to", &to];
    args.extend(&flags);
    snapshot_ok(&args);
    let restored = Mount::new(&to, &[]);
    assert_eq!(
        tree(restored.path()),
        at_snapshot,
        "restored (versioned {versioned})"
    );
    drop(restored);
    // Not again over it without --force.
    let refused = snapshot(&args);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not empty"));

    // In place, with the mount stopped: the deleted file is back, the new one gone.
    let cache = common::default_test_cache(m.path());
    assert_eq!(m.stop_with(libc::SIGTERM), Some(0));
    let cache_flag = cache.to_str().unwrap().to_owned();
    let said = snapshot_ok(&["restore", "s1", "--cache-dir", &cache_flag, "--force"]);
    let deleted = if server().keeps_markers() {
        "2 deleted"
    } else {
        "1 deleted"
    };
    assert!(said.contains(deleted), "{said}");
    let m = Mount::new(&source, &[]);
    let mut now = tree(m.path());
    // A directory marker the snapshot lacks is deleted like any object (above: new.txt and,
    // where markers are kept, later/). moto's delimited listing of a versioned bucket still shows the
    // prefix of a key whose latest version is a delete marker, so it is checked elsewhere.
    if server().keeps_markers() && !versioned {
        assert!(!now.contains_key("later"), "{now:?}");
    }
    now.remove("later");
    assert_eq!(
        now, at_snapshot,
        "restored in place (versioned {versioned})"
    );

    // Delete: gone from the list, and its copies with it.
    let mnt = m.path().to_str().unwrap().to_owned();
    snapshot_ok(&["delete", "s1", &mnt]);
    let listed = snapshot(&["list", &mnt, "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed, serde_json::json!([]));
    let (left, _) = server().list(&bucket, "vol/.keepfs/snapshots/s1/", false);
    assert!(left.is_empty(), "left behind: {left:?}");
    let missing = snapshot(&["delete", "s1", &mnt]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no snapshot"));
}

/// One acknowledged version of a file: its bytes are `content(file, version)`.
#[derive(Debug, Clone, Copy)]
struct Acked {
    started: Instant,
    acked: Instant,
}

fn content(file: usize, version: u64) -> Vec<u8> {
    // Sizes vary so that a torn mix of two versions can't pass for either.
    let len = 20_000 + (file * 7919 + version as usize * 104_729) % 400_000;
    let mut data = format!("file {file} version {version}\n").into_bytes();
    data.extend(pattern(len, file as u64 * 1_000_003 + version));
    data
}

#[test]
fn snapshot_during_writes_holds_only_versions_acknowledged_before_the_barrier() {
    let _serial = one_at_a_time();
    for versioned in bucket_kinds() {
        during_writes(versioned);
    }
}

fn during_writes(versioned: bool) {
    const FILES: usize = 12;
    let bucket = new_bucket("snap-writes", versioned);
    let source = format!("s3://{bucket}/db");
    let m = Mount::new(&source, &[]);
    let mnt = m.path().to_owned();
    let history: Arc<Mutex<Vec<Vec<Acked>>>> = Arc::new(Mutex::new(vec![Vec::new(); FILES]));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let (history, stop, mnt) = (history.clone(), stop.clone(), mnt.clone());
            std::thread::spawn(move || {
                use std::io::Write;
                let mut version = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for file in (w..FILES).step_by(3) {
                        let started = Instant::now();
                        let path = mnt.join(format!("f{file}"));
                        let bytes = content(file, version);
                        if file % 2 == 0 {
                            // Rewritten in place, acknowledged at close.
                            std::fs::write(&path, &bytes).unwrap();
                        } else {
                            // Written aside, fsync'd, renamed over.
                            let tmp = mnt.join(format!(".f{file}.tmp"));
                            let mut f = std::fs::File::create(&tmp).unwrap();
                            f.write_all(&bytes).unwrap();
                            f.sync_all().unwrap();
                            drop(f);
                            std::fs::rename(&tmp, &path).unwrap();
                        }
                        let acked = Instant::now();
                        let mut h = history.lock().unwrap();
                        assert_eq!(h[file].len() as u64, version);
                        h[file].push(Acked { started, acked });
                    }
                    version += 1;
                }
            })
        })
        .collect();
    // Three snapshots while the writers go on, each with the window it was taken in.
    let mut taken = Vec::new();
    for n in 0..3 {
        std::thread::sleep(Duration::from_millis(800));
        let before = Instant::now();
        snapshot_in_process(&m, &format!("mid{n}"));
        taken.push((format!("mid{n}"), before, Instant::now()));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let history = history.lock().unwrap().clone();

    let total: usize = history.iter().map(Vec::len).sum();
    for (name, before, after) in &taken {
        let checked = check_snapshot(&bucket, &mnt, name, &history, *before, *after);
        eprintln!(
            "snapshot {name} during writes (versioned {versioned}): {checked} files checked, {total} versions written, taken in {:.2} s",
            (*after - *before).as_secs_f64()
        );
    }
    // Everything written after the barrier reached S3 once the gate reopened.
    common::flush(&m);
    for (file, versions) in history.iter().enumerate() {
        let last = versions.len() as u64 - 1;
        let held = server().get(&bucket, &format!("db/f{file}")).unwrap();
        assert_eq!(
            sha256(&held),
            sha256(&content(file, last)),
            "f{file} after the snapshot"
        );
    }
}

/// Restores snapshot `name` into a fresh prefix and checks that each file it holds is exactly
/// one version, acknowledged no earlier than the last one acknowledged before `before` and
/// begun before `after`. Returns how many files it holds.
fn check_snapshot(
    bucket: &str,
    mnt: &Path,
    name: &str,
    history: &[Vec<Acked>],
    before: Instant,
    after: Instant,
) -> usize {
    let flags = s3_flags();
    let to = format!("s3://{bucket}/check-{name}");
    let mut args = vec!["restore", name, mnt.to_str().unwrap(), "--to", &to];
    args.extend(flags.iter().map(String::as_str));
    snapshot_ok(&args);
    let mut checked = 0;
    for (file, versions) in history.iter().enumerate() {
        let last_before = versions.iter().rposition(|v| v.acked <= before);
        let Some(held) = server().get(bucket, &format!("check-{name}/f{file}")) else {
            assert!(
                last_before.is_none(),
                "{name}: f{file} absent, but version {last_before:?} was acknowledged before the snapshot began"
            );
            continue;
        };
        let header = held.split(|&b| b == b'\n').next().unwrap_or_default();
        let header = String::from_utf8_lossy(header).into_owned();
        let version: u64 = header
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name}: f{file} is not a version: {header:?}"));
        assert_eq!(
            sha256(&held),
            sha256(&content(file, version)),
            "{name}: f{file} holds a mix, not version {version}"
        );
        assert!(
            versions[version as usize].started < after,
            "{name}: f{file} holds version {version}, begun after the snapshot returned"
        );
        if let Some(last) = last_before {
            assert!(
                version as usize >= last,
                "{name}: f{file} holds version {version}, older than version {last} acknowledged before the snapshot began"
            );
        }
        checked += 1;
    }
    assert!(checked > 0, "{name}: holds none of the files");
    checked
}

#[test]
fn a_file_open_for_writing_contributes_its_last_fsynced_version() {
    let _serial = one_at_a_time();
    use std::io::{Seek, Write};
    let bucket = server().bucket("snap-open");
    let source = format!("s3://{bucket}/vol");
    let m = Mount::new(&source, &[]);
    // A log: fsync'd, then more appended; a data file: fsync'd, then overwritten in place;
    // a new file never fsync'd. All three stay open across the snapshot.
    let acked_log = pattern(3 << 20, 11);
    let mut log = std::fs::File::create(m.path().join("wal.log")).unwrap();
    log.write_all(&acked_log).unwrap();
    log.sync_all().unwrap();
    log.write_all(b"not yet fsync'd").unwrap();
    let acked_data = pattern(10 << 20, 12); // above the 8 MiB part size
    let mut data = std::fs::File::create(m.path().join("table.dat")).unwrap();
    data.write_all(&acked_data).unwrap();
    data.sync_all().unwrap();
    data.seek(std::io::SeekFrom::Start(4096)).unwrap();
    data.write_all(&[0xAB; 8192]).unwrap();
    let mut fresh = std::fs::File::create(m.path().join("fresh.tmp")).unwrap();
    fresh.write_all(b"never acknowledged").unwrap();

    snapshot_in_process(&m, "open");
    // (Starting the view's keepfs closes this process's descriptors in the child: after the
    // snapshot, that changes nothing it holds.)
    let view = Mount::new(&source, &["--snapshot", "open"]);
    assert_eq!(
        sha256_file(&view.path().join("wal.log")),
        sha256(&acked_log)
    );
    assert_eq!(
        sha256_file(&view.path().join("table.dat")),
        sha256(&acked_data)
    );
    assert!(!view.path().join("fresh.tmp").exists());
    drop(view);

    // The files' own uploads are untouched: after their last close S3 holds what they hold.
    drop((log, data, fresh));
    common::flush(&m);
    let mut expected_log = acked_log.clone();
    expected_log.extend_from_slice(b"not yet fsync'd");
    let mut expected_data = acked_data.clone();
    expected_data[4096..4096 + 8192].fill(0xAB);
    assert_eq!(
        sha256(&server().get(&bucket, "vol/wal.log").unwrap()),
        sha256(&expected_log)
    );
    assert_eq!(
        sha256(&server().get(&bucket, "vol/table.dat").unwrap()),
        sha256(&expected_data)
    );
}

#[test]
fn multipart_copy_keeps_bytes_and_metadata() {
    let _serial = one_at_a_time();
    // What snapshots and restores use above 5 GiB, run on 12 MiB in 5 MiB parts.
    let bucket = server().bucket("snap-copy");
    let data = pattern((12 << 20) + 3, 9);
    server().put_with_metadata(&bucket, "src", &data, &[("mode", "100600"), ("uid", "7")]);
    let etag = server().etag(&bucket, "src").unwrap();
    let store = keepfs::store::S3Store::from_client(server().client().clone(), &bucket);
    let from = keepfs::store::CopyFrom {
        bucket: &bucket,
        key: "src",
        version: None,
        etag: &etag,
        size: data.len() as u64,
    };
    common::rt()
        .block_on(store.copy_in_parts(&from, "dst", 5 << 20))
        .expect("multipart copy");
    assert_eq!(
        sha256(&server().get(&bucket, "dst").unwrap()),
        sha256(&data)
    );
    let meta = server().metadata(&bucket, "dst").unwrap();
    assert_eq!(
        meta.get("mode").map(String::as_str),
        Some("100600"),
        "{meta:?}"
    );
    assert_eq!(meta.get("uid").map(String::as_str), Some("7"), "{meta:?}");
    if server().kind == ServerKind::S3sFs {
        return; // s3s-fs ignores x-amz-copy-source-if-match
    }
    // A source that changed is not copied.
    let stale = keepfs::store::CopyFrom {
        etag: "\"0123456789abcdef0123456789abcdef\"",
        ..from
    };
    let err = common::rt()
        .block_on(store.copy_in_parts(&stale, "dst2", 5 << 20))
        .unwrap_err();
    assert!(
        matches!(err, keepfs::store::StoreError::PreconditionFailed),
        "{err:?}"
    );
    assert!(server().get(&bucket, "dst2").is_none());
}
