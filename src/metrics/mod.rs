//! Prometheus metrics: one registry for the process, owned here, fed by the FUSE adapter
//! ([`FuseOp`]), the S3 client ([`S3Metrics`], an SDK interceptor), the caches, the journal and
//! the uploader, and served by [`http`] (`--metrics-addr`).
//!
//! Names follow the Prometheus conventions (<https://prometheus.io/docs/practices/naming/>):
//! a `keepfs_` prefix, base units in the name (`_seconds`, `_bytes`), `_total` on counters.
//! Values that are a state rather than a count (dirty files, cache sizes) are read when
//! scraped, from the same functions `keepfs status --json` uses, so the two always agree.

pub mod http;
mod s3;

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

pub use s3::S3Metrics;

/// Labels of a FUSE request: the operation's name as in `fuser::Filesystem` (`lookup`, `read`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

/// Labels of a failed FUSE request: the operation and the errno's name (`ENOENT`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpErrorLabels {
    pub op: &'static str,
    pub errno: &'static str,
}

/// Labels of an S3 request: the API operation (`GetObject`, `UploadPart`) and its outcome
/// (see [`s3::outcome`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct S3Labels {
    pub operation: String,
    pub outcome: &'static str,
}

/// Labels of what is per S3 operation only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct S3OpLabels {
    pub operation: String,
}

/// Which cache: `memory` (blocks in RAM) or `disk` (block files in the cache directory).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub cache: &'static str,
}

pub const MEMORY: CacheLabels = CacheLabels { cache: "memory" };
pub const DISK: CacheLabels = CacheLabels { cache: "disk" };

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;
type FloatGauge = Gauge<f64, AtomicU64>;
/// Sets gauges before a scrape (see [`on_scrape`]).
type Sampler = Box<dyn Fn(&Metrics) + Send + Sync>;

/// Latency buckets from 100 µs to ~52 s (×2 each): a cached FUSE request answers in
/// microseconds, an S3 request in milliseconds, a multipart completion in seconds.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

/// Every metric keepfs exports. Counters only grow; gauges are set at scrape time.
pub struct Metrics {
    registry: Registry,
    pub fuse_requests: Family<OpLabels, Counter>,
    pub fuse_errors: Family<OpErrorLabels, Counter>,
    pub fuse_duration: Histograms<OpLabels>,
    /// Bytes `read` replied with.
    pub read_bytes: Counter,
    /// Bytes `write` accepted.
    pub written_bytes: Counter,
    pub s3_requests: Family<S3Labels, Counter>,
    pub s3_duration: Histograms<S3OpLabels>,
    pub s3_retries: Family<S3OpLabels, Counter>,
    /// Request body bytes sent (PutObject, UploadPart, …), counting every attempt.
    pub s3_sent_bytes: Counter,
    /// Object bytes received by GETs.
    pub s3_received_bytes: Counter,
    pub cache_hits: Family<CacheLabels, Counter>,
    pub cache_misses: Family<CacheLabels, Counter>,
    pub cache_hit_bytes: Family<CacheLabels, Counter>,
    pub cache_evictions: Family<CacheLabels, Counter>,
    pub cache_size: Family<CacheLabels, Gauge>,
    /// 1 while the disk cache stores no blocks: the cache disk has less free space than
    /// `--cache-min-free`; else 0.
    pub disk_cache_below_min_free: Gauge,
    /// `--memory-limit` in bytes.
    pub memory_limit: Gauge,
    /// Bytes reserved by reads ahead and upload parts now (see [`crate::memory`]).
    pub memory_in_transit: Gauge,
    pub dirty_files: Gauge,
    pub dirty_bytes: Gauge,
    pub open_for_writing: Gauge,
    pub uploads_in_flight: Gauge,
    pub oldest_dirty_age: FloatGauge,
    /// Bytes whose upload finished (the object or part is in S3).
    pub uploaded_bytes: Counter,
    pub conflicts: Counter,
    pub resumed_bytes: Counter,
    pub journal_sync: Histogram,
    /// Functions that set gauges just before a scrape (see [`on_scrape`]).
    samplers: Mutex<Vec<Sampler>>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("keepfs");
        let m = Metrics {
            fuse_requests: Family::default(),
            fuse_errors: Family::default(),
            fuse_duration: Family::new_with_constructor(latency),
            read_bytes: Counter::default(),
            written_bytes: Counter::default(),
            s3_requests: Family::default(),
            s3_duration: Family::new_with_constructor(latency),
            s3_retries: Family::default(),
            s3_sent_bytes: Counter::default(),
            s3_received_bytes: Counter::default(),
            cache_hits: Family::default(),
            cache_misses: Family::default(),
            cache_hit_bytes: Family::default(),
            cache_evictions: Family::default(),
            cache_size: Family::default(),
            disk_cache_below_min_free: Gauge::default(),
            memory_limit: Gauge::default(),
            memory_in_transit: Gauge::default(),
            dirty_files: Gauge::default(),
            dirty_bytes: Gauge::default(),
            open_for_writing: Gauge::default(),
            uploads_in_flight: Gauge::default(),
            oldest_dirty_age: FloatGauge::default(),
            uploaded_bytes: Counter::default(),
            conflicts: Counter::default(),
            resumed_bytes: Counter::default(),
            journal_sync: latency(),
            samplers: Mutex::new(Vec::new()),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "fuse_requests",
            "FUSE requests answered, by operation",
            m.fuse_requests.clone(),
        );
        r.register(
            "fuse_errors",
            "FUSE requests answered with an error, by operation and errno",
            m.fuse_errors.clone(),
        );
        r.register_with_unit(
            "fuse_request_duration",
            "Time from a FUSE request's arrival to its reply",
            Unit::Seconds,
            m.fuse_duration.clone(),
        );
        r.register_with_unit(
            "read",
            "Bytes returned to readers",
            Unit::Bytes,
            m.read_bytes.clone(),
        );
        r.register_with_unit(
            "written",
            "Bytes accepted from writers",
            Unit::Bytes,
            m.written_bytes.clone(),
        );
        r.register(
            "s3_requests",
            "S3 requests finished (after retries), by API operation and outcome",
            m.s3_requests.clone(),
        );
        r.register_with_unit(
            "s3_request_duration",
            "Time an S3 request took, retries included",
            Unit::Seconds,
            m.s3_duration.clone(),
        );
        r.register(
            "s3_retries",
            "S3 request attempts after the first, by API operation",
            m.s3_retries.clone(),
        );
        r.register_with_unit(
            "s3_sent",
            "Request body bytes sent to S3, every attempt counted",
            Unit::Bytes,
            m.s3_sent_bytes.clone(),
        );
        r.register_with_unit(
            "s3_received",
            "Object bytes received from S3 by GETs",
            Unit::Bytes,
            m.s3_received_bytes.clone(),
        );
        r.register(
            "cache_hits",
            "Block lookups served by the cache",
            m.cache_hits.clone(),
        );
        r.register(
            "cache_misses",
            "Block lookups the cache could not serve",
            m.cache_misses.clone(),
        );
        r.register_with_unit(
            "cache_hit",
            "Bytes served by the cache",
            Unit::Bytes,
            m.cache_hit_bytes.clone(),
        );
        r.register(
            "cache_evictions",
            "Blocks evicted from the cache",
            m.cache_evictions.clone(),
        );
        r.register_with_unit(
            "cache_size",
            "Bytes of blocks the cache holds now",
            Unit::Bytes,
            m.cache_size.clone(),
        );
        r.register(
            "disk_cache_below_min_free",
            "1 while blocks read from S3 are not stored on the cache disk: it has less free space than --cache-min-free",
            m.disk_cache_below_min_free.clone(),
        );
        r.register_with_unit(
            "memory_limit",
            "What keepfs may hold in memory (--memory-limit)",
            Unit::Bytes,
            m.memory_limit.clone(),
        );
        r.register_with_unit(
            "memory_in_transit",
            "Bytes reserved now by blocks read ahead and upload parts (at most half of what the limit leaves beyond 128 MiB)",
            Unit::Bytes,
            m.memory_in_transit.clone(),
        );
        r.register(
            "dirty_files",
            "Files whose local copy is newer than S3 (open ones and tombstones included)",
            m.dirty_files.clone(),
        );
        r.register_with_unit(
            "dirty",
            "Bytes of files whose local copy is newer than S3",
            Unit::Bytes,
            m.dirty_bytes.clone(),
        );
        r.register(
            "open_for_writing_files",
            "Dirty files open for writing (uploaded after the last close)",
            m.open_for_writing.clone(),
        );
        r.register(
            "uploads_in_flight",
            "Files being uploaded or waiting to retry",
            m.uploads_in_flight.clone(),
        );
        r.register_with_unit(
            "oldest_dirty_age",
            "Age of the oldest change not yet in S3 (0 when none)",
            Unit::Seconds,
            m.oldest_dirty_age.clone(),
        );
        r.register_with_unit(
            "uploaded",
            "Bytes of file content uploaded to S3 (objects and parts completed)",
            Unit::Bytes,
            m.uploaded_bytes.clone(),
        );
        r.register(
            "conflict_copies",
            "Conflict copies uploaded (S3 changed under a written file)",
            m.conflicts.clone(),
        );
        r.register_with_unit(
            "resumed",
            "Bytes resumed multipart uploads did not send again",
            Unit::Bytes,
            m.resumed_bytes.clone(),
        );
        r.register_with_unit(
            "journal_sync_duration",
            "Time to make one journal record durable (write, fsync, rename, directory fsync)",
            Unit::Seconds,
            m.journal_sync.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The exposition in the Prometheus text format 0.0.4
    /// (<https://prometheus.io/docs/instrumenting/exposition_formats/>), or OpenMetrics 1.0.
    pub fn encode(&self, openmetrics: bool) -> String {
        for sample in self
            .samplers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            sample(self);
        }
        let mut out = String::new();
        // Writing into a String can't fail.
        let _ = if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        };
        out
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

/// Runs `sample` before every scrape, to set gauges from the state they describe.
pub fn on_scrape(sample: impl Fn(&Metrics) + Send + Sync + 'static) {
    get()
        .samplers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Box::new(sample));
}

/// Saturating conversion for gauges (`i64`).
pub fn gauge_value(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

/// Times one journal write: `f` is the write, its result is passed through.
pub fn time_journal_sync<T>(f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    get().journal_sync.observe(start.elapsed().as_secs_f64());
    out
}

/// One FUSE request being answered: counted, and timed until dropped (after the reply).
/// Error replies go through [`FuseOp::fail`], which counts them by errno.
pub struct FuseOp {
    op: &'static str,
    start: Instant,
    /// The errno replied with; 0 while none.
    errno: AtomicI32,
}

impl FuseOp {
    pub fn start(op: &'static str) -> Self {
        FuseOp {
            op,
            start: Instant::now(),
            errno: AtomicI32::new(0),
        }
    }

    /// Records that the request fails with `errno` (a positive `libc::E*` value) and returns
    /// it, for `reply.error(op.fail(..))`.
    pub fn fail(&self, errno: i32) -> fuser::Errno {
        self.errno.store(errno, Ordering::Relaxed);
        fuser::Errno::from_i32(errno)
    }

    /// Time since the request arrived.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

impl Drop for FuseOp {
    fn drop(&mut self) {
        let m = get();
        let op = OpLabels { op: self.op };
        m.fuse_requests.get_or_create(&op).inc();
        m.fuse_duration
            .get_or_create(&op)
            .observe(self.start.elapsed().as_secs_f64());
        let errno = self.errno.load(Ordering::Relaxed);
        if errno != 0 {
            m.fuse_errors
                .get_or_create(&OpErrorLabels {
                    op: self.op,
                    errno: errno_name(errno),
                })
                .inc();
        }
    }
}

/// The symbolic name of an errno keepfs answers with (`EIO` for any other).
fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::EEXIST => "EEXIST",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::EBADF => "EBADF",
        libc::ENODATA => "ENODATA",
        libc::ERANGE => "ERANGE",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOSYS => "ENOSYS",
        libc::ESTALE => "ESTALE",
        libc::EXDEV => "EXDEV",
        libc::EFBIG => "EFBIG",
        libc::EAGAIN => "EAGAIN",
        libc::EINTR => "EINTR",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EBUSY => "EBUSY",
        libc::ENXIO => "ENXIO",
        libc::EDQUOT => "EDQUOT",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_follow_the_conventions() {
        let m = Metrics::new();
        m.fuse_requests
            .get_or_create(&OpLabels { op: "read" })
            .inc();
        m.read_bytes.inc_by(4096);
        m.cache_size.get_or_create(&DISK).set(7);
        m.journal_sync.observe(0.002);
        let text = m.encode(false);
        for line in [
            "# TYPE keepfs_fuse_requests_total counter",
            "keepfs_fuse_requests_total{op=\"read\"} 1",
            "keepfs_read_bytes_total 4096",
            "keepfs_cache_size_bytes{cache=\"disk\"} 7",
            "keepfs_journal_sync_duration_seconds_count 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
        assert!(m.encode(true).ends_with("# EOF\n"));
    }

    #[test]
    fn a_failed_op_counts_its_errno() {
        let before = get()
            .fuse_errors
            .get_or_create(&OpErrorLabels {
                op: "test_op",
                errno: "ENOENT",
            })
            .get();
        {
            let op = FuseOp::start("test_op");
            assert_eq!(op.fail(libc::ENOENT), fuser::Errno::ENOENT);
        }
        let after = get()
            .fuse_errors
            .get_or_create(&OpErrorLabels {
                op: "test_op",
                errno: "ENOENT",
            })
            .get();
        assert_eq!(after, before + 1);
        assert_eq!(errno_name(libc::ESTALE), "ESTALE");
        assert_eq!(errno_name(99999), "other");
    }
}
