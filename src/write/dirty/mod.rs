//! Dirty files: local copies in the cache directory that are newer than S3.
//!
//! Each has a data file `data/<id>` and a journal record. `persist` (called by `close` and
//! `fsync`) fsyncs the data and then writes the record atomically, so after a crash every file
//! whose close or fsync returned is found again with exactly the bytes it had then.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

mod names;
mod recovery;
mod snapshot;
mod table;

use recovery::to_ns;
pub use snapshot::{UploadOutcome, UploadSnapshot};
use table::{DirtyFile, Discard, Journalled, Table, new_fid};

use super::local::{CacheUsage, Coverage, LocalData};
use super::resume::PendingUploads;
use super::tombstones::Tombstones;
use crate::cache::journal::{FileRecord, Journal, RECORD_VERSION, RecordState};

/// What `stat` shows for a dirty file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyAttr {
    pub size: u64,
    /// `st_mode` including the file type bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    /// Last access as set by `utimensat`.
    pub atime: SystemTime,
    /// Last change of data or metadata (the time of the last write, rename or setattr).
    pub ctime: SystemTime,
}

impl DirtyAttr {
    /// Attributes of a file made now: every time is `now`.
    pub fn new(mode: u32, uid: u32, gid: u32, now: SystemTime) -> Self {
        DirtyAttr {
            size: 0,
            mode,
            uid,
            gid,
            mtime: now,
            atime: now,
            ctime: now,
        }
    }
}

/// Identity of a dirty file for its open handles, stable across renames (the data file id
/// changes with copy-on-write; the key with renames). In memory only.
pub type FileId = u64;

pub struct DirtyFiles {
    data_dir: PathBuf,
    journal: Journal,
    /// Multipart uploads in progress, for resuming them after a restart.
    pending_uploads: PendingUploads,
    files: Mutex<Table>,
    next_id: AtomicU64,
    usage: Arc<CacheUsage>,
    /// Keys whose local copy went away while an upload may have been running (see
    /// [`DirtyFiles::is_gone`]).
    gone: Mutex<std::collections::HashSet<String>>,
    /// The durable side of `gone`, where an upload may have been in flight.
    tombstones: Tombstones,
}

impl DirtyFiles {
    /// Files not yet in S3 (uploading, or still open: a close may come any moment, and the
    /// kernel reports it after `close()` has returned), and their bytes.
    pub fn pending(&self) -> (usize, u64) {
        let (files, bytes) = self
            .files()
            .values()
            .filter(|f| !f.uploaded())
            .fold((0, 0), |(n, bytes), f| (n + 1, bytes + f.attr.size));
        // A tombstone still to clear: S3 may hold an object that must go.
        (files + self.tombstones.count(), bytes)
    }

    /// How long the oldest change not yet in S3 has waited (`None` when S3 holds every file).
    pub fn oldest_pending(&self) -> Option<std::time::Duration> {
        self.files()
            .values()
            .filter(|f| !f.uploaded())
            .map(|f| f.dirty_since.elapsed())
            .max()
    }

    /// Keys of the files directly in directory `dir_prefix` (`""` or ending in `/`) that have
    /// no journal record yet: created (or opened for writing) and neither closed nor fsync'd.
    /// What a directory fsync must make durable.
    pub fn unjournalled_in(&self, dir_prefix: &str) -> Vec<String> {
        let in_dir: Vec<(String, Arc<Mutex<Journalled>>)> = self
            .files()
            .iter()
            .filter(|(key, _)| {
                key.strip_prefix(dir_prefix)
                    .is_some_and(|name| !name.is_empty() && !name.contains('/'))
            })
            .map(|(key, f)| (key.clone(), f.record.clone()))
            .collect();
        // The table's lock is released first: `persist` takes a record's lock, then the table's.
        in_dir
            .into_iter()
            .filter(|(_, record)| {
                matches!(
                    *record.lock().unwrap_or_else(|e| e.into_inner()),
                    Journalled::Nothing
                )
            })
            .map(|(key, _)| key)
            .collect()
    }

    /// Files open for writing now (their upload waits for the last close).
    pub fn open_for_writing(&self) -> usize {
        self.files()
            .values()
            .filter(|f| f.writers > 0 && !f.uploaded())
            .count()
    }

    /// Whether file `fid` has a handle open for writing: its changes become durable when that
    /// handle is closed or fsync'd, not before.
    pub fn has_writers(&self, fid: FileId) -> bool {
        self.with_id(fid, |f, _| Ok(f.writers > 0)).unwrap_or(false)
    }

    /// Multipart uploads in progress (see [`PendingUploads`]).
    pub fn pending_uploads(&self) -> &PendingUploads {
        &self.pending_uploads
    }

    /// Whether data file `id` belongs to a dirty file.
    pub fn has_data_file(&self, id: u64) -> bool {
        self.files().values().any(|f| f.id == id)
    }

    /// Bytes the local copies hold in the cache directory.
    pub fn cache_bytes(&self) -> u64 {
        self.usage.bytes()
    }

    /// (total, available) bytes of the filesystem holding the cache directory: what can still
    /// be written before the cache disk is full.
    pub fn disk_space(&self) -> io::Result<(u64, u64)> {
        crate::cache::disk_space(&self.data_dir)
    }

    fn files(&self) -> std::sync::MutexGuard<'_, Table> {
        // Every mutation under this lock is a plain field update: poisoning can't break it.
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a local copy of `key` (replacing a previous one) holding `initial`, as a change
    /// to nothing: a new file, or an object opened with `O_TRUNC`. Nothing is durable until
    /// [`DirtyFiles::persist`].
    pub fn create(
        &self,
        key: &str,
        attr: DirtyAttr,
        base_etag: Option<String>,
        initial: &[u8],
    ) -> io::Result<DirtyAttr> {
        let data = self.new_data(Coverage::default(), base_etag, 0)?;
        data.1.write_at(initial, 0)?;
        let attr = DirtyAttr {
            size: initial.len() as u64,
            ..attr
        };
        Ok(self.install(key, data, attr))
    }

    /// Starts a local copy of `key` that edits base object version `base_etag` of `size`
    /// bytes without downloading it: its bytes are fetched on first touch.
    pub fn edit(
        &self,
        key: &str,
        attr: DirtyAttr,
        base_etag: String,
        size: u64,
    ) -> io::Result<DirtyAttr> {
        let data = self.new_data(Coverage::of_base(size), Some(base_etag), size)?;
        let attr = DirtyAttr { size, ..attr };
        Ok(self.install(key, data, attr))
    }

    /// A new, empty data file and its id.
    fn new_data_file(&self) -> io::Result<(u64, std::fs::File)> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let file = crate::cache::private_file()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.data_dir.join(format!("{id:016x}")))?;
        Ok((id, file))
    }

    /// Copy-on-write: before bytes from `from` on are changed, a file whose last record
    /// acknowledged bytes there moves to a copy of its data file. The original stays, untouched,
    /// with its record until the copy is journalled, so a crash in between shows exactly what
    /// was acknowledged. Appends beyond the recorded size need no copy.
    fn protect_acknowledged(&self, f: &mut DirtyFile, from: u64) -> io::Result<()> {
        if from >= f.durable_size {
            return Ok(());
        }
        let (id, file) = self.new_data_file()?;
        if let Err(e) = f.data.copy_into(file) {
            let _ = std::fs::remove_file(self.data_dir.join(format!("{id:016x}")));
            return Err(e);
        }
        f.retired.push(f.id);
        f.id = id;
        f.durable_size = 0;
        Ok(())
    }

    fn new_data(
        &self,
        coverage: Coverage,
        base_etag: Option<String>,
        size: u64,
    ) -> io::Result<(u64, LocalData)> {
        let (id, file) = self.new_data_file()?;
        file.set_len(size)?;
        Ok((
            id,
            LocalData::new(file, coverage, base_etag, self.usage.clone()),
        ))
    }

    fn install(&self, key: &str, (id, data): (u64, LocalData), attr: DirtyAttr) -> DirtyAttr {
        // The name is back; a tombstone of the key stays until the uploader has made sure the
        // old file's upload can't land any more (before this file's upload starts): cleared
        // now, a crash would let that upload land over or instead of this file.
        self.gone().remove(key);
        let mut files = self.files();
        let old = files.insert(
            key.to_owned(),
            DirtyFile {
                fid: new_fid(),
                handles: 0,
                id,
                attr: attr.clone(),
                data: Arc::new(data),
                writers: 0,
                generation: 1,
                in_s3: None,
                record: Arc::default(),
                durable_size: 0,
                retired: Vec::new(),
                origin: new_origin(),
                upload_started: false,
                dirty_since: std::time::Instant::now(),
            },
        );
        let discard = old.map(|old| files.unlink(old));
        drop(files);
        if let Some(discard) = discard {
            self.discard(discard);
        }
        attr
    }

    pub fn attr(&self, key: &str) -> Option<DirtyAttr> {
        self.files().get(key).map(|f| f.attr.clone())
    }

    /// `key`'s attributes when it stopped being dirty here (its last version uploaded, no
    /// handle open), if that was at or after `asked`: an answer from S3 to a request sent at
    /// `asked` may describe the version before this mount's last one, and a listing taken then
    /// may hold the file's attributes from before its last write. Remembered for 5 minutes
    /// (the last 20 000 keys).
    pub fn left_since(&self, key: &str, asked: std::time::Instant) -> Option<DirtyAttr> {
        self.files().departures.since(key, asked)
    }

    /// Forgets when `key` left (see [`DirtyFiles::left_since`]): its name was renamed over or
    /// unlinked, and what it was says nothing about what is there now.
    pub fn forget_departure(&self, key: &str) {
        self.files().departures.forget(key);
    }

    /// Dirty keys that start with `prefix`, with their attributes.
    /// Whether any dirty file's key starts with `prefix`.
    pub fn any_under(&self, prefix: &str) -> bool {
        self.files().keys().any(|k| k.starts_with(prefix))
    }

    pub fn under(&self, prefix: &str) -> BTreeMap<String, DirtyAttr> {
        self.files()
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, f)| (k.clone(), f.attr.clone()))
            .collect()
    }

    fn with_file<T>(
        &self,
        key: &str,
        f: impl FnOnce(&mut DirtyFile) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut files = self.files();
        let file = files
            .get_mut(key)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        f(file)
    }

    fn with_id<T>(
        &self,
        fid: FileId,
        f: impl FnOnce(&mut DirtyFile, Option<String>) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut files = self.files();
        let (file, key) = files
            .by_id(fid)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        f(file, key)
    }

    /// The data of the file linked at `key`.
    pub fn data(&self, key: &str) -> io::Result<Arc<LocalData>> {
        self.with_file(key, |f| Ok(f.data.clone()))
    }

    /// Whether handles have the file linked at `key` open.
    pub fn has_handles(&self, key: &str) -> bool {
        self.files().get(key).is_some_and(|f| f.handles > 0)
    }

    /// An empty, already unlinked file in the cache directory, for a copy of an object that
    /// open handles keep reading after this mount deleted or replaced it. Nothing records it:
    /// it goes with its last descriptor (or, after a crash, with the process).
    pub fn scratch_file(&self) -> io::Result<std::fs::File> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let path = self.data_dir.join(format!("{id:016x}"));
        let file = crate::cache::private_file()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        std::fs::remove_file(&path)?;
        Ok(file)
    }

    /// A complete local copy held in `file` (see [`DirtyFiles::scratch_file`]).
    pub fn detached_data(&self, file: std::fs::File) -> Arc<LocalData> {
        Arc::new(LocalData::new(
            file,
            Coverage::default(),
            None,
            self.usage.clone(),
        ))
    }

    /// Makes a complete copy `data` (see [`DirtyFiles::detached_data`]) of a replaced or
    /// unlinked object an unlinked file with one handle held by the caller: it lives until that
    /// handle is [`DirtyFiles::released`]. Never journalled, never uploaded.
    pub fn unlinked_copy(&self, data: Arc<LocalData>, attr: DirtyAttr) -> FileId {
        let fid = new_fid();
        let file = DirtyFile {
            fid,
            handles: 1,
            id: 0,
            attr,
            data,
            writers: 0,
            generation: 0,
            in_s3: None,
            record: Arc::new(Mutex::new(Journalled::Discarded)),
            durable_size: 0,
            retired: Vec::new(),
            origin: new_origin(),
            upload_started: false,
            dirty_since: std::time::Instant::now(),
        };
        self.files().unlinked.insert(fid, file);
        fid
    }

    /// The lineage (see [`FileRecord::origin`]) of the file linked at `key`.
    pub fn origin_of(&self, key: &str) -> Option<u64> {
        self.files().get(key).map(|f| f.origin)
    }

    /// The file linked at `key` now.
    pub fn id_of(&self, key: &str) -> Option<FileId> {
        self.files().get(key).map(|f| f.fid)
    }

    /// The key file `fid` is linked at now (`None`: unlinked, or gone).
    pub fn key_of(&self, fid: FileId) -> Option<String> {
        self.files().keys.get(&fid).cloned()
    }

    /// Attributes of file `fid`, linked or not.
    pub fn attr_of(&self, fid: FileId) -> Option<DirtyAttr> {
        self.with_id(fid, |f, _| Ok(f.attr.clone())).ok()
    }

    /// Registers an open handle of file `fid` (a writer when `writer`) and returns its data,
    /// which the handle keeps open: a file read while its upload finishes (and the local copy
    /// is dropped), or after an unlink, still reads its bytes.
    pub fn opened(&self, fid: FileId, writer: bool) -> io::Result<Arc<LocalData>> {
        self.with_id(fid, |f, _| {
            f.handles += 1;
            f.writers += u32::from(writer);
            Ok(f.data.clone())
        })
    }

    /// Releases a handle of `fid`. Returns the file's key when it was the last writer of a
    /// linked file (its upload may start). An unlinked file goes with its last handle.
    pub fn released(&self, fid: FileId, writer: bool) -> Option<String> {
        let mut files = self.files();
        let (f, key) = files.by_id(fid)?;
        f.handles = f.handles.saturating_sub(1);
        if writer {
            f.writers = f.writers.saturating_sub(1);
        }
        let last_writer = writer && f.writers == 0;
        // Uploaded while open: with the last handle the local copy can go (the uploader
        // finds it in S3 and drops it).
        let settle = f.handles == 0 && f.uploaded();
        match key {
            Some(key) => (last_writer || settle).then_some(key),
            None => {
                if f.handles == 0 {
                    files.unlinked.remove(&fid);
                }
                None
            }
        }
    }

    /// Writes to file `fid` (linked or unlinked: an unlinked file keeps taking writes, like on
    /// a local disk) and updates its attributes.
    pub fn write(&self, fid: FileId, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let data = self.with_id(fid, |f, _| {
            self.protect_acknowledged(f, offset)?;
            Ok(f.data.clone())
        })?;
        data.write_at(bytes, offset)?;
        self.with_id(fid, |f, _| {
            f.attr.size = f.attr.size.max(offset + bytes.len() as u64);
            f.attr.mtime = SystemTime::now();
            f.attr.ctime = f.attr.mtime;
            f.changed();
            Ok(())
        })
    }

    /// Makes file `fid` durable if it is linked (an unlinked file has nothing to keep).
    pub fn persist_id(&self, fid: FileId) -> io::Result<()> {
        match self.key_of(fid) {
            Some(key) => self.persist(&key),
            None if self.attr_of(fid).is_some() => Ok(()),
            None => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }

    /// Applies a `setattr` to file `fid`: size (truncate or extend with zeros), mode bits,
    /// owner, mtime, atime. Any change sets ctime to now.
    #[allow(clippy::too_many_arguments)]
    pub fn set_attr(
        &self,
        fid: FileId,
        size: Option<u64>,
        perm: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        mtime: Option<SystemTime>,
        atime: Option<SystemTime>,
    ) -> io::Result<DirtyAttr> {
        self.with_id(fid, |f, _| {
            let now = SystemTime::now();
            if let Some(size) = size {
                self.protect_acknowledged(f, size)?;
                f.data.set_len(size)?;
                f.attr.size = size;
                f.attr.mtime = now;
            }
            f.attr.ctime = now;
            f.attr.atime = atime.unwrap_or(f.attr.atime);
            if let Some(perm) = perm {
                f.attr.mode = (f.attr.mode & !0o7777) | (perm & 0o7777);
            }
            f.attr.uid = uid.unwrap_or(f.attr.uid);
            f.attr.gid = gid.unwrap_or(f.attr.gid);
            f.attr.mtime = mtime.unwrap_or(f.attr.mtime);
            f.changed();
            Ok(f.attr.clone())
        })
    }

    /// Makes the file's current content and attributes durable on the cache disk.
    pub fn persist(&self, key: &str) -> io::Result<()> {
        let (data, journalled, mut record) = self.with_file(key, |f| {
            Ok((
                f.data.clone(),
                f.record.clone(),
                FileRecord {
                    version: RECORD_VERSION,
                    id: f.id,
                    key: key.to_owned(),
                    size: f.attr.size,
                    mode: f.attr.mode,
                    uid: f.attr.uid,
                    gid: f.attr.gid,
                    mtime_ns: to_ns(f.attr.mtime),
                    atime_ns: Some(to_ns(f.attr.atime)),
                    ctime_ns: Some(to_ns(f.attr.ctime)),
                    base_etag: None,
                    coverage: Coverage::default(),
                    origin: Some(f.origin),
                    seq: 0, // the journal numbers it
                    state: RecordState::Dirty,
                },
            ))
        })?;
        record.coverage = data.sync()?;
        let mut journalled = journalled.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*journalled, Journalled::Discarded) {
            return Ok(()); // unlinked or replaced meanwhile
        }
        record.base_etag = data.base_etag();
        self.journal.put(&record)?;
        // The new record is durable: the copies it replaces can go (record first).
        let retired = self
            .with_file(key, |f| {
                if f.id == record.id {
                    f.durable_size = record.size;
                    Ok(std::mem::take(&mut f.retired))
                } else {
                    Ok(Vec::new())
                }
            })
            .unwrap_or_default();
        *journalled = Journalled::Record(Box::new(record));
        drop(journalled);
        for id in retired {
            self.remove_record_and_data(id);
        }
        Ok(())
    }

    /// Deletes a record and its data file; the record goes first, so a crash in between leaves
    /// an orphan data file, never a record without data.
    fn discard(&self, discard: Discard) {
        let mut journalled = discard.record.lock().unwrap_or_else(|e| e.into_inner());
        *journalled = Journalled::Discarded;
        for id in discard.ids {
            self.remove_record_and_data(id);
        }
    }

    fn remove_record_and_data(&self, id: u64) {
        if let Err(e) = self.journal.remove(id) {
            tracing::error!(id, error = %e, "could not remove journal record");
            return;
        }
        let _ = std::fs::remove_file(self.data_dir.join(format!("{id:016x}")));
    }
}

/// A random lineage id for a new file (see [`FileRecord::origin`]).
fn new_origin() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS; mixing in the clock and a counter makes every call
    // differ.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// Ids start from the clock so a fresh journal never reuses the name of an orphaned data file.
fn now_id() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheDir;

    fn attr() -> DirtyAttr {
        DirtyAttr::new(
            libc::S_IFREG | 0o644,
            1,
            2,
            SystemTime::UNIX_EPOCH + Duration::from_secs(5),
        )
    }

    #[test]
    fn only_persisted_files_and_bytes_survive_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let cache = CacheDir::open(tmp.path()).unwrap();
            let (dirty, pending) = DirtyFiles::open(&cache).unwrap();
            assert!(pending.is_empty());
            dirty.create("kept", attr(), None, b"hello").unwrap();
            dirty.persist("kept").unwrap();
            // Written after the last persist: not acknowledged, so not promised.
            let fid = dirty.id_of("kept").unwrap();
            dirty.write(fid, 5, b" world").unwrap();
            dirty.create("never-closed", attr(), None, b"lost").unwrap();
        }
        let cache = CacheDir::open(tmp.path()).unwrap();
        let (dirty, pending) = DirtyFiles::open(&cache).unwrap();
        assert_eq!(pending, vec!["kept".to_string()]);
        let data = dirty.data("kept").unwrap();
        assert_eq!(data.read(0, 100).unwrap(), b"hello");
        assert_eq!(dirty.attr("kept").unwrap().mode, libc::S_IFREG | 0o644);
        assert!(dirty.attr("never-closed").is_none());
        let files = std::fs::read_dir(cache.data_dir()).unwrap().count();
        assert_eq!(files, 1, "the unacknowledged data file is removed");
    }

    #[test]
    fn overwriting_acknowledged_bytes_copies_first() {
        let tmp = tempfile::tempdir().unwrap();
        let files_on_disk = |cache: &CacheDir| {
            (
                std::fs::read_dir(cache.data_dir()).unwrap().count(),
                Journal::new(cache).load().unwrap().records.len(),
            )
        };
        {
            let cache = CacheDir::open(tmp.path()).unwrap();
            let (dirty, _) = DirtyFiles::open(&cache).unwrap();
            dirty.create("k", attr(), None, b"hello world").unwrap();
            dirty.persist("k").unwrap();
            let data = dirty.data("k").unwrap();
            let fid = dirty.id_of("k").unwrap();
            // Reopened and changed in place, then a crash before close: not acknowledged.
            dirty.write(fid, 0, b"HELLO").unwrap();
            dirty
                .set_attr(fid, Some(8), None, None, None, None, None)
                .unwrap();
            assert_eq!(data.read(0, 100).unwrap(), b"HELLO wo");
            assert_eq!(files_on_disk(&cache), (2, 1), "a copy beside the original");
        }
        let cache = CacheDir::open(tmp.path()).unwrap();
        {
            let (dirty, _) = DirtyFiles::open(&cache).unwrap();
            let data = dirty.data("k").unwrap();
            assert_eq!(
                data.read(0, 100).unwrap(),
                b"hello world",
                "the acknowledged bytes"
            );
            assert_eq!(
                files_on_disk(&cache),
                (1, 1),
                "the unacknowledged copy is gone"
            );
            dirty.write(dirty.id_of("k").unwrap(), 6, b"WORLD").unwrap();
            dirty.persist("k").unwrap();
            assert_eq!(
                files_on_disk(&cache),
                (1, 1),
                "the original goes once the copy is journalled"
            );
        }
        let (dirty, _) = DirtyFiles::open(&cache).unwrap();
        let data = dirty.data("k").unwrap();
        assert_eq!(data.read(0, 100).unwrap(), b"hello WORLD");
        // Appends beyond the acknowledged size need no copy.
        dirty.write(dirty.id_of("k").unwrap(), 11, b"!").unwrap();
        assert_eq!(files_on_disk(&cache), (1, 1));
    }

    #[test]
    fn handles_follow_renames_and_keep_unlinked_files() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(tmp.path()).unwrap();
        let (dirty, _) = DirtyFiles::open(&cache).unwrap();
        dirty.create("log", attr(), None, b"one ").unwrap();
        let fid = dirty.id_of("log").unwrap();
        dirty.opened(fid, true).unwrap();
        assert!(dirty.rename("log", "log.1", None).unwrap());
        dirty.write(fid, 4, b"two").unwrap();
        assert_eq!(dirty.key_of(fid).as_deref(), Some("log.1"));
        dirty.persist_id(fid).unwrap();
        assert_eq!(dirty.released(fid, true).as_deref(), Some("log.1"));
        assert_eq!(
            dirty.data("log.1").unwrap().read(0, 100).unwrap(),
            b"one two"
        );

        // Unlinked while open: readable and writable until the last handle, never journalled.
        dirty.create("pid", attr(), None, b"12").unwrap();
        let pid = dirty.id_of("pid").unwrap();
        let data = dirty.opened(pid, true).unwrap();
        assert!(dirty.remove("pid"));
        dirty.write(pid, 2, b"34").unwrap();
        dirty.persist_id(pid).unwrap();
        assert_eq!(dirty.attr_of(pid).map(|a| a.size), Some(4));
        assert_eq!(data.read(0, 10).unwrap(), b"1234");
        assert_eq!(dirty.released(pid, true), None);
        assert!(dirty.attr_of(pid).is_none(), "gone with its last handle");
        let (reopened, pending) = DirtyFiles::open(&cache).unwrap();
        assert_eq!(pending, vec!["log.1".to_string()]);
        assert!(reopened.attr("pid").is_none());
    }

    #[test]
    fn upload_outcomes() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(tmp.path()).unwrap();
        let (dirty, _) = DirtyFiles::open(&cache).unwrap();
        dirty.create("k", attr(), None, b"v1").unwrap();
        dirty.persist("k").unwrap();
        let first = dirty.snapshot("k").unwrap();
        dirty.write(dirty.id_of("k").unwrap(), 0, b"v2").unwrap();
        assert_eq!(dirty.uploaded(&first, "\"e1\""), UploadOutcome::Changed);
        let second = dirty.snapshot("k").unwrap();
        assert_eq!(dirty.uploaded(&second, "\"e2\""), UploadOutcome::Clean);
        assert!(dirty.attr("k").is_none());
        assert!(Journal::new(&cache).load().unwrap().records.is_empty());
        dirty.create("gone", attr(), None, b"x").unwrap();
        let snap = dirty.snapshot("gone").unwrap();
        dirty.remove("gone");
        assert_eq!(dirty.uploaded(&snap, "\"e3\""), UploadOutcome::Removed);
        dirty.create("again", attr(), None, b"x").unwrap();
        let old = dirty.snapshot("again").unwrap();
        dirty.remove("again");
        dirty.create("again", attr(), None, b"new").unwrap();
        assert_eq!(
            dirty.uploaded(&old, "\"e4\""),
            UploadOutcome::Changed,
            "a new file under the same key is not the one uploaded"
        );
        assert!(dirty.attr("again").is_some());
    }

    #[test]
    fn departures_tell_what_a_file_was_when_it_stopped_being_dirty() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(tmp.path()).unwrap();
        let (dirty, _) = DirtyFiles::open(&cache).unwrap();
        let before = std::time::Instant::now();
        dirty.create("log", attr(), None, b"one").unwrap();
        dirty
            .write(dirty.id_of("log").unwrap(), 3, b" two")
            .unwrap();
        dirty.persist("log").unwrap();
        assert_eq!(dirty.left_since("log", before), None, "still dirty");
        let snapshot = dirty.snapshot("log").unwrap();
        assert_eq!(dirty.uploaded(&snapshot, "\"e1\""), UploadOutcome::Clean);
        let left = dirty
            .left_since("log", before)
            .expect("left after `before`");
        assert_eq!(left.size, 7, "its size when its last version was uploaded");
        let after = std::time::Instant::now();
        assert_eq!(dirty.left_since("log", after), None, "asked after it left");
        assert_eq!(dirty.left_since("other", before), None);
    }

    #[test]
    fn departures_are_bounded() {
        let mut departures = table::Departures::default();
        for i in 0..table::Departures::KEPT + 10 {
            departures.record(&format!("k{}", i % (table::Departures::KEPT + 5)), &attr());
        }
        assert!(departures.len() <= table::Departures::KEPT);
        // The newest is kept; the key recorded first and not since is not.
        let long_ago = std::time::Instant::now() - std::time::Duration::from_secs(1);
        assert!(departures.since("k4", long_ago).is_some());
        assert!(departures.since("k7", long_ago).is_none());
    }
}
