//! Shared test harness: a real S3 server over loopback, the real SDK client to seed it, and
//! real FUSE mounts of the `keepfs` binary that are always unmounted.
//!
//! By default the server is s3s-fs, started in-process on `127.0.0.1:0` over a temporary
//! directory. With `KEEPFS_TEST_S3_ENDPOINT` set, the same tests run against that server
//! instead (CI starts moto there); `KEEPFS_TEST_S3_KIND` names it (`moto`, `garage`, ...).

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use sha2::{Digest, Sha256};

pub mod data;
pub mod embedded;
pub mod faults;
pub mod pg;
pub mod scrape;

#[allow(unused_imports)] // not every test file uses it
pub use data::pattern;

pub use embedded::{ACCESS_KEY, SECRET_KEY};

/// What the server under test does and does not support (see shared/S3-SERVERS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    S3sFs,
    Moto,
    Other,
}

pub struct TestServer {
    pub endpoint: String,
    pub kind: ServerKind,
    access_key: String,
    secret_key: String,
    client: Client,
}

impl TestServer {
    /// Whether a GET with a stale `If-Match` is refused (412) by this server.
    pub fn honours_get_if_match(&self) -> bool {
        self.kind != ServerKind::S3sFs
    }

    /// Whether the server lists and HEADs `dir/` marker objects (s3s-fs does neither).
    pub fn keeps_markers(&self) -> bool {
        self.kind != ServerKind::S3sFs
    }

    /// Whether a PutObject whose `If-None-Match: *` or `If-Match` fails is refused (412):
    /// s3s-fs and moto do; of the others, Garage ignores both.
    pub fn honours_conditional_puts(&self) -> bool {
        self.kind != ServerKind::Other
    }

    /// Whether listings carry each object's ETag (s3s-fs 0.14's delimited listings don't).
    pub fn lists_etags(&self) -> bool {
        self.kind != ServerKind::S3sFs
    }

    /// Whether the server checks signatures (moto accepts any credentials).
    pub fn checks_credentials(&self) -> bool {
        self.kind != ServerKind::Moto
    }
}

/// What the in-process server has seen for `bucket` so far; `None` when the tests run against
/// an external server.
pub fn traffic(bucket: &str) -> Option<embedded::Traffic> {
    (server().kind == ServerKind::S3sFs).then(|| embedded::traffic(bucket))
}

/// Has the in-process server accept only `parts` more UploadPart requests for `bucket` (then
/// 403), or with `None` all of them again. Returns false (nothing done) on external servers.
pub fn limit_parts(bucket: &str, parts: Option<u64>) -> bool {
    if server().kind != ServerKind::S3sFs {
        return false;
    }
    let mut budgets = embedded::PART_BUDGET.lock().unwrap();
    let budgets = budgets.get_or_insert_with(HashMap::new);
    match parts {
        Some(n) => budgets.insert(bucket.to_owned(), n),
        None => budgets.remove(bucket),
    };
    true
}

/// Makes the in-process server refuse (`true`) or accept again (`false`) every
/// CompleteMultipartUpload to `bucket`. Returns `false` (and does nothing) on other servers.
pub fn refuse_completions(bucket: &str, refuse: bool) -> bool {
    if server().kind != ServerKind::S3sFs {
        return false;
    }
    let mut refusing = embedded::REFUSING_COMPLETIONS.lock().unwrap();
    refusing.retain(|b| b != bucket);
    if refuse {
        refusing.push(bucket.to_owned());
    }
    true
}

/// Polls `current` (the sha256 S3 holds for `key`) until it is `sha`; panics at `deadline`.
fn poll_sha(
    key: &str,
    sha: &str,
    deadline: Instant,
    pause: Duration,
    current: impl Fn() -> Option<String>,
) {
    loop {
        let got = current();
        if got.as_deref() == Some(sha) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{key}: S3 holds {got:?}, want {sha}"
        );
        std::thread::sleep(pause);
    }
}

/// Opens `path` with `O_APPEND`, writes `bytes` and closes it.
pub fn append(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for append: {e}", path.display()));
    f.write_all(bytes).unwrap();
}

/// One runtime for all harness I/O (seeding, in-process server).
pub fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("test runtime")
    })
}

pub fn server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| match std::env::var("KEEPFS_TEST_S3_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => {
            let kind = match std::env::var("KEEPFS_TEST_S3_KIND").as_deref() {
                Ok("moto") => ServerKind::Moto,
                _ => ServerKind::Other,
            };
            let access = std::env::var("KEEPFS_TEST_S3_ACCESS_KEY").unwrap_or(ACCESS_KEY.into());
            let secret = std::env::var("KEEPFS_TEST_S3_SECRET_KEY").unwrap_or(SECRET_KEY.into());
            eprintln!("keepfs tests: using S3 server at {endpoint} ({kind:?})");
            TestServer::new(endpoint, kind, access, secret)
        }
        _ => {
            let endpoint = start_s3s_fs();
            TestServer::new(
                endpoint,
                ServerKind::S3sFs,
                ACCESS_KEY.into(),
                SECRET_KEY.into(),
            )
        }
    })
}

/// Starts the in-process server over a fresh directory, named with this process's id so that
/// a later test run can remove it (the server lives as long as the process).
fn start_s3s_fs() -> String {
    remove_dead_server_dirs();
    let root = tempfile::Builder::new()
        .prefix(&format!("{SERVER_DIR_PREFIX}{}-", std::process::id()))
        .tempdir()
        .expect("server root")
        .keep();
    embedded::start_s3s_fs(&root, rt())
}

const SERVER_DIR_PREFIX: &str = "keepfs-s3s-";

/// Removes server directories of test processes that have ended.
fn remove_dead_server_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SERVER_DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A private in-process server over a temporary directory, for tests that stop and restart
/// it; removed when dropped.
pub struct PrivateServer {
    pub server: embedded::Embedded,
    /// The harness's helpers (put, get, wait_for_object...) against this server.
    pub s3: TestServer,
    _root: tempfile::TempDir,
}

impl PrivateServer {
    pub fn start() -> Self {
        let root = tempfile::Builder::new()
            .prefix("keepfs-private-s3-")
            .tempdir()
            .expect("server root");
        let server = embedded::Embedded::start(root.path(), rt());
        let s3 = TestServer::new(
            server.endpoint.clone(),
            ServerKind::S3sFs,
            ACCESS_KEY.into(),
            SECRET_KEY.into(),
        );
        PrivateServer {
            server,
            s3,
            _root: root,
        }
    }

    pub fn stop(&mut self) {
        self.server.stop(rt());
    }

    pub fn restart(&mut self) {
        self.server.restart(rt());
    }
}

impl TestServer {
    fn new(endpoint: String, kind: ServerKind, access_key: String, secret_key: String) -> Self {
        let client = embedded::sdk_client(&endpoint, &access_key, &secret_key);
        TestServer {
            endpoint,
            kind,
            access_key,
            secret_key,
            client,
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Creates a fresh bucket with a unique name derived from `label`.
    pub fn bucket(&self, label: &str) -> String {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let label: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(30)
            .collect();
        let name = format!("kt-{label}-{}-{n}", std::process::id());
        rt().block_on(self.client.create_bucket().bucket(&name).send())
            .unwrap_or_else(|e| panic!("create bucket {name}: {e:?}"));
        name
    }

    /// Makes the server refuse every upload to `bucket` from now on: the in-process server
    /// answers 403, other servers lose the bucket (deleted with its objects).
    pub fn refuse_uploads(&self, bucket: &str) {
        if self.kind == ServerKind::S3sFs {
            embedded::REFUSING_UPLOADS
                .lock()
                .unwrap()
                .push(bucket.to_owned());
        } else {
            self.delete_bucket(bucket);
        }
    }

    /// Makes the in-process server refuse uploads to `bucket`; other servers are left alone.
    /// Returns whether uploads are now refused.
    pub fn refuse_uploads_if_possible(&self, bucket: &str) -> bool {
        let possible = self.kind == ServerKind::S3sFs;
        if possible {
            self.refuse_uploads(bucket);
        }
        possible
    }

    /// Undoes [`TestServer::refuse_uploads`] where the server can (the in-process one); returns
    /// whether it could.
    pub fn allow_uploads(&self, bucket: &str) -> bool {
        if self.kind != ServerKind::S3sFs {
            return false;
        }
        embedded::REFUSING_UPLOADS
            .lock()
            .unwrap()
            .retain(|b| b != bucket);
        true
    }

    /// Deletes every object of `bucket`, then the bucket itself.
    pub fn delete_bucket(&self, bucket: &str) {
        let (files, _) = self.list(bucket, "", false);
        rt().block_on(async {
            for key in files {
                let _ = self
                    .client
                    .delete_object()
                    .bucket(bucket)
                    .key(key)
                    .send()
                    .await;
            }
            self.client
                .delete_bucket()
                .bucket(bucket)
                .send()
                .await
                .unwrap_or_else(|e| panic!("delete bucket {bucket}: {e:?}"));
        });
    }

    pub fn put(&self, bucket: &str, key: &str, data: &[u8]) {
        self.put_with_metadata(bucket, key, data, &[]);
    }

    pub fn put_with_metadata(&self, bucket: &str, key: &str, data: &[u8], meta: &[(&str, &str)]) {
        let meta: HashMap<String, String> = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        rt().block_on(
            self.client
                .put_object()
                .bucket(bucket)
                .key(key)
                .set_metadata(Some(meta))
                .body(ByteStream::from(data.to_vec()))
                .send(),
        )
        .unwrap_or_else(|e| panic!("put {bucket}/{key}: {e:?}"));
    }

    /// PUTs many small objects with bounded concurrency.
    pub fn put_many(&self, bucket: &str, keys: &[String], data: &[u8]) {
        rt().block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for key in keys {
                if set.len() >= 32 {
                    set.join_next().await.unwrap().unwrap();
                }
                let client = self.client.clone();
                let (bucket, key, data) = (bucket.to_owned(), key.clone(), data.to_vec());
                set.spawn(async move {
                    client
                        .put_object()
                        .bucket(&bucket)
                        .key(&key)
                        .body(ByteStream::from(data))
                        .send()
                        .await
                        .unwrap_or_else(|e| panic!("put {key}: {e:?}"));
                });
            }
            while let Some(r) = set.join_next().await {
                r.unwrap();
            }
        });
    }

    /// The object's bytes, or `None` if it does not exist.
    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        rt().block_on(async {
            let out = self.get_object(bucket, key).await?;
            Some(out.body.collect().await.ok()?.into_bytes().to_vec())
        })
    }

    /// GetObject of the whole object, `None` if it does not exist.
    async fn get_object(
        &self,
        bucket: &str,
        key: &str,
    ) -> Option<aws_sdk_s3::operation::get_object::GetObjectOutput> {
        self.client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .ok()
    }

    /// HEAD of the object, or `None` if it does not exist.
    fn head(
        &self,
        bucket: &str,
        key: &str,
    ) -> Option<aws_sdk_s3::operation::head_object::HeadObjectOutput> {
        rt().block_on(self.client.head_object().bucket(bucket).key(key).send())
            .ok()
    }

    /// User metadata of the object, or `None` if it does not exist.
    pub fn metadata(&self, bucket: &str, key: &str) -> Option<HashMap<String, String>> {
        self.head(bucket, key)
            .map(|out| out.metadata().cloned().unwrap_or_default())
    }

    /// Waits (up to 60 s) until the object's sha256 is `sha`; panics with what it saw otherwise.
    pub fn wait_for_object(&self, bucket: &str, key: &str, sha: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let pause = Duration::from_millis(100);
        poll_sha(key, sha, deadline, pause, || {
            self.get(bucket, key).map(|b| sha256(&b))
        });
    }

    /// The object's ETag (HEAD), or `None` if it does not exist.
    pub fn etag(&self, bucket: &str, key: &str) -> Option<String> {
        self.head(bucket, key)?.e_tag().map(str::to_owned)
    }

    /// Waits (up to 60 s, with HEADs only) until the object's ETag is no longer `old`.
    pub fn wait_for_etag_change(&self, bucket: &str, key: &str, old: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = self.etag(bucket, key);
            if now.as_deref().is_some_and(|e| e != old) {
                return;
            }
            assert!(Instant::now() < deadline, "{key}: still {now:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The object's sha256, read as a stream (for objects too large to hold in memory).
    pub fn sha256_streaming(&self, bucket: &str, key: &str) -> Option<String> {
        use sha2::Digest;
        rt().block_on(async {
            let mut out = self.get_object(bucket, key).await?;
            let mut hash = Sha256::new();
            while let Some(chunk) = out.body.next().await {
                hash.update(chunk.ok()?);
            }
            Some(format!("{:x}", hash.finalize()))
        })
    }

    /// Waits (up to `timeout`) until the object has `size` bytes and its sha256, read as a
    /// stream, is `sha`.
    pub fn wait_for_object_streaming(
        &self,
        bucket: &str,
        key: &str,
        size: u64,
        sha: &str,
        timeout: Duration,
    ) {
        let deadline = Instant::now() + timeout;
        // Cheap HEADs until the size is right; then read it whole.
        while self.head(bucket, key).and_then(|h| h.content_length()) != Some(size as i64) {
            assert!(
                Instant::now() < deadline,
                "{key}: never reached {size} bytes"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let pause = Duration::from_millis(500);
        poll_sha(key, sha, deadline, pause, || {
            self.sha256_streaming(bucket, key)
        });
    }

    /// Waits (up to 60 s) until the object is gone.
    pub fn wait_for_absence(&self, bucket: &str, key: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.get(bucket, key).is_some() {
            assert!(Instant::now() < deadline, "{key} still in S3");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Tries a PUT and reports whether the server accepted it.
    pub fn try_put(&self, bucket: &str, key: &str, data: &[u8]) -> bool {
        rt().block_on(
            self.client
                .put_object()
                .bucket(bucket)
                .key(key)
                .body(ByteStream::from(data.to_vec()))
                .send(),
        )
        .is_ok()
    }

    /// All keys under `prefix` as the server lists them (no delimiter), and with delimiter `/`
    /// the common prefixes at that level.
    pub fn list(&self, bucket: &str, prefix: &str, delimited: bool) -> (Vec<String>, Vec<String>) {
        rt().block_on(async {
            let mut keys = Vec::new();
            let mut prefixes = Vec::new();
            let mut token = None;
            loop {
                let mut req = self
                    .client
                    .list_objects_v2()
                    .bucket(bucket)
                    .prefix(prefix)
                    .set_continuation_token(token);
                if delimited {
                    req = req.delimiter("/");
                }
                let out = req.send().await.expect("list");
                keys.extend(
                    out.contents()
                        .iter()
                        .filter_map(|o| o.key().map(String::from)),
                );
                prefixes.extend(
                    out.common_prefixes()
                        .iter()
                        .filter_map(|p| p.prefix().map(String::from)),
                );
                token = out.next_continuation_token().map(String::from);
                if token.is_none() {
                    break;
                }
            }
            (keys, prefixes)
        })
    }

    /// Environment for a keepfs process talking to this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_REGION", "us-east-1".into()),
            // Keep the developer's own AWS profile out of the tests.
            ("AWS_CONFIG_FILE", "/nonexistent".into()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }
}

pub fn keepfs_bin() -> &'static str {
    env!("CARGO_BIN_EXE_keepfs")
}

/// A `keepfs mount` command for `source` at `mountpoint`, wired to the test server. Unless
/// `extra` names one, the cache directory is `mountpoint` + `.cache` (removed by [`Mount`]).
pub fn keepfs_command(source: &str, mountpoint: &Path, extra: &[&str]) -> Command {
    let server = server();
    let mut cmd = Command::new(keepfs_bin());
    cmd.arg("mount")
        .arg(source)
        .arg(mountpoint)
        .arg("--force-path-style")
        .args(extra)
        .env_remove("RUST_LOG")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL");
    if !extra.contains(&"--endpoint-url") {
        cmd.args(["--endpoint-url", &server.endpoint]);
    }
    if !extra.contains(&"--cache-dir") {
        cmd.arg("--cache-dir").arg(default_test_cache(mountpoint));
    }
    for (k, v) in server.env() {
        cmd.env(k, v);
    }
    cmd
}

pub fn default_test_cache(mountpoint: &Path) -> PathBuf {
    mountpoint.with_extension("cache")
}

/// How many mounts sit on `path` (per /proc/self/mountinfo).
pub fn mount_count(path: &Path) -> usize {
    let path = path.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(path.as_str()))
        .count()
}

/// Whether `path` is currently a mount point.
pub fn is_mounted(path: &Path) -> bool {
    mount_count(path) > 0
}

/// keepfs's log level in tests: `KEEPFS_TEST_LOG` (e.g. `trace`), `debug` by default.
fn log_level() -> String {
    std::env::var("KEEPFS_TEST_LOG").unwrap_or_else(|_| "debug".to_owned())
}

/// A keepfs process with its mount. Dropping it unmounts (SIGTERM, then a lazy unmount as the
/// last resort) and reaps the process, also when the test failed.
pub struct Mount {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    stderr_path: PathBuf,
}

impl Mount {
    /// Mounts `s3://bucket[/prefix]` in a fresh temporary directory and waits until it is ready.
    pub fn new(source: &str, extra: &[&str]) -> Mount {
        let dir = tempfile::Builder::new()
            .prefix("keepfs-mnt-")
            .tempdir()
            .unwrap();
        let stderr_path = dir.path().with_extension("log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut command = keepfs_command(source, dir.path(), extra);
        if !extra.contains(&"--log-level") {
            command.args(["--log-level", &log_level()]);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn keepfs");
        let mut mount = Mount {
            dir,
            child: Some(child),
            stderr_path,
        };
        mount.wait_ready();
        mount
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mounted(self.dir.path()) {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("keepfs exited before mounting ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "mount not ready in 30s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// What keepfs logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends `signal` and waits for the process to exit; returns its exit code.
    pub fn stop_with(&mut self, signal: i32) -> Option<i32> {
        let mut child = self.child.take()?;
        let code = signal_and_wait(&mut child, signal, Duration::from_secs(10));
        if code.is_err() {
            lazy_unmount(self.dir.path());
        }
        code.ok().flatten()
    }

    /// Waits for the process to exit on its own (after an external unmount).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

fn lazy_unmount(path: &Path) {
    if is_mounted(path) {
        let _ = Command::new("umount").arg("-l").arg(path).status();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if std::thread::panicking() {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "--- keepfs log ---\n{}--- end ---",
                self.log()
            );
        }
        if self.child.is_some() {
            self.stop_with(libc::SIGTERM);
        }
        lazy_unmount(self.dir.path());
        let _ = std::fs::remove_file(&self.stderr_path);
        let _ = std::fs::remove_dir_all(default_test_cache(self.dir.path()));
    }
}

/// Runs `keepfs mount` expecting it to fail; returns its output.
pub fn mount_expecting_failure(source: &str, mountpoint: &Path, extra: &[&str]) -> Output {
    let before = mount_count(mountpoint);
    let cache = default_test_cache(mountpoint);
    let cache_existed = cache.exists();
    let out = keepfs_command(source, mountpoint, extra)
        .stdin(Stdio::null())
        .output()
        .expect("run keepfs");
    if !cache_existed {
        let _ = std::fs::remove_dir_all(cache);
    }
    assert_eq!(
        mount_count(mountpoint),
        before,
        "a failed keepfs changed the mounts on {}",
        mountpoint.display()
    );
    out
}

/// Reports a check that could not run on this server. Written straight to stderr so it shows
/// even though the test harness captures `eprintln!` of passing tests.
pub fn skipped(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {message}");
}

/// `ls -l` of `dir` with times as `ls --time-style=+FORMAT` shows them; its output.
pub fn ls_l(dir: &Path, time_format: &str) -> String {
    let out = std::process::Command::new("ls")
        .arg("-l")
        .arg(format!("--time-style=+{time_format}"))
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

pub fn sha256(data: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(data);
    format!("{:x}", h.finalize())
}

pub fn sha256_file(path: &Path) -> String {
    use std::io::Read;
    let mut f =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("{:x}", h.finalize())
}

/// Sorted names in `dir`.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// Runs `keepfs flush` on the mount: every closed file is in S3 when it returns.
pub fn flush(m: &Mount) {
    let out = std::process::Command::new(keepfs_bin())
        .args(["flush", m.path().to_str().unwrap(), "--timeout", "60s"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "flush failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.log()
    );
}

/// A privileged helper's part, as `mount.fuse3` or a CSI driver plays it: opens `/dev/fuse`
/// as descriptor 3, mounts it at `mountpoint` (`fd=3`, type `fuse.keepfs`, source `fsname`),
/// then execs `program` with `args`, which serves the connection through `/dev/fd/3`.
/// `mount -i`: the descriptor must reach `program`, so mount(8) may not call keepfs's own
/// helper. `stderr` receives everything's error output.
pub fn spawn_with_fuse_fd(
    mountpoint: &Path,
    fsname: &str,
    program: &str,
    args: &[String],
    envs: &[(String, String)],
    stderr: std::fs::File,
) -> Child {
    let script = r#"set -e
mnt=$1 fsname=$2; shift 2
exec 3<>/dev/fuse
mount -i -t fuse.keepfs -o nosuid,nodev,default_permissions,fd=3,rootmode=40000,user_id=0,group_id=0 "$fsname" "$mnt"
exec "$@""#;
    Command::new("bash")
        .args(["-c", script, "bash"])
        .arg(mountpoint)
        .arg(fsname)
        .arg(program)
        .args(args)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn bash")
}

/// Sends `signal` to `child` (0: none) and waits up to `timeout` for it to exit: its exit code
/// (`None` when a signal ended it), or `Err` if it had to be killed after the timeout.
pub fn signal_and_wait(
    child: &mut Child,
    signal: i32,
    timeout: Duration,
) -> Result<Option<i32>, ()> {
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, signal) };
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Ok(status.code());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// GET `http://addr/path` (the metrics endpoint): its status and body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut response = agent
        .get(format!("http://{addr}{path}"))
        .call()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = response.status().as_u16();
    (status, response.body_mut().read_to_string().unwrap())
}
