//! `keepfs flush`: upload everything a cache directory holds and wait, for a Kubernetes
//! `preStop` hook or an operator. With a mount running on the directory it asks that mount
//! (over the control socket); without one it takes the directory's lock and uploads from the
//! journal itself, reaching S3 as the last mount did (`mount.json`) with this process's
//! credentials.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cache::CacheDir;
use crate::control::{self, Live, MountRecord};
use crate::store::{ObjectStore, S3Store};
use crate::write::renames::DirRenames;
use crate::write::{DirtyFiles, UploadConfig, Uploader};

/// The extended attribute of a mount's root that names its cache directory.
pub const CACHE_DIR_XATTR: &str = "user.keepfs.cache_dir";

#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error("{0} is not a keepfs cache directory (no FORMAT file)")]
    NotCacheDir(PathBuf),
    #[error("{path} is not a keepfs mount (no {CACHE_DIR_XATTR} attribute: {source})")]
    NotMount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not reach the keepfs (pid {pid}) that owns {dir}: {source}")]
    Mount {
        pid: u32,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{dir} has files to upload but no record of the bucket they belong to (mount.json, written by keepfs mount); mount it again to upload them"
    )]
    NoMountRecord { dir: PathBuf },
    #[error("{0}")]
    Cache(#[from] crate::cache::CacheDirError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "timed out after {waited:?}: {files} file(s), {bytes} bytes still to upload (they stay in the cache directory's journal)"
    )]
    TimedOut {
        waited: Duration,
        files: usize,
        bytes: u64,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FlushError {
    let what = what.into();
    move |source| FlushError::Io { what, source }
}

/// The cache directory of the keepfs mounted at `mountpoint` (asked through its root's
/// extended attribute, which only a keepfs mount answers).
pub fn cache_dir_of_mount(mountpoint: &Path) -> Result<PathBuf, FlushError> {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let not_mount = |source| FlushError::NotMount {
        path: mountpoint.to_owned(),
        source,
    };
    let path = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|e| not_mount(std::io::Error::other(e)))?;
    let name = std::ffi::CString::new(CACHE_DIR_XATTR).expect("no NUL in the name");
    let mut buf = vec![0u8; 4096];
    // SAFETY: `path` and `name` are NUL-terminated; `buf` is writable for `buf.len()` bytes and
    // getxattr writes at most that many.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(not_mount(std::io::Error::last_os_error()));
    }
    buf.truncate(n as usize);
    Ok(PathBuf::from(std::ffi::OsString::from_vec(buf)))
}

/// What a finished flush did.
#[derive(Debug)]
pub struct Flushed {
    /// Files that were pending when the flush started.
    pub files: usize,
    pub bytes: u64,
    /// Files still open for writing on the running mount (uploaded after their last close).
    pub still_open: usize,
    pub elapsed: Duration,
}

/// Uploads everything pending in cache directory `dir` and waits, at most `timeout`.
pub fn flush(dir: &Path, timeout: Duration) -> Result<Flushed, FlushError> {
    if !dir.join("FORMAT").is_file() {
        return Err(FlushError::NotCacheDir(dir.to_owned()));
    }
    let mut progress = Progress::new();
    let lock = dir.join("lock");
    match crate::status::lock_holder(&lock).map_err(io(lock.display().to_string()))? {
        Some(pid) => ask_mount(dir, pid, timeout, &mut progress),
        None => upload_here(dir, timeout, &mut progress),
    }
}

/// Asks the running mount to flush and follows its progress.
fn ask_mount(
    dir: &Path,
    pid: u32,
    timeout: Duration,
    progress: &mut Progress,
) -> Result<Flushed, FlushError> {
    let unreachable = |source| FlushError::Mount {
        pid,
        dir: dir.to_owned(),
        source,
    };
    // A mount that is still starting opens its socket in a moment.
    let connect_until = Instant::now() + timeout.min(Duration::from_secs(10));
    let mut stream = loop {
        match std::os::unix::net::UnixStream::connect(control::socket_path(dir)) {
            Ok(stream) => break stream,
            Err(_) if Instant::now() < connect_until => {
                std::thread::sleep(Duration::from_millis(200))
            }
            Err(e) => {
                return Err(unreachable(std::io::Error::new(
                    e.kind(),
                    format!(
                        "{e} (a read-only mount uploads nothing; a starting one did not open its control socket in time)"
                    ),
                )));
            }
        }
    };
    stream.write_all(b"flush\n").map_err(unreachable)?;
    let deadline = Instant::now() + timeout;
    let mut lines = std::io::BufReader::new(stream.try_clone().map_err(unreachable)?);
    let mut last = Live::default();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            progress.finish();
            return Err(progress.timed_out(&last));
        }
        stream.set_read_timeout(Some(left)).map_err(unreachable)?;
        let mut line = String::new();
        match lines.read_line(&mut line) {
            Ok(0) => {
                progress.finish();
                return Err(unreachable(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the mount closed the connection before the flush finished",
                )));
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(unreachable(e)),
        }
        last = serde_json::from_str(&line)
            .map_err(|e| unreachable(std::io::Error::other(format!("bad reply {line:?}: {e}"))))?;
        progress.show(&last);
        if last.flushed {
            progress.finish();
            return Ok(progress.done(&last));
        }
    }
}

/// No mount runs: take the directory and upload from its journal.
fn upload_here(
    dir: &Path,
    timeout: Duration,
    progress: &mut Progress,
) -> Result<Flushed, FlushError> {
    let cache = CacheDir::open(dir)?;
    let (dirty, keys) = DirtyFiles::open(&cache).map_err(io("reading the journal"))?;
    let renames = DirRenames::new(&cache);
    if keys.is_empty() && !renames.has_pending() {
        return Ok(progress.done(&Live::default()));
    }
    let record = MountRecord::load(dir).map_err(|_| FlushError::NoMountRecord {
        dir: dir.to_owned(),
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(io("starting the runtime"))?;
    let config = record.store_config();
    let store = runtime.block_on(S3Store::new(&config));
    // The check also finds how the server encodes listings, which finishing a directory
    // rename reads. Not reaching S3 now is no reason to stop: uploads retry until the timeout.
    let prefix = record
        .source
        .parse::<crate::config::S3Url>()
        .map(|url| url.prefix)
        .unwrap_or_default();
    if let Err(e) = runtime.block_on(store.check_access(&prefix)) {
        tracing::warn!("checking access to {}: {e}", record.source);
    }
    runtime.block_on(renames.finish_interrupted(&store));
    if renames.has_pending() {
        return Err(FlushError::Io {
            what: "finishing an interrupted directory rename".into(),
            source: std::io::Error::other("S3 refused it; see the log above"),
        });
    }
    let dirty = Arc::new(dirty);
    let uploader = {
        let _runtime = runtime.enter();
        Uploader::start(
            Arc::new(store),
            dirty.clone(),
            UploadConfig {
                part_size: record.part_size,
                concurrency: record.upload_concurrency,
                // A one-off drain: not worth a probe; HEAD checks are right on every server.
                conditional_puts: false,
                // Part buffers within the default limit's share, as a mount would.
                memory: crate::memory::MemoryBudget::new(
                    crate::memory::Shares::of(crate::memory::default_limit().0).transit,
                ),
            },
        )
    };
    for key in &keys {
        uploader.enqueue(key);
    }
    let stats = uploader.stats();
    let deadline = Instant::now() + timeout;
    loop {
        let live = Live::now(&dirty, &stats);
        progress.show(&live);
        if live.flushed {
            progress.finish();
            return Ok(progress.done(&live));
        }
        if Instant::now() >= deadline {
            progress.finish();
            return Err(progress.timed_out(&live));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Progress on standard error: a bar redrawn in place on a terminal, plain lines otherwise
/// (when the numbers change, at most once a second).
struct Progress {
    started: Instant,
    terminal: bool,
    first: Option<(usize, u64)>,
    last_line: Option<(Instant, String)>,
}

const MIB: f64 = (1u64 << 20) as f64;

impl Progress {
    fn new() -> Self {
        Progress {
            started: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
            first: None,
            last_line: None,
        }
    }

    fn show(&mut self, live: &Live) {
        let closed = live.closed_pending();
        let (files0, bytes0) = *self.first.get_or_insert((closed, live.bytes_pending));
        let error = live
            .last_errors
            .last()
            .map(|e| format!("; last error: {}: {}", e.key, e.error))
            .unwrap_or_default();
        let text = format!(
            "{closed} file(s), {:.1} MiB to upload, {} uploading{error}",
            live.bytes_pending as f64 / MIB,
            live.uploads_in_flight
        );
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let done = bytes0.saturating_sub(live.bytes_pending);
            let fraction = if bytes0 == 0 {
                1.0
            } else {
                done as f64 / bytes0 as f64
            };
            let filled = (fraction * 30.0).round() as usize;
            let bar = format!("{}{}", "#".repeat(filled), ".".repeat(30 - filled.min(30)));
            let _ = write!(
                err,
                "\r\x1b[2K[{bar}] {}/{files0} files  {text}",
                files0.saturating_sub(closed)
            );
            let _ = err.flush();
            return;
        }
        let now = Instant::now();
        let due = self.last_line.as_ref().is_none_or(|(at, last)| {
            *last != text && now.duration_since(*at) >= Duration::from_secs(1)
        });
        if due {
            let _ = writeln!(err, "keepfs flush: {text}");
            self.last_line = Some((now, text));
        }
    }

    fn finish(&self) {
        if self.terminal {
            let _ = writeln!(std::io::stderr());
        }
    }

    fn done(&self, live: &Live) -> Flushed {
        let (files, bytes) = self.first.unwrap_or((0, 0));
        Flushed {
            files,
            bytes,
            still_open: live.open_for_writing,
            elapsed: self.started.elapsed(),
        }
    }

    fn timed_out(&self, live: &Live) -> FlushError {
        FlushError::TimedOut {
            waited: self.started.elapsed(),
            files: live.closed_pending(),
            bytes: live.bytes_pending,
        }
    }
}
