//! [`ObjectStore`] on `aws-sdk-s3`, with credentials and region from `aws-config`'s default chain.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{OwnedRwLockReadGuard, RwLock};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{Region, timeout::TimeoutConfig};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use bytes::Bytes;

use std::collections::HashMap;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, EncodingType};

use super::keys::{encode_for_copy_source, listed_key};
use super::{ListPage, ObjectMeta, ObjectStore, Precondition, StoreError};
use crate::snapshot::SnapshotView;

/// Where and how to reach the bucket.
#[derive(Debug, Clone, Default)]
pub struct S3StoreConfig {
    pub bucket: String,
    /// Custom endpoint (S3-compatible servers); `None` for AWS.
    pub endpoint_url: Option<String>,
    /// Region; `None` takes the default chain's, falling back to `us-east-1`.
    pub region: Option<String>,
    /// Address buckets as `endpoint/bucket` rather than `bucket.endpoint`.
    pub force_path_style: bool,
    /// How long a TCP/TLS connect may take before the attempt fails.
    pub connect_timeout: Duration,
    /// How long an attempt may wait for the server to begin its answer (response headers,
    /// counted from when the request starts to go out) before it fails and is retried; requests
    /// that carry a body or copy on the server get [`TRANSFER_TIMEOUT_FACTOR`] times as long.
    pub request_timeout: Duration,
}

/// How many times `--request-timeout` PutObject, UploadPart, CopyObject and UploadPartCopy get:
/// their wait includes sending the body (a part of up to 5 GiB, see the S3 multipart limits) or
/// the server's copy, which some servers finish before they answer.
pub const TRANSFER_TIMEOUT_FACTOR: u32 = 10;

/// The request timeout unless set (`--request-timeout`): far above a healthy answer's time to
/// first byte (S3 answers most requests within 100-200 ms), short enough that a server that
/// never answers costs a FUSE call a few attempts of it, not forever.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The aws-sdk-s3 implementation of [`ObjectStore`].
#[derive(Debug, Clone)]
pub struct S3Store {
    pub(super) client: Client,
    pub(super) bucket: String,
    /// Held shared by every request that changes what the bucket shows (PutObject,
    /// CompleteMultipartUpload, CopyObject, DeleteObject); a snapshot holds it exclusively to
    /// stop the mount's changes reaching S3 while it records the bucket. Clones share it;
    /// `None` in the snapshot's own [`S3Store::ungated`] copy.
    gate: Option<Arc<RwLock<()>>>,
    /// A read-only view of a snapshot (`mount --snapshot`): listings, HEAD and GET are answered
    /// from its manifest, every change is refused.
    view: Option<Arc<SnapshotView>>,
    /// Whether listing replies that say `EncodingType` `url` really hold URL-encoded keys.
    /// Cleared by [`ObjectStore::check_access`] for a server that only echoes the parameter
    /// (s3s-fs 0.14): decoding its raw keys would turn a key's `+` or `%41` into something
    /// else. Clones share it.
    listings_encoded: Arc<std::sync::atomic::AtomicBool>,
}

/// The client's timeouts: connecting, and waiting for an answer to begin (see
/// [`S3StoreConfig::request_timeout`]).
fn timeouts(connect: Duration, request: Duration) -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(connect)
        .read_timeout(request)
        .build()
}

impl S3Store {
    /// Builds a client from the default credential/region chain plus `config`.
    pub async fn new(config: &S3StoreConfig) -> Self {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &config.region {
            loader = loader.region(Region::new(region.clone()));
        }
        let shared = loader.load().await;
        let mut builder = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(config.force_path_style)
            .timeout_config(timeouts(config.connect_timeout, config.request_timeout));
        if shared.region().is_none() {
            builder = builder.region(Region::from_static("us-east-1"));
        }
        if let Some(url) = &config.endpoint_url {
            builder = builder.endpoint_url(url);
        }
        builder = builder
            .interceptor(crate::metrics::S3Metrics)
            .interceptor(super::whole::WholeReplies);
        Self::over(Client::from_conf(builder.build()), &config.bucket)
    }

    /// [`S3Store::new`], then [`ObjectStore::check_access`] of `prefix`: what the commands
    /// that work on a bucket without a mount (`keepfs snapshot`, `keepfs flush`) start with,
    /// so that a wrong bucket or credentials is a clear error before any work, and listing
    /// replies are decoded as the server really sends them.
    ///
    /// # Errors
    /// The check's [`StoreError`]: `NoSuchBucket`, `AccessDenied`, unreachable, ...
    pub async fn connect(config: &S3StoreConfig, prefix: &str) -> Result<Self, StoreError> {
        let store = Self::new(config).await;
        store.check_access(prefix).await?;
        Ok(store)
    }

    /// The config override for requests that carry a body or copy on the server: the same
    /// timeouts with [`TRANSFER_TIMEOUT_FACTOR`] times the read timeout.
    pub(super) fn transfer_timeouts(&self) -> aws_sdk_s3::config::Builder {
        let current = self.client.config().timeout_config().cloned();
        let connect = current.as_ref().and_then(|t| t.connect_timeout());
        let read = current.as_ref().and_then(|t| t.read_timeout());
        let mut timeouts = TimeoutConfig::builder();
        if let Some(connect) = connect {
            timeouts = timeouts.connect_timeout(connect);
        }
        if let Some(read) = read {
            timeouts = timeouts.read_timeout(read * TRANSFER_TIMEOUT_FACTOR);
        }
        aws_sdk_s3::config::Builder::default().timeout_config(timeouts.build())
    }

    fn over(client: Client, bucket: &str) -> Self {
        Self {
            client,
            bucket: bucket.to_owned(),
            gate: Some(Arc::default()),
            view: None,
            listings_encoded: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        }
    }

    /// A store over an already configured SDK client (tests and benchmarks build their own),
    /// with keepfs's request metrics added.
    pub fn from_client(client: Client, bucket: &str) -> Self {
        let config = client
            .config()
            .to_builder()
            .interceptor(crate::metrics::S3Metrics)
            .interceptor(super::whole::WholeReplies)
            .build();
        Self::over(Client::from_conf(config), bucket)
    }

    /// The gate this store's changes pass (see [`S3Store::ungated`]); `None` for an ungated
    /// copy.
    pub fn mutation_gate(&self) -> Option<Arc<RwLock<()>>> {
        self.gate.clone()
    }

    /// A copy on the same client whose changes don't wait for the mutation gate: what a
    /// snapshot writes with while it holds the gate.
    pub fn ungated(&self) -> Self {
        Self {
            gate: None,
            ..self.clone()
        }
    }

    /// This store, answering reads from snapshot `view` and refusing every change.
    pub fn with_view(self, view: Arc<SnapshotView>) -> Self {
        Self {
            view: Some(view),
            ..self
        }
    }

    /// Whether a listing reply's keys are to be URL-decoded.
    pub(super) fn decode_listed(&self, reply: Option<&EncodingType>) -> bool {
        reply == Some(&EncodingType::Url)
            && self
                .listings_encoded
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits for the mutation gate (shared) before a change; a snapshot view refuses it.
    pub(super) async fn hold(&self) -> Result<Option<OwnedRwLockReadGuard<()>>, StoreError> {
        if self.view.is_some() {
            return Err(StoreError::AccessDenied(
                "a snapshot is read-only".to_owned(),
            ));
        }
        Ok(match &self.gate {
            Some(gate) => Some(Arc::clone(gate).read_owned().await),
            None => None,
        })
    }

    /// CopyObject `from` → `to`; with `metadata`, the copy gets it instead of the source's.
    async fn copy(
        &self,
        from: &str,
        to: &str,
        metadata: Option<&HashMap<String, String>>,
    ) -> Result<String, StoreError> {
        let _held = self.hold().await?;
        let mut req = self
            .client
            .copy_object()
            .bucket(&self.bucket)
            .key(to)
            .copy_source(copy_source(&self.bucket, from, None));
        if let Some(metadata) = metadata {
            req = req
                .metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace)
                .set_metadata(Some(metadata.clone()));
        }
        let out = req
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
}

/// The `If-None-Match` and `If-Match` headers a precondition puts on a write.
fn condition_headers(precondition: &Precondition) -> (Option<String>, Option<String>) {
    match precondition {
        Precondition::None => (None, None),
        Precondition::Absent => (Some("*".to_owned()), None),
        Precondition::Matches(etag) => (None, Some(etag.clone())),
    }
}

/// Turns an SDK error into a [`StoreError`], keeping the server's code and message.
pub(super) fn classify<E>(err: SdkError<E, HttpResponse>, bucket: &str) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = err.code().map(str::to_owned);
    let text = DisplayErrorContext(&err).to_string();
    match &err {
        SdkError::DispatchFailure(f) => {
            if text.contains("credentials") || text.contains("identity") {
                StoreError::Credentials(text)
            } else if f.is_io() || f.is_timeout() {
                StoreError::Unreachable(text)
            } else {
                StoreError::Other(text)
            }
        }
        SdkError::TimeoutError(_) => StoreError::Unreachable(text),
        _ => match (status, code.as_deref()) {
            (_, Some("NoSuchBucket")) => StoreError::NoSuchBucket(bucket.to_owned()),
            (_, Some("NoSuchKey" | "NotFound" | "NoSuchUpload")) | (Some(404), None) => {
                StoreError::NotFound
            }
            (Some(412), _) | (_, Some("PreconditionFailed")) => StoreError::PreconditionFailed,
            (
                _,
                Some("AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "Forbidden"),
            )
            | (Some(403), _) => StoreError::AccessDenied(code.unwrap_or_else(|| "403".into())),
            (Some(301), _) | (_, Some("PermanentRedirect" | "AuthorizationHeaderMalformed")) => {
                StoreError::WrongRegion(text)
            }
            // Worth sending again: S3 answers a slow request body with 400 RequestTimeout,
            // and an expired session token is replaced by the credentials chain.
            (Some(408 | 429), _)
            | (
                _,
                Some(
                    "RequestTimeout"
                    | "SlowDown"
                    | "ExpiredToken"
                    | "TokenRefreshRequired"
                    | "IncompleteBody"
                    | "BadDigest"
                    | "OperationAborted",
                ),
            ) => StoreError::Other(text),
            (Some(400..=499), _) => StoreError::Refused(text),
            _ => StoreError::Other(text),
        },
    }
}

/// Refuses a listing reply that is not whole: every ListObjectsV2 and ListObjectVersions reply
/// carries `IsTruncated`, and `KeyCount` (where sent) counts its keys and common prefixes
/// (<https://docs.aws.amazon.com/AmazonS3/latest/API/API_ListObjectsV2.html>). A body cut short
/// with a `Content-Length` that matches the cut still parses, and without this check the keys
/// after the cut would be taken as absent.
pub(super) fn check_listing(
    is_truncated: Option<bool>,
    key_count: Option<i32>,
    listed: usize,
) -> Result<(), StoreError> {
    if is_truncated.is_none() {
        return Err(StoreError::Other(
            "listing reply without IsTruncated (cut short?)".to_owned(),
        ));
    }
    match key_count {
        // Fewer entries than announced: cut. More passes: some servers count keys only
        // (versitygw, older SeaweedFS), and a cut reply never holds more than it announced.
        Some(count) if usize::try_from(count).is_ok_and(|count| count > listed) => {
            Err(StoreError::Other(format!(
                "listing reply with KeyCount {count} holds {listed} entries (cut short?)"
            )))
        }
        _ => Ok(()),
    }
}

/// The continuation token of a ListObjectsV2 reply: `None` on the last page; a reply that
/// says it is truncated but gives no token can't be continued and is refused rather than
/// taken as the end.
pub(super) fn next_token(
    is_truncated: Option<bool>,
    token: Option<&str>,
) -> Result<Option<String>, StoreError> {
    match (is_truncated.unwrap_or(false), token) {
        (false, _) => Ok(None),
        (true, Some(token)) if !token.is_empty() => Ok(Some(token.to_owned())),
        (true, _) => Err(StoreError::Other(
            "listing reply truncated without a continuation token (cut short?)".to_owned(),
        )),
    }
}

/// The ETag a write's XML reply must carry (CompleteMultipartUpload, CopyObject,
/// UploadPartCopy); a reply without one was cut short. PutObject and UploadPart send theirs
/// as a header, which a cut body can't lose (and s3s-fs omits for `dir/` markers).
pub(super) fn written_etag(etag: Option<&str>, what: &str) -> Result<String, StoreError> {
    match etag {
        Some(etag) if !etag.is_empty() => Ok(etag.to_owned()),
        _ => Err(StoreError::Other(format!(
            "{what} reply without an ETag (cut short?)"
        ))),
    }
}

/// `x-amz-copy-source` for `key` in `bucket`, at `version` if given
/// (<https://docs.aws.amazon.com/AmazonS3/latest/API/API_CopyObject.html>).
pub(super) fn copy_source(bucket: &str, key: &str, version: Option<&str>) -> String {
    match version {
        Some(version) => format!(
            "{bucket}/{}?versionId={}",
            encode_for_copy_source(key),
            encode_for_copy_source(version)
        ),
        None => format!("{bucket}/{}", encode_for_copy_source(key)),
    }
}

pub(super) fn to_system_time(t: Option<&aws_smithy_types::DateTime>) -> SystemTime {
    t.and_then(|t| SystemTime::try_from(*t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Reads of the bucket itself, under the snapshot view's routing in [`ObjectStore`].
impl S3Store {
    /// HEAD of `key`, or of its version `version` (a snapshot's).
    pub(crate) async fn head_at(
        &self,
        key: &str,
        version: Option<&str>,
    ) -> Result<ObjectMeta, StoreError> {
        let out = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version.map(str::to_owned))
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))?;
        Ok(ObjectMeta {
            size: out.content_length().unwrap_or(0).max(0) as u64,
            etag: out.e_tag().unwrap_or_default().to_owned(),
            last_modified: to_system_time(out.last_modified()),
            user_metadata: out
                .metadata()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// One page of a `/`-delimited ListObjectsV2 (what [`ObjectStore::list_page`] sends).
    pub(crate) async fn list_delimited(
        &self,
        prefix: &str,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> Result<ListPage, StoreError> {
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .delimiter("/")
            .encoding_type(EncodingType::Url)
            .set_continuation_token(token)
            .set_max_keys(max_keys)
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))?;
        check_listing(
            out.is_truncated(),
            out.key_count(),
            out.contents().len() + out.common_prefixes().len(),
        )?;
        let encoded = self.decode_listed(out.encoding_type());
        let objects = out
            .contents()
            .iter()
            .filter_map(|o| {
                let key = listed_key(o.key()?, encoded)?;
                let meta = ObjectMeta {
                    size: o.size().unwrap_or(0).max(0) as u64,
                    etag: o.e_tag().unwrap_or_default().to_owned(),
                    last_modified: to_system_time(o.last_modified()),
                    user_metadata: Default::default(),
                };
                Some((key, meta))
            })
            .collect();
        let prefixes = out
            .common_prefixes()
            .iter()
            .filter_map(|p| listed_key(p.prefix()?, encoded))
            .collect();
        let next_token = next_token(out.is_truncated(), out.next_continuation_token())?;
        Ok(ListPage {
            objects,
            prefixes,
            next_token,
        })
    }

    /// [`ObjectStore::get_range`] of `key`, or of its version `version` (a snapshot's).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn get_at(
        &self,
        key: &str,
        version: Option<&str>,
        etag: &str,
        start: u64,
        end: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> Result<(), StoreError> {
        debug_assert!(start < end);
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version.map(str::to_owned))
            .if_match(etag)
            .range(format!("bytes={}-{}", start, end - 1))
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))?;
        // Some servers ignore If-Match on GET: a body of another version is refused here, so a
        // reader pinned to a version never gets another version's bytes.
        let served = out.e_tag().unwrap_or_default();
        if !served.is_empty() && !etag.is_empty() && served != etag {
            return Err(StoreError::PreconditionFailed);
        }
        let mut body = out.body;
        let mut received = 0u64;
        let wanted = end - start;
        while let Some(chunk) = body.try_next().await.map_err(|e| {
            StoreError::Other(format!(
                "reading body of {key}: {}",
                DisplayErrorContext(&e)
            ))
        })? {
            crate::metrics::get()
                .s3_received_bytes
                .inc_by(chunk.len() as u64);
            let take = (wanted - received).min(chunk.len() as u64) as usize;
            received += take as u64;
            if take > 0 {
                sink(chunk.slice(..take));
            }
        }
        if received < wanted {
            return Err(StoreError::Other(format!(
                "short body for {key} bytes {start}-{end}: got {received} of {wanted}"
            )));
        }
        Ok(())
    }
}

impl ObjectStore for S3Store {
    fn bucket(&self) -> &str {
        &self.bucket
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta, StoreError> {
        match &self.view {
            Some(view) => view.head(self, key).await,
            None => self.head_at(key, None).await,
        }
    }

    async fn list_page(
        &self,
        prefix: &str,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> Result<ListPage, StoreError> {
        match &self.view {
            Some(view) => Ok(view.list_page(prefix, token, max_keys)),
            None => self.list_delimited(prefix, token, max_keys).await,
        }
    }

    async fn get_range(
        &self,
        key: &str,
        etag: &str,
        start: u64,
        end: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> Result<(), StoreError> {
        match &self.view {
            Some(view) => view.get_range(self, key, etag, start, end, sink).await,
            None => self.get_at(key, None, etag, start, end, sink).await,
        }
    }

    async fn check_access(&self, prefix: &str) -> Result<(), StoreError> {
        if self.view.is_some() {
            return self.list_page(prefix, None, Some(1)).await.map(|_| ());
        }
        // A listing of an empty prefix under keepfs's own that needs encoding: a server that
        // URL-encodes replies as asked sends its `Prefix` back changed, one that only echoes
        // the parameter sends it back as it is.
        let probe = format!("{prefix}.keepfs/encoding probe \u{e9}+/");
        let answer = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&probe)
            .delimiter("/")
            .encoding_type(EncodingType::Url)
            .max_keys(1)
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket));
        let out = match answer {
            Ok(out) => out,
            // A policy that lets the mount list its own prefix only: the plain check, and
            // keys decoded as the replies say.
            Err(StoreError::AccessDenied(_)) => {
                return self.list_page(prefix, None, Some(1)).await.map(|_| ());
            }
            Err(e) => return Err(e),
        };
        let encoded = out.encoding_type() == Some(&EncodingType::Url);
        if encoded
            && out
                .prefix()
                .is_some_and(|p| listed_key(p, true).as_deref() != Some(probe.as_str()))
        {
            tracing::info!(
                "the server does not URL-encode listings as it says it does: keys are taken as sent"
            );
            self.listings_encoded
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    async fn put_object(
        &self,
        key: &str,
        body: Bytes,
        metadata: &HashMap<String, String>,
        precondition: &Precondition,
    ) -> Result<String, StoreError> {
        let (if_none_match, if_match) = condition_headers(precondition);
        let len = body.len() as u64;
        let _held = self.hold().await?;
        let out = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .set_metadata(Some(metadata.clone()))
            .set_if_none_match(if_none_match)
            .set_if_match(if_match)
            .body(ByteStream::from(body))
            .customize()
            .config_override(self.transfer_timeouts())
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))?;
        crate::metrics::get().uploaded_bytes.inc_by(len);
        Ok(out.e_tag().unwrap_or_default().to_owned())
    }

    async fn create_multipart(
        &self,
        key: &str,
        metadata: &HashMap<String, String>,
    ) -> Result<String, StoreError> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .set_metadata(Some(metadata.clone()))
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))?;
        out.upload_id()
            .map(str::to_owned)
            .ok_or_else(|| StoreError::Other(format!("no upload id for {key}")))
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> Result<String, StoreError> {
        let len = body.len() as u64;
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .body(ByteStream::from(body))
            .customize()
            .config_override(self.transfer_timeouts())
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))?;
        crate::metrics::get().uploaded_bytes.inc_by(len);
        Ok(out.e_tag().unwrap_or_default().to_owned())
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        source: &str,
        source_etag: &str,
        start: u64,
        end: u64,
    ) -> Result<String, StoreError> {
        let out = self
            .client
            .upload_part_copy()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .copy_source(copy_source(&self.bucket, source, None))
            .copy_source_if_match(source_etag)
            .copy_source_range(format!("bytes={start}-{}", end - 1))
            .customize()
            .config_override(self.transfer_timeouts())
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))?;
        written_etag(
            out.copy_part_result().and_then(|r| r.e_tag()),
            "UploadPartCopy",
        )
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<(i32, String)>,
        precondition: &Precondition,
    ) -> Result<String, StoreError> {
        let parts = parts
            .into_iter()
            .map(|(n, etag)| CompletedPart::builder().part_number(n).e_tag(etag).build())
            .collect();
        let (if_none_match, if_match) = condition_headers(precondition);
        let _held = self.hold().await?;
        let out = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .set_if_none_match(if_none_match)
            .set_if_match(if_match)
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))?;
        written_etag(out.e_tag(), "CompleteMultipartUpload")
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StoreError> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))
        {
            Ok(_) | Err(StoreError::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn copy_object(&self, from: &str, to: &str) -> Result<String, StoreError> {
        self.copy(from, to, None).await
    }

    async fn replace_metadata(
        &self,
        key: &str,
        metadata: &HashMap<String, String>,
    ) -> Result<String, StoreError> {
        self.copy(key, key, Some(metadata)).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let _held = self.hold().await?;
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))
        {
            Ok(_) | Err(StoreError::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_reply_that_says_less_than_it_holds_is_refused() {
        assert!(check_listing(None, None, 0).is_err(), "no IsTruncated");
        assert!(
            check_listing(Some(false), Some(100), 50).is_err(),
            "KeyCount above"
        );
        assert!(check_listing(Some(false), Some(100), 100).is_ok());
        // Servers that count keys only send less than the entries with prefixes.
        assert!(check_listing(Some(true), Some(10), 12).is_ok());
        assert!(check_listing(Some(false), None, 3).is_ok());
    }

    #[test]
    fn a_truncated_listing_needs_a_token_to_go_on() {
        assert_eq!(next_token(Some(false), Some("k")).unwrap(), None);
        assert_eq!(next_token(None, None).unwrap(), None);
        assert_eq!(
            next_token(Some(true), Some("k")).unwrap().as_deref(),
            Some("k")
        );
        assert!(next_token(Some(true), None).is_err());
        assert!(next_token(Some(true), Some("")).is_err());
    }
}
