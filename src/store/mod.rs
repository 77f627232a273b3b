//! The storage boundary: the handful of S3 operations keepfs needs, behind one trait.
//!
//! Everything above this module (namespace, prefetch, fs) talks to [`ObjectStore`] and never to
//! the SDK, so the contract of each method is written down here. The only production
//! implementation is [`S3Store`] on `aws-sdk-s3`; tests run it against real servers.

mod keys;
pub mod probe;
mod s3;
mod tree;
mod whole;

use std::collections::HashMap;
use std::future::Future;
use std::time::SystemTime;

use bytes::Bytes;

pub use s3::{DEFAULT_REQUEST_TIMEOUT, S3Store, S3StoreConfig, TRANSFER_TIMEOUT_FACTOR};
pub use tree::{CopyFrom, MAX_COPY_OBJECT, TreeObject};

/// What HEAD (or a listing) tells about one object version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Content length in bytes.
    pub size: u64,
    /// Entity tag as the server sent it (quotes included); identifies this version.
    pub etag: String,
    /// Server-side modification time.
    pub last_modified: SystemTime,
    /// User metadata (`x-amz-meta-*`), names lower-cased without the prefix.
    /// Empty when it came from a listing, which does not carry user metadata.
    pub user_metadata: HashMap<String, String>,
}

/// One page of a delimited listing.
#[derive(Debug, Default, Clone)]
pub struct ListPage {
    /// Objects directly under the prefix: full key and metadata (no user metadata).
    pub objects: Vec<(String, ObjectMeta)>,
    /// Common prefixes ("subdirectories"), full prefix including the trailing delimiter.
    pub prefixes: Vec<String>,
    /// Token for the next page, `None` on the last page.
    pub next_token: Option<String>,
}

/// Errors from the store, classified by what the caller can do about them.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The key (or bucket, see [`StoreError::NoSuchBucket`]) does not exist.
    #[error("not found")]
    NotFound,
    /// The bucket does not exist.
    #[error("bucket {0:?} does not exist")]
    NoSuchBucket(String),
    /// A conditional request failed: the object is no longer the version asked for.
    #[error("object changed on the server (precondition failed)")]
    PreconditionFailed,
    /// Credentials were rejected or lack permission.
    #[error("access denied: {0}")]
    AccessDenied(String),
    /// The bucket lives in another region than the one configured.
    #[error("wrong region: {0}")]
    WrongRegion(String),
    /// The endpoint could not be reached (connection refused, DNS, timeout).
    #[error("endpoint unreachable: {0}")]
    Unreachable(String),
    /// Credentials could not be loaded from the default chain.
    #[error("no usable credentials: {0}")]
    Credentials(String),
    /// The server answered a 4xx that will be the same for the same request (`InvalidPart`,
    /// `InvalidRequest`, `NoSuchUpload` is [`StoreError::NotFound`]): sending it again does not
    /// help, a different request may. Throttling and timeouts (408, 429, `RequestTimeout`,
    /// `SlowDown`) are [`StoreError::Other`].
    #[error("refused: {0}")]
    Refused(String),
    /// Anything else the server or the transport reported.
    #[error("{0}")]
    Other(String),
}

impl StoreError {
    /// Whether the server could not answer (down, unreachable, failing) rather than answered
    /// that something is missing or forbidden: what the mount already knows stays valid. A
    /// refused request counts too: a listing or HEAD the server can't answer is no news of
    /// the object.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Unreachable(_) | StoreError::Refused(_) | StoreError::Other(_)
        )
    }
}

/// When a write may replace what is stored under a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    /// Unconditionally.
    None,
    /// Only if no object exists (`If-None-Match: *`): a new file.
    Absent,
    /// Only if the object is still this version (`If-Match`): an edited file.
    Matches(String),
}

/// The S3 operations keepfs uses. Keys are full keys (the mount prefix included).
///
/// Implementations retry transient failures themselves; an error returned from here is final
/// for that call.
pub trait ObjectStore: Send + Sync + 'static {
    /// The bucket this store talks to (for messages).
    fn bucket(&self) -> &str;

    /// HEAD `key`. Returns [`StoreError::NotFound`] when no object has exactly this key.
    fn head(&self, key: &str) -> impl Future<Output = Result<ObjectMeta, StoreError>> + Send;

    /// One page (at most `max_keys` entries) of ListObjectsV2 under `prefix` with delimiter `/`,
    /// continuing from `token`. An empty result is not an error.
    fn list_page(
        &self,
        prefix: &str,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> impl Future<Output = Result<ListPage, StoreError>> + Send;

    /// GET bytes `start..end` (end exclusive, `start < end`) of `key`, only if its ETag is still
    /// `etag` (`If-Match`). A changed object yields [`StoreError::PreconditionFailed`] on servers
    /// that honour `If-Match`. The body is streamed: chunks arrive through `sink` in order, and the
    /// call returns once all `end - start` bytes were delivered. A short body is an error.
    fn get_range(
        &self,
        key: &str,
        etag: &str,
        start: u64,
        end: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Checks that the bucket exists and that the credentials may list `prefix`, within the
    /// store's configured timeouts. Used before mounting to fail early with a clear reason.
    /// The one listing it sends (of a key-less prefix under `prefix/.keepfs/`) also finds
    /// whether the server URL-encodes listing replies as asked.
    fn check_access(&self, prefix: &str) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// PutObject of `body` with user `metadata`, subject to `precondition` (a failed one is
    /// [`StoreError::PreconditionFailed`]). Returns the new ETag.
    fn put_object(
        &self,
        key: &str,
        body: Bytes,
        metadata: &HashMap<String, String>,
        precondition: &Precondition,
    ) -> impl Future<Output = Result<String, StoreError>> + Send;

    /// Starts a multipart upload of `key` with user `metadata`; returns the upload id.
    fn create_multipart(
        &self,
        key: &str,
        metadata: &HashMap<String, String>,
    ) -> impl Future<Output = Result<String, StoreError>> + Send;

    /// Uploads part `number` (1-based) of an upload; returns the part's ETag.
    fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> impl Future<Output = Result<String, StoreError>> + Send;

    /// Uploads part `number` of an upload as a server-side copy of bytes `start..end` of
    /// `source`, only if `source` is still version `source_etag` (a changed source is
    /// [`StoreError::PreconditionFailed`]). Returns the part's ETag.
    #[allow(clippy::too_many_arguments)]
    fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        source: &str,
        source_etag: &str,
        start: u64,
        end: u64,
    ) -> impl Future<Output = Result<String, StoreError>> + Send;

    /// Completes an upload from `(number, etag)` parts in order, subject to `precondition`.
    /// Only now does the object change: readers see the old or the new version, never a mix.
    fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<(i32, String)>,
        precondition: &Precondition,
    ) -> impl Future<Output = Result<String, StoreError>> + Send;

    /// Aborts an upload, freeing its parts (absent upload is fine).
    fn abort_multipart(
        &self,
        key: &str,
        upload_id: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Server-side copy of `from` to `to`, user metadata included. Returns the new ETag.
    fn copy_object(
        &self,
        from: &str,
        to: &str,
    ) -> impl Future<Output = Result<String, StoreError>> + Send;

    /// Replaces the user metadata of `key` in place (a self-copy with the REPLACE directive),
    /// keeping its content. Returns the new ETag.
    fn replace_metadata(
        &self,
        key: &str,
        metadata: &HashMap<String, String>,
    ) -> impl Future<Output = Result<String, StoreError>> + Send;

    /// Deletes `key` (absent is fine).
    fn delete(&self, key: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
}
