//! HEAD answers kept across restarts (`heads-<source hash>.log` in the cache directory).
//!
//! A listing gives an object's size, ETag and LastModified but not the `x-amz-meta-*` that hold
//! its mode, owner and times, so every listed file is HEADed before the kernel sees its
//! attributes (see [`crate::namespace::attr::unverified`]). After a restart (a pod's, a
//! node's) the same `ls -l` would HEAD every file again. This log keeps each answer's user
//! metadata with the version it belongs to; a listed object of the same version takes its
//! metadata from here instead of a HEAD.
//!
//! A version is the ETag **and** LastModified to the second: a metadata-only change
//! (CopyObject with `REPLACE`, which `chmod` by another client sends) keeps a single-part
//! object's ETag, the MD5 of its bytes, but gives it a new LastModified
//! (<https://docs.aws.amazon.com/AmazonS3/latest/API/API_CopyObject.html>). Seconds because
//! HEAD's `Last-Modified` is an HTTP date (RFC 9110 §5.6.7) while listings carry milliseconds.
//! A change in the same second as the version it replaces would keep both; so an answer is
//! kept only when it was received [`SETTLED`] or more after its LastModified: any later change
//! then carries a later second (with up to a second of clock skew between server and mount).
//! Only the metadata attributes are read from ([`ATTRIBUTE_METADATA`]) is kept.
//!
//! The log is a cache: lines are appended without fsync, a line torn by a crash or damaged on
//! disk fails its checksum and is skipped (that object is HEADed again), and an unreadable log
//! costs HEADs, never a wrong attribute. Each line is the JSON of one answer, a tab and the
//! CRC-32 of the JSON as 8 lowercase hex digits. It is rewritten from what is kept when
//! superseded lines outnumber kept ones.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lru::LruCache;
use serde::{Deserialize, Serialize};

use super::dir::private_file;
use crate::namespace::ATTRIBUTE_METADATA;
use crate::store::ObjectMeta;

/// The log's name in the cache directory for `source` (what identifies the bucket: the
/// mount's source identity, URL and endpoint): `heads-<16 hex digits of its SHA-256>.log`. A cache directory later used
/// for another bucket never lends one bucket's metadata to another's objects.
pub fn file_name(source: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(source.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("heads-{hex}.log")
}
/// Answers kept (least recently used go first): a directory of this many files lists without
/// a HEAD after a restart. An answer takes its key, ETag and up to seven short values: about
/// 300 bytes for a 60-byte key, 15 MiB for all of them (keys can be up to 1 KiB: 65 MiB).
pub const MAX_ENTRIES: usize = 50_000;
/// How long after its LastModified an answer must be received to be kept (see the module
/// doc).
pub const SETTLED: Duration = Duration::from_secs(2);
/// The log is rewritten once it is this large, whatever the count of its lines.
const MAX_BYTES: u64 = 64 << 20;
/// Lines of this format carry `"v":1`; others are skipped.
const VERSION: u32 = 1;
/// The log is read at most this far at start (a rewrite keeps it below [`MAX_BYTES`]).
const MAX_READ: u64 = 2 * MAX_BYTES;

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Line {
    v: u32,
    key: String,
    etag: String,
    /// LastModified, seconds since the Unix epoch.
    modified: u64,
    metadata: BTreeMap<String, String>,
}

/// What is kept of one answer.
#[derive(Debug, PartialEq)]
struct Kept {
    etag: String,
    modified: u64,
    metadata: HashMap<String, String>,
}

impl Kept {
    fn line(&self, key: &str) -> Line {
        Line {
            v: VERSION,
            key: key.to_owned(),
            etag: self.etag.clone(),
            modified: self.modified,
            metadata: self
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

struct State {
    kept: LruCache<String, Kept>,
    /// The log opened for appending; `None` once writing failed (the cache then lives in
    /// memory only).
    file: Option<File>,
    /// Lines in the file, superseded ones included, and its size in bytes.
    lines: usize,
    bytes: u64,
}

/// The log and what it holds; one per mount.
pub struct HeadLog {
    path: PathBuf,
    state: Mutex<State>,
}

/// The temporary file a rewrite of `log` goes through, beside it (a crash may leave it: the
/// next rewrite truncates it).
fn tmp_path(log: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(log.file_name().unwrap_or_default());
    name.push(".tmp");
    log.with_file_name(name)
}

fn seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn encode(line: &Line) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(line).unwrap_or_default();
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(format!("\t{crc:08x}\n").as_bytes());
    bytes
}

/// One line without its newline; `None` unless whole, of this version and as written.
fn decode(bytes: &[u8]) -> Option<Line> {
    let tab = bytes.iter().rposition(|b| *b == b'\t')?;
    let (json, digits) = (&bytes[..tab], &bytes[tab + 1..]);
    if digits != format!("{:08x}", crc32fast::hash(json)).as_bytes() {
        return None;
    }
    let line: Line = serde_json::from_slice(json).ok()?;
    (line.v == VERSION).then_some(line)
}

impl HeadLog {
    /// Loads the log of `source` (see [`file_name`]) in cache directory `dir` and opens it
    /// for appending. Never fails: a log that can't be read or written leaves the cache empty
    /// or in memory only (warned).
    pub fn open(dir: &Path, source: &str) -> Self {
        let path = dir.join(file_name(source));
        let capacity = NonZeroUsize::new(MAX_ENTRIES).unwrap_or(NonZeroUsize::MIN);
        let mut kept = LruCache::new(capacity);
        let mut lines = 0;
        let mut skipped = 0;
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(file) => {
                if let Err(e) = file.take(MAX_READ).read_to_end(&mut bytes) {
                    tracing::warn!(path = %path.display(), "reading the HEAD log: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %path.display(), "opening the HEAD log: {e}"),
        }
        // The last piece without a newline is a line cut short by a crash; appending after
        // it would glue the next line to it, so the log is rewritten then.
        let torn = !bytes.is_empty() && !bytes.ends_with(b"\n");
        let mut pieces: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
        pieces.pop();
        for piece in pieces {
            lines += 1;
            match decode(piece) {
                Some(line) => {
                    kept.put(
                        line.key,
                        Kept {
                            etag: line.etag,
                            modified: line.modified,
                            metadata: line.metadata.into_iter().collect(),
                        },
                    );
                }
                None => skipped += 1,
            }
        }
        if skipped > 0 {
            tracing::warn!(
                path = %path.display(),
                skipped,
                "HEAD log lines damaged or of another version skipped (those objects are asked again)"
            );
        }
        let log = Self {
            path,
            state: Mutex::new(State {
                kept,
                file: None,
                lines,
                bytes: bytes.len() as u64,
            }),
        };
        let mut state = log.lock();
        if torn || state.lines > 2 * state.kept.len() + 1000 || state.bytes > MAX_BYTES {
            log.rewrite(&mut state);
        } else {
            state.file = log.append_handle();
        }
        drop(state);
        log
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn append_handle(&self) -> Option<File> {
        match private_file().create(true).append(true).open(&self.path) {
            Ok(file) => Some(file),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), "the HEAD log can't be written: {e}");
                None
            }
        }
    }

    /// Rewrites the log with what is kept, least recently used first (the order a load puts
    /// back).
    fn rewrite(&self, state: &mut State) {
        let mut bytes = Vec::new();
        for (key, kept) in state.kept.iter().rev() {
            bytes.extend(encode(&kept.line(key)));
        }
        state.file = None;
        // A temporary file renamed over the log, not synced: the log is a cache, and a crash
        // leaves the old log, the new one, or a torn line that is skipped.
        let tmp = tmp_path(&self.path);
        let written = private_file()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .and_then(|mut file| file.write_all(&bytes))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        match written {
            Ok(()) => {
                state.lines = state.kept.len();
                state.bytes = bytes.len() as u64;
                state.file = self.append_handle();
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!(path = %self.path.display(), "rewriting the HEAD log: {e}");
            }
        }
    }

    /// Keeps HEAD answer `meta` of `key`, just received: nothing for an answer without an
    /// ETag or received less than [`SETTLED`] after its LastModified.
    pub fn record(&self, key: &str, meta: &ObjectMeta) {
        let settled = meta
            .last_modified
            .checked_add(SETTLED)
            .is_some_and(|t| t <= SystemTime::now());
        if meta.etag.is_empty() || !settled {
            return;
        }
        let kept = Kept {
            etag: meta.etag.clone(),
            modified: seconds(meta.last_modified),
            metadata: meta
                .user_metadata
                .iter()
                .filter(|(k, _)| ATTRIBUTE_METADATA.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        let mut state = self.lock();
        if state.kept.get(key) == Some(&kept) {
            return;
        }
        let line = encode(&kept.line(key));
        state.kept.put(key.to_owned(), kept);
        if let Some(file) = &mut state.file {
            if let Err(e) = file.write_all(&line) {
                tracing::warn!(path = %self.path.display(), "appending to the HEAD log: {e}");
                state.file = None;
            } else {
                state.lines += 1;
                state.bytes += line.len() as u64;
            }
        }
        if state.file.is_some() && (state.lines > 2 * MAX_ENTRIES || state.bytes > MAX_BYTES) {
            self.rewrite(&mut state);
        }
    }

    /// `listed` (from a listing) with the user metadata and LastModified (whole seconds, as
    /// HEAD gives it) of a kept answer for the same version of `key`: what a HEAD would say
    /// now. `None` if no answer for that version is kept.
    pub fn answer(&self, key: &str, listed: &ObjectMeta) -> Option<ObjectMeta> {
        if listed.etag.is_empty() {
            return None;
        }
        let mut state = self.lock();
        let kept = state.kept.get(key)?;
        (kept.etag == listed.etag && kept.modified == seconds(listed.last_modified)).then(|| {
            ObjectMeta {
                user_metadata: kept.metadata.clone(),
                last_modified: UNIX_EPOCH + Duration::from_secs(kept.modified),
                ..listed.clone()
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SOURCE: &str = "s3://bucket/prefix/ at http://127.0.0.1:9000";

    fn meta(etag: &str, secs: u64, millis: u64, mode: &str) -> ObjectMeta {
        ObjectMeta {
            size: 10,
            etag: etag.to_owned(),
            last_modified: UNIX_EPOCH + Duration::from_millis(secs * 1000 + millis),
            user_metadata: [("mode".to_owned(), mode.to_owned())].into(),
        }
    }

    fn listed(etag: &str, secs: u64, millis: u64) -> ObjectMeta {
        ObjectMeta {
            user_metadata: HashMap::new(),
            ..meta(etag, secs, millis, "")
        }
    }

    #[test]
    fn an_answer_serves_its_version_only_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let log = HeadLog::open(dir.path(), SOURCE);
        log.record("a", &meta("\"e1\"", 100, 0, "33152"));
        // The listing's milliseconds against the HEAD's whole second: the same version.
        let got = log.answer("a", &listed("\"e1\"", 100, 218)).unwrap();
        assert_eq!(got.user_metadata["mode"], "33152");
        assert_eq!(
            got.last_modified,
            UNIX_EPOCH + Duration::from_secs(100),
            "HEAD's second"
        );
        assert!(
            log.answer("a", &listed("\"e2\"", 100, 0)).is_none(),
            "other ETag"
        );
        assert!(
            log.answer("a", &listed("\"e1\"", 101, 0)).is_none(),
            "metadata copy"
        );
        assert!(log.answer("b", &listed("\"e1\"", 100, 0)).is_none());
        assert!(log.answer("a", &listed("", 100, 0)).is_none(), "no ETag");
        log.record("a", &meta("\"e1\"", 105, 0, "33188"));
        drop(log);
        let again = HeadLog::open(dir.path(), SOURCE);
        assert!(
            again.answer("a", &listed("\"e1\"", 100, 0)).is_none(),
            "superseded"
        );
        let got = again.answer("a", &listed("\"e1\"", 105, 999)).unwrap();
        assert_eq!(got.user_metadata["mode"], "33188");
    }

    #[test]
    fn a_torn_or_damaged_line_is_skipped_and_its_neighbours_kept() {
        let dir = tempfile::tempdir().unwrap();
        let log = HeadLog::open(dir.path(), SOURCE);
        for (i, key) in ["a", "b", "c"].iter().enumerate() {
            log.record(key, &meta("\"e\"", 100 + i as u64, 0, "33188"));
        }
        drop(log);
        let path = dir.path().join(file_name(SOURCE));
        let mut bytes = std::fs::read(&path).unwrap();
        // Flip a byte in the second line's JSON; cut the third short.
        let second = bytes.iter().position(|b| *b == b'\n').unwrap() + 5;
        bytes[second] ^= 0x20;
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, &bytes).unwrap();
        let log = HeadLog::open(dir.path(), SOURCE);
        assert!(log.answer("a", &listed("\"e\"", 100, 0)).is_some());
        assert!(log.answer("b", &listed("\"e\"", 101, 0)).is_none());
        assert!(log.answer("c", &listed("\"e\"", 102, 0)).is_none());
        // Still appendable after a torn end: the next answer lands on a line of its own.
        log.record("d", &meta("\"e\"", 103, 0, "33188"));
        drop(log);
        let log = HeadLog::open(dir.path(), SOURCE);
        assert!(log.answer("a", &listed("\"e\"", 100, 0)).is_some());
        assert!(log.answer("d", &listed("\"e\"", 103, 0)).is_some());
    }

    #[test]
    fn only_settled_answers_and_attribute_metadata_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let log = HeadLog::open(dir.path(), SOURCE);
        // Written a moment ago: a change in the same second could follow unseen.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        log.record("fresh", &meta("\"e\"", now, 0, "33188"));
        assert!(log.answer("fresh", &listed("\"e\"", now, 0)).is_none());
        let mut other = meta("\"e\"", 100, 0, "33188");
        other
            .user_metadata
            .insert("app-secret-ish".to_owned(), "x".repeat(2000));
        other
            .user_metadata
            .insert("uid".to_owned(), "1000".to_owned());
        log.record("old", &other);
        let got = log.answer("old", &listed("\"e\"", 100, 0)).unwrap();
        let mut names: Vec<&str> = got.user_metadata.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(names, ["mode", "uid"]);
    }

    #[test]
    fn another_source_has_another_log() {
        let dir = tempfile::tempdir().unwrap();
        HeadLog::open(dir.path(), SOURCE).record("a", &meta("\"e\"", 100, 0, "33188"));
        let other = HeadLog::open(dir.path(), "s3://other/prefix/ at http://127.0.0.1:9000");
        assert!(other.answer("a", &listed("\"e\"", 100, 0)).is_none());
        assert!(
            HeadLog::open(dir.path(), SOURCE)
                .answer("a", &listed("\"e\"", 100, 0))
                .is_some()
        );
    }

    #[test]
    fn the_log_is_private_and_rewritten_when_mostly_superseded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let log = HeadLog::open(dir.path(), SOURCE);
        for i in 0..3000u64 {
            log.record("same", &meta("\"e\"", i, 0, "33188"));
        }
        drop(log);
        let path = dir.path().join(file_name(SOURCE));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let lines = |p: &Path| {
            std::fs::read(p)
                .unwrap()
                .iter()
                .filter(|b| **b == b'\n')
                .count()
        };
        assert_eq!(lines(&path), 3000);
        let log = HeadLog::open(dir.path(), SOURCE);
        assert_eq!(lines(&path), 1, "rewritten at load");
        assert!(log.answer("same", &listed("\"e\"", 2999, 0)).is_some());
    }

    proptest! {
        #[test]
        fn any_bytes_load_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(file_name(SOURCE)), &bytes).unwrap();
            let log = HeadLog::open(dir.path(), SOURCE);
            log.record("k", &meta("\"e\"", 1, 0, "1"));
            prop_assert!(log.answer("k", &listed("\"e\"", 1, 0)).is_some());
        }

        #[test]
        fn every_cut_and_flip_of_a_line_is_refused(
            key in "[a-z/%+ ]{1,20}",
            at in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let line = encode(&Line {
                v: VERSION,
                key,
                etag: "\"0123\"".to_owned(),
                modified: 1_700_000_000,
                metadata: [("mode".to_owned(), "33188".to_owned())].into(),
            });
            let body = &line[..line.len() - 1];
            prop_assert!(decode(body).is_some());
            let cut = at.index(body.len());
            prop_assert!(decode(&body[..cut]).is_none(), "cut at {}", cut);
            let mut flipped = body.to_vec();
            flipped[cut] ^= 1 << bit;
            prop_assert!(decode(&flipped).is_none(), "bit {} of byte {}", bit, cut);
        }
    }
}
