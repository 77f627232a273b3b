//! The table of dirty files: by key for the namespace and the uploader, by [`FileId`] for
//! open handles, and the files unlinked while open.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{DirtyAttr, FileId};
use crate::cache::journal::FileRecord;
use crate::write::local::LocalData;

/// Open handles, dirty files and their keys (see [`DirtyFiles`]).
#[derive(Default)]
pub(super) struct Table {
    /// Files linked under a key, by key.
    pub(super) by_key: HashMap<String, DirtyFile>,
    /// The key each linked file has now.
    pub(super) keys: HashMap<FileId, String>,
    /// Files unlinked, renamed over or replaced while handles had them open: they live, with
    /// no journal record (never uploaded), until their last handle is released.
    pub(super) unlinked: HashMap<FileId, DirtyFile>,
    /// When keys left `by_key` because their last version reached S3 (see [`Departures`]).
    pub(super) departures: Departures,
}

impl Table {
    pub(super) fn get(&self, key: &str) -> Option<&DirtyFile> {
        self.by_key.get(key)
    }

    pub(super) fn get_mut(&mut self, key: &str) -> Option<&mut DirtyFile> {
        self.by_key.get_mut(key)
    }

    pub(super) fn insert(&mut self, key: String, file: DirtyFile) -> Option<DirtyFile> {
        self.keys.insert(file.fid, key.clone());
        let old = self.by_key.insert(key, file);
        if let Some(old) = &old {
            self.keys.remove(&old.fid);
        }
        old
    }

    pub(super) fn remove(&mut self, key: &str) -> Option<DirtyFile> {
        let file = self.by_key.remove(key)?;
        self.keys.remove(&file.fid);
        Some(file)
    }

    /// Takes `key`'s file out of the table because S3 holds its last version and no handle
    /// has it open, recording when and its attributes then (see [`Departures`]).
    pub(super) fn remove_uploaded(&mut self, key: &str) -> Option<DirtyFile> {
        let file = self.remove(key)?;
        self.departures.record(key, &file.attr);
        Some(file)
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &DirtyFile> {
        self.by_key.values()
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &String> {
        self.by_key.keys()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&String, &DirtyFile)> {
        self.by_key.iter()
    }

    /// File `fid` and its key (none once unlinked).
    pub(super) fn by_id(&mut self, fid: FileId) -> Option<(&mut DirtyFile, Option<String>)> {
        match self.keys.get(&fid) {
            Some(key) => {
                let key = key.clone();
                self.by_key.get_mut(&key).map(|f| (f, Some(key)))
            }
            None => self.unlinked.get_mut(&fid).map(|f| (f, None)),
        }
    }

    /// Takes `file` out of the namespace: kept (unlinked) while handles have it open. Returns
    /// what must be removed from the journal and the data directory.
    pub(super) fn unlink(&mut self, mut file: DirtyFile) -> Discard {
        let discard = Discard {
            record: file.record.clone(),
            ids: std::mem::take(&mut file.retired)
                .into_iter()
                .chain([file.id])
                .collect(),
        };
        if file.handles > 0 {
            tracing::debug!(
                fid = file.fid,
                handles = file.handles,
                complete = file.data.coverage().complete(),
                "file unlinked while open"
            );
            // Its data file stays open through the handles; nothing acknowledged it any more.
            file.durable_size = 0;
            file.writers = file.writers.min(file.handles);
            self.unlinked.insert(file.fid, file);
        }
        discard
    }
}

/// A file's journal record and data files to remove (see [`DirtyFiles::discard`]).
pub(super) struct Discard {
    pub(super) record: Arc<Mutex<Journalled>>,
    pub(super) ids: Vec<u64>,
}

/// One dirty file: its local copy, attributes, open handles and journal state.
pub(super) struct DirtyFile {
    /// See [`FileId`].
    pub(super) fid: FileId,
    /// Open handles (readers and writers); an unlinked file lives until none remain.
    pub(super) handles: u32,
    pub(super) id: u64,
    pub(super) attr: DirtyAttr,
    /// Holds the bytes and the base version (see [`LocalData::base_etag`]).
    pub(super) data: Arc<LocalData>,
    /// Open handles that may write; uploads wait until none remain.
    pub(super) writers: u32,
    /// Bumped on every change, so an upload that raced with a change is not taken as current.
    pub(super) generation: u64,
    /// The generation S3 holds (uploaded while a writer kept the file open).
    pub(super) in_s3: Option<u64>,
    /// The last record written to the journal; its lock orders the journal writes of this
    /// file, so a record never goes back to an older base version.
    pub(super) record: Arc<Mutex<Journalled>>,
    /// Size in the last record written: bytes below it are acknowledged and are never
    /// overwritten in place (see [`DirtyFiles::protect_acknowledged`]).
    pub(super) durable_size: u64,
    /// Earlier data files (ids) whose records stay until this file's next record is written.
    pub(super) retired: Vec<u64>,
    /// See [`FileRecord::origin`].
    pub(super) origin: u64,
    /// An upload of this file may have started (a snapshot was taken for it): when its name
    /// goes, the upload may still land there (see [`crate::write::tombstones`]).
    pub(super) upload_started: bool,
    /// When the oldest change S3 doesn't hold yet was made (this process's start, for files
    /// the journal brought back).
    pub(super) dirty_since: Instant,
}

impl DirtyFile {
    /// Counts a change to content or attributes (see [`DirtyFile::generation`]).
    pub(super) fn changed(&mut self) {
        if self.uploaded() {
            self.dirty_since = Instant::now();
        }
        self.generation += 1;
    }

    /// S3 holds exactly this content; the local copy stays only for its open handles.
    pub(super) fn uploaded(&self) -> bool {
        self.in_s3 == Some(self.generation)
    }
}

/// What the journal holds for one dirty file.
#[derive(Default)]
pub(super) enum Journalled {
    #[default]
    Nothing,
    Record(Box<FileRecord>),
    /// The file is gone: nothing may write its record again.
    Discarded,
}

/// When keys stopped being dirty because their last version reached S3, and their attributes
/// then, for [`DirtyFiles::left_since`](super::DirtyFiles::left_since): the last
/// [`Departures::KEPT`] of them, none older than [`Departures::WINDOW`].
#[derive(Default)]
pub(super) struct Departures {
    last: HashMap<Arc<str>, (Instant, DirtyAttr)>,
    /// Every departure in time order (a key may appear more than once; `last` has its latest).
    order: VecDeque<(Instant, Arc<str>)>,
}

impl Departures {
    /// How long a departure is remembered: longer than a listing or HEAD takes to be answered
    /// (3 attempts of `--request-timeout`, 30 s, and backoff), after which no answer still on
    /// its way was asked before it.
    pub(super) const WINDOW: Duration = Duration::from_secs(300);
    /// Most departures remembered: ~250 bytes each with a 100-byte key (5 MiB), 100 files
    /// uploaded a second for 200 s.
    pub(super) const KEPT: usize = 20_000;

    pub(super) fn record(&mut self, key: &str, attr: &DirtyAttr) {
        let now = Instant::now();
        let key: Arc<str> = Arc::from(key);
        self.last.insert(key.clone(), (now, attr.clone()));
        self.order.push_back((now, key));
        self.prune(now);
    }

    /// Drops departures beyond [`Departures::KEPT`] or older than [`Departures::WINDOW`].
    fn prune(&mut self, now: Instant) {
        while let Some((when, _)) = self.order.front()
            && (self.order.len() > Self::KEPT || now.duration_since(*when) > Self::WINDOW)
        {
            let (when, key) = self.order.pop_front().expect("front exists");
            if self.last.get(&key).is_some_and(|(last, _)| *last == when) {
                self.last.remove(&key);
            }
        }
    }

    /// Forgets `key`'s departure: the name now leads elsewhere (renamed over, unlinked).
    pub(super) fn forget(&mut self, key: &str) {
        self.last.remove(key);
    }

    /// How many departures are held (at most [`Departures::KEPT`] keys, each once).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.last.len()
    }

    /// `key`'s attributes when it left, if it left at or after `asked`.
    pub(super) fn since(&mut self, key: &str, asked: Instant) -> Option<DirtyAttr> {
        self.prune(Instant::now());
        let (left, attr) = self.last.get(key)?;
        (*left >= asked).then(|| attr.clone())
    }
}

/// A new [`FileId`].
pub(super) fn new_fid() -> FileId {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
