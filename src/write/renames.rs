//! Directory renames in progress, kept in the cache directory so that a crash in the middle of
//! one is finished by the next start instead of leaving the objects under both names.
//!
//! S3 has no rename: a directory rename copies every object to its new key, then deletes the
//! old keys. Before the first copy, the rename's plan (the copies and the deletes) is written
//! to `renames/<id>.json` (atomically, fsync'd); it is removed once the deletes are done. On
//! start, each plan left behind is carried forward: objects whose old key still exists are
//! copied (again), then every old key is deleted. The rename syscall never returned, so either
//! outcome was allowed; finishing it means no object is left under two names.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::cache::CacheDir;
use crate::cache::journal::write_atomically;
use crate::store::{ObjectStore, StoreError};

const VERSION: u32 = 1;

/// What a directory rename does in S3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenamePlan {
    pub version: u32,
    /// Objects to copy: (old key, new key).
    pub copies: Vec<(String, String)>,
    /// Old keys to delete once every copy is done.
    pub deletes: Vec<String>,
}

/// The `renames/` directory of a cache directory.
pub struct DirRenames {
    dir: PathBuf,
    next: AtomicU64,
}

impl DirRenames {
    pub fn new(cache: &CacheDir) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        DirRenames {
            dir: cache.renames_dir(),
            next: AtomicU64::new(now),
        }
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}.json"))
    }

    /// Durably records a rename about to start; returns its id for [`DirRenames::done`].
    pub fn begin(
        &self,
        copies: Vec<(String, String)>,
        deletes: Vec<String>,
    ) -> std::io::Result<u64> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let plan = RenamePlan {
            version: VERSION,
            copies,
            deletes,
        };
        let bytes = serde_json::to_vec(&plan).map_err(std::io::Error::other)?;
        write_atomically(&self.dir, &self.path(id), &bytes)?;
        Ok(id)
    }

    /// The rename `id` is complete.
    pub fn done(&self, id: u64) {
        if let Err(e) = fs::remove_file(self.path(id)) {
            tracing::warn!(id, error = %e, "could not remove a finished rename's record");
        }
    }

    /// Whether a previous run left a rename unfinished.
    pub fn has_pending(&self) -> bool {
        !self.pending().is_empty()
    }

    /// Renames a previous run left unfinished.
    fn pending(&self) -> Vec<(u64, RenamePlan)> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut plans = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') {
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Some(id) = name
                .strip_suffix(".json")
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            else {
                continue;
            };
            match fs::read(entry.path())
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<RenamePlan>(&b).map_err(|e| e.to_string()))
            {
                Ok(plan) if plan.version <= VERSION => plans.push((id, plan)),
                Ok(_) => tracing::error!(id, "rename record from a newer keepfs left in place"),
                Err(why) => tracing::error!(id, why, "unreadable rename record left in place"),
            }
        }
        plans.sort_by_key(|(id, _)| *id);
        plans
    }

    /// Finishes every rename a previous run left unfinished. Errors leave the record for the
    /// next start.
    pub async fn finish_interrupted<S: ObjectStore>(&self, store: &S) {
        for (id, plan) in self.pending() {
            tracing::warn!(
                objects = plan.copies.len(),
                "finishing a directory rename interrupted by a crash"
            );
            match carry_out(store, &plan).await {
                Ok(()) => self.done(id),
                Err(e) => {
                    tracing::error!(error = %e, "could not finish an interrupted directory rename; will try at the next start")
                }
            }
        }
    }
}

/// Copies what still exists under its old key, then deletes the old keys.
async fn carry_out<S: ObjectStore>(store: &S, plan: &RenamePlan) -> Result<(), StoreError> {
    for (from, to) in &plan.copies {
        match store.copy_object(from, to).await {
            // Already moved (the deletes had started): the copy is there.
            Ok(_) | Err(StoreError::NotFound) => {}
            Err(e) => return Err(e),
        }
    }
    for key in &plan.deletes {
        match store.delete(key).await {
            Ok(()) | Err(StoreError::NotFound) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
