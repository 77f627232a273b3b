//! Statahead: HEADs of a listed directory's objects sent ahead of the kernel's lookups.
//!
//! `ls -l` lists a directory, then `lstat`s its entries one by one. An object known only from
//! a listing lacks what only HEAD tells (a small object may be a symlink; mode, owner and times
//! live in `x-amz-meta-*`), so each `lstat` would wait for its own HEAD. Once the kernel looks
//! up one listed object, the next ones in name order are HEADed in the background, a window
//! that starts at [`FIRST_WINDOW`] and doubles up to [`WINDOW`] as lookups keep coming, so a
//! single `stat` in a large directory sends a few requests, not thousands.
//!
//! An answer is HEAD only: the listing already said the name is an object and not a
//! directory, which is what the 1-key listing of a cold lookup is for. Answers are used for
//! the mount's `--metadata-ttl` from when their HEAD was sent, and a directory's names for
//! [`ORDER_TTL`] after its listing; a change in the directory on this mount drops both.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OnceCell, Semaphore};
use tokio::task::JoinHandle;

use crate::store::{ObjectMeta, ObjectStore};

/// Most HEADs one directory's statahead keeps ahead of the last lookup.
const WINDOW: usize = 32;
/// The window after a directory's first lookup: a lone `stat` costs at most this many HEADs.
const FIRST_WINDOW: usize = 4;
/// HEADs in flight for all directories together.
const IN_FLIGHT: usize = 32;
/// How long a listing's order of names guides statahead. Longer than a typical metadata TTL:
/// a long `ls -l` stats its last entries well after the listing.
const ORDER_TTL: Duration = Duration::from_secs(30);
/// Directories whose order is kept.
const DIRS: u64 = 64;
/// Below this metadata TTL an answer would expire before it is used: statahead is off.
const MIN_TTL: Duration = Duration::from_millis(100);

/// One background HEAD and its outcome (`None`: failed or absent; the lookup asks itself).
struct Answer {
    sent: Instant,
    task: Mutex<Option<JoinHandle<Option<ObjectMeta>>>>,
    meta: OnceCell<Option<ObjectMeta>>,
}

impl Answer {
    async fn get(&self) -> Option<ObjectMeta> {
        self.meta
            .get_or_init(|| async {
                let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
                match task {
                    Some(task) => task.await.ok().flatten(),
                    None => None,
                }
            })
            .await
            .clone()
    }
}

/// The listed objects of one directory, in name order, and the answers sent for them.
struct DirAhead {
    /// Names of the objects the listing showed that the kernel will look up: those known from
    /// the listing only (the kernel is told not to keep their attributes).
    names: Vec<String>,
    /// What a name is appended to for its key (the directory's prefix, `/` included): kept
    /// once per directory, where a key per name held each name twice and the prefix each time.
    key_prefix: String,
    state: Mutex<DirState>,
}

#[derive(Default)]
struct DirState {
    answers: HashMap<usize, Arc<Answer>>,
    /// Entries before this index have been sent (or passed).
    sent_until: usize,
    window: usize,
}

pub struct Statahead {
    dirs: moka::sync::Cache<String, Arc<DirAhead>>,
    permits: Arc<Semaphore>,
    ttl: Duration,
}

impl Statahead {
    /// Statahead for a mount whose attributes are trusted for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            dirs: moka::sync::Cache::builder()
                .max_capacity(DIRS)
                .time_to_live(ORDER_TTL)
                .build(),
            permits: Arc::new(Semaphore::new(IN_FLIGHT)),
            ttl,
        }
    }

    fn enabled(&self) -> bool {
        self.ttl >= MIN_TTL
    }

    /// Records directory `dir`'s listed objects, names sorted, whose keys are `key_prefix` +
    /// name, replacing what an earlier listing left.
    pub fn listed(&self, dir: &str, key_prefix: String, names: Vec<String>) {
        if !self.enabled() || names.is_empty() {
            self.dirs.invalidate(dir);
            return;
        }
        let ahead = DirAhead {
            names,
            key_prefix,
            state: Mutex::new(DirState {
                window: FIRST_WINDOW,
                ..DirState::default()
            }),
        };
        self.dirs.insert(dir.to_owned(), Arc::new(ahead));
    }

    /// Forgets what is known of `dir` (an entry was added, removed or renamed here).
    pub fn forget(&self, dir: &str) {
        self.dirs.invalidate(dir);
    }

    /// HEAD of `name` in `dir` as statahead has it (sent now if it was not) and when it was
    /// sent, and the next names' HEADs sent. `None` when `dir` has no recent listing naming
    /// `name` as an object, or its HEAD failed: the caller then asks the server itself.
    pub async fn answer<S: ObjectStore>(
        &self,
        store: &Arc<S>,
        dir: &str,
        name: &str,
    ) -> Option<(ObjectMeta, Instant)> {
        let ahead = self.dirs.get(dir)?;
        let at = ahead
            .names
            .binary_search_by(|n| n.as_str().cmp(name))
            .ok()?;
        let own = {
            let mut state = ahead.state.lock().unwrap_or_else(|e| e.into_inner());
            let end = (at + state.window).min(ahead.names.len());
            let from = state.sent_until.max(at + 1);
            for i in std::iter::once(at).chain(from..end) {
                let fresh = state
                    .answers
                    .get(&i)
                    .is_some_and(|a| a.sent.elapsed() < self.ttl);
                if !fresh {
                    let key = format!("{}{}", ahead.key_prefix, ahead.names[i]);
                    let answer = self.send(store, key);
                    state.answers.insert(i, answer);
                }
            }
            state.sent_until = state.sent_until.max(end);
            state.window = (state.window * 2).min(WINDOW);
            // Answers behind the lookups are not needed again.
            state.answers.retain(|i, _| *i + WINDOW >= at);
            state.answers.get(&at).cloned()
        }?;
        let meta = own.get().await?;
        (own.sent.elapsed() < self.ttl).then_some((meta, own.sent))
    }

    fn send<S: ObjectStore>(&self, store: &Arc<S>, key: String) -> Arc<Answer> {
        let (store, permits) = (store.clone(), self.permits.clone());
        // Taken before the HEAD can go out: an answer is never older than this says.
        let sent = Instant::now();
        let task = tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.ok()?;
            store.head(&key).await.ok()
        });
        Arc::new(Answer {
            sent,
            task: Mutex::new(Some(task)),
            meta: OnceCell::new(),
        })
    }
}
