//! A fault-injecting HTTP proxy between keepfs and a real S3 server.
//!
//! Every request is forwarded as it came (headers included, so SigV4 signatures stay valid:
//! the `Host` header names the proxy both when keepfs signs and when the server checks); a
//! seeded RNG picks for a share of them one of the faults of [`Fault`]. No crate does this for
//! HTTP/1.1 S3 traffic at this level (truncating bodies with a wrong `Content-Length`, for
//! one), so it is a small one of our own on hyper.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One kind of misbehaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// 50–300 ms more before the request is forwarded.
    Latency,
    /// The connection closes without an answer; half of the time after the server got and
    /// carried out the request (a write that happened, its answer lost).
    ResetBeforeAnswer,
    /// The answer's headers and half of its body, then the connection breaks.
    ResetMidBody,
    /// Half of the body with a `Content-Length` that says so: a well-formed, short answer.
    /// An XML body is cut after the last end of a tag in its first half, where a reader
    /// that takes the end of the input for the end of the document sees nothing wrong.
    TruncatedWrongLength,
    /// 500 InternalError, the request not forwarded.
    ServerError,
    /// 503 SlowDown with `Retry-After: 1`, the request not forwarded.
    SlowDown,
    /// 403 AccessDenied for this and the next 2 requests (a burst), not forwarded.
    Forbidden,
    /// 404 NoSuchKey for this and the next 2 requests (a burst), not forwarded.
    NotFound,
    /// The request waits [`FaultProxy::set_stall`] (5 s unless set) before it is forwarded:
    /// a server that takes its time to answer.
    Stall,
}

impl Fault {
    /// Every kind.
    pub const ALL: [Fault; 9] = [
        Fault::Latency,
        Fault::ResetBeforeAnswer,
        Fault::ResetMidBody,
        Fault::TruncatedWrongLength,
        Fault::ServerError,
        Fault::SlowDown,
        Fault::Forbidden,
        Fault::NotFound,
        Fault::Stall,
    ];

    /// The kinds the SDK retries (throttling, 5xx, broken or cut answers, slowness): no
    /// operation is expected to fail because of them alone.
    pub fn retried() -> Vec<Fault> {
        Fault::ALL
            .into_iter()
            .filter(|k| !matches!(k, Fault::Forbidden | Fault::NotFound | Fault::Stall))
            .collect()
    }
}

/// Requests that make up a burst, the first included.
const BURST: u32 = 3;

#[derive(Default)]
struct Plan {
    /// Share of requests (0..=1) that get a fault.
    rate: f64,
    kinds: Vec<Fault>,
    stall: Duration,
    /// Faults only for requests that upload (see [`FaultProxy::inject_on_uploads`]).
    uploads_only: bool,
    /// How long answers to listings (ListObjectsV2), and the next HEAD's answer, are held
    /// after the server gave them.
    hold_listings: Duration,
    hold_next_head: Option<Duration>,
    /// Answers held so far.
    held: u64,
    /// A burst under way: its fault and the requests it still takes.
    burst: Option<(Fault, u32)>,
    injected: BTreeMap<Fault, u64>,
    requests: u64,
}

struct Shared {
    upstream: SocketAddr,
    plan: Mutex<Plan>,
    rng: Mutex<StdRng>,
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    /// `http://127.0.0.1:PORT`, for `--endpoint-url`.
    pub endpoint: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy to `upstream` (`http://HOST:PORT`) on a free loopback port, with no faults
    /// until [`FaultProxy::inject`]; faults are drawn from an RNG seeded with `seed`.
    pub fn start(upstream: &str, seed: u64) -> FaultProxy {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("the upstream is http://IP:PORT");
        let shared = Arc::new(Shared {
            upstream,
            plan: Mutex::new(Plan {
                stall: Duration::from_secs(5),
                ..Plan::default()
            }),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
        });
        let rt = super::rt();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind loopback");
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let task = rt.spawn(serve(listener, shared.clone()));
        FaultProxy {
            endpoint,
            shared,
            task,
        }
    }

    fn plan(&self) -> std::sync::MutexGuard<'_, Plan> {
        self.shared.plan.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From now on, a share `rate` (0..=1) of requests gets one of `kinds`, chosen uniformly.
    pub fn inject(&self, rate: f64, kinds: &[Fault]) {
        let mut plan = self.plan();
        plan.rate = rate;
        plan.kinds = kinds.to_vec();
        plan.burst = None;
        plan.uploads_only = false;
    }

    /// [`FaultProxy::inject`] for uploads only: PUT without `x-amz-copy-source` (PutObject,
    /// UploadPart) and POST but DeleteObjects (create and complete a multipart upload). keepfs runs them in the
    /// background, so no system call waits for them; reads, lookups, listings, and the copies
    /// and deletes a rename or unlink waits for, pass untouched.
    pub fn inject_on_uploads(&self, rate: f64, kinds: &[Fault]) {
        self.inject(rate, kinds);
        self.plan().uploads_only = true;
    }

    /// Stops injecting faults (requests held by a stall still finish their wait).
    pub fn heal(&self) {
        self.inject(0.0, &[]);
    }

    /// How long [`Fault::Stall`] holds a request.
    pub fn set_stall(&self, stall: Duration) {
        self.plan().stall = stall;
    }

    /// Holds every answer to a listing (ListObjectsV2) for `hold` after the server gave it:
    /// what it describes is then older than what happens meanwhile. `Duration::ZERO` stops.
    pub fn hold_listings(&self, hold: Duration) {
        self.plan().hold_listings = hold;
    }

    /// [`FaultProxy::hold_listings`] for the answer to the next HEAD request only.
    pub fn hold_next_head(&self, hold: Duration) {
        self.plan().hold_next_head = Some(hold);
    }

    /// How many answers were held (see [`FaultProxy::hold_listings`]).
    pub fn held(&self) -> u64 {
        self.plan().held
    }

    /// Requests seen and faults injected so far, by kind.
    pub fn counts(&self) -> (u64, BTreeMap<Fault, u64>) {
        let plan = self.plan();
        (plan.requests, plan.injected.clone())
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The fault for the next request, if any, how long a stall lasts and how long its answer is
/// held once given (`listing`: the request is a ListObjectsV2; else a HEAD or not held).
fn choose(
    shared: &Shared,
    listing: bool,
    head: bool,
    upload: bool,
) -> (Option<Fault>, Duration, Duration) {
    let mut plan = shared.plan.lock().unwrap_or_else(|e| e.into_inner());
    plan.requests += 1;
    let fault = if plan.uploads_only && !upload {
        None
    } else if let Some((fault, left)) = plan.burst {
        plan.burst = (left > 1).then_some((fault, left - 1));
        Some(fault)
    } else {
        let mut rng = shared.rng.lock().unwrap_or_else(|e| e.into_inner());
        if plan.kinds.is_empty() || !rng.random_bool(plan.rate.clamp(0.0, 1.0)) {
            None
        } else {
            let fault = plan.kinds[rng.random_range(0..plan.kinds.len())];
            if matches!(fault, Fault::Forbidden | Fault::NotFound) {
                plan.burst = Some((fault, BURST - 1));
            }
            Some(fault)
        }
    };
    if let Some(fault) = fault {
        *plan.injected.entry(fault).or_default() += 1;
    }
    let hold = match (listing, head) {
        (true, _) => plan.hold_listings,
        (_, true) => plan.hold_next_head.take().unwrap_or_default(),
        _ => Duration::ZERO,
    };
    if !hold.is_zero() {
        plan.held += 1;
    }
    (fault, plan.stall, hold)
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn error_answer(status: u16, code: &str, retry_after: bool) -> hyper::Response<Body> {
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>\
         <Message>injected by the test proxy</Message></Error>"
    );
    let mut builder = hyper::Response::builder()
        .status(status)
        .header("content-type", "application/xml");
    if retry_after {
        builder = builder.header("retry-after", "1");
    }
    builder.body(full(xml)).unwrap()
}

async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { handle(req, &shared).await }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

/// Sends `req` (its body already read) to the server; the answer with its whole body.
async fn forward(
    shared: &Shared,
    parts: hyper::http::request::Parts,
    body: Bytes,
) -> std::io::Result<(hyper::http::response::Parts, Bytes)> {
    let io_error = |e: hyper::Error| std::io::Error::other(e.to_string());
    let stream = tokio::net::TcpStream::connect(shared.upstream).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(io_error)?;
    tokio::spawn(connection);
    let answer = sender
        .send_request(hyper::Request::from_parts(parts, Full::new(body)))
        .await
        .map_err(io_error)?;
    let (parts, body) = answer.into_parts();
    let body = body.collect().await.map_err(io_error)?.to_bytes();
    Ok((parts, body))
}

async fn handle(
    req: hyper::Request<hyper::body::Incoming>,
    shared: &Shared,
) -> Result<hyper::Response<Body>, std::io::Error> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .to_bytes();
    let listing = parts.method == hyper::Method::GET
        && parts
            .uri
            .query()
            .is_some_and(|q| q.split('&').any(|p| p == "list-type=2"));
    // POST ?delete is DeleteObjects, not an upload.
    let upload = parts.method == hyper::Method::POST
        && !parts
            .uri
            .query()
            .is_some_and(|q| q.split('&').any(|p| p == "delete" || p == "delete="))
        || parts.method == hyper::Method::PUT && !parts.headers.contains_key("x-amz-copy-source");
    let (fault, stall, hold) = choose(shared, listing, parts.method == hyper::Method::HEAD, upload);
    match fault {
        Some(Fault::Latency) => {
            let ms = rand::rng().random_range(50..300);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Some(Fault::Stall) => tokio::time::sleep(stall).await,
        Some(Fault::ServerError) => return Ok(error_answer(500, "InternalError", false)),
        Some(Fault::SlowDown) => return Ok(error_answer(503, "SlowDown", true)),
        Some(Fault::Forbidden) => return Ok(error_answer(403, "AccessDenied", false)),
        Some(Fault::NotFound) => return Ok(error_answer(404, "NoSuchKey", false)),
        Some(Fault::ResetBeforeAnswer) => {
            if rand::rng().random_bool(0.5) {
                let _ = forward(shared, parts, body).await;
            }
            return Err(std::io::Error::other("injected: connection closed"));
        }
        _ => {}
    }
    let (mut answer, body) = forward(shared, parts, body).await?;
    tokio::time::sleep(hold).await;
    let half = body.slice(..body.len() / 2);
    match fault {
        Some(Fault::ResetMidBody) if body.len() > 1 => {
            let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
                Ok(Frame::data(half)),
                Err(std::io::Error::other(
                    "injected: connection broken mid-body",
                )),
            ];
            let stream = StreamBody::new(futures_util::stream::iter(frames));
            Ok(hyper::Response::from_parts(answer, stream.boxed()))
        }
        Some(Fault::TruncatedWrongLength) if body.len() > 1 => {
            let half = if body.starts_with(b"<") {
                let end = half.iter().rposition(|b| *b == b'>').map_or(0, |at| at + 1);
                body.slice(..end)
            } else {
                half
            };
            answer.headers.insert(
                hyper::header::CONTENT_LENGTH,
                hyper::header::HeaderValue::from(half.len()),
            );
            Ok(hyper::Response::from_parts(answer, full(half)))
        }
        _ => Ok(hyper::Response::from_parts(answer, full(body))),
    }
}
