//! An S3 server in this process: s3s-fs over a local directory, on 127.0.0.1 with a free port.
//! Shared by the test harness and `examples/demo.rs`.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub const ACCESS_KEY: &str = "keepfs-test";
pub const SECRET_KEY: &str = "keepfs-test-secret";

/// Bytes and requests the in-process server saw, for tests that check how much keepfs moved.
#[derive(Default)]
pub struct Traffic {
    /// Body bytes of GET responses.
    pub downloaded: AtomicU64,
    /// Body bytes of PUT and POST requests that carry data (PutObject, UploadPart).
    pub uploaded: AtomicU64,
    /// Server-side copies (CopyObject, UploadPartCopy).
    pub copies: AtomicU64,
}

impl Traffic {
    /// (downloaded, uploaded, copies) so far.
    #[allow(dead_code)] // used by tests, not by the demo that shares this file
    pub fn now(&self) -> (u64, u64, u64) {
        (
            self.downloaded.load(Ordering::SeqCst),
            self.uploaded.load(Ordering::SeqCst),
            self.copies.load(Ordering::SeqCst),
        )
    }
}

pub static TRAFFIC: Traffic = Traffic {
    downloaded: AtomicU64::new(0),
    uploaded: AtomicU64::new(0),
    copies: AtomicU64::new(0),
};

/// Buckets whose uploads the in-process server refuses (403 AccessDenied), as a server with a
/// policy that denies writes would.
pub static REFUSING_UPLOADS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn refuses(method: &hyper::Method, path: &str) -> bool {
    if method != hyper::Method::PUT && method != hyper::Method::POST {
        return false;
    }
    let refusing = REFUSING_UPLOADS.lock().unwrap_or_else(|e| e.into_inner());
    refusing.iter().any(|b| {
        path.strip_prefix('/')
            .and_then(|p| p.strip_prefix(b.as_str()))
            .is_some_and(|rest| rest.starts_with('/'))
    })
}

fn header_number(headers: &hyper::HeaderMap, name: &str) -> u64 {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Serves `root` (one subdirectory per bucket) on `runtime`; returns the endpoint URL.
pub fn start_s3s_fs(root: &Path, runtime: &tokio::runtime::Runtime) -> String {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder as ConnBuilder;

    let fs = s3s_fs::FileSystem::new(root).expect("s3s-fs over the server directory");
    let mut builder = s3s::service::S3ServiceBuilder::new(fs);
    builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
    let service = builder.build();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    runtime.spawn(async move {
        let http = ConnBuilder::new(TokioExecutor::new());
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                continue;
            };
            let service = service.clone();
            let counted =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let method = req.method().clone();
                    let refused = refuses(&method, req.uri().path());
                    let headers = req.headers();
                    if method == hyper::Method::PUT || method == hyper::Method::POST {
                        if headers.contains_key("x-amz-copy-source") {
                            TRAFFIC.copies.fetch_add(1, Ordering::SeqCst);
                        } else {
                            // Streaming-signed bodies carry their real length in a header.
                            let len = match header_number(headers, "x-amz-decoded-content-length") {
                                0 => header_number(headers, "content-length"),
                                n => n,
                            };
                            TRAFFIC.uploaded.fetch_add(len, Ordering::SeqCst);
                        }
                    }
                    let response = hyper::service::Service::call(&service, req);
                    async move {
                        if refused {
                            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
                                <Error><Code>AccessDenied</Code>\
                                <Message>uploads refused by the test</Message></Error>";
                            let mut denied = hyper::Response::new(s3s::Body::from(body.to_owned()));
                            *denied.status_mut() = hyper::StatusCode::FORBIDDEN;
                            return Ok(denied);
                        }
                        let response = response.await?;
                        if method == hyper::Method::GET {
                            let len = header_number(response.headers(), "content-length");
                            TRAFFIC.downloaded.fetch_add(len, Ordering::SeqCst);
                        }
                        Ok::<_, s3s::HttpError>(response)
                    }
                });
            let conn = http
                .serve_connection(TokioIo::new(socket), counted)
                .into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    });
    format!("http://{addr}")
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
