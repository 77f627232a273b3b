//! keepfs outside Kubernetes: an fstab line (`mount -a`), both as type `fuse.keepfs` (mount(8)
//! runs `/sbin/mount.fuse.keepfs`) and as libfuse's `keepfs#SOURCE` of type `fuse`; systemd's
//! readiness protocol (Type=notify); and the unit template in deploy/systemd.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{is_mounted, keepfs_bin, server};

/// A symlink to the keepfs under test while it lives (if nothing is installed there yet):
/// `/sbin/mount.fuse.keepfs`, where mount(8) looks for the helper of type `fuse.keepfs`, and
/// `/usr/local/bin/keepfs`, on the fixed PATH with which mount.fuse3 runs `keepfs#` entries.
struct Helper {
    link: PathBuf,
    made: bool,
}

impl Helper {
    fn install(link: &str) -> Self {
        let link = PathBuf::from(link);
        let made = std::os::unix::fs::symlink(keepfs_bin(), &link).is_ok();
        Helper { link, made }
    }

    /// Whether the link is there and leads to the keepfs under test.
    fn usable(&self) -> bool {
        std::fs::canonicalize(&self.link).ok() == std::fs::canonicalize(keepfs_bin()).ok()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if self.made {
            let _ = std::fs::remove_file(&self.link);
        }
    }
}

/// Unmounts `path` when dropped (also when the test failed).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
}

/// Runs `mount` with the test server's credentials in the environment (root keeps it);
/// returns whether it succeeded and what it printed. Its output goes through a file: the keepfs
/// daemon it starts keeps stderr for its log, so a pipe would never close.
fn mount(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let status = mount_command()
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(log.reopen().unwrap())
        .status()
        .unwrap();
    (
        status.success(),
        std::fs::read_to_string(log.path()).unwrap_or_default(),
    )
}

fn mount_command() -> Command {
    let mut cmd = Command::new("mount");
    for (k, v) in server().env() {
        cmd.env(k, v);
    }
    cmd
}

fn unmount_and_wait(path: &Path) {
    let status = Command::new("umount").arg(path).status().unwrap();
    assert!(status.success(), "umount {}", path.display());
    assert!(!is_mounted(path));
}

#[test]
fn fstab_lines_mount_with_mount_a_and_unmount_with_umount() {
    let s = server();
    let bucket = s.bucket("fstab");
    s.put(&bucket, "in-s3.txt", b"from S3\n");
    let dir = tempfile::tempdir().unwrap();
    let (typed, classic) = (dir.path().join("typed"), dir.path().join("classic"));
    let (cache1, cache2) = (dir.path().join("cache1"), dir.path().join("cache2"));
    std::fs::create_dir(&typed).unwrap();
    std::fs::create_dir(&classic).unwrap();
    let helpers = [
        Helper::install("/sbin/mount.fuse.keepfs"),
        Helper::install("/usr/local/bin/keepfs"),
    ];
    if let Some(other) = helpers.iter().find(|h| !h.usable()) {
        common::skipped(&format!(
            "fstab: {} is another keepfs; not replaced",
            other.link.display()
        ));
        return;
    }
    let options = |cache: &Path| {
        format!(
            "_netdev,nofail,endpoint_url={},force_path_style,cache_dir={},allow_other",
            s.endpoint,
            cache.display()
        )
    };
    let fstab = dir.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# keepfs test fstab\n\
             s3://{bucket} {} fuse.keepfs {} 0 0\n\
             keepfs#s3://{bucket} {} fuse {} 0 0\n",
            typed.display(),
            options(&cache1),
            classic.display(),
            options(&cache2),
        ),
    )
    .unwrap();
    let _unmount = (Unmount(typed.clone()), Unmount(classic.clone()));
    let (ok, said) = mount(&["-a".as_ref(), "-T".as_ref(), fstab.as_os_str()]);
    assert!(ok, "mount -a: {said}");
    for point in [&typed, &classic] {
        assert!(
            is_mounted(point),
            "{} is mounted when mount returns",
            point.display()
        );
        assert_eq!(
            std::fs::read(point.join("in-s3.txt")).unwrap(),
            b"from S3\n"
        );
    }
    std::fs::write(typed.join("written.txt"), b"through fstab\n").unwrap();
    unmount_and_wait(&typed);
    // Mounted again by its mount point alone, as `mount /mnt/data` does with /etc/fstab.
    let (ok, said) = mount(&["-T".as_ref(), fstab.as_os_str(), typed.as_os_str()]);
    assert!(ok, "mount MOUNTPOINT: {said}");
    assert_eq!(
        std::fs::read(typed.join("written.txt")).unwrap(),
        b"through fstab\n"
    );
    unmount_and_wait(&typed);
    unmount_and_wait(&classic);
    // An option keepfs does not know is a clear error, and nothing is mounted.
    let bad = dir.path().join("bad-fstab");
    std::fs::write(
        &bad,
        format!(
            "s3://{bucket} {} fuse.keepfs no_such_option 0 0\n",
            typed.display()
        ),
    )
    .unwrap();
    let (ok, said) = mount(&["-a".as_ref(), "-T".as_ref(), bad.as_os_str()]);
    assert!(!ok);
    assert!(said.contains("--no-such-option"), "{said}");
    assert!(!is_mounted(&typed));
}

#[test]
fn systemd_is_told_when_the_mount_is_ready() {
    let s = server();
    let bucket = s.bucket("notify");
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mountpoint = dir.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let _unmount = Unmount(mountpoint.clone());
    let mut child =
        common::keepfs_command(&format!("s3://{bucket}"), &mountpoint, &["--foreground"])
            .env("NOTIFY_SOCKET", &socket_path)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("a notification within 30 s");
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    let mounted = is_mounted(&mountpoint);
    unmount_and_wait(&mountpoint);
    let status = child.wait().unwrap();
    let _ = std::fs::remove_dir_all(common::default_test_cache(&mountpoint));
    assert!(message.lines().any(|l| l == "READY=1"), "{message:?}");
    assert!(mounted, "READY=1 comes once the mount is there");
    assert!(status.success(), "keepfs exits 0 after umount");
}

#[test]
fn the_systemd_unit_template_verifies() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/keepfs@.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    // systemd-analyze checks that ExecStart's program exists: point it at the keepfs under
    // test, and instantiate the template.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("keepfs@.service");
    std::fs::write(&copy, text.replace("/usr/local/bin/keepfs", keepfs_bin())).unwrap();
    let out = match Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("keepfs@data.service"))
        .output()
    {
        Ok(out) => out,
        Err(_) => return common::skipped("systemd-analyze is not installed"),
    };
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    for key in ["Type=notify", "ExecStop=", "Restart=on-failure"] {
        assert!(text.contains(key), "the unit has {key}");
    }
}
