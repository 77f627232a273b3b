//! Directories whose entries the mount knows in full: lookups of names they don't hold are
//! answered "absent" without a request (negative lookups).
//!
//! A directory is known in full from a complete listing (every page of ListObjectsV2 of its
//! prefix) or from having been made empty by this mount's `mkdir`. Names the mount links into
//! it afterwards (create, mkdir, symlink, rename) are added, names it removes are dropped. An
//! absent name is trusted for `--metadata-ttl` from when the listing was sent: the trust the
//! TTL already gives a name found by lookup. A name another client creates meanwhile is missed
//! for at most that long, as a looked-up name's change is; a file created here over it is
//! uploaded conditionally and kept beside it as a conflict copy, never over it.
//!
//! A listing is recorded only if no name was linked into its directory while it ran: such a
//! name could be missing from the listing and from the record both.
//!
//! Once a record is older than the TTL, lookups of missing names ask the server again (a HEAD
//! and a 1-key listing each) until those requests add up to what listing the directory again
//! would cost (its page count at the last listing); then the directory is listed again and
//! answers for another TTL. A burst of creates in a large directory so costs at most about
//! twice the requests of the cheaper of the two ways, and a lone miss never lists a large
//! directory.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// Directories tracked before stale records are dropped (bounds memory: names are kept per
/// directory, about 50 bytes each).
const MAX_DIRS: usize = 4096;

/// What the mount knows of one directory.
#[derive(Debug, Default)]
struct Dir {
    /// Every name in the directory as of `known_at` plus those linked here since.
    names: Option<HashSet<String>>,
    /// When the listing that filled `names` was sent (or the `mkdir`).
    known_at: Option<Instant>,
    /// Listing pages (requests) the directory took at its last listing.
    pages: u32,
    /// Requests sent for lookups of missing names since the record went stale.
    stale_requests: u32,
    /// Changes each time a name is linked into the directory (a value from a global counter,
    /// so a dropped and re-made entry never repeats one).
    generation: u64,
}

/// A listing in progress: recorded only if its directory's generation is unchanged at the end.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    generation: u64,
    started: Instant,
}

/// What the record says of a name.
#[derive(Debug, PartialEq, Eq)]
pub enum Known {
    /// The directory was known in full less than the TTL ago and holds no such name.
    Absent,
    /// The record is too old, and lookups since have cost what listing the directory again
    /// would: list it.
    Relist,
    /// Ask the server.
    Unknown,
}

#[derive(Debug)]
pub struct CompleteDirs {
    dirs: HashMap<String, Dir>,
    next_generation: u64,
    /// How long a record answers for absent names (`--metadata-ttl`).
    ttl: Duration,
}

/// `(directory, name)` of `path` ("" for the root's entries).
fn split(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

impl CompleteDirs {
    pub fn new(ttl: Duration) -> Self {
        Self {
            dirs: HashMap::new(),
            next_generation: 0,
            ttl,
        }
    }

    fn bump(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }

    /// Drops records older than `ttl` once too many directories are tracked.
    fn trim(&mut self) {
        let ttl = self.ttl;
        if self.dirs.len() > MAX_DIRS {
            self.dirs
                .retain(|_, d| d.known_at.is_some_and(|t| t.elapsed() < ttl));
        }
    }

    /// A listing of `dir` is about to be sent.
    pub fn begin(&mut self, dir: &str) -> Ticket {
        let generation = match self.dirs.get(dir) {
            Some(d) => d.generation,
            None => {
                let generation = self.bump();
                self.dirs.insert(
                    dir.to_owned(),
                    Dir {
                        generation,
                        ..Dir::default()
                    },
                );
                generation
            }
        };
        Ticket {
            generation,
            started: Instant::now(),
        }
    }

    /// The listing of `dir` begun with `ticket` completed with these names.
    /// `pages`: the listing's requests.
    pub fn listed(&mut self, dir: &str, ticket: Ticket, names: HashSet<String>, pages: u32) {
        if let Some(d) = self.dirs.get_mut(dir)
            && d.generation == ticket.generation
        {
            d.names = Some(names);
            d.known_at = Some(ticket.started);
            d.pages = pages;
            d.stale_requests = 0;
        }
        self.trim();
    }

    /// Directory `dir` was made, empty, by this mount.
    pub fn made_empty(&mut self, dir: &str) {
        let generation = self.bump();
        self.dirs.insert(
            dir.to_owned(),
            Dir {
                names: Some(HashSet::new()),
                known_at: Some(Instant::now()),
                pages: 1,
                stale_requests: 0,
                generation,
            },
        );
        self.trim();
    }

    /// A name was linked at `path` (created, renamed there, or found).
    pub fn linked(&mut self, path: &str) {
        let (dir, name) = split(path);
        if self.dirs.contains_key(dir) {
            let generation = self.bump();
            let d = self.dirs.get_mut(dir).expect("present");
            d.generation = generation;
            if let Some(names) = &mut d.names {
                names.insert(name.to_owned());
            }
        }
    }

    /// The name at `path` was removed by this mount.
    pub fn unlinked(&mut self, path: &str) {
        let (dir, name) = split(path);
        if let Some(names) = self.dirs.get_mut(dir).and_then(|d| d.names.as_mut()) {
            names.remove(name);
        }
    }

    /// Forgets directory `dir` and every directory below it (removed or moved).
    pub fn dropped(&mut self, dir: &str) {
        let below = format!("{dir}/");
        self.dirs
            .retain(|p, _| p != dir && !(dir.is_empty() || p.starts_with(&below)));
    }

    /// Every name of `dir` as of its last complete listing, whatever its age, with the names
    /// linked and removed here since; `None` if it was never listed in full (or the record
    /// was dropped).
    pub fn last_names(&self, dir: &str) -> Option<&HashSet<String>> {
        self.dirs.get(dir)?.names.as_ref()
    }

    /// What the record says of `name` in `dir`. An `Unknown` answer for a stale record counts
    /// the lookup's two requests towards listing the directory again.
    pub fn known(&mut self, dir: &str, name: &str) -> Known {
        let ttl = self.ttl;
        let Some(d) = self.dirs.get_mut(dir) else {
            return Known::Unknown;
        };
        let (Some(names), Some(known_at)) = (&d.names, d.known_at) else {
            return Known::Unknown;
        };
        if names.contains(name) {
            Known::Unknown
        } else if known_at.elapsed() < ttl {
            Known::Absent
        } else if d.stale_requests >= d.pages {
            Known::Relist
        } else {
            d.stale_requests += 2; // the lookup's HEAD and 1-key listing
            Known::Unknown
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    fn names(list: &[&str]) -> HashSet<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_listed_directory_answers_for_names_it_does_not_hold() {
        let mut c = CompleteDirs::new(TTL);
        let t = c.begin("d");
        c.listed("d", t, names(&["a", "b"]), 1);
        assert_eq!(c.known("d", "x"), Known::Absent);
        assert_eq!(c.known("d", "a"), Known::Unknown);
        assert_eq!(c.known("e", "x"), Known::Unknown);
    }

    #[test]
    fn a_name_linked_during_a_listing_keeps_the_listing_from_being_recorded() {
        let mut c = CompleteDirs::new(TTL);
        let t = c.begin("d");
        c.linked("d/new");
        c.listed("d", t, names(&["a"]), 1);
        assert_eq!(c.known("d", "new"), Known::Unknown);
        assert_eq!(c.known("d", "x"), Known::Unknown);
    }

    #[test]
    fn names_linked_and_removed_later_keep_the_record_true() {
        let mut c = CompleteDirs::new(TTL);
        c.made_empty("d");
        assert_eq!(c.known("d", "f"), Known::Absent);
        c.linked("d/f");
        assert_eq!(c.known("d", "f"), Known::Unknown);
        c.unlinked("d/f");
        assert_eq!(c.known("d", "f"), Known::Absent);
    }

    #[test]
    fn an_old_record_is_listed_again_once_lookups_have_cost_as_much_as_that() {
        let mut c = CompleteDirs::new(Duration::ZERO);
        let t = c.begin("small");
        c.listed("small", t, names(&[]), 1);
        let t = c.begin("big");
        c.listed("big", t, names(&[]), 10);
        // One page: the first miss asks (2 requests), the second lists (1).
        assert_eq!(c.known("small", "x"), Known::Unknown);
        assert_eq!(c.known("small", "y"), Known::Relist);
        // Ten pages: five misses ask first.
        for miss in 0..5 {
            assert_eq!(c.known("big", "x"), Known::Unknown, "miss {miss}");
        }
        assert_eq!(c.known("big", "x"), Known::Relist);
        let t = c.begin("big");
        c.listed("big", t, names(&[]), 10);
        assert_eq!(
            c.known("big", "x"),
            Known::Unknown,
            "a new listing starts the count again"
        );
    }

    #[test]
    fn removing_or_moving_a_directory_drops_its_records_and_those_below() {
        let mut c = CompleteDirs::new(TTL);
        c.made_empty("d");
        c.made_empty("d/sub");
        c.made_empty("dd");
        c.dropped("d");
        assert_eq!(c.known("d", "x"), Known::Unknown);
        assert_eq!(c.known("d/sub", "x"), Known::Unknown);
        assert_eq!(c.known("dd", "x"), Known::Absent);
        // A re-made directory starts afresh: an old ticket can't record into it.
        let t = c.begin("dd");
        c.dropped("dd");
        c.made_empty("dd");
        c.linked("dd/f");
        c.listed("dd", t, names(&[]), 1);
        assert_eq!(c.known("dd", "f"), Known::Unknown);
    }
}
