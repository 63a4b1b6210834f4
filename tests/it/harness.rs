//! The test harness: a fresh Postgres database and RabbitMQ vhost per test, the real worker
//! in-process, and a receiver whose answers each test scripts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use clap::Parser;
use lapin::options::BasicGetOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::Value;
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use webhook_worker::cli::Cli;
use webhook_worker::config::LogFormat;
use webhook_worker::{Config, Worker, topology};

/// Where the services are; override with TEST_DATABASE_URL and TEST_AMQP_BASE.
fn admin_db_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn amqp_base() -> String {
    std::env::var("TEST_AMQP_BASE").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into())
}

/// One test's isolated world: its own database and vhost, removed when dropped.
pub struct TestEnv {
    pub db_url: String,
    pub amqp_url: String,
    pub pool: PgPool,
    db_name: String,
    vhost: String,
}

impl TestEnv {
    pub async fn new() -> TestEnv {
        let suffix = Uuid::new_v4().simple().to_string()[..12].to_string();
        let db_name = format!("wwtest_{suffix}");
        let vhost = format!("wwtest_{suffix}");

        let admin = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&admin_db_url())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "Postgres is not reachable at {} ({e}). Start it with \
                     `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` \
                     or run the tests through scripts/test, which starts it.",
                    admin_db_url()
                )
            });
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
            .execute(&admin)
            .await
            .expect("creating the test database");
        admin.close().await;

        rabbitmqctl(&["add_vhost", &vhost]);
        rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);

        let mut db_url = reqwest::Url::parse(&admin_db_url()).expect("TEST_DATABASE_URL is a URL");
        db_url.set_path(&db_name);
        let db_url = db_url.to_string();
        let amqp_url = format!("{}/{vhost}", amqp_base());
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&db_url)
            .await
            .expect("connecting to the test database");
        webhook_worker::store::MIGRATOR
            .run(&pool)
            .await
            .expect("migrating the test database");
        TestEnv {
            db_url,
            amqp_url,
            pool,
            db_name,
            vhost,
        }
    }

    /// A configuration for this environment, with millisecond retries; `args` are extra
    /// command-line flags, as a user would pass them.
    pub fn config(&self, args: &[&str]) -> Config {
        let mut argv = vec![
            "webhook-worker",
            "--database-url",
            &self.db_url,
            "--amqp-url",
            &self.amqp_url,
            "--http-addr",
            "127.0.0.1:0",
            "--retry-schedule",
            "200ms,1500ms,3s",
            "--allow-private-ips",
            "true",
            "--delivery-timeout",
            "5s",
            "--shutdown-timeout",
            "5s",
        ];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
            .expect("test configuration")
            .config
    }

    pub async fn start_worker(&self, args: &[&str]) -> RunningWorker {
        RunningWorker::start(self.config(args)).await
    }

    pub async fn add_webhook(&self, spec: WebhookSpec<'_>) -> Uuid {
        sqlx::query_scalar(
            "INSERT INTO control_plane.webhooks \
               (project_id, event_type, url, http_method, headers, secret, disabled) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        )
        .bind(spec.project)
        .bind(spec.event_type)
        .bind(spec.url)
        .bind(spec.method)
        .bind(spec.headers.clone())
        .bind(spec.secret)
        .bind(spec.disabled)
        .fetch_one(&self.pool)
        .await
        .expect("inserting a webhook")
    }

    async fn amqp(&self) -> Connection {
        Connection::connect(&self.amqp_url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "RabbitMQ is not reachable at {} ({e}). Start it with \
                     `rabbitmq-server -detached && rabbitmqctl await_startup`, or run the \
                     tests through scripts/test, which starts it.",
                    self.amqp_url
                )
            })
    }

    /// Declares the worker's topology, as `publish` or a starting worker would, so that
    /// events published before a worker runs are kept.
    pub async fn declare_topology(&self) {
        let config = self.config(&[]);
        let conn = self.amqp().await;
        topology::declare(&conn, config.queue_type, &config.retry_schedule)
            .await
            .expect("declaring the topology");
        conn.close(200, "bye".into()).await.ok();
    }

    /// Publishes raw bytes as a producer would, to `exchange` (`webhook.events` or "").
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) {
        let conn = self.amqp().await;
        let publisher = webhook_worker::amqp::Publisher::open(&conn).await.unwrap();
        publisher
            .publish(exchange, routing_key, body, props)
            .await
            .unwrap_or_else(|e| panic!("publish to {exchange:?}/{routing_key:?}: {e}"));
        conn.close(200, "bye".into()).await.ok();
    }

    /// Publishes an event (a JSON value) with its `event_type` as routing key.
    pub async fn publish(&self, event: &Value) {
        let routing_key = event["event_type"].as_str().unwrap_or("x").to_string();
        let body = serde_json::to_vec(event).unwrap();
        self.publish_raw(
            topology::EXCHANGE,
            &routing_key,
            &body,
            BasicProperties::default().with_content_type("application/json".into()),
        )
        .await;
    }

    /// Takes `n` messages from the work queue and drops the connection without
    /// acknowledging them, as a worker that died or lost its connection would: the broker
    /// delivers them again, marked redelivered.
    pub async fn take_and_lose(&self, n: usize) {
        use futures_util::StreamExt;
        let conn = self.amqp().await;
        let channel = conn.create_channel().await.unwrap();
        let mut consumer = channel
            .basic_consume(
                topology::WORK_QUEUE.into(),
                "lost".into(),
                Default::default(),
                Default::default(),
            )
            .await
            .unwrap();
        for _ in 0..n {
            consumer.next().await.unwrap().unwrap();
        }
        conn.close(320, "connection lost".into()).await.unwrap();
    }

    /// Takes every message now in `webhook.events.dead`: (body, x-error).
    pub async fn dead_letters(&self) -> Vec<(Vec<u8>, String)> {
        let conn = self.amqp().await;
        let channel = conn.create_channel().await.unwrap();
        let mut out = Vec::new();
        while let Some(msg) = channel
            .basic_get(
                topology::DEAD_QUEUE.into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            let error = topology::header_str(msg.delivery.properties.headers().as_ref(), "x-error")
                .unwrap_or("<no x-error>")
                .to_string();
            out.push((msg.delivery.data.clone(), error));
        }
        conn.close(200, "bye".into()).await.ok();
        out
    }

    /// Takes dead letters until there are `n`, or panics after 10 s.
    pub async fn wait_for_dead_letters(&self, n: usize) -> Vec<(Vec<u8>, String)> {
        let start = Instant::now();
        let mut dead = Vec::new();
        while dead.len() < n {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{} dead letters, expected {n}: {dead:?}",
                dead.len()
            );
            dead.extend(self.dead_letters().await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(dead.len(), n, "{dead:?}");
        dead
    }

    pub async fn delivery(&self, webhook_id: Uuid, event_id: Uuid) -> Option<DeliveryRow> {
        sqlx::query_as(
            "SELECT id, status, attempts, http_status_code, error_type, error_message, \
               response_body, duration_ms, next_retry_at IS NOT NULL AS has_next_retry, delivered_at IS NOT NULL AS is_delivered \
             FROM control_plane.webhook_deliveries WHERE webhook_id = $1 AND event_id = $2",
        )
        .bind(webhook_id)
        .bind(event_id)
        .fetch_optional(&self.pool)
        .await
        .unwrap()
    }

    pub async fn deliveries_of(&self, webhook_id: Uuid) -> Vec<DeliveryRow> {
        sqlx::query_as(
            "SELECT id, status, attempts, http_status_code, error_type, error_message, \
               response_body, duration_ms, next_retry_at IS NOT NULL AS has_next_retry, delivered_at IS NOT NULL AS is_delivered \
             FROM control_plane.webhook_deliveries WHERE webhook_id = $1 ORDER BY created_at",
        )
        .bind(webhook_id)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    pub async fn attempts(&self, delivery_id: Uuid) -> Vec<AttemptRow> {
        sqlx::query_as(
            "SELECT attempt_number, http_status_code, error_type, error_message, succeeded, \
               response_body, started_at \
             FROM control_plane.webhook_delivery_attempts WHERE delivery_id = $1 \
             ORDER BY attempt_number",
        )
        .bind(delivery_id)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    pub async fn webhook(&self, id: Uuid) -> WebhookState {
        sqlx::query_as(
            "SELECT disabled, disabled_at, disabled_reason, \
               consecutive_failures, failing_since IS NOT NULL AS is_failing, \
               last_delivery_at IS NOT NULL AS has_last_delivery, \
               last_failure_at IS NOT NULL AS has_last_failure \
             FROM control_plane.webhooks WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// Waits until the delivery reaches one of `statuses`, or panics after `limit`.
    pub async fn wait_for_status(
        &self,
        webhook_id: Uuid,
        event_id: Uuid,
        statuses: &[&str],
        limit: Duration,
    ) -> DeliveryRow {
        let start = Instant::now();
        loop {
            if let Some(d) = self.delivery(webhook_id, event_id).await
                && statuses.contains(&d.status.as_str())
            {
                return d;
            }
            if start.elapsed() > limit {
                panic!(
                    "delivery of event {event_id} to webhook {webhook_id} did not reach {statuses:?} in {limit:?}; it is {:?}",
                    self.delivery(webhook_id, event_id).await
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        rabbitmqctl_quiet(&["delete_vhost", &self.vhost]);
        let _ = Command::new("psql")
            .args([
                &admin_db_url(),
                "-q",
                "-c",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db_name),
            ])
            .output();
    }
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl").args(args).output().unwrap_or_else(|e| {
        panic!("running rabbitmqctl {args:?} failed ({e}); the tests need RabbitMQ's rabbitmqctl on PATH to create a vhost per test")
    });
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}{}. Is RabbitMQ running? (`rabbitmq-server -detached`)",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rabbitmqctl_quiet(args: &[&str]) {
    let _ = Command::new("rabbitmqctl").args(args).output();
}

pub struct WebhookSpec<'a> {
    pub project: &'a str,
    pub event_type: &'a str,
    pub url: &'a str,
    pub method: &'a str,
    pub headers: Value,
    pub secret: Option<&'a str>,
    pub disabled: bool,
}

impl<'a> WebhookSpec<'a> {
    pub fn new(project: &'a str, event_type: &'a str, url: &'a str) -> Self {
        WebhookSpec {
            project,
            event_type,
            url,
            method: "POST",
            headers: serde_json::json!({}),
            secret: None,
            disabled: false,
        }
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeliveryRow {
    pub id: Uuid,
    pub status: String,
    pub attempts: i32,
    pub http_status_code: Option<i32>,
    pub error_type: Option<String>,
    pub error_message: Option<String>,
    pub response_body: Option<String>,
    pub duration_ms: Option<i32>,
    pub has_next_retry: bool,
    pub is_delivered: bool,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AttemptRow {
    pub attempt_number: i32,
    pub http_status_code: Option<i32>,
    pub error_type: Option<String>,
    pub error_message: Option<String>,
    pub succeeded: bool,
    pub response_body: Option<String>,
    pub started_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WebhookState {
    pub disabled: bool,
    pub disabled_at: Option<chrono::DateTime<chrono::Utc>>,
    pub disabled_reason: Option<String>,
    pub consecutive_failures: i32,
    pub is_failing: bool,
    pub has_last_delivery: bool,
    pub has_last_failure: bool,
}

/// The worker binary as a child process, as users run it.
pub struct WorkerProcess {
    pub child: std::process::Child,
}

impl WorkerProcess {
    /// `webhook-worker run` for this environment, output discarded; `extra_env` on top.
    pub fn command(env: &TestEnv, extra_env: &[(&str, &str)]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_webhook-worker"));
        command
            .arg("run")
            .envs([
                ("DATABASE_URL", env.db_url.as_str()),
                ("AMQP_URL", env.amqp_url.as_str()),
                ("HTTP_ADDR", "127.0.0.1:0"),
                ("ALLOW_PRIVATE_IPS", "true"),
            ])
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .envs(extra_env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        command
    }

    pub fn spawn(env: &TestEnv, extra_env: &[(&str, &str)]) -> WorkerProcess {
        let child = Self::command(env, extra_env)
            .spawn()
            .expect("starting the webhook-worker binary");
        WorkerProcess { child }
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {signal} {pid}");
    }

    /// Waits for the process to exit; its exit code (None when killed by a signal).
    pub async fn wait(mut self) -> Option<i32> {
        tokio::task::spawn_blocking(move || self.child.wait().unwrap().code())
            .await
            .unwrap()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Installs the tracer (without an exporter) once, as the binary does, so that in-process
/// workers propagate trace contexts the same way. Logs stay off unless `RUST_LOG` is set.
fn install_tracer() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let telemetry = webhook_worker::telemetry::init_with(LogFormat::Text, "off")
            .expect("installing the tracer");
        std::mem::forget(telemetry); // lives as long as the test process
    });
}

/// The worker, running in this process until stopped.
pub struct RunningWorker {
    pub stop: CancellationToken,
    pub handle: JoinHandle<anyhow::Result<()>>,
    pub http_addr: SocketAddr,
}

impl RunningWorker {
    pub async fn start(config: Config) -> RunningWorker {
        install_tracer();
        let worker = Worker::build(config).await.expect("building the worker");
        let http_addr = worker.http_addr();
        let stop = CancellationToken::new();
        let handle = tokio::spawn(worker.run_until_stopped(stop.clone()));
        let running = RunningWorker {
            stop,
            handle,
            http_addr,
        };
        running.wait_ready().await;
        running
    }

    pub async fn wait_ready(&self) {
        let url = format!("http://{}/readyz", self.http_addr);
        let start = Instant::now();
        loop {
            if let Ok(r) = reqwest::get(&url).await
                && r.status() == 200
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the worker did not become ready in 20s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.handle.await.expect("the worker task panicked")
    }
}

/// How the receiver answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16),
    /// A status with one extra header.
    WithHeader(u16, &'static str, String),
    /// A status with this body.
    Body(u16, String),
    /// Waits until `Receiver::release` before answering 200.
    Hold,
    /// Waits this long, then answers 200.
    Slow(Duration),
    /// 200 with a body of this many bytes, streamed as fast as the client reads.
    Huge(u64),
    /// 200, then one byte of body a second, forever.
    Trickle,
    /// Never answers.
    Hang,
}

/// A request the receiver saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

#[derive(Default)]
struct ReceiverState {
    scripts: Mutex<HashMap<String, Vec<Reply>>>,
    seen: Mutex<HashMap<String, Vec<Seen>>>,
    release: Notify,
    released: std::sync::atomic::AtomicBool,
}

/// An HTTP server on loopback whose answers, per path, follow a script: the n-th request
/// to a path gets the n-th reply, and the last reply repeats.
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<ReceiverState>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let state = Arc::new(ReceiverState::default());
        let app = axum::Router::new()
            .route("/{path}", axum::routing::any(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { addr, state }
    }

    /// The URL of `path` with its script.
    pub fn url(&self, path: &str, script: Vec<Reply>) -> String {
        self.state
            .scripts
            .lock()
            .unwrap()
            .insert(path.to_string(), script);
        format!("http://{}/{path}", self.addr)
    }

    pub fn set_script(&self, path: &str, script: Vec<Reply>) {
        self.state
            .scripts
            .lock()
            .unwrap()
            .insert(path.to_string(), script);
    }

    pub fn seen(&self, path: &str) -> Vec<Seen> {
        self.state
            .seen
            .lock()
            .unwrap()
            .get(path)
            .cloned()
            .unwrap_or_default()
    }

    pub fn release(&self) {
        self.state
            .released
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.state.release.notify_waiters();
    }

    /// Waits until `path` has seen `n` requests, or panics after `limit`.
    pub async fn wait_for(&self, path: &str, n: usize, limit: Duration) -> Vec<Seen> {
        let start = Instant::now();
        loop {
            let seen = self.seen(path);
            if seen.len() >= n {
                return seen;
            }
            assert!(
                start.elapsed() < limit,
                "{path} saw {} requests in {limit:?}, expected {n}",
                seen.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    Path(path): Path<String>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let reply = {
        let mut seen = state.seen.lock().unwrap();
        let list = seen.entry(path.clone()).or_default();
        list.push(Seen {
            method,
            headers,
            body,
            at: Instant::now(),
        });
        let n = list.len();
        let scripts = state.scripts.lock().unwrap();
        let script = scripts
            .get(&path)
            .cloned()
            .unwrap_or_else(|| vec![Reply::Status(404)]);
        script[(n - 1).min(script.len() - 1)].clone()
    };
    let code = |c: u16| StatusCode::from_u16(c).unwrap();
    match reply {
        Reply::Status(c) => code(c).into_response(),
        Reply::WithHeader(c, name, value) => (code(c), [(name, value)]).into_response(),
        Reply::Body(c, body) => (code(c), body).into_response(),
        Reply::Hold => {
            let notified = state.release.notified();
            if !state.released.load(std::sync::atomic::Ordering::SeqCst) {
                notified.await;
            }
            StatusCode::OK.into_response()
        }
        Reply::Slow(delay) => {
            tokio::time::sleep(delay).await;
            StatusCode::OK.into_response()
        }
        Reply::Huge(total) => {
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let chunks = total.div_ceil(chunk.len() as u64);
            let stream = futures_util::stream::iter(
                (0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
            );
            (StatusCode::OK, axum::body::Body::from_stream(stream)).into_response()
        }
        Reply::Trickle => {
            let stream = futures_util::stream::unfold((), |()| async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Some((Ok::<_, std::io::Error>(Bytes::from_static(b"x")), ()))
            });
            (StatusCode::OK, axum::body::Body::from_stream(stream)).into_response()
        }
        Reply::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
    }
}

/// A new event body for `project`/`event_type`.
pub fn event(project: &str, event_type: &str, data: Value) -> (Uuid, Value) {
    let id = Uuid::new_v4();
    (
        id,
        serde_json::json!({"id": id, "project_id": project, "event_type": event_type, "data": data}),
    )
}

/// The usual set-up: a fresh environment, a receiver, one webhook for project `p` and event
/// type `t` answering `script` at `/path`, and a running worker started with `worker_args`.
pub struct OneHook {
    pub env: TestEnv,
    pub rx: Receiver,
    pub hook: Uuid,
    pub worker: RunningWorker,
    pub path: String,
}

impl OneHook {
    pub async fn start(path: &str, script: Vec<Reply>, worker_args: &[&str]) -> OneHook {
        let env = TestEnv::new().await;
        let rx = Receiver::start().await;
        let hook = env
            .add_webhook(WebhookSpec::new("p", "t", &rx.url(path, script)))
            .await;
        let worker = env.start_worker(worker_args).await;
        OneHook {
            env,
            rx,
            hook,
            worker,
            path: path.to_string(),
        }
    }

    /// Publishes a new event of type `t`; returns its id.
    pub async fn publish(&self) -> Uuid {
        let (id, body) = event("p", "t", serde_json::json!({}));
        self.env.publish(&body).await;
        id
    }

    pub async fn wait(&self, event_id: Uuid, statuses: &[&str], secs: u64) -> DeliveryRow {
        self.env
            .wait_for_status(self.hook, event_id, statuses, Duration::from_secs(secs))
            .await
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.rx.seen(&self.path)
    }

    pub async fn stop(self) {
        self.worker.stop().await.expect("the worker stops cleanly");
    }
}
