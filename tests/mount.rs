//! The mount lifecycle: checks before mounting (each a clear one-line error, nothing mounted),
//! and clean exits on signals and external unmounts.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Mount, is_mounted, keepfs_bin, keepfs_command, mount_expecting_failure, server};

/// Asserts that a failed mount exited non-zero with `needle` in its one-line error.
fn assert_fails_with(source: &str, mountpoint: &Path, extra: &[&str], needle: &str) -> String {
    let out = mount_expecting_failure(source, mountpoint, extra);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "expected failure, got success: {stderr}"
    );
    assert!(
        stderr.contains(needle),
        "expected {needle:?} in the error, got:\n{stderr}"
    );
    let error_lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("keepfs:"))
        .collect();
    assert_eq!(error_lines.len(), 1, "one error line expected:\n{stderr}");
    stderr
}

#[test]
fn malformed_urls_and_bucket_names() {
    let dir = tempfile::tempdir().unwrap();
    assert_fails_with("my-bucket", dir.path(), &[], "is not an S3 URL");
    assert_fails_with("http://my-bucket/x", dir.path(), &[], "is not an S3 URL");
    assert_fails_with("s3://", dir.path(), &[], "is not an S3 URL");
    assert_fails_with(
        "s3://Bad_Bucket",
        dir.path(),
        &[],
        "is not a valid bucket name",
    );
    assert_fails_with("s3://ab", dir.path(), &[], "is not a valid bucket name");
    assert_fails_with(
        "s3://bucket-ok",
        dir.path(),
        &["--file-mode", "999"],
        "invalid mode",
    );
    assert_fails_with(
        "s3://bucket-ok",
        dir.path(),
        &["--max-memory-cache", "lots"],
        "invalid size",
    );
}

#[test]
fn missing_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("kt-missing-{}", std::process::id());
    assert_fails_with(
        &format!("s3://{missing}"),
        dir.path(),
        &[],
        "does not exist",
    );
}

#[test]
fn bad_credentials() {
    let s = server();
    if !s.checks_credentials() {
        common::skipped(&format!(
            "bad_credentials: {:?} accepts any credentials",
            s.kind
        ));
        return;
    }
    let bucket = s.bucket("creds");
    let dir = tempfile::tempdir().unwrap();
    let out = keepfs_command(&format!("s3://{bucket}"), dir.path(), &[])
        .env("AWS_SECRET_ACCESS_KEY", "wrong-secret")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(common::default_test_cache(dir.path()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("access denied"), "{stderr}");
    assert!(
        !stderr.contains("wrong-secret"),
        "credentials must never be printed"
    );
    assert!(!is_mounted(dir.path()));
}

/// Mounts against `endpoint` with a 1 s connect timeout; asserts a bounded, clear failure and
/// returns the error text.
fn mount_unreachable(endpoint: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let out = Command::new(keepfs_bin())
        .args(["mount", "s3://some-bucket"])
        .arg(dir.path())
        .args([
            "--endpoint-url",
            endpoint,
            "--force-path-style",
            "--connect-timeout",
            "1",
        ])
        .arg("--cache-dir")
        .arg(cache.path())
        .envs(server().env())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        stderr.contains("could not reach the S3 endpoint"),
        "{stderr}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );
    assert!(!is_mounted(dir.path()));
    stderr
}

#[test]
fn unreachable_endpoint_fails_in_bounded_time() {
    // Nothing listens on port 1: connection refused.
    mount_unreachable("http://127.0.0.1:1");
    // A server that accepts connections but never answers: bounded by the check's timeout
    // (twice --connect-timeout plus 2 s).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stderr = mount_unreachable(&format!("http://{}", listener.local_addr().unwrap()));
    assert!(stderr.contains("within 4s"), "{stderr}");
}

#[test]
fn bad_mountpoints() {
    let s = server();
    let bucket = s.bucket("mountpoints");
    let src = format!("s3://{bucket}");
    let dir = tempfile::tempdir().unwrap();
    assert_fails_with(&src, &dir.path().join("missing"), &[], "does not exist");
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert_fails_with(&src, &file, &[], "is not a directory");
    let m = Mount::new(&src, &[]);
    assert_fails_with(&src, m.path(), &[], "already has a FUSE filesystem mounted");
    assert!(is_mounted(m.path()), "the existing mount is untouched");
}

/// A container's volume is a bind mount at the mount point (the sidecar's shared volume):
/// keepfs mounts over it, and unmounting leaves the volume as it was.
#[test]
fn mounts_over_a_bind_mounted_volume() {
    let s = server();
    let bucket = s.bucket("overbind");
    s.put(&bucket, "in-s3", b"object");
    let volume = tempfile::tempdir().unwrap();
    std::fs::write(volume.path().join("on-volume"), b"local").unwrap();
    let point = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("mount")
        .arg("--bind")
        .arg(volume.path())
        .arg(point.path())
        .status()
        .unwrap();
    assert!(status.success(), "bind mount");
    struct Unbind<'a>(&'a std::path::Path);
    impl Drop for Unbind<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0)
                .status();
        }
    }
    let _unbind = Unbind(point.path());
    // The daemon keeps stderr for its log: a file, so `output` does not wait for it.
    let log = tempfile::NamedTempFile::new().unwrap();
    let out = keepfs_command(&format!("s3://{bucket}"), point.path(), &["--daemon"])
        .stdin(Stdio::null())
        .stderr(log.reopen().unwrap())
        .output()
        .unwrap();
    let log = std::fs::read_to_string(log.path()).unwrap_or_default();
    assert!(out.status.success(), "mount over a bind mount: {log}");
    assert_eq!(
        std::fs::read(point.path().join("in-s3")).unwrap(),
        b"object"
    );
    assert!(!point.path().join("on-volume").exists(), "keepfs is on top");
    let status = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(point.path())
        .status()
        .unwrap();
    assert!(status.success(), "unmount keepfs");
    assert_eq!(
        std::fs::read(point.path().join("on-volume")).unwrap(),
        b"local",
        "the volume is back"
    );
    let _ = std::fs::remove_dir_all(common::default_test_cache(point.path()));
}

#[test]
fn signals_unmount_cleanly() {
    let s = server();
    let bucket = s.bucket("signals");
    s.put(&bucket, "f", b"data");
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let mut m = Mount::new(&format!("s3://{bucket}"), &[]);
        assert_eq!(std::fs::read(m.path().join("f")).unwrap(), b"data");
        let code = m.stop_with(signal);
        assert_eq!(
            code,
            Some(0),
            "exit status after signal {signal}:\n{}",
            m.log()
        );
        assert!(!is_mounted(m.path()), "unmounted after signal {signal}");
    }
}

#[test]
fn external_unmount_ends_the_process() {
    let s = server();
    let bucket = s.bucket("external");
    for tool in [["umount", ""], ["fusermount3", "-u"]] {
        let mut m = Mount::new(&format!("s3://{bucket}"), &[]);
        let mut cmd = Command::new(tool[0]);
        if !tool[1].is_empty() {
            cmd.arg(tool[1]);
        }
        let status = cmd.arg(m.path()).status().unwrap();
        assert!(status.success(), "{} failed", tool[0]);
        assert_eq!(
            m.wait_exit(Duration::from_secs(10)),
            Some(0),
            "{}:\n{}",
            tool[0],
            m.log()
        );
    }
}

#[test]
fn daemon_mode_returns_when_ready() {
    let s = server();
    let bucket = s.bucket("daemon");
    s.put(&bucket, "hello.txt", b"from the daemon");
    let dir = tempfile::tempdir().unwrap();
    let out = keepfs_command(&format!("s3://{bucket}"), dir.path(), &["--daemon"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .unwrap();
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
            let _ = std::fs::remove_dir_all(common::default_test_cache(self.0));
        }
    }
    let _guard = Unmount(dir.path());
    assert!(out.status.success(), "daemon exit: {:?}", out.status);
    assert!(is_mounted(dir.path()), "mounted when --daemon returns");
    assert_eq!(
        std::fs::read(dir.path().join("hello.txt")).unwrap(),
        b"from the daemon"
    );

    // A daemon that cannot mount reports the error and a failure status.
    let other = tempfile::tempdir().unwrap();
    let out = keepfs_command("s3://kt-no-such-bucket-daemon", other.path(), &["--daemon"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(common::default_test_cache(other.path()));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    assert!(!is_mounted(other.path()));
}

#[test]
fn help_explains_every_flag() {
    let out = Command::new(keepfs_bin())
        .args(["mount", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--endpoint-url",
        "--region",
        "--force-path-style",
        "--read-only",
        "--foreground",
        "--daemon",
        "--allow-other",
        "--uid",
        "--gid",
        "--file-mode",
        "--dir-mode",
        "--metadata-ttl",
        "--max-memory-cache",
        "--log-level",
        "--log-format",
        "--read-write",
        "--cache-dir",
        "--part-size",
        "--upload-concurrency",
    ] {
        assert!(help.contains(flag), "{flag} missing from help:\n{help}");
    }
}

#[test]
fn json_log_format() {
    let s = server();
    let bucket = s.bucket("jsonlogs");
    let mut m = Mount::new(&format!("s3://{bucket}"), &["--log-format", "json"]);
    let _ = std::fs::read_dir(m.path()).unwrap().count();
    assert_eq!(m.stop_with(libc::SIGTERM), Some(0));
    let log = m.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.iter().any(|l| l.contains("\"mounted\"")), "{log}");
    for line in lines {
        assert!(
            line.starts_with('{') && line.ends_with('}'),
            "not a JSON line: {line}"
        );
    }
}

#[test]
fn cache_directory_is_private_and_owned_by_one_mount() {
    use std::os::unix::fs::PermissionsExt;
    let s = server();
    let bucket = s.bucket("cachedir");
    let src = format!("s3://{bucket}");
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("nested/cache");
    let cache_arg = cache.to_str().unwrap();
    let m = Mount::new(&src, &["--cache-dir", cache_arg]);
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    assert_eq!(
        std::fs::read_to_string(cache.join("lock")).unwrap(),
        m.pid().to_string()
    );
    // A second keepfs on the same cache directory refuses, naming the owner.
    let other = tempfile::tempdir().unwrap();
    let stderr = assert_fails_with(
        &src,
        other.path(),
        &["--cache-dir", cache_arg],
        "in use by another keepfs",
    );
    assert!(stderr.contains(&format!("pid {}", m.pid())), "{stderr}");
    assert!(is_mounted(m.path()), "the first mount is untouched");
    drop(m);
    // Released when the owner exits: the next mount takes it.
    let again = Mount::new(&src, &["--cache-dir", cache_arg]);
    assert!(is_mounted(again.path()));
}

#[test]
fn cache_directory_of_a_newer_keepfs_is_refused_untouched() {
    let s = server();
    let bucket = s.bucket("cachefmt");
    let cache = tempfile::tempdir().unwrap();
    std::fs::write(cache.path().join("FORMAT"), "keepfs-cache-format 999\n").unwrap();
    let mnt = tempfile::tempdir().unwrap();
    assert_fails_with(
        &format!("s3://{bucket}"),
        mnt.path(),
        &["--cache-dir", cache.path().to_str().unwrap()],
        "newer than this keepfs understands",
    );
    assert_eq!(
        std::fs::read_to_string(cache.path().join("FORMAT")).unwrap(),
        "keepfs-cache-format 999\n"
    );
    assert!(!cache.path().join("journal").exists());
}

#[test]
fn default_cache_directory_is_per_mount_and_private() {
    use std::os::unix::fs::PermissionsExt;
    let s = server();
    let bucket = s.bucket("defaultcache");
    let src = format!("s3://{bucket}/some/prefix");
    let home = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let base = if root {
        PathBuf::from("/var/cache/keepfs")
    } else {
        home.path().join("keepfs")
    };
    let name = keepfs::cache::default_cache_dir(Some(&s.endpoint), &bucket, "some/prefix/");
    let expected = base.join(name.file_name().unwrap());
    // Run with the defaults: root uses /var/cache/keepfs, users $XDG_CACHE_HOME/keepfs.
    let mut child = Command::new(keepfs_bin())
        .args(["mount", &src])
        .arg(mnt.path())
        .args(["--endpoint-url", &s.endpoint, "--force-path-style"])
        .envs(s.env())
        .env("XDG_CACHE_HOME", home.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Cleanup<'a>(&'a Path, &'a Path, &'a mut std::process::Child);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
            let _ = self.2.wait();
            let _ = std::fs::remove_dir_all(self.1);
        }
    }
    let guard = Cleanup(mnt.path(), &expected, &mut child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !is_mounted(guard.0) {
        assert!(Instant::now() < deadline, "not mounted");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = std::fs::metadata(&expected).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{}", expected.display());
    assert!(expected.join("lock").exists());
}
