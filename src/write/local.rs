//! The bytes of a local copy: a data file in the cache directory that may be sparse.
//!
//! Opening an existing object for writing does not download it. The data file starts as a hole
//! of the object's size and records which byte ranges it really holds: those written locally
//! (`changed`) and those fetched from the base object on first touch (`present` covers both).
//! Bytes below `base_len` that are not present are still the base object's and are fetched on
//! demand; bytes at or above `base_len` that were never written are zeros (a truncated-away
//! tail stays zero when the file grows again).

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rangemap::RangeSet;
use serde::{Deserialize, Serialize};

use crate::store::{ObjectStore, StoreError};

/// Which bytes of a local copy are where. Stored in the journal record with the file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coverage {
    /// Bytes `0..base_len` not in `present` are the base object's, at the same offsets.
    #[serde(default)]
    pub base_len: u64,
    /// Ranges the data file holds (fetched or written).
    #[serde(default)]
    pub present: RangeSet<u64>,
    /// Ranges written locally since the file left S3.
    #[serde(default)]
    pub changed: RangeSet<u64>,
}

impl Coverage {
    /// A copy of a base object of `base_len` bytes of which nothing is local yet.
    pub fn of_base(base_len: u64) -> Self {
        Coverage {
            base_len,
            ..Coverage::default()
        }
    }

    /// The ranges within `range` still to be fetched from the base object.
    pub fn missing(&self, range: Range<u64>) -> Vec<Range<u64>> {
        let range = range.start..range.end.min(self.base_len);
        if range.is_empty() {
            return Vec::new();
        }
        self.present.gaps(&range).collect()
    }

    /// Whether `range` is byte for byte the base object's, so an upload may copy it from there.
    pub fn unchanged(&self, range: &Range<u64>) -> bool {
        range.end <= self.base_len && !self.changed.overlaps(range)
    }

    /// Whether every byte is local (nothing left to fetch).
    pub fn complete(&self) -> bool {
        self.missing(0..self.base_len).is_empty()
    }

    fn cut(&mut self, size: u64) {
        self.base_len = self.base_len.min(size);
        if size < u64::MAX {
            self.present.remove(size..u64::MAX);
            self.changed.remove(size..u64::MAX);
        }
    }
}

/// A data file and its coverage, shared by the dirty-file table, open handles and uploads.
/// Every change to the file's bytes happens under the coverage lock, so a fetch that lands
/// late never overwrites a write made meanwhile.
/// Bytes the local copies hold in the cache directory (what `--max-cache-size` bounds).
#[derive(Debug, Default)]
pub struct CacheUsage(AtomicU64);

impl CacheUsage {
    pub fn bytes(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
pub struct LocalData {
    /// Replaced (never modified in place) when acknowledged bytes are about to be overwritten:
    /// see [`LocalData::copy_into`].
    file: RwLock<Arc<File>>,
    coverage: Mutex<Coverage>,
    usage: Arc<CacheUsage>,
    /// What this copy adds to `usage`: the length of its present ranges.
    held: AtomicU64,
    /// The S3 version this copy is based on (missing bytes come from it; uploads are
    /// conditional on it); `None` for a new file. Kept with the bytes so that a handle still
    /// reads them after the dirty file is uploaded and dropped.
    base_etag: Mutex<Option<String>>,
}

impl LocalData {
    pub fn new(
        file: File,
        mut coverage: Coverage,
        base_etag: Option<String>,
        usage: Arc<CacheUsage>,
    ) -> Self {
        // A complete copy recorded without ranges holds its whole length.
        if coverage.base_len == 0
            && coverage.present.is_empty()
            && let Ok(len) = file.metadata().map(|m| m.len())
            && len > 0
        {
            coverage.present.insert(0..len);
        }
        let data = LocalData {
            file: RwLock::new(Arc::new(file)),
            coverage: Mutex::new(Coverage::default()),
            usage,
            held: AtomicU64::new(0),
            base_etag: Mutex::new(base_etag),
        };
        data.recount(&coverage);
        *data.coverage_lock() = coverage;
        data
    }

    /// Brings `usage` up to date with all of `coverage` (when it was replaced wholesale; the
    /// write path counts only what it changes). Called with the coverage lock held.
    fn recount(&self, coverage: &Coverage) {
        let now: u64 = coverage.present.iter().map(|r| r.end - r.start).sum();
        let before = self.held.load(Ordering::Relaxed);
        if now >= before {
            self.hold(now - before);
        } else {
            self.release(before - now);
        }
    }

    /// Counts `bytes` more present in this copy (and the cache).
    fn hold(&self, bytes: u64) {
        self.held.fetch_add(bytes, Ordering::Relaxed);
        self.usage.0.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts `bytes` fewer present in this copy (and the cache).
    fn release(&self, bytes: u64) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
        self.usage.0.fetch_sub(bytes, Ordering::Relaxed);
    }

    pub fn base_etag(&self) -> Option<String> {
        self.base_etag
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sets the base version, e.g. to what an upload just made S3 hold: its bytes at the
    /// missing ranges are the old base's.
    pub fn set_base_etag(&self, etag: Option<String>) {
        *self.base_etag.lock().unwrap_or_else(|e| e.into_inner()) = etag;
    }

    fn coverage_lock(&self) -> std::sync::MutexGuard<'_, Coverage> {
        // Updates are plain set operations after the file I/O succeeded: poisoning can't
        // leave them half-done.
        self.coverage.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn coverage(&self) -> Coverage {
        self.coverage_lock().clone()
    }

    pub fn missing(&self, range: Range<u64>) -> Vec<Range<u64>> {
        self.coverage_lock().missing(range)
    }

    fn file(&self) -> Arc<File> {
        // A swap either happened or not: poisoning can't leave the file half-replaced.
        self.file.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The bytes as they are now, for an upload: the data file and its coverage. Taken when
    /// the file is journalled and nobody writes it, it stays exactly that: a later change below
    /// the recorded size goes to a copy (copy-on-write), one beyond it is past the snapshot.
    pub fn freeze(&self) -> Frozen {
        let coverage = self.coverage_lock();
        Frozen {
            file: self.file(),
            coverage: coverage.clone(),
        }
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.file().metadata()?.len())
    }

    /// Copies what the file holds into `new` and continues with `new`: the old data file keeps
    /// the bytes its journal record acknowledged while the new one takes the changes.
    pub fn copy_into(&self, new: File) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let coverage = self.coverage_lock();
        let mut file = self.file.write().unwrap_or_else(|e| e.into_inner());
        let len = file.metadata()?.len();
        new.set_len(len)?;
        let mut buf = vec![0u8; CHUNK as usize];
        for range in coverage.present.iter() {
            let mut at = range.start;
            while at < range.end.min(len) {
                let n = (range.end.min(len) - at).min(CHUNK) as usize;
                file.read_exact_at(&mut buf[..n], at)?;
                new.write_all_at(&buf[..n], at)?;
                at += n as u64;
            }
        }
        *file = Arc::new(new);
        Ok(())
    }

    /// Writes `bytes` at `offset` (a local change).
    pub fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        let mut coverage = self.coverage_lock();
        self.file().write_all_at(bytes, offset)?;
        let range = offset..offset + bytes.len() as u64;
        if !range.is_empty() {
            let added = range.end - range.start - present_in(&coverage.present, &range);
            coverage.present.insert(range.clone());
            coverage.changed.insert(range);
            self.hold(added);
        }
        Ok(())
    }

    /// Stores bytes fetched from the base object starting at `offset`, where they are still
    /// missing (bytes written meanwhile win).
    pub fn fill(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        let mut coverage = self.coverage_lock();
        for gap in coverage.missing(offset..offset + bytes.len() as u64) {
            let from = (gap.start - offset) as usize;
            let to = (gap.end - offset) as usize;
            self.file().write_all_at(&bytes[from..to], gap.start)?;
            self.hold(gap.end - gap.start);
            coverage.present.insert(gap);
        }
        Ok(())
    }

    /// Truncates or extends the file; a cut-off tail is not the base's any more.
    pub fn set_len(&self, size: u64) -> io::Result<()> {
        let mut coverage = self.coverage_lock();
        self.file().set_len(size)?;
        let cut = present_in(&coverage.present, &(size..u64::MAX));
        coverage.cut(size);
        self.release(cut);
        Ok(())
    }

    /// Forgets the base object: everything must be local (after [`LocalData::missing`] of
    /// the whole file came back empty), e.g. before the file moves to another key.
    pub fn detach_from_base(&self) {
        let mut coverage = self.coverage_lock();
        coverage.base_len = 0;
        coverage.changed.clear();
        coverage.present.clear();
        if let Ok(len) = self.size()
            && len > 0
        {
            coverage.present.insert(0..len);
        }
        self.recount(&coverage);
    }

    /// Flushes the data file to disk and returns the coverage it holds: taken before the
    /// flush, so every range it names is on disk when this returns.
    pub fn sync(&self) -> io::Result<Coverage> {
        let coverage = self.coverage();
        self.file().sync_all()?;
        Ok(coverage)
    }

    /// Reads up to `len` bytes at `offset` as the file holds them (the caller fetches missing
    /// ranges first). The file's length is the copy's size.
    pub fn read(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let size = self.size()?;
        if offset >= size {
            return Ok(Vec::new());
        }
        let len = len.min(size - offset) as usize;
        let mut buf = vec![0u8; len];
        let mut done = 0;
        while done < len {
            match self
                .file()
                .read_at(&mut buf[done..], offset + done as u64)?
            {
                0 => break,
                n => done += n,
            }
        }
        buf.truncate(done);
        Ok(buf)
    }
}

/// How many bytes of `range` `present` covers.
fn present_in(present: &RangeSet<u64>, range: &Range<u64>) -> u64 {
    present
        .overlapping(range)
        .map(|r| r.end.min(range.end) - r.start.max(range.start))
        .sum()
}

/// A local copy's bytes frozen for an upload (see [`LocalData::freeze`]).
#[derive(Debug, Clone)]
pub struct Frozen {
    file: Arc<File>,
    pub coverage: Coverage,
}

impl Frozen {
    /// Bytes of data file `file` as a journal record describes them (`coverage`).
    pub fn of_file(file: File, coverage: Coverage) -> Self {
        Frozen {
            file: Arc::new(file),
            coverage,
        }
    }

    /// Bytes `start..start + len`: from the data file, and where the copy never held them,
    /// from base object `key` version `etag` (`None`: the base is gone; those bytes are zeros).
    pub async fn read<S: ObjectStore>(
        &self,
        store: &S,
        key: &str,
        etag: Option<&str>,
        start: u64,
        len: u64,
    ) -> Result<Vec<u8>, StoreError> {
        let local = |e: io::Error| StoreError::Other(format!("reading local copy of {key}: {e}"));
        let mut buf = vec![0u8; len as usize];
        let size = self.file.metadata().map_err(local)?.len();
        if start + len > size {
            return Err(StoreError::Other(format!(
                "local copy of {key} is shorter than its size"
            )));
        }
        self.file.read_exact_at(&mut buf, start).map_err(local)?;
        if let Some(etag) = etag {
            for gap in self.coverage.missing(start..start + len) {
                let at = (gap.start - start) as usize..(gap.end - start) as usize;
                get_into(store, key, etag, gap, &mut buf[at]).await?;
            }
        }
        Ok(buf)
    }
}

/// GETs issued to fill a local copy are at most this long.
const FETCH_PIECE: u64 = 8 << 20;

/// Fetches the bytes of `range` that `data` still lacks from base object `key` version
/// `etag`.
pub async fn fetch_missing<S: ObjectStore>(
    store: &S,
    key: &str,
    etag: &str,
    data: &LocalData,
    range: Range<u64>,
) -> Result<(), StoreError> {
    for gap in data.missing(range) {
        let mut start = gap.start;
        while start < gap.end {
            let end = (start + FETCH_PIECE).min(gap.end);
            let mut buf = vec![0u8; (end - start) as usize];
            get_into(store, key, etag, start..end, &mut buf).await?;
            data.fill(&buf, start)
                .map_err(|e| StoreError::Other(format!("writing local copy of {key}: {e}")))?;
            start = end;
        }
    }
    Ok(())
}

/// GETs bytes `range` of version `etag` of `key` into `buf` (as long as `range`).
async fn get_into<S: ObjectStore>(
    store: &S,
    key: &str,
    etag: &str,
    range: Range<u64>,
    buf: &mut [u8],
) -> Result<(), StoreError> {
    let mut at = 0;
    store
        .get_range(key, etag, range.start, range.end, &mut |chunk| {
            // The store checks the length; never write past the range regardless.
            let n = chunk.len().min(buf.len() - at);
            buf[at..at + n].copy_from_slice(&chunk[..n]);
            at += n;
        })
        .await
}

impl Drop for LocalData {
    fn drop(&mut self) {
        // The data file's blocks are freed once the last handle closes it.
        let held = *self.held.get_mut();
        self.usage.0.fetch_sub(held, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(base_len: u64) -> (tempfile::TempDir, LocalData) {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("d"))
            .unwrap();
        file.set_len(base_len).unwrap();
        (
            dir,
            LocalData::new(
                file,
                Coverage::of_base(base_len),
                Some("\"e\"".into()),
                Arc::default(),
            ),
        )
    }

    #[test]
    fn writes_win_over_late_fills() {
        let (_dir, data) = local(10);
        assert_eq!(data.missing(0..10), vec![0..10]);
        data.write_at(b"WW", 4).unwrap();
        assert_eq!(data.missing(0..10), vec![0..4, 6..10]);
        data.fill(b"0123456789", 0).unwrap();
        assert!(data.missing(0..10).is_empty());
        assert_eq!(data.read(0, 100).unwrap(), b"0123WW6789");
        let coverage = data.coverage();
        assert!(coverage.unchanged(&(0..4)));
        assert!(!coverage.unchanged(&(3..5)));
        assert!(!coverage.unchanged(&(8..11)), "beyond the base");
    }

    #[test]
    fn a_truncated_tail_is_zero_when_the_file_grows_again() {
        let (_dir, data) = local(10);
        data.set_len(4).unwrap();
        data.set_len(8).unwrap();
        assert_eq!(data.missing(0..8), vec![0..4]);
        data.fill(b"abcdefgh", 0).unwrap();
        assert_eq!(data.read(0, 8).unwrap(), b"abcd\0\0\0\0");
        assert!(data.coverage().complete());
    }

    #[test]
    fn usage_counts_present_bytes_once() {
        let (_dir, data) = local(100);
        data.write_at(&[1; 10], 0).unwrap();
        data.write_at(&[2; 10], 5).unwrap(); // 5 new bytes
        assert_eq!(data.usage.bytes(), 15);
        data.fill(&[0; 100], 0).unwrap(); // the other 85
        assert_eq!(data.usage.bytes(), 100);
        data.set_len(40).unwrap();
        assert_eq!(data.usage.bytes(), 40);
        data.write_at(&[3; 20], 30).unwrap(); // 10 new bytes past the end
        assert_eq!(data.usage.bytes(), 50);
        let usage = data.usage.clone();
        drop(data);
        assert_eq!(usage.bytes(), 0, "released when the copy goes");
    }

    #[test]
    fn coverage_round_trips_through_json() {
        let mut coverage = Coverage::of_base(100);
        coverage.present.insert(0..10);
        coverage.changed.insert(5..10);
        let json = serde_json::to_string(&coverage).unwrap();
        assert_eq!(serde_json::from_str::<Coverage>(&json).unwrap(), coverage);
        let old: Coverage = serde_json::from_str("{}").unwrap();
        assert!(
            old.complete(),
            "records from before coverage existed are complete"
        );
    }
}
