//! Whole-tree operations for snapshots: the bucket's versioning, recursive listings of the
//! current versions, server-side copies of any size, and whole small objects. Only
//! [`crate::snapshot`] uses them, so they are inherent to [`S3Store`], not part of
//! [`super::ObjectStore`].

use std::collections::HashMap;
use std::time::SystemTime;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{BucketVersioningStatus, EncodingType};
use bytes::Bytes;

use super::keys::listed_key;
use super::s3::{
    S3Store, check_listing, classify, copy_source, next_token, to_system_time, written_etag,
};
use super::{ObjectStore, Precondition, StoreError};

/// The largest object one CopyObject may copy: 5 GiB
/// (<https://docs.aws.amazon.com/AmazonS3/latest/API/API_CopyObject.html>); larger ones are
/// copied in parts with UploadPartCopy.
pub const MAX_COPY_OBJECT: u64 = 5 << 30;

/// Part size of a multipart copy, grown to stay within S3's 10 000 parts.
const COPY_PART: u64 = 1 << 30;

/// One object of a recursive listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeObject {
    /// Full key.
    pub key: String,
    /// Bytes.
    pub size: u64,
    /// ETag as the server sent it (quotes included).
    pub etag: String,
    pub last_modified: SystemTime,
    /// The version listed, on a versioned bucket.
    pub version_id: Option<String>,
}

/// What a server-side copy reads.
#[derive(Debug, Clone, Copy)]
pub struct CopyFrom<'a> {
    /// The source's bucket (the store's own, or another on the same endpoint).
    pub bucket: &'a str,
    pub key: &'a str,
    /// A version of a versioned bucket; `None` for the current object.
    pub version: Option<&'a str>,
    /// The copy fails with [`StoreError::PreconditionFailed`] unless the source still has this
    /// ETag (`x-amz-copy-source-if-match`).
    pub etag: &'a str,
    /// The source's size in bytes (above [`MAX_COPY_OBJECT`] it is copied in parts).
    pub size: u64,
}

impl S3Store {
    /// Whether the bucket keeps versions (GetBucketVersioning says `Enabled`). A server that
    /// can't tell (no such API) counts as unversioned: snapshots then copy, which works on any
    /// bucket.
    pub async fn is_versioned(&self) -> Result<bool, StoreError> {
        let answer = self
            .client
            .get_bucket_versioning()
            .bucket(&self.bucket)
            .send()
            .await;
        // moto answers 200 with a `GetBucketVersioningResponse` root, which the SDK refuses
        // to parse: the status is then read from the body as sent.
        if let Err(e) = &answer
            && let Some(raw) = e.raw_response()
            && raw.status().is_success()
            && let Some(body) = raw.body().bytes()
        {
            let body = String::from_utf8_lossy(body);
            return Ok(body.contains("<Status>Enabled</Status>"));
        }
        match answer.map_err(|e| classify(e, &self.bucket)) {
            Ok(out) => Ok(out.status() == Some(&BucketVersioningStatus::Enabled)),
            Err(
                e @ (StoreError::Unreachable(_)
                | StoreError::Credentials(_)
                | StoreError::NoSuchBucket(_)),
            ) => Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "bucket versioning unknown; taken as unversioned");
                Ok(false)
            }
        }
    }

    /// Every object under `prefix` (no delimiter), in key order. With `versions`, the current
    /// version of each key from ListObjectVersions (keys whose latest entry is a delete marker
    /// are absent), with its version id. `progress` is told the count so far after each page.
    pub async fn list_tree(
        &self,
        prefix: &str,
        versions: bool,
        progress: &mut (dyn FnMut(usize) + Send),
    ) -> Result<Vec<TreeObject>, StoreError> {
        let mut objects = Vec::new();
        if versions {
            let (mut key_marker, mut version_marker) = (None, None);
            loop {
                let out = self
                    .client
                    .list_object_versions()
                    .bucket(&self.bucket)
                    .prefix(prefix)
                    .encoding_type(EncodingType::Url)
                    .set_key_marker(key_marker.take())
                    .set_version_id_marker(version_marker.take())
                    .send()
                    .await
                    .map_err(|e| classify(e, &self.bucket))?;
                check_listing(out.is_truncated(), None, 0)?;
                let encoded = self.decode_listed(out.encoding_type());
                for v in out.versions() {
                    if v.is_latest() != Some(true) {
                        continue;
                    }
                    let Some(key) = v.key().and_then(|k| listed_key(k, encoded)) else {
                        continue;
                    };
                    objects.push(TreeObject {
                        key,
                        size: v.size().unwrap_or(0).max(0) as u64,
                        etag: v.e_tag().unwrap_or_default().to_owned(),
                        last_modified: to_system_time(v.last_modified()),
                        version_id: v.version_id().map(str::to_owned),
                    });
                }
                progress(objects.len());
                if !out.is_truncated().unwrap_or(false) {
                    break;
                }
                // The marker goes back as a query parameter, which the SDK encodes itself.
                key_marker = out.next_key_marker().and_then(|k| listed_key(k, encoded));
                version_marker = out.next_version_id_marker().map(str::to_owned);
                if key_marker.is_none() {
                    return Err(StoreError::Other(
                        "ListObjectVersions: truncated without a next key marker".to_owned(),
                    ));
                }
            }
            objects.sort_by(|a, b| a.key.cmp(&b.key));
        } else {
            let mut token = None;
            loop {
                let out = self
                    .client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(prefix)
                    .encoding_type(EncodingType::Url)
                    .set_continuation_token(token.take())
                    .send()
                    .await
                    .map_err(|e| classify(e, &self.bucket))?;
                check_listing(out.is_truncated(), out.key_count(), out.contents().len())?;
                let encoded = self.decode_listed(out.encoding_type());
                for o in out.contents() {
                    let Some(key) = o.key().and_then(|k| listed_key(k, encoded)) else {
                        continue;
                    };
                    objects.push(TreeObject {
                        key,
                        size: o.size().unwrap_or(0).max(0) as u64,
                        etag: o.e_tag().unwrap_or_default().to_owned(),
                        last_modified: to_system_time(o.last_modified()),
                        version_id: None,
                    });
                }
                progress(objects.len());
                token = next_token(out.is_truncated(), out.next_continuation_token())?;
                if token.is_none() {
                    break;
                }
            }
        }
        // A server that answers with keys outside the prefix is not trusted.
        objects.retain(|o| o.key.starts_with(prefix));
        Ok(objects)
    }

    /// Copies `from` to `to` on the server (nothing downloaded), user metadata included.
    /// Returns the copy's ETag. Sources above [`MAX_COPY_OBJECT`] go in parts.
    pub async fn copy_from(&self, from: &CopyFrom<'_>, to: &str) -> Result<String, StoreError> {
        if from.size > MAX_COPY_OBJECT {
            return self.copy_in_parts(from, to, COPY_PART).await;
        }
        let _held = self.hold().await?;
        let out = self
            .client
            .copy_object()
            .bucket(&self.bucket)
            .key(to)
            .copy_source(copy_source(from.bucket, from.key, from.version))
            .copy_source_if_match(from.etag)
            .customize()
            .config_override(self.transfer_timeouts())
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))?;
        written_etag(
            out.copy_object_result().and_then(|r| r.e_tag()),
            "CopyObject",
        )
    }

    /// A multipart copy of `from` to `to` in parts of at least `part_size` bytes (5 MiB at
    /// least, grown to stay within 10 000 parts), with the source's user metadata. What
    /// [`S3Store::copy_from`] does above 5 GiB; public so that tests can run it on small
    /// objects.
    pub async fn copy_in_parts(
        &self,
        from: &CopyFrom<'_>,
        to: &str,
        part_size: u64,
    ) -> Result<String, StoreError> {
        // UploadPartCopy does not carry metadata: the upload starts with the source's.
        let metadata: HashMap<String, String> = self
            .client
            .head_object()
            .bucket(from.bucket)
            .key(from.key)
            .set_version_id(from.version.map(str::to_owned))
            .if_match(from.etag)
            .send()
            .await
            .map_err(|e| classify(e, from.bucket))?
            .metadata()
            .cloned()
            .unwrap_or_default();
        let upload_id = self.create_multipart(to, &metadata).await?;
        let part_size = crate::write::upload::part_size_for(from.size, part_size);
        let parts = match self.copy_parts(from, to, &upload_id, part_size).await {
            Ok(parts) => parts,
            Err(e) => {
                let _ = self.abort_multipart(to, &upload_id).await;
                return Err(e);
            }
        };
        self.complete_multipart(to, &upload_id, parts, &Precondition::None)
            .await
    }

    async fn copy_parts(
        &self,
        from: &CopyFrom<'_>,
        to: &str,
        upload_id: &str,
        part_size: u64,
    ) -> Result<Vec<(i32, String)>, StoreError> {
        let mut parts = Vec::new();
        let mut start = 0;
        let mut number = 1;
        while start < from.size || (from.size == 0 && number == 1) {
            let end = (start + part_size).min(from.size);
            let mut req = self
                .client
                .upload_part_copy()
                .bucket(&self.bucket)
                .key(to)
                .upload_id(upload_id)
                .part_number(number)
                .copy_source(copy_source(from.bucket, from.key, from.version))
                .copy_source_if_match(from.etag);
            if end > start {
                req = req.copy_source_range(format!("bytes={start}-{}", end - 1));
            }
            let out = req
                .customize()
                .config_override(self.transfer_timeouts())
                .send()
                .await
                .map_err(|e| classify(e, &self.bucket))?;
            let etag = written_etag(
                out.copy_part_result().and_then(|r| r.e_tag()),
                "UploadPartCopy",
            )?;
            parts.push((number, etag));
            number += 1;
            start = end;
            if from.size == 0 {
                break;
            }
        }
        Ok(parts)
    }

    /// The whole object `key` (a snapshot's manifest), at most `limit` bytes.
    pub async fn get_whole(&self, key: &str, limit: u64) -> Result<Bytes, StoreError> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))?;
        if out.content_length().unwrap_or(0).max(0) as u64 > limit {
            return Err(StoreError::Other(format!(
                "{key} is larger than {limit} bytes"
            )));
        }
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| StoreError::Other(format!("reading {key}: {e}")))?;
        Ok(body.into_bytes())
    }

    /// PutObject of `body` at `key`, unconditionally (a snapshot's manifest).
    pub async fn put_whole(&self, key: &str, body: Bytes) -> Result<(), StoreError> {
        let _held = self.hold().await?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/json")
            .body(ByteStream::from(body))
            .customize()
            .config_override(self.transfer_timeouts())
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))?;
        Ok(())
    }
}
