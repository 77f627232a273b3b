//! Per-open-file reading: detects sequential access and keeps a growing window of GETs ahead.
//!
//! A sequential reader's window starts at [`PrefetchConfig::initial_window`] and doubles on each
//! extension up to [`PrefetchConfig::max_window`], split into GETs of up to
//! [`PrefetchConfig::max_request`] so several are in flight. A read elsewhere resets the window
//! and aborts the GETs this reader started: a random reader fetches only the blocks it touches.
//! Blocks fetched ahead of the read hold a reservation of the mount's memory budget until they
//! are consumed; when the budget has no room, the window holds only what it could reserve.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;

use super::fetcher::{BlockFetcher, BlockSlot, ObjectVersion, wait};
use crate::cache::{BLOCK_SIZE, Block};
use crate::error::FsError;
use crate::memory::{MemoryBudget, Reservation};
use crate::store::{ObjectStore, StoreError};

/// Prefetch tuning (bytes).
#[derive(Debug, Clone)]
pub struct PrefetchConfig {
    pub initial_window: u64,
    pub max_window: u64,
    pub max_request: u64,
    /// What blocks read ahead are reserved from (shared by every reader and the uploads).
    pub memory: MemoryBudget,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        Self {
            initial_window: 1024 * 1024,
            max_window: 64 * 1024 * 1024,
            max_request: 8 * 1024 * 1024,
            memory: MemoryBudget::unlimited(),
        }
    }
}

/// A requested block not yet consumed, with its share of the memory budget (blocks of the
/// read itself have none: the kernel bounds those).
struct Pending {
    slot: BlockSlot,
    _reserved: Option<Reservation>,
}

struct Window {
    /// Offset right after the previous read.
    next_offset: u64,
    /// Current prefetch window in bytes (0 until the first sequential read).
    window: u64,
    /// First block of the current run.
    run_start: u64,
    /// Blocks `run_start..requested_until` of the current run have been requested.
    requested_until: u64,
    /// Requested blocks not yet fully consumed.
    pending: BTreeMap<u64, Pending>,
    /// GETs this reader started, aborted when the run is abandoned.
    tasks: Vec<JoinHandle<()>>,
}

/// Reads of one open file, pinned to one object version.
pub struct FileReader<S> {
    fetcher: Arc<BlockFetcher<S>>,
    object: ObjectVersion,
    config: PrefetchConfig,
    window: Mutex<Window>,
}

impl<S> Drop for FileReader<S> {
    fn drop(&mut self) {
        let window = self.window.get_mut().unwrap_or_else(|e| e.into_inner());
        for task in window.tasks.drain(..) {
            task.abort();
        }
    }
}

impl<S: ObjectStore> FileReader<S> {
    pub fn new(
        fetcher: Arc<BlockFetcher<S>>,
        object: ObjectVersion,
        config: PrefetchConfig,
    ) -> Self {
        Self {
            fetcher,
            object,
            config,
            window: Mutex::new(Window {
                next_offset: 0,
                window: 0,
                run_start: 0,
                requested_until: 0,
                pending: BTreeMap::new(),
                tasks: Vec::new(),
            }),
        }
    }

    pub fn object(&self) -> &ObjectVersion {
        &self.object
    }

    /// Reads up to `len` bytes at `offset` (fewer at end of file).
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, FsError> {
        let mut out = Vec::new();
        self.read_into(offset, len, &mut out).await?;
        Ok(out)
    }

    /// Like [`FileReader::read`], appending to `out` (so callers can reuse buffers).
    pub async fn read_into(&self, offset: u64, len: u32, out: &mut Vec<u8>) -> Result<(), FsError> {
        let size = self.object.size;
        if offset >= size || len == 0 {
            return Ok(());
        }
        let end = (offset + u64::from(len)).min(size);
        let first = offset / BLOCK_SIZE;
        let last = (end - 1) / BLOCK_SIZE;
        let slots = self.plan(offset, end, first, last);

        out.reserve((end - offset) as usize);
        for (index, slot) in (first..=last).zip(slots) {
            let data = match wait(slot).await {
                Some(Ok(data)) => data,
                Some(Err(e)) => return Err(self.read_error(e)),
                // Its GET was abandoned (another reader seeked away): fetch it on our own.
                None => self.refetch(index).await?,
            };
            let block_start = index * BLOCK_SIZE;
            let from = offset.saturating_sub(block_start) as usize;
            let to = ((end - block_start) as usize).min(data.len());
            if from >= to {
                return Err(self.read_error(StoreError::Other(format!(
                    "block {index} of {} is shorter than expected",
                    self.object.key
                ))));
            }
            data.copy_range(from, to, out);
        }
        Ok(())
    }

    fn read_error(&self, e: StoreError) -> FsError {
        FsError::store(&self.object.key, e)
    }

    /// Fetches one block whose GET was abandoned. The retry covers a GET that was aborted
    /// between our request and its start (the aborting reader seeked away meanwhile).
    async fn refetch(&self, index: u64) -> Result<Arc<Block>, FsError> {
        const ATTEMPTS: usize = 3;
        for _ in 0..ATTEMPTS {
            let (mut slots, _tasks) = self.fetcher.request(&self.object, index..index + 1, 1);
            match wait(slots.pop().expect("one slot per block")).await {
                Some(Ok(data)) => return Ok(data),
                Some(Err(e)) => return Err(self.read_error(e)),
                None => tokio::task::yield_now().await,
            }
        }
        Err(self.read_error(StoreError::Other(format!(
            "block {index} of {}: fetch abandoned {ATTEMPTS} times",
            self.object.key
        ))))
    }

    /// Decides what to fetch for a read of `offset..end` (blocks `first..=last`) and returns
    /// the slots of those blocks, in order.
    fn plan(&self, offset: u64, end: u64, first: u64, last: u64) -> Vec<BlockSlot> {
        let config = &self.config;
        let blocks = self.object.block_count();
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());

        // The kernel issues readahead concurrently, so reads of a sequential stream may arrive
        // slightly out of order: anything inside the already requested run counts as sequential.
        let in_run = w.window > 0 && first >= w.run_start && first < w.requested_until;
        let sequential = offset == w.next_offset || in_run;
        if !sequential {
            for task in w.tasks.drain(..) {
                task.abort();
            }
            w.pending.clear();
            w.window = 0;
            w.run_start = first;
            w.requested_until = first;
        }
        w.tasks.retain(|t| !t.is_finished());

        let max_request_blocks = (config.max_request / BLOCK_SIZE).max(1);
        let mut wanted_until = last + 1;
        if sequential {
            // Extend only when less than half a window is left ahead, so each extension is
            // large and splits into full-size GETs.
            let ahead = (w.requested_until * BLOCK_SIZE).saturating_sub(end);
            if w.window == 0 || ahead < w.window / 2 {
                w.window = if w.window == 0 {
                    config.initial_window
                } else {
                    (w.window * 2).min(config.max_window)
                };
                wanted_until = (end + w.window).div_ceil(BLOCK_SIZE);
            }
        }
        let mut wanted_until = wanted_until.min(blocks);
        let from = w.requested_until.max(first);
        // Blocks beyond this read are read ahead: only as many as the budget has room for.
        let ahead_from = from.max(last + 1);
        let mut reserved = None;
        if ahead_from < wanted_until {
            reserved = config
                .memory
                .take_up_to((wanted_until - ahead_from) * BLOCK_SIZE);
            let room = reserved.as_ref().map_or(0, |r| r.units() as u64);
            wanted_until = wanted_until.min(ahead_from + room);
        }
        if from < wanted_until {
            let (slots, tasks) =
                self.fetcher
                    .request(&self.object, from..wanted_until, max_request_blocks);
            for (index, slot) in (from..wanted_until).zip(slots) {
                let one = if index < ahead_from {
                    None
                } else {
                    match reserved.as_mut().and_then(Reservation::split_unit) {
                        Some(one) => Some(one),
                        None => reserved.take(), // the last unit
                    }
                };
                w.pending.insert(
                    index,
                    Pending {
                        slot,
                        _reserved: one,
                    },
                );
            }
            w.tasks.extend(tasks);
            w.requested_until = wanted_until;
        }
        // Blocks of this read that were requested before but are no longer pending (consumed by
        // an earlier overlapping read) come from the cache or a new GET.
        let missing: Vec<u64> = (first..=last)
            .filter(|i| !w.pending.contains_key(i))
            .collect();
        for index in missing {
            let (mut slots, tasks) = self.fetcher.request(&self.object, index..index + 1, 1);
            let slot = slots.pop().expect("one slot per block");
            w.pending.insert(
                index,
                Pending {
                    slot,
                    _reserved: None,
                },
            );
            w.tasks.extend(tasks);
        }
        let slots = (first..=last).map(|i| w.pending[&i].slot.clone()).collect();

        // Everything before this read is done with; so is the last block if read to its end.
        let consumed_until = if end.is_multiple_of(BLOCK_SIZE) || end == self.object.size {
            last + 1
        } else {
            last
        };
        w.pending = w.pending.split_off(&consumed_until);
        w.next_offset = end;
        slots
    }
}
