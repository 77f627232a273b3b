//! Mounting: checks before anything is mounted, the FUSE session, and a clean unmount on
//! SIGINT/SIGTERM or an external `umount`.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use fuser::{Config, MountOption, Session, SessionACL};

mod point;

pub use point::check_mountpoint;
use point::{lazy_unmount, mount_device, tune_read_ahead, unmount};

use crate::cache::heads::HeadLog;
use crate::cache::{CacheDir, CacheDirError, DiskCache, MemoryCache};
use crate::config::MountConfig;
use crate::control::{self, Live, MountRecord};
use crate::fs::KeepFs;
use crate::metrics::http::{Readiness, ReadyCheck};
use crate::metrics::{self, gauge_value};
use crate::namespace::{Defaults, Namespace};
use crate::prefetch::{BlockFetcher, PrefetchConfig};
use crate::snapshot::{self, Manifest, SnapshotView};
use crate::store::{ObjectStore, S3Store, S3StoreConfig, StoreError};
use crate::vfs::Writes;
use crate::write::renames::DirRenames;
use crate::write::{DirtyFiles, UploadConfig, Uploader, WriteBarrier};

/// Environment variable through which a `--daemon` parent tells its child to report readiness
/// on stdout.
pub const DAEMON_CHILD_ENV: &str = "KEEPFS_DAEMON_CHILD";
const READY_LINE: &str = "keepfs: mounted";

/// Why a mount could not be made; the message is meant for the person who ran the command.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mountpoint {0} does not exist")]
    MountpointMissing(PathBuf),
    #[error("mountpoint {0} is not a directory")]
    MountpointNotDirectory(PathBuf),
    #[error("mountpoint {0} already has a FUSE filesystem mounted (unmount it first)")]
    MountpointInUse(PathBuf),
    #[error("cannot use mountpoint {path}: {source}")]
    MountpointAccess {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bucket {0:?} does not exist (check the name, --region and --endpoint-url)")]
    BucketNotFound(String),
    #[error(
        "access denied to bucket {bucket:?} ({detail}); check the credentials and the bucket policy"
    )]
    AccessDenied { bucket: String, detail: String },
    #[error("could not load AWS credentials: {0}")]
    Credentials(String),
    #[error("bucket {bucket:?} is in another region: {detail} (set --region)")]
    WrongRegion { bucket: String, detail: String },
    #[error("could not reach the S3 endpoint {endpoint} within {seconds}s: {detail}")]
    Unreachable {
        endpoint: String,
        seconds: u64,
        detail: String,
    },
    #[error("checking bucket {bucket:?} failed: {detail}")]
    Check { bucket: String, detail: String },
    #[error("FUSE mount failed: {0} (is /dev/fuse available and fusermount3 installed?)")]
    Fuse(std::io::Error),
    #[error(transparent)]
    CacheDir(#[from] CacheDirError),
    #[error("cannot read the journal in {path}: {source}")]
    Journal {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "/dev/fd/{fd} is not a FUSE connection: {reason} (a privileged helper opens /dev/fuse, mounts it with fd=N and passes the descriptor)"
    )]
    FuseFd { fd: i32, reason: String },
    #[error("cannot serve metrics at {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("snapshot: {0}")]
    Snapshot(crate::snapshot::SnapshotError),
    #[error("could not start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(
        "cache directory {dir} holds files not yet uploaded to {theirs}; mount {theirs} with it to upload them, or use another --cache-dir for {ours}"
    )]
    CacheOfOtherSource {
        dir: PathBuf,
        theirs: String,
        ours: String,
    },
}

/// What identifies the objects a mount shows: its `s3://BUCKET/PREFIX/`, and the endpoint
/// if one was given (`s3://b/p/ at http://host:port`). Cache directory state that belongs to
/// one source (unuploaded files, kept HEAD answers) is never used for another.
fn source_identity(source: &str, endpoint: Option<&str>) -> String {
    match endpoint {
        Some(e) => format!("{source} at {e}"),
        None => source.to_owned(),
    }
}

/// Refuses a cache directory whose unuploaded files (or unfinished renames) belong to another
/// bucket, prefix or endpoint: they must never go to the wrong place.
fn check_cache_source(cache_dir: &CacheDir, config: &MountConfig) -> Result<(), MountError> {
    let Ok(record) = MountRecord::load(cache_dir.path()) else {
        return Ok(()); // a new directory, or one from before mount.json existed
    };
    let theirs = source_identity(&record.source, record.endpoint_url.as_deref());
    let ours = source_identity(&config.source.to_string(), config.endpoint_url.as_deref());
    let busy = |dir: PathBuf| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| !e.file_name().to_string_lossy().starts_with('.'))
    };
    let pending = busy(cache_dir.journal_dir()) || busy(cache_dir.renames_dir());
    if theirs != ours && pending {
        return Err(MountError::CacheOfOtherSource {
            dir: cache_dir.path().to_owned(),
            theirs,
            ours,
        });
    }
    Ok(())
}

/// Runs the pre-mount bucket check, translating failures into [`MountError`]s.
async fn check_bucket(store: &S3Store, config: &MountConfig) -> Result<(), MountError> {
    let bound = config.connect_timeout * 2 + Duration::from_secs(2);
    let bucket = config.source.bucket.clone();
    let endpoint = config
        .endpoint_url
        .clone()
        .unwrap_or_else(|| "(AWS default)".into());
    let unreachable = |detail: String| MountError::Unreachable {
        endpoint: endpoint.clone(),
        seconds: bound.as_secs(),
        detail,
    };
    match tokio::time::timeout(bound, store.check_access(&config.source.prefix)).await {
        Err(_) => Err(unreachable("timed out".into())),
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(match e {
            StoreError::NoSuchBucket(_) | StoreError::NotFound => {
                MountError::BucketNotFound(bucket)
            }
            StoreError::AccessDenied(detail) => MountError::AccessDenied { bucket, detail },
            StoreError::Credentials(detail) => MountError::Credentials(detail),
            StoreError::WrongRegion(detail) => MountError::WrongRegion { bucket, detail },
            StoreError::Unreachable(detail) => unreachable(detail),
            other => MountError::Check {
                bucket,
                detail: other.to_string(),
            },
        }),
    }
}

fn fuse_config(config: &MountConfig) -> Config {
    let mut fuse = Config::default();
    fuse.mount_options = vec![
        MountOption::FSName(format!("keepfs:{}", config.source)),
        MountOption::Subtype("keepfs".into()),
        if config.read_write {
            MountOption::RW
        } else {
            MountOption::RO
        },
        MountOption::NoDev,
        MountOption::NoSuid,
        // The kernel enforces the mode bits keepfs reports.
        MountOption::DefaultPermissions,
    ];
    fuse.acl = if config.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    fuse.n_threads = Some(config.fuse_threads);
    fuse.clone_fd = true;
    fuse
}

/// Checks the mount point (creating a missing one with `--create-mountpoint`) and returns its
/// canonical path.
fn prepare_mountpoint(config: &MountConfig) -> Result<PathBuf, MountError> {
    // Only a missing one: a dead keepfs mount there answers ENOTCONN, and is dealt with by
    // check_mountpoint.
    let missing = matches!(std::fs::metadata(&config.mountpoint),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound);
    if config.create_mountpoint && missing {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&config.mountpoint)
            .map_err(|source| MountError::MountpointAccess {
                path: config.mountpoint.clone(),
                source,
            })?;
    }
    check_mountpoint(&config.mountpoint)
}

/// Mounts and serves until unmounted (by a signal or from outside). Returns once the
/// filesystem is unmounted.
pub fn run(config: MountConfig) -> Result<(), MountError> {
    // A connection handed over open (`/dev/fd/N`) is served as it is: the mount exists already.
    let (mountpoint, handed_over) = match point::fuse_fd_number(&config.mountpoint) {
        Some(fd) => (config.mountpoint.clone(), Some(point::take_fuse_fd(fd)?)),
        None => (prepare_mountpoint(&config)?, None),
    };
    // Held (and locked) for as long as the mount lives.
    let cache_dir = CacheDir::open(&config.cache_dir)?;
    tracing::debug!(cache_dir = %cache_dir.path().display(), "cache directory locked");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("keepfs-io")
        .build()
        .map_err(MountError::Runtime)?;
    // Bound before mounting: a taken port fails here, before anything is mounted.
    let readiness = Readiness::default();
    if let Some(addr) = config.metrics_addr {
        let bound = runtime
            .block_on(metrics::http::serve(addr, readiness.clone()))
            .map_err(|source| MountError::Metrics { addr, source })?;
        tracing::info!(%bound, "serving /metrics, /healthz and /readyz");
    }

    let store = runtime.block_on(async {
        let store = S3Store::new(&S3StoreConfig {
            bucket: config.source.bucket.clone(),
            endpoint_url: config.endpoint_url.clone(),
            region: config.region.clone(),
            force_path_style: config.force_path_style,
            connect_timeout: config.connect_timeout,
            request_timeout: config.request_timeout,
        })
        .await;
        check_bucket(&store, &config).await?;
        match &config.snapshot {
            None => Ok::<_, MountError>(store),
            Some(name) => {
                let manifest = Manifest::load(&store, &config.source.prefix, name)
                    .await
                    .map_err(MountError::Snapshot)?;
                tracing::info!(
                    snapshot = name,
                    objects = manifest.entries.len(),
                    "serving a snapshot read-only"
                );
                let view =
                    SnapshotView::new(manifest, &config.source.bucket, &config.source.prefix);
                Ok(store.with_view(Arc::new(view)))
            }
        }
    })?;
    let store = Arc::new(store);

    let defaults = Defaults {
        uid: config.uid,
        gid: config.gid,
        file_mode: config.file_mode,
        dir_mode: config.dir_mode,
        mount_time: SystemTime::now(),
    };
    let namespace = Namespace::new(
        Arc::clone(&store),
        &config.source.prefix,
        defaults,
        config.metadata_ttl,
    );
    // A snapshot's versions are not the bucket's: its answers are not kept.
    let namespace = match config.snapshot {
        None => {
            let source =
                source_identity(&config.source.to_string(), config.endpoint_url.as_deref());
            namespace.with_head_log(Arc::new(HeadLog::open(cache_dir.path(), &source)))
        }
        Some(_) => namespace,
    };
    let disk_cache = match config.disk_cache.then(|| {
        DiskCache::open(
            &cache_dir.blocks_dir(),
            config.max_cache_size,
            config.cache_min_free,
        )
    }) {
        None => None,
        Some(Ok(disk)) => Some(Arc::new(disk)),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "disk block cache unavailable; reads are cached in memory only");
            None
        }
    };
    let (memory_limit, limit_source) = match config.memory_limit {
        Some(bytes) => (bytes, crate::memory::LimitSource::Flag),
        None => crate::memory::default_limit(),
    };
    let shares = crate::memory::Shares::of(memory_limit);
    let cache_bytes = config.max_memory_cache.min(shares.cache);
    let transit = crate::memory::MemoryBudget::new(shares.transit);
    tracing::info!(
        limit = memory_limit,
        from = ?limit_source,
        block_cache = cache_bytes,
        in_transit = shares.transit,
        "memory limit"
    );
    let mut fetcher = BlockFetcher::new(Arc::clone(&store), MemoryCache::new(cache_bytes));
    if let Some(disk) = &disk_cache {
        fetcher = fetcher.with_disk_cache(Arc::clone(disk), shares.disk_queue);
    }
    let fetcher = Arc::new(fetcher);
    if config.metrics_addr.is_some() {
        let (fetcher, disk) = (Arc::clone(&fetcher), disk_cache.clone());
        let transit = transit.clone();
        metrics::get().memory_limit.set(gauge_value(memory_limit));
        metrics::on_scrape(move |m| {
            m.memory_in_transit.set(gauge_value(transit.in_use()));
            let (_, (memory, _)) = fetcher.usage();
            m.cache_size
                .get_or_create(&metrics::MEMORY)
                .set(gauge_value(memory));
            if let Some(disk) = &disk {
                m.cache_size
                    .get_or_create(&metrics::DISK)
                    .set(gauge_value(disk.usage().0));
                m.disk_cache_below_min_free
                    .set(i64::from(disk.below_min_free()));
            }
        });
    }
    let prefetch = PrefetchConfig {
        max_window: config.max_prefetch,
        memory: transit.clone(),
        ..PrefetchConfig::default()
    };
    runtime.spawn(log_usage(Arc::clone(&fetcher)));
    // What a stop signal drains before unmounting (read-write mounts).
    let mut draining = None;
    let (namespace, writes) = if config.read_write {
        check_cache_source(&cache_dir, &config)?;
        let (dirty, pending) =
            DirtyFiles::open(&cache_dir).map_err(|source| MountError::Journal {
                path: cache_dir.path().to_owned(),
                source,
            })?;
        let dirty = Arc::new(dirty);
        if let Some(disk) = &disk_cache {
            let dirty = Arc::clone(&dirty);
            disk.share_with_written_data(Box::new(move || dirty.cache_bytes()));
        }
        let reserved = format!("{}{}/", config.source.prefix, crate::snapshot::RESERVED_DIR);
        let bound = config.connect_timeout * 2 + Duration::from_secs(2);
        let conditional_puts = runtime.block_on(async {
            let probe = crate::store::probe::honours_conditional_puts(&*store, &reserved);
            tokio::time::timeout(bound, probe).await.unwrap_or(false)
        });
        let (verb, effect) = if conditional_puts {
            ("honours", "small uploads send no HEAD before the PUT")
        } else {
            ("ignores", "each upload checks the key with HEAD first")
        };
        tracing::info!(
            conditional_puts,
            "the server {verb} conditional PutObject: {effect}"
        );
        let upload = UploadConfig {
            part_size: config.part_size,
            concurrency: config.upload_concurrency,
            conditional_puts,
            memory: transit.clone(),
        };
        let uploader = {
            let _runtime = runtime.enter();
            Uploader::start(Arc::clone(&store), Arc::clone(&dirty), upload)
        };
        for key in &pending {
            uploader.enqueue(key);
        }
        let record = MountRecord {
            source: config.source.to_string(),
            bucket: config.source.bucket.clone(),
            endpoint_url: config.endpoint_url.clone(),
            region: config.region.clone(),
            force_path_style: config.force_path_style,
            connect_timeout_ms: config.connect_timeout.as_millis() as u64,
            request_timeout_ms: config.request_timeout.as_millis() as u64,
            part_size: config.part_size,
            upload_concurrency: config.upload_concurrency,
        };
        if let Err(e) = record.save(cache_dir.path()) {
            tracing::warn!(error = %e, "could not record the mount in the cache directory; keepfs flush without a mount won't work");
        }
        if config.metrics_addr.is_some() {
            let (dirty, stats) = (Arc::clone(&dirty), uploader.stats());
            metrics::on_scrape(move |m| Live::now(&dirty, &stats).export(m));
        }
        let barrier = WriteBarrier::default();
        let snapshots = Arc::new(snapshot::Barrier {
            writes: barrier.clone(),
            store: (*store).clone(),
            dirty: Arc::clone(&dirty),
            uploader: uploader.clone(),
            source: config.source.clone(),
            one_at_a_time: Default::default(),
        });
        {
            let _runtime = runtime.enter();
            if let Err(e) = control::serve(
                cache_dir.path(),
                dirty.clone(),
                uploader.stats(),
                Some(snapshots),
            ) {
                tracing::warn!(error = %e, "no control socket; keepfs flush and status can't reach this mount");
            }
        }
        // A directory rename a crash interrupted is finished before anything is shown.
        let renames = DirRenames::new(&cache_dir);
        runtime.block_on(renames.finish_interrupted(&*store));
        let namespace = namespace.with_dirty_files(Arc::clone(&dirty));
        let stopping = Arc::new(AtomicBool::new(false));
        draining = Some((Arc::clone(&dirty), Arc::clone(&stopping)));
        let writes = Writes {
            dirty,
            uploader,
            durability: config.durability,
            max_cache_size: config.max_cache_size,
            stopping,
            disk_cache,
            renames,
            barrier,
        };
        (namespace, Some(writes))
    } else {
        let pending = crate::cache::journal::Journal::new(&cache_dir)
            .load()
            .map(|l| l.records.len())
            .unwrap_or(0);
        if pending > 0 {
            tracing::warn!(
                pending,
                cache_dir = %cache_dir.path().display(),
                "files written earlier are waiting in the cache directory; mount without --read-only to see them and finish their upload"
            );
        }
        (namespace, None)
    };
    let fs = KeepFs::new(
        namespace,
        fetcher,
        prefetch,
        Arc::clone(&store),
        writes,
        runtime.handle().clone(),
    )
    .with_cache_dir(
        std::path::absolute(cache_dir.path()).unwrap_or_else(|_| cache_dir.path().to_owned()),
    )
    .with_max_background(shares.background);

    // Cleared when the session ends: what /readyz asks of a handed-over connection.
    let serving = Arc::new(AtomicBool::new(true));
    let handed = handed_over.is_some();
    let (session, device) = match handed_over {
        Some(fd) => {
            let mut fuse = fuse_config(&config);
            // Who may use the mount is the mounter's choice (its allow_other / user_id
            // options, which the kernel enforces); keepfs's own check would compare with
            // keepfs's uid, which a container's needn't share.
            // Extra descriptors for parallel reads are clones made by opening /dev/fuse, which
            // an unprivileged container may not have: one shared descriptor then.
            fuse.clone_fd = std::fs::File::open("/dev/fuse").is_ok();
            let session =
                Session::from_fd(fs, fd, SessionACL::All, fuse).map_err(MountError::Fuse)?;
            tracing::info!(source = %config.source, connection = %mountpoint.display(), "serving a FUSE connection mounted by another process");
            let serving = Arc::clone(&serving);
            readiness.set(Arc::new(move || {
                if serving.load(Ordering::Relaxed) {
                    Ok(())
                } else {
                    Err("the FUSE connection ended".to_owned())
                }
            }));
            (session, None)
        }
        None => {
            let session =
                Session::new(fs, &mountpoint, &fuse_config(&config)).map_err(MountError::Fuse)?;
            // This mount's device number, to know it again when the session ends.
            let device = mount_device(&mountpoint);
            if let Some(device) = &device {
                tune_read_ahead(device);
            }
            tracing::info!(source = %config.source, mountpoint = %mountpoint.display(), "mounted");
            readiness.set(mounted_check(&mountpoint, device.clone()));
            (session, device)
        }
    };
    report_ready();

    let (signal_mountpoint, signal_device) = (mountpoint.clone(), device.clone());
    let grace = config.shutdown_grace;
    runtime.spawn(async move {
        let mut signals = StopSignals::new();
        signals.next().await;
        if let Some((dirty, stopping)) = draining {
            stopping.store(true, Ordering::Relaxed);
            drain_uploads(&dirty, grace, &mut signals).await;
        }
        if handed {
            // keepfs can't unmount what another process mounted: it ends its side of the
            // connection (the mount then answers ENOTCONN until its owner unmounts it).
            tracing::info!("stop signal received; closing the FUSE connection");
            std::process::exit(0);
        }
        // Unmounted from outside meanwhile (a systemd mount unit unmounts, then signals):
        // the session ends by itself, and an unmount would hit what lies beneath.
        if signal_device.is_none() || mount_device(&signal_mountpoint) != signal_device {
            return;
        }
        tracing::info!(mountpoint = %signal_mountpoint.display(), "stop signal received; unmounting");
        if let Err(e) = unmount(&signal_mountpoint) {
            tracing::error!(error = %e, "unmount failed (mountpoint busy?); detaching lazily");
            lazy_unmount(&signal_mountpoint);
            std::process::exit(0);
        }
    });

    // Served on fuser's thread; this one waits for the session to end (the mount was
    // unmounted, by the stop signal above or from outside).
    let session = session.spawn().map_err(MountError::Fuse)?;
    while !session.guard.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
    }
    serving.store(false, Ordering::Relaxed);
    // fuser unmounts the mount point when the session handle goes, even when keepfs's mount is
    // gone already: it takes the dead connection for a live one (fuser 0.18), and the unmount
    // then removes whatever lies beneath — a container's volume, or a keepfs mounted there
    // since. Only a mount that is still this one is left to it.
    let result = if device.is_some() && mount_device(&mountpoint) == device {
        session.umount_and_join()
    } else {
        std::mem::forget(session); // a finished thread's handle and a dead mount's file
        Ok(())
    };
    runtime.shutdown_timeout(Duration::from_secs(1));
    drop(cache_dir);
    match result {
        Ok(()) => {
            tracing::info!(mountpoint = %mountpoint.display(), "unmounted");
            Ok(())
        }
        Err(e) => Err(MountError::Fuse(e)),
    }
}

/// `/readyz`'s check: the mount at `mountpoint` is still this one (`device`) and answers a
/// `stat` of its root through the kernel.
fn mounted_check(mountpoint: &Path, device: Option<String>) -> ReadyCheck {
    let mountpoint = mountpoint.to_owned();
    Arc::new(move || {
        if device.is_none() || mount_device(&mountpoint) != device {
            return Err(format!("{} is no longer mounted", mountpoint.display()));
        }
        std::fs::metadata(&mountpoint)
            .map(|_| ())
            .map_err(|e| format!("stat {}: {e}", mountpoint.display()))
    })
}

/// Logs cache and fetch usage periodically (debug level), for diagnosing memory use.
async fn log_usage(fetcher: Arc<BlockFetcher<S3Store>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tick.tick().await;
        if tracing::enabled!(tracing::Level::DEBUG) {
            let (inflight, (cache_bytes, cache_blocks)) = fetcher.usage();
            tracing::debug!(inflight, cache_bytes, cache_blocks, "usage");
        }
    }
}

/// Waits for every written file to be uploaded (open ones once they close), at most `grace`; a second stop signal ends the
/// wait. Whatever is left stays in the journal for the next start.
async fn drain_uploads(dirty: &DirtyFiles, grace: Duration, signals: &mut StopSignals) {
    let (files, bytes) = dirty.pending();
    if files == 0 {
        return;
    }
    tracing::info!(
        files,
        bytes,
        ?grace,
        "stop signal received; new writes refused, uploading written files before unmounting"
    );
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let (files, bytes) = dirty.pending();
        if files == 0 {
            tracing::info!("all written files uploaded");
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                files,
                bytes,
                "shutdown grace over; the rest stays in the cache directory and is uploaded by the next start"
            );
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = signals.next() => {
                tracing::warn!(files, bytes, "second stop signal; unmounting now, the rest stays in the cache directory");
                return;
            }
        }
    }
}

/// SIGTERM and SIGINT stop keepfs. SIGHUP (the terminal went away) also stops a foreground
/// keepfs, but a `--daemon` one has left its terminal and ignores it.
struct StopSignals {
    streams: Option<(
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
    )>,
}

impl StopSignals {
    fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let streams = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(term), Ok(int), Ok(hup)) => Some((term, int, hup)),
            _ => {
                tracing::error!("could not install signal handlers; stop keepfs with umount");
                None
            }
        };
        StopSignals { streams }
    }

    /// Waits for the next stop signal.
    async fn next(&mut self) {
        let Some((term, int, hup)) = &mut self.streams else {
            return std::future::pending().await;
        };
        let daemon = std::env::var_os(DAEMON_CHILD_ENV).is_some();
        loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = int.recv() => return,
                _ = hup.recv() => {
                    if !daemon {
                        return;
                    }
                    tracing::info!("SIGHUP ignored (running as a daemon)");
                }
            }
        }
    }
}

/// Tells whoever waits that the mount is ready: a `--daemon` parent, and systemd (Type=notify).
fn report_ready() {
    // systemd's Type=notify (sd_notify(3)): ready once the mount is.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "could not tell systemd the mount is ready");
    }
    if std::env::var_os(DAEMON_CHILD_ENV).is_some() {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "{READY_LINE}");
        let _ = out.flush();
    }
}

/// `--daemon`: re-runs this command in the background and waits until it reports the mount is
/// ready (exit 0) or exits with an error (its status is returned).
pub fn daemonize() -> std::io::Result<i32> {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    let mut child = Command::new(std::env::current_exe()?)
        .args(std::env::args_os().skip(1))
        .env(DAEMON_CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // A new process group: the terminal's Ctrl-C no longer reaches the daemon.
        .process_group(0)
        .spawn()?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    if line.trim_end() == READY_LINE {
        return Ok(0);
    }
    let status = child.wait()?;
    Ok(status.code().unwrap_or(1).max(1))
}
