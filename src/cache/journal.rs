//! The journal: one record per file whose local copy in the cache directory is the truth (written
//! but not yet in S3). Records are replaced atomically: write a temporary file, fsync it, rename
//! it over the record, fsync the directory. A crash leaves either the old or the new record,
//! plus at most a stray temporary file that [`Journal::load`] removes.
//!
//! A record is its JSON, then a line `crc32 XXXXXXXX` (CRC-32/IEEE of the JSON bytes, 8 hex
//! digits): a record the disk damaged is reported unreadable and left in place, never taken
//! for another file's size, key or times (records of version 1 have no such line).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::CacheDir;
use crate::write::local::Coverage;

/// Version of the record encoding, stored in every record. 2: records end with a checksum
/// line; version 1 records (without one) are still read.
pub const RECORD_VERSION: u32 = 2;
const RECORD_SUFFIX: &str = ".rec";
/// Starts the checksum line. JSON escapes newlines inside strings, so a raw newline is only
/// ever this line's.
const CHECKSUM_LINE: &[u8] = b"\ncrc32 ";

/// A record's bytes: its JSON and the checksum line.
fn encode(record: &FileRecord) -> std::io::Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(CHECKSUM_LINE);
    bytes.extend_from_slice(format!("{crc:08x}\n").as_bytes());
    Ok(bytes)
}

/// The record in `bytes`, or why it can't be trusted.
fn decode(bytes: &[u8]) -> Result<FileRecord, String> {
    let at = bytes
        .windows(CHECKSUM_LINE.len())
        .rposition(|w| w == CHECKSUM_LINE);
    let (json, checked) = match at {
        Some(at) => {
            let (json, line) = bytes.split_at(at);
            let digits = line[CHECKSUM_LINE.len()..].trim_ascii_end();
            // Exactly as written: 8 lowercase hex digits (a flipped case bit is damage too).
            if digits.len() != 8
                || !digits
                    .iter()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            {
                return Err("its checksum line is damaged".into());
            }
            if digits != format!("{:08x}", crc32fast::hash(json)).as_bytes() {
                return Err("checksum mismatch: the record is damaged".into());
            }
            (json, true)
        }
        None => (bytes, false),
    };
    let record: FileRecord = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    if record.version > RECORD_VERSION {
        return Err(format!(
            "record version {} is newer than {RECORD_VERSION}",
            record.version
        ));
    }
    if record.version >= 2 && !checked {
        return Err("its checksum line is missing: the record was cut short".into());
    }
    Ok(record)
}

/// Where a journalled file stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordState {
    /// Local data is newer than S3 and must be uploaded.
    Dirty,
}

/// What the journal knows about one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub version: u32,
    /// Names the record and the data file (`data/<id>`); never derived from the key.
    pub id: u64,
    /// Full object key.
    pub key: String,
    pub size: u64,
    /// `st_mode` as stored in `x-amz-meta-mode`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i128,
    /// Last access, ns since the epoch (absent in records written before keepfs kept it).
    #[serde(default)]
    pub atime_ns: Option<i128>,
    /// Last change, ns since the epoch (absent in older records, like `atime_ns`).
    #[serde(default)]
    pub ctime_ns: Option<i128>,
    /// ETag of the object the local copy started from (`None` for a new file).
    pub base_etag: Option<String>,
    /// Which bytes the data file holds (absent in records of complete files).
    #[serde(default)]
    pub coverage: Coverage,
    /// Identifies this file's lineage across copies, renames and restarts; uploaded as
    /// `x-amz-meta-keepfs-origin` so keepfs recognises its own earlier uploads (absent in older
    /// records: a new one is drawn on load).
    #[serde(default)]
    pub origin: Option<u64>,
    /// When the record was written, in the journal's order (see [`Journal::put`]): of two
    /// records for one key, the one with the higher `seq` is the file (a rename over a file
    /// writes the moved file's record before it removes the replaced one's; a copy-on-write
    /// writes the copy's before it removes the original's). Absent (0) in older records.
    #[serde(default)]
    pub seq: u64,
    pub state: RecordState,
}

/// What [`Journal::load`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    pub records: Vec<FileRecord>,
    /// Record files that could not be read or parsed; left in place for an operator.
    pub unreadable: Vec<(PathBuf, String)>,
}

pub struct Journal {
    dir: PathBuf,
    /// Whether loading may remove what a crash left behind (only the directory's owner).
    clean: bool,
    /// The next record's [`FileRecord::seq`]: above every record loaded, and starting from
    /// the wall clock (ns) so that a journal that never loaded still writes newer records.
    next_seq: AtomicU64,
}

/// A starting point for [`Journal::next_seq`]: ns since the epoch.
fn clock_seq() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 2))
}

impl Journal {
    pub fn new(cache: &CacheDir) -> Self {
        Journal {
            dir: cache.journal_dir(),
            clean: true,
            next_seq: AtomicU64::new(clock_seq()),
        }
    }

    fn record_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}{RECORD_SUFFIX}"))
    }

    /// Durably writes `record`, replacing any previous record with its id.
    pub fn put(&self, record: &FileRecord) -> std::io::Result<()> {
        let record = FileRecord {
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            ..record.clone()
        };
        let bytes = encode(&record)?;
        crate::metrics::time_journal_sync(|| {
            write_atomically(&self.dir, &self.record_path(record.id), &bytes)
        })
    }

    /// Durably removes the record `id` (absent is fine).
    pub fn remove(&self, id: u64) -> std::io::Result<()> {
        match fs::remove_file(self.record_path(id)) {
            Ok(()) => crate::metrics::time_journal_sync(|| sync_dir(&self.dir)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The journal of cache directory `dir`, for reading only, without owning the directory
    /// (`keepfs status` while a mount may be running).
    pub fn read_only(dir: &std::path::Path) -> Self {
        Journal {
            dir: dir.join("journal"),
            clean: false,
            next_seq: AtomicU64::new(clock_seq()),
        }
    }

    /// Reads every record, oldest first (by seq, then id); removes temporary files a crash left behind (unless
    /// opened [`Journal::read_only`]).
    pub fn load(&self) -> std::io::Result<Loaded> {
        let mut loaded = Loaded::default();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.starts_with(TMP_PREFIX) {
                if self.clean {
                    fs::remove_file(&path)?;
                }
                continue;
            }
            if !name.ends_with(RECORD_SUFFIX) {
                continue;
            }
            let parsed = fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| decode(&b));
            match parsed {
                Ok(record) => loaded.records.push(record),
                // A record being replaced by a running mount may vanish between listing and
                // reading it; a reader that doesn't own the directory skips it.
                Err(_) if !self.clean && !path.exists() => {}
                Err(why) => {
                    tracing::error!(path = %path.display(), why, "unreadable journal record left in place");
                    loaded.unreadable.push((path, why));
                }
            }
        }
        // Oldest first: for one key the last record is the file (see FileRecord::seq); records
        // of older versions without a seq fall back to their id, which only grows.
        loaded.records.sort_by_key(|r| (r.seq, r.id));
        if let Some(newest) = loaded.records.iter().map(|r| r.seq).max() {
            self.next_seq
                .fetch_max(newest.saturating_add(1), Ordering::Relaxed);
        }
        Ok(loaded)
    }
}

const TMP_PREFIX: &str = ".tmp-";

/// Replaces `path` (inside `dir`) with `bytes` so that a crash at any point leaves either the
/// old or the new content: temporary file in the same directory, fsync, rename, fsync `dir`.
pub fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        "{TMP_PREFIX}{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = super::dir::private_file()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Makes a directory's entries (creations, renames, removals) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, key: &str) -> FileRecord {
        FileRecord {
            version: RECORD_VERSION,
            id,
            key: key.into(),
            size: 42,
            mode: 0o100644,
            uid: 1,
            gid: 2,
            mtime_ns: 1_700_000_000_123_456_789,
            atime_ns: None,
            ctime_ns: Some(1_700_000_000_123_456_789),
            base_etag: Some("\"abc\"".into()),
            coverage: Coverage::default(),
            origin: Some(7),
            seq: 0,
            state: RecordState::Dirty,
        }
    }

    /// The records without the numbers the journal gave them.
    fn unnumbered(records: Vec<FileRecord>) -> Vec<FileRecord> {
        records
            .into_iter()
            .map(|r| FileRecord { seq: 0, ..r })
            .collect()
    }

    proptest::proptest! {
        /// A record cut short at any byte, with any bit flipped, or replaced by any bytes:
        /// loading never panics and never deletes it. A cut or flipped record is reported
        /// unreadable (and left in place for the owner to look at), never taken for another.
        #[test]
        fn damaged_records_are_reported_and_kept(
            cut in proptest::prelude::any::<proptest::sample::Index>(),
            flip in proptest::prelude::any::<proptest::sample::Index>(),
            bit in 0u8..8,
            garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            let tmp = tempfile::tempdir().unwrap();
            let cache = CacheDir::open(tmp.path()).unwrap();
            let journal = Journal::new(&cache);
            journal.put(&record(3, "dir/ünï\ncode")).unwrap();
            let path = journal.record_path(3);
            let whole = fs::read(&path).unwrap();
            let cut_at = cut.index(whole.len());
            let mut flipped = whole.clone();
            flipped[flip.index(whole.len())] ^= 1 << bit;
            // Only the final newline may go: the checksum line is whole without it.
            let cut_damages = cut_at < whole.len() - 1;
            for (damaged, must_fail) in [(whole[..cut_at].to_vec(), cut_damages), (flipped, true), (garbage.clone(), false)] {
                fs::write(&path, &damaged).unwrap();
                let loaded = journal.load().unwrap();
                proptest::prop_assert!(path.exists(), "a damaged record was deleted");
                proptest::prop_assert_eq!(loaded.records.len() + loaded.unreadable.len(), 1);
                if must_fail {
                    proptest::prop_assert_eq!(loaded.unreadable.len(), 1);
                }
            }
        }
    }

    #[test]
    fn records_round_trip_and_replace() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(tmp.path()).unwrap();
        let journal = Journal::new(&cache);
        journal.put(&record(2, "b/ünï code")).unwrap();
        journal.put(&record(1, "a")).unwrap();
        let mut updated = record(2, "b/ünï code");
        updated.size = 7;
        journal.put(&updated).unwrap();
        let loaded = journal.load().unwrap();
        assert_eq!(unnumbered(loaded.records), vec![record(1, "a"), updated]);
        journal.remove(1).unwrap();
        journal.remove(1).unwrap();
        assert_eq!(journal.load().unwrap().records.len(), 1);
    }

    #[test]
    fn for_one_key_the_record_written_last_comes_last() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(tmp.path()).unwrap();
        let journal = Journal::new(&cache);
        // A rename over a file: the moved file (older data file, lower id) is journalled under
        // the key after the replaced one.
        journal.put(&record(9, "k")).unwrap();
        journal.put(&record(4, "k")).unwrap();
        journal.put(&record(6, "other")).unwrap();
        let loaded = journal.load().unwrap();
        let for_k: Vec<u64> = loaded
            .records
            .iter()
            .filter(|r| r.key == "k")
            .map(|r| r.id)
            .collect();
        assert_eq!(for_k, [9, 4]);
        // A journal opened later numbers its records after every loaded one.
        let again = Journal::new(&cache);
        again.load().unwrap();
        again.put(&record(1, "k")).unwrap();
        let last = again
            .load()
            .unwrap()
            .records
            .into_iter()
            .rfind(|r| r.key == "k");
        assert_eq!(last.map(|r| r.id), Some(1));
    }

    #[test]
    fn crash_leftovers_are_cleaned_and_corrupt_records_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(tmp.path()).unwrap();
        let journal = Journal::new(&cache);
        journal.put(&record(1, "kept")).unwrap();
        // A crash between writing the temporary file and the rename.
        let stray = cache.journal_dir().join(".tmp-999-0");
        fs::write(&stray, b"{half a rec").unwrap();
        let corrupt = cache.journal_dir().join("0000000000000009.rec");
        fs::write(&corrupt, b"not json").unwrap();
        let loaded = journal.load().unwrap();
        assert_eq!(unnumbered(loaded.records), vec![record(1, "kept")]);
        assert!(!stray.exists());
        assert_eq!(loaded.unreadable.len(), 1);
        assert!(corrupt.exists(), "corrupt records are left for an operator");
    }

    #[test]
    fn newer_records_are_not_trusted() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(tmp.path()).unwrap();
        let journal = Journal::new(&cache);
        let mut future = record(3, "x");
        future.version = RECORD_VERSION + 1;
        journal.put(&future).unwrap();
        let loaded = journal.load().unwrap();
        assert!(loaded.records.is_empty());
        assert_eq!(loaded.unreadable.len(), 1);
    }

    #[test]
    fn version_1_records_without_a_checksum_are_read_and_version_2_needs_one() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(tmp.path()).unwrap();
        let journal = Journal::new(&cache);
        let old = FileRecord {
            version: 1,
            ..record(4, "from an older keepfs")
        };
        fs::write(journal.record_path(4), serde_json::to_vec(&old).unwrap()).unwrap();
        let now = record(5, "cut at the end of its JSON");
        fs::write(journal.record_path(5), serde_json::to_vec(&now).unwrap()).unwrap();
        let loaded = journal.load().unwrap();
        assert_eq!(loaded.records, vec![old]);
        assert_eq!(loaded.unreadable.len(), 1);
        assert!(loaded.unreadable[0].1.contains("checksum line is missing"));
        // A bit flipped inside a value that still parses (the size) is caught.
        journal.put(&record(6, "k")).unwrap();
        let path = journal.record_path(6);
        let text = fs::read_to_string(&path)
            .unwrap()
            .replace("\"size\":42", "\"size\":43");
        fs::write(&path, text).unwrap();
        let loaded = journal.load().unwrap();
        assert!(
            loaded
                .unreadable
                .iter()
                .any(|(p, why)| *p == path && why.contains("checksum mismatch"))
        );
        assert!(loaded.records.iter().all(|r| r.id != 6));
    }
}
