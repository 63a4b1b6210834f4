//! The operator commands, run as the binary users run, against the test's database and
//! vhost: what they print, and what they change in Postgres and RabbitMQ.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::types::FieldTable;
use serde_json::{Value, json};
use uuid::Uuid;
use webhook_worker::amqp::with_header;
use webhook_worker::topology;

use crate::harness::{OneHook, Receiver, Reply, TestEnv, WebhookSpec, event};

const BIN: &str = env!("CARGO_BIN_EXE_webhook-worker");

/// What a command printed and how it exited.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn ok(&self) -> &Self {
        assert_eq!(
            self.code,
            Some(0),
            "stdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        self
    }

    fn failed(&self, words: &str) -> &Self {
        assert_eq!(
            self.code,
            Some(1),
            "stdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        assert!(
            self.stderr.contains(words),
            "{words:?} not in {}",
            self.stderr
        );
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("{e}: not JSON: {}\nstderr: {}", self.stdout, self.stderr))
    }
}

/// Runs `webhook-worker ARGS` for this environment, with `stdin` as standard input (none:
/// empty, not a terminal). Blocking work goes to a thread so the in-process worker runs on.
async fn cli(env: &TestEnv, args: &[&str], stdin: Option<&str>) -> Ran {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .envs([
            ("DATABASE_URL", env.db_url.as_str()),
            ("AMQP_URL", env.amqp_url.as_str()),
            ("ALLOW_PRIVATE_IPS", "true"),
            ("RETRY_SCHEDULE", "200ms,1500ms,3s"),
            ("RUST_LOG", "warn"),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let input = stdin.unwrap_or("").to_string();
    tokio::task::spawn_blocking(move || {
        let mut child = command.spawn().expect("starting the binary");
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).unwrap();
        drop(pipe);
        let out = child.wait_with_output().unwrap();
        Ran {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .unwrap()
}

/// Runs a command that must succeed; its JSON output.
async fn json_of(env: &TestEnv, args: &[&str]) -> Value {
    cli(env, args, None).await.ok().json()
}

fn uuid(value: &Value) -> Uuid {
    value
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {value}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn webhooks_are_managed_and_a_rotated_secret_signs_with_both() {
    let env = TestEnv::new().await;
    let rx = Receiver::start().await;
    let url = rx.url("hook", vec![Reply::Status(200)]);
    let worker = env.start_worker(&[]).await;

    let added = cli(
        &env,
        &[
            "webhooks",
            "add",
            "--project",
            "p",
            "--event-type",
            "t",
            "--url",
            &url,
            "--header",
            "X-Team: core",
            "--json",
        ],
        None,
    )
    .await;
    let added = added.ok().json();
    let id = uuid(&added["webhook"]["id"]);
    let old_secret = added["secret"].as_str().unwrap().to_string();
    assert!(old_secret.starts_with("whsec_"));
    assert_eq!(added["webhook"]["headers"], json!({"X-Team": "core"}));

    // What a delivery would refuse is refused here, with the reason.
    let bad = ["webhooks", "add", "--project", "p", "--event-type", "t"];
    cli(
        &env,
        &[&bad[..], &["--url", &url, "--method", "GET"]].concat(),
        None,
    )
    .await
    .failed("http_method");
    cli(&env, &[&bad[..], &["--url", "ftp://x/"]].concat(), None)
        .await
        .failed("scheme");
    cli(
        &env,
        &[&bad[..], &["--url", &url, "--header", "Content-Type: x"]].concat(),
        None,
    )
    .await
    .failed("cannot override");

    let list = json_of(&env, &["webhooks", "list", "--json"]).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    let table = cli(&env, &["webhooks", "list"], None).await;
    assert!(table.ok().stdout.contains(&id.to_string()) && table.stdout.contains("enabled"));
    let shown = cli(&env, &["webhooks", "show", &id.to_string()], None).await;
    assert!(shown.ok().stdout.contains("X-Team"), "{}", shown.stdout);
    assert!(
        !shown.stdout.contains(&old_secret),
        "the secret is never shown again"
    );
    cli(
        &env,
        &["webhooks", "show", &Uuid::new_v4().to_string()],
        None,
    )
    .await
    .failed("no webhook with id");

    let updated = cli(
        &env,
        &[
            "webhooks",
            "update",
            &id.to_string(),
            "--method",
            "put",
            "--json",
        ],
        None,
    )
    .await;
    assert_eq!(updated.ok().json()["http_method"], "PUT");

    cli(
        &env,
        &[
            "webhooks",
            "disable",
            &id.to_string(),
            "--reason",
            "maintenance",
        ],
        None,
    )
    .await
    .ok();
    let state = env.webhook(id).await;
    assert!(state.disabled && state.disabled_reason.as_deref() == Some("maintenance"));
    sqlx::query("UPDATE control_plane.webhooks SET consecutive_failures = 4 WHERE id = $1")
        .bind(id)
        .execute(&env.pool)
        .await
        .unwrap();
    cli(&env, &["webhooks", "enable", &id.to_string()], None)
        .await
        .ok();
    let state = env.webhook(id).await;
    assert!(!state.disabled && state.consecutive_failures == 0 && state.disabled_reason.is_none());

    let rotated = cli(
        &env,
        &["webhooks", "rotate-secret", &id.to_string(), "--json"],
        None,
    )
    .await;
    let rotated = rotated.ok().json();
    let new_secret = rotated["secret"].as_str().unwrap().to_string();
    assert_ne!(new_secret, old_secret);
    assert!(rotated["previous_secret_valid_until"].is_string());

    // A delivery during the grace period verifies with either secret.
    let (event_id, body) = event("p", "t", json!({"n": 1}));
    env.publish(&body).await;
    env.wait_for_status(id, event_id, &["delivered"], Duration::from_secs(10))
        .await;
    let request = &rx.seen("hook")[0];
    assert_eq!(request.method, "PUT");
    let signature = request.headers["webhook-signature"].to_str().unwrap();
    assert_eq!(signature.matches("v1,").count(), 2, "{signature}");
    for secret in [&old_secret, &new_secret] {
        standardwebhooks::Webhook::new(secret)
            .unwrap()
            .verify(&request.body, &request.headers)
            .expect("the receiver's secret verifies");
    }

    // Deleting needs a confirmation, which a pipe cannot give.
    cli(&env, &["webhooks", "delete", &id.to_string()], None)
        .await
        .failed("--yes");
    cli(
        &env,
        &["webhooks", "delete", &id.to_string(), "--yes"],
        None,
    )
    .await
    .ok();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM control_plane.webhooks")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn deliveries_are_listed_and_shown_with_every_attempt() {
    let env = TestEnv::new().await;
    let rx = Receiver::start().await;
    let ok = env
        .add_webhook(WebhookSpec::new(
            "p",
            "t",
            &rx.url("ok", vec![Reply::Status(200)]),
        ))
        .await;
    let bad = env
        .add_webhook(WebhookSpec::new(
            "p",
            "t",
            &rx.url("bad", vec![Reply::Body(500, "boom".into())]),
        ))
        .await;
    let worker = env.start_worker(&["--retry-schedule", "100ms"]).await;
    let (event_id, body) = event("p", "t", json!({}));
    env.publish(&body).await;
    env.wait_for_status(ok, event_id, &["delivered"], Duration::from_secs(10))
        .await;
    let failed = env
        .wait_for_status(
            bad,
            event_id,
            &["permanently_failed"],
            Duration::from_secs(10),
        )
        .await;

    let list = |args: &'static [&'static str]| {
        let env = &env;
        async move {
            let mut all = vec!["deliveries", "list", "--json"];
            all.extend_from_slice(args);
            json_of(env, &all).await
        }
    };
    let by_hook = json_of(
        &env,
        &[
            "deliveries",
            "list",
            "--webhook",
            &bad.to_string(),
            "--json",
        ],
    )
    .await;
    assert_eq!(by_hook.as_array().unwrap().len(), 1);
    assert_eq!(by_hook[0]["status"], "permanently_failed");
    let delivered = list(&["--status", "delivered"]).await;
    assert_eq!(uuid(&delivered[0]["webhook_id"]), ok);
    assert_eq!(delivered.as_array().unwrap().len(), 1);
    assert_eq!(list(&["--project", "other"]).await, json!([]));
    assert_eq!(list(&["--until", "1h"]).await, json!([]));
    assert_eq!(
        list(&["--since", "1h", "--limit", "1"])
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let by_event = cli(
        &env,
        &["deliveries", "list", "--event", &event_id.to_string()],
        None,
    )
    .await;
    assert_eq!(
        by_event.ok().stdout.lines().count(),
        3,
        "a header and two rows"
    );

    let shown = json_of(
        &env,
        &["deliveries", "show", &failed.id.to_string(), "--json"],
    )
    .await;
    let attempts = shown["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    for (n, a) in attempts.iter().enumerate() {
        assert_eq!(a["attempt_number"], n + 1);
        assert_eq!(a["http_status_code"], 500);
        assert_eq!(a["error_type"], "HTTP_ERROR");
        assert_eq!(a["response_body"], "boom");
        assert!(a["duration_ms"].is_number() && a["started_at"].is_string());
    }
    let human = cli(&env, &["deliveries", "show", &failed.id.to_string()], None).await;
    assert!(human.ok().stdout.contains("HTTP_ERROR") && human.stdout.contains("boom"));
    cli(
        &env,
        &["deliveries", "show", &Uuid::new_v4().to_string()],
        None,
    )
    .await
    .failed("no delivery with id");
    let bogus = cli(&env, &["deliveries", "list", "--status", "lost"], None).await;
    assert_eq!(bogus.code, Some(2), "{}", bogus.stderr);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_replay_continues_the_attempt_numbers_and_starts_one_chain() {
    // Two attempts use up the schedule; after the replay the third fails and, the
    // schedule counting again, a fourth follows.
    let script = vec![
        Reply::Status(500),
        Reply::Status(500),
        Reply::Status(500),
        Reply::Hold,
    ];
    let OneHook {
        env,
        rx,
        hook,
        worker,
        ..
    } = OneHook::start("hook", script, &["--retry-schedule", "200ms"]).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (event_id, body) = event("p", "t", json!({}));
    let mut headers = FieldTable::default();
    with_header(&mut headers, "traceparent", traceparent);
    env.publish_raw(
        topology::EXCHANGE,
        "t",
        &serde_json::to_vec(&body).unwrap(),
        BasicProperties::default().with_headers(headers),
    )
    .await;
    let d = env
        .wait_for_status(
            hook,
            event_id,
            &["permanently_failed"],
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(d.attempts, 2);
    let delivery = d.id.to_string();

    cli(&env, &["replay", "--delivery", &delivery], None)
        .await
        .failed("--yes");
    assert_eq!(
        env.delivery(hook, event_id).await.unwrap().status,
        "permanently_failed"
    );

    let replayed = json_of(
        &env,
        &["replay", "--delivery", &delivery, "--yes", "--json"],
    )
    .await;
    assert_eq!(replayed["replayed"][0]["attempt"], 3);
    // Attempt 4 is under way (held by the receiver): a second replay starts nothing.
    rx.wait_for("hook", 4, Duration::from_secs(10)).await;
    cli(&env, &["replay", "--delivery", &delivery, "--yes"], None)
        .await
        .failed("is delivering");
    let again = cli(
        &env,
        &[
            "replay",
            "--webhook",
            &hook.to_string(),
            "--since",
            "1h",
            "--yes",
        ],
        None,
    )
    .await;
    assert!(
        again.ok().stdout.contains("nothing to replay"),
        "{}",
        again.stdout
    );
    rx.release();
    let d = env
        .wait_for_status(hook, event_id, &["delivered"], Duration::from_secs(10))
        .await;
    assert_eq!(d.attempts, 4);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let seen = rx.seen("hook");
    assert_eq!(
        seen.len(),
        4,
        "one chain: no request beyond the four attempts"
    );
    let numbers: Vec<i32> = env
        .attempts(d.id)
        .await
        .iter()
        .map(|a| a.attempt_number)
        .collect();
    assert_eq!(numbers, vec![1, 2, 3, 4]);
    for request in &seen[2..] {
        assert_eq!(request.headers["webhook-id"], event_id.to_string().as_str());
        let trace_id = request.headers["traceparent"]
            .to_str()
            .unwrap()
            .split('-')
            .nth(1);
        assert_eq!(
            trace_id,
            traceparent.split('-').nth(1),
            "the event's trace goes on"
        );
    }
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_webhook_is_replayed_since_a_time_once_enabled() {
    let OneHook {
        env,
        rx,
        hook,
        worker,
        ..
    } = OneHook::start(
        "hook",
        vec![Reply::Status(500)],
        &["--retry-schedule", "none"],
    )
    .await;
    let mut events = Vec::new();
    for _ in 0..2 {
        let (id, body) = event("p", "t", json!({}));
        env.publish(&body).await;
        env.wait_for_status(hook, id, &["permanently_failed"], Duration::from_secs(10))
            .await;
        events.push(id);
    }
    let webhook = hook.to_string();
    cli(&env, &["webhooks", "disable", &webhook], None)
        .await
        .ok();
    let args = [
        "replay",
        "--webhook",
        &webhook,
        "--since",
        "1h",
        "--yes",
        "--json",
    ];
    cli(&env, &args, None)
        .await
        .failed("is disabled; enable it first");
    cli(&env, &["webhooks", "enable", &webhook], None)
        .await
        .ok();
    rx.set_script("hook", vec![Reply::Status(200)]);
    let report = json_of(&env, &args).await;
    assert_eq!(report["replayed"].as_array().unwrap().len(), 2);
    for id in events {
        let d = env
            .wait_for_status(hook, id, &["delivered"], Duration::from_secs(10))
            .await;
        assert_eq!(d.attempts, 2);
    }
    let none = cli(
        &env,
        &["replay", "--webhook", &webhook, "--since", "1h", "--yes"],
        None,
    )
    .await;
    assert!(none.ok().stdout.contains("nothing to replay"));
    worker.stop().await.unwrap();
}

/// Polls `dead-letters list --json` until it shows `n` messages.
async fn wait_for_dead(env: &TestEnv, n: usize) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let list = json_of(env, &["dead-letters", "list", "--json"]).await;
        let list = list.as_array().unwrap().clone();
        if list.len() == n {
            return list;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{} dead letters, expected {n}",
            list.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn dead_letters_are_listed_shown_and_requeued() {
    let OneHook {
        env,
        rx,
        hook,
        worker,
        ..
    } = OneHook::start("hook", vec![Reply::Status(200)], &[]).await;
    let malformed = Uuid::new_v4();
    env.publish(&json!({"id": malformed, "project_id": "p", "data": {}}))
        .await;
    wait_for_dead(&env, 1).await;
    // A valid event dead-lettered as if Postgres had refused it, now fixed.
    let (fixed, body) = event("p", "t", json!({"fixed": true}));
    let mut headers = FieldTable::default();
    with_header(
        &mut headers,
        "x-error",
        "storing the event: Postgres refused it",
    );
    env.publish_raw(
        "",
        topology::DEAD_QUEUE,
        &serde_json::to_vec(&body).unwrap(),
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(headers),
    )
    .await;

    let listed = wait_for_dead(&env, 2).await;
    assert_eq!(uuid(&listed[0]["reference"]), malformed);
    assert!(listed[0]["error"].as_str().unwrap().contains("event_type"));
    assert_eq!(
        uuid(&listed[1]["reference"]),
        fixed,
        "browsing keeps the order"
    );
    assert_eq!(listed[1]["routing_key"], "t");
    let human = cli(&env, &["dead-letters", "list"], None).await;
    assert!(
        human.ok().stdout.contains("2 of 2 dead letters"),
        "{}",
        human.stdout
    );
    let shown = cli(
        &env,
        &["dead-letters", "show", &malformed.to_string()],
        None,
    )
    .await;
    assert!(
        shown.ok().stdout.contains("field `event_type`"),
        "{}",
        shown.stdout
    );
    cli(&env, &["dead-letters", "show", "nothing"], None)
        .await
        .failed("no dead letter with reference nothing");

    cli(&env, &["dead-letters", "requeue", &fixed.to_string()], None)
        .await
        .failed("--yes");
    cli(&env, &["dead-letters", "requeue", "nothing", "--yes"], None)
        .await
        .failed("no dead letter with reference nothing");
    let requeued = json_of(
        &env,
        &[
            "dead-letters",
            "requeue",
            &fixed.to_string(),
            "--yes",
            "--json",
        ],
    )
    .await;
    assert_eq!(requeued["requeued"], json!([fixed.to_string()]));
    env.wait_for_status(hook, fixed, &["delivered"], Duration::from_secs(10))
        .await;
    let left = wait_for_dead(&env, 1).await;
    assert_eq!(uuid(&left[0]["reference"]), malformed);

    // Requeued unfixed, the malformed event reaches the worker and comes back with a
    // fresh reason.
    cli(&env, &["dead-letters", "requeue", "--all", "--yes"], None)
        .await
        .ok();
    let back = wait_for_dead(&env, 1).await;
    assert!(back[0]["error"].as_str().unwrap().contains("event_type"));
    assert_eq!(rx.seen("hook").len(), 1);
    worker.stop().await.unwrap();
}

/// Stores an event received `ago` ago with one delivery of `status`, one attempt per
/// `(duration_ms, succeeded)`, all as old as the event; returns (event id, delivery id).
async fn seed(
    env: &TestEnv,
    webhook: Uuid,
    status: &str,
    ago: Duration,
    attempts: &[(i32, bool)],
) -> (Uuid, Uuid) {
    let event_id = seed_event(env, ago).await;
    let delivery: Uuid = sqlx::query_scalar(
        "INSERT INTO control_plane.webhook_deliveries \
           (webhook_id, event_id, project_id, event_type, status, attempts, created_at, updated_at) \
         SELECT $1, $2, w.project_id, 't', $3, $4, now() - make_interval(secs => $5), \
           now() - make_interval(secs => $5) \
         FROM control_plane.webhooks w WHERE w.id = $1 RETURNING id",
    )
    .bind(webhook)
    .bind(event_id)
    .bind(status)
    .bind(attempts.len() as i32)
    .bind(ago.as_secs_f64())
    .fetch_one(&env.pool)
    .await
    .unwrap();
    for (n, (duration_ms, succeeded)) in attempts.iter().enumerate() {
        sqlx::query(
            "INSERT INTO control_plane.webhook_delivery_attempts \
               (delivery_id, webhook_id, attempt_number, started_at, duration_ms, succeeded) \
             VALUES ($1, $2, $3, now() - make_interval(secs => $4), $5, $6)",
        )
        .bind(delivery)
        .bind(webhook)
        .bind(n as i32 + 1)
        .bind(ago.as_secs_f64())
        .bind(duration_ms)
        .bind(succeeded)
        .execute(&env.pool)
        .await
        .unwrap();
    }
    (event_id, delivery)
}

async fn seed_event(env: &TestEnv, ago: Duration) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO control_plane.events (id, project_id, event_type, data, occurred_at, received_at) \
         VALUES (gen_random_uuid(), 'p', 't', '{}', now(), now() - make_interval(secs => $1)) \
         RETURNING id",
    )
    .bind(ago.as_secs_f64())
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86400);

#[tokio::test]
async fn stats_count_known_deliveries_per_webhook_and_project() {
    let env = TestEnv::new().await;
    let a = env
        .add_webhook(WebhookSpec::new("p1", "t", "http://127.0.0.1:9/a"))
        .await;
    let b = env
        .add_webhook(WebhookSpec {
            disabled: true,
            ..WebhookSpec::new("p1", "*", "http://127.0.0.1:9/b")
        })
        .await;
    let c = env
        .add_webhook(WebhookSpec::new("p2", "t", "http://127.0.0.1:9/c"))
        .await;
    sqlx::query("UPDATE control_plane.webhooks SET consecutive_failures = 5 WHERE id = $1")
        .bind(b)
        .execute(&env.pool)
        .await
        .unwrap();
    seed(&env, a, "delivered", HOUR, &[(100, true)]).await;
    seed(&env, a, "delivered", HOUR, &[(300, false), (200, true)]).await;
    seed(&env, a, "permanently_failed", HOUR, &[(400, false)]).await;
    seed(&env, a, "failed", HOUR, &[(1000, false)]).await;
    seed(&env, a, "delivered", 3 * DAY, &[(50, true)]).await; // outside the default window
    seed(&env, b, "disabled", HOUR, &[(50, false)]).await;

    let stats = json_of(&env, &["stats", "--json"]).await;
    let find = |list: &str, key: &str, value: String| {
        stats[list]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s[key].as_str() == Some(value.as_str()))
            .unwrap_or_else(|| panic!("no {key} {value} in {stats}"))
            .clone()
    };
    let sa = find("webhooks", "webhook_id", a.to_string());
    assert_eq!(
        (
            sa["deliveries"].as_i64(),
            sa["delivered"].as_i64(),
            sa["failed"].as_i64()
        ),
        (Some(4), Some(2), Some(1))
    );
    assert_eq!(sa["permanently_failed"], 1);
    assert!((sa["success_rate"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-9);
    assert_eq!(sa["attempts_per_delivery"], 1.25);
    assert_eq!(sa["attempts"], 5);
    assert_eq!(sa["p50_attempt_ms"], 300.0);
    assert!((sa["p95_attempt_ms"].as_f64().unwrap() - 880.0).abs() < 1e-6);
    let sb = find("webhooks", "webhook_id", b.to_string());
    assert_eq!(
        (
            sb["consecutive_failures"].as_i64(),
            sb["disabled_webhooks"].as_i64()
        ),
        (Some(5), Some(1))
    );
    assert_eq!(sb["success_rate"], 0.0);
    let sc = find("webhooks", "webhook_id", c.to_string());
    assert_eq!(sc["deliveries"], 0);
    assert!(sc["success_rate"].is_null());

    let p1 = find("projects", "project_id", "p1".into());
    assert_eq!(
        (p1["webhooks"].as_i64(), p1["disabled_webhooks"].as_i64()),
        (Some(2), Some(1))
    );
    assert_eq!(
        (p1["deliveries"].as_i64(), p1["attempts"].as_i64()),
        (Some(5), Some(6))
    );
    assert_eq!(p1["success_rate"], 0.5);
    assert_eq!(p1["p50_attempt_ms"], 250.0);
    assert_eq!(p1["consecutive_failures"], 5);

    let week = json_of(
        &env,
        &["stats", "--since", "7d", "--project", "p1", "--json"],
    )
    .await;
    assert_eq!(week["projects"].as_array().unwrap().len(), 1);
    assert_eq!(week["projects"][0]["deliveries"], 6);
    let human = cli(&env, &["stats"], None).await;
    assert!(human.ok().stdout.contains("66.7%"), "{}", human.stdout);
}

#[tokio::test]
async fn publish_reads_json_lines_and_data_files() {
    let OneHook {
        env,
        rx,
        hook,
        worker,
        ..
    } = OneHook::start("hook", vec![Reply::Status(200)], &[]).await;
    let (first, e1) = event("p", "t", json!({"n": 1}));
    let (second, e2) = event("p", "t", json!({"n": 2}));
    let input = format!(
        "{e1}\nnot json\n\n{}\n{e2}\n",
        json!({"id": Uuid::new_v4()})
    );
    let ran = cli(&env, &["publish", "--stdin"], Some(&input)).await;
    assert_eq!(
        ran.code,
        Some(1),
        "bad lines make a non-zero exit: {}",
        ran.stderr
    );
    assert_eq!(ran.stdout, format!("{first}\n{second}\n"));
    assert!(
        ran.stderr.contains("line 2: body is not JSON"),
        "{}",
        ran.stderr
    );
    assert!(
        ran.stderr.contains("line 4: field `project_id`"),
        "{}",
        ran.stderr
    );
    assert!(
        ran.stderr.contains("2 of 4 lines were not published"),
        "{}",
        ran.stderr
    );
    for id in [first, second] {
        env.wait_for_status(hook, id, &["delivered"], Duration::from_secs(10))
            .await;
    }

    let path = std::env::temp_dir().join(format!("{}.json", Uuid::new_v4()));
    std::fs::write(&path, r#"{"from": "a file"}"#).unwrap();
    let data = format!("@{}", path.display());
    let publish = ["publish", "--project", "p", "--type", "t", "--data"];
    let ran = json_of(&env, &[&publish[..], &[&data, "--json"]].concat()).await;
    let id = uuid(&ran["id"]);
    std::fs::remove_file(&path).ok();
    env.wait_for_status(hook, id, &["delivered"], Duration::from_secs(10))
        .await;
    let sent: Value = serde_json::from_slice(&rx.seen("hook")[2].body).unwrap();
    assert_eq!(sent["data"], json!({"from": "a file"}));
    cli(&env, &[&publish[..], &["@/no/such/file"]].concat(), None)
        .await
        .failed("reading --data from /no/such/file");
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn prune_keeps_events_of_the_last_day_whose_deliveries_may_not_be_written_yet() {
    let env = TestEnv::new().await;
    let older = seed_event(&env, 2 * DAY).await;
    let recent = seed_event(&env, Duration::from_secs(120)).await;
    let pruned = json_of(&env, &["prune", "--older-than", "1m", "--json"]).await;
    assert_eq!(pruned["events"], 1);
    let events: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM control_plane.events")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(events, vec![recent], "{older} went, the recent one stays");
}

#[tokio::test]
async fn prune_removes_what_ended_long_ago_and_keeps_unfinished_deliveries() {
    let env = TestEnv::new().await;
    let hook = env
        .add_webhook(WebhookSpec::new("p", "t", "http://127.0.0.1:9/"))
        .await;
    let old = 40 * DAY;
    let (done_event, _) = seed(&env, hook, "delivered", old, &[(10, false), (10, true)]).await;
    let (retrying_event, retrying) = seed(&env, hook, "failed", old, &[(10, false)]).await;
    let (_, pending) = seed(&env, hook, "pending", old, &[]).await;
    let (recent_event, _) = seed(&env, hook, "delivered", DAY, &[(10, true)]).await;
    let lone_event = seed_event(&env, old).await;
    // An old event with a finished and an unfinished delivery keeps the unfinished one.
    let other = env
        .add_webhook(WebhookSpec::new("p", "*", "http://127.0.0.1:9/o"))
        .await;
    let (_, pending_event_done) = seed(&env, other, "delivered", old, &[(10, true)]).await;
    let shared_event: Uuid =
        sqlx::query_scalar("SELECT event_id FROM control_plane.webhook_deliveries WHERE id = $1")
            .bind(pending)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    sqlx::query("UPDATE control_plane.webhook_deliveries SET event_id = $1 WHERE id = $2")
        .bind(shared_event)
        .bind(pending_event_done)
        .execute(&env.pool)
        .await
        .unwrap();

    let dry = json_of(
        &env,
        &["prune", "--older-than", "30d", "--dry-run", "--json"],
    )
    .await;
    assert_eq!(
        (dry["deliveries"].as_i64(), dry["attempts"].as_i64()),
        (Some(2), Some(3))
    );
    let counts = |table: &'static str| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM control_plane.{table}"
            )))
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(
        counts("webhook_deliveries").await,
        5,
        "a dry run deletes nothing"
    );

    let pruned = json_of(
        &env,
        &["prune", "--older-than", "30d", "--batch", "1", "--json"],
    )
    .await;
    assert_eq!(
        (pruned["deliveries"].as_i64(), pruned["attempts"].as_i64()),
        (Some(2), Some(3))
    );
    assert_eq!(pruned["events"], dry["events"]);
    assert_eq!(
        pruned["events"], 3,
        "the delivered one's, the lone one, and the one left without deliveries"
    );
    let events: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM control_plane.events")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert!(!events.contains(&done_event) && !events.contains(&lone_event));
    for kept in [retrying_event, recent_event, shared_event] {
        assert!(events.contains(&kept), "event {kept} is kept");
    }
    let deliveries: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM control_plane.webhook_deliveries")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert!(deliveries.contains(&retrying) && deliveries.contains(&pending));
    assert!(!deliveries.contains(&pending_event_done));
    assert_eq!(counts("webhook_deliveries").await, 3);
    assert_eq!(counts("webhook_delivery_attempts").await, 2);
    let human = cli(&env, &["prune", "--older-than", "30d"], None).await;
    assert!(
        human.ok().stdout.contains("deleted 0 deliveries"),
        "{}",
        human.stdout
    );
}
