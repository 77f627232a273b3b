//! Errors of filesystem operations, each with the errno the kernel gets.

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotDirectory,
    #[error("is a directory")]
    IsDirectory,
    #[error("file name too long")]
    NameTooLong,
    #[error("inode {0} is not known (stale)")]
    StaleInode(u64),
    /// The inode's name now holds another file or version (replaced, unlinked): the kernel
    /// looks the name up again (`ESTALE` makes it retry the path walk with `LOOKUP_REVAL`).
    #[error("replaced since it was looked up (stale)")]
    Stale,
    #[error("file handle {0} is not open")]
    BadHandle(u64),
    #[error("invalid argument")]
    InvalidArgument,
    #[error("read-only file system")]
    ReadOnly,
    #[error("file exists")]
    Exists,
    #[error("directory not empty")]
    NotEmpty,
    /// A name keepfs keeps for itself (`.keepfs` at the root: snapshots live there).
    #[error("name reserved for keepfs (snapshots)")]
    Reserved,
    #[error("operation not supported yet: {0}")]
    NotSupported(&'static str),
    #[error("local cache: {0}")]
    Local(String, Option<i32>),
    /// An upload that close/fsync waited for (`--durability remote`) failed: EIO.
    #[error("{key}: upload failed: {source}")]
    Upload {
        key: String,
        #[source]
        source: StoreError,
    },
    #[error("{key}: {source}")]
    Store {
        key: String,
        #[source]
        source: StoreError,
    },
}

impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::NotFound => FsError::NotFound,
            _ => FsError::Local(e.to_string(), e.raw_os_error()),
        }
    }
}

impl FsError {
    pub fn store(key: &str, source: StoreError) -> Self {
        match source {
            StoreError::NotFound => FsError::NotFound,
            source => FsError::Store {
                key: key.to_owned(),
                source,
            },
        }
    }

    /// The errno reported to the application.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDirectory => libc::ENOTDIR,
            FsError::IsDirectory => libc::EISDIR,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::StaleInode(_) | FsError::Stale => libc::ESTALE,
            FsError::BadHandle(_) => libc::EBADF,
            FsError::InvalidArgument => libc::EINVAL,
            FsError::ReadOnly => libc::EROFS,
            FsError::Exists => libc::EEXIST,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::Reserved => libc::EPERM,
            FsError::NotSupported(_) => libc::EOPNOTSUPP,
            FsError::Local(_, errno) => errno.unwrap_or(libc::EIO),
            FsError::Upload { .. } => libc::EIO,
            FsError::Store { source, .. } => match source {
                StoreError::NotFound | StoreError::NoSuchBucket(_) => libc::ENOENT,
                StoreError::AccessDenied(_) | StoreError::Credentials(_) => libc::EACCES,
                _ => libc::EIO,
            },
        }
    }
}
