//! Try keepfs without any cloud account: starts an S3 server in this process over a local
//! directory, seeds a bucket with sample files, mounts it, and waits. Ctrl-C unmounts.
//!
//!     cargo run --release --example demo

#[path = "../tests/common/embedded.rs"]
mod embedded;

use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use keepfs::config::{LogFormat, MountConfig};

const BUCKET: &str = "demo";

fn main() -> anyhow::Result<()> {
    // SAFETY: nothing else runs yet (no threads exist), so changing the environment is sound.
    // keepfs reads credentials from the AWS default chain, which includes these variables.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", embedded::ACCESS_KEY);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", embedded::SECRET_KEY);
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    }
    keepfs::logging::init("info", LogFormat::Text);

    let base = std::env::temp_dir().join(format!("keepfs-demo-{}", std::process::id()));
    let server_dir = base.join("server");
    let mountpoint = base.join("mnt");
    std::fs::create_dir_all(&server_dir)?;
    std::fs::create_dir_all(&mountpoint)?;

    let server_rt = tokio::runtime::Runtime::new()?;
    let endpoint = embedded::start_s3s_fs(&server_dir, &server_rt);
    server_rt.block_on(seed(&endpoint))?;

    println!();
    println!("keepfs demo: bucket s3://{BUCKET} served by an embedded S3 server at {endpoint}");
    println!("mounted at {}", mountpoint.display());
    println!();
    println!("Try, in another terminal:");
    println!("  ls -lR {}", mountpoint.display());
    println!("  cat {}/hello.txt", mountpoint.display());
    println!("  sha256sum {}/data/random-64MiB.bin", mountpoint.display());
    println!(
        "  dd if={}/data/random-64MiB.bin of=/dev/null bs=1M",
        mountpoint.display()
    );
    println!(
        "  touch {}/new-file    # fails: read-only for now (EROFS)",
        mountpoint.display()
    );
    println!();
    println!("Press Ctrl-C to unmount and exit.");

    let config = MountConfig {
        source: format!("s3://{BUCKET}").parse()?,
        mountpoint: mountpoint.clone(),
        endpoint_url: Some(endpoint),
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
        max_memory_cache: 256 << 20,
        disk_cache: true,
        max_prefetch: 64 << 20,
        fuse_threads: 4,
        connect_timeout: Duration::from_secs(5),
        cache_dir: base.join("cache"),
        read_write: false,
        durability: keepfs::config::Durability::Local,
        max_cache_size: None,
        shutdown_grace: std::time::Duration::from_secs(25),
        part_size: 8 << 20,
        upload_concurrency: 16,
    };
    let result = keepfs::mount::run(config);
    server_rt.shutdown_timeout(Duration::from_secs(1));
    let _ = std::fs::remove_dir_all(&base);
    result?;
    println!("unmounted; demo files removed");
    Ok(())
}

/// Creates the bucket and a few sample objects with the real SDK client.
async fn seed(endpoint: &str) -> anyhow::Result<()> {
    let client = embedded::sdk_client(endpoint, embedded::ACCESS_KEY, embedded::SECRET_KEY);
    client.create_bucket().bucket(BUCKET).send().await?;
    let mut random = vec![0u8; 64 << 20];
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
            b"- mount\n- read\n- enjoy\n".to_vec(),
        ),
        ("data/random-64MiB.bin", random),
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
