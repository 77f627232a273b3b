//! The control socket: how `keepfs status` and `keepfs flush` reach the mount that owns a
//! cache directory. A Unix socket `DIR/control.sock` (the directory is 0700: only its owner
//! can connect); a client sends one request line, the mount answers with JSON lines:
//!
//! - `status`: one [`Live`] line.
//! - `flush`: uploads waiting to retry try again at once; a [`Live`] line every half second
//!   until everything closed is in S3 (the last line has `flushed: true`) or the client goes.
//! - `snapshot NAME TIMEOUT_MS`: takes snapshot NAME ([`crate::snapshot::Barrier::take`]);
//!   a `{"progress": ...}` line every half second, then `{"snapshot": SUMMARY, "held_ms": N}`
//!   or `{"error": "..."}`.
//!
//! The mount also records how it reaches S3 (`DIR/mount.json`, no secrets) so that
//! `keepfs flush` can upload from the journal itself when no mount is running.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::cache::journal::write_atomically;
use crate::write::{DirtyFiles, UploadFailure, UploadStats};

pub const SOCKET: &str = "control.sock";
pub const MOUNT_RECORD: &str = "mount.json";

/// What the running mount knows beyond the journal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Live {
    pub pid: u32,
    /// Files whose local copy is newer than S3 (open ones included).
    pub dirty_files: usize,
    pub bytes_pending: u64,
    /// Dirty files still open for writing: uploaded after their last close.
    pub open_for_writing: usize,
    /// Files being uploaded now (or waiting to retry after a failure).
    pub uploads_in_flight: usize,
    /// Conflict copies uploaded since the mount started.
    pub conflicts: u64,
    /// Bytes resumed multipart uploads did not send again.
    pub resumed_bytes: u64,
    /// Milliseconds the oldest change not yet in S3 has waited (0 when none).
    #[serde(default)]
    pub oldest_pending_ms: u64,
    /// The last failed upload attempts, oldest first.
    pub last_errors: Vec<UploadFailure>,
    /// Every closed file is in S3 and no upload task runs (only files open for writing
    /// remain dirty).
    pub flushed: bool,
}

impl Live {
    /// Dirty files that are closed, so waiting for (or in) upload.
    pub fn closed_pending(&self) -> usize {
        self.dirty_files.saturating_sub(self.open_for_writing)
    }

    /// Sets the write-back gauges of `m` from these numbers (`/metrics` and `keepfs status`
    /// read the same [`Live::now`]).
    pub fn export(&self, m: &crate::metrics::Metrics) {
        use crate::metrics::gauge_value;
        m.dirty_files.set(gauge_value(self.dirty_files));
        m.dirty_bytes.set(gauge_value(self.bytes_pending));
        m.open_for_writing.set(gauge_value(self.open_for_writing));
        m.uploads_in_flight.set(gauge_value(self.uploads_in_flight));
        m.oldest_dirty_age
            .set(self.oldest_pending_ms as f64 / 1000.0);
    }

    /// The numbers now.
    pub fn now(dirty: &DirtyFiles, stats: &UploadStats) -> Self {
        let (dirty_files, bytes_pending) = dirty.pending();
        let open_for_writing = dirty.open_for_writing();
        let uploads_in_flight = stats.uploading();
        Live {
            pid: std::process::id(),
            dirty_files,
            bytes_pending,
            open_for_writing,
            uploads_in_flight,
            conflicts: crate::write::upload::conflicts(),
            resumed_bytes: crate::write::upload::resumed_bytes(),
            oldest_pending_ms: dirty
                .oldest_pending()
                .map_or(0, |age| age.as_millis().try_into().unwrap_or(u64::MAX)),
            last_errors: stats.failures(),
            flushed: dirty_files <= open_for_writing && uploads_in_flight == 0,
        }
    }
}

/// How the mount reached S3, for `keepfs flush` without a running mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    /// `s3://BUCKET[/PREFIX]`.
    pub source: String,
    pub bucket: String,
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub force_path_style: bool,
    pub connect_timeout_ms: u64,
    /// Absent in records of mounts before `--request-timeout`: the default.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    pub part_size: u64,
    pub upload_concurrency: usize,
}

fn default_request_timeout_ms() -> u64 {
    crate::store::DEFAULT_REQUEST_TIMEOUT.as_millis() as u64
}

impl MountRecord {
    /// How to reach the bucket again, as the mount did.
    pub fn store_config(&self) -> crate::store::S3StoreConfig {
        crate::store::S3StoreConfig {
            bucket: self.bucket.clone(),
            endpoint_url: self.endpoint_url.clone(),
            region: self.region.clone(),
            force_path_style: self.force_path_style,
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            request_timeout: Duration::from_millis(self.request_timeout_ms),
        }
    }

    /// Records it in cache directory `dir` (atomically).
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        write_atomically(dir, &dir.join(MOUNT_RECORD), &bytes)
    }

    pub fn load(dir: &Path) -> std::io::Result<Self> {
        let bytes = std::fs::read(dir.join(MOUNT_RECORD))?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }
}

/// Listens on `DIR/control.sock` (replacing a socket a dead process left behind: the caller
/// holds the directory's lock) and answers requests on the current runtime.
pub fn serve(
    dir: &Path,
    dirty: Arc<DirtyFiles>,
    stats: Arc<UploadStats>,
    snapshots: Option<Arc<crate::snapshot::Barrier>>,
) -> std::io::Result<()> {
    let path = dir.join(SOCKET);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(&path)?;
    // Connecting takes write permission on the socket: its owner's only, whatever the umask.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: don't spin.
                    tracing::warn!(error = %e, "control socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if !peer_may_ask(&stream) {
                continue; // dropped unanswered
            }
            let (dirty, stats, snapshots) = (dirty.clone(), stats.clone(), snapshots.clone());
            tokio::spawn(async move {
                if let Err(e) = answer(stream, &dirty, &stats, snapshots).await {
                    tracing::debug!(error = %e, "control connection ended");
                }
            });
        }
    });
    Ok(())
}

/// Whether the process at the other end may use the control socket: the user the mount runs
/// as, or root (peer credentials, `SO_PEERCRED`, unix(7)). The socket's mode and its 0700
/// directory keep others out already; this holds when either was loosened by hand.
fn peer_may_ask(stream: &tokio::net::UnixStream) -> bool {
    let own = effective_uid();
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == own || cred.uid() == 0 => true,
        Ok(cred) => {
            tracing::warn!(
                uid = cred.uid(),
                pid = cred.pid(),
                "control socket: refused a connection from another user"
            );
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "control socket: no peer credentials; refused");
            false
        }
    }
}

/// The effective uid of this process.
fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail (getuid(2)).
    unsafe { libc::geteuid() }
}

async fn answer(
    stream: tokio::net::UnixStream,
    dirty: &DirtyFiles,
    stats: &UploadStats,
    snapshots: Option<Arc<crate::snapshot::Barrier>>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut request = String::new();
    let mut read = BufReader::new(read).take(256);
    tokio::time::timeout(Duration::from_secs(5), read.read_line(&mut request))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let send = |live: &Live| {
        let mut line = serde_json::to_vec(live).unwrap_or_default();
        line.push(b'\n');
        line
    };
    match request.trim() {
        "status" => write.write_all(&send(&Live::now(dirty, stats))).await,
        "flush" => {
            tracing::info!("flush asked for: retrying uploads now");
            let mut rounds = 0u32;
            loop {
                // Waiting uploads retry now, and again every 10 s (not at every report).
                if rounds.is_multiple_of(20) {
                    stats.retry_now();
                }
                rounds += 1;
                let live = Live::now(dirty, stats);
                write.write_all(&send(&live)).await?;
                if live.flushed {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        request if request.starts_with("snapshot ") => {
            let mut words = request.split_whitespace().skip(1);
            let (Some(name), Some(timeout)) = (words.next(), words.next()) else {
                let reply = serde_json::json!({ "error": "usage: snapshot NAME TIMEOUT_MS" });
                return write.write_all(format!("{reply}\n").as_bytes()).await;
            };
            let timeout = Duration::from_millis(timeout.parse().unwrap_or(600_000));
            match snapshots {
                Some(barrier) => snapshot(&mut write, barrier, name.to_owned(), timeout).await,
                None => {
                    let reply = serde_json::json!({ "error": "this mount can't take snapshots (read-only)" });
                    write.write_all(format!("{reply}\n").as_bytes()).await
                }
            }
        }
        other => {
            let reply = serde_json::json!({ "error": format!("unknown request {other:?}") });
            write.write_all(format!("{reply}\n").as_bytes()).await
        }
    }
}

/// Takes a snapshot for a client, reporting progress every half second. The snapshot goes on
/// if the client leaves.
async fn snapshot(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    barrier: Arc<crate::snapshot::Barrier>,
    name: String,
    timeout: Duration,
) -> std::io::Result<()> {
    let latest = Arc::new(std::sync::Mutex::new(None));
    let reported = Arc::clone(&latest);
    let mut task = tokio::spawn(async move {
        let report = move |p: crate::snapshot::Progress| {
            *reported.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        };
        tracing::info!(snapshot = name, "snapshot asked for");
        barrier.take(&name, timeout, &report).await
    });
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let done = loop {
        tokio::select! {
            done = &mut task => break done,
            _ = tick.tick() => {
                let progress = latest.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(progress) = progress {
                    let line = serde_json::json!({ "progress": progress });
                    write.write_all(format!("{line}\n").as_bytes()).await?;
                }
            }
        }
    };
    let reply = match done {
        Ok(Ok(taken)) => {
            tracing::info!(
                snapshot = taken.manifest.name,
                objects = taken.manifest.entries.len(),
                held_ms = taken.held.as_millis() as u64,
                "snapshot taken"
            );
            serde_json::json!({
                "snapshot": crate::snapshot::restore::Summary::from(&taken.manifest),
                "held_ms": taken.held.as_millis() as u64,
            })
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "snapshot failed");
            serde_json::json!({ "error": e.to_string() })
        }
        Err(e) => serde_json::json!({ "error": format!("snapshot task failed: {e}") }),
    };
    write.write_all(format!("{reply}\n").as_bytes()).await
}

/// The control socket of cache directory `dir`.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join(SOCKET)
}

/// Asks the mount owning `dir` for its [`Live`] numbers (`None` if it can't be reached).
pub fn ask_status(dir: &Path) -> Option<Live> {
    use std::io::{BufRead, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket_path(dir)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"status\n").ok()?;
    let mut line = String::new();
    std::io::BufReader::new(stream).read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}
