//! The inode table: numbers for files and directories, the names linked to them, and the
//! kernel's lookup counts.
//!
//! An inode is one version of one file, not a path. A name is a link to the inode that holds it
//! now (`by_path`); `rename` moves the link, `unlink` removes it, and the inode lives on while
//! the kernel holds references (open descriptors keep the kernel's reference). A remote object
//! seen with a new ETag is a new inode, so the kernel never mixes the page cache of two
//! versions, and a replaced or unlinked inode is never handed out again for its old name.
//!
//! Numbers are a hash of the path, the kind and the version (ETag), probing past every live
//! inode: the same object gets the same number again after the kernel forgot it, and a number
//! is never shared by two live inodes. Entries exist only while the kernel holds a reference
//! (lookup count > 0), which bounds memory by what the kernel caches, not by the bucket's size.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, Instant, SystemTime};

use super::attr::{Attr, NodeKind};
use super::complete::CompleteDirs;

pub const ROOT_INO: u64 = 1;

/// One path the kernel knows about.
#[derive(Debug, Clone)]
pub struct Node {
    /// Path relative to the mount root (`""` for the root).
    pub path: String,
    pub attr: Attr,
    /// ETag of the object this node was last seen as (files and symlinks).
    pub etag: Option<String>,
    /// Whether `attr` came from HEAD (user metadata applied) rather than a listing.
    pub from_head: bool,
    /// When `attr` was last confirmed with the server; `None` when it came from a local copy
    /// and must be checked with the server once that copy is gone.
    pub validated: Option<Instant>,
    /// ETag the last `open` saw; the kernel page cache is kept while it is unchanged.
    pub opened_etag: Option<String>,
    /// Written (or renamed) by this mount: the versions S3 shows of it next are this mount's
    /// own uploads, so a new ETag is the same inode.
    pub written_here: bool,
    lookups: u64,
}

impl Node {
    /// Whether the server confirmed `attr` less than `ttl` ago.
    pub fn validated_within(&self, ttl: Duration) -> bool {
        self.validated.is_some_and(|t| t.elapsed() < ttl)
    }
}

/// What the server said about a path, to be recorded in the table.
#[derive(Debug, Clone)]
pub struct Seen {
    pub attr: Attr,
    pub etag: Option<String>,
    pub from_head: bool,
    /// False for attributes of a local (dirty) copy: not a confirmation from the server.
    pub from_server: bool,
}

#[derive(Debug)]
pub struct InodeTable {
    /// Boxed: a slot of the table is then 16 bytes, not 200, so the slack of a table grown for a
    /// large directory (up to half its slots) costs little.
    nodes: HashMap<u64, Box<Node>>,
    by_path: HashMap<String, u64>,
    /// When entries were last added to or removed from each directory this mount changed:
    /// its mtime and ctime (kept in memory, see [`InodeTable::touch_dir`]).
    dir_changes: HashMap<String, SystemTime>,
    /// How many subdirectories each directory has, where known: counted at its last full
    /// listing or since this mount made it, then kept up by mkdir, rmdir and rename. Gives a
    /// directory's link count (see [`InodeTable::nlink`]).
    subdirs: HashMap<String, u32>,
    /// Directories known in full, kept up as names are linked and unlinked here.
    pub complete: CompleteDirs,
}

/// Gives a map's memory back once three quarters of its slots are empty (hash tables never
/// shrink on their own): after the kernel forgets the inodes of a large directory, their table
/// would otherwise stay as large as at its peak. Halving at a quarter full keeps the cost of
/// the rehash amortised over the removals that led to it.
fn shrink_if_sparse<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 1024 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

/// The directory holding `path` ("" for the root's entries).
fn parent_path(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(p, _)| p)
}

fn hashed_ino(path: &str, kind: NodeKind, etag: Option<&str>) -> u64 {
    let mut h = DefaultHasher::new();
    path.hash(&mut h);
    kind.hash(&mut h);
    etag.hash(&mut h);
    h.finish()
}

/// The version an ETag names, for identity: empty ETags (some servers' listings) say nothing.
pub fn version(etag: &Option<String>) -> Option<&str> {
    etag.as_deref().filter(|e| !e.is_empty())
}

/// Whether `seen` describes the same inode as live node `node` linked at the same path: same
/// kind, and no other version of the object. A node written on this mount (no ETag: a local
/// copy) takes the first version the server shows as its own (its upload).
fn same_inode(node: &Node, seen: &Seen) -> bool {
    if node.attr.kind != seen.attr.kind {
        return false;
    }
    if node.attr.kind == NodeKind::Directory || !seen.from_server || node.written_here {
        return true;
    }
    match (version(&node.etag), version(&seen.etag)) {
        (Some(known), Some(now)) => known == now,
        _ => true,
    }
}

impl InodeTable {
    /// `ttl`: how long a directory listed in full answers for names it lacks.
    pub fn new(root: Attr, ttl: Duration) -> Self {
        let root = Node {
            path: String::new(),
            attr: Attr {
                ino: ROOT_INO,
                ..root
            },
            etag: None,
            from_head: true,
            validated: Some(Instant::now()),
            opened_etag: None,
            written_here: false,
            // The kernel never forgets the root.
            lookups: 1,
        };
        Self {
            nodes: HashMap::from([(ROOT_INO, Box::new(root))]),
            by_path: HashMap::from([(String::new(), ROOT_INO)]),
            dir_changes: HashMap::new(),
            subdirs: HashMap::new(),
            complete: CompleteDirs::new(ttl),
        }
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(&ino).map(|n| &**n)
    }

    pub fn get_mut(&mut self, ino: u64) -> Option<&mut Node> {
        self.nodes.get_mut(&ino).map(|n| &mut **n)
    }

    /// The live node linked at `path`, if the kernel holds one.
    pub fn find(&self, path: &str) -> Option<&Node> {
        self.by_path.get(path).and_then(|ino| self.get(*ino))
    }

    /// Whether `ino` is still linked at its path (not unlinked, replaced or renamed over).
    pub fn is_linked(&self, ino: u64) -> bool {
        self.nodes
            .get(&ino)
            .is_some_and(|n| self.by_path.get(&n.path) == Some(&ino))
    }

    /// A number no live inode has, derived from the path, kind and version.
    fn free_ino(&self, path: &str, kind: NodeKind, etag: Option<&str>) -> u64 {
        let mut ino = hashed_ino(path, kind, etag);
        while ino <= ROOT_INO || self.nodes.contains_key(&ino) {
            ino = ino.wrapping_add(1);
        }
        ino
    }

    /// The number `seen` at `path` has or would get (without registering it).
    pub fn ino_for(&self, path: &str, seen: &Seen) -> u64 {
        match self.by_path.get(path).and_then(|ino| self.nodes.get(ino)) {
            Some(node) if same_inode(node, seen) => node.attr.ino,
            _ => self.free_ino(path, seen.attr.kind, version(&seen.etag)),
        }
    }

    /// Records `seen` for `path`, adds one kernel reference, and returns the attributes with the
    /// inode number filled in. A different version or kind than the inode linked there now is a
    /// new inode; the old one is unlinked and lives on for the kernel's references. Listing data
    /// never overwrites HEAD metadata of the same version.
    pub fn remember(&mut self, path: &str, seen: Seen) -> Attr {
        let linked = self.by_path.get(path).copied();
        let reuse = linked.filter(|ino| self.nodes.get(ino).is_some_and(|n| same_inode(n, &seen)));
        let ino = match reuse {
            Some(ino) => ino,
            None => {
                let ino = self.free_ino(path, seen.attr.kind, version(&seen.etag));
                self.nodes.insert(
                    ino,
                    Box::new(Node {
                        path: path.to_owned(),
                        attr: seen.attr.clone(),
                        etag: None,
                        from_head: false,
                        validated: None,
                        opened_etag: None,
                        written_here: false,
                        lookups: 0,
                    }),
                );
                self.by_path.insert(path.to_owned(), ino);
                self.complete.linked(path);
                ino
            }
        };
        let now = Instant::now();
        let node = self.nodes.get_mut(&ino).expect("node present");
        let keep_head_metadata = node.from_head
            && !seen.from_head
            && (node.etag == seen.etag || version(&seen.etag).is_none());
        if keep_head_metadata {
            node.attr.size = seen.attr.size;
        } else {
            node.attr = seen.attr;
            node.from_head = seen.from_head;
        }
        node.attr.ino = ino;
        if node.attr.kind == NodeKind::Directory
            && let Some(changed) = self.dir_changes.get(path)
            && *changed > node.attr.mtime
        {
            node.attr.mtime = *changed;
            node.attr.ctime = *changed;
        }
        if seen.from_server {
            if version(&seen.etag).is_some() {
                node.etag = seen.etag;
            }
        } else {
            node.written_here = true; // a local copy: its uploads are this inode's versions
        }
        node.validated = seen.from_server.then_some(now);
        node.lookups += 1;
        node.attr.clone()
    }

    /// Records that an entry was added to or removed from directory `path` at `when`: its
    /// mtime and ctime from now on, for as long as the mount lives. Not persisted: directories
    /// have no object of their own to hold it (a marker rewrite per create would double the
    /// requests of small-file workloads), so after a restart they show their marker's or the
    /// mount's time again.
    pub fn touch_dir(&mut self, path: &str, when: SystemTime) {
        self.dir_changes.insert(path.to_owned(), when);
        if let Some(ino) = self.by_path.get(path)
            && let Some(node) = self.nodes.get_mut(ino)
        {
            node.attr.mtime = when;
            node.attr.ctime = when;
        }
    }

    /// Drops the in-memory change time of directory `path`: times set explicitly (utimensat,
    /// kept in its marker) replace it, even when they lie before the last change.
    pub fn clear_dir_change(&mut self, path: &str) {
        self.dir_changes.remove(path);
    }

    /// Link count of `ino` as stat(2) shows it: a directory has 2 (its entry and its own `.`)
    /// plus one per subdirectory (their `..`) where the number is known, else 2; a file 1, or
    /// 0 once no name links to it (unlinked or renamed over while open).
    pub fn nlink(&self, ino: u64) -> u32 {
        match self.nodes.get(&ino) {
            Some(node) if node.attr.kind == NodeKind::Directory => {
                2 + self.subdirs.get(&node.path).copied().unwrap_or(0)
            }
            Some(_) if !self.is_linked(ino) => 0,
            _ => 1,
        }
    }

    /// Directory `path` was listed in full and holds `count` subdirectories.
    pub fn listed_subdirs(&mut self, path: &str, count: u32) {
        self.subdirs.insert(path.to_owned(), count);
    }

    /// Directory `path` was made (empty) or removed by this mount: its parent's count follows.
    pub fn dir_made(&mut self, path: &str, made: bool) {
        if made {
            self.subdirs.insert(path.to_owned(), 0);
            self.complete.made_empty(path);
        } else {
            self.subdirs.remove(path);
            self.complete.dropped(path);
        }
        self.count_subdir(parent_path(path), made);
    }

    /// One subdirectory more (`added`) or less in directory `parent`, if its count is known.
    fn count_subdir(&mut self, parent: &str, added: bool) {
        if let Some(count) = self.subdirs.get_mut(parent) {
            *count = if added {
                count.saturating_add(1)
            } else {
                count.saturating_sub(1)
            };
        }
    }

    /// Adds one kernel reference to an existing node.
    pub fn add_lookup(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups += 1;
        }
    }

    /// Detaches `ino` from its path (unlinked): lookups of the path no longer find it, while
    /// the kernel's references stay counted until it forgets them.
    pub fn unlink(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            if self.by_path.get(&node.path) == Some(&ino) {
                self.by_path.remove(&node.path);
                self.complete.unlinked(&node.path);
            }
            node.validated = None;
        }
    }

    /// Moves live node `ino` to `path` (rename): the kernel keeps using the same inode.
    pub fn rename(&mut self, ino: u64, path: &str) {
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        if self.by_path.get(&node.path) == Some(&ino) {
            self.by_path.remove(&node.path);
            self.complete.unlinked(&node.path);
        }
        node.path = path.to_owned();
        node.validated = None;
        // Moved by this mount (a copy in S3 may have another ETag): the versions found at the
        // new name are this inode's.
        node.written_here = true;
        self.by_path.insert(path.to_owned(), ino);
        self.complete.linked(path);
    }

    /// Moves every node at or below path `from` to the same place below `to` (directory
    /// rename).
    pub fn rename_subtree(&mut self, from: &str, to: &str) {
        let below = format!("{from}/");
        let moved: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.path == from || n.path.starts_with(&below))
            .map(|(ino, _)| *ino)
            .collect();
        for ino in moved {
            let path = {
                let node = &self.nodes[&ino];
                format!("{to}{}", &node.path[from.len()..])
            };
            self.rename(ino, &path);
        }
        // Counts and change times of the moved directories move with them.
        let moved: Vec<String> = self
            .subdirs
            .keys()
            .chain(self.dir_changes.keys())
            .filter(|p| *p == from || p.starts_with(&below))
            .cloned()
            .collect();
        for old in moved {
            let new = format!("{to}{}", &old[from.len()..]);
            if let Some(count) = self.subdirs.remove(&old) {
                self.subdirs.insert(new.clone(), count);
            }
            if let Some(when) = self.dir_changes.remove(&old) {
                self.dir_changes.insert(new, when);
            }
        }
        // What was known of the moved directories' contents is not kept at either path.
        self.complete.dropped(from);
        self.complete.dropped(to);
        self.count_subdir(parent_path(from), false);
        self.count_subdir(parent_path(to), true);
    }

    /// The nodes directly inside directory `dir` (a scan: only for when S3 can't be listed).
    pub fn children(&self, dir: &str) -> Vec<&Node> {
        self.nodes
            .values()
            .map(|n| &**n)
            .filter(|n| {
                !n.path.is_empty()
                    && parent_path(&n.path) == dir
                    && self.by_path.get(&n.path) == Some(&n.attr.ino)
            })
            .collect()
    }

    /// Drops `n` kernel references; the node goes away when none remain (returns true then).
    pub fn forget(&mut self, ino: u64, n: u64) -> bool {
        if ino == ROOT_INO {
            return false;
        }
        let Some(node) = self.nodes.get_mut(&ino) else {
            return false;
        };
        node.lookups = node.lookups.saturating_sub(n);
        if node.lookups == 0 {
            let node = self.nodes.remove(&ino).expect("node present");
            if self.by_path.get(&node.path) == Some(&ino) {
                self.by_path.remove(&node.path);
            }
            shrink_if_sparse(&mut self.nodes);
            shrink_if_sparse(&mut self.by_path);
            return true;
        }
        false
    }

    /// Number of live nodes (root included).
    #[cfg(test)]
    pub fn live_count(&self) -> usize {
        self.nodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: NodeKind, size: u64, perm: u16) -> Attr {
        Attr {
            ino: 0,
            kind,
            size,
            mtime: SystemTime::UNIX_EPOCH,
            atime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            perm,
            uid: 0,
            gid: 0,
        }
    }

    fn seen(kind: NodeKind, etag: &str, from_head: bool, perm: u16) -> Seen {
        Seen {
            attr: attr(kind, 1, perm),
            etag: Some(etag.into()),
            from_head,
            from_server: true,
        }
    }

    #[test]
    fn tables_give_memory_back_once_the_kernel_forgets() {
        let mut t = InodeTable::new(attr(NodeKind::Directory, 0, 0o755), Duration::from_secs(1));
        let inos: Vec<u64> = (0..20_000)
            .map(|i| {
                let e = format!("e{i}");
                t.remember(&format!("big/f{i}"), seen(NodeKind::File, &e, false, 0o644))
                    .ino
            })
            .collect();
        assert!(t.nodes.capacity() >= 20_000 && t.by_path.capacity() >= 20_000);
        // The kernel forgets all but a few: what is left is still found.
        for ino in &inos[10..] {
            assert!(t.forget(*ino, 1));
        }
        assert_eq!(t.live_count(), 11);
        assert!(t.nodes.capacity() <= 1024, "{}", t.nodes.capacity());
        assert!(t.by_path.capacity() <= 1024, "{}", t.by_path.capacity());
        for (i, ino) in inos[..10].iter().enumerate() {
            assert_eq!(t.find(&format!("big/f{i}")).map(|n| n.attr.ino), Some(*ino));
        }
    }

    #[test]
    fn numbers_are_stable_across_forget() {
        let mut t = InodeTable::new(attr(NodeKind::Directory, 0, 0o755), Duration::from_secs(1));
        let a = t
            .remember("a/b", seen(NodeKind::File, "e1", true, 0o600))
            .ino;
        assert!(a > ROOT_INO);
        assert_eq!(
            t.remember("a/b", seen(NodeKind::File, "e1", true, 0o600))
                .ino,
            a
        );
        t.forget(a, 1);
        assert!(t.get(a).is_some(), "one reference left");
        t.forget(a, 1);
        assert!(t.get(a).is_none() && t.find("a/b").is_none());
        assert_eq!(t.live_count(), 1);
        assert_eq!(
            t.remember("a/b", seen(NodeKind::File, "e1", true, 0o600))
                .ino,
            a
        );
        // Another kind at the same path is another inode.
        let d = t
            .remember("a/b", seen(NodeKind::Directory, "e1", true, 0o700))
            .ino;
        assert_ne!(d, a);
        assert_eq!(t.find("a/b").map(|n| n.attr.ino), Some(d));
        t.forget(a, 1);
        assert_eq!(
            t.find("a/b").map(|n| n.attr.ino),
            Some(d),
            "old inode's forget keeps new"
        );
    }

    #[test]
    fn a_new_version_is_a_new_inode_and_the_old_one_lives_on_unlinked() {
        let mut t = InodeTable::new(attr(NodeKind::Directory, 0, 0o755), Duration::from_secs(1));
        let v1 = t.remember("f", seen(NodeKind::File, "e1", true, 0o644)).ino;
        let v2 = t.remember("f", seen(NodeKind::File, "e2", true, 0o644)).ino;
        assert_ne!(v1, v2, "another ETag is another inode");
        assert!(
            t.get(v1).is_some() && !t.is_linked(v1),
            "old inode kept, unlinked"
        );
        assert!(t.is_linked(v2));
        // The old version is never handed out again for the name.
        assert_eq!(
            t.remember("f", seen(NodeKind::File, "e2", false, 0o644))
                .ino,
            v2
        );
        // A file written here (no ETag) takes the version its upload produces.
        let local = Seen {
            attr: attr(NodeKind::File, 5, 0o600),
            etag: None,
            from_head: true,
            from_server: false,
        };
        let w = t.remember("g", local).ino;
        assert_eq!(
            t.remember("g", seen(NodeKind::File, "up", true, 0o600)).ino,
            w
        );
        assert_eq!(
            t.remember("g", seen(NodeKind::File, "up2", true, 0o600))
                .ino,
            w,
            "its later uploads too"
        );
        // Renamed: the inode moves, what was linked at the target is unlinked.
        let a = t.remember("a", seen(NodeKind::File, "ea", true, 0o644)).ino;
        let b = t.remember("b", seen(NodeKind::File, "eb", true, 0o644)).ino;
        t.rename(a, "b");
        assert!(t.is_linked(a) && !t.is_linked(b));
        assert_eq!(t.find("b").map(|n| n.attr.ino), Some(a));
        assert!(t.find("a").is_none());
        // Forgetting the unlinked inode leaves the linked one alone.
        assert!(t.forget(b, 1));
        assert_eq!(t.find("b").map(|n| n.attr.ino), Some(a));
    }

    #[test]
    fn root_is_never_forgotten() {
        let mut t = InodeTable::new(attr(NodeKind::Directory, 0, 0o755), Duration::from_secs(1));
        t.forget(ROOT_INO, 100);
        assert!(t.get(ROOT_INO).is_some());
    }

    #[test]
    fn listing_keeps_head_metadata_of_same_version() {
        let mut t = InodeTable::new(attr(NodeKind::Directory, 0, 0o755), Duration::from_secs(1));
        t.remember("f", seen(NodeKind::Symlink, "e1", true, 0o777));
        let listed = t.remember("f", seen(NodeKind::Symlink, "e1", false, 0o644));
        assert_eq!(listed.perm, 0o777);
        let changed = t.remember("f", seen(NodeKind::Symlink, "e2", false, 0o644));
        assert_eq!(changed.perm, 0o644);
    }

    #[test]
    fn directory_link_counts_follow_mkdir_rmdir_and_rename() {
        let mut t = InodeTable::new(attr(NodeKind::Directory, 0, 0o755), Duration::from_secs(1));
        let dir = |t: &mut InodeTable, path: &str| {
            t.remember(path, seen(NodeKind::Directory, "", true, 0o755))
                .ino
        };
        let unknown = dir(&mut t, "old");
        assert_eq!(t.nlink(unknown), 2, "never listed: no count known");
        t.listed_subdirs("old", 3);
        assert_eq!(t.nlink(unknown), 5);
        // mkdir a, a/x, b; then a/x moves to b.
        t.dir_made("a", true);
        t.dir_made("b", true);
        let (a, b) = (dir(&mut t, "a"), dir(&mut t, "b"));
        t.dir_made("a/x", true);
        let x = dir(&mut t, "a/x");
        assert_eq!((t.nlink(a), t.nlink(b), t.nlink(x)), (3, 2, 2));
        t.dir_made("a/x/y", true);
        t.rename_subtree("a/x", "b/x");
        assert_eq!((t.nlink(a), t.nlink(b), t.nlink(x)), (2, 3, 3));
        t.dir_made("b/x/y", false);
        assert_eq!(t.nlink(x), 2);
        let file = t
            .remember("b/f", seen(NodeKind::File, "e1", true, 0o644))
            .ino;
        assert_eq!(t.nlink(file), 1);
        t.unlink(file);
        assert_eq!(t.nlink(file), 0, "unlinked while the kernel holds it");
    }
}
