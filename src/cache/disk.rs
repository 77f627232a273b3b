//! The disk block cache: clean blocks of object versions in the cache directory, so a restarted
//! mount (a pod restart) reads its working set from local disk instead of S3 again.
//!
//! One file per block under `blocks/`, named by a hash of key + ETag + block index (never by the
//! key itself): a changed object's new ETag names new blocks, and an open validates the ETag
//! with HEAD first, so stale blocks are never served; they age out. Each file carries the block
//! length and a CRC32 of its bytes; a block that fails the check is deleted and fetched again,
//! never served. Files are written in place without fsync and indexed once complete: a block
//! lost or torn by a crash is only a miss.
//!
//! Clean blocks give way to written data: they are evicted (least recently used first) to keep
//! within `--max-cache-size` (written data and blocks together) or, without it, within a
//! quarter of the cache disk, always leaving `--cache-min-free` of the disk free ([`MinFree`]).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use bytes::Bytes;
use lru::LruCache;
use sha2::{Digest, Sha256};

use super::memory::{Block, BlockId};
use crate::config::MinFree;

const MAGIC: &[u8; 8] = b"KFSBLK01";
const HEADER: usize = 16;

/// A block file's name: the hash of what it holds.
type BlockName = [u8; 32];

fn block_name(id: &BlockId) -> BlockName {
    let mut h = Sha256::new();
    // The block size is part of the name: another size makes other blocks, never wrong ones.
    h.update(super::BLOCK_SIZE.to_le_bytes());
    h.update(id.key.as_bytes());
    h.update([0]);
    h.update(id.etag.as_bytes());
    h.update([0]);
    h.update(id.index.to_le_bytes());
    h.finalize().into()
}

fn hex(name: &BlockName) -> String {
    name.iter().map(|b| format!("{b:02x}")).collect()
}

/// Counters for tests and `keepfs status`.
#[derive(Debug, Default)]
pub struct DiskCacheStats {
    pub hits: AtomicU64,
    pub corrupt: AtomicU64,
}

/// Reports the bytes written (dirty) data holds in the cache directory.
pub type OtherUsage = Box<dyn Fn() -> u64 + Send + Sync>;

pub struct DiskCache {
    dir: PathBuf,
    /// Block name → bytes on disk, least recently used first.
    index: Mutex<(LruCache<BlockName, u64>, u64)>,
    /// `--max-cache-size`, shared with written data.
    limit: Option<u64>,
    /// `--cache-min-free`: free space blocks leave on the disk.
    min_free: MinFree,
    /// Whether blocks are being turned away for want of free space (warned once per episode).
    starved: AtomicBool,
    /// Bytes of written data in the cache directory (set once writes are enabled).
    dirty_bytes: OnceLock<OtherUsage>,
    pub stats: DiskCacheStats,
}

impl DiskCache {
    /// Opens the block store in `dir` (created 0700 if needed), indexing the blocks a previous
    /// run left, oldest first. `limit` bounds blocks and written data together (bytes);
    /// `min_free` is what blocks always leave free on the disk.
    pub fn open(dir: &Path, limit: Option<u64>, min_free: MinFree) -> std::io::Result<Self> {
        make_dir(dir)?;
        for sub in 0..=255u8 {
            make_dir(&dir.join(format!("{sub:02x}")))?;
        }
        let mut found = Vec::new();
        for sub in fs::read_dir(dir)? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for entry in fs::read_dir(sub.path())? {
                let entry = entry?;
                let Some(block) = parse_hex(&entry.file_name().to_string_lossy()) else {
                    continue;
                };
                let meta = entry.metadata()?;
                let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                found.push((modified, block, meta.len()));
            }
        }
        found.sort();
        let mut lru = LruCache::unbounded();
        let mut bytes = 0;
        for (_, name, len) in found {
            lru.put(name, len);
            bytes += len;
        }
        if !lru.is_empty() {
            tracing::info!(
                blocks = lru.len(),
                bytes,
                "disk block cache: blocks from an earlier run"
            );
        }
        Ok(DiskCache {
            dir: dir.to_owned(),
            index: Mutex::new((lru, bytes)),
            limit,
            min_free,
            starved: AtomicBool::new(false),
            dirty_bytes: OnceLock::new(),
            stats: DiskCacheStats::default(),
        })
    }

    /// Tells the cache how much written data shares the directory (read-write mounts).
    pub fn share_with_written_data(&self, dirty_bytes: OtherUsage) {
        let _ = self.dirty_bytes.set(dirty_bytes);
    }

    fn index(&self) -> std::sync::MutexGuard<'_, (LruCache<BlockName, u64>, u64)> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, name: &BlockName) -> PathBuf {
        let hex = hex(name);
        self.dir.join(&hex[..2]).join(hex)
    }

    /// Bytes of clean blocks on disk, and their number.
    pub fn usage(&self) -> (u64, usize) {
        let index = self.index();
        (index.1, index.0.len())
    }

    /// Whether blocks are being turned away because the cache disk has less free space than
    /// `--cache-min-free` (since the last block that could not be stored, until one can).
    pub fn below_min_free(&self) -> bool {
        self.starved.load(Ordering::Relaxed)
    }

    /// Whether the block may be on disk (cheap: the index only).
    pub fn contains(&self, id: &BlockId) -> bool {
        self.index().0.contains(&block_name(id))
    }

    /// Reads a block; `None` if absent or corrupt (a corrupt file is deleted). Blocking I/O.
    pub fn get(&self, id: &BlockId) -> Option<Block> {
        let name = block_name(id);
        // Also marks it the most recently used.
        self.index().0.get(&name)?;
        let path = self.path(&name);
        match read_block(&path) {
            Ok(data) => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                Some(Block::from(data))
            }
            Err(why) => {
                if path.exists() {
                    self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(key = %id.key, block = id.index, why, "corrupt block in the disk cache dropped; fetching it again");
                }
                self.forget(&name);
                None
            }
        }
    }

    /// Stores a block, evicting older ones to stay within the budget. Blocking I/O; failures
    /// (a full disk) only mean the block is not cached.
    pub fn insert(&self, id: &BlockId, block: &Block) {
        let name = block_name(id);
        let len = (HEADER + block.len()) as u64;
        if self.index().0.contains(&name) {
            return;
        }
        if !self.make_room(len) {
            return;
        }
        if self.starved.swap(false, Ordering::Relaxed) {
            tracing::info!(
                "disk block cache: free space is back above --cache-min-free; storing blocks again"
            );
        }
        let path = self.path(&name);
        match write_block(&path, block) {
            Ok(()) => {
                let mut index = self.index();
                if index.0.put(name, len).is_none() {
                    index.1 += len;
                }
            }
            Err(e) => tracing::debug!(error = %e, "block not cached on disk"),
        }
    }

    /// Evicts least recently used blocks until `len` more bytes fit the budget and leave the
    /// disk's reserve free; false if they can't (nothing left to evict).
    fn make_room(&self, len: u64) -> bool {
        let dirty = self.dirty_bytes.get().map_or(0, |f| f());
        loop {
            let Ok((total, available)) = disk_space(&self.dir) else {
                return false;
            };
            let budget = match self.limit {
                Some(limit) => limit.saturating_sub(dirty),
                None => total / 4,
            };
            let reserve = self.min_free.of(total);
            // Saturating: `--cache-min-free` takes any size, up to u64::MAX bytes.
            let above_reserve = available.saturating_sub(reserve) >= len;
            if self.index().1 + len <= budget && above_reserve {
                return true;
            }
            if !self.evict_one() {
                if !above_reserve && !self.starved.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        available,
                        reserve,
                        min_free = %self.min_free,
                        "disk block cache: the cache disk is short of free space; blocks read from S3 are kept in memory only until it has more than --cache-min-free"
                    );
                }
                return false;
            }
        }
    }

    /// Frees at least `bytes` of disk by evicting clean blocks (written data needs the room);
    /// returns what was freed.
    pub fn evict(&self, bytes: u64) -> u64 {
        let mut freed = 0;
        while freed < bytes {
            let before = self.index().1;
            if !self.evict_one() {
                break;
            }
            freed += before - self.index().1;
        }
        freed
    }

    fn evict_one(&self) -> bool {
        let oldest = self.index().0.peek_lru().map(|(name, _)| *name);
        match oldest {
            Some(name) => {
                self.forget(&name);
                let m = crate::metrics::get();
                m.cache_evictions.get_or_create(&crate::metrics::DISK).inc();
                true
            }
            None => false,
        }
    }

    fn forget(&self, name: &BlockName) {
        let mut index = self.index();
        if let Some(len) = index.0.pop(name) {
            index.1 -= len;
        }
        drop(index);
        let _ = fs::remove_file(self.path(name));
    }
}

fn make_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn parse_hex(name: &str) -> Option<BlockName> {
    if name.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(name.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn read_block(path: &Path) -> Result<Bytes, String> {
    let mut file = File::open(path).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    if buf.len() < HEADER || &buf[..8] != MAGIC {
        return Err("not a block file".into());
    }
    let len = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(buf[12..16].try_into().expect("4 bytes"));
    if buf.len() != HEADER + len {
        return Err(format!("{} bytes, header says {len}", buf.len() - HEADER));
    }
    if crc32fast::hash(&buf[HEADER..]) != crc {
        return Err("checksum mismatch".into());
    }
    let mut data = Bytes::from(buf);
    Ok(data.split_off(HEADER))
}

/// Writes a block file in place: the index learns of it only once it is complete, and a file
/// torn by a crash fails its length or CRC check on the next start. Header and chunks go out
/// in one vectored write, without assembling a copy.
fn write_block(path: &Path, block: &Block) -> std::io::Result<()> {
    let chunks = block.chunks();
    let mut crc = crc32fast::Hasher::new();
    for chunk in chunks {
        crc.update(chunk);
    }
    let mut header = [0u8; HEADER];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&(block.len() as u32).to_le_bytes());
    header[12..16].copy_from_slice(&crc.finalize().to_le_bytes());
    let mut file = super::dir::private_file()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let mut parts: Vec<std::io::IoSlice<'_>> = Vec::with_capacity(chunks.len() + 1);
    parts.push(std::io::IoSlice::new(&header));
    parts.extend(chunks.iter().map(|c| std::io::IoSlice::new(c)));
    let mut slices = &mut parts[..];
    let result = (|| {
        while !slices.is_empty() {
            let n = file.write_vectored(slices)?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            std::io::IoSlice::advance_slices(&mut slices, n);
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(path);
    }
    result
}

/// (total, available) bytes of the filesystem holding `path`.
pub fn disk_space(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path =
        std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `stat` points to writable memory of the
    // right type; statvfs fills it completely when it returns 0.
    let stat = unsafe {
        if libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        stat.assume_init()
    };
    let unit = stat.f_frsize;
    Ok((stat.f_blocks * unit, stat.f_bavail * unit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A block file cut short at any byte, with any bit flipped, or replaced by any bytes
        /// is refused (or, for arbitrary bytes that happen to check out, is what they say):
        /// never a panic, never other bytes than were written.
        #[test]
        fn damaged_block_files_are_refused(
            data in proptest::collection::vec(any::<u8>(), 0..4096),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
            garbage in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("b");
            write_block(&path, &Block::from(Bytes::from(data.clone()))).unwrap();
            let whole = fs::read(&path).unwrap();
            prop_assert_eq!(read_block(&path).unwrap(), Bytes::from(data.clone()));

            fs::write(&path, &whole[..cut.index(whole.len())]).unwrap();
            prop_assert!(read_block(&path).is_err());

            let mut flipped = whole.clone();
            flipped[flip.index(whole.len())] ^= 1 << bit;
            fs::write(&path, &flipped).unwrap();
            prop_assert!(read_block(&path).is_err());

            fs::write(&path, &garbage).unwrap();
            if let Ok(read) = read_block(&path) {
                prop_assert_eq!(&read[..], &garbage[HEADER..]);
            }
        }
    }

    fn id(key: &str, etag: &str, index: u64) -> BlockId {
        BlockId {
            key: key.into(),
            etag: etag.into(),
            index,
        }
    }

    fn block(fill: u8, len: usize) -> Block {
        Block::from(Bytes::from(vec![fill; len]))
    }

    fn bytes_of(b: &Block) -> Vec<u8> {
        let mut out = Vec::new();
        b.copy_range(0, b.len(), &mut out);
        out
    }

    #[test]
    fn blocks_survive_a_reopen_and_versions_do_not_mix() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(tmp.path(), Some(1 << 30), MinFree::Bytes(0)).unwrap();
        cache.insert(&id("a/b", "e1", 0), &block(1, 1000));
        cache.insert(&id("a/b", "e1", 1), &block(2, 10));
        assert_eq!(
            bytes_of(&cache.get(&id("a/b", "e1", 0)).unwrap()),
            vec![1; 1000]
        );
        assert!(cache.get(&id("a/b", "e2", 0)).is_none(), "another version");
        drop(cache);
        let cache = DiskCache::open(tmp.path(), Some(1 << 30), MinFree::Bytes(0)).unwrap();
        assert_eq!(cache.usage().1, 2);
        assert_eq!(
            bytes_of(&cache.get(&id("a/b", "e1", 1)).unwrap()),
            vec![2; 10]
        );
    }

    #[test]
    fn corrupt_blocks_are_dropped_never_served() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(tmp.path(), Some(1 << 30), MinFree::Bytes(0)).unwrap();
        let b = id("k", "e", 3);
        cache.insert(&b, &block(7, 4096));
        let path = cache.path(&block_name(&b));
        let mut raw = fs::read(&path).unwrap();
        raw[HEADER + 100] ^= 0xff;
        fs::write(&path, raw).unwrap();
        assert!(cache.get(&b).is_none());
        assert!(!path.exists(), "the corrupt file is deleted");
        assert_eq!(cache.stats.corrupt.load(Ordering::Relaxed), 1);
        assert_eq!(cache.usage(), (0, 0));
        // A truncated file (a crash mid-write that still got renamed) is a miss too.
        cache.insert(&b, &block(7, 4096));
        let raw = fs::read(&path).unwrap();
        fs::write(&path, &raw[..2000]).unwrap();
        assert!(cache.get(&b).is_none());
    }

    #[test]
    fn least_recently_used_blocks_go_first_and_written_data_counts() {
        let tmp = tempfile::tempdir().unwrap();
        let per_block = (HEADER + 1000) as u64;
        let cache = DiskCache::open(tmp.path(), Some(3 * per_block), MinFree::Bytes(0)).unwrap();
        for i in 0..3 {
            cache.insert(&id("k", "e", i), &block(i as u8, 1000));
        }
        assert!(cache.get(&id("k", "e", 0)).is_some()); // 0 is now the most recent
        cache.insert(&id("k", "e", 3), &block(3, 1000));
        assert!(
            cache.get(&id("k", "e", 1)).is_none(),
            "least recently used evicted"
        );
        assert!(cache.get(&id("k", "e", 0)).is_some());
        assert_eq!(cache.usage().1, 3);
        // Written data takes room from clean blocks.
        cache.share_with_written_data(Box::new(move || 2 * per_block));
        cache.insert(&id("k", "e", 4), &block(4, 1000));
        assert_eq!(cache.usage().1, 1);
        assert_eq!(cache.evict(1), per_block);
        assert_eq!(cache.usage(), (0, 0));
    }

    #[test]
    fn blocks_leave_min_free_on_the_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(tmp.path(), None, MinFree::Bytes(0)).unwrap();
        cache.insert(&id("k", "e", 0), &block(1, 1000));
        assert_eq!(cache.usage().1, 1);
        drop(cache);
        // Nothing is ever free enough for a reserve of the whole disk: the block a previous run
        // left gives way, and new ones are not stored.
        let mut cache = DiskCache::open(tmp.path(), None, MinFree::Percent(100)).unwrap();
        assert_eq!(cache.usage().1, 1);
        cache.insert(&id("k", "e", 1), &block(2, 1000));
        assert_eq!(cache.usage(), (0, 0));
        assert!(cache.get(&id("k", "e", 0)).is_none());
        assert!(cache.starved.load(Ordering::Relaxed));
        // A reserve no disk holds, as a size: refused the same way, without overflowing.
        cache.min_free = MinFree::Bytes(u64::MAX);
        cache.insert(&id("k", "e", 2), &block(3, 1000));
        assert_eq!(cache.usage(), (0, 0));
        // Room again (here: a reserve of nothing): blocks are stored, and the episode is over.
        cache.min_free = MinFree::Bytes(0);
        cache.insert(&id("k", "e", 3), &block(4, 1000));
        assert_eq!(cache.usage().1, 1);
        assert!(!cache.starved.load(Ordering::Relaxed));
    }
}
