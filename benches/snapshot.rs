//! Snapshot and restore times of a tree (default 1 000 files of 1 MiB: 1 GiB) on an unversioned
//! bucket (server-side copies) and a versioned one (a listing), through a running mount.
//!
//! Run: `cargo bench --bench snapshot` with KEEPFS_BENCH_ENDPOINT, KEEPFS_BENCH_BUCKET and
//! credentials set (moto keeps versions; the in-process s3s-fs server has no versioning and
//! runs the unversioned half only). Knobs: KEEPFS_BENCH_SNAPSHOT_FILES (1000),
//! KEEPFS_BENCH_SNAPSHOT_KIB (1024), KEEPFS_BENCH_RUNS (3).

mod common;

use std::process::Command;
use std::time::Instant;

use aws_sdk_s3::primitives::ByteStream;
use common::{KeepfsMount, Target, env_or, pattern, target};

fn keepfs(t: &Target, args: &[&str]) -> f64 {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_keepfs"))
        .arg("snapshot")
        .args(args)
        .args(["--endpoint-url", &t.endpoint, "--force-path-style"])
        .env("AWS_ACCESS_KEY_ID", &t.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &t.secret_key)
        .env("AWS_REGION", "us-east-1")
        .output()
        .unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "keepfs snapshot {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    elapsed
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let t = target(&rt);
    let files = env_or("KEEPFS_BENCH_SNAPSHOT_FILES", 1000) as usize;
    let size = env_or("KEEPFS_BENCH_SNAPSHOT_KIB", 1024) as usize * 1024;
    let runs = env_or("KEEPFS_BENCH_RUNS", 3);
    let versioning = std::env::var("KEEPFS_BENCH_ENDPOINT").is_ok();
    println!(
        "snapshot of {files} files x {} KiB ({:.2} GiB), {runs} runs",
        size / 1024,
        (files * size) as f64 / (1u64 << 30) as f64
    );
    let kinds: &[bool] = if versioning { &[false, true] } else { &[false] };
    for &versioned in kinds {
        let bucket = format!("{}-snap-{}", t.bucket, if versioned { "v" } else { "u" });
        rt.block_on(async {
            let _ = t.client.create_bucket().bucket(&bucket).send().await;
            if versioned {
                common::enable_versioning(&t.client, &bucket).await;
            }
            let body = pattern(size, 5);
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..files {
                let (client, bucket, body) = (t.client.clone(), bucket.clone(), body.clone());
                tasks.spawn(async move {
                    client
                        .put_object()
                        .bucket(&bucket)
                        .key(format!("vol/d{:02}/f{i:04}", i % 10))
                        .body(ByteStream::from(body))
                        .send()
                        .await
                        .unwrap();
                });
                if tasks.len() >= 16 {
                    tasks.join_next().await;
                }
            }
            while tasks.join_next().await.is_some() {}
        });
        let m = KeepfsMount::new(&t, &format!("{bucket}/vol"), &[]);
        let mnt = m.path().to_str().unwrap().to_owned();
        let (mut takes, mut restores) = (Vec::new(), Vec::new());
        for run in 0..runs {
            let name = format!("b{run}");
            takes.push(keepfs(&t, &["create", &name, &mnt]));
            let to = format!("s3://{bucket}/restored-{run}");
            restores.push(keepfs(&t, &["restore", &name, &mnt, "--to", &to]));
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let gib = (files * size) as f64 / (1u64 << 30) as f64;
        let (take, restore) = (median(&mut takes), median(&mut restores));
        println!(
            "{:<12} create {take:6.2} s ({:6.0} MiB/s)   restore {restore:6.2} s ({:6.0} MiB/s)   runs: create {takes:.2?} restore {restores:.2?}",
            if versioned {
                "versioned"
            } else {
                "unversioned"
            },
            gib * 1024.0 / take,
            gib * 1024.0 / restore,
        );
    }
}
