//! Caches: file blocks in memory, and the cache directory on local disk that later holds the
//! write-back journal.

mod dir;
mod disk;
pub mod heads;
pub mod journal;
mod memory;

pub use dir::{CacheDir, CacheDirError, FORMAT_VERSION, default_cache_dir, private_file};
pub use disk::{DiskCache, disk_space};
pub use memory::{BLOCK_SIZE, Block, BlockId, MemoryCache};
