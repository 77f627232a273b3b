//! Opening a cache directory: the dirty files its journal records describe, found again with
//! exactly their acknowledged bytes; data files no record names are removed.

use std::fs::OpenOptions;
use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::table::{DirtyFile, Journalled, Table, new_fid};
use super::{DirtyAttr, DirtyFiles, new_origin, now_id};
use crate::cache::CacheDir;
use crate::cache::journal::{FileRecord, Journal};
use crate::write::local::{CacheUsage, LocalData};
use crate::write::resume::PendingUploads;
use crate::write::tombstones::Tombstones;

pub(super) fn to_ns(t: SystemTime) -> i128 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

fn from_ns(ns: i128) -> SystemTime {
    if ns >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs() as u64)
    }
}

impl DirtyAttr {
    /// The attributes a journal record holds.
    pub(super) fn of_record(record: &FileRecord) -> Self {
        DirtyAttr {
            size: record.size,
            mode: record.mode,
            uid: record.uid,
            gid: record.gid,
            mtime: from_ns(record.mtime_ns),
            // Older records carry no atime/ctime: the mtime stands in.
            atime: from_ns(record.atime_ns.unwrap_or(record.mtime_ns)),
            ctime: from_ns(record.ctime_ns.unwrap_or(record.mtime_ns)),
        }
    }
}

impl DirtyFiles {
    /// Opens the dirty files the journal describes. Returns them with the keys to upload.
    pub fn open(cache: &CacheDir) -> io::Result<(Self, Vec<String>)> {
        let journal = Journal::new(cache);
        let data_dir = cache.data_dir();
        let loaded = journal.load()?;
        let usage = Arc::new(CacheUsage::default());
        let mut files = Table::default();
        let mut max_id = 0;
        for record in loaded.records {
            max_id = max_id.max(record.id);
            let path = data_dir.join(format!("{:016x}", record.id));
            let data = match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(key = record.key, path = %path.display(), error = %e, "journal record without its data file; left in place");
                    continue;
                }
            };
            // The record is written after the data is synced, so the data holds at least
            // `size` bytes; anything beyond was written after the last close and is dropped.
            data.set_len(record.size)?;
            let record_copy = record.clone();
            let attr = DirtyAttr::of_record(&record);
            let data = LocalData::new(data, record.coverage, record.base_etag, usage.clone());
            let durable_size = record.size;
            let older = files.insert(
                record.key.clone(),
                DirtyFile {
                    fid: new_fid(),
                    handles: 0,
                    id: record.id,
                    attr,
                    data: Arc::new(data),
                    writers: 0,
                    generation: 0,
                    in_s3: None,
                    record: Arc::new(Mutex::new(Journalled::Record(Box::new(record_copy)))),
                    durable_size,
                    retired: Vec::new(),
                    origin: record.origin.unwrap_or_else(new_origin),
                    // The previous run may have been uploading it when it died.
                    upload_started: true,
                    dirty_since: std::time::Instant::now(),
                },
            );
            // Records come oldest first: an older one for the same key is a copy-on-write's
            // predecessor, or the file a rename replaced, whose removal a crash interrupted
            // (its data file goes as an orphan).
            if let Some(older) = older {
                journal.remove(older.id)?;
            }
        }
        remove_orphans(&data_dir, &files)?;
        let mut keys: Vec<String> = files.keys().cloned().collect();
        // Tombstones stay also under keys the journal holds a file for again: the uploader
        // clears them (after the grace) before that file's upload, so that an upload of the
        // older file the killed process may have started can't land over it.
        let tombstones = Tombstones::open(cache, files.keys().cloned())?;
        let mut gone = std::collections::HashSet::new();
        for key in tombstones.all() {
            if files.get(&key).is_none() {
                gone.insert(key.clone());
                keys.push(key);
            }
        }
        if !keys.is_empty() {
            tracing::info!(
                files = keys.len(),
                "journal: resuming uploads of dirty files"
            );
        }
        Ok((
            DirtyFiles {
                data_dir,
                journal,
                pending_uploads: PendingUploads::new(cache),
                files: Mutex::new(files),
                next_id: AtomicU64::new(max_id.max(now_id()) + 1),
                usage,
                gone: Mutex::new(gone),
                tombstones,
            },
            keys,
        ))
    }
}

/// Deletes data files no record describes: files created but never closed or fsync'd before a
/// crash (their bytes were never acknowledged), or whose record was removed just before.
fn remove_orphans(data_dir: &std::path::Path, files: &Table) -> io::Result<()> {
    let live: std::collections::HashSet<String> =
        files.values().map(|f| format!("{:016x}", f.id)).collect();
    for entry in std::fs::read_dir(data_dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !live.contains(&name) {
            tracing::debug!(file = name, "removing unacknowledged data file");
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}
