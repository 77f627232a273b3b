//! Taking a snapshot: the barrier in a running mount, then the record in the bucket.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::task::JoinSet;

use super::manifest::{FORMAT, unix_ms};
use super::{Entry, Manifest, SnapshotError, check_name, is_reserved, manifest_key};
use crate::config::S3Url;
use crate::control::Live;
use crate::store::{CopyFrom, ObjectStore, Precondition, S3Store, StoreError};
use crate::write::dirty::UploadSnapshot;
use crate::write::{DirtyFiles, Uploader, WriteBarrier};

/// Server-side copies in flight at once.
pub(crate) const COPIES_IN_FLIGHT: usize = 16;

/// How far a long operation is, for progress reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// What is being done: `flushing`, `barrier`, `listing`, `copying`, `deleting`.
    pub stage: String,
    /// Objects done, of `objects` (0 while unknown).
    pub done: u64,
    pub objects: u64,
    /// Bytes done, of `bytes`.
    pub done_bytes: u64,
    pub bytes: u64,
}

/// Where progress goes (called often; keep it cheap).
pub type Report<'a> = &'a (dyn Fn(Progress) + Send + Sync);

/// Fails with [`SnapshotError::Exists`] if snapshot `name` of `prefix` is complete already.
pub async fn check_absent(store: &S3Store, prefix: &str, name: &str) -> Result<(), SnapshotError> {
    let key = manifest_key(prefix, name);
    match store.head(&key).await {
        Ok(_) => Err(SnapshotError::Exists(name.to_owned())),
        Err(StoreError::NotFound) => Ok(()),
        Err(e) => Err(SnapshotError::store(format!("checking {key}"), e)),
    }
}

/// Records snapshot `name` of `source` as the bucket is now: lists it (current versions on a
/// versioned bucket), copies every object under the snapshot's `data/` on an unversioned one,
/// and writes the manifest last. `store` must not wait for the mutation gate (the caller may
/// hold it: see [`S3Store::ungated`]). `kept` are entries copied under `data/` already (the
/// acknowledged versions of files open at the barrier): they stand for their keys. On
/// failure, the copies made are deleted again.
pub async fn record(
    store: &S3Store,
    source: &S3Url,
    name: &str,
    barrier_ms: u64,
    kept: Vec<Entry>,
    report: Report<'_>,
) -> Result<Manifest, SnapshotError> {
    check_name(name)?;
    let prefix = source.prefix.as_str();
    let taken = SystemTime::now();
    let versioned = store
        .is_versioned()
        .await
        .map_err(|e| SnapshotError::store(format!("bucket {}", source.bucket), e))?;
    report(Progress {
        stage: "listing".into(),
        ..Progress::default()
    });
    let listed = store
        .list_tree(prefix, versioned, &mut |n| {
            report(Progress {
                stage: "listing".into(),
                done: n as u64,
                ..Progress::default()
            })
        })
        .await
        .map_err(|e| SnapshotError::store(format!("listing {source}"), e))?;
    let mut entries: Vec<Entry> = listed
        .into_iter()
        .filter(|o| !is_reserved(prefix, &o.key))
        .map(|o| Entry {
            key: o.key[prefix.len()..].to_owned(),
            size: o.size,
            etag: o.etag,
            modified_unix_ms: unix_ms(o.last_modified),
            version_id: o.version_id,
            copy_etag: None,
        })
        .collect();
    for e in kept {
        match entries.binary_search_by(|x| x.key.cmp(&e.key)) {
            Ok(i) => entries[i] = e,
            Err(i) => entries.insert(i, e),
        }
    }
    let bytes = entries.iter().map(|e| e.size).sum();
    let mut manifest = Manifest {
        format: FORMAT,
        name: name.to_owned(),
        source: source.to_string(),
        taken_unix_ms: unix_ms(taken),
        versioned,
        barrier_ms,
        bytes,
        entries: Vec::new(),
    };
    if let Err(e) = copy_all(store, source, &manifest, &mut entries, report).await {
        super::restore::delete_copies(store, prefix, name).await;
        return Err(e);
    }
    manifest.entries = entries;
    manifest.save(store, prefix).await?;
    Ok(manifest)
}

/// Copies every entry that has neither a version nor a copy yet under the snapshot's
/// `data/`, each only if it is still the version listed, and notes the copies' ETags.
async fn copy_all(
    store: &S3Store,
    source: &S3Url,
    manifest: &Manifest,
    entries: &mut [Entry],
    report: Report<'_>,
) -> Result<(), SnapshotError> {
    let prefix = source.prefix.as_str();
    let todo = |e: &Entry| e.version_id.is_none() && e.copy_etag.is_none();
    let total = Progress {
        stage: "copying".into(),
        objects: entries.iter().filter(|e| todo(e)).count() as u64,
        bytes: entries.iter().filter(|e| todo(e)).map(|e| e.size).sum(),
        ..Progress::default()
    };
    report(total.clone());
    let mut tasks = JoinSet::new();
    let mut progress = total;
    let mut next = 0;
    loop {
        while tasks.len() < COPIES_IN_FLIGHT && next < entries.len() {
            let e = &entries[next];
            if !todo(e) {
                next += 1;
                continue;
            }
            let (store, bucket) = (store.clone(), source.bucket.clone());
            let (from, to) = (format!("{prefix}{}", e.key), manifest.copy_key(prefix, e));
            let (etag, size, index) = (e.etag.clone(), e.size, next);
            tasks.spawn(async move {
                let copy = CopyFrom {
                    bucket: &bucket,
                    key: &from,
                    version: None,
                    etag: &etag,
                    size,
                };
                let result = store.copy_from(&copy, &to).await;
                (index, from, size, result)
            });
            next += 1;
        }
        let Some(joined) = tasks.join_next().await else {
            return Ok(());
        };
        let (index, from, size, result) =
            joined.map_err(|e| SnapshotError::Barrier(format!("copy task failed: {e}")))?;
        match result {
            Ok(etag) => entries[index].copy_etag = Some(etag),
            Err(e) => return Err(SnapshotError::store(from, e)),
        }
        progress.done += 1;
        progress.done_bytes += size;
        report(progress.clone());
    }
}

/// Uploads `version` (a file's acknowledged version) as its copy in snapshot `name`, with the
/// metadata its own upload would carry; returns its manifest entry.
async fn keep_acknowledged(
    store: &S3Store,
    source: &S3Url,
    name: &str,
    version: &UploadSnapshot,
) -> Result<Entry, SnapshotError> {
    let prefix = source.prefix.as_str();
    let rel = version.key.strip_prefix(prefix).unwrap_or(&version.key);
    let to = super::data_key(prefix, name, rel);
    let metadata = crate::write::upload::metadata(version);
    let size = version.attr.size;
    let base = version.base_etag.as_deref();
    let failed = |e: StoreError| SnapshotError::store(format!("keeping {}", version.key), e);
    let read = |start: u64, len: u64| version.data.read(store, &version.key, base, start, len);
    let etag = if size <= KEEP_PART {
        let body = read(0, size).await.map_err(failed)?;
        store
            .put_object(&to, body.into(), &metadata, &Precondition::None)
            .await
            .map_err(failed)?
    } else {
        let upload_id = store
            .create_multipart(&to, &metadata)
            .await
            .map_err(failed)?;
        let mut parts = Vec::new();
        let mut start = 0;
        let result = async {
            while start < size {
                let len = KEEP_PART.min(size - start);
                let body = read(start, len).await?;
                let number = parts.len() as i32 + 1;
                parts.push((
                    number,
                    store
                        .upload_part(&to, &upload_id, number, body.into())
                        .await?,
                ));
                start += len;
            }
            store
                .complete_multipart(&to, &upload_id, parts, &Precondition::None)
                .await
        }
        .await;
        if result.is_err() {
            let _ = store.abort_multipart(&to, &upload_id).await;
        }
        result.map_err(failed)?
    };
    Ok(Entry {
        key: rel.to_owned(),
        size,
        etag: etag.clone(),
        modified_unix_ms: unix_ms(version.attr.mtime),
        version_id: None,
        copy_etag: Some(etag),
    })
}

/// Part size of the copies [`keep_acknowledged`] uploads (bytes).
const KEEP_PART: u64 = 8 << 20;

/// What a running mount gives its control socket to take snapshots with.
pub struct Barrier {
    /// What FUSE operations that change the filesystem enter.
    pub writes: WriteBarrier,
    /// The mount's store (its changes pass the mutation gate).
    pub store: S3Store,
    pub dirty: Arc<DirtyFiles>,
    pub uploader: Uploader<S3Store>,
    pub source: S3Url,
    /// One snapshot at a time: a second waits here, not with the barrier closed.
    pub one_at_a_time: tokio::sync::Mutex<()>,
}

/// A snapshot taken through a mount.
#[derive(Debug, Clone)]
pub struct Taken {
    pub manifest: Manifest,
    /// How long writes were held.
    pub held: Duration,
}

impl Barrier {
    /// Takes snapshot `name` of the running mount, giving up after `timeout` if what was
    /// written can't be uploaded:
    ///
    /// 1. Uploads what is waiting, while the applications go on (so the barrier is short).
    /// 2. Closes the write barrier: the operations in progress finish and new ones wait. Every
    ///    file closed or fsync'd before now is uploaded — open ones as they are — and removals
    ///    and renames reach S3.
    /// 3. Closes the mutation gate (nothing this mount does reaches S3 any more) and reopens
    ///    the write barrier: applications go on writing into the cache.
    /// 4. Records the bucket ([`record`]) and reopens the gate: what waited is uploaded.
    pub async fn take(
        &self,
        name: &str,
        timeout: Duration,
        report: Report<'_>,
    ) -> Result<Taken, SnapshotError> {
        check_name(name)?;
        let _one = self.one_at_a_time.lock().await;
        let direct = self.store.ungated();
        check_absent(&direct, &self.source.prefix, name).await?;
        let deadline = Instant::now() + timeout;
        report(Progress {
            stage: "flushing".into(),
            ..Progress::default()
        });
        self.wait_flushed(deadline).await?;
        report(Progress {
            stage: "barrier".into(),
            ..Progress::default()
        });
        // An operation that never finishes (an fsync waiting for an unreachable S3 with
        // `--durability remote`) must not hold the snapshot, and every writer behind it, forever.
        let closed = tokio::time::timeout_at(deadline.into(), self.writes.close())
            .await
            .map_err(|_| {
                SnapshotError::Barrier(
                    "operations in progress did not finish before the time ran out".into(),
                )
            })?;
        let since = Instant::now();
        tracing::info!(snapshot = name, "barrier closed: writes are held");
        // Files open for writing: their acknowledged versions go straight into the snapshot
        // (their own upload waits for their last close, and their bytes may have moved on).
        let open = self
            .dirty
            .acknowledged_open()
            .map_err(|e| SnapshotError::Barrier(format!("reading the journal: {e}")))?;
        let mut kept = Vec::with_capacity(open.len());
        for version in &open {
            kept.push(keep_acknowledged(&direct, &self.source, name, version).await?);
        }
        self.wait_flushed(deadline).await?;
        let Some(gate) = self.store.mutation_gate() else {
            return Err(SnapshotError::Barrier(
                "the mount's store has no gate".into(),
            ));
        };
        let gate = gate.write_owned().await;
        drop(closed);
        let held = since.elapsed();
        tracing::info!(
            snapshot = name,
            held_ms = held.as_millis() as u64,
            "barrier open: writes go on, their uploads wait"
        );
        let barrier_ms = held.as_millis().try_into().unwrap_or(u64::MAX);
        let result = record(&direct, &self.source, name, barrier_ms, kept, report).await;
        drop(gate);
        Ok(Taken {
            manifest: result?,
            held,
        })
    }

    /// Waits until every closed file is in S3 (and removals are done), asking failed uploads
    /// to retry; [`SnapshotError::Barrier`] with the last upload error at `deadline`.
    async fn wait_flushed(&self, deadline: Instant) -> Result<(), SnapshotError> {
        let stats = self.uploader.stats();
        let mut rounds = 0u32;
        loop {
            let live = Live::now(&self.dirty, &stats);
            if live.flushed {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let last = live
                    .last_errors
                    .last()
                    .map(|f| format!("; last upload error: {}: {}", f.key, f.error))
                    .unwrap_or_default();
                return Err(SnapshotError::Barrier(format!(
                    "{} file(s) still waiting for upload when the time ran out{last}",
                    live.closed_pending()
                )));
            }
            if rounds.is_multiple_of(100) {
                stats.retry_now();
            }
            rounds += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
