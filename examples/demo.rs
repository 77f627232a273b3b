//! Try keepfs without any cloud account, in one command:
//!
//!     cargo run --release --example demo
//!
//! It starts an S3 server in this process over a local directory, seeds a bucket and mounts it
//! read-write with its own cache directory, then walks through what keepfs is for: files written
//! through the mount land in the cache directory and reach the bucket in the background; with
//! the network "down", closed files wait in the cache directory's journal, survive `kill -9` of
//! keepfs, and are there again — and uploaded — after the next mount. Each step waits for
//! Enter (or runs straight through when stdin is not a terminal); Ctrl-C unmounts, stops the
//! server and removes the demo's files at any point.

#[path = "../tests/common/embedded.rs"]
mod embedded;

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use keepfs::config::{LogFormat, MountConfig};

const BUCKET: &str = "demo";
/// Set in the child process that serves the mount (the demo kills it with SIGKILL).
const CHILD_ENV: &str = "KEEPFS_DEMO_MOUNT";

fn main() -> anyhow::Result<()> {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        return serve_mount(&spec);
    }
    // SAFETY: nothing else runs yet (no threads exist), so changing the environment is sound.
    // The mount process inherits the credentials through the AWS default chain.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", embedded::ACCESS_KEY);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", embedded::SECRET_KEY);
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    }
    let base = std::env::temp_dir().join(format!("keepfs-demo-{}", std::process::id()));
    let demo = Demo {
        server_dir: base.join("server"),
        mountpoint: base.join("mnt"),
        cache_dir: base.join("cache"),
        base,
    };
    std::fs::create_dir_all(&demo.server_dir)?;
    std::fs::create_dir_all(&demo.mountpoint)?;
    let server_rt = tokio::runtime::Runtime::new()?;
    let endpoint = embedded::start_s3s_fs(&demo.server_dir, &server_rt);
    let client = embedded::sdk_client(&endpoint, embedded::ACCESS_KEY, embedded::SECRET_KEY);
    server_rt.block_on(seed(&client))?;

    // Ctrl-C at any step: the mount, the server and the files go.
    let mount: std::sync::Arc<std::sync::Mutex<Option<Child>>> = Default::default();
    {
        let (mount, demo) = (mount.clone(), demo.clone());
        server_rt.spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                println!("\nCtrl-C: unmounting and cleaning up");
                if let Some(child) = mount.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    demo.stop(child, libc::SIGTERM);
                }
                demo.remove();
                std::process::exit(130);
            }
        });
    }
    let start = |mount: &std::sync::Arc<std::sync::Mutex<Option<Child>>>| -> anyhow::Result<()> {
        let child = demo.start(&endpoint)?;
        *mount.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        Ok(())
    };
    let take = |mount: &std::sync::Arc<std::sync::Mutex<Option<Child>>>| {
        mount
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .expect("mounted")
    };
    let in_bucket = || -> Vec<String> {
        server_rt.block_on(async {
            let out = client.list_objects_v2().bucket(BUCKET).send().await;
            out.map(|o| {
                o.contents()
                    .iter()
                    .filter_map(|c| c.key().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
        })
    };
    let mnt = demo.mountpoint.display().to_string();

    println!("\nkeepfs demo: s3://{BUCKET} on an S3 server in this process ({endpoint})");
    start(&mount)?;
    println!(
        "mounted read-write at {mnt}, cache directory {}",
        demo.cache_dir.display()
    );
    step("1. Reading: objects are files, key prefixes are directories.");
    shell(&format!("ls -lR {mnt} && cat {mnt}/hello.txt"));
    println!("   (in another terminal, try: sha256sum {mnt}/data/random-16MiB.bin)");

    step("2. Writing: files land in the cache directory and reach the bucket in the background.");
    std::fs::write(
        demo.mountpoint.join("notes.txt"),
        "written through keepfs\n",
    )?;
    shell(&format!(
        "echo 'one more line' >> {mnt}/hello.txt && cp -r {mnt}/docs {mnt}/docs-copy && ls {mnt}"
    ));
    wait_until(Duration::from_secs(20), || {
        in_bucket().iter().any(|k| k == "notes.txt")
    });
    println!("   in the bucket now: {}", in_bucket().join(", "));

    step("3. The network goes down: S3 refuses every upload from now on. Writes still succeed.");
    embedded::REFUSING_UPLOADS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(BUCKET.to_owned());
    std::fs::write(
        demo.mountpoint.join("offline.txt"),
        "closed while S3 was down\n",
    )?;
    shell(&format!(
        "echo 'appended offline' >> {mnt}/notes.txt && cat {mnt}/offline.txt"
    ));
    std::thread::sleep(Duration::from_secs(1));
    println!("   keepfs status --cache-dir {}:", demo.cache_dir.display());
    print_status(&demo.cache_dir);

    step("4. keepfs is killed with kill -9 (a crash, an OOM kill, a pod restart).");
    let child = take(&mount);
    demo.stop(child, libc::SIGKILL);
    println!("   keepfs is gone; the files it acknowledged are in the cache directory's journal.");
    println!("   in the bucket: {}", in_bucket().join(", "));

    step("5. A new keepfs on the same cache directory: every closed file is back at once.");
    start(&mount)?;
    shell(&format!("cat {mnt}/offline.txt {mnt}/notes.txt"));

    step("6. The network is back: `keepfs flush` uploads everything and returns when it is in S3.");
    embedded::REFUSING_UPLOADS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|b| b != BUCKET);
    let done = keepfs::flush::flush(&demo.cache_dir, Duration::from_secs(60))?;
    println!(
        "   keepfs flush {mnt}: {} file(s), {} bytes uploaded",
        done.files, done.bytes
    );
    println!("   in the bucket: {}", in_bucket().join(", "));

    step("Done. Enter unmounts, stops the server and removes the demo's files.");
    let child = take(&mount);
    demo.stop(child, libc::SIGTERM);
    server_rt.shutdown_timeout(Duration::from_secs(1));
    demo.remove();
    println!("unmounted; demo files removed");
    Ok(())
}

/// Where the demo keeps its server, mount and cache directory.
#[derive(Clone)]
struct Demo {
    base: PathBuf,
    server_dir: PathBuf,
    mountpoint: PathBuf,
    cache_dir: PathBuf,
}

impl Demo {
    /// Starts a mount process (this program again, see [`serve_mount`]) and waits until the
    /// mount is ready.
    fn start(&self, endpoint: &str) -> anyhow::Result<Child> {
        let spec = format!(
            "{}\n{}\n{}",
            endpoint,
            self.mountpoint.display(),
            self.cache_dir.display()
        );
        let mut child = Command::new(std::env::current_exe()?)
            .env(CHILD_ENV, spec)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mounted(&self.mountpoint) {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("keepfs exited before mounting: {status}");
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "keepfs did not mount within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(child)
    }

    /// Stops the mount process with `signal`; after SIGKILL its dead mount is detached.
    fn stop(&self, mut child: Child, signal: i32) {
        // SAFETY: kill(2) on the pid of a child this process spawned and has not reaped.
        unsafe {
            libc::kill(child.id() as libc::pid_t, signal);
        }
        let _ = child.wait();
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.mountpoint)
                .status();
        }
    }

    fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// The mount process: serves the mount until it is stopped.
fn serve_mount(spec: &str) -> anyhow::Result<()> {
    let parts: Vec<&str> = spec.split('\n').collect();
    let [endpoint, mountpoint, cache_dir] = parts.as_slice() else {
        anyhow::bail!("unknown demo mount {spec:?}");
    };
    // Errors only: the refused uploads of step 3 are the point, not news.
    keepfs::logging::init("error", LogFormat::Text);
    keepfs::mount::run(config(
        endpoint,
        Path::new(mountpoint),
        Path::new(cache_dir),
    )?)?;
    Ok(())
}

fn config(endpoint: &str, mountpoint: &Path, cache_dir: &Path) -> anyhow::Result<MountConfig> {
    Ok(MountConfig {
        source: format!("s3://{BUCKET}").parse()?,
        mountpoint: mountpoint.to_owned(),
        endpoint_url: Some(endpoint.to_owned()),
        region: Some("us-east-1".into()),
        force_path_style: true,
        allow_other: false,
        create_mountpoint: false,
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        uid: unsafe { libc::getuid() },
        // SAFETY: as above.
        gid: unsafe { libc::getgid() },
        file_mode: 0o644,
        dir_mode: 0o755,
        metadata_ttl: Duration::from_secs(1),
        memory_limit: None,
        max_memory_cache: 256 << 20,
        disk_cache: true,
        max_prefetch: 64 << 20,
        fuse_threads: 4,
        connect_timeout: Duration::from_secs(5),
        request_timeout: keepfs::store::DEFAULT_REQUEST_TIMEOUT,
        cache_dir: cache_dir.to_owned(),
        read_write: true,
        durability: keepfs::config::Durability::Local,
        max_cache_size: None,
        cache_min_free: keepfs::config::MinFree::DEFAULT,
        shutdown_grace: Duration::from_secs(5),
        part_size: 8 << 20,
        upload_concurrency: 16,
        metrics_addr: None,
        snapshot: None,
    })
}

/// Prints a step's title and, on a terminal, waits for Enter.
fn step(title: &str) {
    println!("\n{title}");
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        print!("   [Enter] ");
        let _ = std::io::stdout().flush();
        let _ = stdin.lock().read_line(&mut String::new());
    }
}

/// Runs `script` with sh, showing it and its output.
fn shell(script: &str) {
    println!("   $ {script}");
    let out = Command::new("sh").arg("-c").arg(script).output();
    if let Ok(out) = out {
        for line in String::from_utf8_lossy(&out.stdout)
            .lines()
            .chain(String::from_utf8_lossy(&out.stderr).lines())
        {
            println!("     {line}");
        }
    }
}

fn print_status(cache_dir: &Path) {
    match keepfs::status::read(cache_dir) {
        Ok(status) => {
            for line in keepfs::status::render(&status).lines() {
                println!("     {line}");
            }
        }
        Err(e) => println!("     {e}"),
    }
}

fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether `path` is a mount point (per /proc/self/mountinfo).
fn is_mounted(path: &Path) -> bool {
    let path = path.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(path.as_str()))
}

/// Creates the bucket and a few sample objects with the real SDK client.
async fn seed(client: &aws_sdk_s3::Client) -> anyhow::Result<()> {
    client.create_bucket().bucket(BUCKET).send().await?;
    let mut random = vec![0u8; 16 << 20];
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for chunk in random.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let objects: Vec<(&str, Vec<u8>)> = vec![
        (
            "hello.txt",
            b"Hello from an S3 bucket, read through keepfs.\n".to_vec(),
        ),
        (
            "docs/guide.md",
            b"# Guide\n\nDirectories come from `/` in object keys.\n".to_vec(),
        ),
        (
            "docs/notes/todo.txt",
            b"- mount\n- write\n- crash\n".to_vec(),
        ),
        ("data/random-16MiB.bin", random),
    ];
    for (key, body) in objects {
        client
            .put_object()
            .bucket(BUCKET)
            .key(key)
            .body(ByteStream::from(body))
            .send()
            .await?;
    }
    Ok(())
}
