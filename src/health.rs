//! `/healthz` (the process is alive), `/readyz` (connected to RabbitMQ and Postgres and
//! consuming) and `/metrics` (Prometheus text) on `HTTP_ADDR`, for orchestrators and
//! monitoring.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::Store;

/// Whether the worker is consuming; set by the consumer loop.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, consuming: bool) {
        self.0.store(consuming, Ordering::Relaxed);
    }

    pub fn consuming(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct AppState {
    readiness: Readiness,
    store: Store,
    metrics: Arc<Metrics>,
}

/// Serves the endpoints until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    store: Store,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics_text))
        .with_state(AppState {
            readiness,
            store,
            metrics,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn metrics_text(State(state): State<AppState>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn ready(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if !state.readiness.consuming() {
        return (StatusCode::SERVICE_UNAVAILABLE, "not consuming\n");
    }
    match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "postgres unreachable\n"),
    }
}
