//! Directory listings: a whole, sorted listing of a directory from S3 merged with what this
//! mount knows (dirty files, directories made here, removals), the kernel's entries for it,
//! and what the mount shows while S3 can't be listed.

use super::*;

impl<S: ObjectStore> Namespace<S> {
    /// A listed object: what a HEAD of the same version said if the HEAD log holds it, else
    /// the listing's attributes (unverified: the kernel looks it up before using them).
    pub(super) fn seen_listed(&self, key: &str, meta: &ObjectMeta) -> Seen {
        match self.heads.as_ref().and_then(|h| h.answer(key, meta)) {
            Some(headed) => self.seen_object(&headed, true),
            None => self.seen_object(meta, false),
        }
    }

    /// Whether directory `ino` holds nothing, from a fresh, complete listing (never a partial
    /// answer): no entry, and no key left out because it can't be shown (such a key keeps the
    /// directory in S3, so `rmdir` must refuse it). Nothing is registered.
    pub async fn is_empty(&self, ino: u64) -> Result<bool, FsError> {
        let (entries, hidden) = self.list_entries(ino, false).await?;
        Ok(entries.is_empty() && !hidden)
    }

    /// A fresh, complete listing of directory `ino`, sorted by name, for showing it: while S3
    /// can't be reached, the entries the mount knows. Call [`Namespace::remember`] for each
    /// entry handed to the kernel.
    pub async fn list_for_readdir(&self, ino: u64) -> Result<Vec<Listed>, FsError> {
        Ok(self.list_entries(ino, true).await?.0)
    }

    /// Directory `ino`'s entries, sorted by name, and whether the listing held keys left out
    /// because they can't be shown. With `known_if_unavailable`, an unreachable S3 gives what
    /// the mount knows (if that is the whole directory) instead of an error.
    pub(super) async fn list_entries(
        &self,
        ino: u64,
        known_if_unavailable: bool,
    ) -> Result<(Vec<Listed>, bool), FsError> {
        let (dir, kind) = self.path_of(ino)?;
        if kind != NodeKind::Directory {
            return Err(FsError::NotDirectory);
        }
        let prefix = dir_key(&self.prefix, &dir);
        let asked = Instant::now();
        let mut entries: BTreeMap<String, Listed> = BTreeMap::new();
        // Dirty files first: one whose upload completes while S3 is being listed is then in
        // this snapshot or in the listing, never in neither.
        let dirty = self
            .dirty
            .as_ref()
            .map(|d| d.under(&prefix))
            .unwrap_or_default();
        // Taken before listing too: a key removed here stays hidden until its racing upload
        // has been deleted again, which happens after a listing that could have seen it.
        let gone = self
            .dirty
            .as_ref()
            .map(|d| d.gone_under(&prefix))
            .unwrap_or_default();
        let ticket = self.table().complete.begin(&dir);
        let mut token = None;
        let mut pages = 0u32;
        let mut from_known = false; // S3 unreachable: what the mount knows, not a count
        let mut hidden = false; // keys left out: they can't be shown
        loop {
            pages += 1;
            let page = match self.store.list_page(&prefix, token, None).await {
                Ok(page) => page,
                Err(e) if known_if_unavailable && e.is_unavailable() => {
                    // What the mount knows of the directory: entries the kernel holds, if
                    // they are all its last complete listing had. Else an error: a partial
                    // listing would tell `rsync --delete` or a cleanup script that the
                    // missing files are gone.
                    let known = self.known_children(&dir);
                    // Files written and directories made here are added below anyway.
                    let mut local: HashSet<String> = dirty
                        .keys()
                        .filter_map(|key| key.strip_prefix(prefix.as_str()))
                        .map(|rest| rest.split('/').next().unwrap_or(rest).to_owned())
                        .collect();
                    local.extend(self.made_in(&dir).into_iter().map(|(name, _)| name));
                    let whole = self.table().complete.last_names(&dir).is_some_and(|names| {
                        names
                            .iter()
                            .all(|n| known.contains_key(n) || local.contains(n))
                    });
                    if !whole {
                        return Err(FsError::store(&prefix, e));
                    }
                    outage_warning(&dir, &e);
                    entries = known;
                    from_known = true;
                    break;
                }
                Err(e) => return Err(FsError::store(&prefix, e)),
            };
            for sub in &page.prefixes {
                // A server that answers with keys outside the prefix is ignored, not trusted.
                let Some(name) = sub.strip_prefix(prefix.as_str()) else {
                    continue;
                };
                let name = name.trim_end_matches('/');
                if let Err(why) = check_listed(sub, name) {
                    self.skip_key(sub, why);
                    hidden = true;
                    continue;
                }
                if is_reserved(&dir, name) {
                    continue;
                }
                let seen = self.seen_directory();
                entries.insert(name.to_owned(), self.listed(&dir, name, seen));
            }
            for (key, meta) in &page.objects {
                let Some(name) = key.strip_prefix(prefix.as_str()) else {
                    continue;
                };
                if name.is_empty() {
                    continue; // this directory's own marker
                }
                if let Err(why) = check_listed(key, name) {
                    self.skip_key(key, why);
                    hidden = true;
                    continue;
                }
                if is_reserved(&dir, name) {
                    continue;
                }
                if entries.contains_key(name) || gone.contains(key) {
                    continue; // the directory of the same name wins; or removed here
                }
                let seen = self.seen_listed(key, meta);
                entries.insert(name.to_owned(), self.listed(&dir, name, seen));
            }
            token = page.next_token;
            if token.is_none() {
                break;
            }
        }
        for (name, attr) in self.made_in(&dir) {
            let listed = self.listed(&dir, &name, self.seen_marker(attr));
            entries.insert(name.clone(), listed);
        }
        {
            for (key, attr) in dirty {
                let Some(rest) = key.strip_prefix(prefix.as_str()) else {
                    continue;
                };
                match rest.split_once('/') {
                    // A dirty file deeper down makes its first directory visible.
                    Some((sub, _)) if check_component(sub).is_ok() => {
                        let seen = self.seen_directory();
                        entries
                            .entry(sub.to_owned())
                            .or_insert_with(|| self.listed(&dir, sub, seen));
                    }
                    Some(_) => hidden = true,
                    None => {
                        if entries
                            .get(rest)
                            .is_some_and(|e| e.attr.kind == NodeKind::Directory)
                        {
                            continue;
                        }
                        let seen = self.seen_dirty(&attr);
                        entries.insert(rest.to_owned(), self.listed(&dir, rest, seen));
                    }
                }
            }
        }
        if !from_known {
            let subdirs = entries
                .values()
                .filter(|e| e.attr.kind == NodeKind::Directory)
                .count();
            self.table()
                .listed_subdirs(&dir, u32::try_from(subdirs).unwrap_or(u32::MAX));
            let objects = entries
                .values()
                // Only these get lookups while the listing is fresh (see fs/listing.rs).
                .filter(|e| e.unverified())
                .map(|e| e.name.clone())
                .collect();
            self.statahead.listed(&dir, prefix.clone(), objects);
            let names = entries.keys().cloned().collect();
            self.table().complete.listed(&dir, ticket, names, pages);
        }
        let entries = entries
            .into_values()
            .map(|entry| Listed { asked, ..entry })
            .collect();
        Ok((entries, hidden))
    }

    /// The entries of directory `dir` the inode table holds, for a listing while S3 is down.
    pub(super) fn known_children(&self, dir: &str) -> BTreeMap<String, Listed> {
        let table = self.table();
        table
            .children(dir)
            .into_iter()
            .map(|node| {
                let name = node
                    .path
                    .rsplit('/')
                    .next()
                    .unwrap_or(&node.path)
                    .to_owned();
                let listed = Listed {
                    name: name.clone(),
                    attr: node.attr.clone(),
                    etag: node.etag.clone(),
                    from_head: node.from_head,
                    from_server: false,
                    asked: Instant::now(),
                };
                (name, listed)
            })
            .collect()
    }

    /// A listing entry; a live node of the same version lends it HEAD-only details (kind, mode).
    pub(super) fn listed(&self, dir: &str, name: &str, mut seen: Seen) -> Listed {
        let path = join(dir, name);
        let table = self.table();
        // Same version; or, from a server whose listings carry no ETag, HEADed within the TTL.
        if let Some(node) = table.find(&path)
            && node.from_head
            && (node.etag == seen.etag
                || version(&seen.etag).is_none() && node.validated_within(self.ttl))
            && (node.attr.kind == NodeKind::Directory) == (seen.attr.kind == NodeKind::Directory)
        {
            seen.attr = Attr {
                size: seen.attr.size,
                ..node.attr.clone()
            };
            seen.from_head = true;
        }
        seen.attr.ino = table.ino_for(&path, &seen);
        Listed {
            name: name.to_owned(),
            attr: seen.attr,
            etag: seen.etag,
            from_head: seen.from_head,
            from_server: seen.from_server,
            asked: Instant::now(),
        }
    }

    /// Registers a listing entry with the kernel (one reference); returns its attributes.
    pub fn remember(&self, dir_ino: u64, entry: &Listed) -> Result<Attr, FsError> {
        let (dir, _) = self.path_of(dir_ino)?;
        let seen = Seen {
            attr: entry.attr.clone(),
            etag: entry.etag.clone(),
            from_head: entry.from_head,
            from_server: entry.from_server,
        };
        Ok(self.remember_current(&join(&dir, &entry.name), seen, entry.asked))
    }
}
