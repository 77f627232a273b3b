//! Editing large existing objects moves only what the edit touches: the untouched parts are
//! neither downloaded nor re-sent, they are copied inside S3 (UploadPartCopy).
//!
//! Its own test binary: the in-process server's traffic counters are per process, and no
//! other test may move bytes while this one measures.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use common::{Mount, append, pattern, server, sha256, traffic};

const MIB: u64 = 1 << 20;
const PART: u64 = 8 * MIB;

#[test]
fn uploads_of_edits_copy_untouched_parts_in_s3() {
    let s = server();
    let bucket = s.bucket("editcopy");
    let base = pattern((64 * MIB) as usize, 164);
    s.put(&bucket, "append.bin", &base);
    s.put(&bucket, "random.bin", &base);
    let append_etag = s.etag(&bucket, "append.bin").unwrap();
    let random_etag = s.etag(&bucket, "random.bin").unwrap();
    let m = Mount::new(&format!("s3://{bucket}"), &["--read-write"]);
    let before = traffic();

    let tail = pattern(1024, 165);
    append(&m.path().join("append.bin"), &tail);
    let mut appended = base.clone();
    appended.extend_from_slice(&tail);

    let mut edited = base.clone();
    let offsets = [5 * MIB + 100, 30 * MIB, 50 * MIB + 7];
    let f = OpenOptions::new()
        .write(true)
        .read(true)
        .open(m.path().join("random.bin"))
        .unwrap();
    for (i, offset) in offsets.into_iter().enumerate() {
        let bytes = pattern(4096, 170 + i as u64);
        f.write_all_at(&bytes, offset).unwrap();
        edited[offset as usize..offset as usize + 4096].copy_from_slice(&bytes);
    }
    // Read-your-writes before close: fetches only the surroundings (in a touched part).
    let mut around = vec![0u8; 8192];
    f.read_exact_at(&mut around, 30 * MIB - 4096).unwrap();
    assert_eq!(
        around,
        edited[(30 * MIB - 4096) as usize..(30 * MIB + 4096) as usize]
    );
    drop(f);

    // Wait with HEADs (not counted) so the counters see only keepfs's traffic.
    s.wait_for_etag_change(&bucket, "append.bin", &append_etag);
    s.wait_for_etag_change(&bucket, "random.bin", &random_etag);
    let after = traffic();
    // Now check the bytes (full GETs, after the measurement).
    s.wait_for_object(&bucket, "append.bin", &sha256(&appended));
    s.wait_for_object(&bucket, "random.bin", &sha256(&edited));

    let (Some(before), Some(after)) = (before, after) else {
        common::skipped("byte counts need the in-process server's traffic counters");
        return;
    };
    let (downloaded, uploaded, copies) =
        (after.0 - before.0, after.1 - before.1, after.2 - before.2);
    eprintln!(
        "edits of two 64 MiB objects: downloaded {downloaded} B, uploaded {uploaded} B, {copies} part copies"
    );
    // append.bin: 8 parts copied, 1 KiB sent. random.bin: the 3 touched 8 MiB parts are
    // completed from S3 and sent, the other 5 copied. Whole files would be 128 MiB each way.
    let touched = offsets.len() as u64 * PART;
    assert!(
        downloaded <= touched,
        "downloaded {downloaded} B, more than the touched parts ({touched} B)"
    );
    assert!(
        uploaded <= touched + 1024 + 64 * 1024,
        "uploaded {uploaded} B, more than the touched parts and the appended KiB"
    );
    assert!(copies >= 8 + 5, "only {copies} parts were copied in S3");
}
