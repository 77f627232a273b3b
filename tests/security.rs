//! What other users of the machine can reach: the cache directory and everything in it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{Mount, pattern, server, sha256, sha256_file};

/// Every entry under `dir` (itself included) with its permission bits.
fn modes_under(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(path) = todo.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue; // removed meanwhile (a block evicted, a record done)
        };
        out.push((path.clone(), meta.permissions().mode() & 0o777));
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap().flatten() {
                todo.push(entry.path());
            }
        }
    }
    out
}

/// Fails with every entry of `dir` that anyone but its owner could read, write or enter.
fn assert_private(dir: &Path, when: &str) {
    let all = modes_under(dir);
    let open: Vec<String> = all
        .iter()
        .filter(|(_, mode)| mode & 0o077 != 0)
        .map(|(p, mode)| format!("{:o} {}", mode, p.display()))
        .collect();
    assert!(
        open.is_empty(),
        "{when}: cache entries others can reach:\n{}",
        open.join("\n")
    );
    // The check saw the kinds of file it is about.
    for part in ["lock", "mount.json", "blocks", "data", "journal"] {
        assert!(
            all.iter()
                .any(|(p, _)| p.strip_prefix(dir).is_ok_and(|rel| rel.starts_with(part))),
            "{when}: no {part} in the cache directory: {all:?}"
        );
    }
}

/// With a umask that lets everyone read (and write) new files, every file keepfs creates in
/// its cache directory is still 0600 and every directory 0700: the lock and `mount.json`, the
/// journal, the data files of written files, multipart upload records, cached blocks, the
/// control socket.
#[test]
fn the_cache_directory_keeps_everything_private_whatever_the_umask() {
    // SAFETY: umask only sets this process's file-creation mask (inherited by the keepfs it
    // starts); no memory is involved. Other tests of this binary create files through
    // keepfs or tempfile, which set their own modes.
    unsafe { libc::umask(0) };
    let s = server();
    let bucket = s.bucket("private");
    let cache = tempfile::tempdir().unwrap();
    let cache_arg = cache.path().to_str().unwrap();
    // Blocks are cached on disk however full the test machine's disk is.
    let args = ["--cache-dir", cache_arg, "--cache-min-free", "0"];
    let small = pattern(4096, 1);
    let big = pattern(12 << 20, 2); // two multipart parts
    {
        let m = Mount::new(&format!("s3://{bucket}"), &args);
        std::fs::create_dir(m.path().join("d")).unwrap();
        std::fs::write(m.path().join("d/small"), &small).unwrap();
        std::fs::write(m.path().join("big"), &big).unwrap();
        std::fs::rename(m.path().join("d"), m.path().join("e")).unwrap();
        // Written and not yet uploaded, or uploading: data files and records exist now.
        assert_private(cache.path(), "while writing");
        common::flush(&m);
    }
    s.put(&bucket, "theirs", &pattern(3 << 20, 3));
    let m = Mount::new(&format!("s3://{bucket}"), &args);
    // Reads fill the block cache on disk.
    assert_eq!(
        sha256_file(&m.path().join("theirs")),
        sha256(&pattern(3 << 20, 3))
    );
    assert_eq!(sha256_file(&m.path().join("big")), sha256(&big));
    assert_eq!(std::fs::read(m.path().join("e/small")).unwrap(), small);
    // Blocks reach the disk cache in the background.
    let blocks = cache.path().join("blocks");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !modes_under(&blocks)
        .iter()
        .any(|(p, _)| std::fs::metadata(p).is_ok_and(|m| m.is_file()))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no block file written"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        cache.path().join("control.sock").exists(),
        "the control socket is checked too"
    );
    assert_private(cache.path(), "after reading");
}

/// The control socket answers its owner (and root) only, also when the cache directory and the
/// socket were opened up by hand: another user's connection is dropped unanswered.
#[test]
fn the_control_socket_answers_only_its_owner() {
    if std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_err()
        || !Path::new("/usr/bin/python3").exists()
    {
        common::skipped("control socket peer check: needs setpriv and /usr/bin/python3");
        return;
    }
    let s = server();
    let bucket = s.bucket("peer");
    let cache = tempfile::tempdir().unwrap();
    let cache_arg = cache.path().to_str().unwrap();
    let m = Mount::new(&format!("s3://{bucket}"), &["--cache-dir", cache_arg]);
    std::fs::write(m.path().join("f"), b"x").unwrap();
    // Opened up by hand: the directory's mode no longer keeps others out.
    let open = |path: &Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    open(cache.path(), 0o755);
    open(&cache.path().join("control.sock"), 0o666);
    // Asks the socket for the mount's state as `uid` (a raw connection: `keepfs status` as
    // another user stops earlier, at the files it can't read).
    let ask = |uid: u32| {
        let script = "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); \
                      s.sendall(b'status\\n'); print(s.recv(65536).decode())";
        let sock = cache.path().join("control.sock");
        let out = std::process::Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
            ])
            .args(["/usr/bin/python3", "-c", script, sock.to_str().unwrap()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let owner = ask(0);
    assert!(
        owner.contains("dirty_files"),
        "the owner is answered:\n{owner}"
    );
    let nobody = ask(65534);
    assert!(
        !nobody.contains("dirty_files"),
        "uid 65534 got the mount's state:\n{nobody}"
    );
    assert!(
        m.log()
            .contains("control socket: refused a connection from another user"),
        "uid 65534 got: {nobody}\n{}",
        m.log()
    );
}

/// The secret key reaches no log line (at trace level, the SDK's own included), no file of the
/// cache directory and no `keepfs status --json`.
#[test]
fn credentials_are_never_logged_or_stored() {
    let s = server();
    let secret = s
        .env()
        .into_iter()
        .find(|(k, _)| *k == "AWS_SECRET_ACCESS_KEY")
        .map(|(_, v)| v)
        .unwrap();
    assert!(
        secret.len() >= 8,
        "a secret distinctive enough to search for"
    );
    let bucket = s.bucket("secret");
    let cache = tempfile::tempdir().unwrap();
    let cache_arg = cache.path().to_str().unwrap();
    let m = Mount::new(
        &format!("s3://{bucket}"),
        &["--cache-dir", cache_arg, "--log-level", "trace"],
    );
    let data = pattern(9 << 20, 77); // a multipart upload too
    std::fs::write(m.path().join("f"), &data).unwrap();
    common::flush(&m);
    assert_eq!(sha256_file(&m.path().join("f")), sha256(&data));
    let status = std::process::Command::new(common::keepfs_bin())
        .args(["status", "--json", "--cache-dir", cache_arg])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status.contains("dirty_files"), "status answered: {status}");
    assert!(!status.contains(&secret), "status --json holds the secret");
    let log = m.log();
    assert!(log.contains("TRACE"), "trace logging was on");
    assert!(!log.contains(&secret), "the log holds the secret");
    for (path, _) in modes_under(cache.path()) {
        if let Ok(bytes) = std::fs::read(&path) {
            assert!(
                !String::from_utf8_lossy(&bytes).contains(&secret),
                "{} holds the secret",
                path.display()
            );
        }
    }
}

/// Runs `script` with `sh -c` as uid/gid 65534; its exit status.
fn as_nobody(script: &str) -> bool {
    std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .status()
        .unwrap()
        .success()
}

/// Without `--allow-other` another user can't even look into the mount; with it, a second
/// user (uid 65534) can do exactly what the reported owner and modes allow.
#[test]
fn other_users_get_what_the_modes_allow_and_nothing_without_allow_other() {
    if std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_err()
    {
        common::skipped("other users: needs setpriv (util-linux)");
        return;
    }
    let s = server();
    let bucket = s.bucket("others");
    s.put(&bucket, "public.txt", b"read me");
    {
        let m = Mount::new(&format!("s3://{bucket}"), &[]);
        let p = m.path().display();
        assert!(
            !as_nobody(&format!("cat {p}/public.txt")),
            "another user read through a mount without --allow-other"
        );
    }
    let m = Mount::new(&format!("s3://{bucket}"), &["--allow-other"]);
    let p = m.path().display().to_string();
    // The mount's owner (root here) owns everything: 0644 files, 0755 directories.
    assert!(
        as_nobody(&format!("cat {p}/public.txt >/dev/null")),
        "0644: readable"
    );
    assert!(
        !as_nobody(&format!("echo x >> {p}/public.txt")),
        "0644: not writable"
    );
    assert!(
        !as_nobody(&format!("touch {p}/new")),
        "0755 root directory: no creating"
    );
    assert!(
        !as_nobody(&format!("rm -f {p}/public.txt")),
        "0755 root directory: no removing"
    );
    assert_eq!(
        std::fs::read(m.path().join("public.txt")).unwrap(),
        b"read me"
    );
    // Opened up by its owner: now it may.
    std::fs::create_dir(m.path().join("shared")).unwrap();
    std::fs::set_permissions(
        m.path().join("shared"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    assert!(
        as_nobody(&format!("echo theirs > {p}/shared/theirs.txt")),
        "0777: creating"
    );
    let meta = std::fs::metadata(m.path().join("shared/theirs.txt")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&meta),
        65534,
        "the file belongs to who made it"
    );
    std::fs::write(m.path().join("private.txt"), b"mine").unwrap();
    std::fs::set_permissions(
        m.path().join("private.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    assert!(
        !as_nobody(&format!("cat {p}/private.txt")),
        "0600: not readable"
    );
    // Larger than a symlink could be: nothing but a HEAD tells its mode.
    std::fs::write(m.path().join("private.bin"), vec![7u8; 100_000]).unwrap();
    std::fs::set_permissions(
        m.path().join("private.bin"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    common::flush(&m);
    assert_eq!(
        s.get(&bucket, "shared/theirs.txt").as_deref(),
        Some(&b"theirs\n"[..])
    );
    let meta = s.metadata(&bucket, "shared/theirs.txt").unwrap();
    assert_eq!(meta.get("uid").map(String::as_str), Some("65534"));
    drop(m);
    // A fresh mount: a listing shows the private files before anything HEADed them. The
    // kernel checks permissions against what it was told; it must never be the listing's
    // default 0644.
    let empty = tempfile::tempdir().unwrap();
    let m = Mount::new(
        &format!("s3://{bucket}"),
        &[
            "--allow-other",
            "--metadata-ttl",
            "300",
            "--cache-dir",
            empty.path().to_str().unwrap(),
        ],
    );
    let p = m.path().display().to_string();
    assert!(
        as_nobody(&format!("ls -l {p} >/dev/null")),
        "listing the root"
    );
    for name in ["private.txt", "private.bin"] {
        assert!(
            !as_nobody(&format!("cat {p}/{name} >/dev/null 2>&1")),
            "{name} (0600) read by another user after a listing"
        );
        let mode = std::fs::metadata(m.path().join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
    }
    assert!(as_nobody(&format!("cat {p}/public.txt >/dev/null")));
}
