//! Listing, deleting and restoring snapshots.

use std::collections::HashSet;

use tokio::task::JoinSet;

use super::take::{COPIES_IN_FLIGHT, Progress, Report};
use super::{Manifest, SnapshotError, is_reserved, snapshot_prefix, snapshots_prefix};
use crate::config::S3Url;
use crate::store::{ObjectStore, S3Store};

/// One snapshot as `keepfs snapshot list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    pub name: String,
    /// `None` for an incomplete snapshot (no readable manifest: taking it failed or was
    /// interrupted; `keepfs snapshot delete` removes what it left).
    pub manifest: Option<Summary>,
}

/// A manifest without its entries.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub taken_unix_ms: u64,
    pub versioned: bool,
    pub objects: usize,
    pub bytes: u64,
    pub barrier_ms: u64,
}

impl From<&Manifest> for Summary {
    fn from(m: &Manifest) -> Self {
        Summary {
            taken_unix_ms: m.taken_unix_ms,
            versioned: m.versioned,
            objects: m.entries.len(),
            bytes: m.bytes,
            barrier_ms: m.barrier_ms,
        }
    }
}

/// The snapshots of `source`, by name.
pub async fn list(store: &S3Store, source: &S3Url) -> Result<Vec<Listed>, SnapshotError> {
    let under = snapshots_prefix(&source.prefix);
    let mut names = Vec::new();
    let mut token = None;
    loop {
        let page = store
            .list_page(&under, token, None)
            .await
            .map_err(|e| SnapshotError::store(format!("listing {under}"), e))?;
        names.extend(page.prefixes.iter().filter_map(|p| {
            p.strip_prefix(&under)
                .map(|n| n.trim_end_matches('/').to_owned())
        }));
        token = page.next_token;
        if token.is_none() {
            break;
        }
    }
    let mut listed = Vec::new();
    for name in names {
        let manifest = match Manifest::load(store, &source.prefix, &name).await {
            Ok(m) => Some(Summary::from(&m)),
            Err(SnapshotError::NotFound(..) | SnapshotError::Manifest { .. }) => {
                // Some servers (moto, versioned) list prefixes whose keys are all deleted.
                let under = snapshot_prefix(&source.prefix, &name);
                let left = store
                    .list_tree(&under, false, &mut |_| {})
                    .await
                    .map_err(|e| SnapshotError::store(format!("listing {under}"), e))?;
                if left.is_empty() {
                    continue;
                }
                None
            }
            Err(e) => return Err(e),
        };
        listed.push(Listed { name, manifest });
    }
    Ok(listed)
}

/// Deletes snapshot `name` of `source`: its manifest first (so a half-deleted snapshot is
/// never taken for a whole one), then its copies. On a versioned bucket the versions it named
/// stay until the bucket's lifecycle rules expire them.
pub async fn delete(
    store: &S3Store,
    source: &S3Url,
    name: &str,
    report: Report<'_>,
) -> Result<usize, SnapshotError> {
    super::check_name(name)?;
    let prefix = source.prefix.as_str();
    let under = snapshot_prefix(prefix, name);
    let key = super::manifest_key(prefix, name);
    let keys = store
        .list_tree(&under, false, &mut |_| {})
        .await
        .map_err(|e| SnapshotError::store(format!("listing {under}"), e))?;
    if keys.is_empty() {
        return Err(SnapshotError::NotFound(name.to_owned(), key));
    }
    store
        .delete(&key)
        .await
        .map_err(|e| SnapshotError::store(format!("deleting {key}"), e))?;
    let mut progress = Progress {
        stage: "deleting".into(),
        objects: keys.len() as u64,
        ..Progress::default()
    };
    for o in &keys {
        store
            .delete(&o.key)
            .await
            .map_err(|e| SnapshotError::store(format!("deleting {}", o.key), e))?;
        progress.done += 1;
        report(progress.clone());
    }
    Ok(keys.len())
}

/// Best effort: removes the copies a failed snapshot made.
pub(crate) async fn delete_copies(store: &S3Store, prefix: &str, name: &str) {
    let under = snapshot_prefix(prefix, name);
    if let Ok(keys) = store.list_tree(&under, false, &mut |_| {}).await {
        for o in keys {
            let _ = store.delete(&o.key).await;
        }
    }
}

/// What a restore did.
#[derive(Debug, Clone, Default)]
pub struct Restored {
    /// Objects copied from the snapshot.
    pub copied: usize,
    /// Objects of the target not in the snapshot, deleted (only with `force`).
    pub deleted: usize,
    pub bytes: u64,
}

/// Restores snapshot `name` of `source` into `target` (same endpoint; the store of `target`'s
/// bucket is `into`) with server-side copies. An empty target gets every object; a non-empty
/// one is refused unless `force`, and then made equal to the snapshot: every object is copied
/// over, and objects the snapshot doesn't have are deleted (keepfs's own `.keepfs/`
/// excepted). The mount of `target` must not run meanwhile.
pub async fn restore(
    from: &S3Store,
    source: &S3Url,
    name: &str,
    into: &S3Store,
    target: &S3Url,
    force: bool,
    report: Report<'_>,
) -> Result<Restored, SnapshotError> {
    let manifest = Manifest::load(from, &source.prefix, name).await?;
    report(Progress {
        stage: "listing".into(),
        ..Progress::default()
    });
    let existing: Vec<_> = into
        .list_tree(&target.prefix, false, &mut |_| {})
        .await
        .map_err(|e| SnapshotError::store(format!("listing {target}"), e))?
        .into_iter()
        .filter(|o| !is_reserved(&target.prefix, &o.key))
        .collect();
    if !existing.is_empty() && !force {
        return Err(SnapshotError::TargetNotEmpty {
            target: target.to_string(),
            count: existing.len(),
        });
    }
    let mut done = Restored::default();
    let mut progress = Progress {
        stage: "copying".into(),
        objects: manifest.entries.len() as u64,
        bytes: manifest.bytes,
        ..Progress::default()
    };
    report(progress.clone());
    let mut tasks = JoinSet::new();
    let mut entries = manifest.entries.iter();
    loop {
        while tasks.len() < COPIES_IN_FLIGHT {
            let Some(e) = entries.next() else { break };
            // Every object is copied, also one whose listed ETag matches: listings of some
            // servers (s3s-fs) don't carry the ETag HEAD gives.
            let to = format!("{}{}", target.prefix, e.key);
            let full = format!("{}{}", source.prefix, e.key);
            let copy_key = manifest.copy_key(&source.prefix, e);
            let (into, bucket, e) = (into.clone(), source.bucket.clone(), e.clone());
            tasks.spawn(async move {
                let from = e.source(&bucket, &full, &copy_key);
                let result = into.copy_from(&from, &to).await;
                (to, e.size, result)
            });
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        let (to, size, result) =
            joined.map_err(|e| SnapshotError::Barrier(format!("copy task failed: {e}")))?;
        result.map_err(|e| SnapshotError::store(format!("restoring {to}"), e))?;
        done.copied += 1;
        done.bytes += size;
        progress.done += 1;
        progress.done_bytes += size;
        report(progress.clone());
    }
    let keep: HashSet<String> = manifest
        .entries
        .iter()
        .map(|e| format!("{}{}", target.prefix, e.key))
        .collect();
    for o in existing.iter().filter(|o| !keep.contains(&o.key)) {
        into.delete(&o.key)
            .await
            .map_err(|e| SnapshotError::store(format!("deleting {}", o.key), e))?;
        done.deleted += 1;
    }
    Ok(done)
}
