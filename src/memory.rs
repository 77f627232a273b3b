//! One limit for what keepfs holds in memory (`--memory-limit`).
//!
//! [`OVERHEAD`] of the limit is left to what is not counted — the runtime and its threads, FUSE
//! request buffers and the reads the kernel has in flight, connection buffers, the inode table,
//! the allocator's slack — and the rest is split evenly: the block cache (`--max-memory-cache`
//! caps it further) and data in transit, i.e. blocks read ahead of sequential readers and part
//! buffers of uploads. Data in transit takes [`Reservation`]s from one [`MemoryBudget`]:
//! read-ahead takes only what is free at that moment (a reader's window shrinks, it never
//! waits), an upload waits for its part's reservation (the written bytes are on the cache disk
//! meanwhile; only their upload waits).
//!
//! The default limit follows the container: 80 % of the cgroup's `memory.max` (cgroup v2; v1's
//! `memory.limit_in_bytes`), so a sidecar with a memory limit stays inside it; without one, 1/8
//! of the machine's RAM (`MemTotal` in `/proc/meminfo`).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The unit of reservations: one cache block (256 KiB).
pub const UNIT: u64 = crate::cache::BLOCK_SIZE;
/// What the limit leaves to memory keepfs does not count (bytes). Measured with
/// `tests/memory.rs` (it prints the peak): a debug build idles at ~42 MiB (36 MiB of it the
/// binary's own pages), and sixteen sequential readers with sixteen writers peaked at up to
/// 110 MiB beyond the budget — FUSE requests in flight and their pooled buffers, connection
/// buffers, and freed pages the allocator has not yet returned (1 s, see `src/main.rs`).
pub const OVERHEAD: u64 = 128 << 20;
/// The smallest limit accepted: the overhead and 16 MiB each for cache and transit.
pub const MIN_LIMIT: u64 = OVERHEAD + (32 << 20);

/// Where a limit came from, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitSource {
    /// `--memory-limit SIZE`.
    Flag,
    /// 80 % of the cgroup's memory limit.
    Cgroup,
    /// 1/8 of the machine's RAM.
    Ram,
    /// Nothing could be read: a fixed 1 GiB.
    Fixed,
}

/// The default limit: 80 % of the cgroup's memory limit, else 1/8 of RAM (bytes).
pub fn default_limit() -> (u64, LimitSource) {
    if let Some(cgroup) = cgroup_limit() {
        return ((cgroup / 5 * 4).max(MIN_LIMIT), LimitSource::Cgroup);
    }
    match mem_total() {
        Some(ram) => ((ram / 8).max(MIN_LIMIT), LimitSource::Ram),
        None => (1 << 30, LimitSource::Fixed),
    }
}

/// The tightest memory limit of this process's cgroup and its ancestors (bytes), if any.
fn cgroup_limit() -> Option<u64> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut limits = Vec::new();
    for line in membership.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            // cgroup v2: every level from this cgroup up to the root may set memory.max.
            let mut dir = std::path::PathBuf::from("/sys/fs/cgroup").join(path);
            loop {
                limits.extend(read_limit(&dir.join("memory.max")));
                if !dir.pop() || !dir.starts_with("/sys/fs/cgroup") {
                    break;
                }
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            let dir = std::path::PathBuf::from("/sys/fs/cgroup/memory");
            limits.extend(read_limit(&dir.join(path).join("memory.limit_in_bytes")));
            limits.extend(read_limit(&dir.join("memory.limit_in_bytes")));
        }
    }
    limits.into_iter().min()
}

/// A limit file's value; `max` (v2) and v1's "unlimited" (close to 2^63) are none.
fn read_limit(path: &std::path::Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let value: u64 = text.trim().parse().ok()?;
    (value < 1 << 60).then_some(value)
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
fn mem_total() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// How a limit is shared out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shares {
    /// Bytes of the block cache.
    pub cache: u64,
    /// Bytes of data in transit (the [`MemoryBudget`]).
    pub transit: u64,
    /// Blocks that may wait for the disk cache's writer: 1/16 of the limit, 8 to 256 (64 MiB).
    pub disk_queue: usize,
    /// The kernel's background requests in flight (each up to 1 MiB that keepfs holds while
    /// serving it): one per 32 MiB of the limit, 12 (the kernel's default) to
    /// [`crate::fs::MAX_BACKGROUND`].
    pub background: u16,
}

impl Shares {
    /// Half of what the limit leaves beyond [`OVERHEAD`] each for cache and transit; the queue
    /// and the requests in flight within the overhead.
    pub fn of(limit: u64) -> Self {
        let counted = limit.saturating_sub(OVERHEAD);
        let max_background = u64::from(crate::fs::MAX_BACKGROUND);
        Self {
            cache: counted / 2,
            transit: counted / 2,
            disk_queue: (limit / 16 / UNIT).clamp(8, 256) as usize,
            background: (limit / (32 << 20)).clamp(12, max_background) as u16,
        }
    }
}

/// Bytes in transit, bounded: reservations in units of [`UNIT`]. Cloning shares the budget.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    permits: Arc<Semaphore>,
    units: usize,
}

/// Units of `bytes`, rounded up.
fn units_of(bytes: u64) -> usize {
    usize::try_from(bytes.div_ceil(UNIT)).unwrap_or(usize::MAX)
}

impl MemoryBudget {
    /// A budget of `bytes` (at least one unit).
    pub fn new(bytes: u64) -> Self {
        let units = units_of(bytes).clamp(1, Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(units)),
            units,
        }
    }

    /// No bound (tests, one-off tools).
    pub fn unlimited() -> Self {
        Self::new(u64::MAX)
    }

    /// As much of `bytes` as is free right now, never waiting; `None` when nothing is.
    pub fn take_up_to(&self, bytes: u64) -> Option<Reservation> {
        let want = units_of(bytes).min(self.permits.available_permits());
        if want == 0 {
            return None;
        }
        let want = u32::try_from(want).unwrap_or(u32::MAX);
        Arc::clone(&self.permits)
            .try_acquire_many_owned(want)
            .ok()
            .map(|permit| Reservation { permit })
    }

    /// Waits until `bytes` are free (at most the whole budget: a larger need takes all of it).
    pub async fn reserve(&self, bytes: u64) -> Reservation {
        let want = u32::try_from(units_of(bytes).min(self.units)).unwrap_or(u32::MAX);
        let permit = Arc::clone(&self.permits)
            .acquire_many_owned(want)
            .await
            .expect("the budget's semaphore is never closed");
        Reservation { permit }
    }

    /// Bytes reserved now.
    pub fn in_use(&self) -> u64 {
        (self.units - self.permits.available_permits()) as u64 * UNIT
    }
}

/// Reserved bytes, returned to the budget when dropped.
#[derive(Debug)]
pub struct Reservation {
    permit: OwnedSemaphorePermit,
}

impl Reservation {
    /// How many units ([`UNIT`] bytes each) this holds.
    pub fn units(&self) -> usize {
        self.permit.num_permits()
    }

    /// Splits off one unit (for one block); `None` when this holds a single unit or none.
    pub fn split_unit(&mut self) -> Option<Reservation> {
        if self.units() <= 1 {
            return None;
        }
        self.permit.split(1).map(|permit| Reservation { permit })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_ahead_takes_what_is_free_and_gives_it_back() {
        let budget = MemoryBudget::new(4 * UNIT);
        let mut first = budget.take_up_to(3 * UNIT).unwrap();
        assert_eq!(first.units(), 3);
        let second = budget.take_up_to(3 * UNIT).unwrap();
        assert_eq!(second.units(), 1, "only what is left");
        assert!(budget.take_up_to(UNIT).is_none());
        assert_eq!(budget.in_use(), 4 * UNIT);
        let one = first.split_unit().unwrap();
        assert_eq!((first.units(), one.units()), (2, 1));
        drop(one);
        assert_eq!(budget.in_use(), 3 * UNIT);
        drop((first, second));
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test]
    async fn an_upload_waits_for_its_part_and_a_part_larger_than_the_budget_takes_all() {
        let budget = MemoryBudget::new(8 * UNIT);
        let held = budget.take_up_to(6 * UNIT).unwrap();
        let waiting = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.reserve(4 * UNIT).await.units() })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "4 units are not free yet");
        drop(held);
        assert_eq!(waiting.await.unwrap(), 4);
        assert_eq!(budget.reserve(100 * UNIT).await.units(), 8);
    }

    #[test]
    fn limits_read_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("memory.max");
        for (text, want) in [
            ("max\n", None),
            ("536870912\n", Some(512 << 20)),
            ("9223372036854771712\n", None),
            ("garbage", None),
        ] {
            std::fs::write(&file, text).unwrap();
            assert_eq!(read_limit(&file), want, "{text:?}");
        }
        let shares = Shares::of(512 << 20);
        assert_eq!((shares.cache, shares.transit), (192 << 20, 192 << 20));
        assert_eq!((shares.disk_queue, shares.background), (128, 16));
        assert_eq!(Shares::of(MIN_LIMIT).transit, 16 << 20);
        let large = Shares::of(64 << 30);
        assert_eq!((large.disk_queue, large.background), (256, 64));
    }
}
