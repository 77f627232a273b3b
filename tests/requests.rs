//! What each POSIX workload costs in S3 requests, counted by keepfs's own metrics: `ls -l` sends
//! one HEAD per listed object and no per-entry listing; lookups of names a directory is
//! known not to hold send nothing; and what that trust costs (absent names are trusted for
//! `--metadata-ttl`, a file created over another client's new object is kept beside it).

mod common;

use std::collections::HashMap;
use std::fs;
use std::time::Duration;

use common::scrape::{delta, metrics_addr, scrape};
use common::{Mount, flush, pattern, server, sha256};

/// S3 requests of operation `name` (the SDK's name) between two scrapes.
fn requests(from: &HashMap<String, f64>, to: &HashMap<String, f64>, name: &str) -> f64 {
    delta(
        from,
        to,
        "keepfs_s3_requests_total",
        &[&format!("operation=\"{name}\"")],
    )
}

#[test]
fn ls_l_heads_each_listed_object_once_and_sends_no_per_entry_listing() {
    const FILES: usize = 90;
    const LINKS: usize = 10;
    // Half small enough to be symlinks, half larger.
    let size = |i: usize| {
        if i.is_multiple_of(2) {
            100 + i
        } else {
            5_000 + i
        }
    };
    let s = server();
    let bucket = s.bucket("statahead");
    let source = format!("s3://{bucket}");
    {
        // Written through keepfs: symlinks are objects only a HEAD tells from small files,
        // and a mode or mtime only a HEAD tells, whatever the size.
        let m = Mount::new(&source, &[]);
        fs::create_dir(m.path().join("d")).unwrap();
        for i in 0..FILES {
            fs::write(
                m.path().join(format!("d/f{i:03}")),
                pattern(size(i), i as u64),
            )
            .unwrap();
        }
        for i in 0..LINKS {
            std::os::unix::fs::symlink(format!("f{i:03}"), m.path().join(format!("d/l{i:03}")))
                .unwrap();
        }
        flush(&m);
    }
    // A fresh mount knows nothing but what S3 holds; a TTL long enough for the whole run.
    let m = Mount::new(
        &source,
        &["--metrics-addr", "127.0.0.1:0", "--metadata-ttl", "30"],
    );
    let addr = metrics_addr(&m);
    assert!(m.path().join("d").is_dir());
    let ls_l = || common::ls_l(&m.path().join("d"), "");
    let (_, before) = scrape(&addr);
    let listing = ls_l();
    let (_, after) = scrape(&addr);
    let (_, again) = {
        let second = ls_l();
        assert_eq!(
            second, listing,
            "a second ls -l within the TTL shows the same"
        );
        scrape(&addr)
    };

    // What ls -l shows: every file a file of its size, every symlink a symlink to its target.
    let lines: Vec<&str> = listing.lines().skip(1).collect();
    assert_eq!(lines.len(), FILES + LINKS, "{listing}");
    for i in 0..FILES {
        let name = format!("f{i:03}");
        let line = lines
            .iter()
            .find(|l| l.ends_with(&format!(" {name}")))
            .unwrap();
        assert!(line.starts_with('-'), "{line}");
        assert!(line.contains(&format!(" {} ", size(i))), "{line}");
    }
    for i in 0..LINKS {
        let line = lines
            .iter()
            .find(|l| l.contains(&format!(" l{i:03} -> f{i:03}")))
            .unwrap_or_else(|| panic!("l{i:03} is not a symlink:\n{listing}"));
        assert!(line.starts_with('l'), "{line}");
    }

    // The requests: one listing of the directory, one HEAD per listed object, a GET per
    // symlink for its target (readlink), nothing more; the second ls -l lists again, no more.
    let d = |name: &str, labels: &[&str]| delta(&before, &after, name, labels);
    assert_eq!(
        requests(&before, &after, "ListObjectsV2"),
        1.0,
        "one listing of d, no 1-key listing per entry"
    );
    assert_eq!(
        requests(&before, &after, "HeadObject"),
        (FILES + LINKS) as f64,
        "each listed object HEADed once"
    );
    let gets = requests(&before, &after, "GetObject");
    assert!(gets <= LINKS as f64, "{gets} GETs");
    assert_eq!(
        d("keepfs_s3_requests_total", &[]),
        (FILES + LINKS + 1) as f64 + gets,
        "no other request"
    );
    assert_eq!(
        delta(&after, &again, "keepfs_s3_requests_total", &[]),
        requests(&after, &again, "ListObjectsV2"),
        "the second ls -l sent more than its listing"
    );
}

#[test]
fn files_created_in_a_directory_made_here_send_no_lookup_requests() {
    const FILES: usize = 40;
    let s = server();
    let bucket = s.bucket("negative");
    // A TTL longer than the test: the directory stays known in full throughout.
    let m = Mount::new(
        &format!("s3://{bucket}"),
        &["--metrics-addr", "127.0.0.1:0", "--metadata-ttl", "60"],
    );
    let addr = metrics_addr(&m);
    fs::create_dir(m.path().join("d")).unwrap();
    let (_, before) = scrape(&addr);
    let mut written = Vec::new();
    for i in 0..FILES {
        let data = pattern(4096 + i, i as u64);
        fs::write(m.path().join(format!("d/f{i:03}")), &data).unwrap();
        written.push(data);
    }
    fs::create_dir(m.path().join("d/sub")).unwrap();
    fs::write(m.path().join("d/sub/inner"), b"inner").unwrap();
    std::os::unix::fs::symlink("f000", m.path().join("d/link")).unwrap();
    for missing in ["nothing", "sub/nothing"] {
        let err = fs::metadata(m.path().join("d").join(missing)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{missing}");
    }
    flush(&m);
    let (_, after) = scrape(&addr);
    assert_eq!(
        requests(&before, &after, "ListObjectsV2"),
        0.0,
        "a lookup of a new name in a directory made here lists nothing"
    );
    // Left: the PUTs, and on a server that ignores conditional writes the upload's own HEAD
    // check of each new key; never a lookup's HEAD.
    let uploads = (FILES + 2) as f64; // the files, d/sub/inner and the symlink
    assert_eq!(
        requests(&before, &after, "PutObject"),
        uploads + 1.0, // and the marker of d/sub
    );
    let heads = requests(&before, &after, "HeadObject");
    if s.honours_conditional_puts() {
        assert!(m.log().contains("conditional_puts=true"), "{}", m.log());
        assert_eq!(heads, 0.0, "the PUT's precondition guards the key: no HEAD");
    } else {
        assert!(heads <= uploads, "{heads} HEADs for {uploads} uploads");
    }

    // A name renamed away is known absent too.
    fs::rename(m.path().join("d/f001"), m.path().join("d/moved")).unwrap();
    let (_, renamed) = scrape(&addr);
    let err = fs::metadata(m.path().join("d/f001")).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert_eq!(
        delta(&renamed, &scrape(&addr).1, "keepfs_s3_requests_total", &[]),
        0.0
    );
    flush(&m);

    // Every byte where it belongs, from S3's side.
    for (i, data) in written.iter().enumerate() {
        let key = if i == 1 {
            "d/moved".to_owned()
        } else {
            format!("d/f{i:03}")
        };
        let got = s
            .get(&bucket, &key)
            .unwrap_or_else(|| panic!("{key} not in S3"));
        assert_eq!(sha256(&got), sha256(data), "{key}");
    }
    assert_eq!(s.get(&bucket, "d/f001"), None, "renamed away");
    assert_eq!(
        s.get(&bucket, "d/sub/inner").as_deref(),
        Some(&b"inner"[..])
    );
}

#[test]
fn a_listed_directory_trusts_absent_names_for_the_ttl_and_keeps_a_file_created_over_one() {
    let s = server();
    let bucket = s.bucket("negative-ttl");
    s.put(&bucket, "d/a", b"a");
    let ttl = Duration::from_secs(4);
    let m = Mount::new(
        &format!("s3://{bucket}"),
        &["--metrics-addr", "127.0.0.1:0", "--metadata-ttl", "4"],
    );
    let addr = metrics_addr(&m);
    // The directory is known in full from a moment between these two instants.
    let listing_sent = std::time::Instant::now();
    assert_eq!(common::names(&m.path().join("d")), ["a"]);
    let listed = std::time::Instant::now();
    // Another client writes two names the listing did not show.
    s.put(&bucket, "d/theirs", b"from another client");
    s.put(&bucket, "d/both", b"their version");
    let (_, before) = scrape(&addr);
    let seen_early = m.path().join("d/theirs").exists();
    let (_, looked_up) = scrape(&addr);
    // Created here over a name the mount trusts to be absent: kept beside theirs.
    fs::write(m.path().join("d/both"), b"our version").unwrap();
    let (_, created) = scrape(&addr);
    assert!(
        listing_sent.elapsed() < ttl,
        "the machine was too slow to check within the TTL"
    );
    assert!(!seen_early, "an absent name is trusted for the TTL");
    assert_eq!(
        delta(&before, &looked_up, "keepfs_s3_requests_total", &[]),
        0.0,
        "an absent name costs no request within the TTL"
    );
    assert_eq!(
        requests(&looked_up, &created, "ListObjectsV2"),
        0.0,
        "creating an absent name sends no lookup"
    );
    std::thread::sleep(ttl.saturating_sub(listed.elapsed()) + Duration::from_millis(200));
    assert_eq!(
        fs::read(m.path().join("d/theirs")).unwrap_or_else(|e| panic!("{e}\n{}", m.log())),
        b"from another client",
        "after the TTL the name is asked for again"
    );
    flush(&m);
    assert_eq!(
        s.get(&bucket, "d/both").as_deref(),
        Some(&b"their version"[..]),
        "the other client's object is not overwritten"
    );
    let (keys, _) = s.list(&bucket, "d/", true);
    let copy = keys
        .iter()
        .find(|k| k.starts_with("d/both.keepfs-conflict-"))
        .unwrap_or_else(|| panic!("no conflict copy in {keys:?}"));
    assert_eq!(s.get(&bucket, copy).as_deref(), Some(&b"our version"[..]));
}

/// After a restart on the same cache directory, `ls -l` of a directory listed and HEADed
/// before sends its listing and no HEAD (the HEAD log), shows the same, and still HEADs the
/// objects another client changed since: new bytes (a new ETag), or only new metadata (same
/// ETag, a new LastModified; what `chmod` by another client sends).
#[test]
fn ls_l_after_a_restart_heads_only_what_changed() {
    use std::os::unix::fs::PermissionsExt;
    const FILES: usize = 30;
    let s = server();
    let bucket = s.bucket("headlog");
    let source = format!("s3://{bucket}");
    {
        let m = Mount::new(&source, &[]);
        fs::create_dir(m.path().join("d")).unwrap();
        for i in 0..FILES {
            let path = m.path().join(format!("d/f{i:03}"));
            fs::write(&path, pattern(100 + 300 * i, i as u64)).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600 + (i as u32 % 8))).unwrap();
        }
        std::os::unix::fs::symlink("f000", m.path().join("d/link")).unwrap();
        flush(&m);
    }
    let cache = tempfile::tempdir().unwrap();
    let mount = || {
        let m = Mount::new(
            &source,
            &[
                "--cache-dir",
                cache.path().to_str().unwrap(),
                "--metrics-addr",
                "127.0.0.1:0",
                "--metadata-ttl",
                "30",
            ],
        );
        let addr = metrics_addr(&m);
        (m, addr)
    };
    let ls_l = |m: &Mount, addr: &str| {
        assert!(m.path().join("d").is_dir());
        let (_, before) = scrape(addr);
        let shown = common::ls_l(&m.path().join("d"), "%s");
        let (_, after) = scrape(addr);
        (shown, requests(&before, &after, "HeadObject"))
    };
    // HEAD answers are kept once their object is 2 s old (a change within the same second
    // would keep its ETag and LastModified; see src/cache/heads.rs).
    std::thread::sleep(keepfs::cache::heads::SETTLED + std::time::Duration::from_millis(100));
    let (first, heads) = {
        let (m, addr) = mount();
        ls_l(&m, &addr)
    };
    assert_eq!(
        heads,
        (FILES + 1) as f64,
        "a fresh cache directory: one HEAD each\n{first}"
    );
    let (m, addr) = mount();
    let (again, heads) = ls_l(&m, &addr);
    assert_eq!(again, first, "after the restart");
    // Kept answers are matched by ETag, which s3s-fs's listings leave out: HEADs again there.
    let expected = if s.lists_etags() {
        0.0
    } else {
        (FILES + 1) as f64
    };
    assert_eq!(
        heads, expected,
        "after the restart, every version was HEADed before"
    );
    drop(m);

    // Another client: new bytes for f001; a new mode alone for f002 (a copy onto itself
    // with new metadata, a second later so that its LastModified differs).
    s.put(&bucket, "d/f001", b"replaced by another client");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let mut metadata = s.metadata(&bucket, "d/f002").unwrap();
    metadata.insert("mode".to_owned(), (0o100644u32).to_string());
    common::rt()
        .block_on(
            s.client()
                .copy_object()
                .bucket(&bucket)
                .key("d/f002")
                .copy_source(format!("{bucket}/d/f002"))
                .metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace)
                .set_metadata(Some(metadata))
                .send(),
        )
        .unwrap();
    let (m, addr) = mount();
    let (changed, heads) = ls_l(&m, &addr);
    let expected = if s.lists_etags() {
        2.0
    } else {
        (FILES + 1) as f64
    };
    assert_eq!(heads, expected, "only the two changed objects\n{changed}");
    let line = |name: &str| {
        changed
            .lines()
            .find(|l| l.ends_with(&format!(" {name}")))
            .unwrap()
            .to_owned()
    };
    assert!(line("f002").starts_with("-rw-r--r--"), "{}", line("f002"));
    assert!(line("f001").contains(" 26 "), "{}", line("f001"));
    assert!(line("f003").starts_with("-rw-----wx"), "{}", line("f003"));
    let link = changed.lines().find(|l| l.ends_with(" link -> f000"));
    assert!(link.is_some_and(|l| l.starts_with('l')), "{changed}");
}
