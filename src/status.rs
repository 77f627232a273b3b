//! `keepfs status`: what a cache directory holds, read without taking it over, so it works
//! whether or not a mount is running on it. A running mount adds what only it knows (uploads
//! in flight, conflicts, last errors) over its control socket.

use std::fs::{File, TryLockError};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::cache::journal::Journal;
use crate::control::{self, Live};

/// A file whose local copy is newer than S3.
#[derive(Debug, Serialize)]
pub struct PendingFile {
    pub key: String,
    pub size: u64,
    /// Whether it edits an object already in S3 (else it is new).
    pub edits_existing: bool,
}

/// What `keepfs status` reports.
#[derive(Debug, Serialize)]
pub struct Status {
    pub cache_dir: PathBuf,
    /// pid of the keepfs that owns the directory, if one is running.
    pub mounted_by: Option<u32>,
    /// Files waiting for upload (closed or fsync'd, in the journal).
    pub pending: Vec<PendingFile>,
    pub bytes_pending: u64,
    /// Journal records that could not be read (left in place for an operator).
    pub unreadable_records: Vec<String>,
    /// What the running mount reports (absent when no mount runs or it does not answer).
    pub live: Option<Live>,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("{0} is not a keepfs cache directory (no FORMAT file)")]
    NotCacheDir(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Reads the status of cache directory `dir`.
pub fn read(dir: &Path) -> Result<Status, StatusError> {
    if !dir.join("FORMAT").is_file() {
        return Err(StatusError::NotCacheDir(dir.to_owned()));
    }
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| StatusError::Io { path, source }
    };
    let mounted_by = lock_holder(&dir.join("lock")).map_err(io(&dir.join("lock")))?;
    let loaded = Journal::read_only(dir)
        .load()
        .map_err(io(&dir.join("journal")))?;
    // A copy-on-write can leave two records of one key for a moment: the newest counts.
    let mut newest = std::collections::BTreeMap::new();
    for record in loaded.records {
        newest.insert(record.key.clone(), record);
    }
    let pending: Vec<PendingFile> = newest
        .into_values()
        .map(|r| PendingFile {
            key: r.key,
            size: r.size,
            edits_existing: r.base_etag.is_some(),
        })
        .collect();
    let live = mounted_by.and_then(|_| control::ask_status(dir));
    Ok(Status {
        cache_dir: dir.to_owned(),
        mounted_by,
        live,
        bytes_pending: pending.iter().map(|f| f.size).sum(),
        pending,
        unreadable_records: loaded
            .unreadable
            .into_iter()
            .map(|(path, why)| format!("{}: {why}", path.display()))
            .collect(),
    })
}

/// The pid in the lock file if a process holds the lock. A shared lock is enough to find out
/// and is dropped at once.
pub fn lock_holder(path: &Path) -> std::io::Result<Option<u32>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(None),
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            file.read_to_string(&mut text)?;
            Ok(text.trim().parse().ok())
        }
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// The status as text for people.
pub fn render(status: &Status) -> String {
    let mut out = format!("cache directory: {}\n", status.cache_dir.display());
    out += &match status.mounted_by {
        Some(pid) => format!("mounted by keepfs pid {pid} (it uploads pending files)\n"),
        None => "not mounted (pending files are uploaded by the next mount)\n".to_owned(),
    };
    out += &format!(
        "pending upload: {} file(s), {} bytes\n",
        status.pending.len(),
        status.bytes_pending
    );
    for f in &status.pending {
        let what = if f.edits_existing { "edit" } else { "new" };
        out += &format!("  {:>12}  {what:<4}  {}\n", f.size, f.key);
    }
    for bad in &status.unreadable_records {
        out += &format!("unreadable journal record: {bad}\n");
    }
    if let Some(live) = &status.live {
        out += &format!(
            "running mount: {} dirty file(s) ({} open for writing), {} uploading, {} conflict copies, {} bytes not re-sent by resumed uploads\n",
            live.dirty_files,
            live.open_for_writing,
            live.uploads_in_flight,
            live.conflicts,
            live.resumed_bytes
        );
        for e in &live.last_errors {
            out += &format!(
                "  upload error at {} (unix time): {}: {}\n",
                e.at, e.key, e.error
            );
        }
    } else if status.mounted_by.is_some() {
        out += "the running mount did not answer on its control socket\n";
    }
    out
}
