//! Snapshots: point-in-time, crash-consistent records of a mount, kept in its own bucket.
//!
//! A snapshot of `s3://BUCKET/PREFIX` lives under the reserved prefix
//! `PREFIX/.keepfs/snapshots/NAME/` (the mount hides `.keepfs` and refuses it as a name):
//!
//! - `manifest.json`: the [`Manifest`] — every key with its size and ETag, and its version id on
//!   a versioned bucket. Written last: a snapshot without it is incomplete and not listed as
//!   one.
//! - `data/KEY`: on an unversioned bucket, a server-side copy of each object (CopyObject, or
//!   UploadPartCopy above 5 GiB; nothing is downloaded), which keeps the bytes alive after the
//!   mount changes or deletes the object. A versioned bucket keeps them as noncurrent versions
//!   instead, so nothing is copied.
//!
//! [`take`] holds the mount's changes at a barrier and records; [`restore`] copies a snapshot
//! back; [`view`] serves one read-only (`keepfs mount --snapshot`).

pub mod manifest;
pub mod restore;
pub mod take;
pub mod view;

pub use manifest::{Entry, Manifest};
pub use take::{Barrier, Progress};
pub use view::SnapshotView;

use crate::store::StoreError;

/// The directory name at the root of a mount that holds keepfs's own objects.
pub const RESERVED_DIR: &str = ".keepfs";

/// Longest snapshot name, in bytes.
pub const NAME_MAX: usize = 100;

/// Errors of snapshot operations.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "invalid snapshot name {0:?}: use 1 to 100 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
    )]
    InvalidName(String),
    #[error("snapshot {0:?} exists already")]
    Exists(String),
    #[error("no snapshot {0:?} (no {1})")]
    NotFound(String, String),
    #[error("{what}: {source}")]
    Store {
        what: String,
        #[source]
        source: StoreError,
    },
    #[error(
        "{key} changed while it was being recorded (another writer than this mount?); nothing was kept"
    )]
    Changed { key: String },
    #[error("manifest {key} is not a keepfs snapshot manifest: {reason}")]
    Manifest { key: String, reason: String },
    #[error(
        "{target} is not empty ({count} objects); restore into an empty prefix, or give --force to replace its contents"
    )]
    TargetNotEmpty { target: String, count: usize },
    #[error("barrier: {0}")]
    Barrier(String),
}

impl SnapshotError {
    pub(crate) fn store(what: impl Into<String>, source: StoreError) -> Self {
        match source {
            StoreError::PreconditionFailed => SnapshotError::Changed { key: what.into() },
            source => SnapshotError::Store {
                what: what.into(),
                source,
            },
        }
    }
}

/// Checks a snapshot name: it becomes one key component, so it is kept to a portable set.
pub fn check_name(name: &str) -> Result<(), SnapshotError> {
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SnapshotError::InvalidName(name.to_owned()))
    }
}

/// `PREFIX/.keepfs/snapshots/` for mount prefix `prefix` (`""` or ending in `/`).
pub fn snapshots_prefix(prefix: &str) -> String {
    format!("{prefix}{RESERVED_DIR}/snapshots/")
}

/// Where snapshot `name` of `prefix` keeps everything.
pub fn snapshot_prefix(prefix: &str, name: &str) -> String {
    format!("{}{name}/", snapshots_prefix(prefix))
}

/// Its manifest's key.
pub fn manifest_key(prefix: &str, name: &str) -> String {
    format!("{}manifest.json", snapshot_prefix(prefix, name))
}

/// The key of the copy of `rel` (a key relative to `prefix`) in snapshot `name`.
pub fn data_key(prefix: &str, name: &str, rel: &str) -> String {
    format!("{}data/{rel}", snapshot_prefix(prefix, name))
}

/// Whether full key `key` is one of keepfs's own under `prefix` (never a file of the mount).
pub fn is_reserved(prefix: &str, key: &str) -> bool {
    key.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix(RESERVED_DIR))
        .is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["daily-2026-12-01", "a", "v1.2_x", &"x".repeat(100)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".hidden",
            "-flag",
            "a/b",
            "..",
            "sp ace",
            "é",
            &"x".repeat(101),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn layout() {
        assert_eq!(
            manifest_key("db/", "n1"),
            "db/.keepfs/snapshots/n1/manifest.json"
        );
        assert_eq!(
            data_key("", "n1", "a/b.txt"),
            ".keepfs/snapshots/n1/data/a/b.txt"
        );
        assert!(is_reserved("db/", "db/.keepfs/snapshots/x"));
        assert!(is_reserved("", ".keepfs/"));
        assert!(!is_reserved("db/", "db/.keepfsx/a"));
        assert!(!is_reserved("db/", "db/a/.keepfs/b"));
        assert!(!is_reserved("db/", "other/.keepfs/b"));
    }
}
