//! keepfs moves only the bytes it must, measured with the in-process server's per-bucket
//! traffic counters: edits of large objects copy untouched parts inside S3 (UploadPartCopy),
//! and an interrupted multipart upload continues after a restart without re-sending the parts
//! S3 already has.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    Mount, append, limit_parts, pattern, refuse_completions, server, sha256, sha256_file, traffic,
};

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
    let before = traffic(&bucket);

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
    let after = traffic(&bucket);
    // Now check the bytes (full GETs, after the measurement).
    s.wait_for_object(&bucket, "append.bin", &sha256(&appended));
    s.wait_for_object(&bucket, "random.bin", &sha256(&edited));

    let (Some(before), Some(after)) = (before, after) else {
        common::skipped("byte counts need the in-process server's traffic counters");
        return;
    };
    let (downloaded, uploaded, copies) = (
        after.downloaded - before.downloaded,
        after.uploaded - before.uploaded,
        after.copies - before.copies,
    );
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

/// The parts recorded for the uploads in progress in cache directory `cache`.
fn recorded_parts(cache: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(cache.join("uploads")) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .map(|v| v["parts"].as_object().map_or(0, |p| p.len()))
        .sum()
}

/// Waits (up to 30 s) until the cache directory records `parts` uploaded parts.
fn wait_for_recorded_parts(cache: &Path, parts: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while recorded_parts(cache) < parts {
        assert!(
            Instant::now() < deadline,
            "only {} parts recorded",
            recorded_parts(cache)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn uploads_left(cache: &Path) -> usize {
    std::fs::read_dir(cache.join("uploads")).map_or(0, |d| d.count())
}

#[test]
fn an_interrupted_upload_continues_after_kill_9_without_resending_parts() {
    let s = server();
    let bucket = s.bucket("resume");
    // The server takes 3 parts, then refuses the rest: the upload is cut off midway.
    if !limit_parts(&bucket, Some(3)) {
        common::skipped("resumed uploads: needs the in-process server to cut an upload off");
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let args = ["--cache-dir", cache.path().to_str().unwrap()];
    let mut m = Mount::new(&format!("s3://{bucket}"), &args);
    let data = pattern((48 * MIB) as usize, 180); // 6 parts of 8 MiB
    std::fs::write(m.path().join("big.bin"), &data).unwrap();
    wait_for_recorded_parts(cache.path(), 3);
    m.stop_with(libc::SIGKILL);
    drop(m);
    assert!(
        s.etag(&bucket, "big.bin").is_none(),
        "nothing completed yet"
    );

    limit_parts(&bucket, None);
    let before = traffic(&bucket).unwrap();
    let m = Mount::new(&format!("s3://{bucket}"), &args);
    assert_eq!(sha256_file(&m.path().join("big.bin")), sha256(&data));
    s.wait_for_object(&bucket, "big.bin", &sha256(&data));
    let after = traffic(&bucket).unwrap();
    let resent = after.uploaded - before.uploaded;
    eprintln!(
        "48 MiB upload cut off after 3 of 6 parts, then kill -9: {resent} B sent after the restart, {} parts",
        after.parts - before.parts
    );
    // The 3 missing parts, plus the CompleteMultipartUpload request's XML.
    assert!(
        resent <= 3 * PART + 64 * 1024,
        "{resent} B sent after the restart; the 3 recorded parts were sent again"
    );
    assert_eq!(
        after.parts - before.parts,
        3,
        "only the missing parts are sent"
    );
    assert!(m.log().contains("resuming multipart upload"), "{}", m.log());
    assert_eq!(
        uploads_left(cache.path()),
        0,
        "the finished upload is forgotten"
    );
}

#[test]
fn an_interrupted_upload_of_an_object_changed_meanwhile_is_aborted_for_a_conflict_copy() {
    let s = server();
    let bucket = s.bucket("resumeconflict");
    if !limit_parts(&bucket, Some(1)) {
        common::skipped("resumed uploads: needs the in-process server to cut an upload off");
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let args = ["--cache-dir", cache.path().to_str().unwrap()];
    let mut m = Mount::new(&format!("s3://{bucket}"), &args);
    let ours = pattern((24 * MIB) as usize, 181);
    std::fs::write(m.path().join("f.bin"), &ours).unwrap();
    wait_for_recorded_parts(cache.path(), 1);
    m.stop_with(libc::SIGKILL);
    drop(m);
    // Another client writes the key while keepfs is down.
    let theirs = pattern(1000, 182);
    s.put(&bucket, "f.bin", &theirs);
    limit_parts(&bucket, None);

    let m = Mount::new(&format!("s3://{bucket}"), &args);
    let deadline = Instant::now() + Duration::from_secs(60);
    let copy = loop {
        let (keys, _) = s.list(&bucket, "", false);
        if let Some(copy) = keys
            .into_iter()
            .find(|k| k.starts_with("f.bin.keepfs-conflict-"))
        {
            break copy;
        }
        assert!(Instant::now() < deadline, "no conflict copy");
        std::thread::sleep(Duration::from_millis(100));
    };
    s.wait_for_object(&bucket, &copy, &sha256(&ours));
    assert_eq!(
        s.get(&bucket, "f.bin").map(|b| sha256(&b)),
        Some(sha256(&theirs))
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while uploads_left(cache.path()) > 0 {
        assert!(
            Instant::now() < deadline,
            "the outdated upload is still recorded"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(m);
}

/// Block files in the disk cache of cache directory `cache`.
fn cached_blocks(cache: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for sub in std::fs::read_dir(cache.join("blocks"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for f in std::fs::read_dir(sub.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if !f.file_name().to_string_lossy().starts_with('.') {
                files.push(f.path());
            }
        }
    }
    files.sort();
    files
}

#[test]
fn a_restarted_mount_reads_its_working_set_from_the_disk_cache() {
    let s = server();
    let bucket = s.bucket("warm");
    let data = pattern((6 * MIB) as usize, 185);
    s.put(&bucket, "warm.bin", &data);
    let cache = tempfile::tempdir().unwrap();
    // Blocks are cached on disk however full the test machine's disk is (the default leaves
    // 5 % of it free; see the test below).
    let args = [
        "--read-only",
        "--cache-dir",
        cache.path().to_str().unwrap(),
        "--cache-min-free",
        "0",
    ];
    let m = Mount::new(&format!("s3://{bucket}"), &args);
    assert_eq!(sha256_file(&m.path().join("warm.bin")), sha256(&data));
    // Blocks reach the disk in the background.
    let blocks = (6 * MIB / (256 << 10)) as usize;
    let deadline = Instant::now() + Duration::from_secs(30);
    while cached_blocks(cache.path()).len() < blocks {
        assert!(
            Instant::now() < deadline,
            "{} blocks on disk",
            cached_blocks(cache.path()).len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(m);

    // A new process (empty memory cache) reads everything from the disk cache.
    let before = traffic(&bucket);
    let m = Mount::new(&format!("s3://{bucket}"), &args);
    assert_eq!(sha256_file(&m.path().join("warm.bin")), sha256(&data));
    let after = traffic(&bucket);
    drop(m);

    // A corrupted block is never served: dropped and fetched again.
    let victim = &cached_blocks(cache.path())[blocks / 2];
    let mut raw = std::fs::read(victim).unwrap();
    let middle = raw.len() / 2;
    raw[middle] ^= 0x5a;
    std::fs::write(victim, raw).unwrap();
    let before_corrupt = traffic(&bucket);
    let m = Mount::new(&format!("s3://{bucket}"), &args);
    assert_eq!(sha256_file(&m.path().join("warm.bin")), sha256(&data));
    let after_corrupt = traffic(&bucket);
    assert!(m.log().contains("corrupt block"), "{}", m.log());

    // A changed object is read anew (its new ETag names other blocks).
    let changed = pattern((6 * MIB) as usize, 186);
    s.put(&bucket, "warm.bin", &changed);
    assert_eq!(sha256_file(&m.path().join("warm.bin")), sha256(&changed));
    drop(m);

    // --no-disk-cache keeps read blocks in memory only.
    let bare = tempfile::tempdir().unwrap();
    let bare_args = [
        "--read-only",
        "--no-disk-cache",
        "--cache-dir",
        bare.path().to_str().unwrap(),
    ];
    let m = Mount::new(&format!("s3://{bucket}"), &bare_args);
    assert_eq!(sha256_file(&m.path().join("warm.bin")), sha256(&changed));
    std::thread::sleep(Duration::from_millis(300));
    assert!(cached_blocks(bare.path()).is_empty());
    drop(m);

    let (Some(before), Some(after), Some(before_corrupt), Some(after_corrupt)) =
        (before, after, before_corrupt, after_corrupt)
    else {
        common::skipped("warm cache byte counts need the in-process server's counters");
        return;
    };
    let warm = after.downloaded - before.downloaded;
    let refetched = after_corrupt.downloaded - before_corrupt.downloaded;
    eprintln!(
        "6 MiB read after a restart: {warm} B downloaded; with one corrupt block: {refetched} B"
    );
    assert_eq!(
        warm, 0,
        "the restarted mount downloaded what its disk cache held"
    );
    assert_eq!(
        refetched,
        256 << 10,
        "only the corrupt block is fetched again"
    );
}

/// A cache disk with less free space than `--cache-min-free` keeps no blocks: the least recently
/// used go, new ones stay in memory, reads are whole, and the log says why once.
#[test]
fn blocks_leave_cache_min_free_on_the_cache_disk() {
    let s = server();
    let bucket = s.bucket("minfree");
    let first = pattern((2 * MIB) as usize, 187);
    let second = pattern((2 * MIB) as usize, 188);
    s.put(&bucket, "first.bin", &first);
    s.put(&bucket, "second.bin", &second);
    let cache = tempfile::tempdir().unwrap();
    let mount = |min_free: &str, extra: &[&str]| {
        let mut args = vec!["--read-only", "--cache-dir"];
        args.extend([cache.path().to_str().unwrap(), "--cache-min-free", min_free]);
        args.extend_from_slice(extra);
        Mount::new(&format!("s3://{bucket}"), &args)
    };
    let m = mount("0", &[]);
    assert_eq!(sha256_file(&m.path().join("first.bin")), sha256(&first));
    let deadline = Instant::now() + Duration::from_secs(30);
    while cached_blocks(cache.path()).len() < 8 {
        assert!(Instant::now() < deadline, "blocks never reached the disk");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(m);

    // No disk has more than all of itself free.
    let m = mount("100%", &["--metrics-addr", "127.0.0.1:0"]);
    let addr = common::scrape::metrics_addr(&m);
    let below = |addr: &str| {
        let (text, samples) = common::scrape::scrape(addr);
        *samples
            .get("keepfs_disk_cache_below_min_free")
            .unwrap_or_else(|| panic!("no gauge:\n{text}"))
    };
    assert_eq!(below(&addr), 0.0, "nothing was turned away yet");
    assert_eq!(sha256_file(&m.path().join("second.bin")), sha256(&second));
    assert_eq!(sha256_file(&m.path().join("first.bin")), sha256(&first));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cached_blocks(cache.path()).is_empty() || !m.log().contains("--cache-min-free") {
        assert!(
            Instant::now() < deadline,
            "{} blocks still on disk; log:\n{}",
            cached_blocks(cache.path()).len(),
            m.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Reads again, from memory, all correct; and one warning, not one per block.
    assert_eq!(sha256_file(&m.path().join("second.bin")), sha256(&second));
    assert!(cached_blocks(cache.path()).is_empty());
    assert_eq!(
        m.log().matches("short of free space").count(),
        1,
        "{}",
        m.log()
    );
    assert_eq!(below(&addr), 1.0, "the gauge says why nothing is cached");
    drop(m);

    // A value that is neither a size nor a share is refused before mounting.
    let out = std::process::Command::new(common::keepfs_bin())
        .args(["mount", &format!("s3://{bucket}"), "/nonexistent"])
        .args(["--cache-min-free", "101%"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--cache-min-free") && stderr.contains("101%"),
        "{stderr}"
    );
}

#[test]
fn a_cut_off_upload_of_a_file_rewritten_since_is_aborted_and_the_new_content_sent() {
    let s = server();
    let bucket = s.bucket("resumechanged");
    if !limit_parts(&bucket, Some(2)) {
        common::skipped("resumed uploads: needs the in-process server to cut an upload off");
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let args = ["--cache-dir", cache.path().to_str().unwrap()];
    let m = Mount::new(&format!("s3://{bucket}"), &args);
    let first = pattern((32 * MIB) as usize, 187);
    std::fs::write(m.path().join("f.bin"), &first).unwrap();
    wait_for_recorded_parts(cache.path(), 2);
    // While the rest of its parts are refused, the file is rewritten.
    let second = pattern((32 * MIB) as usize, 188);
    std::fs::write(m.path().join("f.bin"), &second).unwrap();
    // The parts stay refused until the rewritten file's upload has started: the first
    // content's upload can't complete meanwhile, so it must be aborted, not left open.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !m.log().contains("aborted multipart upload") {
        assert!(
            Instant::now() < deadline,
            "the first content's upload was not aborted:\n{}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    limit_parts(&bucket, None);
    s.wait_for_object(&bucket, "f.bin", &sha256(&second));
    let deadline = Instant::now() + Duration::from_secs(30);
    while uploads_left(cache.path()) > 0 {
        assert!(Instant::now() < deadline, "an upload is still recorded");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The one multipart upload the cache directory records: its id and its parts (number → ETag).
fn recorded_upload(cache: &Path) -> Option<(String, Vec<(i32, String)>)> {
    let entries = std::fs::read_dir(cache.join("uploads")).ok()?;
    let record = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .find_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())?;
    let id = record["upload_id"].as_str()?.to_owned();
    let parts = record["parts"]
        .as_object()?
        .iter()
        .filter_map(|(n, etag)| Some((n.parse().ok()?, etag.as_str()?.to_owned())))
        .collect();
    Some((id, parts))
}

/// What the server does with the upload that keepfs recorded before it was killed, while it
/// was down (s3s-fs forgetting an id, a lifecycle rule aborting it, or its completion landing
/// though keepfs never heard the answer).
#[derive(Debug, Clone, Copy, PartialEq)]
enum MeanwhileOnServer {
    Aborted,
    Completed,
}

/// A multipart upload recorded in the cache directory that the server no longer takes (it
/// answers the resumed UploadPart or CompleteMultipartUpload with AccessDenied, as s3s-fs does
/// for an id it forgot, or NoSuchUpload, as AWS does) is not retried forever: keepfs starts a
/// new upload of the journalled bytes, or keeps the object if it holds them already.
fn resumed_upload_the_server_refuses(parts_before_kill: u64, meanwhile: MeanwhileOnServer) {
    let s = server();
    let bucket = s.bucket("refusedresume");
    // Cut off after `parts_before_kill` parts, and never completed while the mount runs.
    if !limit_parts(&bucket, Some(parts_before_kill)) || !refuse_completions(&bucket, true) {
        common::skipped("refused resumes: needs the in-process server to cut an upload off");
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let args = ["--cache-dir", cache.path().to_str().unwrap()];
    let mut m = Mount::new(&format!("s3://{bucket}"), &args);
    let data = pattern((48 * MIB) as usize, 181); // 6 parts of 8 MiB
    std::fs::write(m.path().join("big.bin"), &data).unwrap();
    wait_for_recorded_parts(cache.path(), parts_before_kill as usize);
    m.stop_with(libc::SIGKILL);
    drop(m);
    let (upload_id, parts) = recorded_upload(cache.path()).expect("the upload is recorded");
    assert_eq!(parts.len() as u64, parts_before_kill);

    let client = s.client();
    common::rt().block_on(async {
        match meanwhile {
            MeanwhileOnServer::Aborted => {
                client
                    .abort_multipart_upload()
                    .bucket(&bucket)
                    .key("big.bin")
                    .upload_id(&upload_id)
                    .send()
                    .await
                    .expect("abort the recorded upload");
            }
            MeanwhileOnServer::Completed => {
                refuse_completions(&bucket, false);
                let completed = parts
                    .iter()
                    .map(|(n, etag)| {
                        aws_sdk_s3::types::CompletedPart::builder()
                            .part_number(*n)
                            .e_tag(etag)
                            .build()
                    })
                    .collect();
                client
                    .complete_multipart_upload()
                    .bucket(&bucket)
                    .key("big.bin")
                    .upload_id(&upload_id)
                    .multipart_upload(
                        aws_sdk_s3::types::CompletedMultipartUpload::builder()
                            .set_parts(Some(completed))
                            .build(),
                    )
                    .send()
                    .await
                    .expect("complete the recorded upload");
            }
        }
    });
    limit_parts(&bucket, None);
    refuse_completions(&bucket, false);

    let before = traffic(&bucket).unwrap();
    let m = Mount::new(&format!("s3://{bucket}"), &args);
    assert_eq!(sha256_file(&m.path().join("big.bin")), sha256(&data));
    common::flush(&m);
    assert_eq!(
        s.sha256_streaming(&bucket, "big.bin").as_deref(),
        Some(sha256(&data).as_str())
    );
    let after = traffic(&bucket).unwrap();
    let parts_sent = after.parts - before.parts;
    eprintln!(
        "{parts_before_kill} of 6 parts recorded, upload {meanwhile:?} on the server: {parts_sent} parts sent after the restart"
    );
    match meanwhile {
        MeanwhileOnServer::Aborted => {
            // The refused attempts send the missing parts again (the SDK may send a refused
            // part twice: the server answers before reading the body and closes the
            // connection); the new upload sends all 6.
            let refused_attempts = 2 * 3 * (6 - parts_before_kill);
            assert!(
                (6..=6 + refused_attempts).contains(&parts_sent),
                "a new upload sends every part: {parts_sent} sent"
            );
            assert!(
                m.log()
                    .contains("multipart upload refused; starting a new one"),
                "{}",
                m.log()
            );
        }
        MeanwhileOnServer::Completed => {
            assert_eq!(
                parts_sent, 0,
                "the object holds the bytes: nothing sent again"
            );
            assert!(
                m.log()
                    .contains("S3 holds this version of the file already"),
                "{}",
                m.log()
            );
        }
    }
    assert_eq!(uploads_left(cache.path()), 0, "no upload is left recorded");
}

#[test]
fn a_resumed_upload_whose_parts_are_refused_starts_afresh() {
    resumed_upload_the_server_refuses(3, MeanwhileOnServer::Aborted);
}

#[test]
fn a_resumed_upload_whose_completion_is_refused_starts_afresh() {
    resumed_upload_the_server_refuses(6, MeanwhileOnServer::Aborted);
}

#[test]
fn a_resumed_upload_completed_unbeknown_is_kept_not_sent_again() {
    resumed_upload_the_server_refuses(6, MeanwhileOnServer::Completed);
}
