//! File attributes: what `stat` shows, derived from object metadata or the mount's defaults.

use std::time::{Duration, SystemTime};

use crate::store::ObjectMeta;

/// What a path is. A name that is both an object and a prefix is a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeKind {
    Directory,
    File,
    Symlink,
    /// A fifo, socket or device node (`mknod`): a zero-length object whose type bits
    /// (`S_IFIFO`, `S_IFSOCK`, `S_IFCHR`, `S_IFBLK`) and device number are in its metadata.
    Special {
        file_type: u32,
        rdev: u32,
    },
}

impl NodeKind {
    /// The `S_IFMT` bits of this kind.
    pub fn type_bits(self) -> u32 {
        match self {
            NodeKind::Directory => libc::S_IFDIR,
            NodeKind::File => libc::S_IFREG,
            NodeKind::Symlink => libc::S_IFLNK,
            NodeKind::Special { file_type, .. } => file_type,
        }
    }

    /// The kind `mode`'s type bits name for a node made by `mknod`, with device number `rdev`
    /// (`None`: a regular file, or not a type `mknod` makes).
    pub fn special(mode: u32, rdev: u32) -> Option<NodeKind> {
        match mode & S_IFMT {
            t @ (libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFCHR | libc::S_IFBLK) => {
                Some(NodeKind::Special { file_type: t, rdev })
            }
            _ => None,
        }
    }
}

/// Attributes as `stat` reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: NodeKind,
    pub size: u64,
    pub mtime: SystemTime,
    /// Last access as set by `utimensat` (reads don't change it: as with `noatime`).
    pub atime: SystemTime,
    /// Last change of data or metadata.
    pub ctime: SystemTime,
    /// Permission bits only (`0o7777`).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
}

/// Ownership and modes for objects that carry no metadata of their own.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
    pub dir_mode: u16,
    /// Directories have no timestamp in S3; they show the mount time.
    pub mount_time: SystemTime,
}

// s3fs-fuse compatible user metadata names (values are decimal strings).
const META_MODE: &str = "mode";
const META_UID: &str = "uid";
const META_GID: &str = "gid";
const META_MTIME: &str = "mtime";
const META_ATIME: &str = "atime";
const META_CTIME: &str = "ctime";
/// Device number of a device node (s3fs-fuse's `x-amz-meta-rdev`).
const META_RDEV: &str = "rdev";

/// The user metadata names attributes are read from: all a HEAD's answer needs to keep to
/// give them again.
pub const ATTRIBUTE_METADATA: [&str; 7] = [
    META_MODE, META_UID, META_GID, META_MTIME, META_ATIME, META_CTIME, META_RDEV,
];

/// Symlink targets longer than this are refused (Linux PATH_MAX): a larger object is never a
/// symlink.
pub const MAX_SYMLINK_TARGET: u32 = 4096;

/// Whether `attr`, known without HEAD metadata (`from_head` false), may differ from what a
/// HEAD would say: a listing gives an object's size, ETag and LastModified only, so a small
/// object holding a link target looks like a file, and the mode, owner and times keepfs keeps
/// in `x-amz-meta-*` show as the defaults and LastModified. Such attributes are never handed
/// to the kernel to keep: it would check permissions against them (a 0600 object readable by
/// others with `--allow-other`), and `tar` and `rsync` would see a file's times change once
/// something HEADs it.
pub fn unverified(attr: &Attr, from_head: bool) -> bool {
    !from_head && attr.kind == NodeKind::File
}

/// The `x-amz-meta-*` that store `mode` (type bits included), owner and mtime.
pub fn stored_metadata(
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
) -> std::collections::HashMap<String, String> {
    std::collections::HashMap::from([
        (META_MODE.to_owned(), mode.to_string()),
        (META_UID.to_owned(), uid.to_string()),
        (META_GID.to_owned(), gid.to_string()),
        (META_MTIME.to_owned(), format_mtime(mtime)),
    ])
}

/// Adds `x-amz-meta-atime` and `-ctime` (s3fs-fuse's names, same format as mtime) to
/// `meta`.
pub fn with_times(
    mut meta: std::collections::HashMap<String, String>,
    atime: SystemTime,
    ctime: SystemTime,
) -> std::collections::HashMap<String, String> {
    meta.insert(META_ATIME.to_owned(), format_mtime(atime));
    meta.insert(META_CTIME.to_owned(), format_mtime(ctime));
    meta
}

/// [`stored_metadata`] of a node of `kind`: a device node's number is kept too.
pub fn stored_metadata_of(
    kind: NodeKind,
    perm: u32,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
) -> std::collections::HashMap<String, String> {
    let mut meta = stored_metadata(kind.type_bits() | (perm & 0o7777), uid, gid, mtime);
    if let NodeKind::Special { rdev, .. } = kind {
        meta.insert(META_RDEV.to_owned(), rdev.to_string());
    }
    meta
}

/// Seconds since the epoch, with the nanoseconds as a fraction when there are any (as rclone
/// writes it; whole seconds, as s3fs writes them, otherwise). Keeping the fraction means a
/// file's mtime does not change when its upload completes, which editors check.
fn format_mtime(mtime: SystemTime) -> String {
    let since = mtime
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    match since.subsec_nanos() {
        0 => since.as_secs().to_string(),
        nanos => format!("{}.{nanos:09}", since.as_secs()),
    }
}

const S_IFMT: u32 = libc::S_IFMT;
const S_IFLNK: u32 = libc::S_IFLNK;
const S_IFDIR: u32 = libc::S_IFDIR;

impl Defaults {
    /// Attributes of a directory (inferred from a prefix or a `dir/` marker).
    pub fn directory(&self, ino: u64) -> Attr {
        Attr {
            ino,
            kind: NodeKind::Directory,
            size: 0,
            mtime: self.mount_time,
            atime: self.mount_time,
            ctime: self.mount_time,
            perm: self.dir_mode,
            uid: self.uid,
            gid: self.gid,
        }
    }

    /// Attributes of a directory with a `dir/` marker: the marker's `x-amz-meta-*` where present.
    pub fn marker(&self, ino: u64, meta: &ObjectMeta) -> Attr {
        let file = self.object(ino, meta);
        let has = |name: &str| meta.user_metadata.contains_key(name);
        Attr {
            perm: if has(META_MODE) {
                file.perm
            } else {
                self.dir_mode
            },
            mtime: if has(META_MTIME) {
                file.mtime
            } else {
                self.mount_time
            },
            atime: if has(META_ATIME) || has(META_MTIME) {
                file.atime
            } else {
                self.mount_time
            },
            ctime: if has(META_CTIME) || has(META_MTIME) {
                file.ctime
            } else {
                self.mount_time
            },
            ..Attr {
                uid: file.uid,
                gid: file.gid,
                ..self.directory(ino)
            }
        }
    }

    /// Attributes of an object: its `x-amz-meta-*` where present and parseable, defaults otherwise.
    pub fn object(&self, ino: u64, meta: &ObjectMeta) -> Attr {
        let md = &meta.user_metadata;
        let number = |name: &str| md.get(name).and_then(|v| v.trim().parse::<u32>().ok());
        let mode = number(META_MODE);
        let rdev = number(META_RDEV).unwrap_or(0);
        let special = mode.and_then(|m| NodeKind::special(m, rdev));
        let kind = match mode.map(|m| m & S_IFMT) {
            Some(S_IFLNK) => NodeKind::Symlink,
            _ if special.is_some() && meta.size == 0 => special.expect("checked"),
            // A plain object marked as a directory by another tool is still shown as a file:
            // only prefixes and `dir/` markers are directories here.
            Some(S_IFDIR) | Some(_) | None => NodeKind::File,
        };
        let time = |name: &str| md.get(name).and_then(|v| parse_mtime(v));
        let mtime = time(META_MTIME).unwrap_or(meta.last_modified);
        Attr {
            ino,
            kind,
            size: meta.size,
            mtime,
            atime: time(META_ATIME).unwrap_or(mtime),
            ctime: time(META_CTIME).unwrap_or(mtime),
            perm: mode.map(|m| (m & 0o7777) as u16).unwrap_or(self.file_mode),
            uid: number(META_UID).unwrap_or(self.uid),
            gid: number(META_GID).unwrap_or(self.gid),
        }
    }
}

/// Parses `x-amz-meta-mtime`: seconds since the epoch, optionally with a fraction.
fn parse_mtime(value: &str) -> Option<SystemTime> {
    let value = value.trim();
    let (secs, frac) = value.split_once('.').unwrap_or((value, ""));
    let secs: u64 = secs.parse().ok()?;
    let nanos = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().take(9).collect();
        let scale = 10u32.pow(9 - digits.len() as u32);
        digits.parse::<u32>().ok()? * scale
    };
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn defaults() -> Defaults {
        Defaults {
            uid: 7,
            gid: 8,
            file_mode: 0o644,
            dir_mode: 0o755,
            mount_time: SystemTime::UNIX_EPOCH,
        }
    }

    fn meta(pairs: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            size: 3,
            etag: "\"e\"".into(),
            last_modified: SystemTime::UNIX_EPOCH + Duration::from_secs(100),
            user_metadata: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
        }
    }

    #[test]
    fn defaults_apply_without_metadata() {
        let a = defaults().object(5, &meta(&[]));
        assert_eq!(
            (a.kind, a.perm, a.uid, a.gid),
            (NodeKind::File, 0o644, 7, 8)
        );
        assert_eq!(a.mtime, SystemTime::UNIX_EPOCH + Duration::from_secs(100));
    }

    #[test]
    fn metadata_overrides_defaults() {
        let a = defaults().object(
            5,
            &meta(&[
                ("mode", "33261"),
                ("uid", "1000"),
                ("gid", "50"),
                ("mtime", "12.5"),
            ]),
        );
        assert_eq!(
            (a.kind, a.perm, a.uid, a.gid),
            (NodeKind::File, 0o755, 1000, 50)
        );
        assert_eq!(
            a.mtime,
            SystemTime::UNIX_EPOCH + Duration::from_millis(12_500)
        );
    }

    #[test]
    fn mtime_round_trips_with_nanoseconds() {
        for t in [
            SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
            SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5),
            SystemTime::UNIX_EPOCH + Duration::from_secs(12),
        ] {
            assert_eq!(parse_mtime(&format_mtime(t)), Some(t));
        }
        assert_eq!(
            format_mtime(SystemTime::UNIX_EPOCH + Duration::from_secs(12)),
            "12"
        );
    }

    #[test]
    fn symlink_mode_and_garbage() {
        let a = defaults().object(5, &meta(&[("mode", "41471")])); // 0o120777
        assert_eq!(a.kind, NodeKind::Symlink);
        let b = defaults().object(5, &meta(&[("mode", "rwx"), ("mtime", "soon")]));
        assert_eq!((b.kind, b.perm), (NodeKind::File, 0o644));
        assert_eq!(b.mtime, SystemTime::UNIX_EPOCH + Duration::from_secs(100));
    }
}
