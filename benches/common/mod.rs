//! Shared benchmark plumbing: which server to measure against, and keepfs mounts of it.

#![allow(dead_code)]

#[path = "../../tests/common/data.rs"]
mod data;
#[path = "../../tests/common/embedded.rs"]
mod embedded;
#[path = "../../tests/common/pg.rs"]
pub mod pg;

#[allow(unused_imports)] // not every benchmark writes patterns
pub use data::pattern;
#[allow(unused_imports)] // nor keeps versions
pub use embedded::enable_versioning;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};

pub struct Target {
    pub endpoint: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    pub client: Client,
}

/// A `u64` knob from the environment.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The server under test: KEEPFS_BENCH_ENDPOINT (+ bucket and credentials), else an
/// in-process s3s-fs server.
pub fn target(rt: &tokio::runtime::Runtime) -> Target {
    let (endpoint, bucket, access_key, secret_key) = match std::env::var("KEEPFS_BENCH_ENDPOINT") {
        Ok(endpoint) => (
            endpoint,
            std::env::var("KEEPFS_BENCH_BUCKET").expect("KEEPFS_BENCH_BUCKET"),
            std::env::var("AWS_ACCESS_KEY_ID").expect("AWS_ACCESS_KEY_ID"),
            std::env::var("AWS_SECRET_ACCESS_KEY").expect("AWS_SECRET_ACCESS_KEY"),
        ),
        Err(_) => {
            println!(
                "KEEPFS_BENCH_ENDPOINT not set: using the in-process s3s-fs server (slow; run benches/garage.sh for real figures)"
            );
            let root =
                std::env::temp_dir().join(format!("keepfs-bench-s3s-{}", std::process::id()));
            std::fs::create_dir_all(&root).unwrap();
            let endpoint = embedded::start_s3s_fs(&root, rt);
            (
                endpoint,
                "keepfs-bench".into(),
                embedded::ACCESS_KEY.into(),
                embedded::SECRET_KEY.into(),
            )
        }
    };
    let client = embedded::sdk_client(&endpoint, &access_key, &secret_key);
    let _ = rt.block_on(client.create_bucket().bucket(&bucket).send());
    Target {
        endpoint,
        bucket,
        access_key,
        secret_key,
        client,
    }
}

/// A keepfs process mounted on a temporary directory; unmounted on drop.
pub struct KeepfsMount {
    dir: PathBuf,
    child: Child,
}

impl KeepfsMount {
    pub fn new(t: &Target, bucket: &str, extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "keepfs-bench-mnt-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_keepfs"))
            .args(["mount", &format!("s3://{bucket}")])
            .arg(&dir)
            .args([
                "--endpoint-url",
                &t.endpoint,
                "--force-path-style",
                "--max-memory-cache",
                "1280MiB",
                "--cache-dir",
                &format!("{}.cache", dir.display()),
                "--log-level",
                "warn",
            ])
            .args(extra)
            .env("AWS_ACCESS_KEY_ID", &t.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &t.secret_key)
            .env("AWS_REGION", "us-east-1")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn keepfs");
        let deadline = Instant::now() + Duration::from_secs(30);
        let needle = format!(" {} ", dir.display());
        while !std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(&needle)
        {
            assert!(Instant::now() < deadline, "keepfs did not mount");
            std::thread::sleep(Duration::from_millis(20));
        }
        KeepfsMount { dir, child }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    pub fn peak_rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for KeepfsMount {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir(&self.dir);
        let _ = std::fs::remove_dir_all(format!("{}.cache", self.dir.display()));
    }
}

/// Uploads `size` bytes to `key` as a multipart upload of `part`-byte parts, `concurrency` in
/// flight; `part_data(n, len)` makes the bytes of part `n` (0-based) when it is sent.
pub async fn multipart_upload(
    t: &Target,
    key: &str,
    size: usize,
    part: usize,
    concurrency: usize,
    part_data: impl Fn(usize, usize) -> Vec<u8>,
) {
    use futures_util::stream::{self, StreamExt};
    let up = t
        .client
        .create_multipart_upload()
        .bucket(&t.bucket)
        .key(key)
        .send()
        .await
        .expect("create multipart upload");
    let id = up.upload_id().expect("upload id").to_owned();
    let part_data = &part_data;
    let id_ref = &id;
    let mut parts: Vec<CompletedPart> = stream::iter(0..size.div_ceil(part))
        .map(|n| async move {
            let len = part.min(size - n * part);
            let out = t
                .client
                .upload_part()
                .bucket(&t.bucket)
                .key(key)
                .upload_id(id_ref)
                .part_number(n as i32 + 1)
                .body(ByteStream::from(part_data(n, len)))
                .send()
                .await
                .expect("upload part");
            CompletedPart::builder()
                .part_number(n as i32 + 1)
                .set_e_tag(out.e_tag().map(String::from))
                .build()
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    parts.sort_by_key(|p| p.part_number());
    t.client
        .complete_multipart_upload()
        .bucket(&t.bucket)
        .key(key)
        .upload_id(&id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await
        .expect("complete multipart upload");
}

/// Uploads `key` (pseudo-random bytes, multipart) unless it already has `size` bytes.
pub async fn ensure_object(t: &Target, key: &str, size: u64, seed: u64) {
    if let Ok(h) = t
        .client
        .head_object()
        .bucket(&t.bucket)
        .key(key)
        .send()
        .await
        && h.content_length() == Some(size as i64)
    {
        return;
    }
    println!("uploading {key} ({} MiB)", size >> 20);
    multipart_upload(t, key, size as usize, 64 << 20, 1, |n, len| {
        pattern(len, seed * 100_000 + n as u64)
    })
    .await;
}
