//! The cache directory: where keepfs keeps data on local disk, owned by one process at a time.
//!
//! Layout (format version [`FORMAT_VERSION`], described in docs/CACHE_FORMAT.md):
//!
//! ```text
//! DIR/            0700
//!   FORMAT        "keepfs-cache-format N"
//!   lock          held with an exclusive lock by the owning process; contains its pid
//!   journal/      one record per file the journal describes (see `journal`)
//!   data/         file contents, named by record id, never by object key
//!   uploads/      multipart uploads in progress, named by data file id (see `write::resume`)
//!   renames/      directory renames in progress (see `write::renames`)
//!   blocks/       clean blocks of objects read, named by a hash of key + ETag + index
//!   tmp/          scratch for atomic replacement (write, fsync, rename)
//! ```

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The cache directory format this keepfs writes. Older formats are upgraded or refused with a
/// clear message; newer ones are always refused (never modified).
pub const FORMAT_VERSION: u32 = 1;
const FORMAT_FILE: &str = "FORMAT";
const FORMAT_PREFIX: &str = "keepfs-cache-format ";
const LOCK_FILE: &str = "lock";
const SUBDIRS: [&str; 7] = [
    "journal", "data", "uploads", "renames", "gone", "blocks", "tmp",
];

#[derive(Debug, thiserror::Error)]
pub enum CacheDirError {
    #[error("cache directory {path} is in use by another keepfs process{} (one process per cache directory)", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    InUse { path: PathBuf, pid: Option<u32> },
    #[error(
        "cache directory {path} has format version {found}, newer than this keepfs understands ({FORMAT_VERSION}); use a newer keepfs or another --cache-dir"
    )]
    NewerFormat { path: PathBuf, found: u32 },
    #[error(
        "cache directory {path} is not a keepfs cache (unreadable {FORMAT_FILE} file: {content:?})"
    )]
    NotACache { path: PathBuf, content: String },
    #[error("cache directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CacheDirError + '_ {
    move |source| CacheDirError::Io {
        path: path.to_owned(),
        source,
    }
}

/// An open, locked cache directory. The lock is released when this is dropped (or the process
/// dies: the kernel drops the lock with the file descriptor, so a crash never leaves it stale).
#[derive(Debug)]
pub struct CacheDir {
    path: PathBuf,
    _lock: File,
}

impl CacheDir {
    /// Creates (0700) or opens `path`, takes its lock, and checks or writes its format.
    pub fn open(path: &Path) -> Result<Self, CacheDirError> {
        create_private_dir(path)?;
        let lock = lock(path)?;
        check_format(path)?;
        for sub in SUBDIRS {
            create_private_dir(&path.join(sub))?;
        }
        Ok(CacheDir {
            path: path.to_owned(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn journal_dir(&self) -> PathBuf {
        self.path.join("journal")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.path.join("data")
    }

    pub fn renames_dir(&self) -> PathBuf {
        self.path.join("renames")
    }

    pub fn gone_dir(&self) -> PathBuf {
        self.path.join("gone")
    }

    pub fn blocks_dir(&self) -> PathBuf {
        self.path.join("blocks")
    }

    pub fn uploads_dir(&self) -> PathBuf {
        self.path.join("uploads")
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.path.join("tmp")
    }
}

/// Creates `path` (and parents) as 0700, or tightens an existing directory to 0700: the cache
/// holds other people's data in plain files.
fn create_private_dir(path: &Path) -> Result<(), CacheDirError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io_error(path))?;
    let meta = fs::metadata(path).map_err(io_error(path))?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "cache directory was accessible to others; setting mode 0700");
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io_error(path))?;
    }
    Ok(())
}

/// Options that create files as 0600 (owner only), whatever the process's umask: every file in
/// a cache directory holds data or state of the mount's owner, and a wrong mode on the
/// directory (or a bind mount of a subdirectory) must expose none of it.
pub fn private_file() -> OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = OpenOptions::new();
    options.mode(0o600);
    options
}

/// How long opening a cache directory waits for another process to let go of it.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

fn lock(dir: &Path) -> Result<File, CacheDirError> {
    let path = dir.join(LOCK_FILE);
    let mut file = private_file()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_error(&path))?;
    // A keepfs just unmounted (`umount` returns before its process has finished) lets go
    // within a second or two: `umount; mount` must not fail for that.
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let mut locked = file.try_lock();
    while matches!(locked, Err(TryLockError::WouldBlock)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        locked = file.try_lock();
    }
    match locked {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(CacheDirError::InUse {
                path: dir.to_owned(),
                pid: text.trim().parse().ok(),
            });
        }
        Err(TryLockError::Error(e)) => return Err(io_error(&path)(e)),
    }
    // Record who holds it, for the message a second process prints.
    file.set_len(0).map_err(io_error(&path))?;
    file.rewind().map_err(io_error(&path))?;
    write!(file, "{}", std::process::id()).map_err(io_error(&path))?;
    Ok(file)
}

fn check_format(dir: &Path) -> Result<(), CacheDirError> {
    let path = dir.join(FORMAT_FILE);
    match fs::read_to_string(&path) {
        Ok(content) => {
            let version = content
                .trim()
                .strip_prefix(FORMAT_PREFIX)
                .and_then(|v| v.parse::<u32>().ok())
                .ok_or_else(|| CacheDirError::NotACache {
                    path: dir.to_owned(),
                    content: content.clone(),
                })?;
            if version > FORMAT_VERSION {
                return Err(CacheDirError::NewerFormat {
                    path: dir.to_owned(),
                    found: version,
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let content = format!("{FORMAT_PREFIX}{FORMAT_VERSION}\n");
            crate::cache::journal::write_atomically(dir, &path, content.as_bytes())
                .map_err(io_error(&path))
        }
        Err(e) => Err(io_error(&path)(e)),
    }
}

/// The default cache directory of a mount: under `$XDG_CACHE_HOME/keepfs` (else
/// `~/.cache/keepfs`) for users, `/var/cache/keepfs` for root, in a subdirectory named by a hash
/// of what is mounted, so different mounts never share one and the same mount finds its own
/// again after a restart.
pub fn default_cache_dir(endpoint: Option<&str>, bucket: &str, prefix: &str) -> PathBuf {
    // SAFETY: geteuid cannot fail and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    let base = if root {
        PathBuf::from("/var/cache/keepfs")
    } else if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        PathBuf::from(xdg).join("keepfs")
    } else if let Some(home) = std::env::var_os("HOME") {
        PathBuf::from(home).join(".cache/keepfs")
    } else {
        std::env::temp_dir().join("keepfs-cache")
    };
    let mut hash = Sha256::new();
    for part in [endpoint.unwrap_or("aws"), bucket, prefix] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    let digest = hash.finalize();
    let id: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    base.join(format!("{bucket}-{id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_private_layout_and_locks() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a/b/cache");
        let dir = CacheDir::open(&path).unwrap();
        for p in [
            path.clone(),
            dir.journal_dir(),
            dir.data_dir(),
            dir.tmp_dir(),
        ] {
            let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", p.display());
        }
        assert_eq!(
            fs::read_to_string(path.join(FORMAT_FILE)).unwrap(),
            format!("keepfs-cache-format {FORMAT_VERSION}\n")
        );
        match CacheDir::open(&path) {
            Err(CacheDirError::InUse { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("second open must fail as in use: {other:?}"),
        }
        drop(dir);
        CacheDir::open(&path).expect("lock released on drop");
    }

    #[test]
    fn tightens_open_permissions() {
        let tmp = tempfile::tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let _dir = CacheDir::open(tmp.path()).unwrap();
        let mode = fs::metadata(tmp.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn refuses_newer_or_foreign_formats_without_touching_them() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(FORMAT_FILE), "keepfs-cache-format 99\n").unwrap();
        assert!(matches!(
            CacheDir::open(tmp.path()),
            Err(CacheDirError::NewerFormat { found: 99, .. })
        ));
        assert!(
            !tmp.path().join("journal").exists(),
            "nothing created in a newer cache"
        );
        fs::write(tmp.path().join(FORMAT_FILE), "something else").unwrap();
        assert!(matches!(
            CacheDir::open(tmp.path()),
            Err(CacheDirError::NotACache { .. })
        ));
    }

    #[test]
    fn default_dirs_are_per_mount_and_stable() {
        let a = default_cache_dir(None, "bkt", "p/");
        assert_eq!(a, default_cache_dir(None, "bkt", "p/"));
        assert_ne!(a, default_cache_dir(None, "bkt", "q/"));
        assert_ne!(a, default_cache_dir(Some("http://x"), "bkt", "p/"));
        assert!(a.file_name().unwrap().to_str().unwrap().starts_with("bkt-"));
    }
}
