//! Shared block fetching: one GET per run of missing blocks, deduplicated across readers.
//!
//! A block is either in the memory cache, in flight (some GET is streaming it: waiters hold a
//! `watch` receiver), or absent. Requesting absent blocks starts GETs that stream the body and
//! publish each block the moment it is complete, so a reader can consume the start of a large
//! range while the rest is still arriving.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cache::{BLOCK_SIZE, Block, BlockId, DiskCache, MemoryCache};
use crate::metrics;
use crate::store::{ObjectStore, StoreError};

/// One object version being read.
#[derive(Debug, Clone)]
pub struct ObjectVersion {
    pub key: Arc<str>,
    pub etag: Arc<str>,
    pub size: u64,
}

impl ObjectVersion {
    pub fn block_count(&self) -> u64 {
        self.size.div_ceil(BLOCK_SIZE)
    }

    fn block_id(&self, index: u64) -> BlockId {
        BlockId {
            key: self.key.clone(),
            etag: self.etag.clone(),
            index,
        }
    }

    fn block_range(&self, index: u64) -> Range<u64> {
        index * BLOCK_SIZE..((index + 1) * BLOCK_SIZE).min(self.size)
    }
}

/// A block's eventual content: `None` until its GET delivers or fails.
pub type BlockSlot = watch::Receiver<Option<Result<Arc<Block>, StoreError>>>;
/// The delivering side of a [`BlockSlot`], held by the GET that fetches the block.
type BlockSender = watch::Sender<Option<Result<Arc<Block>, StoreError>>>;

/// Counters for tests and benchmarks.
#[derive(Debug, Default)]
pub struct FetchStats {
    pub get_requests: AtomicU64,
    pub bytes_fetched: AtomicU64,
}

pub struct BlockFetcher<S> {
    store: Arc<S>,
    cache: MemoryCache,
    /// Clean blocks on the cache disk, kept across restarts.
    disk: Option<Arc<DiskCache>>,
    /// Blocks fresh from S3 on their way to the disk cache's writer thread.
    to_disk: Option<std::sync::mpsc::SyncSender<(BlockId, Arc<Block>)>>,
    inflight: Mutex<HashMap<BlockId, BlockSlot>>,
    pub stats: FetchStats,
}

impl<S: ObjectStore> BlockFetcher<S> {
    pub fn new(store: Arc<S>, cache: MemoryCache) -> Self {
        Self {
            store,
            cache,
            disk: None,
            to_disk: None,
            inflight: Mutex::new(HashMap::new()),
            stats: FetchStats::default(),
        }
    }

    /// Keeps fetched blocks on the cache disk too, and reads them from there. One thread
    /// writes them; when it falls behind (a disk slower than the network), further blocks are
    /// not cached rather than piling up in memory: at most `queue` blocks (256 KiB) wait.
    pub fn with_disk_cache(mut self, disk: Arc<DiskCache>, queue: usize) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(BlockId, Arc<Block>)>(queue);
        let writer = Arc::clone(&disk);
        let spawned = std::thread::Builder::new()
            .name("keepfs-blocks".into())
            .spawn(move || {
                for (id, block) in rx {
                    writer.insert(&id, &block);
                }
            });
        match spawned {
            Ok(_) => {
                self.disk = Some(disk);
                self.to_disk = Some(tx);
            }
            Err(e) => {
                tracing::warn!(error = %e, "no disk cache writer; blocks cached in memory only")
            }
        }
        self
    }

    /// Blocks being fetched right now, and the memory cache's (bytes, blocks).
    pub fn usage(&self) -> (usize, (u64, u64)) {
        (self.inflight().len(), self.cache.usage())
    }

    fn inflight(&self) -> std::sync::MutexGuard<'_, HashMap<BlockId, BlockSlot>> {
        // Entries are inserted and removed whole; a poisoned map is still consistent.
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Slots for `blocks` of `obj`. Blocks neither cached nor in flight are fetched by new GETs
    /// of at most `max_request_blocks` blocks each; their task handles are returned so the
    /// caller can abort fetches it no longer wants.
    pub fn request(
        self: &Arc<Self>,
        obj: &ObjectVersion,
        blocks: Range<u64>,
        max_request_blocks: u64,
    ) -> (Vec<BlockSlot>, Vec<JoinHandle<()>>) {
        let mut slots = Vec::with_capacity(blocks.clone().count());
        let mut tasks = Vec::new();
        let mut run: Vec<(BlockId, BlockSender)> = Vec::new();
        let mut on_disk: Vec<(BlockId, BlockSender)> = Vec::new();
        let mut inflight = self.inflight();
        for index in blocks {
            let id = obj.block_id(index);
            if let Some(slot) = inflight.get(&id).filter(|slot| slot.has_changed().is_ok()) {
                slots.push(slot.clone());
            } else if let Some(data) = self.cache.get(&id) {
                count_hit(metrics::MEMORY, data.len());
                slots.push(watch::channel(Some(Ok(data))).1);
            } else {
                count_miss(metrics::MEMORY);
                let (tx, rx) = watch::channel(None);
                inflight.insert(id.clone(), rx.clone());
                slots.push(rx);
                if let Some(disk) = &self.disk {
                    if disk.contains(&id) {
                        on_disk.push((id, tx));
                        continue;
                    }
                    count_miss(metrics::DISK);
                }
                // Only contiguous missing blocks share a GET.
                if run.last().is_some_and(|(last, _)| last.index + 1 != index)
                    || run.len() as u64 >= max_request_blocks
                {
                    tasks.push(self.spawn_run(obj, std::mem::take(&mut run)));
                }
                run.push((id, tx));
            }
        }
        drop(inflight);
        if !run.is_empty() {
            tasks.push(self.spawn_run(obj, run));
        }
        if !on_disk.is_empty() {
            let guard = RunGuard {
                fetcher: Arc::clone(self),
                pending: on_disk.into_iter().collect(),
            };
            tasks.push(tokio::spawn(load_from_disk(obj.clone(), guard)));
        }
        (slots, tasks)
    }

    fn spawn_run(
        self: &Arc<Self>,
        obj: &ObjectVersion,
        run: Vec<(BlockId, BlockSender)>,
    ) -> JoinHandle<()> {
        // The guard exists before the task does: a task aborted before its first poll still
        // drops it and so withdraws its blocks from the in-flight map.
        let guard = RunGuard {
            fetcher: Arc::clone(self),
            pending: run.into_iter().collect(),
        };
        tokio::spawn(fetch_run(obj.clone(), guard))
    }
}

/// Block files read from the cache disk at once by one request (each on a blocking thread).
/// One read at a time leaves the disk idle between 256 KiB reads: measured with
/// `benches/compare.sh` (re-read after remount), see docs/PERFORMANCE.md.
const DISK_READS_IN_FLIGHT: usize = 8;

/// Reads blocks from the cache disk, several at once, and publishes each as soon as it is read
/// (in order), so a reader waits for its block, not for the whole window; those missing or
/// corrupt there are fetched from S3.
async fn load_from_disk<S: ObjectStore>(obj: ObjectVersion, mut guard: RunGuard<S>) {
    use futures_util::StreamExt;
    let Some(disk) = guard.fetcher.disk.clone() else {
        return;
    };
    let ids: Vec<BlockId> = guard.pending.iter().map(|(id, _)| id.clone()).collect();
    let mut loaded = futures_util::stream::iter(ids)
        .map(|id| {
            let disk = Arc::clone(&disk);
            async move {
                tokio::task::spawn_blocking(move || disk.get(&id))
                    .await
                    .unwrap_or_default()
            }
        })
        .buffered(DISK_READS_IN_FLIGHT);
    // Misses wait in a guard of their own: if this task is aborted before they are handed to
    // a GET, dropping it withdraws them from the in-flight map like the blocks not yet read.
    let mut missing = RunGuard {
        fetcher: Arc::clone(&guard.fetcher),
        pending: std::collections::VecDeque::new(),
    };
    while let Some(block) = loaded.next().await {
        let Some((id, tx)) = guard.pending.pop_front() else {
            break;
        };
        match block {
            Some(block) => {
                count_hit(metrics::DISK, block.len());
                guard.fetcher.deliver(id, tx, Ok(Arc::new(block)), false)
            }
            // Absent, corrupt, or its blocking task failed: fetched from S3.
            None => {
                count_miss(metrics::DISK);
                missing.pending.push_back((id, tx))
            }
        }
    }
    missing.pending.extend(guard.pending.drain(..));
    let mut run: Vec<(BlockId, BlockSender)> = Vec::new();
    for (id, tx) in std::mem::take(&mut missing.pending) {
        if run
            .last()
            .is_some_and(|(last, _)| last.index + 1 != id.index)
        {
            guard.fetcher.spawn_run(&obj, std::mem::take(&mut run));
        }
        run.push((id, tx));
    }
    if !run.is_empty() {
        guard.fetcher.spawn_run(&obj, run);
    }
}

fn count_hit(cache: metrics::CacheLabels, bytes: usize) {
    let m = metrics::get();
    m.cache_hits.get_or_create(&cache).inc();
    m.cache_hit_bytes.get_or_create(&cache).inc_by(bytes as u64);
}

fn count_miss(cache: metrics::CacheLabels) {
    metrics::get().cache_misses.get_or_create(&cache).inc();
}

/// GETs one contiguous run of blocks and publishes each as soon as it is complete.
async fn fetch_run<S: ObjectStore>(obj: ObjectVersion, mut guard: RunGuard<S>) {
    let fetcher = Arc::clone(&guard.fetcher);
    let (Some(first), Some(last)) = (guard.pending.front(), guard.pending.back()) else {
        return;
    };
    let start = obj.block_range(first.0.index).start;
    let end = obj.block_range(last.0.index).end;
    fetcher.stats.get_requests.fetch_add(1, Ordering::Relaxed);
    let mut block = Block::default();
    let mut sink = |mut chunk: Bytes| {
        while !chunk.is_empty() {
            let Some((id, _)) = guard.pending.front() else {
                return;
            };
            let want = obj.block_range(id.index);
            let want = (want.end - want.start) as usize;
            let take = (want - block.len()).min(chunk.len());
            block.push(chunk.split_to(take));
            if block.len() == want {
                guard.publish(Ok(Arc::new(std::mem::take(&mut block).compact())));
            }
        }
    };
    let result = fetcher
        .store
        .get_range(&obj.key, &obj.etag, start, end, &mut sink)
        .await;
    fetcher
        .stats
        .bytes_fetched
        .fetch_add(end - start, Ordering::Relaxed);
    if let Err(e) = result {
        if matches!(e, StoreError::PreconditionFailed) {
            tracing::warn!(key = %obj.key, etag = %obj.etag, "object changed on the server while being read; failing the read");
        } else {
            tracing::warn!(key = %obj.key, error = %e, "ranged GET failed");
        }
        while !guard.pending.is_empty() {
            guard.publish(Err(e.clone()));
        }
    }
}

/// The blocks a GET still owes. Dropping it (task finished or aborted) withdraws them from the
/// in-flight map so later readers start a new GET instead of waiting forever.
struct RunGuard<S> {
    fetcher: Arc<BlockFetcher<S>>,
    pending: std::collections::VecDeque<(BlockId, BlockSender)>,
}

impl<S> RunGuard<S> {
    fn publish(&mut self, result: Result<Arc<Block>, StoreError>) {
        let Some((id, tx)) = self.pending.pop_front() else {
            return;
        };
        self.fetcher.deliver(id, tx, result, true);
    }
}

impl<S> Drop for RunGuard<S> {
    fn drop(&mut self) {
        let mut inflight = self
            .fetcher
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (id, _) in self.pending.drain(..) {
            inflight.remove(&id);
        }
    }
}

impl<S> BlockFetcher<S> {
    /// Hands a block to its waiters and the memory cache (and, fresh from S3, to the disk
    /// cache, written off the async threads).
    fn deliver(
        &self,
        id: BlockId,
        tx: BlockSender,
        result: Result<Arc<Block>, StoreError>,
        from_s3: bool,
    ) {
        if let Ok(data) = &result {
            self.cache.insert(id.clone(), data.clone());
            if let Some(to_disk) = self.to_disk.as_ref().filter(|_| from_s3) {
                let _ = to_disk.try_send((id.clone(), data.clone()));
            }
        }
        tx.send_replace(Some(result));
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
}

/// Waits for a block; `None` when its GET was abandoned before delivering it.
pub async fn wait(mut slot: BlockSlot) -> Option<Result<Arc<Block>, StoreError>> {
    if let Ok(value) = slot.wait_for(Option::is_some).await {
        return value.clone();
    }
    // The sender is gone; it may still have delivered just before.
    slot.borrow().clone()
}
