//! What the uploader sees of a dirty file (a frozen snapshot), and what becomes of the file
//! when its upload finishes.

use std::sync::Arc;

use super::table::Journalled;
use super::{DirtyAttr, DirtyFiles};
use crate::write::local::Frozen;

/// A consistent view of one dirty file for the uploader.
#[derive(Clone)]
pub struct UploadSnapshot {
    pub key: String,
    /// The data file the bytes come from.
    pub id: u64,
    pub attr: DirtyAttr,
    pub base_etag: Option<String>,
    /// The bytes to upload, frozen when the snapshot was taken.
    pub data: Frozen,
    pub generation: u64,
    /// S3 already holds exactly this content (uploaded while the file was open).
    pub in_s3: bool,
    /// See [`FileRecord::origin`].
    pub origin: u64,
}

impl UploadSnapshot {
    /// The same snapshot based on version `etag`.
    pub fn with_base(&self, etag: String) -> Self {
        UploadSnapshot {
            base_etag: Some(etag),
            ..self.clone()
        }
    }
}

/// What became of a dirty file whose upload finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadOutcome {
    /// S3 holds exactly the local copy, which is dropped.
    Clean,
    /// The file changed during the upload; it stays dirty.
    Changed,
    /// The file was unlinked during the upload; the object must go too.
    Removed,
}

impl DirtyFiles {
    /// The acknowledged version — the last journal record — of every file open for writing
    /// whose record S3 doesn't hold, read from the record's data file (what a restart after a
    /// crash would show; bytes written since are not part of it). For a snapshot's barrier:
    /// with no change entering, no record is written and these data files stay.
    pub fn acknowledged_open(&self) -> std::io::Result<Vec<UploadSnapshot>> {
        let open: Vec<(String, u64, Arc<std::sync::Mutex<Journalled>>)> = self
            .files()
            .iter()
            .filter(|(_, f)| f.writers > 0 && !f.uploaded())
            .map(|(key, f)| (key.clone(), f.origin, f.record.clone()))
            .collect();
        let mut versions = Vec::new();
        // As elsewhere: the table's lock is released before a record's is taken.
        for (key, origin, record) in open {
            let record = match &*record.lock().unwrap_or_else(|e| e.into_inner()) {
                Journalled::Record(r) => r.clone(),
                Journalled::Nothing | Journalled::Discarded => continue,
            };
            let file = std::fs::File::open(self.data_dir.join(format!("{:016x}", record.id)))?;
            versions.push(UploadSnapshot {
                key,
                id: record.id,
                attr: DirtyAttr::of_record(&record),
                base_etag: record.base_etag.clone(),
                data: Frozen::of_file(file, record.coverage.clone()),
                generation: 0,
                in_s3: false,
                origin,
            });
        }
        Ok(versions)
    }

    /// The file as it is now, if it exists and nobody is writing it.
    pub fn snapshot(&self, key: &str) -> Option<UploadSnapshot> {
        self.take_snapshot(key, false)
    }

    /// The file as it is now, even while it is open for writing (`--durability remote`
    /// uploads at close and fsync).
    pub fn snapshot_open(&self, key: &str) -> Option<UploadSnapshot> {
        self.take_snapshot(key, true)
    }

    fn take_snapshot(&self, key: &str, even_if_open: bool) -> Option<UploadSnapshot> {
        let mut files = self.files();
        let f = files
            .get_mut(key)
            .filter(|f| even_if_open || f.writers == 0)?;
        if !even_if_open && f.handles > 0 && f.uploaded() {
            return None; // nothing to do until the last handle goes
        }
        f.upload_started = true;
        Some(UploadSnapshot {
            key: key.to_owned(),
            id: f.id,
            attr: f.attr.clone(),
            base_etag: f.data.base_etag(),
            data: f.data.freeze(),
            generation: f.generation,
            in_s3: f.in_s3 == Some(f.generation),
            origin: f.origin,
        })
    }

    /// Whether `snapshot` is still of the file `key` names (not unlinked or replaced).
    pub fn is_current(&self, snapshot: &UploadSnapshot) -> bool {
        self.files()
            .get(&snapshot.key)
            .is_some_and(|f| f.id == snapshot.id)
    }

    /// S3 holds version `etag` of this file's own lineage (an upload whose completion a crash
    /// kept out of the journal): make it the base, as a finished upload would have.
    pub fn adopt(&self, key: &str, origin: u64, etag: &str) {
        let journalled = {
            let files = self.files();
            match files.get(key) {
                Some(f) if f.origin == origin => {
                    f.data.set_base_etag(Some(etag.to_owned()));
                    f.record.clone()
                }
                _ => return,
            }
        };
        let mut journalled = journalled.lock().unwrap_or_else(|e| e.into_inner());
        if let Journalled::Record(record) = &mut *journalled {
            record.base_etag = Some(etag.to_owned());
            if let Err(e) = self.journal.put(record) {
                tracing::error!(key, error = %e, "could not record the new base version");
            }
        }
    }

    /// Records a finished upload of `snapshot`, which S3 now holds as version `etag`.
    pub fn uploaded(&self, snapshot: &UploadSnapshot, etag: &str) -> UploadOutcome {
        // The uploaded file's name went (unlinked, renamed away) and its tombstone is still to
        // clear: the object just put is deleted again before the key's next upload, so the file
        // now at the key (created anew) must not take it for the version it replaces.
        let buried = self.tombstone(&snapshot.key) == Some(snapshot.origin);
        let (done, journalled) = {
            let mut files = self.files();
            match files.get_mut(&snapshot.key) {
                None => return UploadOutcome::Removed,
                Some(_) if buried => return UploadOutcome::Changed,
                Some(f) => {
                    // Also when the file was replaced meanwhile (O_TRUNC): what S3 holds now is
                    // this mount's own upload, which the new version may replace.
                    f.data.set_base_etag(Some(etag.to_owned()));
                    if f.id != snapshot.id || f.generation != snapshot.generation {
                        (None, f.record.clone())
                    } else if f.writers > 0 || f.handles > 0 {
                        // Open handles keep reading (and may fetch the rest of) this local
                        // copy: it stays, marked as in S3, until the last one goes.
                        f.in_s3 = Some(f.generation);
                        (None, f.record.clone())
                    } else {
                        let clean = files.remove_uploaded(&snapshot.key).expect("present");
                        (Some(files.unlink(clean)), Arc::default())
                    }
                }
            }
        };
        if let Some(f) = done {
            self.discard(f);
            return UploadOutcome::Clean;
        }
        // Still dirty: its record must name the new base, or the next upload after a restart
        // would take S3's version (ours) for someone else's and make a conflict copy.
        let mut journalled = journalled.lock().unwrap_or_else(|e| e.into_inner());
        if let Journalled::Record(record) = &mut *journalled {
            record.base_etag = Some(etag.to_owned());
            if let Err(e) = self.journal.put(record) {
                tracing::error!(key = snapshot.key, error = %e, "could not record the new base version");
            }
        }
        UploadOutcome::Changed
    }
}
