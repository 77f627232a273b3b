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
    let args = ["--cache-dir", cache_arg];
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
