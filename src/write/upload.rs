//! The uploader: sends dirty files to S3 in the background and never drops one.
//!
//! Files up to the part size go up with one PutObject; larger ones as a multipart upload with
//! several parts in flight. A failed upload is retried with capped exponential backoff.
//! Only a completed upload replaces the object, so S3 readers see the old or the new version.
//! A multipart upload cut off by a failure or a crash is continued from the parts S3 already
//! has (see [`super::resume`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc};

use super::dirty::{DirtyFiles, UploadOutcome, UploadSnapshot};
use super::resume::{self, PendingUpload};
use crate::namespace::{stored_metadata, with_times};
use crate::store::{ObjectStore, Precondition, StoreError};

/// Upload tuning.
#[derive(Debug, Clone)]
pub struct UploadConfig {
    /// Part size of multipart uploads (grown so no upload needs more than 10 000 parts).
    pub part_size: u64,
    /// Parts in flight per file.
    pub concurrency: usize,
    /// The server refuses a PutObject whose precondition fails (see
    /// [`crate::store::probe`]): a single-request upload needs no HEAD check before it.
    pub conditional_puts: bool,
    /// What part buffers (and single-request bodies) are reserved from before they are read
    /// into memory: an upload waits for room.
    pub memory: crate::memory::MemoryBudget,
}

impl Default for UploadConfig {
    fn default() -> Self {
        Self {
            part_size: 8 << 20,
            concurrency: 16,
            conditional_puts: false,
            memory: crate::memory::MemoryBudget::unlimited(),
        }
    }
}

const MAX_PARTS: u64 = 10_000;
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Files uploaded at the same time.
const FILES_IN_FLIGHT: usize = 8;

/// Hands dirty files to the background upload loop, or uploads one at once.
pub struct Uploader<S> {
    queue: mpsc::UnboundedSender<String>,
    store: Arc<S>,
    dirty: Arc<DirtyFiles>,
    config: UploadConfig,
    locks: KeyLocks,
    stats: Arc<UploadStats>,
}

// By hand: a derive would ask `S: Clone`, and the store is shared, not cloned.
impl<S> Clone for Uploader<S> {
    fn clone(&self) -> Self {
        Uploader {
            queue: self.queue.clone(),
            store: Arc::clone(&self.store),
            dirty: Arc::clone(&self.dirty),
            config: self.config.clone(),
            locks: self.locks.clone(),
            stats: Arc::clone(&self.stats),
        }
    }
}

/// Upload failures remembered for `keepfs status`.
const FAILURES_KEPT: usize = 10;

/// What the uploader is doing, for `keepfs status` and `keepfs flush`.
#[derive(Default)]
pub struct UploadStats {
    /// Files whose upload task runs (sending, or waiting to retry).
    uploading: std::sync::atomic::AtomicUsize,
    failures: std::sync::Mutex<std::collections::VecDeque<UploadFailure>>,
    /// Wakes uploads waiting to retry (`keepfs flush`).
    retry_now: tokio::sync::Notify,
    /// Multipart upload id → refusals in a row (see [`REFUSALS_BEFORE_NEW_UPLOAD`]).
    refusals: std::sync::Mutex<HashMap<String, u32>>,
}

/// How many times in a row a multipart upload's part or completion may be refused (403 or
/// another 4xx) before keepfs gives it up and starts a new one. A refusal may be a policy
/// that a retry outlasts, which keeps the parts S3 has; or the server no longer knowing the
/// upload id (s3s-fs answers AccessDenied for an id it forgot), which no retry outlasts.
/// With the retry back-off, three refusals take about 1.4 s.
pub const REFUSALS_BEFORE_NEW_UPLOAD: u32 = 3;

/// One failed upload attempt.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UploadFailure {
    /// Seconds since the epoch.
    pub at: u64,
    pub key: String,
    pub error: String,
}

impl UploadStats {
    /// Files being uploaded (or waiting to retry) now.
    pub fn uploading(&self) -> usize {
        self.uploading.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The last failed attempts, oldest first.
    pub fn failures(&self) -> Vec<UploadFailure> {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.iter().cloned().collect()
    }

    fn failed(&self, key: &str, error: &dyn std::fmt::Display) {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() == FAILURES_KEPT {
            failures.pop_front();
        }
        failures.push_back(UploadFailure {
            at,
            key: key.to_owned(),
            error: error.to_string(),
        });
    }

    /// Counts a refusal of multipart upload `upload_id`; returns the refusals in a row so far.
    fn refused(&self, upload_id: &str) -> u32 {
        let mut refusals = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        // Ids given up another way (rewritten, unlinked files) are not removed one by one.
        if refusals.len() >= 4096 {
            refusals.clear();
        }
        let count = refusals.entry(upload_id.to_owned()).or_default();
        *count += 1;
        *count
    }

    /// Forgets the refusals of `upload_id` (it was accepted, or given up).
    fn forget_refusals(&self, upload_id: &str) {
        let mut refusals = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        refusals.remove(upload_id);
    }

    /// Uploads waiting to retry after a failure try again now.
    pub fn retry_now(&self) {
        self.retry_now.notify_waiters();
    }

    /// Waits `backoff`, or less if a retry is asked for; returns the next backoff (which a
    /// retry asked for does not reset: a server still failing is not hammered).
    async fn back_off(&self, backoff: Duration) -> Duration {
        tokio::select! {
            _ = tokio::time::sleep(backoff) => (backoff * 2).min(MAX_BACKOFF),
            _ = self.retry_now.notified() => backoff,
        }
    }
}

/// Keys being uploaded, and whether another pass was asked for meanwhile. One task per key at
/// a time: two uploads of one key could otherwise finish in the wrong order.
type Active = Arc<std::sync::Mutex<HashMap<String, bool>>>;

/// One lock per key being uploaded: the background task and `upload_now` never upload the
/// same key at once.
#[derive(Clone, Default)]
struct KeyLocks(Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>);

impl KeyLocks {
    async fn lock(&self, key: &str) -> KeyGuard {
        let lock = {
            let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(key.to_owned()).or_default().clone()
        };
        let guard = lock.clone().lock_owned().await;
        KeyGuard {
            locks: self.clone(),
            key: key.to_owned(),
            guard: Some(guard),
            lock,
        }
    }
}

struct KeyGuard {
    locks: KeyLocks,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.locks.0.lock().unwrap_or_else(|e| e.into_inner());
        // Only the map and this guard hold it: nobody waits, the entry can go.
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.key);
        }
    }
}

impl<S: ObjectStore> Uploader<S> {
    /// Starts the upload loop on the current runtime.
    pub fn start(store: Arc<S>, dirty: Arc<DirtyFiles>, config: UploadConfig) -> Self {
        let (queue, mut rx) = mpsc::unbounded_channel::<String>();
        let files = Arc::new(Semaphore::new(FILES_IN_FLIGHT));
        let active: Active = Arc::default();
        let locks = KeyLocks::default();
        let stats = Arc::new(UploadStats::default());
        let (task_store, task_dirty, task_locks) = (store.clone(), dirty.clone(), locks.clone());
        let (task_stats, task_config) = (stats.clone(), config.clone());
        tokio::spawn(async move {
            task_dirty.pending_uploads().remove_leftovers();
            abort_orphaned_uploads(&*task_store, &task_dirty).await;
            while let Some(key) = rx.recv().await {
                {
                    let mut active = active.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(again) = active.get_mut(&key) {
                        *again = true;
                        continue;
                    }
                    active.insert(key.clone(), false);
                }
                let Ok(permit) = files.clone().acquire_owned().await else {
                    return;
                };
                let (store, dirty, active) =
                    (task_store.clone(), task_dirty.clone(), active.clone());
                let (locks, stats) = (task_locks.clone(), task_stats.clone());
                let config = task_config.clone();
                tokio::spawn(async move {
                    stats
                        .uploading
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    loop {
                        let sender = Sender::new(&*store, &dirty, config.clone(), &stats);
                        upload_until_done(&sender, &locks, &key).await;
                        let mut active = active.lock().unwrap_or_else(|e| e.into_inner());
                        if active.get(&key) == Some(&true) {
                            active.insert(key.clone(), false);
                            continue;
                        }
                        active.remove(&key);
                        break;
                    }
                    stats
                        .uploading
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    drop(permit);
                });
            }
        });
        Uploader {
            queue,
            store,
            dirty,
            config,
            locks,
            stats,
        }
    }

    /// What the uploader is doing.
    pub fn stats(&self) -> Arc<UploadStats> {
        self.stats.clone()
    }

    /// Uploads waiting to retry after a failure try again now.
    pub fn retry_now(&self) {
        self.stats.retry_now();
    }

    /// Waits until no upload of `key` is running and keeps others from starting until the
    /// guard is dropped.
    pub async fn lock_key(&self, key: &str) -> impl Drop + use<S> {
        self.locks.lock(key).await
    }

    /// Queues `key` for upload (once nobody writes it; queuing twice is harmless).
    pub fn enqueue(&self, key: &str) {
        let _ = self.queue.send(key.to_owned());
    }

    /// Uploads `key` as it is now, even if it is open for writing, and returns the upload's
    /// error (one attempt; the store retries transient failures). On failure the file stays
    /// dirty and is uploaded in the background later.
    pub async fn upload_now(&self, key: &str) -> Result<(), StoreError> {
        let _guard = self.locks.lock(key).await;
        // As in the background: an older file's upload must not be able to land over this one.
        if let Some(origin) = self.dirty.tombstone(key) {
            clear_tombstone(&*self.store, &self.dirty, key, origin).await?;
            self.dirty.settled(key);
        }
        let Some(snapshot) = self.dirty.snapshot_open(key) else {
            tracing::debug!(key, "upload_now: not dirty");
            return Ok(()); // not dirty: S3 has it
        };
        tracing::debug!(key, in_s3 = snapshot.in_s3, "upload_now");
        if snapshot.in_s3 {
            return Ok(());
        }
        let sender = Sender::new(&*self.store, &self.dirty, self.config.clone(), &self.stats);
        let etag = match upload_resolving_conflict(&sender, &snapshot).await {
            Ok(etag) => etag,
            // Unlinked or replaced meanwhile: nothing of this version is to be kept.
            Err(UploadError::Superseded) => return Ok(()),
            Err(UploadError::Conflict) => return Err(StoreError::PreconditionFailed),
            Err(UploadError::Store(e) | UploadError::Abandoned(e) | UploadError::Refused(e)) => {
                return Err(e);
            }
        };
        if self.dirty.uploaded(&snapshot, &etag) == UploadOutcome::Removed {
            match delete_leftover(&*self.store, key, Some(&etag), None).await {
                Ok(()) => self.dirty.settled(key),
                // The tombstone stays; the background task deletes it.
                Err(_) => self.enqueue(key),
            }
        }
        Ok(())
    }
}

/// The part size for an object of `size` bytes: the configured size, grown to stay within
/// S3's 10 000 parts.
pub fn part_size_for(size: u64, configured: u64) -> u64 {
    configured.max(size.div_ceil(MAX_PARTS)).max(5 << 20)
}

/// `x-amz-meta-*` key naming the lineage of the local file an object was uploaded from.
const ORIGIN: &str = "keepfs-origin";
/// `x-amz-meta-*` key holding [`key_hash`] of the key an object was uploaded to: a copy made
/// inside S3 (CopyObject keeps user metadata) carries another key's.
const UPLOADED_TO: &str = "keepfs-key";

/// The first 16 hex digits of the key's sha256 (user metadata must be ASCII; keys need not be).
fn key_hash(key: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes())[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The user metadata an upload of `snapshot` carries (mode, owner, times, lineage).
pub fn metadata(snapshot: &UploadSnapshot) -> HashMap<String, String> {
    let attr = &snapshot.attr;
    let mut meta = with_times(
        stored_metadata(attr.mode, attr.uid, attr.gid, attr.mtime),
        attr.atime,
        attr.ctime,
    );
    meta.insert(ORIGIN.to_owned(), format!("{:016x}", snapshot.origin));
    meta.insert(UPLOADED_TO.to_owned(), key_hash(&snapshot.key));
    meta
}

/// What an upload needs besides the snapshot: the store, the dirty files (and their record of
/// uploads in progress) and the tuning.
struct Sender<'a, S> {
    store: &'a S,
    dirty: &'a DirtyFiles,
    config: UploadConfig,
    stats: &'a UploadStats,
}

impl<'a, S: ObjectStore> Sender<'a, S> {
    fn new(
        store: &'a S,
        dirty: &'a DirtyFiles,
        config: UploadConfig,
        stats: &'a UploadStats,
    ) -> Self {
        Sender {
            store,
            dirty,
            config,
            stats,
        }
    }
}

/// Aborts multipart uploads recorded for data files that are no longer dirty (the file was
/// uploaded another way, unlinked or replaced before its upload finished).
async fn abort_orphaned_uploads<S: ObjectStore>(store: &S, dirty: &DirtyFiles) {
    let pending = dirty.pending_uploads();
    for id in pending.data_ids() {
        if dirty.has_data_file(id) {
            continue; // resumed or replaced by the file's own next upload
        }
        for (_, upload) in pending.matching(|of, _| of == id) {
            abort(store, &upload).await;
            pending.remove(id, &upload.key);
        }
    }
}

/// Aborts and forgets the recorded multipart uploads to `key`, but that of data file `keep`.
/// Uploads of one key never run at once (key locks), so another data file's record belongs to
/// an older version of the file whose upload was cut off or overtaken.
async fn abort_uploads_to<S: ObjectStore>(
    store: &S,
    dirty: &DirtyFiles,
    key: &str,
    keep: Option<u64>,
) {
    let pending = dirty.pending_uploads();
    for (id, upload) in pending.matching(|id, to| Some(id) != keep && to == key) {
        abort(store, &upload).await;
        pending.remove(id, key);
    }
}

/// Aborts a multipart upload, best effort: one that is gone already is fine, and a bucket
/// lifecycle rule (AbortIncompleteMultipartUpload) catches what fails here.
async fn abort<S: ObjectStore>(store: &S, upload: &PendingUpload) {
    match store.abort_multipart(&upload.key, &upload.upload_id).await {
        Ok(()) | Err(StoreError::NotFound) => {
            tracing::debug!(key = upload.key, "aborted multipart upload")
        }
        Err(e) => {
            tracing::warn!(key = upload.key, error = %e, "could not abort multipart upload")
        }
    }
}

/// Uploads `key` until S3 holds its current content (retrying failures), or until it is no
/// longer dirty (deleted, or being written again: the next close queues it anew).
async fn upload_until_done<S: ObjectStore>(sender: &Sender<'_, S>, locks: &KeyLocks, key: &str) {
    let (store, dirty) = (sender.store, sender.dirty);
    let mut backoff = Duration::from_millis(200);
    loop {
        let guard = locks.lock(key).await;
        // A tombstone says an upload of a file whose name went may land here (one cut off by
        // a crash, after a restart): it goes first, also before a new file under the key is
        // uploaded, so that the old upload can't land over the new one.
        if let Some(origin) = dirty.tombstone(key) {
            match clear_tombstone(store, dirty, key, origin).await {
                Ok(()) => dirty.settled(key),
                // Never going to work: don't hold the key (and flush) forever.
                Err(e @ (StoreError::AccessDenied(_) | StoreError::NoSuchBucket(_))) => {
                    tracing::error!(key, error = %e, "cannot delete the upload of a removed file; it may stay in S3");
                    dirty.settled(key);
                }
                Err(e) => {
                    drop(guard);
                    tracing::warn!(key, error = %e, retry_in = ?backoff, "could not delete the upload of a removed file; will retry");
                    sender.stats.failed(key, &e);
                    backoff = sender.stats.back_off(backoff).await;
                    continue;
                }
            }
        }
        let Some(snapshot) = dirty.snapshot(key) else {
            // Nothing (more) to upload.
            drop(guard);
            abort_orphaned_uploads(store, dirty).await;
            return;
        };
        let result = if snapshot.in_s3 {
            Ok(snapshot.base_etag.clone().unwrap_or_default())
        } else {
            upload_resolving_conflict(sender, &snapshot).await
        };
        let outcome = match &result {
            Ok(etag) => {
                let outcome = dirty.uploaded(&snapshot, etag);
                match outcome {
                    // Unlinked during the upload, which put the object back: remove it again
                    // (until that is done, the tombstone keeps the key for a retry).
                    UploadOutcome::Removed => {
                        match delete_leftover(store, key, Some(etag), None).await {
                            Ok(()) => {
                                dirty.settled(key);
                                Some(outcome)
                            }
                            Err(e) => {
                                tracing::warn!(key, error = %e, "could not delete the upload of a removed file; will retry");
                                None
                            }
                        }
                    }
                    _ => Some(outcome),
                }
            }
            Err(_) => None,
        };
        // Held until the outcome is recorded (a rename over this key waits for it), but not
        // while backing off: `upload_now` may try meanwhile.
        drop(guard);
        match result {
            Ok(_) => match outcome {
                Some(UploadOutcome::Clean) => {
                    tracing::debug!(key, size = snapshot.attr.size, "uploaded");
                    // Uploads of versions replaced meanwhile (rewritten, unlinked) can go.
                    abort_orphaned_uploads(store, dirty).await;
                    return;
                }
                Some(UploadOutcome::Removed) => return,
                // Changed during the upload: go again with the new content.
                Some(UploadOutcome::Changed) => backoff = Duration::from_millis(200),
                // Removed, and its upload still to delete.
                None => backoff = sender.stats.back_off(backoff).await,
            },
            // Unlinked or replaced meanwhile: look again at what the key holds now.
            Err(UploadError::Superseded) => backoff = Duration::from_millis(200),
            Err(UploadError::Conflict) => {
                tracing::warn!(key, retry_in = ?backoff, "conflict copy refused; will retry");
                sender.stats.failed(key, &"conflict copy refused");
                backoff = sender.stats.back_off(backoff).await;
            }
            Err(UploadError::Store(e) | UploadError::Abandoned(e) | UploadError::Refused(e)) => {
                tracing::warn!(key, error = %e, retry_in = ?backoff, "upload failed; will retry");
                sender.stats.failed(key, &e);
                backoff = sender.stats.back_off(backoff).await;
            }
        }
    }
}

/// Makes sure nothing of the file whose name went (lineage `origin`) is or will be at `key`:
/// after the grace a tombstone from a previous run waits, its recorded multipart uploads to the
/// key are aborted (a completion still running on the server then fails) and an object of its
/// lineage is deleted.
async fn clear_tombstone<S: ObjectStore>(
    store: &S,
    dirty: &DirtyFiles,
    key: &str,
    origin: u64,
) -> Result<(), StoreError> {
    tokio::time::sleep(dirty.tombstone_wait(key)).await;
    abort_uploads_to(store, dirty, key, None).await;
    delete_leftover(store, key, None, Some(origin)).await
}

/// Deletes what an upload of a file whose name went (unlinked, renamed away) left at `key`:
/// the object if it is version `etag` (the upload just finished) or carries the file's lineage
/// `origin` (known from a tombstone after a restart). Anything else there was put by a rename
/// or another client since, and stays.
async fn delete_leftover<S: ObjectStore>(
    store: &S,
    key: &str,
    etag: Option<&str>,
    origin: Option<u64>,
) -> Result<(), StoreError> {
    let meta = match store.head(key).await {
        Ok(meta) => meta,
        Err(StoreError::NotFound) => return Ok(()),
        Err(e) => return Err(e),
    };
    let lineage = origin.map(|o| format!("{o:016x}"));
    // By lineage only an object uploaded to this very key: one another client copied here
    // from a key this file had keeps the lineage, but not the key.
    let ours = etag.is_some_and(|e| meta.etag == e)
        || (lineage.is_some_and(|l| meta.user_metadata.get(ORIGIN) == Some(&l))
            && meta.user_metadata.get(UPLOADED_TO) == Some(&key_hash(key)));
    if !ours {
        return Ok(());
    }
    tracing::debug!(key, "deleting the upload of a removed file");
    match store.delete(key).await {
        Ok(()) | Err(StoreError::NotFound) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Where the bytes of an upload come from besides the local copy.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Base {
    /// The base version is still in S3: unchanged ranges are copied or fetched from it.
    Usable,
    /// The base version is gone (a conflict): only the local copy is used.
    Gone,
}

/// Uploads the snapshot; on a conflict, as a conflict copy beside the key, unless the file
/// was unlinked or replaced meanwhile (then the key may have changed because of that, and
/// this version is not to be kept anyway).
async fn upload_resolving_conflict<S: ObjectStore>(
    sender: &Sender<'_, S>,
    snapshot: &UploadSnapshot,
) -> Result<String, UploadError> {
    match upload_once(sender, snapshot).await {
        Err(UploadError::Conflict) if !sender.dirty.is_current(snapshot) => {
            Err(UploadError::Superseded)
        }
        Err(UploadError::Conflict) => {
            // This very version, uploaded before a crash kept the completion out of the
            // journal (or a lost answer made it look failed): nothing to send.
            let (size, meta) = (snapshot.attr.size, metadata(snapshot));
            if let Some(etag) = holds_upload(sender.store, &snapshot.key, size, &meta).await {
                tracing::info!(
                    key = snapshot.key,
                    "S3 holds this version of the file already"
                );
                return Ok(etag);
            }
            // Our own earlier upload (its completion never reached the journal before a
            // crash) is not someone else's change: replace it.
            if let Some(etag) = own_upload(sender.store, snapshot).await {
                tracing::info!(
                    key = snapshot.key,
                    "S3 holds an earlier upload of this file; replacing it"
                );
                sender.dirty.adopt(&snapshot.key, snapshot.origin, &etag);
                let adopted = snapshot.with_base(etag);
                return match upload_once(sender, &adopted).await {
                    Err(UploadError::Conflict) => upload_conflict_copy(sender, snapshot).await,
                    other => other,
                };
            }
            upload_conflict_copy(sender, snapshot).await
        }
        other => other,
    }
}

/// The ETag of the object at the snapshot's key if it was uploaded from the same local file
/// (same lineage), else `None`.
async fn own_upload<S: ObjectStore>(store: &S, snapshot: &UploadSnapshot) -> Option<String> {
    own_version(store, &snapshot.key, snapshot.origin).await
}

/// The ETag of the object at `key` if it is an upload of the local file of lineage `origin`
/// (its `x-amz-meta-keepfs-origin`): an upload whose completion a crash kept out of the
/// journal, whose bytes are the file's own.
pub async fn own_version<S: ObjectStore>(store: &S, key: &str, origin: u64) -> Option<String> {
    let meta = store.head(key).await.ok()?;
    let origin = format!("{origin:016x}");
    (meta.user_metadata.get(ORIGIN) == Some(&origin)).then_some(meta.etag)
}

/// Bytes `start..start + len` of the local copy, first fetching what is still the base's.
async fn read_range<S: ObjectStore>(
    store: &S,
    snapshot: &UploadSnapshot,
    base: Base,
    start: u64,
    len: u64,
) -> Result<Bytes, StoreError> {
    let etag = match base {
        Base::Usable => snapshot.base_etag.as_deref(),
        Base::Gone => None,
    };
    let buf = snapshot
        .data
        .read(store, &snapshot.key, etag, start, len)
        .await?;
    Ok(Bytes::from(buf))
}

/// Why an upload did not replace the object.
enum UploadError {
    /// Another client changed the key since the version the local copy is based on.
    Conflict,
    /// The file was unlinked or replaced during the upload.
    Superseded,
    /// The multipart upload can't be completed; a new one is needed.
    Abandoned(StoreError),
    /// A request of the multipart upload was refused (403, 4xx): retried, or abandoned after
    /// [`REFUSALS_BEFORE_NEW_UPLOAD`] refusals in a row.
    Refused(StoreError),
    Store(StoreError),
}

impl From<StoreError> for UploadError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::PreconditionFailed => UploadError::Conflict,
            e => UploadError::Store(e),
        }
    }
}

/// The version an upload may replace: nothing for a new file, else its base version.
fn precondition(snapshot: &UploadSnapshot) -> Precondition {
    match &snapshot.base_etag {
        None => Precondition::Absent,
        Some(etag) => Precondition::Matches(etag.clone()),
    }
}

/// Checks with HEAD, just before the commit, that the key still holds the base version. This
/// covers servers that ignore conditional writes (Garage); a change between this HEAD and the
/// commit is the race that remains there. Servers that honour the conditions refuse it anyway.
async fn check_base<S: ObjectStore>(
    store: &S,
    snapshot: &UploadSnapshot,
) -> Result<(), UploadError> {
    match (store.head(&snapshot.key).await, &snapshot.base_etag) {
        (Err(StoreError::NotFound), None) => Ok(()),
        (Ok(meta), Some(base)) if meta.etag == *base => Ok(()),
        (Ok(_), _) | (Err(StoreError::NotFound), Some(_)) => Err(UploadError::Conflict),
        (Err(e), _) => Err(UploadError::Store(e)),
    }
}

async fn upload_once<S: ObjectStore>(
    sender: &Sender<'_, S>,
    snapshot: &UploadSnapshot,
) -> Result<String, UploadError> {
    let condition = precondition(snapshot);
    upload_to(sender, snapshot, &snapshot.key, &condition, Base::Usable).await
}

/// Uploads the snapshot's bytes to `key` under `condition`.
async fn upload_to<S: ObjectStore>(
    sender: &Sender<'_, S>,
    snapshot: &UploadSnapshot,
    key: &str,
    condition: &Precondition,
    base: Base,
) -> Result<String, UploadError> {
    let store = sender.store;
    let size = snapshot.attr.size;
    let meta = metadata(snapshot);
    let part = part_size_for(size, sender.config.part_size);
    let guarded = *condition != Precondition::None;
    // Uploads to this key of data this snapshot replaces (an earlier version of the file, cut
    // off or overtaken by a rewrite) are of no use any more: aborted before this one starts,
    // so an incomplete upload never outlives the version it was for.
    abort_uploads_to(sender.store, sender.dirty, key, Some(snapshot.id)).await;
    if size <= part {
        // A multipart upload of an earlier, larger version is of no use any more.
        if let Some(outdated) = sender.dirty.pending_uploads().get(snapshot.id, key) {
            abort(store, &outdated).await;
            sender.dirty.pending_uploads().remove(snapshot.id, key);
        }
        let _room = sender.config.memory.reserve(size).await;
        let body = read_range(store, snapshot, base, 0, size).await?;
        if guarded && !sender.config.conditional_puts {
            check_base(store, snapshot).await?;
        }
        return match store.put_object(key, body, &meta, condition).await {
            // If-Match on a key deleted meanwhile: 404, not 412 (S3 API, PutObject).
            Err(StoreError::NotFound) if matches!(condition, Precondition::Matches(_)) => {
                Err(UploadError::Conflict)
            }
            result => Ok(result?),
        };
    }
    let base_etag = match base {
        Base::Usable => snapshot.base_etag.as_deref(),
        Base::Gone => None,
    };
    let fingerprint = resume::fingerprint(snapshot.id, size, &meta, base_etag, part, key);
    let upload = start_multipart(sender, snapshot, key, &meta, fingerprint, part).await?;
    let upload_id = upload.upload_id.clone();
    let progress = std::sync::Mutex::new(upload);
    let target = Target {
        key,
        upload_id: &upload_id,
    };
    let parts = upload_parts(sender, snapshot, &target, base, part, &progress).await;
    let committed = match parts {
        Ok(parts) => {
            let checked = if guarded {
                check_base(store, snapshot).await
            } else {
                Ok(())
            };
            match checked {
                Ok(()) => store
                    .complete_multipart(key, &upload_id, parts, condition)
                    .await
                    .map_err(unusable_upload),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    let upload = progress.into_inner().unwrap_or_else(|e| e.into_inner());
    let committed = match committed {
        Err(UploadError::Refused(e))
            if sender.stats.refused(&upload_id) < REFUSALS_BEFORE_NEW_UPLOAD =>
        {
            Err(UploadError::Store(e))
        }
        Err(UploadError::Refused(e)) => Err(UploadError::Abandoned(e)),
        other => other,
    };
    if !matches!(committed, Err(UploadError::Store(_))) {
        sender.stats.forget_refusals(&upload_id);
    }
    // Given up: the object may hold these bytes already (a completion that landed but whose
    // answer a crash or a disconnect lost); else the next attempt starts a new upload.
    let committed = match committed {
        Err(UploadError::Abandoned(e)) => match holds_upload(store, key, size, &meta).await {
            Some(etag) => {
                tracing::info!(key, error = %e, "multipart upload refused, but S3 holds this version of the file already");
                abort(store, &upload).await; // its parts, if the server still keeps them
                Ok(etag)
            }
            None => {
                tracing::warn!(key, error = %e, "multipart upload refused; starting a new one");
                Err(UploadError::Abandoned(e))
            }
        },
        other => other,
    };
    match &committed {
        Ok(_) => sender.dirty.pending_uploads().remove(snapshot.id, key),
        // Cut off: the parts S3 has stay, the next attempt (or the next start) goes on.
        Err(UploadError::Store(_)) => {}
        Err(_) => {
            abort(store, &upload).await;
            sender.dirty.pending_uploads().remove(snapshot.id, key);
        }
    }
    committed.map_err(|e| match e {
        UploadError::Abandoned(e) | UploadError::Refused(e) => UploadError::Store(e),
        e => e,
    })
}

/// What an error of a request about a multipart upload (UploadPart, UploadPartCopy,
/// CompleteMultipartUpload) means. An upload the server will never take — gone
/// (`NoSuchUpload`: aborted, expired, or completed already) or with a part it refuses
/// (`InvalidPart`) — is abandoned at once, so the next attempt starts a new one instead of
/// sending the same request forever; one refused otherwise (403, other 4xx) is abandoned
/// after [`REFUSALS_BEFORE_NEW_UPLOAD`] refusals. A failed precondition is a conflict;
/// anything else (5xx, throttling, a cut connection) is retried as it is.
fn unusable_upload(e: StoreError) -> UploadError {
    match e {
        // The completion's condition, or UploadPartCopy's `x-amz-copy-source-if-match` on the
        // base version: another client changed the object.
        StoreError::PreconditionFailed => UploadError::Conflict,
        StoreError::NotFound => UploadError::Abandoned(e),
        StoreError::Refused(ref text) if text.contains("InvalidPart") => UploadError::Abandoned(e),
        StoreError::AccessDenied(_) | StoreError::Refused(_) => UploadError::Refused(e),
        e => UploadError::Store(e),
    }
}

/// The ETag of the object at `key` if it is this upload already: `size` bytes with exactly the
/// user `metadata` the upload carries (lineage, key, mode, owner and the times to the
/// nanosecond, which every change of the file moves on).
async fn holds_upload<S: ObjectStore>(
    store: &S,
    key: &str,
    size: u64,
    metadata: &HashMap<String, String>,
) -> Option<String> {
    let found = store.head(key).await.ok()?;
    let same = found.size == size
        && metadata
            .iter()
            .all(|(k, v)| found.user_metadata.get(&k.to_ascii_lowercase()) == Some(v));
    same.then_some(found.etag)
}

/// How many bytes sent before a restart or failure resumed uploads did not send again, since
/// the process started (the `keepfs_resumed_bytes_total` metric).
pub fn resumed_bytes() -> u64 {
    crate::metrics::get().resumed_bytes.get()
}

/// The multipart upload for this snapshot: the one in progress if it uploads exactly these
/// bytes (after a failure or a restart), else a new one (aborting an outdated one).
async fn start_multipart<S: ObjectStore>(
    sender: &Sender<'_, S>,
    snapshot: &UploadSnapshot,
    key: &str,
    meta: &HashMap<String, String>,
    fingerprint: String,
    part: u64,
) -> Result<PendingUpload, UploadError> {
    let pending = sender.dirty.pending_uploads();
    match pending.get(snapshot.id, key) {
        Some(upload) if upload.fingerprint == fingerprint => {
            let size = snapshot.attr.size;
            let done: u64 = upload
                .parts
                .keys()
                .map(|&n| {
                    let start = (n.max(1) as u64 - 1) * part;
                    size.saturating_sub(start).min(part)
                })
                .sum();
            crate::metrics::get().resumed_bytes.inc_by(done);
            tracing::info!(
                key,
                parts_done = upload.parts.len(),
                bytes_not_resent = done,
                "resuming multipart upload"
            );
            return Ok(upload);
        }
        Some(outdated) => {
            // The file changed since: those parts are of no use.
            abort(sender.store, &outdated).await;
            pending.remove(snapshot.id, key);
        }
        None => {}
    }
    let upload_id = sender.store.create_multipart(key, meta).await?;
    let upload = resume::PendingUploads::started(key, &upload_id, fingerprint);
    if let Err(e) = pending.put(snapshot.id, &upload) {
        tracing::warn!(key, error = %e, "could not record the multipart upload; a restart would send it again");
    }
    Ok(upload)
}

/// Keeps both versions after a conflict: the remote object stays, the local copy goes up beside
/// it as `KEY.keepfs-conflict-<unix seconds>`.
async fn upload_conflict_copy<S: ObjectStore>(
    sender: &Sender<'_, S>,
    snapshot: &UploadSnapshot,
) -> Result<String, UploadError> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let copy = format!("{}.keepfs-conflict-{secs}", snapshot.key);
    if !snapshot.data.coverage.complete() {
        tracing::error!(
            key = snapshot.key,
            conflict_copy = copy,
            "conflict: parts of the original object this file was edited from were never read and are gone from S3; they are zeros in the conflict copy"
        );
    }
    let etag = upload_to(sender, snapshot, &copy, &Precondition::None, Base::Gone).await?;
    crate::metrics::get().conflicts.inc();
    tracing::warn!(
        key = snapshot.key,
        conflict_copy = copy,
        "conflict: the object changed in S3 since this file was read; kept the remote version and uploaded the local one beside it"
    );
    Ok(etag)
}

/// How many conflict copies this process has uploaded (the `keepfs_conflict_copies_total`
/// metric).
pub fn conflicts() -> u64 {
    crate::metrics::get().conflicts.get()
}

/// The multipart upload parts go to.
struct Target<'a> {
    key: &'a str,
    upload_id: &'a str,
}

/// Sends the parts S3 does not have yet (recording each one it acknowledges in `progress`)
/// and returns them all, in order.
async fn upload_parts<S: ObjectStore>(
    sender: &Sender<'_, S>,
    snapshot: &UploadSnapshot,
    target: &Target<'_>,
    base: Base,
    part: u64,
    progress: &std::sync::Mutex<PendingUpload>,
) -> Result<Vec<(i32, String)>, UploadError> {
    use futures_util::stream::{self, StreamExt};
    let store = sender.store;
    let size = snapshot.attr.size;
    let count = size.div_ceil(part);
    let coverage = &snapshot.data.coverage;
    let lock = || progress.lock().unwrap_or_else(|e| e.into_inner());
    let done = lock().parts.clone();
    // After a failure no new part starts, but those in flight finish and are recorded: S3
    // has them, and a resumed upload need not send them again.
    let failed = std::sync::atomic::AtomicBool::new(false);
    let results: Vec<Result<(i32, String), UploadError>> = stream::iter(0..count)
        .filter(|i| std::future::ready(!done.contains_key(&(*i as i32 + 1))))
        .map(|i| {
            let (coverage, failed) = (&coverage, &failed);
            async move {
                if failed.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok(None);
                }
                let result = async {
                    let range = i * part..(i * part + part).min(size);
                    let number = i as i32 + 1;
                    let (Target { key, upload_id }, source) = (target, &snapshot.key);
                    let etag = match (&snapshot.base_etag, base) {
                        // Untouched since it left S3: copied there, neither downloaded nor sent.
                        (Some(etag), Base::Usable) if coverage.unchanged(&range) => {
                            let copied = store
                                .upload_part_copy(
                                    key,
                                    upload_id,
                                    number,
                                    source,
                                    etag,
                                    range.start,
                                    range.end,
                                )
                                .await;
                            match copied {
                                Ok(etag) => etag,
                                // Either the source changed (a conflict) or the upload is gone
                                // (aborted, expired): HEAD tells which.
                                Err(StoreError::NotFound) => {
                                    return Err(match check_base(store, snapshot).await {
                                        Ok(()) => UploadError::Abandoned(StoreError::NotFound),
                                        Err(e) => e,
                                    });
                                }
                                Err(e) => return Err(unusable_upload(e)),
                            }
                        }
                        _ => {
                            let _room = sender.config.memory.reserve(range.end - range.start).await;
                            let body = read_range(
                                store,
                                snapshot,
                                base,
                                range.start,
                                range.end - range.start,
                            )
                            .await?;
                            store
                                .upload_part(key, upload_id, number, body)
                                .await
                                .map_err(unusable_upload)?
                        }
                    };
                    // Progress: refusals before it were not "in a row".
                    sender.stats.forget_refusals(upload_id);
                    let mut progress = lock();
                    progress.parts.insert(number, etag.clone());
                    if let Err(e) = sender.dirty.pending_uploads().put(snapshot.id, &progress) {
                        tracing::warn!(key, error = %e, "could not record an uploaded part");
                    }
                    Ok::<_, UploadError>((number, etag))
                }
                .await;
                if result.is_err() {
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                result.map(Some)
            }
        })
        .buffer_unordered(sender.config.concurrency.max(1))
        .filter_map(|r| std::future::ready(r.transpose()))
        .collect()
        .await;
    let mut parts = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    parts.extend(done);
    parts.sort_by_key(|(n, _)| *n);
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_size_keeps_within_limits() {
        assert_eq!(part_size_for(1 << 20, 8 << 20), 8 << 20);
        assert_eq!(
            part_size_for(100 << 30, 8 << 20),
            (100u64 << 30).div_ceil(10_000)
        );
        assert!(part_size_for(5 << 40, 8 << 20) * 10_000 >= 5 << 40);
        assert_eq!(part_size_for(10, 1), 5 << 20, "S3's minimum part size");
    }
}
