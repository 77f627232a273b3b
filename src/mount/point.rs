//! The mount point: checks before mounting, the mount table (is it still keepfs's mount?),
//! unmounting, and a FUSE connection handed over as an open file descriptor (`/dev/fd/N`).

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::MountError;

/// Checks that `path` can be mounted on: an existing directory with no live FUSE filesystem
/// mounted on it. Other mounts are fine to mount over: a container's volume (the sidecar's
/// shared `emptyDir`) is a bind mount at the mount point.
pub fn check_mountpoint(path: &Path) -> Result<PathBuf, MountError> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(MountError::MountpointMissing(path.to_owned()));
        }
        // A dead FUSE mount answers ENOTCONN. One of keepfs's own, left by a keepfs that was
        // killed (a pod restart: the container's namespace went, the propagated mount stayed),
        // is detached so the new keepfs can take its place; any other is in use.
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            // The parent resolved (symlinks too), as the mount table names mount points.
            let absolute = match (path.parent(), path.file_name()) {
                (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => parent
                    .canonicalize()
                    .map(|p| p.join(name))
                    .unwrap_or_else(|_| path.to_owned()),
                _ => std::path::absolute(path).unwrap_or_else(|_| path.to_owned()),
            };
            if !is_keepfs_mount(&absolute) {
                return Err(MountError::MountpointInUse(path.to_owned()));
            }
            tracing::warn!(
                mountpoint = %absolute.display(),
                "detaching the dead mount of a keepfs that was killed, to mount in its place"
            );
            lazy_unmount(&absolute);
            match std::fs::metadata(path) {
                Ok(meta) => meta,
                Err(_) => return Err(MountError::MountpointInUse(path.to_owned())),
            }
        }
        Err(source) => {
            return Err(MountError::MountpointAccess {
                path: path.to_owned(),
                source,
            });
        }
    };
    if !meta.is_dir() {
        return Err(MountError::MountpointNotDirectory(path.to_owned()));
    }
    let canonical = path
        .canonicalize()
        .map_err(|source| MountError::MountpointAccess {
            path: path.to_owned(),
            source,
        })?;
    if topmost_mount(&canonical).is_some_and(|(fs_type, _)| is_fuse_type(&fs_type)) {
        return Err(MountError::MountpointInUse(canonical));
    }
    Ok(canonical)
}

/// FUSE filesystem types: `fuse`, `fuseblk` and `fuse.NAME` (proc_pid_mountinfo(5)).
fn is_fuse_type(fs_type: &str) -> bool {
    fs_type == "fuse" || fs_type == "fuseblk" || fs_type.starts_with("fuse.")
}

/// Mount tables escape space, tab, newline and backslash as octal (`\040`).
fn unescape_mount_path(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Raises the kernel's read-ahead for this mount to the FUSE request size.
///
/// The kernel caps FUSE read-ahead at the device default (128 KiB) whatever the filesystem asks
/// for, so sequential reads would arrive as 128 KiB requests. Writing the mount's backing-device
/// setting lifts that; it needs root (or a writable /sys), so failure only costs speed.
/// `device` is the mount's `major:minor` from the mount table (a stat of the mountpoint would
/// be a FUSE request that nobody serves yet).
pub(super) fn tune_read_ahead(device: &str) {
    let knob = format!("/sys/class/bdi/{device}/read_ahead_kb");
    let kib = crate::fs::MAX_IO_SIZE / 1024;
    match std::fs::write(&knob, kib.to_string()) {
        Ok(()) => tracing::debug!(knob, kib, "raised kernel read-ahead"),
        Err(e) => tracing::info!(
            knob,
            error = %e,
            "could not raise kernel read-ahead (needs root); sequential reads use 128 KiB requests"
        ),
    }
}

/// The `major:minor` of the filesystem mounted at `path` (canonical), from the mount table.
pub(super) fn mount_device(path: &Path) -> Option<String> {
    mountinfo_line(path)?.split(' ').nth(2).map(str::to_owned)
}

/// Whether the topmost mount at `path` is a keepfs mount: type `fuse` or `fuse.keepfs`, with
/// the source `keepfs:s3://...` keepfs gives its mounts.
fn is_keepfs_mount(path: &Path) -> bool {
    topmost_mount(path).is_some_and(|(fs_type, source)| {
        matches!(fs_type.as_str(), "fuse" | "fuse.keepfs") && source.starts_with("keepfs:")
    })
}

/// Filesystem type and source of the topmost mount at `path`, if it is a mount point.
fn topmost_mount(path: &Path) -> Option<(String, String)> {
    let line = mountinfo_line(path)?;
    let (_, after) = line.split_once(" - ")?;
    let mut fields = after.split(' ');
    let fs_type = fields.next()?.to_owned();
    Some((fs_type, fields.next().unwrap_or_default().to_owned()))
}

/// The line of `/proc/self/mountinfo` for the topmost mount at `path`.
fn mountinfo_line(path: &Path) -> Option<String> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    table
        .lines()
        // The last entry is the topmost mount: ours.
        .rev()
        .find(|line| {
            line.split(' ')
                .nth(4)
                .is_some_and(|mp| Path::new(&unescape_mount_path(mp)) == path)
        })
        .map(str::to_owned)
}

/// Unmounts keepfs's own mount at `path` (`umount`; `fusermount3 -u` where unprivileged).
/// Fails while it is busy.
pub(super) fn unmount(path: &Path) -> std::io::Result<()> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call.
    if unsafe { libc::umount2(c_path.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EPERM) {
        return Err(e);
    }
    let out = std::process::Command::new("fusermount3")
        .args(["-u", "-q"])
        .arg(path)
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "fusermount3 -u: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Detaches the mount even while files are open (`umount -l`).
pub(super) fn lazy_unmount(path: &Path) {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call.
    let rc = unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        let _ = std::process::Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(path)
            .status();
    }
}

/// The descriptor number of a mount point written `/dev/fd/N`: libfuse's convention for a FUSE
/// connection a privileged helper opened and mounted, handed to a filesystem that may hold no
/// capability at all (mount.fuse3(8), "fd=N"; libfuse `fuse_session_mount`).
pub(super) fn fuse_fd_number(path: &Path) -> Option<RawFd> {
    path.to_str()?
        .strip_prefix("/dev/fd/")?
        .parse()
        .ok()
        .filter(|n: &RawFd| *n >= 0)
}

/// `/dev/fuse`'s device number (major 10, minor 229: Linux's
/// Documentation/admin-guide/devices.txt, "misc" character devices).
const FUSE_DEVICE: (u32, u32) = (10, 229);

/// Takes descriptor `fd` over as the FUSE connection, after checking that it is an open
/// `/dev/fuse`. It is looked at through `/proc/self/fd/N`, which reaches the open file itself:
/// inside a container the path `/dev/fuse` may not exist, and the descriptor can't be reopened.
pub(super) fn take_fuse_fd(fd: RawFd) -> Result<OwnedFd, MountError> {
    let refused = |reason: String| MountError::FuseFd { fd, reason };
    let meta = std::fs::metadata(format!("/proc/self/fd/{fd}"))
        .map_err(|e| refused(format!("not an open descriptor of this process ({e})")))?;
    let rdev = meta.rdev();
    if !meta.file_type().is_char_device() || (libc::major(rdev), libc::minor(rdev)) != FUSE_DEVICE {
        return Err(refused("it is open, but not on /dev/fuse".to_owned()));
    }
    // SAFETY: `fd` is open in this process (checked above), inherited from the parent as the
    // FUSE connection, and nothing else in keepfs knows its number: this is its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_table_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        assert_eq!(unescape_mount_path("/x\\134y"), "/x\\y");
    }

    #[test]
    fn fuse_descriptors() {
        assert_eq!(fuse_fd_number(Path::new("/dev/fd/3")), Some(3));
        assert_eq!(fuse_fd_number(Path::new("/dev/fd/x")), None);
        assert_eq!(fuse_fd_number(Path::new("/dev/fd/-1")), None);
        assert_eq!(fuse_fd_number(Path::new("/mnt/dev/fd/3")), None);
        // Not open, and open on something else: refused, saying which.
        let closed = take_fuse_fd(1_000_000).unwrap_err().to_string();
        assert!(closed.contains("not an open descriptor"), "{closed}");
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let other = take_fuse_fd(std::os::fd::AsRawFd::as_raw_fd(&file))
            .unwrap_err()
            .to_string();
        assert!(other.contains("not on /dev/fuse"), "{other}");
    }

    #[test]
    fn mountpoint_checks() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        assert!(matches!(
            check_mountpoint(&missing),
            Err(MountError::MountpointMissing(_))
        ));
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            check_mountpoint(&file),
            Err(MountError::MountpointNotDirectory(_))
        ));
        assert!(check_mountpoint(dir.path()).is_ok());
        // Another filesystem's mount point (a container volume, here procfs) is mounted over.
        assert!(check_mountpoint(Path::new("/proc")).is_ok());
    }
}
