//! An S3 server in this process: s3s-fs over a local directory, on 127.0.0.1 with a free port.
//! Shared by the test harness and `examples/demo.rs`.
//!
//! Around s3s-fs it counts each bucket's traffic and can refuse a bucket's uploads, so tests
//! can check how many bytes keepfs moved and what it does when S3 says no. A server can be
//! stopped and started again on the same port and directory (an outage).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const ACCESS_KEY: &str = "keepfs-test";
pub const SECRET_KEY: &str = "keepfs-test-secret";

/// Bytes and requests the in-process server saw for one bucket.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    /// Body bytes of GET responses.
    pub downloaded: u64,
    /// Body bytes of PUT and POST requests that carry data (PutObject, UploadPart).
    pub uploaded: u64,
    /// Server-side copies (CopyObject, UploadPartCopy).
    pub copies: u64,
    /// UploadPart requests (with data) accepted.
    pub parts: u64,
    /// GET requests for an object (GetObject), answered with any status.
    pub gets: u64,
}

static TRAFFIC: Mutex<Option<HashMap<String, Traffic>>> = Mutex::new(None);

/// What the in-process server has seen for `bucket` so far.
#[allow(dead_code)] // used by tests, not by the demo that shares this file
pub fn traffic(bucket: &str) -> Traffic {
    let map = TRAFFIC.lock().unwrap_or_else(|e| e.into_inner());
    map.as_ref()
        .and_then(|m| m.get(bucket).copied())
        .unwrap_or_default()
}

fn count(bucket: &str, add: impl FnOnce(&mut Traffic)) {
    let mut map = TRAFFIC.lock().unwrap_or_else(|e| e.into_inner());
    add(map
        .get_or_insert_with(HashMap::new)
        .entry(bucket.to_owned())
        .or_default());
}

/// Buckets whose uploads the in-process server refuses (403 AccessDenied), as a server with a
/// policy that denies writes would.
pub static REFUSING_UPLOADS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Buckets whose UploadPart requests are accepted only this many more times; later ones are
/// refused (403), as if the upload were cut off midway.
pub static PART_BUDGET: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);

/// The bucket a path-style request is for.
fn bucket_of(path: &str) -> &str {
    let path = path.trim_start_matches('/');
    path.split('/').next().unwrap_or(path)
}

/// Buckets whose CompleteMultipartUpload requests the in-process server refuses (403), as it
/// does on its own for an upload id it forgot.
pub static REFUSING_COMPLETIONS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Whether a path-style request names an object (`/bucket/key`), not a bucket.
fn is_object_request(req: &hyper::Request<hyper::body::Incoming>) -> bool {
    req.uri()
        .path()
        .trim_start_matches('/')
        .split_once('/')
        .is_some_and(|(_, key)| !key.is_empty())
}

fn is_upload_part(req: &hyper::Request<hyper::body::Incoming>) -> bool {
    req.method() == hyper::Method::PUT
        && !req.headers().contains_key("x-amz-copy-source")
        && req
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|p| p.starts_with("partNumber=")))
}

/// Whether the test has this request refused.
fn refuses(req: &hyper::Request<hyper::body::Incoming>) -> bool {
    let method = req.method();
    if method != hyper::Method::PUT && method != hyper::Method::POST {
        return false;
    }
    let path = req.uri().path();
    // Only requests for a key: bucket creation and deletion go on.
    let Some((bucket, _key)) = path.trim_start_matches('/').split_once('/') else {
        return false;
    };
    let refusing = REFUSING_UPLOADS.lock().unwrap_or_else(|e| e.into_inner());
    if refusing.iter().any(|b| b == bucket) {
        return true;
    }
    let completions = REFUSING_COMPLETIONS
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if method == hyper::Method::POST
        && completions.iter().any(|b| b == bucket)
        && req
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|p| p.starts_with("uploadId=")))
    {
        return true;
    }
    if is_upload_part(req) {
        let mut budgets = PART_BUDGET.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(left) = budgets.as_mut().and_then(|b| b.get_mut(bucket)) {
            if *left == 0 {
                return true;
            }
            *left -= 1;
        }
    }
    false
}

fn header_number(headers: &hyper::HeaderMap, name: &str) -> u64 {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Reads a request body to its end, discarding it.
async fn drain(mut body: hyper::body::Incoming) {
    use hyper::body::Body;
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        if frame.is_err() {
            break;
        }
    }
}

fn access_denied() -> hyper::Response<s3s::Body> {
    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
        <Error><Code>AccessDenied</Code>\
        <Message>uploads refused by the test</Message></Error>";
    let mut denied = hyper::Response::new(s3s::Body::from(body.to_owned()));
    *denied.status_mut() = hyper::StatusCode::FORBIDDEN;
    denied
}

/// The answer to a request whose handler panicked.
fn internal_error() -> hyper::Response<s3s::Body> {
    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
        <Error><Code>InternalError</Code><Message>handler failed</Message></Error>";
    let mut failed = hyper::Response::new(s3s::Body::from(body.to_owned()));
    *failed.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
    failed
}

/// A running in-process server that can be stopped and started again.
pub struct Embedded {
    pub endpoint: String,
    root: PathBuf,
    addr: SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Embedded {
    /// Serves `root` (one subdirectory per bucket) on a free loopback port.
    pub fn start(root: &Path, runtime: &tokio::runtime::Runtime) -> Self {
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        Embedded {
            endpoint: format!("http://{addr}"),
            root: root.to_owned(),
            addr,
            task: Some(runtime.spawn(serve(root.to_owned(), listener))),
        }
    }

    /// Closes the listener and every connection: clients see connection errors.
    #[allow(dead_code)] // used by tests, not by the demo that shares this file
    pub fn stop(&mut self, runtime: &tokio::runtime::Runtime) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = runtime.block_on(task);
        }
    }

    /// Serves the same directory on the same port again.
    #[allow(dead_code)]
    pub fn restart(&mut self, runtime: &tokio::runtime::Runtime) {
        self.stop(runtime);
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(self.addr))
            .expect("bind the same port again");
        self.task = Some(runtime.spawn(serve(self.root.clone(), listener)));
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Serves `root` on `runtime` for the life of the process; returns the endpoint URL.
pub fn start_s3s_fs(root: &Path, runtime: &tokio::runtime::Runtime) -> String {
    let server = Embedded::start(root, runtime);
    let endpoint = server.endpoint.clone();
    std::mem::forget(server);
    endpoint
}

/// Accepts connections until aborted; aborting drops every connection too.
async fn serve(root: PathBuf, listener: tokio::net::TcpListener) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder as ConnBuilder;

    let fs = s3s_fs::FileSystem::new(&root).expect("s3s-fs over the server directory");
    let mut builder = s3s::service::S3ServiceBuilder::new(fs);
    builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
    let service = builder.build();
    let http = ConnBuilder::new(TokioExecutor::new());
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            continue;
        };
        while connections.try_join_next().is_some() {}
        let service = service.clone();
        let counted =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let method = req.method().clone();
                let bucket = bucket_of(req.uri().path()).to_owned();
                let refused = refuses(&req);
                if method == hyper::Method::GET && is_object_request(&req) {
                    count(&bucket, |t| t.gets += 1);
                }
                let headers = req.headers();
                if !refused && (method == hyper::Method::PUT || method == hyper::Method::POST) {
                    if headers.contains_key("x-amz-copy-source") {
                        count(&bucket, |t| t.copies += 1);
                    } else {
                        // Streaming-signed bodies carry their real length in a header.
                        let len = match header_number(headers, "x-amz-decoded-content-length") {
                            0 => header_number(headers, "content-length"),
                            n => n,
                        };
                        let part = is_upload_part(&req);
                        count(&bucket, |t| {
                            t.uploaded += len;
                            t.parts += u64::from(part);
                        });
                    }
                }
                // A refused request's body is read to its end first, as a real server does:
                // a client still sending it would otherwise stall instead of seeing the refusal.
                let (response, refused_body) = if refused {
                    (None, Some(req.into_body()))
                } else {
                    (Some(hyper::service::Service::call(&service, req)), None)
                };
                async move {
                    let Some(response) = response else {
                        if let Some(body) = refused_body {
                            drain(body).await;
                        }
                        return Ok(access_denied());
                    };
                    // Run the request to its end even if the client goes away: s3s-fs renames
                    // a PUT's data into place before it saves the ETag, metadata and checksums
                    // beside it, so a handler dropped in between (a client killed by the torture
                    // test) would leave new bytes under the old ETag — a state no real server
                    // shows. A body cut off mid-way still fails the PUT, as it should.
                    let response = match tokio::spawn(response).await {
                        Ok(response) => response?,
                        Err(_) => return Ok(internal_error()),
                    };
                    if method == hyper::Method::GET {
                        let len = header_number(response.headers(), "content-length");
                        count(&bucket, |t| t.downloaded += len);
                    }
                    Ok::<_, s3s::HttpError>(response)
                }
            });
        let conn = http
            .serve_connection(TokioIo::new(socket), counted)
            .into_owned();
        connections.spawn(async move {
            let _ = conn.await;
        });
    }
}
/// An SDK client for `endpoint` with static credentials (path-style, us-east-1).
pub fn sdk_client(endpoint: &str, access_key: &str, secret_key: &str) -> aws_sdk_s3::Client {
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(Credentials::new(
            access_key, secret_key, None, None, "static",
        ))
        // Tests compare sha256 themselves. s3s-fs keeps the whole-object checksum of an earlier
        // PutObject when a multipart upload replaces the object; full GETs would fail on it.
        .response_checksum_validation(aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// Turns versioning on for `bucket` (servers that keep versions: moto, AWS).
#[allow(dead_code)] // the snapshot tests and benchmark use it, the demo doesn't
pub async fn enable_versioning(client: &aws_sdk_s3::Client, bucket: &str) {
    try_enable_versioning(client, bucket)
        .await
        .expect("enable versioning");
}

/// [`enable_versioning`], or the server's refusal (Garage answers 501).
#[allow(dead_code)] // the snapshot tests use it, the demo and benchmarks don't
pub async fn try_enable_versioning(
    client: &aws_sdk_s3::Client,
    bucket: &str,
) -> Result<(), impl std::fmt::Debug> {
    use aws_sdk_s3::types::{BucketVersioningStatus, VersioningConfiguration};
    client
        .put_bucket_versioning()
        .bucket(bucket)
        .versioning_configuration(
            VersioningConfiguration::builder()
                .status(BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .map(|_| ())
}
