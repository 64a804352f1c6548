//! The HTTP endpoint (hyper, HTTP/1.1): `GET /metrics` (OpenMetrics text), `/healthz` (the
//! process answers) and `/readyz` (200 when ready, 503 with the reason, both plain text).
//! What "ready" means, and which gauges to refresh before a scrape, the relay says through
//! [`Probe`].

use super::Metrics;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// What the endpoint asks the relay.
pub trait Probe: Send + Sync + 'static {
    /// Set the gauges that are read from state rather than recorded (queue, keys).
    fn refresh(&self, metrics: &Metrics);
    /// `Ok(report)` when ready, `Err(reasons)` when not; both are plain text for the body.
    /// May block (it writes to the spool): called on the blocking pool.
    fn ready(&self) -> Result<String, String>;
}

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 32;
/// A client has this long to send its request headers.
const HEADER_WAIT: Duration = Duration::from_secs(10);
/// A connection is closed after this long, whatever it is doing.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// Serve until `stop` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    probe: Arc<dyn Probe>,
    stop: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = &mut stop => break,
        };
        let (tcp, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            _ = &mut stop => break,
        };
        let (metrics, probe) = (metrics.clone(), probe.clone());
        conns.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let (metrics, probe) = (metrics.clone(), probe.clone());
                async move { Ok::<_, std::convert::Infallible>(answer(req, &metrics, probe).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_WAIT)
                .serve_connection(TokioIo::new(tcp), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
        });
    }
    conns.abort_all();
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

async fn answer<B>(
    req: Request<B>,
    metrics: &Metrics,
    probe: Arc<dyn Probe>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET and HEAD\n".into(),
        );
        r.headers_mut()
            .insert(hyper::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => match metrics.scrape(|m| probe.refresh(m)) {
            Ok(text) => reply(StatusCode::OK, OPENMETRICS, text),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                TEXT,
                format!("encoding the metrics failed: {e}\n"),
            ),
        },
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz" => match tokio::task::spawn_blocking(move || probe.ready()).await {
            Ok(Ok(report)) => reply(StatusCode::OK, TEXT, format!("ready\n{report}")),
            Ok(Err(why)) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("not ready\n{why}"),
            ),
            Err(e) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("not ready\nthe readiness check failed: {e}\n"),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: this endpoint serves /metrics, /healthz and /readyz\n".into(),
        ),
    }
}
