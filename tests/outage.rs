//! Remote outages are not deletions: with the S3 server stopped, what the mount knows stays
//! readable, writes land in the cache, uploads retry; when the server is back, everything
//! drains and nothing was deleted.
//!
//! Runs on a private in-process server that the test stops and starts again (same port, same
//! directory), whatever server the other tests use.

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use common::{Mount, PrivateServer, names, pattern, rt, sha256, sha256_file};

fn put(s: &PrivateServer, bucket: &str, key: &str, data: &[u8]) {
    rt().block_on(
        s.client
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(ByteStream::from(data.to_vec()))
            .send(),
    )
    .expect("put");
}

fn sha_in_s3(s: &PrivateServer, bucket: &str, key: &str) -> Option<String> {
    rt().block_on(async {
        let out = s
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .ok()?;
        Some(sha256(&out.body.collect().await.ok()?.into_bytes()))
    })
}

fn wait_in_s3(s: &PrivateServer, bucket: &str, key: &str, sha: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = sha_in_s3(s, bucket, key);
        if got.as_deref() == Some(sha) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{key}: S3 holds {got:?}, want {sha}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn an_outage_is_not_a_deletion_and_everything_drains_afterwards() {
    if std::env::var("KEEPFS_TEST_S3_ENDPOINT").is_ok_and(|e| !e.is_empty()) {
        common::skipped("outage: runs on its own in-process server, in the default test run");
        return;
    }
    let mut s = PrivateServer::start();
    let bucket = "outage";
    rt().block_on(s.client.create_bucket().bucket(bucket).send())
        .expect("create bucket");
    let seeded = pattern(300_000, 190);
    put(&s, bucket, "seeded.bin", &seeded);
    put(&s, bucket, "dir/inner.txt", b"inner");
    let endpoint = s.server.endpoint.clone();
    // Attributes are re-validated on every access, so the outage is felt at once.
    let args = ["--endpoint-url", &endpoint, "--metadata-ttl", "0"];
    let m = Mount::new(&format!("s3://{bucket}"), &args);
    let root = m.path();
    assert_eq!(sha256_file(&root.join("seeded.bin")), sha256(&seeded));
    let before = pattern(1 << 20, 191);
    fs::write(root.join("before.bin"), &before).unwrap();
    wait_in_s3(
        &s,
        bucket,
        "before.bin",
        &sha256(&before),
        Duration::from_secs(30),
    );
    assert_eq!(names(root), ["before.bin", "dir", "seeded.bin"]);

    s.stop();
    // Reads of what the mount has seen keep working; nothing known disappears.
    assert_eq!(sha256_file(&root.join("seeded.bin")), sha256(&seeded));
    assert_eq!(
        fs::metadata(root.join("before.bin")).unwrap().len(),
        1 << 20
    );
    assert_eq!(names(root), ["before.bin", "dir", "seeded.bin"]);
    // Writes land in the cache: new files (one multipart), and an append to an object whose
    // version the mount knows (opened before the outage).
    let during = pattern(20 << 20, 192);
    fs::write(root.join("during.bin"), &during).unwrap();
    fs::create_dir_all(root.join("dir")).unwrap();
    fs::write(root.join("dir/new.txt"), b"written while S3 was down").unwrap();
    let mut appended = seeded.clone();
    let tail = pattern(5000, 193);
    OpenOptions::new()
        .append(true)
        .open(root.join("seeded.bin"))
        .unwrap()
        .write_all(&tail)
        .unwrap();
    appended.extend_from_slice(&tail);
    // Uploads fail and are retried meanwhile; the files read back from the cache (the part of
    // seeded.bin that only S3 holds is read once S3 is back).
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(sha256_file(&root.join("during.bin")), sha256(&during));
    assert_eq!(
        fs::metadata(root.join("seeded.bin")).unwrap().len(),
        appended.len() as u64
    );
    assert_eq!(
        names(root),
        ["before.bin", "dir", "during.bin", "seeded.bin"]
    );
    assert!(
        m.log().contains("upload failed; will retry"),
        "uploads were tried during the outage:\n{}",
        m.log()
    );

    s.restart();
    let drain = Duration::from_secs(90);
    wait_in_s3(&s, bucket, "during.bin", &sha256(&during), drain);
    wait_in_s3(
        &s,
        bucket,
        "dir/new.txt",
        &sha256(b"written while S3 was down"),
        drain,
    );
    wait_in_s3(&s, bucket, "seeded.bin", &sha256(&appended), drain);
    // Nothing was deleted, in S3 or in the mount; no conflict copies.
    assert_eq!(sha_in_s3(&s, bucket, "before.bin"), Some(sha256(&before)));
    assert_eq!(
        sha_in_s3(&s, bucket, "dir/inner.txt"),
        Some(sha256(b"inner"))
    );
    assert_eq!(names(&root.join("dir")), ["inner.txt", "new.txt"]);
    assert_eq!(sha256_file(&root.join("seeded.bin")), sha256(&appended));
    assert_eq!(sha256_file(&root.join("before.bin")), sha256(&before));
    assert_eq!(
        names(root),
        ["before.bin", "dir", "during.bin", "seeded.bin"]
    );
    drop(m);
}
