//! Validated mount configuration: the S3 URL, sizes, modes and durations given on the command line.

use std::path::PathBuf;
use std::time::Duration;

/// Errors in what the user typed; each message says what is wrong and what is expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{0:?} is not an S3 URL: expected s3://BUCKET or s3://BUCKET/PREFIX")]
    NotS3Url(String),
    #[error(
        "{0:?} is not a valid bucket name: 3-63 characters of lowercase letters, digits, '.' and '-', starting and ending with a letter or digit"
    )]
    InvalidBucket(String),
    #[error(
        "invalid size {0:?}: expected a number of bytes with an optional unit (K, M, G, KiB, MiB, GiB)"
    )]
    InvalidSize(String),
    #[error("invalid mode {0:?}: expected octal permission bits such as 644")]
    InvalidMode(String),
    #[error(
        "invalid duration {0:?}: expected seconds such as 1, 0.5, 500ms, 2s or minutes such as 5m"
    )]
    InvalidDuration(String),
    #[error(
        "--memory-limit {0} is too small: at least {min} MiB ({overhead} MiB for the process itself, 16 MiB each for cached blocks and data in transit)",
        min = crate::memory::MIN_LIMIT >> 20,
        overhead = crate::memory::OVERHEAD >> 20
    )]
    MemoryLimitTooSmall(String),
    #[error(
        "invalid --cache-min-free {0:?}: expected a size such as 2GiB or a share of the cache disk such as 5%"
    )]
    InvalidMinFree(String),
}

/// `s3://BUCKET[/PREFIX]`, parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// Normalised: `""` or ending with `/`.
    pub prefix: String,
}

impl std::str::FromStr for S3Url {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("s3://")
            .ok_or_else(|| ConfigError::NotS3Url(s.to_owned()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(ConfigError::NotS3Url(s.to_owned()));
        }
        check_bucket_name(bucket)?;
        Ok(S3Url {
            bucket: bucket.to_owned(),
            prefix: crate::namespace::normalize_prefix(prefix),
        })
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

/// S3's bucket naming rules (general purpose buckets).
fn check_bucket_name(name: &str) -> Result<(), ConfigError> {
    let invalid = || ConfigError::InvalidBucket(name.to_owned());
    let bytes = name.as_bytes();
    let edge_ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let looks_like_ip = name.split('.').count() == 4
        && name
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if !(3..=63).contains(&bytes.len())
        || !bytes.iter().all(|&b| edge_ok(b) || b == b'.' || b == b'-')
        || !edge_ok(bytes[0])
        || !edge_ok(bytes[bytes.len() - 1])
        || name.contains("..")
        || looks_like_ip
    {
        return Err(invalid());
    }
    Ok(())
}

/// Parses `1048576`, `512K`, `64MiB`, `1G`, `2GiB` (K/M/G are binary, like `ls -h`).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::InvalidSize(s.to_owned());
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let num: u64 = num.parse().map_err(|_| err())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(err()),
    };
    num.checked_mul(1u64 << shift).ok_or_else(err)
}

/// Free space the disk block cache always leaves on the cache disk (`--cache-min-free`).
///
/// Only clean cached blocks give way to it: they are optional copies of what S3 holds. Written
/// data is kept as long as the disk has room (see `SEMANTICS.md`, *Cache space*).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinFree {
    /// A fixed number of bytes.
    Bytes(u64),
    /// A share of the cache disk's size, 0–100 %.
    Percent(u8),
}

impl MinFree {
    /// The default, 5 % of the cache disk: room for written data and for the disk's other users.
    pub const DEFAULT: MinFree = MinFree::Percent(5);

    /// Bytes to leave free on a disk of `total` bytes.
    pub fn of(self, total: u64) -> u64 {
        match self {
            MinFree::Bytes(bytes) => bytes,
            // Split so that it neither overflows nor rounds away a whole disk at 100 %.
            MinFree::Percent(p) => total / 100 * u64::from(p) + total % 100 * u64::from(p) / 100,
        }
    }
}

impl std::fmt::Display for MinFree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MinFree::Bytes(bytes) => write!(f, "{bytes} bytes"),
            MinFree::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// Parses `--cache-min-free`: a size as [`parse_size`] takes it, or `N%` with N from 0 to 100.
pub fn parse_min_free(s: &str) -> Result<MinFree, ConfigError> {
    let err = || ConfigError::InvalidMinFree(s.to_owned());
    match s.trim().strip_suffix('%') {
        Some(p) => p
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= 100)
            .map(MinFree::Percent)
            .ok_or_else(err),
        None => parse_size(s).map(MinFree::Bytes).map_err(|_| err()),
    }
}

/// Parses octal permission bits (`644`, `0755`).
pub fn parse_mode(s: &str) -> Result<u16, ConfigError> {
    u16::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| ConfigError::InvalidMode(s.to_owned()))
}

/// Parses `1`, `0.5` (seconds), `500ms`, `2s`, `5m`.
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    let err = || ConfigError::InvalidDuration(s.to_owned());
    let t = s.trim();
    let (num, scale) = if let Some(ms) = t.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(secs) = t.strip_suffix('s') {
        (secs, 1.0)
    } else if let Some(mins) = t.strip_suffix('m') {
        (mins, 60.0)
    } else {
        (t, 1.0)
    };
    let value: f64 = num.trim().parse().map_err(|_| err())?;
    Duration::try_from_secs_f64(value * scale).map_err(|_| err())
}

/// Output format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// When `close()` and `fsync()` of a written file return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Durability {
    /// Once data and journal record are durable in the cache directory.
    #[default]
    Local,
    /// Once the object is in S3 (the upload's error is returned).
    Remote,
}

/// Everything `keepfs mount` needs, validated.
#[derive(Debug, Clone)]
pub struct MountConfig {
    pub source: S3Url,
    pub mountpoint: PathBuf,
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub force_path_style: bool,
    pub allow_other: bool,
    /// Create a missing mount point (`--create-mountpoint`).
    pub create_mountpoint: bool,
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
    pub dir_mode: u16,
    pub metadata_ttl: Duration,
    /// `--memory-limit` in bytes; `None`: derived (see [`crate::memory::default_limit`]).
    pub memory_limit: Option<u64>,
    pub max_memory_cache: u64,
    /// Whether read blocks are also kept on the cache disk (across restarts).
    pub disk_cache: bool,
    pub max_prefetch: u64,
    pub fuse_threads: usize,
    /// Bound on the pre-mount bucket check (connect, list, retries).
    pub connect_timeout: Duration,
    /// See [`crate::store::S3StoreConfig::request_timeout`].
    pub request_timeout: Duration,
    /// How long a stop signal waits for uploads before unmounting.
    pub shutdown_grace: Duration,
    /// The cache directory this mount owns (locked while mounted).
    pub cache_dir: PathBuf,
    /// Whether writes are allowed (dirty files in the cache directory, uploaded in background).
    pub read_write: bool,
    /// Bound on bytes written files hold in the cache directory (`None`: the disk's space).
    pub max_cache_size: Option<u64>,
    /// Free space clean cached blocks always leave on the cache disk.
    pub cache_min_free: MinFree,
    /// When close/fsync of a written file return.
    pub durability: Durability,
    /// Multipart part size in bytes (at least 5 MiB).
    pub part_size: u64,
    /// Parts of one file in flight.
    pub upload_concurrency: usize,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (`None`: not at all).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Serve this snapshot of the source read-only instead of the source itself
    /// (`--snapshot`; `read_write` is then false).
    pub snapshot: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls() {
        let u: S3Url = "s3://my-bucket".parse().unwrap();
        assert_eq!((u.bucket.as_str(), u.prefix.as_str()), ("my-bucket", ""));
        let u: S3Url = "s3://b.c1/some/prefix".parse().unwrap();
        assert_eq!(
            (u.bucket.as_str(), u.prefix.as_str()),
            ("b.c1", "some/prefix/")
        );
        let u: S3Url = "s3://abc/".parse().unwrap();
        assert_eq!(u.prefix, "");
        for bad in ["bucket", "http://bucket", "s3://", "s3:///x"] {
            assert!(
                matches!(bad.parse::<S3Url>(), Err(ConfigError::NotS3Url(_))),
                "{bad}"
            );
        }
        for bad in [
            "s3://ab",
            "s3://Bucket",
            "s3://a..b",
            "s3://-ab",
            "s3://ab-",
            "s3://1.2.3.4",
            "s3://a_b",
        ] {
            assert!(
                matches!(bad.parse::<S3Url>(), Err(ConfigError::InvalidBucket(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn sizes_modes_durations() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("2 GiB"), Ok(2 << 30));
        assert!(parse_size("12X").is_err() && parse_size("").is_err() && parse_size("-1").is_err());
    }

    #[test]
    fn min_free_is_a_size_or_a_share() {
        assert_eq!(parse_min_free("0"), Ok(MinFree::Bytes(0)));
        assert_eq!(parse_min_free("2GiB"), Ok(MinFree::Bytes(2 << 30)));
        assert_eq!(parse_min_free("5%"), Ok(MinFree::Percent(5)));
        assert_eq!(parse_min_free(" 100 %"), Ok(MinFree::Percent(100)));
        for bad in ["101%", "-1%", "5.5%", "%", "lots", ""] {
            assert_eq!(
                parse_min_free(bad),
                Err(ConfigError::InvalidMinFree(bad.to_owned())),
                "{bad}"
            );
        }
        assert_eq!(MinFree::Percent(5).of(1000), 50);
        assert_eq!(MinFree::Percent(100).of(1 << 40), 1 << 40);
        assert_eq!(MinFree::Bytes(7).of(1 << 40), 7);
        assert_eq!(parse_mode("644"), Ok(0o644));
        assert_eq!(parse_mode("0755"), Ok(0o755));
        assert!(parse_mode("999").is_err() && parse_mode("17777").is_err());
        assert_eq!(parse_duration("1"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("-1").is_err() && parse_duration("soon").is_err());
    }
}
