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

/// Bytes of recently read blocks, shared by every open file.
#[derive(Clone)]
pub struct MemoryCache {
    blocks: Cache<BlockId, Bytes>,
}

impl MemoryCache {
    /// A cache holding at most `max_bytes` of block data (0 disables it).
    pub fn new(max_bytes: u64) -> Self {
        let blocks = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_: &BlockId, b: &Bytes| u32::try_from(b.len()).unwrap_or(u32::MAX))
            // Plain LRU: a re-read of what was just read sequentially must hit, which TinyLFU's
            // admission filter would refuse for blocks seen only once.
            .eviction_policy(EvictionPolicy::lru())
            .build();
        Self { blocks }
    }

    pub fn get(&self, id: &BlockId) -> Option<Bytes> {
        self.blocks.get(id)
    }

    pub fn insert(&self, id: BlockId, data: Bytes) {
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
        cache.insert(id("a", 0), Bytes::from_static(b"old"));
        assert_eq!(cache.get(&id("a", 0)).as_deref(), Some(&b"old"[..]));
        assert!(cache.get(&id("b", 0)).is_none());
    }

    #[test]
    fn bounded_by_bytes() {
        let cache = MemoryCache::new(4 * BLOCK_SIZE);
        for i in 0..16 {
            cache.insert(id("a", i), Bytes::from(vec![0u8; BLOCK_SIZE as usize]));
        }
        cache.blocks.run_pending_tasks();
        assert!(cache.blocks.weighted_size() <= 4 * BLOCK_SIZE);
        assert!(cache.get(&id("a", 15)).is_some(), "most recent block kept");
    }
}
