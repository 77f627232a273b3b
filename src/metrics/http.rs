//! The HTTP endpoint of `--metrics-addr`: `/metrics` (Prometheus text format 0.0.4, or
//! OpenMetrics 1.0 when the scraper's `Accept` asks for it), `/healthz` (the process answers)
//! and `/readyz` (the mount is up and answers a `stat` through the kernel).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ACCEPT, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// How long `/readyz` waits for its check (a hung mount makes `stat` block).
const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// A readiness check: `Ok` when ready, else why not (sent with the 503).
pub type ReadyCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What `/readyz` asks; "not mounted yet" until the mount sets a check.
#[derive(Clone)]
pub struct Readiness {
    check: Arc<RwLock<Option<ReadyCheck>>>,
    /// A check is running: a hung mount keeps its thread, so at most one is ever stuck and
    /// probes (or anyone reaching the port) can't use up the blocking threads keepfs's own
    /// fsyncs need.
    running: Arc<AtomicBool>,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            check: Arc::new(RwLock::new(None)),
            running: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// Clears [`Readiness::running`] when the check's thread ends.
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Readiness {
    /// From now on `/readyz` answers with `check`.
    pub fn set(&self, check: ReadyCheck) {
        *self.check.write().unwrap_or_else(|e| e.into_inner()) = Some(check);
    }

    async fn check(&self) -> Result<(), String> {
        let check = self.check.read().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(check) = check else {
            return Err("not mounted yet".to_owned());
        };
        if self.running.swap(true, Ordering::SeqCst) {
            return Err(
                "the previous check has not finished (the mount is slow or hung)".to_owned(),
            );
        }
        let running = Running(Arc::clone(&self.running));
        let task = tokio::task::spawn_blocking(move || {
            let _running = running;
            check()
        });
        match tokio::time::timeout(READY_CHECK_TIMEOUT, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(format!("readiness check failed: {e}")),
            Err(_) => Err(format!(
                "the mount did not answer within {} s",
                READY_CHECK_TIMEOUT.as_secs()
            )),
        }
    }
}

/// Binds `addr` (so a taken port fails the mount at once) and serves the endpoints on the
/// current tokio runtime. Returns the bound address (port 0 picks one).
pub async fn serve(addr: SocketAddr, readiness: Readiness) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: don't spin.
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let readiness = readiness.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let readiness = readiness.clone();
                    async move { Ok::<_, Infallible>(answer(req, &readiness).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(error = %e, "metrics connection ended");
                }
            });
        }
    });
    Ok(bound)
}

async fn answer(req: Request<Incoming>, readiness: &Readiness) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".to_owned());
    }
    match req.uri().path() {
        "/metrics" => {
            let openmetrics = req
                .headers()
                .get(ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/openmetrics-text"));
            let body = super::get().encode(openmetrics);
            let content_type = if openmetrics {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            } else {
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE
            };
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(content_type),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n".to_owned()),
        "/readyz" => match readiness.check().await {
            Ok(()) => text(StatusCode::OK, "ready\n".to_owned()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "keepfs serves /metrics, /healthz and /readyz\n".to_owned(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut response = agent.get(format!("http://{addr}{path}")).call().unwrap();
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_string().unwrap())
    }

    #[test]
    fn readiness_follows_its_check() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let readiness = Readiness::default();
        let addr = runtime
            .block_on(serve("127.0.0.1:0".parse().unwrap(), readiness.clone()))
            .unwrap();
        assert_eq!(get(addr, "/healthz"), (200, "ok\n".to_owned()));
        assert_eq!(
            get(addr, "/readyz"),
            (503, "not ready: not mounted yet\n".to_owned())
        );
        readiness.set(Arc::new(|| Ok(())));
        assert_eq!(get(addr, "/readyz"), (200, "ready\n".to_owned()));
        readiness.set(Arc::new(|| Err("gone".to_owned())));
        assert_eq!(get(addr, "/readyz"), (503, "not ready: gone\n".to_owned()));
        let (status, body) = get(addr, "/metrics");
        assert_eq!(status, 200);
        assert!(
            body.contains("# TYPE keepfs_read_bytes_total counter"),
            "{body}"
        );
        assert_eq!(get(addr, "/other").0, 404);
    }
}
