//! The node's HTTP endpoint: `/metrics` (the classic text format, or OpenMetrics when the
//! scraper asks for it; see [`crate::exposition`]), `/healthz` (process alive), `/readyz`
//! (start-up finished and every readiness check passing now; see [`crate::health`]), and the
//! JSON API: `GET /api/devices/{device}/history?prop=&since=&limit=` (docs/history.md).
//!
//! The API answers loopback clients only, for now: it shows device values, and this listener
//! has no login yet (`/metrics` is meant for a Prometheus, which may sit on another host).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::config::HttpConfig;

use crate::health::Health;
use crate::history::{Query, QueryError};
use crate::metrics::Metrics;

/// What the HTTP handlers read.
#[derive(Clone)]
pub struct HttpState {
    /// The node's metrics.
    pub metrics: Arc<Metrics>,
    /// Readiness: lifecycle phase and checks.
    pub health: Arc<Health>,
    /// The history task's requests (it answers once it runs).
    pub history: mpsc::Sender<Query>,
}

/// The address of the connection a request came on.
#[derive(Clone, Copy)]
struct Peer(SocketAddr);

/// Binds the listener (so a taken port fails start-up) and returns the server future.
///
/// Every connection is bounded: its request headers must arrive within
/// `http.header_timeout_ms` (the same timer closes an idle keep-alive connection), and at most
/// `http.max_connections` are open at once, so slow or half-open clients (slowloris) cannot pile
/// up; a connection past the limit is closed at once and counted.
pub async fn bind(
    cfg: &HttpConfig,
    state: HttpState,
    shutdown: CancellationToken,
) -> anyhow::Result<impl std::future::Future<Output = std::io::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("HTTP listener: cannot listen on {}", cfg.listen))?;
    let refused = state.metrics.http_connections_refused.clone();
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/devices/{device}/history", get(history))
        .with_state(state);
    let limits = Limits {
        header_timeout: Duration::from_millis(cfg.header_timeout_ms),
        slots: Arc::new(Semaphore::new(cfg.max_connections)),
        refused,
    };
    Ok(run(listener, app, limits, shutdown))
}

struct Limits {
    header_timeout: Duration,
    slots: Arc<Semaphore>,
    refused: Counter,
}

/// How long a stop waits for responses under way.
const DRAIN: Duration = Duration::from_secs(2);

async fn run(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = limits.slots.clone().try_acquire_owned() else {
            limits.refused.inc();
            debug!(%peer, "HTTP connection refused: http.max_connections are open");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(limits.header_timeout);
        let service = hyper_util::service::TowerToHyperService::new(
            app.clone().layer(axum::Extension(Peer(peer))),
        );
        let stop = shutdown.clone();
        connections.spawn(async move {
            let _slot = slot;
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                ended = conn.as_mut() => {
                    if let Err(e) = ended {
                        debug!(%peer, error = %e, "HTTP connection ended");
                    }
                }
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN, conn).await;
                }
            }
        });
    }
    connections.close();
    let _ = tokio::time::timeout(DRAIN, connections.wait()).await;
    Ok(())
}

async fn metrics(
    State(state): State<HttpState>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    use crate::exposition::{self, Format};
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = exposition::negotiate(accept);
    match state.metrics.encode() {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, format.content_type())],
            match format {
                Format::OpenMetrics => body,
                Format::Text => exposition::to_text(&body),
            },
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("cannot encode metrics: {e}\n"),
        ),
    }
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    let report = state.health.report();
    let code = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, report.text)
}

/// `?prop=&since=&limit=` of a history request.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryParams {
    prop: String,
    since: Option<i64>,
    limit: Option<usize>,
}

/// Longest an API request waits for the history task.
const API_TIMEOUT: Duration = Duration::from_secs(5);

fn json_reply(code: StatusCode, body: &impl serde::Serialize) -> axum::response::Response {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    (code, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

fn api_error(code: StatusCode, message: String) -> axum::response::Response {
    json_reply(code, &serde_json::json!({ "error": message }))
}

async fn history(
    State(state): State<HttpState>,
    axum::Extension(Peer(peer)): axum::Extension<Peer>,
    axum::extract::Path(device): axum::extract::Path<String>,
    params: Result<axum::extract::Query<HistoryParams>, axum::extract::rejection::QueryRejection>,
) -> axum::response::Response {
    if !peer.ip().is_loopback() {
        return api_error(
            StatusCode::FORBIDDEN,
            "the API answers clients on this host only (it has no login yet)".into(),
        );
    }
    let params = match params {
        Ok(axum::extract::Query(p)) => p,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                format!("query string: {e} (expected prop=NAME, optional since=MS and limit=N)"),
            )
        }
    };
    let device = match edgetwin_contract::DeviceId::new(&device) {
        Ok(d) => d,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, format!("device id: {e}")),
    };
    let (reply, answer) = oneshot::channel();
    let query = Query {
        device: device.clone(),
        request: edgetwin_contract::HistoryRequest {
            id: None,
            property: params.prop.clone(),
            since: params.since,
            limit: params.limit,
        },
        reply,
    };
    let unavailable = || {
        api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the history is not answering (starting or stopping)".into(),
        )
    };
    if state.history.send(query).await.is_err() {
        return unavailable();
    }
    match tokio::time::timeout(API_TIMEOUT, answer).await {
        Ok(Ok(Ok(result))) => json_reply(StatusCode::OK, &result),
        Ok(Ok(Err(e))) => {
            let code = match e {
                QueryError::UnknownDevice | QueryError::UnknownProperty => StatusCode::NOT_FOUND,
                QueryError::Disabled | QueryError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            api_error(code, e.message(&device, &params.prop))
        }
        _ => unavailable(),
    }
}
