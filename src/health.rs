//! `/healthz` (the process is alive) and `/readyz` (connected to RabbitMQ and Postgres and
//! consuming) on `HTTP_ADDR`, for load balancers and orchestrators.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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
}

/// Serves the endpoints until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    store: Store,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(AppState { readiness, store });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
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
