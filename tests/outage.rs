//! Remote outages are not deletions: with the S3 server stopped, what the mount knows stays
//! readable, writes land in the cache, uploads retry; when the server is back, everything
//! drains and nothing was deleted.
//!
//! Runs on a private in-process server that the test stops and starts again (same port, same
//! directory), whatever server the other tests use.

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::time::Duration;

use common::{Mount, PrivateServer, names, pattern, sha256, sha256_file};

#[test]
fn an_outage_is_not_a_deletion_and_everything_drains_afterwards() {
    if std::env::var("KEEPFS_TEST_S3_ENDPOINT").is_ok_and(|e| !e.is_empty()) {
        common::skipped("outage: runs on its own in-process server, in the default test run");
        return;
    }
    let mut private = PrivateServer::start();
    let s = &private.s3;
    let bucket = &s.bucket("outage");
    let seeded = pattern(300_000, 190);
    s.put(bucket, "seeded.bin", &seeded);
    s.put(bucket, "dir/inner.txt", b"inner");
    let endpoint = s.endpoint.clone();
    // Attributes are re-validated on every access, so the outage is felt at once.
    let args = ["--endpoint-url", &endpoint, "--metadata-ttl", "0"];
    let m = Mount::new(&format!("s3://{bucket}"), &args);
    let root = m.path();
    assert_eq!(sha256_file(&root.join("seeded.bin")), sha256(&seeded));
    let before = pattern(1 << 20, 191);
    fs::write(root.join("before.bin"), &before).unwrap();
    let uploaded = Duration::from_secs(30);
    s.wait_for_object_streaming(bucket, "before.bin", 1 << 20, &sha256(&before), uploaded);
    assert_eq!(names(root), ["before.bin", "dir", "seeded.bin"]);

    private.stop();
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

    private.restart();
    let s = &private.s3;
    let drain = Duration::from_secs(90);
    let new_txt: &[u8] = b"written while S3 was down";
    for (key, data) in [
        ("during.bin", &during[..]),
        ("dir/new.txt", new_txt),
        ("seeded.bin", &appended[..]),
    ] {
        s.wait_for_object_streaming(bucket, key, data.len() as u64, &sha256(data), drain);
    }
    // Nothing was deleted, in S3 or in the mount; no conflict copies.
    let in_s3 = |key| s.get(bucket, key).map(|b| sha256(&b));
    assert_eq!(in_s3("before.bin"), Some(sha256(&before)));
    assert_eq!(in_s3("dir/inner.txt"), Some(sha256(b"inner")));
    assert_eq!(names(&root.join("dir")), ["inner.txt", "new.txt"]);
    assert_eq!(sha256_file(&root.join("seeded.bin")), sha256(&appended));
    assert_eq!(sha256_file(&root.join("before.bin")), sha256(&before));
    assert_eq!(
        names(root),
        ["before.bin", "dir", "during.bin", "seeded.bin"]
    );
    drop(m);
}
