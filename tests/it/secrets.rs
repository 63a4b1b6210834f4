//! Secrets stay secret: webhook secrets never reach the logs, passwords in URLs are
//! redacted wherever a URL is printed, and `--help` shows neither.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{Receiver, Reply, TestEnv, WebhookSpec, WorkerProcess, event};

const BIN: &str = env!("CARGO_BIN_EXE_webhook-worker");
const SECRET: &str = "whsec_c2VjcmV0LXRoYXQtbXVzdC1uZXZlci1sZWFrISE=";

#[tokio::test]
async fn a_webhook_secret_never_reaches_the_logs() {
    let env = TestEnv::new().await;
    let rx = Receiver::start().await;
    let hook = env
        .add_webhook(WebhookSpec {
            secret: Some(SECRET),
            ..WebhookSpec::new(
                "p",
                "t",
                &rx.url("hook", vec![Reply::Status(500), Reply::Status(200)]),
            )
        })
        .await;
    env.declare_topology().await;
    let worker =
        WorkerProcess::command(&env, &[("RETRY_SCHEDULE", "100ms"), ("RUST_LOG", "debug")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
    let (id, body) = event("p", "t", serde_json::json!({}));
    env.publish(&body).await;
    env.wait_for_status(hook, id, &["delivered"], Duration::from_secs(20))
        .await;
    let pid = worker.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let out = tokio::task::spawn_blocking(move || worker.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let logs =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        logs.contains("attempt failed"),
        "the debug logs were captured: {logs}"
    );
    let key = SECRET.trim_start_matches("whsec_");
    assert!(!logs.contains(key), "the secret appears in the logs");
}

#[test]
fn passwords_in_urls_are_never_printed() {
    let help = Command::new(BIN)
        .arg("--help")
        .env("DATABASE_URL", "postgres://u:pg-password-1@127.0.0.1:1/db")
        .env("AMQP_URL", "amqp://u:amqp-password-1@127.0.0.1:1/%2f")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("DATABASE_URL")
            && !help.contains("pg-password-1")
            && !help.contains("amqp-password-1")
    );

    // Neither service answers: the worker logs its attempts to reach them.
    let mut worker = Command::new(BIN)
        .arg("run")
        .env("DATABASE_URL", "postgres://u:pg-password-1@127.0.0.1:1/db")
        .env("AMQP_URL", "amqp://u:amqp-password-1@127.0.0.1:1/%2f")
        .env("HTTP_ADDR", "127.0.0.1:0")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(7));
    worker.kill().unwrap();
    let out = worker.wait_with_output().unwrap();
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(logs.contains("not consuming"), "{logs}");
    assert!(
        !logs.contains("pg-password-1") && !logs.contains("amqp-password-1"),
        "{logs}"
    );
}
