//! The benchmark of issue #5: the real release binary against the real RabbitMQ and
//! Postgres, a fast recording receiver in this process, and six scenarios (drain, fan-out,
//! latency, hung receiver, waiting retries, ceilings). Prints one markdown table and exits
//! non-zero only when a correctness check fails (a missed target is a measurement, not an
//! error). Run it through `scripts/bench`, which builds the release binary first.
//!
//!     cargo run --release --example bench [-- --quick] [-- scenario ...]
//!
//! Scenarios: `ceilings`, `drain`, `fanout`, `latency`, `hung`, `retries`. `BENCH_SCALE`
//! (default 1, `--quick` = 0.1) scales every count and duration. The ceilings, drain,
//! fan-out and hung receiver run `BENCH_TRIALS` times (default 3), interleaved, and their
//! figures are the medians. Each scenario gets its own database and vhost, named
//! `wwbench_*`, dropped at its end.

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Confirmation};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;
use webhook_worker::amqp;
use webhook_worker::config::{QueueType, RetrySchedule};
use webhook_worker::topology;

const BIN: &str = "target/release/webhook-worker";
/// The worker's default schedule: the delay queues it declares must match it exactly.
const DEFAULT_SCHEDULE: &str = "5s,5m,30m,2h,5h,10h,14h,20h,24h";
const PROJECT: &str = "bench";
const EVENT_TYPE: &str = "bench.event";
/// Publishes awaiting their confirm at once, for every bulk publisher here.
const CONFIRM_WINDOW: usize = 1000;
/// The worker's prefetch with the default `MAX_IN_FLIGHT` (256 x 2), used by the broker
/// ceiling's consumer too.
const PREFETCH: u16 = 512;

/// Lets the previous step's background work finish before a measurement: a Postgres
/// checkpoint (the WAL of the last scenario written out now, not during the next) and a
/// pause for RabbitMQ to write its queue segments.
async fn quiesce() -> anyhow::Result<()> {
    let admin = PgPool::connect(&admin_db()).await?;
    sqlx::query("CHECKPOINT").execute(&admin).await?;
    admin.close().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    Ok(())
}

fn admin_db() -> String {
    std::env::var("BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn amqp_base() -> String {
    std::env::var("BENCH_AMQP_BASE").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into())
}

fn now_us() -> i64 {
    Utc::now().timestamp_micros()
}

// ---------------------------------------------------------------------------------------
// The receiver

/// What the receiver saw: requests per (path, webhook-id), the publish-to-receive latency
/// of every request whose event data carries `t` (publish time, unix microseconds), and
/// running totals per kind of path.
#[derive(Default)]
struct Recorder {
    ok: AtomicU64,
    failed: AtomicU64,
    hung: AtomicU64,
    seen: Mutex<HashMap<(String, String), u32>>,
    latencies_us: Mutex<Vec<i64>>,
}

impl Recorder {
    fn reset(&self) {
        self.ok.store(0, Ordering::SeqCst);
        self.failed.store(0, Ordering::SeqCst);
        self.hung.store(0, Ordering::SeqCst);
        self.seen.lock().unwrap().clear();
        self.latencies_us.lock().unwrap().clear();
    }

    fn requests(&self) -> HashMap<(String, String), u32> {
        self.seen.lock().unwrap().clone()
    }
}

#[derive(serde::Deserialize)]
struct SentBody {
    data: Option<SentData>,
}

#[derive(serde::Deserialize)]
struct SentData {
    t: Option<i64>,
}

/// Paths: `/ok/<hook>` answers 204 at once, `/fail/<hook>` 500 at once, `/hang/<hook>`
/// never answers (the worker gives up at `DELIVERY_TIMEOUT`).
async fn receive(
    State(rec): State<Arc<Recorder>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let received = now_us();
    let path = uri.path().trim_start_matches('/').to_string();
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if let Ok(SentBody {
        data: Some(SentData { t: Some(t) }),
    }) = serde_json::from_slice(&body)
    {
        rec.latencies_us.lock().unwrap().push(received - t);
    }
    let kind = path.split('/').next().unwrap_or("").to_string();
    *rec.seen.lock().unwrap().entry((path, id)).or_default() += 1;
    match kind.as_str() {
        "fail" => {
            rec.failed.fetch_add(1, Ordering::SeqCst);
            StatusCode::INTERNAL_SERVER_ERROR
        }
        "hang" => {
            rec.hung.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
            unreachable!()
        }
        _ => {
            rec.ok.fetch_add(1, Ordering::SeqCst);
            StatusCode::NO_CONTENT
        }
    }
}

/// Starts a receiver on loopback (HTTP/1.1, keep-alive) and returns its address.
async fn start_receiver(rec: Arc<Recorder>) -> anyhow::Result<SocketAddr> {
    let app = axum::Router::new().fallback(receive).with_state(rec);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

// ---------------------------------------------------------------------------------------
// Databases, vhosts, webhooks, events

/// A database and a vhost for one scenario.
struct Env {
    name: String,
    db_url: String,
    amqp_url: String,
    pool: PgPool,
}

impl Env {
    async fn create(scenario: &str) -> anyhow::Result<Env> {
        let name = format!(
            "wwbench_{scenario}_{}",
            &Uuid::new_v4().simple().to_string()[..8]
        );
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_db())
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await?;
        admin.close().await;
        sh("rabbitmqctl", &["add_vhost", &name])?;
        sh(
            "rabbitmqctl",
            &["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"],
        )?;
        let mut db_url = url::Url::parse(&admin_db())?;
        db_url.set_path(&name);
        let db_url = db_url.to_string();
        let amqp_url = format!("{}/{name}", amqp_base());
        let status = Command::new(BIN)
            .arg("migrate")
            .env("DATABASE_URL", &db_url)
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "webhook-worker migrate failed");
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(&db_url)
            .await?;
        Ok(Env {
            name,
            db_url,
            amqp_url,
            pool,
        })
    }

    /// Declares the worker's topology (default queue type and schedule), so that events
    /// published before the worker starts are kept.
    async fn declare_topology(&self) -> anyhow::Result<()> {
        let conn = amqp::connect(&self.amqp_url).await?;
        let schedule: RetrySchedule = DEFAULT_SCHEDULE.parse().map_err(anyhow::Error::msg)?;
        topology::declare(&conn, QueueType::Quorum, &schedule).await?;
        let _ = conn.close(200, "declared".into()).await;
        Ok(())
    }

    /// Registers one webhook per path (`ok/0`, `hang/9`, …) for the bench's events.
    async fn add_hooks(&self, rx: SocketAddr, paths: &[String]) -> anyhow::Result<Hooks> {
        let mut by_id = HashMap::new();
        for path in paths {
            let id: Uuid = sqlx::query_scalar(
                "INSERT INTO control_plane.webhooks (project_id, event_type, url) \
                 VALUES ($1, $2, $3) RETURNING id",
            )
            .bind(PROJECT)
            .bind(EVENT_TYPE)
            .bind(format!("http://{rx}/{path}"))
            .fetch_one(&self.pool)
            .await?;
            by_id.insert(id, path.clone());
        }
        Ok(Hooks { by_id })
    }

    /// Counts the deliveries with this status (and, if given, this many attempts).
    async fn count_status(&self, status: &str, attempts: Option<i32>) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM control_plane.webhook_deliveries \
             WHERE status = $1 AND ($2::int IS NULL OR attempts = $2)",
        )
        .bind(status)
        .bind(attempts)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn queue_depth(&self, queue: &str) -> anyhow::Result<u32> {
        let conn = amqp::connect(&self.amqp_url).await?;
        let channel = conn.create_channel().await?;
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let _ = conn.close(200, "bye".into()).await;
        Ok(q.message_count())
    }

    async fn drop_all(self) {
        self.pool.close().await;
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.name])
            .output();
        if let Ok(admin) = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_db())
            .await
        {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&admin)
            .await;
            admin.close().await;
        }
    }
}

struct Hooks {
    by_id: HashMap<Uuid, String>,
}

fn paths(kind: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{kind}/{i}")).collect()
}

/// A confirmed publisher that keeps up to `CONFIRM_WINDOW` publishes awaiting their
/// confirm, so that it is not limited by one round trip per message.
struct BulkPublisher {
    conn: lapin::Connection,
    channel: lapin::Channel,
    pending: VecDeque<lapin::PublisherConfirm>,
}

impl BulkPublisher {
    async fn open(amqp_url: &str) -> anyhow::Result<BulkPublisher> {
        let conn = amqp::connect(amqp_url).await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(BulkPublisher {
            conn,
            channel,
            pending: VecDeque::new(),
        })
    }

    async fn publish(&mut self, exchange: &str, key: &str, body: &[u8]) -> anyhow::Result<()> {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await?;
        self.pending.push_back(confirm);
        while self.pending.len() >= CONFIRM_WINDOW {
            self.settle_one().await?;
        }
        Ok(())
    }

    async fn settle_one(&mut self) -> anyhow::Result<()> {
        if let Some(confirm) = self.pending.pop_front() {
            match confirm.await? {
                Confirmation::Ack(None) => {}
                other => anyhow::bail!("the broker did not take a message: {other:?}"),
            }
        }
        Ok(())
    }

    async fn finish(mut self) -> anyhow::Result<()> {
        while !self.pending.is_empty() {
            self.settle_one().await?;
        }
        let _ = self.conn.close(200, "published".into()).await;
        Ok(())
    }
}

fn event_body(id: Uuid, t: Option<i64>, i: usize) -> String {
    match t {
        Some(t) => format!(
            r#"{{"id":"{id}","project_id":"{PROJECT}","event_type":"{EVENT_TYPE}","data":{{"t":{t},"i":{i}}}}}"#
        ),
        None => format!(
            r#"{{"id":"{id}","project_id":"{PROJECT}","event_type":"{EVENT_TYPE}","data":{{"i":{i}}}}}"#
        ),
    }
}

/// Publishes `n` events (while no worker runs); returns their ids.
async fn publish_events(env: &Env, n: usize) -> anyhow::Result<Vec<Uuid>> {
    let mut publisher = BulkPublisher::open(&env.amqp_url).await?;
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let id = Uuid::new_v4();
        publisher
            .publish(
                topology::EXCHANGE,
                EVENT_TYPE,
                event_body(id, None, i).as_bytes(),
            )
            .await?;
        ids.push(id);
    }
    publisher.finish().await?;
    Ok(ids)
}

// ---------------------------------------------------------------------------------------
// The worker process

/// The release binary in a child process, on the defaults users get but for
/// `ALLOW_PRIVATE_IPS=true` (the receiver is on loopback) and the given extras.
struct Worker {
    child: Child,
    port: u16,
}

/// Configuration the worker reads from the environment: cleared, so that the bench runs
/// on the defaults whatever the calling shell exports.
const WORKER_VARS: &[&str] = &[
    "DATABASE_POOL_SIZE",
    "RETRY_SCHEDULE",
    "DISABLE_AFTER_FAILURES",
    "DISABLE_AFTER_FAILING_FOR",
    "DELIVERY_TIMEOUT",
    "MAX_IN_FLIGHT",
    "MAX_IN_FLIGHT_PER_WEBHOOK",
    "SHUTDOWN_TIMEOUT",
    "QUEUE_TYPE",
    "LOG_FORMAT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
];

impl Worker {
    fn start(env: &Env, extra: &[(&str, &str)]) -> anyhow::Result<Worker> {
        let port = StdListener::bind("127.0.0.1:0")?.local_addr()?.port();
        // BENCH_WORKER_WRAPPER runs the worker under another program, e.g.
        // `valgrind --tool=massif` for a heap profile.
        let wrapper = std::env::var("BENCH_WORKER_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut cmd = match words.next() {
            Some(program) => {
                let mut cmd = Command::new(program);
                cmd.args(words).arg(BIN);
                cmd
            }
            None => Command::new(BIN),
        };
        cmd.arg("run");
        for var in WORKER_VARS {
            cmd.env_remove(var);
        }
        cmd.env("DATABASE_URL", &env.db_url)
            .env("AMQP_URL", &env.amqp_url)
            .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("ALLOW_PRIVATE_IPS", "true")
            .env(
                "RUST_LOG",
                std::env::var("BENCH_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(log_file(&env.name)?);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        Ok(Worker {
            child: cmd.spawn()?,
            port,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for `/readyz`; returns the instant and wall-clock time it answered 200.
    async fn wait_ready(&self) -> anyhow::Result<(Instant, DateTime<Utc>)> {
        let url = format!("http://127.0.0.1:{}/readyz", self.port);
        let client = reqwest::Client::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if let Ok(r) = client.get(&url).send().await
                && r.status() == 200
            {
                return Ok((Instant::now(), Utc::now()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::bail!("the worker was not ready in 60 s")
    }

    /// A counter or gauge from the worker's `/metrics`, summed over the series whose labels
    /// contain `labels` ("" for all).
    async fn metric(&self, name: &str, labels: &str) -> Option<f64> {
        let url = format!("http://127.0.0.1:{}/metrics", self.port);
        let text = reqwest::get(&url).await.ok()?.text().await.ok()?;
        let values = text.lines().filter_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            let family = key.split('{').next()?;
            (family == name && key.contains(labels))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        });
        Some(values.sum())
    }

    /// SIGTERM, and waits for the exit (in-flight attempts finish first).
    async fn stop(mut self) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::ensure!(status.success(), "the worker exited with {status}");
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                anyhow::bail!("the worker did not exit within 60 s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// With `BENCH_PERF=<file>`, the drain and fan-out scenarios profile the worker while it
/// works, into `<file>.drain` and `<file>.fanout`:
/// `perf record` (cpu-clock, so it works where hardware counters are not exposed), with
/// call graphs as `BENCH_PERF_CALLGRAPH` says (default `fp`).
fn perf_record(pid: u32, out: &str) -> anyhow::Result<Child> {
    let callgraph = std::env::var("BENCH_PERF_CALLGRAPH").unwrap_or_else(|_| "fp".into());
    let child = Command::new("perf")
        .args(["record", "-e", "cpu-clock", "-F", "999", "--call-graph"])
        .arg(&callgraph)
        .args(["-o", out, "-p", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(child)
}

/// The worker's log (RUST_LOG=warn unless `BENCH_WORKER_LOG` says otherwise) goes to
/// `target/bench-logs/<scenario>.log`, so that the table stays readable.
fn log_file(name: &str) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all("target/bench-logs")?;
    Ok(std::fs::File::create(format!(
        "target/bench-logs/{name}.log"
    ))?)
}

/// Resident set now and at its peak (VmRSS, VmHWM), in MiB.
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU seconds (user + system) the process has used.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    ticks / clk_tck()
}

fn clk_tck() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Waits until `done` holds, polling every `every`; false when `limit` passed first.
async fn wait_for<F, Fut>(limit: Duration, every: Duration, mut done: F) -> anyhow::Result<bool>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let start = Instant::now();
    loop {
        if done().await? {
            return Ok(true);
        }
        if start.elapsed() > limit {
            return Ok(false);
        }
        tokio::time::sleep(every).await;
    }
}

// ---------------------------------------------------------------------------------------
// Correctness

/// Checks the tables against what the receiver saw; returns the problems found.
/// - every (webhook, event) has at most one delivery row, and its `attempts` equals its
///   attempt rows;
/// - for every (webhook, event), the attempt rows equal the requests the receiver saw (so
///   per webhook too), and no request came without a delivery;
/// - with `complete`, there is a delivery for every event and webhook, and those of `ok`
///   webhooks are `delivered` with one attempt.
async fn check(
    env: &Env,
    rec: &Recorder,
    hooks: &Hooks,
    events: &[Uuid],
    complete: bool,
) -> anyhow::Result<Vec<String>> {
    let rows: Vec<(Uuid, Uuid, String, i32, i64)> = sqlx::query_as(
        "SELECT d.webhook_id, d.event_id, d.status, d.attempts, \
           (SELECT count(*) FROM control_plane.webhook_delivery_attempts a WHERE a.delivery_id = d.id) \
         FROM control_plane.webhook_deliveries d",
    )
    .fetch_all(&env.pool)
    .await?;
    let mut problems = Vec::new();
    let mut note = |p: String| {
        if problems.len() < 10 {
            problems.push(p);
        }
    };
    let mut seen = rec.requests();
    let mut keys = std::collections::HashSet::new();
    let mut per_hook_rows: HashMap<&str, i64> = HashMap::new();
    for (webhook, event, status, attempts, rows) in &rows {
        let Some(path) = hooks.by_id.get(webhook) else {
            note(format!("delivery to unknown webhook {webhook}"));
            continue;
        };
        if !keys.insert((*webhook, *event)) {
            note(format!("two deliveries for {path} / {event}"));
        }
        if i64::from(*attempts) != *rows {
            note(format!(
                "{path} / {event}: attempts = {attempts} but {rows} attempt rows"
            ));
        }
        let requests = seen.remove(&(path.clone(), event.to_string())).unwrap_or(0);
        if i64::from(requests) != *rows {
            note(format!(
                "{path} / {event}: {rows} attempt rows but the receiver saw {requests} requests"
            ));
        }
        *per_hook_rows.entry(path).or_default() += rows;
        if complete && path.starts_with("ok/") && (status != "delivered" || *rows != 1) {
            note(format!(
                "{path} / {event}: {status} after {rows} attempts, expected delivered after 1"
            ));
        }
    }
    for ((path, id), n) in seen {
        note(format!(
            "the receiver saw {n} requests for {path} / {id} with no delivery row"
        ));
    }
    if complete && rows.len() != events.len() * hooks.by_id.len() {
        note(format!(
            "{} deliveries, expected {} events x {} webhooks",
            rows.len(),
            events.len(),
            hooks.by_id.len()
        ));
    }
    if complete {
        let wanted: std::collections::HashSet<&Uuid> = events.iter().collect();
        if rows.iter().any(|r| !wanted.contains(&r.1)) {
            note("a delivery for an event that was not published".into());
        }
    }
    Ok(problems)
}

// ---------------------------------------------------------------------------------------
// Scenarios

/// Everything measured, for the table.
#[derive(Default)]
/// The ceilings, drain, fan-out and hung receiver are measured once per trial, the trials
/// interleaved (`BENCH_TRIALS`, default 3), and the table shows each figure's median with
/// every trial's value: one run of a few seconds on a shared 2-core machine moves by ±30%.
struct Results {
    trials: usize,
    broker_publish: Vec<f64>,
    broker_consume: Vec<f64>,
    receiver_rate: Vec<f64>,
    postgres_commits: Vec<f64>,
    drain: Vec<Throughput>,
    fanout: Vec<Throughput>,
    latency: Option<Latency>,
    hung: Vec<Hung>,
    retries: Option<Retries>,
    problems: Vec<String>,
}

/// The median of the trials (the mean of the middle two of an even count), or `None` if
/// the figure was not measured.
fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().collect();
    v.sort_by(f64::total_cmp);
    let (low, high) = (v.get(v.len().saturating_sub(1) / 2)?, v.get(v.len() / 2)?);
    Some((low + high) / 2.0)
}

/// A rate's median, with every trial's value when there was more than one.
fn fmt_trials(values: &[f64]) -> String {
    let median = median(values.iter().copied()).unwrap_or(0.0);
    if values.len() < 2 {
        return fmt_rate(median);
    }
    let each: Vec<String> = values.iter().map(|v| format!("{v:.0}")).collect();
    format!("{} (median of {})", fmt_rate(median), each.join(", "))
}

impl Throughput {
    /// The trials as one: median rate and CPU, and the highest peak RSS.
    fn summary(trials: &[Throughput]) -> Option<Throughput> {
        Some(Throughput {
            deliveries: trials.first()?.deliveries,
            rate: median(trials.iter().map(|t| t.rate))?,
            cpu_per_1000: median(trials.iter().map(|t| t.cpu_per_1000))?,
            peak_rss: trials.iter().map(|t| t.peak_rss).fold(0.0, f64::max),
        })
    }

    fn rates(trials: &[Throughput]) -> Vec<f64> {
        trials.iter().map(|t| t.rate).collect()
    }
}

struct Throughput {
    deliveries: usize,
    rate: f64,
    cpu_per_1000: f64,
    peak_rss: f64,
}

struct Latency {
    events: usize,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

struct Hung {
    healthy: u64,
    /// Deliveries parked (the hung webhook's, and their parked messages parked again).
    parked: u64,
    /// Parked groups that came back from the delay queues within the window.
    parked_messages: u64,
    rate: f64,
    window: f64,
}

struct Retries {
    waiting: i64,
    rss: f64,
    peak_rss: f64,
    depths: Vec<(String, u32)>,
}

struct Bench {
    scale: f64,
    rec: Arc<Recorder>,
    rx: SocketAddr,
}

impl Bench {
    fn n(&self, full: usize) -> usize {
        ((full as f64 * self.scale).round() as usize).max(1)
    }

    /// Scenarios 1 and 2: `events` published while the worker is stopped, `hooks`
    /// matching webhooks each; one worker drains them.
    async fn throughput(
        &self,
        name: &str,
        events: usize,
        hooks: usize,
        problems: &mut Vec<String>,
    ) -> anyhow::Result<Throughput> {
        self.rec.reset();
        let env = Env::create(name).await?;
        let hook_set = env.add_hooks(self.rx, &paths("ok", 0..hooks)).await?;
        env.declare_topology().await?;
        let ids = publish_events(&env, events).await?;
        let total = events * hooks;
        quiesce().await?;
        eprintln!("   {events} events x {hooks} webhooks published; starting the worker");
        let worker = Worker::start(&env, &[])?;
        let (ready, ready_at) = worker.wait_ready().await?;
        let cpu0 = cpu_secs(worker.pid());
        let perf = match std::env::var("BENCH_PERF") {
            Ok(out) => Some(perf_record(worker.pid(), &format!("{out}.{name}"))?),
            _ => None,
        };
        let rec = self.rec.clone();
        let got = wait_for(Duration::from_secs(900), Duration::from_millis(10), || {
            let n = rec.ok.load(Ordering::SeqCst);
            async move { Ok(n >= total as u64) }
        })
        .await?;
        anyhow::ensure!(got, "{name}: not every request arrived in 900 s");
        wait_for(
            Duration::from_secs(60),
            Duration::from_millis(20),
            || async { Ok(env.count_status("delivered", None).await? >= total as i64) },
        )
        .await?;
        let cpu = cpu_secs(worker.pid()) - cpu0;
        if let Some(mut perf) = perf {
            let _ = Command::new("kill")
                .args(["-INT", &perf.id().to_string()])
                .status();
            let _ = perf.wait();
        }
        let (_, peak_rss) = memory_mib(worker.pid());
        let last: DateTime<Utc> =
            sqlx::query_scalar("SELECT max(delivered_at) FROM control_plane.webhook_deliveries")
                .fetch_one(&env.pool)
                .await?;
        let secs = (last - ready_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
        let secs = if secs > 0.0 {
            secs
        } else {
            ready.elapsed().as_secs_f64()
        };
        worker.stop().await?;
        problems.extend(
            check(&env, &self.rec, &hook_set, &ids, true)
                .await?
                .into_iter()
                .map(|p| format!("{name}: {p}")),
        );
        env.drop_all().await;
        Ok(Throughput {
            deliveries: total,
            rate: total as f64 / secs,
            cpu_per_1000: cpu / (total as f64 / 1000.0),
            peak_rss,
        })
    }

    /// Scenario 3: a steady 500 events/s for 30 s to one webhook, worker running.
    async fn latency(&self, problems: &mut Vec<String>) -> anyhow::Result<Latency> {
        self.rec.reset();
        let env = Env::create("latency").await?;
        let hooks = env.add_hooks(self.rx, &paths("ok", 0..1)).await?;
        env.declare_topology().await?;
        let worker = Worker::start(&env, &[])?;
        worker.wait_ready().await?;
        let rate = 500u64;
        let events = (30.0 * self.scale * rate as f64).round().max(rate as f64) as usize;
        eprintln!("   publishing {events} events at {rate}/s");
        let mut publisher = BulkPublisher::open(&env.amqp_url).await?;
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
        let started = Instant::now();
        let mut ids = Vec::with_capacity(events);
        for i in 0..events {
            tick.tick().await;
            let id = Uuid::new_v4();
            let body = event_body(id, Some(now_us()), i);
            publisher
                .publish(topology::EXCHANGE, EVENT_TYPE, body.as_bytes())
                .await?;
            // Confirms are awaited only when `CONFIRM_WINDOW` are pending (2 s of
            // events at this pace), so they never hold up the pace.
            ids.push(id);
        }
        let achieved = events as f64 / started.elapsed().as_secs_f64();
        publisher.finish().await?;
        let rec = self.rec.clone();
        let got = wait_for(Duration::from_secs(120), Duration::from_millis(20), || {
            let n = rec.ok.load(Ordering::SeqCst);
            async move { Ok(n >= events as u64) }
        })
        .await?;
        anyhow::ensure!(got, "latency: not every request arrived");
        wait_for(
            Duration::from_secs(60),
            Duration::from_millis(50),
            || async { Ok(env.count_status("delivered", None).await? >= events as i64) },
        )
        .await?;
        worker.stop().await?;
        problems.extend(
            check(&env, &self.rec, &hooks, &ids, true)
                .await?
                .into_iter()
                .map(|p| format!("latency: {p}")),
        );
        env.drop_all().await;
        let mut lat = self.rec.latencies_us.lock().unwrap().clone();
        lat.sort_unstable();
        let pct = |p: f64| {
            let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
            lat[i] as f64 / 1000.0
        };
        Ok(Latency {
            events,
            rate: achieved,
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            max_ms: *lat.last().unwrap_or(&0) as f64 / 1000.0,
        })
    }

    /// Scenario 4: 10 webhooks per event, one never answers; the rate of the nine others
    /// until they have all been delivered or the window ends.
    async fn hung(&self, problems: &mut Vec<String>) -> anyhow::Result<Hung> {
        self.rec.reset();
        let env = Env::create("hung").await?;
        let mut hook_paths = paths("ok", 0..9);
        hook_paths.push("hang/9".into());
        let hooks = env.add_hooks(self.rx, &hook_paths).await?;
        env.declare_topology().await?;
        let events = self.n(2000);
        let ids = publish_events(&env, events).await?;
        let healthy = (events * 9) as u64;
        // Longer than DELIVERY_TIMEOUT (15 s) twice over, so hung attempts time out and
        // are replaced during the window.
        let window = Duration::from_secs_f64((45.0 * self.scale).max(20.0));
        eprintln!("   {events} events x (9 healthy + 1 hung) webhooks; measuring up to {window:?}");
        let worker = Worker::start(&env, &[("DISABLE_AFTER_FAILURES", "0")])?;
        let (ready, _) = worker.wait_ready().await?;
        let rec = self.rec.clone();
        // Healthy deliveries per quarter second, printed to show a stall (none expected).
        let timeline = {
            let rec = rec.clone();
            tokio::spawn(async move {
                let (mut last, mut counts) = (0, Vec::new());
                while last < healthy && counts.len() < 400 {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    let n = rec.ok.load(Ordering::SeqCst);
                    counts.push((n - last).to_string());
                    last = n;
                }
                counts.join(" ")
            })
        };
        wait_for(window, Duration::from_millis(10), || {
            let n = rec.ok.load(Ordering::SeqCst);
            async move { Ok(n >= healthy) }
        })
        .await?;
        let elapsed = ready.elapsed().as_secs_f64();
        let done = self.rec.ok.load(Ordering::SeqCst);
        eprintln!(
            "   {done} healthy deliveries in {elapsed:.1} s; stopping the worker (hung attempts end at DELIVERY_TIMEOUT)"
        );
        let parked = worker
            .metric("webhook_worker_deliveries_parked_total", "")
            .await
            .unwrap_or(0.0) as u64;
        let parked_messages = worker
            .metric("webhook_worker_messages_consumed_total", "kind=\"parked\"")
            .await
            .unwrap_or(0.0) as u64;
        let timeline = tokio::time::timeout(Duration::from_millis(500), timeline).await;
        if let Ok(Ok(counts)) = timeline {
            eprintln!("   healthy deliveries per 0.25 s: {counts}");
        }
        worker.stop().await?;
        problems.extend(
            check(&env, &self.rec, &hooks, &ids, false)
                .await?
                .into_iter()
                .map(|p| format!("hung: {p}")),
        );
        env.drop_all().await;
        Ok(Hung {
            healthy: done,
            parked,
            parked_messages,
            rate: done as f64 / elapsed,
            window: elapsed,
        })
    }

    /// Scenario 5: 10,000 deliveries failing into the delay queues; once all wait in the
    /// second delay queue (5 min), the worker's RSS and the queues' depths.
    async fn retries(&self, problems: &mut Vec<String>) -> anyhow::Result<Retries> {
        self.rec.reset();
        let env = Env::create("retries").await?;
        let hooks = env.add_hooks(self.rx, &paths("fail", 0..1)).await?;
        env.declare_topology().await?;
        let events = self.n(10_000);
        let ids = publish_events(&env, events).await?;
        eprintln!("   {events} deliveries failing; waiting until all wait for their third attempt");
        let worker = Worker::start(&env, &[("DISABLE_AFTER_FAILURES", "0")])?;
        worker.wait_ready().await?;
        let all = wait_for(
            Duration::from_secs(600),
            Duration::from_millis(250),
            || async { Ok(env.count_status("failed", Some(2)).await? >= events as i64) },
        )
        .await?;
        anyhow::ensure!(
            all,
            "retries: not every delivery reached its second failure"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut rss: f64 = 0.0;
        for _ in 0..10 {
            rss = rss.max(memory_mib(worker.pid()).0);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (_, peak_rss) = memory_mib(worker.pid());
        let schedule: RetrySchedule = DEFAULT_SCHEDULE.parse().map_err(anyhow::Error::msg)?;
        let mut depths = Vec::new();
        for queue in [topology::WORK_QUEUE.to_string()].into_iter().chain(
            schedule
                .tiers()
                .into_iter()
                .take(2)
                .map(topology::retry_queue),
        ) {
            let depth = env.queue_depth(&queue).await?;
            depths.push((queue, depth));
        }
        let waiting = env.count_status("failed", Some(2)).await?;
        worker.stop().await?;
        let mut found = check(&env, &self.rec, &hooks, &ids, false).await?;
        let in_delay: u32 = depths.iter().skip(1).map(|d| d.1).sum();
        if in_delay as usize != events {
            found.push(format!(
                "{in_delay} messages in the delay queues, expected {events}"
            ));
        }
        problems.extend(found.into_iter().map(|p| format!("retries: {p}")));
        env.drop_all().await;
        Ok(Retries {
            waiting,
            rss,
            peak_rss,
            depths,
        })
    }

    /// Scenario 6a: raw persistent publish-with-confirm (window of `CONFIRM_WINDOW`) and
    /// consume-with-ack (prefetch `PREFETCH`, one `basic.ack` per message, not `multiple`)
    /// rates of a quorum queue on this broker.
    async fn broker_ceiling(&self) -> anyhow::Result<(f64, f64)> {
        let env = Env::create("ceiling").await?;
        let queue = "bench.ceiling";
        let conn = amqp::connect(&env.amqp_url).await?;
        let channel = conn.create_channel().await?;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await?;
        let n = self.n(50_000);
        // About the size of a bench event.
        let body = event_body(Uuid::new_v4(), Some(now_us()), 12345);
        let mut publisher = BulkPublisher::open(&env.amqp_url).await?;
        let start = Instant::now();
        for _ in 0..n {
            publisher.publish("", queue, body.as_bytes()).await?;
        }
        publisher.finish().await?;
        let publish_rate = n as f64 / start.elapsed().as_secs_f64();

        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await?;
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "bench".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let start = Instant::now();
        let mut got = 0;
        while got < n {
            let delivery = consumer
                .next()
                .await
                .ok_or_else(|| anyhow::anyhow!("the consumer ended"))??;
            delivery.ack(BasicAckOptions::default()).await?;
            got += 1;
        }
        let consume_rate = n as f64 / start.elapsed().as_secs_f64();
        let _ = conn.close(200, "bye".into()).await;
        env.drop_all().await;
        Ok((publish_rate, consume_rate))
    }

    /// Scenario 6c: Postgres commits/s with `synchronous_commit` on, as the worker's
    /// pool does them: 16 connections, one single-row INSERT per transaction.
    async fn postgres_ceiling(&self) -> anyhow::Result<f64> {
        let env = Env::create("pgceiling").await?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect(&env.db_url)
            .await?;
        sqlx::query("CREATE TABLE bench_commits (id uuid PRIMARY KEY, at timestamptz NOT NULL)")
            .execute(&pool)
            .await?;
        let n = self.n(20_000);
        let per = n.div_ceil(16);
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let pool = pool.clone();
            tasks.spawn(async move {
                for _ in 0..per {
                    sqlx::query("INSERT INTO bench_commits VALUES ($1, now())")
                        .bind(Uuid::new_v4())
                        .execute(&pool)
                        .await?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        let rate = (per * 16) as f64 / start.elapsed().as_secs_f64();
        pool.close().await;
        env.drop_all().await;
        Ok(rate)
    }

    /// Scenario 6b: the receiver's own rate, from 64 keep-alive connections in this process
    /// (a lower bound: client and receiver share the CPU).
    async fn receiver_ceiling(&self) -> anyhow::Result<f64> {
        let rec = Arc::new(Recorder::default());
        let rx = start_receiver(rec.clone()).await?;
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()?;
        let n = self.n(100_000);
        let per = n.div_ceil(64);
        let body = format!(
            r#"{{"type":"{EVENT_TYPE}","timestamp":"2026-01-01T00:00:00Z","data":{{"i":1}}}}"#
        );
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..64 {
            let (client, body) = (client.clone(), body.clone());
            let url = format!("http://{rx}/ok/{c}");
            tasks.spawn(async move {
                for _ in 0..per {
                    let r = client
                        .post(&url)
                        .header("webhook-id", Uuid::new_v4().to_string())
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await?;
                    anyhow::ensure!(r.status() == 204, "receiver answered {}", r.status());
                }
                Ok(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        Ok(rec.ok.load(Ordering::SeqCst) as f64 / start.elapsed().as_secs_f64())
    }
}

// ---------------------------------------------------------------------------------------
// The table

fn fmt_rate(r: f64) -> String {
    format!("{:.0}/s", r)
}

struct Table(Vec<[String; 5]>);

impl Table {
    fn row(&mut self, figure: &str, measured: String, ratio: String, target: &str, met: &str) {
        self.0
            .push([figure.into(), measured, ratio, target.into(), met.into()]);
    }
}

fn met(ok: bool) -> &'static str {
    if ok { "yes" } else { "**no**" }
}

fn print_table(r: &Results, scale: f64) {
    let mut t = Table(Vec::new());
    let dash = || "-".to_string();
    let broker_consume = median(r.broker_consume.iter().copied());
    let receiver_rate = median(r.receiver_rate.iter().copied());
    let fanout = Throughput::summary(&r.fanout);
    if let Some(d) = Throughput::summary(&r.drain) {
        let ratio = broker_consume.map(|c| d.rate / c);
        t.row(
            &format!(
                "1 drain: deliveries/s ({} events x 1 webhook)",
                d.deliveries
            ),
            fmt_trials(&Throughput::rates(&r.drain)),
            ratio.map_or(dash(), |x| format!("{x:.2} of broker consume-ack")),
            ">= 4000/s; ratio >= 0.35",
            met(d.rate >= 4000.0 && ratio.is_none_or(|x| x >= 0.35)),
        );
        t.row(
            "1 drain: worker CPU s per 1,000 deliveries",
            format!("{:.3}", d.cpu_per_1000),
            dash(),
            "<= 0.15",
            met(d.cpu_per_1000 <= 0.15),
        );
        t.row(
            "1 drain: worker peak RSS",
            format!("{:.1} MiB", d.peak_rss),
            dash(),
            "<= 64 MiB",
            met(d.peak_rss <= 64.0),
        );
    }
    if let Some(f) = &fanout {
        t.row(
            &format!(
                "2 fan-out: deliveries/s ({} events x 20 webhooks)",
                f.deliveries / 20
            ),
            fmt_trials(&Throughput::rates(&r.fanout)),
            receiver_rate.map_or(dash(), |c| format!("{:.2} of receiver", f.rate / c)),
            ">= 8000/s",
            met(f.rate >= 8000.0),
        );
        t.row(
            "2 fan-out: worker CPU s per 1,000 deliveries",
            format!("{:.3}", f.cpu_per_1000),
            dash(),
            "-",
            "-",
        );
        t.row(
            "2 fan-out: worker peak RSS",
            format!("{:.1} MiB", f.peak_rss),
            dash(),
            "<= 64 MiB",
            met(f.peak_rss <= 64.0),
        );
    }
    if let Some(l) = &r.latency {
        let what = format!("{} events at {:.0} ev/s", l.events, l.rate);
        t.row(
            &format!("3 latency publish -> receiver p50 ({what})"),
            format!("{:.1} ms", l.p50_ms),
            dash(),
            "<= 10 ms",
            met(l.p50_ms <= 10.0),
        );
        t.row(
            "3 latency p99",
            format!("{:.1} ms", l.p99_ms),
            dash(),
            "<= 50 ms",
            met(l.p99_ms <= 50.0),
        );
        t.row(
            "3 latency max",
            format!("{:.1} ms", l.max_ms),
            dash(),
            "-",
            "-",
        );
    }
    let hung_rates: Vec<f64> = r.hung.iter().map(|h| h.rate).collect();
    if let Some(rate) = median(hung_rates.iter().copied()) {
        let h = r
            .hung
            .iter()
            .min_by(|a, b| (a.rate - rate).abs().total_cmp(&(b.rate - rate).abs()))
            .expect("a trial");
        let ratio = fanout.as_ref().map(|f| rate / f.rate);
        t.row(
            &format!(
                "4 hung receiver: deliveries/s to the 9 healthy webhooks (trial nearest the median: {} in {:.1} s; {} parkings, {} parked messages back)",
                h.healthy, h.window, h.parked, h.parked_messages
            ),
            fmt_trials(&hung_rates),
            ratio.map_or(dash(), |x| format!("{x:.3} of fan-out rate")),
            ">= 0.80 of healthy rate",
            ratio.map_or("-", |x| met(x >= 0.80)),
        );
    }
    if let Some(w) = &r.retries {
        t.row(
            &format!("5 waiting retries: worker RSS while {} wait", w.waiting),
            format!("{:.1} MiB", w.rss),
            dash(),
            "<= 60 MiB",
            met(w.rss <= 60.0),
        );
        t.row(
            "5 waiting retries: worker peak RSS (incl. failing them)",
            format!("{:.1} MiB", w.peak_rss),
            dash(),
            "-",
            "-",
        );
        let depths = w
            .depths
            .iter()
            .map(|(q, d)| format!("{q}={d}"))
            .collect::<Vec<_>>()
            .join(", ");
        t.row(
            "5 waiting retries: queue depths",
            depths,
            dash(),
            "in RabbitMQ",
            met(w.depths.iter().skip(1).map(|d| d.1 as i64).sum::<i64>() == w.waiting),
        );
    }
    if !r.broker_publish.is_empty() {
        t.row(
            "6 ceiling: broker publish-confirm, persistent, quorum (1000 in flight)",
            fmt_trials(&r.broker_publish),
            dash(),
            "-",
            "-",
        );
    }
    if !r.broker_consume.is_empty() {
        t.row(
            "6 ceiling: broker consume-ack, quorum (prefetch 512, one ack each)",
            fmt_trials(&r.broker_consume),
            dash(),
            "-",
            "-",
        );
    }
    if !r.receiver_rate.is_empty() {
        t.row(
            "6 ceiling: receiver (64 keep-alive connections, same process)",
            fmt_trials(&r.receiver_rate),
            dash(),
            "-",
            "-",
        );
    }
    if !r.postgres_commits.is_empty() {
        t.row(
            "6 ceiling: Postgres commits (16 connections, 1-row INSERT each, synchronous_commit on)",
            fmt_trials(&r.postgres_commits),
            dash(),
            "-",
            "-",
        );
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "webhook-worker benchmark, {} UTC, {cores} cores ({cpu}), BENCH_SCALE={scale}, \
         BENCH_TRIALS={} (scenarios 1, 2, 4 and 6: the median of the trials, each listed), \
         defaults (quorum queues, synchronous_commit on, MAX_IN_FLIGHT 256, \
         MAX_IN_FLIGHT_PER_WEBHOOK 16)\n",
        Utc::now().format("%Y-%m-%d %H:%M"),
        r.trials
    );
    println!("| figure | measured | ceiling ratio | target | met? |");
    println!("|---|---|---|---|---|");
    for [a, b, c, d, e] in &t.0 {
        println!("| {a} | {b} | {c} | {d} | {e} |");
    }
    if r.problems.is_empty() {
        println!(
            "\nCorrectness: every delivery recorded once, attempt rows = receiver requests per webhook and event."
        );
    } else {
        println!("\nCorrectness check FAILED:");
        for p in &r.problems {
            println!("- {p}");
        }
    }
}

// ---------------------------------------------------------------------------------------

fn sh(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(cmd).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut scale: f64 = std::env::var("BENCH_SCALE")
        .ok()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1.0);
    let mut wanted = Vec::new();
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--quick" => scale = 0.1,
            "ceilings" | "drain" | "fanout" | "latency" | "hung" | "retries" => wanted.push(arg),
            other => anyhow::bail!(
                "unknown argument {other:?}: --quick, or scenarios ceilings drain fanout latency hung retries"
            ),
        }
    }
    let on = |s: &str| wanted.is_empty() || wanted.iter().any(|w| w == s);
    let trials: usize = match std::env::var("BENCH_TRIALS") {
        Ok(n) => n.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
            anyhow::anyhow!("BENCH_TRIALS={n:?}: expected a whole number of at least 1")
        })?,
        Err(_) => 3,
    };
    let rec = Arc::new(Recorder::default());
    let rx = start_receiver(rec.clone()).await?;
    let bench = Bench { scale, rec, rx };
    let mut r = Results {
        trials,
        ..Results::default()
    };
    let mut problems = Vec::new();

    for trial in 1..=trials {
        let of = format!("(trial {trial} of {trials})");
        if on("ceilings") {
            eprintln!("== 6 ceilings: broker {of}");
            let (p, c) = bench.broker_ceiling().await?;
            r.broker_publish.push(p);
            r.broker_consume.push(c);
            eprintln!("== 6 ceilings: receiver {of}");
            r.receiver_rate.push(bench.receiver_ceiling().await?);
            eprintln!("== 6 ceilings: Postgres commits {of}");
            r.postgres_commits.push(bench.postgres_ceiling().await?);
        }
        if on("drain") {
            eprintln!("== 1 drain {of}");
            quiesce().await?;
            let events = bench.n(20_000);
            r.drain
                .push(bench.throughput("drain", events, 1, &mut problems).await?);
        }
        if on("fanout") {
            eprintln!("== 2 fan-out {of}");
            quiesce().await?;
            let events = bench.n(1_000);
            r.fanout.push(
                bench
                    .throughput("fanout", events, 20, &mut problems)
                    .await?,
            );
        }
        if on("hung") {
            eprintln!("== 4 hung receiver {of}");
            quiesce().await?;
            r.hung.push(bench.hung(&mut problems).await?);
        }
    }
    if on("latency") {
        eprintln!("== 3 latency");
        quiesce().await?;
        r.latency = Some(bench.latency(&mut problems).await?);
    }
    if on("retries") {
        eprintln!("== 5 waiting retries");
        quiesce().await?;
        r.retries = Some(bench.retries(&mut problems).await?);
    }
    r.problems = problems;
    print_table(&r, scale);
    if !r.problems.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
