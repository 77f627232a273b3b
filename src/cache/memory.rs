//! The memory block cache: fixed-size blocks of object versions, bounded by bytes.
//!
//! Blocks are keyed by key + ETag + block index, so a changed object is never served from the
//! blocks of its previous version; those simply age out.

use std::sync::Arc;

use bytes::Bytes;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;

/// Size of a cache block, and the unit of every ranged GET. Small enough that a random reader
/// fetches little it does not need; large enough that sequential reads move few entries.
pub const BLOCK_SIZE: u64 = 256 * 1024;

/// Identifies one block of one object version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockId {
    pub key: Arc<str>,
    pub etag: Arc<str>,
    pub index: u64,
}

/// The bytes of one block, kept as the chunks the network delivered them in: storing them
/// costs no copy, and the one copy happens when a read assembles its reply.
#[derive(Debug, Clone, Default)]
pub struct Block {
    chunks: Vec<Bytes>,
    len: usize,
}

impl Block {
    pub fn push(&mut self, chunk: Bytes) {
        self.len += chunk.len();
        self.chunks.push(chunk);
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes, as the chunks they arrived in.
    pub fn chunks(&self) -> &[Bytes] {
        &self.chunks
    }

    /// The same bytes in one allocation of exactly their size. Network chunks are slices of
    /// larger receive buffers that they keep alive; a cached block must own only its bytes, or
    /// the cache's byte bound would not bound memory.
    pub fn compact(self) -> Self {
        if self.chunks.len() <= 1 {
            return self;
        }
        let mut data = Vec::with_capacity(self.len);
        self.copy_range(0, self.len, &mut data);
        Bytes::from(data).into()
    }

    /// Appends bytes `from..to` of this block to `out`.
    pub fn copy_range(&self, from: usize, to: usize, out: &mut Vec<u8>) {
        let mut pos = 0;
        for chunk in &self.chunks {
            let (start, end) = (pos, pos + chunk.len());
            pos = end;
            if end <= from {
                continue;
            }
            if start >= to {
                break;
            }
            out.extend_from_slice(&chunk[from.max(start) - start..to.min(end) - start]);
        }
    }
}

impl From<Bytes> for Block {
    fn from(chunk: Bytes) -> Self {
        let mut block = Block::default();
        block.push(chunk);
        block
    }
}

/// Recently read blocks, shared by every open file.
#[derive(Clone)]
pub struct MemoryCache {
    blocks: Cache<BlockId, Arc<Block>>,
}

impl MemoryCache {
    /// A cache holding at most `max_bytes` of block data (0 disables it).
    pub fn new(max_bytes: u64) -> Self {
        let blocks = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_: &BlockId, b: &Arc<Block>| u32::try_from(b.len()).unwrap_or(u32::MAX))
            // Plain LRU: a re-read of what was just read sequentially must hit, which TinyLFU's
            // admission filter would refuse for blocks seen only once.
            .eviction_policy(EvictionPolicy::lru())
            .eviction_listener(|_, _, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    let m = crate::metrics::get();
                    m.cache_evictions
                        .get_or_create(&crate::metrics::MEMORY)
                        .inc();
                }
            })
            .build();
        Self { blocks }
    }

    pub fn get(&self, id: &BlockId) -> Option<Arc<Block>> {
        self.blocks.get(id)
    }

    /// Bytes and blocks currently held (after pending evictions are applied).
    pub fn usage(&self) -> (u64, u64) {
        self.blocks.run_pending_tasks();
        (self.blocks.weighted_size(), self.blocks.entry_count())
    }

    pub fn insert(&self, id: BlockId, data: Arc<Block>) {
        self.blocks.insert(id, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(etag: &str, index: u64) -> BlockId {
        BlockId {
            key: "k".into(),
            etag: etag.into(),
            index,
        }
    }

    #[test]
    fn versions_do_not_mix() {
        let cache = MemoryCache::new(1 << 20);
        cache.insert(id("a", 0), Arc::new(Bytes::from_static(b"old").into()));
        let mut out = Vec::new();
        cache.get(&id("a", 0)).unwrap().copy_range(0, 3, &mut out);
        assert_eq!(out, b"old");
        assert!(cache.get(&id("b", 0)).is_none());
    }

    #[test]
    fn ranges_across_chunks() {
        let mut block = Block::default();
        for part in [&b"abc"[..], b"", b"defg", b"h"] {
            block.push(Bytes::copy_from_slice(part));
        }
        assert_eq!(block.len(), 8);
        for (from, to) in [(0, 8), (2, 5), (3, 7), (7, 8), (4, 4), (0, 1)] {
            let mut out = Vec::new();
            block.copy_range(from, to, &mut out);
            assert_eq!(out, &b"abcdefgh"[from..to], "{from}..{to}");
        }
    }

    #[test]
    fn bounded_by_bytes() {
        let cache = MemoryCache::new(4 * BLOCK_SIZE);
        for i in 0..16 {
            let data = Bytes::from(vec![0u8; BLOCK_SIZE as usize]);
            cache.insert(id("a", i), Arc::new(data.into()));
        }
        cache.blocks.run_pending_tasks();
        assert!(cache.blocks.weighted_size() <= 4 * BLOCK_SIZE);
        assert!(cache.get(&id("a", 15)).is_some(), "most recent block kept");
    }
}
