//! A snapshot served read-only (`keepfs mount --snapshot NAME`): listings and attributes come
//! from the manifest, bytes from the versions or copies it names.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::Manifest;
use super::manifest::from_unix_ms;
use crate::store::{ListPage, ObjectMeta, S3Store, StoreError};

/// Page size of a listing when the caller asks none (ListObjectsV2's default).
const PAGE: usize = 1000;

/// See the module documentation.
#[derive(Debug)]
pub struct SnapshotView {
    manifest: Manifest,
    /// Full key → index into the manifest's entries.
    keys: BTreeMap<String, usize>,
    prefix: String,
    bucket: String,
}

impl SnapshotView {
    /// The view of `manifest`, a snapshot of `prefix` in `bucket`.
    pub fn new(manifest: Manifest, bucket: &str, prefix: &str) -> Self {
        let keys = manifest
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (format!("{prefix}{}", e.key), i))
            .collect();
        SnapshotView {
            manifest,
            keys,
            prefix: prefix.to_owned(),
            bucket: bucket.to_owned(),
        }
    }

    /// A `/`-delimited listing of `prefix`, as ListObjectsV2 would give it of the bucket at the
    /// snapshot; the continuation token is the last key or common prefix returned.
    pub fn list_page(
        &self,
        prefix: &str,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> ListPage {
        let max = max_keys
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0)
            .unwrap_or(PAGE);
        let mut page = ListPage::default();
        let mut last: Option<String> = None;
        let start = token.clone().unwrap_or_else(|| prefix.to_owned());
        for (key, &i) in self.keys.range(start..) {
            if !key.starts_with(prefix) {
                break;
            }
            let rest = &key[prefix.len()..];
            let (item, is_prefix) = match rest.find('/') {
                Some(slash) => (format!("{prefix}{}", &rest[..=slash]), true),
                None => (key.clone(), false),
            };
            // Past the token (a common prefix covers every key under it).
            if token.as_deref().is_some_and(|t| item.as_str() <= t) {
                continue;
            }
            if last.as_deref() == Some(item.as_str()) {
                continue;
            }
            if page.objects.len() + page.prefixes.len() == max {
                page.next_token = last;
                return page;
            }
            if !is_prefix {
                let e = &self.manifest.entries[i];
                page.objects
                    .push((key.clone(), self.meta(e, Default::default())));
            } else {
                page.prefixes.push(item.clone());
            }
            last = Some(item);
        }
        page
    }

    fn meta(
        &self,
        e: &super::Entry,
        user_metadata: std::collections::HashMap<String, String>,
    ) -> ObjectMeta {
        ObjectMeta {
            size: e.size,
            etag: e.etag.clone(),
            last_modified: from_unix_ms(e.modified_unix_ms),
            user_metadata,
        }
    }

    fn entry(&self, key: &str) -> Result<&super::Entry, StoreError> {
        self.keys
            .get(key)
            .map(|&i| &self.manifest.entries[i])
            .ok_or(StoreError::NotFound)
    }

    /// HEAD of `key` at the snapshot: size and ETag from the manifest, user metadata (mode,
    /// owner, times, link targets) from the version or copy.
    pub async fn head(&self, store: &S3Store, key: &str) -> Result<ObjectMeta, StoreError> {
        let e = self.entry(key)?;
        let copy_key = self.manifest.copy_key(&self.prefix, e);
        let from = e.source(&self.bucket, key, &copy_key);
        let meta = store.head_at(from.key, from.version).await?;
        Ok(self.meta(e, meta.user_metadata))
    }

    /// Bytes `start..end` of `key` at the snapshot.
    pub async fn get_range(
        &self,
        store: &S3Store,
        key: &str,
        etag: &str,
        start: u64,
        end: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> Result<(), StoreError> {
        let e = self.entry(key)?;
        if e.etag != etag {
            return Err(StoreError::PreconditionFailed);
        }
        let copy_key = self.manifest.copy_key(&self.prefix, e);
        let from = e.source(&self.bucket, key, &copy_key);
        store
            .get_at(from.key, from.version, from.etag, start, end, sink)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Entry;

    fn view(keys: &[&str]) -> SnapshotView {
        let entries = keys
            .iter()
            .map(|k| Entry {
                key: (*k).to_owned(),
                size: 1,
                etag: "\"e\"".into(),
                modified_unix_ms: 0,
                version_id: None,
                copy_etag: Some("\"e\"".into()),
            })
            .collect();
        let manifest = Manifest {
            format: 1,
            name: "n".into(),
            source: "s3://b/p/".into(),
            taken_unix_ms: 0,
            versioned: false,
            barrier_ms: 0,
            bytes: 0,
            entries,
        };
        SnapshotView::new(manifest, "b", "p/")
    }

    fn names(page: &ListPage) -> (Vec<String>, Vec<String>) {
        (
            page.objects.iter().map(|(k, _)| k.clone()).collect(),
            page.prefixes.clone(),
        )
    }

    #[test]
    fn lists_like_a_delimited_listing() {
        let v = view(&["a.txt", "d/", "d/x", "d/y/z", "e/f", "z"]);
        let page = v.list_page("p/", None, None);
        assert_eq!(
            names(&page),
            (
                vec!["p/a.txt".to_owned(), "p/z".to_owned()],
                vec!["p/d/".to_owned(), "p/e/".to_owned()]
            )
        );
        assert!(page.next_token.is_none());
        let page = v.list_page("p/d/", None, None);
        assert_eq!(
            names(&page),
            (
                vec!["p/d/".to_owned(), "p/d/x".to_owned()],
                vec!["p/d/y/".to_owned()]
            )
        );
        assert!(v.list_page("p/q/", None, None).objects.is_empty());
    }

    #[test]
    fn markers_become_prefixes() {
        let v = view(&["a/", "a/b/", "a/link", "a/one.bin", "empty/", "small.txt"]);
        let page = v.list_page("p/", None, Some(1000));
        assert_eq!(
            names(&page),
            (
                vec!["p/small.txt".to_owned()],
                vec!["p/a/".to_owned(), "p/empty/".to_owned()]
            )
        );
        assert!(page.next_token.is_none());
    }

    #[test]
    fn pages_cover_everything_once() {
        let keys: Vec<String> = (0..25)
            .flat_map(|i| {
                [
                    format!("f{i:02}"),
                    format!("d{i:02}/a"),
                    format!("d{i:02}/b"),
                ]
            })
            .collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let v = view(&refs);
        let (mut objects, mut prefixes, mut token) = (Vec::new(), Vec::new(), None);
        loop {
            let page = v.list_page("p/", token, Some(7));
            assert!(page.objects.len() + page.prefixes.len() <= 7);
            let (o, p) = names(&page);
            objects.extend(o);
            prefixes.extend(p);
            token = page.next_token;
            if token.is_none() {
                break;
            }
        }
        assert_eq!(objects.len(), 25);
        assert_eq!(prefixes.len(), 25);
        let unique: std::collections::HashSet<_> = prefixes.iter().collect();
        assert_eq!(unique.len(), 25);
    }
}
