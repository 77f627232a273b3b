//! The raw-SDK side of `benches/compare.sh`: what a program using aws-sdk-s3 directly does for
//! each workload, with no filesystem in between; also seeds and clears the benchmark's data.
//!
//! Usage (server and credentials from KEEPFS_BENCH_ENDPOINT, KEEPFS_BENCH_BUCKET,
//! AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, as every benchmark here):
//!
//! ```text
//! s3raw seed-objects PREFIX COUNT MIB      objects PREFIX0.. of MIB MiB each (kept if present)
//! s3raw seed-tree PREFIX DIRS FILES BYTES  DIRS×FILES small objects PREFIXdNN/fNNNNN
//! s3raw get KEY...                         read the objects, all at once, 16 × 8 MiB ranged GETs each
//! s3raw randget KEY COUNT BYTES            COUNT ranged GETs of BYTES at random offsets, one at a time
//! s3raw put KEY MIB                        multipart upload from memory (16 × 8 MiB parts in flight)
//! s3raw put-many PREFIX COUNT BYTES        COUNT PutObjects of BYTES, 16 in flight
//! s3raw list PREFIX                        paginated ListObjectsV2 of everything under PREFIX
//! s3raw list-dir PREFIX                    the same with delimiter `/`: one directory's entries,
//!                                          the requests any directory listing sends
//! s3raw rename PREFIX NEW                  CopyObject + DeleteObject of every key, 16 in flight
//! s3raw wait PREFIX COUNT BYTES            until COUNT objects under PREFIX hold BYTES in all
//!                                          (also prints lists=N: the ListObjectsV2 pages it asked for)
//! s3raw delete PREFIX                      delete everything under PREFIX
//! ```
//!
//! Each command prints one line `seconds=S bytes=B objects=N` for the part that is measured
//! (data generation and client set-up excluded).

mod common;

use std::time::Instant;

use aws_sdk_s3::primitives::ByteStream;
use futures_util::stream::{self, StreamExt};

/// Ranged GETs and parts in flight per object: what a tuned client uses against this server
/// (the read benchmark measured 16 × 8 MiB as its fastest).
const IN_FLIGHT: usize = 16;
const PART: u64 = 8 << 20;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let t = common::target(&rt);
    let arg = |n: usize| -> &str {
        args.get(n)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("missing argument {n}; see the usage in benches/s3raw.rs"))
    };
    let num = |n: usize| -> u64 {
        arg(n)
            .parse()
            .unwrap_or_else(|_| panic!("argument {n} is not a number"))
    };
    let start = Instant::now();
    let (bytes, objects) = match arg(0) {
        "seed-objects" => rt.block_on(seed_objects(&t, arg(1), num(2), num(3) << 20)),
        "seed-tree" => rt.block_on(put_many(&t, arg(1), num(2), num(3), num(4) as usize)),
        "get" => rt.block_on(get(&t, &args[1..])),
        "randget" => rt.block_on(randget(&t, arg(1), num(2), num(3))),
        "put" => {
            let size = (num(2) << 20) as usize;
            let data = common::pattern(size, 7);
            let start = Instant::now();
            rt.block_on(common::multipart_upload(
                &t,
                arg(1),
                size,
                PART as usize,
                IN_FLIGHT,
                |n, len| data[n * PART as usize..][..len].to_vec(),
            ));
            report(start, size as u64, 1);
            return;
        }
        "put-many" => rt.block_on(put_many(&t, arg(1), 1, num(2), num(3) as usize)),
        "list" => rt.block_on(list(&t, arg(1))),
        "list-dir" => rt.block_on(list_dir(&t, arg(1))),
        "rename" => rt.block_on(rename(&t, arg(1), arg(2))),
        "wait" => {
            let (bytes, objects, lists) = rt.block_on(wait(&t, arg(1), num(2), num(3)));
            println!(
                "seconds={:.3} bytes={bytes} objects={objects} lists={lists}",
                start.elapsed().as_secs_f64()
            );
            return;
        }
        "delete" => rt.block_on(delete(&t, arg(1))),
        other => panic!("unknown command {other}; see the usage in benches/s3raw.rs"),
    };
    report(start, bytes, objects);
}

fn report(start: Instant, bytes: u64, objects: u64) {
    println!(
        "seconds={:.3} bytes={bytes} objects={objects}",
        start.elapsed().as_secs_f64()
    );
}

async fn seed_objects(t: &common::Target, prefix: &str, count: u64, size: u64) -> (u64, u64) {
    for n in 0..count {
        common::ensure_object(t, &format!("{prefix}{n}"), size, n).await;
    }
    (size * count, count)
}

/// `dirs` × `files` objects of `size` bytes: `PREFIXdNN/fNNNNN`, or `PREFIXfNNNNN` for one
/// directory.
async fn put_many(
    t: &common::Target,
    prefix: &str,
    dirs: u64,
    files: u64,
    size: usize,
) -> (u64, u64) {
    let body = common::pattern(size, 3);
    let keys: Vec<String> = (0..dirs)
        .flat_map(|d| {
            (0..files).map(move |f| match dirs {
                1 => format!("{prefix}f{f:05}"),
                _ => format!("{prefix}d{d:02}/f{f:05}"),
            })
        })
        .collect();
    let n = keys.len() as u64;
    stream::iter(keys)
        .map(|key| {
            let body = ByteStream::from(body.clone());
            async move {
                t.client
                    .put_object()
                    .bucket(&t.bucket)
                    .key(key)
                    .body(body)
                    .send()
                    .await
                    .expect("PutObject")
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
    (n * size as u64, n)
}

/// The size of `key` in bytes (HEAD).
async fn object_size(t: &common::Target, key: &str) -> u64 {
    t.client
        .head_object()
        .bucket(&t.bucket)
        .key(key)
        .send()
        .await
        .expect("HeadObject")
        .content_length()
        .unwrap_or(0) as u64
}

async fn delete_key(t: &common::Target, key: &str) {
    t.client
        .delete_object()
        .bucket(&t.bucket)
        .key(key)
        .send()
        .await
        .expect("DeleteObject");
}

async fn get(t: &common::Target, keys: &[String]) -> (u64, u64) {
    let reads = keys.iter().map(|key| async move {
        let size = object_size(t, key).await;
        let ranges = (0..size.div_ceil(PART)).map(|n| (n * PART, ((n + 1) * PART).min(size)));
        stream::iter(ranges)
            .map(|(from, to)| ranged_get(t, key, from, to))
            .buffer_unordered(IN_FLIGHT)
            .collect::<Vec<u64>>()
            .await
            .into_iter()
            .sum::<u64>()
    });
    let sizes = futures_util::future::join_all(reads).await;
    (sizes.iter().sum(), keys.len() as u64)
}

/// Bytes `from..to` of `key`, discarded; returns how many arrived.
async fn ranged_get(t: &common::Target, key: &str, from: u64, to: u64) -> u64 {
    let out = t
        .client
        .get_object()
        .bucket(&t.bucket)
        .key(key)
        .range(format!("bytes={from}-{}", to - 1))
        .send()
        .await
        .expect("GetObject");
    let mut body = out.body;
    let mut n = 0;
    while let Some(chunk) = body.try_next().await.expect("GetObject body") {
        n += chunk.len() as u64;
    }
    assert_eq!(n, to - from, "short body");
    n
}

async fn randget(t: &common::Target, key: &str, count: u64, size: u64) -> (u64, u64) {
    let len = object_size(t, key).await;
    // A fixed xorshift sequence: the same offsets every run (and as fio's, in kind).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut total = 0;
    for _ in 0..count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let from = (x % (len / size)) * size;
        total += ranged_get(t, key, from, from + size).await;
    }
    (total, count)
}

/// Every key under `prefix` with its size.
async fn keys_under(t: &common::Target, prefix: &str) -> Vec<(String, u64)> {
    let pages = t
        .client
        .list_objects_v2()
        .bucket(&t.bucket)
        .prefix(prefix)
        .into_paginator()
        .send();
    let pages: Vec<_> = pages.try_collect().await.expect("ListObjectsV2");
    pages
        .iter()
        .flat_map(|p| p.contents())
        .map(|o| {
            (
                o.key().unwrap_or_default().to_owned(),
                o.size().unwrap_or(0) as u64,
            )
        })
        .collect()
}

async fn list(t: &common::Target, prefix: &str) -> (u64, u64) {
    let keys = keys_under(t, prefix).await;
    (keys.iter().map(|k| k.1).sum(), keys.len() as u64)
}

async fn list_dir(t: &common::Target, prefix: &str) -> (u64, u64) {
    let pages = t
        .client
        .list_objects_v2()
        .bucket(&t.bucket)
        .prefix(prefix)
        .delimiter("/")
        .into_paginator()
        .send();
    let pages: Vec<_> = pages.try_collect().await.expect("ListObjectsV2");
    let bytes = pages
        .iter()
        .flat_map(|p| p.contents())
        .map(|o| o.size().unwrap_or(0) as u64)
        .sum();
    let entries = pages
        .iter()
        .map(|p| p.contents().len() + p.common_prefixes().len())
        .sum::<usize>();
    (bytes, entries as u64)
}

async fn rename(t: &common::Target, prefix: &str, new: &str) -> (u64, u64) {
    let keys = keys_under(t, prefix).await;
    let n = keys.len() as u64;
    stream::iter(keys)
        .map(|(key, _)| async move {
            let to = format!("{new}{}", &key[prefix.len()..]);
            t.client
                .copy_object()
                .bucket(&t.bucket)
                .key(to)
                .copy_source(format!("{}/{key}", t.bucket))
                .send()
                .await
                .expect("CopyObject");
            delete_key(t, &key).await;
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
    (0, n)
}

/// Polls (every 50 ms, up to 10 minutes) until `count` objects under `prefix` hold `bytes`;
/// returns bytes, objects and how many ListObjectsV2 pages it asked for.
async fn wait(t: &common::Target, prefix: &str, count: u64, bytes: u64) -> (u64, u64, u64) {
    let deadline = Instant::now() + std::time::Duration::from_secs(600);
    let mut lists = 0;
    loop {
        let keys = keys_under(t, prefix).await;
        lists += (keys.len() as u64 / 1000) + 1;
        let (b, n) = (keys.iter().map(|k| k.1).sum::<u64>(), keys.len() as u64);
        if n >= count && b >= bytes {
            return (b, n, lists);
        }
        assert!(
            Instant::now() < deadline,
            "{prefix}: {n} objects, {b} bytes after 10 minutes; want {count}, {bytes}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn delete(t: &common::Target, prefix: &str) -> (u64, u64) {
    let keys = keys_under(t, prefix).await;
    let n = keys.len() as u64;
    stream::iter(keys)
        .map(|(key, _)| async move {
            delete_key(t, &key).await;
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
    (0, n)
}
