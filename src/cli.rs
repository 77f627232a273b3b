//! Command-line interface: `keepfs mount s3://BUCKET[/PREFIX] MOUNTPOINT [flags]`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::cache::default_cache_dir;
use crate::config::{
    ConfigError, Durability, LogFormat, MountConfig, S3Url, parse_duration, parse_min_free,
    parse_mode, parse_size,
};

#[derive(Debug, Parser)]
#[command(
    name = "keepfs",
    version,
    about = "Mount an S3 bucket (or a prefix of one) as a POSIX filesystem through FUSE",
    long_about = "Mount an S3 bucket (or a prefix of one) as a POSIX filesystem through FUSE.\n\n\
        Credentials and region come from the AWS default chain (environment, profile, web \
        identity/IRSA, EKS Pod Identity, ECS, IMDS). Writes land in the cache directory and are \
        uploaded in the background; --read-only refuses them."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount s3://BUCKET[/PREFIX] at MOUNTPOINT.
    Mount(Box<MountArgs>),
    /// Show what a cache directory holds: files waiting for upload and whether a mount owns it.
    /// Works while the mount runs or not.
    Status(StatusArgs),
    /// Upload everything pending in a cache directory and wait (for a Kubernetes preStop hook).
    /// Asks the running mount, or uploads from the journal itself when none runs.
    Flush(FlushArgs),
    /// Take, list, delete and restore snapshots: point-in-time, crash-consistent copies of a
    /// mount kept in its bucket under PREFIX/.keepfs/snapshots/ (see docs/BACKUP.md).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take snapshot NAME. Through a running mount (MOUNTPOINT, or --cache-dir of a running
    /// mount), writes are held at a barrier while what was closed or fsync'd before it is
    /// uploaded, then the bucket is recorded while writes go on. With --cache-dir and no mount
    /// running, the journal is uploaded first; with s3://, the bucket is recorded as it is.
    Create {
        /// 1 to 100 letters, digits, '.', '_' or '-'.
        name: String,
        #[command(flatten)]
        at: SnapshotLocation,
        /// Give up after this long if what was written can't be uploaded (for example 30s, 5m).
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// List the snapshots of a mount or prefix.
    List {
        #[command(flatten)]
        at: SnapshotLocation,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete snapshot NAME (its manifest, then its copies).
    Delete {
        name: String,
        #[command(flatten)]
        at: SnapshotLocation,
    },
    /// Restore snapshot NAME with server-side copies: into its own prefix, or into --to. The
    /// target must be empty unless --force, which makes it equal to the snapshot (objects the
    /// snapshot lacks are deleted). Stop the mount of the target first.
    Restore {
        name: String,
        #[command(flatten)]
        at: SnapshotLocation,
        /// Where to restore (same endpoint and credentials): s3://BUCKET[/PREFIX].
        #[arg(long, value_name = "s3://BUCKET[/PREFIX]")]
        to: Option<String>,
        /// Restore into a non-empty target, replacing its contents.
        #[arg(long)]
        force: bool,
    },
}

/// Which mount or prefix a snapshot command is about.
#[derive(Debug, Args)]
pub struct SnapshotLocation {
    /// A keepfs mount point, or s3://BUCKET[/PREFIX] (then give --endpoint-url and the like as
    /// to `keepfs mount`).
    #[arg(
        value_name = "MOUNTPOINT|s3://BUCKET[/PREFIX]",
        required_unless_present = "cache_dir",
        conflicts_with = "cache_dir"
    )]
    pub target: Option<String>,

    /// The cache directory of a mount (running or not): its mount.json says where the bucket
    /// is.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// S3 endpoint, with an s3:// target (also read from AWS_ENDPOINT_URL).
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,

    /// AWS region, with an s3:// target.
    #[arg(long)]
    pub region: Option<String>,

    /// Path-style addressing, with an s3:// target.
    #[arg(long)]
    pub force_path_style: bool,
}

#[derive(Debug, Args)]
pub struct FlushArgs {
    /// The mount point of a running keepfs (its cache directory is asked from the mount).
    #[arg(
        value_name = "MOUNTPOINT",
        required_unless_present = "cache_dir",
        conflicts_with = "cache_dir"
    )]
    pub mountpoint: Option<PathBuf>,

    /// The cache directory (as given to `keepfs mount --cache-dir`); works with or without a
    /// running mount.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Give up after this long (for example 20s, 5m); what is not uploaded stays in the journal.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The cache directory (as given to `keepfs mount --cache-dir`).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: PathBuf,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// What to mount: s3://BUCKET or s3://BUCKET/PREFIX.
    #[arg(value_name = "s3://BUCKET[/PREFIX]")]
    pub source: String,

    /// An existing directory with no FUSE filesystem mounted on it (a container volume there is
    /// mounted over).
    pub mountpoint: PathBuf,

    /// S3 endpoint for S3-compatible servers (for example http://127.0.0.1:9000). Also read
    /// from AWS_ENDPOINT_URL by the AWS default chain.
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,

    /// AWS region of the bucket (default: from the AWS chain, else us-east-1).
    #[arg(long)]
    pub region: Option<String>,

    /// Address the bucket as ENDPOINT/BUCKET instead of BUCKET.ENDPOINT (most S3-compatible
    /// servers need this).
    #[arg(long)]
    pub force_path_style: bool,

    /// Mount read-only: every write fails with EROFS.
    #[arg(long, conflicts_with = "read_write")]
    pub read_only: bool,

    /// Allow writes (the default): every change lands in the cache directory first and is
    /// uploaded in the background.
    #[arg(long)]
    pub read_write: bool,

    /// Most bytes written files may hold in the cache directory before their upload (bytes, or
    /// with K/M/G suffix; default: only the cache disk's free space). A write that would go
    /// beyond waits up to 30 s for uploads to free space, then fails with ENOSPC.
    #[arg(long, value_name = "SIZE")]
    pub max_cache_size: Option<String>,

    /// When close() and fsync() of a written file return: `local` once it is durable in the
    /// cache directory (uploaded in the background; needs a persistent cache disk to survive a
    /// pod restart), `remote` once it is in S3, returning the upload's error if it fails.
    #[arg(long, value_enum, default_value = "local")]
    pub durability: Durability,

    /// Part size of multipart uploads (grown automatically so no upload needs more than 10 000
    /// parts); files up to this size are uploaded with one PutObject.
    #[arg(long, default_value = "8MiB", value_name = "SIZE")]
    pub part_size: String,

    /// Parts of one file uploaded in parallel.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub upload_concurrency: u16,

    /// Stay in the foreground (the default); logs go to stderr.
    #[arg(long, conflicts_with = "daemon")]
    pub foreground: bool,

    /// Detach once the mount is ready; the command exits 0 when the filesystem is usable, or
    /// non-zero with the reason if mounting failed.
    #[arg(long)]
    pub daemon: bool,

    /// Create the mount point (and its parents, mode 0755) if it does not exist: a sidecar
    /// mounts in a subdirectory of its shared volume, which starts empty.
    #[arg(long)]
    pub create_mountpoint: bool,

    /// Let users other than the one who mounted access the filesystem (needs root or
    /// user_allow_other in /etc/fuse.conf). Off by default.
    #[arg(long)]
    pub allow_other: bool,

    /// Owner of files and directories without x-amz-meta-uid (default: the mounting user).
    #[arg(long)]
    pub uid: Option<u32>,

    /// Group of files and directories without x-amz-meta-gid (default: the mounting group).
    #[arg(long)]
    pub gid: Option<u32>,

    /// Permission bits (octal) of files without x-amz-meta-mode.
    #[arg(long, default_value = "644", value_name = "OCTAL")]
    pub file_mode: String,

    /// Permission bits (octal) of directories.
    #[arg(long, default_value = "755", value_name = "OCTAL")]
    pub dir_mode: String,

    /// How long file attributes and names are trusted before asking S3 again (seconds, or
    /// 500ms / 2s). Directory listings are always fresh.
    #[arg(long, default_value = "1", value_name = "DURATION")]
    pub metadata_ttl: String,

    /// Everything keepfs holds in memory (bytes, or with K/M/G suffix; at least 160MiB):
    /// 128 MiB for the process, the rest half for cached blocks and half for reads ahead and
    /// upload parts in transit. `auto`: 80 % of the cgroup's memory limit, else 1/8 of RAM.
    #[arg(long, default_value = "auto", value_name = "SIZE")]
    pub memory_limit: String,

    /// Memory for cached file blocks (bytes, or with K/M/G suffix), at most the cache's share
    /// of `--memory-limit`. 0 disables the cache.
    #[arg(long, default_value = "512MiB", value_name = "SIZE")]
    pub max_memory_cache: String,

    /// Keep blocks read from S3 in memory only, not also on the cache disk (where they survive
    /// restarts). Saves the disk writes on CPU-bound nodes doing one-pass reads.
    #[arg(long)]
    pub no_disk_cache: bool,

    /// Free space blocks read from S3 always leave on the cache disk: a size (K/M/G suffix) or a
    /// share of the disk such as 10%. Below it, least recently used blocks are evicted and new
    /// ones are not stored (a warning says so). Written data is not bound by it.
    #[arg(long, default_value = "5%", value_name = "SIZE|PERCENT")]
    pub cache_min_free: String,

    /// Largest read-ahead window of one sequential reader.
    #[arg(long, default_value = "64MiB", value_name = "SIZE")]
    pub max_prefetch: String,

    /// Threads serving FUSE requests.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub fuse_threads: u16,

    /// Local cache directory, created with mode 0700 and owned by one keepfs process at a time
    /// (default: a directory per mounted bucket/prefix under $XDG_CACHE_HOME/keepfs, or
    /// ~/.cache/keepfs, or /var/cache/keepfs for root).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// On SIGTERM/SIGINT, how long to keep uploading written files before unmounting (new
    /// writes are refused meanwhile; what is left stays in the cache directory for the next
    /// start). Kubernetes allows 30 s by default. A second signal stops at once.
    #[arg(long, default_value = "25", value_name = "DURATION")]
    pub shutdown_grace: String,

    /// Bound on connecting to the endpoint; the check before mounting gives up after twice this.
    #[arg(long, default_value = "5", value_name = "DURATION")]
    pub connect_timeout: String,

    /// How long one attempt of a request waits for S3 to begin answering before it is retried
    /// (a server that accepts a request and never answers); uploads and server-side copies get
    /// 10 times as long. At least 1 s.
    #[arg(long, default_value = "30", value_name = "DURATION")]
    pub request_timeout: String,

    /// Serve Prometheus metrics at http://HOST:PORT/metrics, with /healthz (the process
    /// answers) and /readyz (the mount answers), for example 127.0.0.1:9464 or 0.0.0.0:9464 in
    /// a pod. Off by default.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Mount snapshot NAME of the source (see `keepfs snapshot`) read-only instead of the
    /// source itself. Its default cache directory is its own.
    #[arg(long, value_name = "NAME", conflicts_with = "read_write")]
    pub snapshot: Option<String>,

    /// Log level (error, warn, info, debug, trace). RUST_LOG, when set, takes precedence.
    #[arg(long, default_value = "info")]
    pub log_level: String,

    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl MountArgs {
    /// Validates the arguments into a [`MountConfig`].
    pub fn to_config(&self) -> Result<MountConfig, ConfigError> {
        let source: S3Url = self.source.parse()?;
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Ok(MountConfig {
            mountpoint: self.mountpoint.clone(),
            endpoint_url: self.endpoint_url.clone(),
            region: self.region.clone(),
            force_path_style: self.force_path_style,
            allow_other: self.allow_other,
            create_mountpoint: self.create_mountpoint,
            uid: self.uid.unwrap_or(uid),
            gid: self.gid.unwrap_or(gid),
            file_mode: parse_mode(&self.file_mode)?,
            dir_mode: parse_mode(&self.dir_mode)?,
            metadata_ttl: parse_duration(&self.metadata_ttl)?,
            memory_limit: match self.memory_limit.as_str() {
                "auto" => None,
                size => match parse_size(size)? {
                    bytes if bytes < crate::memory::MIN_LIMIT => {
                        return Err(ConfigError::MemoryLimitTooSmall(size.to_owned()));
                    }
                    bytes => Some(bytes),
                },
            },
            max_memory_cache: parse_size(&self.max_memory_cache)?,
            disk_cache: !self.no_disk_cache,
            cache_min_free: parse_min_free(&self.cache_min_free)?,
            max_prefetch: parse_size(&self.max_prefetch)?.max(1 << 20),
            fuse_threads: usize::from(self.fuse_threads),
            connect_timeout: parse_duration(&self.connect_timeout)?.max(Duration::from_millis(100)),
            request_timeout: parse_duration(&self.request_timeout)?.max(Duration::from_secs(1)),
            shutdown_grace: parse_duration(&self.shutdown_grace)?,
            read_write: !self.read_only && self.snapshot.is_none(),
            durability: self.durability,
            part_size: parse_size(&self.part_size)?.max(5 << 20),
            max_cache_size: self.max_cache_size.as_deref().map(parse_size).transpose()?,
            upload_concurrency: usize::from(self.upload_concurrency),
            metrics_addr: self.metrics_addr,
            cache_dir: self.cache_dir.clone().unwrap_or_else(|| {
                // A snapshot's blocks are not the live prefix's: a directory of its own.
                let prefix = match &self.snapshot {
                    Some(name) => crate::snapshot::snapshot_prefix(&source.prefix, name),
                    None => source.prefix.clone(),
                };
                default_cache_dir(self.endpoint_url.as_deref(), &source.bucket, &prefix)
            }),
            snapshot: self.snapshot.clone(),
            source,
        })
    }
}
