//! The binary as users run it: `migrate`, `run`, `publish`, SIGTERM, and start-up checks.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::harness::{Receiver, Reply, TestEnv, WebhookSpec};

const BIN: &str = env!("CARGO_BIN_EXE_webhook-worker");

#[tokio::test]
async fn the_binary_delivers_a_published_event_and_exits_0_on_sigterm() {
    let env = TestEnv::new().await;
    let rx = Receiver::start().await;
    let hook = env
        .add_webhook(WebhookSpec::new(
            "demo",
            "order.created",
            &rx.url("hook", vec![Reply::Status(200)]),
        ))
        .await;
    let envs = [
        ("DATABASE_URL", env.db_url.as_str()),
        ("AMQP_URL", env.amqp_url.as_str()),
        ("HTTP_ADDR", "127.0.0.1:0"),
        ("ALLOW_PRIVATE_IPS", "true"),
    ];
    let status = Command::new(BIN)
        .arg("migrate")
        .envs(envs)
        .status()
        .unwrap();
    assert!(status.success(), "migrate is idempotent");

    let mut worker = Command::new(BIN)
        .arg("run")
        .envs(envs)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = Command::new(BIN)
        .args([
            "publish",
            "--project",
            "demo",
            "--type",
            "order.created",
            "--data",
            r#"{"n":1}"#,
        ])
        .envs(envs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id: uuid::Uuid = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    env.wait_for_status(hook, id, &["delivered"], Duration::from_secs(20))
        .await;
    let sent: serde_json::Value = serde_json::from_slice(&rx.seen("hook")[0].body).unwrap();
    assert_eq!(sent["data"], json!({"n": 1}));

    let pid = worker.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::task::spawn_blocking(move || worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
}

#[tokio::test]
async fn a_queue_declared_with_other_arguments_stops_the_worker() {
    let env = TestEnv::new().await;
    // Quorum queues exist; a worker configured for classic ones must not start.
    env.start_worker(&[]).await.stop().await.unwrap();
    let worker = webhook_worker::Worker::build(env.config(&["--queue-type", "classic"]))
        .await
        .unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        worker.run_until_stopped(tokio_util::sync::CancellationToken::new()),
    )
    .await
    .expect("the worker exits instead of retrying");
    let error = format!("{:#}", result.unwrap_err());
    assert!(
        error.contains("queue webhook.events.dead") || error.contains("queue webhook.events.work"),
        "{error}"
    );
    assert!(error.contains("x-queue-type"), "{error}");

    // The binary says so and exits non-zero.
    let out = Command::new(BIN)
        .arg("run")
        .envs([
            ("DATABASE_URL", env.db_url.as_str()),
            ("AMQP_URL", env.amqp_url.as_str()),
            ("HTTP_ADDR", "127.0.0.1:0"),
        ])
        .env("QUEUE_TYPE", "classic")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists with other arguments"));
}
