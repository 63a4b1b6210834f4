//! The fault drills (issue #3): real worker processes, the real RabbitMQ and Postgres, a
//! recording receiver and a steady producer; each drill injects one fault and counts what
//! was published, delivered, lost and duplicated. Run it through `scripts/chaos`, which
//! builds the release binary first. It restarts the local RabbitMQ and Postgres: never run
//! it beside the test suite or anything else that uses them.
//!
//!     cargo run --release --example chaos [-- drill-name ...]

use std::collections::HashMap;
use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use lapin::BasicProperties;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;
use webhook_worker::amqp::{self, Publisher};
use webhook_worker::config::{QueueType, RetrySchedule};
use webhook_worker::topology;

const BIN: &str = "target/release/webhook-worker";
const ADMIN_DB: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const AMQP_BASE: &str = "amqp://guest:guest@127.0.0.1:5672";
const EVENTS: usize = 2000;
const RATE_PER_SEC: u64 = 200;
const RETRY_SCHEDULE: &str = "2s,4s,8s";

type Counts = Arc<Mutex<HashMap<(String, String), usize>>>;

/// One drill's row of the table.
struct Row {
    drill: &'static str,
    published: usize,
    delivered: usize,
    duplicates: usize,
    dead_lettered: usize,
    recovery: Option<Duration>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let wanted: Vec<String> = std::env::args().skip(1).collect();
    let drills: [(&'static str, Fault); 5] = [
        ("sigkill", Fault::KillWorker),
        ("rabbitmq-restart", Fault::RestartRabbitmq),
        ("postgres-restart", Fault::RestartPostgres),
        ("sigterm", Fault::TerminateWorker),
        ("poison", Fault::Poison),
    ];
    let mut rows = Vec::new();
    for (name, fault) in drills {
        if !wanted.is_empty() && !wanted.iter().any(|w| w == name) {
            continue;
        }
        eprintln!("== drill {name}");
        rows.push(run(name, fault).await?);
    }
    println!(
        "| drill | events published | delivered | lost | duplicates | dead-lettered | time to recover |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut all_good = true;
    for r in &rows {
        let lost = r.published - r.delivered.min(r.published);
        all_good &= lost == 0;
        let recovery = r
            .recovery
            .map_or("-".to_string(), |d| format!("{:.1} s", d.as_secs_f64()));
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.drill, r.published, r.delivered, lost, r.duplicates, r.dead_lettered, recovery
        );
    }
    anyhow::ensure!(all_good, "events were lost");
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillWorker,
    RestartRabbitmq,
    RestartPostgres,
    TerminateWorker,
    Poison,
}

async fn run(drill: &'static str, fault: Fault) -> anyhow::Result<Row> {
    let suffix = &Uuid::new_v4().simple().to_string()[..10];
    let name = format!("wwchaos_{suffix}");
    let env = Env::create(&name).await?;
    let counts: Counts = Arc::default();
    let rx = receiver(counts.clone()).await?;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&env.db_url)
        .await?;
    // Every event goes to two webhooks: one that answers 200 after 20 ms, and one that
    // fails the first request of each event, so retries wait in the delay queues.
    let mut hooks = Vec::new();
    for path in ["ok", "flaky"] {
        let id: Uuid = sqlx::query_scalar(
            "INSERT INTO control_plane.webhooks (project_id, event_type, url) \
             VALUES ('drill', 'drill.event', $1) RETURNING id",
        )
        .bind(format!("http://{rx}/{path}"))
        .fetch_one(&pool)
        .await?;
        hooks.push(id);
    }
    pool.close().await;

    let mut workers = vec![Worker::start(&env)?, Worker::start(&env)?];
    for w in &workers {
        w.wait_ready(Duration::from_secs(30)).await?;
    }
    let producer = tokio::spawn(produce(env.amqp_url.clone(), fault == Fault::Poison));
    // The fault strikes a third of the way through the stream.
    tokio::time::sleep(Duration::from_millis(
        EVENTS as u64 * 1000 / RATE_PER_SEC / 3,
    ))
    .await;
    let recovery = inject(fault, &mut workers, &env).await?;
    let (published, poison) = producer.await??;

    let delivered = wait_delivered(
        &env.db_url,
        &hooks,
        published.len(),
        Duration::from_secs(120),
    )
    .await?;
    let duplicates = duplicates(&env.db_url, &counts).await?;
    let dead_lettered = dead_letters(&env.amqp_url).await?;
    anyhow::ensure!(
        dead_lettered == poison,
        "{dead_lettered} dead letters, {poison} poison messages"
    );
    for w in workers {
        w.stop();
    }
    env.drop_all();
    Ok(Row {
        drill,
        published: published.len(),
        delivered,
        duplicates,
        dead_lettered,
        recovery,
    })
}

/// Injects the fault; returns how long the workers took to be ready again after it ended.
async fn inject(
    fault: Fault,
    workers: &mut [Worker],
    env: &Env,
) -> anyhow::Result<Option<Duration>> {
    match fault {
        Fault::KillWorker => {
            workers[0].signal("-KILL");
            tokio::time::sleep(Duration::from_secs(2)).await;
            let ended = Instant::now();
            workers[0] = Worker::start(env)?;
            workers[0].wait_ready(Duration::from_secs(60)).await?;
            Ok(Some(ended.elapsed()))
        }
        Fault::TerminateWorker => {
            let ended = Instant::now();
            workers[0].signal("-TERM");
            let code = workers[0].wait_exit(Duration::from_secs(40)).await?;
            anyhow::ensure!(code == Some(0), "SIGTERM exit code {code:?}");
            let drained = ended.elapsed();
            workers[0] = Worker::start(env)?;
            workers[0].wait_ready(Duration::from_secs(60)).await?;
            Ok(Some(drained))
        }
        Fault::RestartRabbitmq => {
            sh("rabbitmqctl", &["stop_app"])?;
            tokio::time::sleep(Duration::from_secs(10)).await;
            sh("rabbitmqctl", &["start_app"])?;
            let ended = Instant::now();
            for w in workers.iter() {
                w.wait_ready(Duration::from_secs(120)).await?;
            }
            Ok(Some(ended.elapsed()))
        }
        Fault::RestartPostgres => {
            let version = std::fs::read_dir("/etc/postgresql")?
                .next()
                .ok_or_else(|| anyhow::anyhow!("no cluster in /etc/postgresql"))??
                .file_name();
            let version = version.to_string_lossy().to_string();
            let ctl = |action: &str| {
                sh(
                    "pg_ctlcluster",
                    &["--skip-systemctl-redirect", &version, "main", action],
                )
            };
            ctl("stop")?;
            tokio::time::sleep(Duration::from_secs(10)).await;
            ctl("start")?;
            let ended = Instant::now();
            for w in workers.iter() {
                w.wait_ready(Duration::from_secs(120)).await?;
            }
            Ok(Some(ended.elapsed()))
        }
        Fault::Poison => Ok(None),
    }
}

/// Publishes `EVENTS` events at `RATE_PER_SEC`, each confirmed by the broker; through a
/// broker outage it reconnects and publishes the same event again. With `poison`, one
/// event in a hundred is one Postgres refuses. Returns the valid ids and the poison count.
async fn produce(amqp_url: String, poison: bool) -> anyhow::Result<(Vec<Uuid>, usize)> {
    let mut publisher: Option<(lapin::Connection, Publisher)> = None;
    let mut ids = Vec::with_capacity(EVENTS);
    let mut poisoned = 0;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE_PER_SEC));
    for i in 0..EVENTS {
        tick.tick().await;
        let id = Uuid::new_v4();
        let bad = poison && i % 100 == 50;
        let project = if bad { "drill\\u0000" } else { "drill" };
        let body = format!(
            r#"{{"id":"{id}","project_id":"{project}","event_type":"drill.event","data":{{"i":{i}}}}}"#
        );
        loop {
            if publisher.is_none()
                && let Ok(conn) = amqp::connect(&amqp_url).await
                && let Ok(p) = Publisher::open(&conn).await
            {
                publisher = Some((conn, p));
            }
            if let Some((_, p)) = &publisher {
                let props = BasicProperties::default().with_content_type("application/json".into());
                match p
                    .publish(topology::EXCHANGE, "drill.event", body.as_bytes(), props)
                    .await
                {
                    Ok(()) => break,
                    Err(_) => publisher = None,
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if bad {
            poisoned += 1;
        } else {
            ids.push(id);
        }
    }
    Ok((ids, poisoned))
}

/// Waits until every event has a delivered delivery to every webhook; returns how many
/// events did.
async fn wait_delivered(
    db_url: &str,
    hooks: &[Uuid],
    expected: usize,
    limit: Duration,
) -> anyhow::Result<usize> {
    let start = Instant::now();
    loop {
        let delivered = match PgPoolOptions::new()
            .max_connections(1)
            .connect(db_url)
            .await
        {
            Ok(pool) => {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM (SELECT event_id FROM control_plane.webhook_deliveries \
                     WHERE webhook_id = ANY($1) AND status = 'delivered' GROUP BY event_id \
                     HAVING count(*) = cardinality($1)) d",
                )
                .bind(hooks)
                .fetch_one(&pool)
                .await
                .unwrap_or(0);
                pool.close().await;
                n as usize
            }
            Err(_) => 0,
        };
        if delivered >= expected || start.elapsed() > limit {
            return Ok(delivered);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Requests the receiver saw beyond the attempts recorded for them: each is a request a
/// process sent but died (or lost its connection) before recording.
async fn duplicates(db_url: &str, counts: &Counts) -> anyhow::Result<usize> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(db_url)
        .await?;
    let recorded: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT split_part(w.url, '/', 4), d.event_id::text, count(a.id) \
         FROM control_plane.webhook_deliveries d \
         JOIN control_plane.webhooks w ON w.id = d.webhook_id \
         LEFT JOIN control_plane.webhook_delivery_attempts a ON a.delivery_id = d.id \
         GROUP BY 1, 2",
    )
    .fetch_all(&pool)
    .await?;
    pool.close().await;
    let recorded: HashMap<(String, String), i64> =
        recorded.into_iter().map(|(p, e, n)| ((p, e), n)).collect();
    let seen = counts.lock().unwrap();
    let mut extra = 0;
    for (key, n) in seen.iter() {
        let attempts = recorded.get(key).copied().unwrap_or(0) as usize;
        extra += n.saturating_sub(attempts);
    }
    Ok(extra)
}

async fn dead_letters(amqp_url: &str) -> anyhow::Result<usize> {
    let conn = amqp::connect(amqp_url).await?;
    let channel = conn.create_channel().await?;
    let queue = channel
        .queue_declare(
            topology::DEAD_QUEUE.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await?;
    let _ = conn.close(200, "bye".into()).await;
    Ok(queue.message_count() as usize)
}

/// The recording receiver: `/ok` answers 200 after 20 ms; `/flaky` answers 500 to the
/// first request of each event and 200 after.
async fn receiver(counts: Counts) -> anyhow::Result<std::net::SocketAddr> {
    async fn handle(
        State(counts): State<Counts>,
        Path(path): Path<String>,
        headers: HeaderMap,
    ) -> StatusCode {
        let id = headers
            .get("webhook-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let n = {
            let mut counts = counts.lock().unwrap();
            let n = counts.entry((path.clone(), id)).or_default();
            *n += 1;
            *n
        };
        match path.as_str() {
            "flaky" if n == 1 => StatusCode::INTERNAL_SERVER_ERROR,
            _ => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                StatusCode::OK
            }
        }
    }
    let app = axum::Router::new()
        .route("/{path}", axum::routing::post(handle))
        .with_state(counts);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// A database and a vhost for one drill.
struct Env {
    name: String,
    db_url: String,
    amqp_url: String,
}

impl Env {
    async fn create(name: &str) -> anyhow::Result<Env> {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(ADMIN_DB)
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await?;
        admin.close().await;
        sh("rabbitmqctl", &["add_vhost", name])?;
        sh(
            "rabbitmqctl",
            &["set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
        )?;
        let env = Env {
            name: name.to_string(),
            db_url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
            amqp_url: format!("{AMQP_BASE}/{name}"),
        };
        let status = Command::new(BIN)
            .arg("migrate")
            .env("DATABASE_URL", &env.db_url)
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "migrate failed");
        let conn = amqp::connect(&env.amqp_url).await?;
        let schedule: RetrySchedule = RETRY_SCHEDULE.parse().map_err(anyhow::Error::msg)?;
        topology::declare(&conn, QueueType::Quorum, &schedule).await?;
        let _ = conn.close(200, "declared".into()).await;
        Ok(env)
    }

    fn drop_all(&self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.name])
            .output();
        let _ = Command::new("psql")
            .args([
                ADMIN_DB,
                "-qc",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .output();
    }
}

/// A worker process with its own health port.
struct Worker {
    child: Child,
    port: u16,
}

impl Worker {
    fn start(env: &Env) -> anyhow::Result<Worker> {
        let port = StdListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(BIN)
            .arg("run")
            .env("DATABASE_URL", &env.db_url)
            .env("AMQP_URL", &env.amqp_url)
            .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("ALLOW_PRIVATE_IPS", "true")
            .env("RETRY_SCHEDULE", RETRY_SCHEDULE)
            // The flaky webhook fails every first request: it must stay enabled.
            .env("DISABLE_AFTER_FAILURES", "0")
            .env("SHUTDOWN_TIMEOUT", "30s")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .spawn()?;
        Ok(Worker { child, port })
    }

    async fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{}/readyz", self.port);
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(r) = reqwest::get(&url).await
                && r.status() == 200
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("worker on port {} not ready in {limit:?}", self.port)
    }

    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status();
    }

    async fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<Option<i32>> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code());
            }
            anyhow::ensure!(
                start.elapsed() < limit,
                "the worker did not exit in {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn stop(mut self) {
        self.signal("-TERM");
        let _ = self.child.wait();
    }
}

fn sh(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(cmd).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
