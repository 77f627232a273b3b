//! An S3 server in this process: s3s-fs over a local directory, on 127.0.0.1 with a free port.
//! Shared by the test harness and `examples/demo.rs`.

use std::path::Path;

pub const ACCESS_KEY: &str = "keepfs-test";
pub const SECRET_KEY: &str = "keepfs-test-secret";

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
            let conn = http
                .serve_connection(TokioIo::new(socket), service.clone())
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
