//! Unprivileged serving: a privileged helper opens `/dev/fuse` and mounts it; keepfs, started
//! with every capability dropped, serves that connection through `/dev/fd/3` (libfuse's
//! convention). Writes go through, reach S3, survive a kill -9 and are served again by the next
//! keepfs on a new connection; a stop signal and an unmount from outside end it cleanly.
//! (tests/containers.rs does the same with keepfs in a `--cap-drop ALL` container.)

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use common::{pattern, server, sha256, sha256_file};

/// keepfs serving a connection mounted for it; killed and unmounted when dropped.
struct Handed {
    child: Option<Child>,
    mountpoint: PathBuf,
    log: PathBuf,
}

impl Handed {
    /// Mounts `bucket` at `mountpoint` and hands the connection to a keepfs that holds no
    /// capability (setpriv clears its bounding, inheritable and ambient sets).
    fn start(bucket: &str, mountpoint: &Path, cache: &Path) -> Handed {
        let s = server();
        let log = mountpoint.with_extension(format!("{}.log", std::process::id()));
        let mut args: Vec<String> = [
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--",
            common::keepfs_bin(),
            "mount",
            &format!("s3://{bucket}"),
            "/dev/fd/3",
            "--endpoint-url",
            &s.endpoint,
            "--force-path-style",
            "--log-level",
            "debug",
        ]
        .map(String::from)
        .to_vec();
        args.extend(["--cache-dir".to_owned(), cache.display().to_string()]);
        let envs: Vec<(String, String)> = s
            .env()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let child = common::spawn_with_fuse_fd(
            mountpoint,
            &format!("keepfs:s3://{bucket}"),
            "setpriv",
            &args,
            &envs,
            fs::File::create(&log).unwrap(),
        );
        let mut handed = Handed {
            child: Some(child),
            mountpoint: mountpoint.to_owned(),
            log,
        };
        handed.wait_serving();
        handed
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Until keepfs (exec'd by the helper under the same pid) serves the connection.
    fn wait_serving(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self
            .log()
            .contains("serving a FUSE connection mounted by another process")
        {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("helper or keepfs exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "not serving in 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (0: none) and waits (30 s at most) for the exit code.
    fn stop_with(&mut self, signal: i32) -> Option<i32> {
        let mut child = self.child.take()?;
        common::signal_and_wait(&mut child, signal, Duration::from_secs(30))
            .unwrap_or_else(|()| panic!("keepfs did not exit within 30 s:\n{}", self.log()))
    }

    /// Detaches the mount (the helper's job once keepfs is gone).
    fn unmount(&self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status();
    }
}

impl Drop for Handed {
    fn drop(&mut self) {
        self.stop_with(libc::SIGKILL);
        self.unmount();
        let _ = fs::remove_file(&self.log);
    }
}

/// The capability sets of process `pid` (`CapPrm`, `CapEff`, `CapBnd` lines).
fn capabilities(pid: u32) -> Vec<String> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("CapPrm") || l.starts_with("CapEff") || l.starts_with("CapBnd"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_keepfs_without_capabilities_serves_a_connection_mounted_for_it() {
    let s = server();
    let bucket = s.bucket("handover");
    s.put(&bucket, "seeded.txt", b"from S3\n");
    let dir = tempfile::tempdir().unwrap();
    let (mountpoint, cache) = (dir.path().join("mnt"), dir.path().join("cache"));
    fs::create_dir(&mountpoint).unwrap();
    let mut keepfs = Handed::start(&bucket, &mountpoint, &cache);
    let pid = keepfs.pid();
    assert_eq!(
        fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap()
            .trim(),
        "keepfs"
    );
    for line in capabilities(pid) {
        assert!(
            line.ends_with("0000000000000000"),
            "keepfs holds capabilities: {line}"
        );
    }

    // Reads and writes through the kernel, as on any keepfs mount.
    assert_eq!(
        fs::read(mountpoint.join("seeded.txt")).unwrap(),
        b"from S3\n"
    );
    let small = pattern(10_000, 1);
    let large = pattern((13 << 20) + 3, 2);
    fs::create_dir(mountpoint.join("d")).unwrap();
    fs::write(mountpoint.join("d/small.bin"), &small).unwrap();
    fs::write(mountpoint.join("large.bin"), &large).unwrap();
    assert_eq!(sha256_file(&mountpoint.join("large.bin")), sha256(&large));
    // keepfs flush finds the mount's cache directory through the mount point.
    let out = std::process::Command::new(common::keepfs_bin())
        .args(["flush", mountpoint.to_str().unwrap(), "--timeout", "60s"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}\n{}", keepfs.log());
    assert_eq!(
        s.get(&bucket, "d/small.bin").map(|b| sha256(&b)),
        Some(sha256(&small))
    );
    assert_eq!(
        s.get(&bucket, "large.bin").map(|b| sha256(&b)),
        Some(sha256(&large))
    );

    // A file acknowledged but not uploaded (the in-process server holds uploads back) survives
    // a kill -9; the next keepfs, on a new connection and the same cache directory, serves it
    // and uploads it.
    let held = s.refuse_uploads_if_possible(&bucket);
    let pending = pattern(300_000, 3);
    fs::write(mountpoint.join("pending.bin"), &pending).unwrap();
    assert_eq!(
        keepfs.stop_with(libc::SIGKILL),
        None,
        "killed by the signal"
    );
    let dead = fs::metadata(mountpoint.join("pending.bin")).unwrap_err();
    assert_eq!(dead.raw_os_error(), Some(libc::ENOTCONN), "{dead}");
    keepfs.unmount();
    if held {
        s.allow_uploads(&bucket);
    }
    let mut keepfs = Handed::start(&bucket, &mountpoint, &cache);
    assert_eq!(
        sha256_file(&mountpoint.join("pending.bin")),
        sha256(&pending)
    );
    s.wait_for_object(&bucket, "pending.bin", &sha256(&pending));

    // SIGTERM: uploads drained, the connection closed, exit 0; the mount is the helper's to
    // remove.
    fs::write(mountpoint.join("last.txt"), b"last").unwrap();
    assert_eq!(keepfs.stop_with(libc::SIGTERM), Some(0), "{}", keepfs.log());
    assert_eq!(s.get(&bucket, "last.txt").as_deref(), Some(&b"last"[..]));
    assert!(
        keepfs.log().contains("closing the FUSE connection"),
        "{}",
        keepfs.log()
    );
}

#[test]
fn an_unmount_by_the_helper_ends_keepfs() {
    let s = server();
    let bucket = s.bucket("handoverumount");
    let dir = tempfile::tempdir().unwrap();
    let (mountpoint, cache) = (dir.path().join("mnt"), dir.path().join("cache"));
    fs::create_dir(&mountpoint).unwrap();
    let mut keepfs = Handed::start(&bucket, &mountpoint, &cache);
    fs::write(mountpoint.join("a.txt"), b"a").unwrap();
    let out = std::process::Command::new("umount")
        .arg(&mountpoint)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(keepfs.stop_with(0), Some(0), "{}", keepfs.log());
    assert!(!common::is_mounted(&mountpoint));
    // What was closed stays in the journal for the next start (or is in S3 already).
    assert!(
        s.get(&bucket, "a.txt").is_some()
            || fs::read_dir(cache.join("journal")).unwrap().count() > 0
    );
}

#[test]
fn a_descriptor_that_is_not_fuse_is_refused() {
    let s = server();
    let bucket = s.bucket("handoverbad");
    let cache = tempfile::tempdir().unwrap();
    let cache = ["--cache-dir", cache.path().to_str().unwrap()];
    let out = common::keepfs_command(&format!("s3://{bucket}"), Path::new("/dev/fd/0"), &cache)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/dev/fd/0 is not a FUSE connection: it is open, but not on /dev/fuse"),
        "{stderr}"
    );
    let out = common::keepfs_command(&format!("s3://{bucket}"), Path::new("/dev/fd/77"), &cache)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not an open descriptor"), "{stderr}");
}
