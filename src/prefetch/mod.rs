//! Reading objects: shared block fetching plus per-file sequential prefetch.

mod fetcher;
mod reader;

pub use fetcher::{BlockFetcher, FetchStats, ObjectVersion};
pub use reader::{FileReader, PrefetchConfig};
