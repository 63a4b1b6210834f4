//! `/metrics` shows every family after real traffic, with closed label sets only.

use std::time::Duration;

use lapin::BasicProperties;
use webhook_worker::topology;

use crate::harness::{Receiver, Reply, TestEnv, WebhookSpec, event};

#[tokio::test]
async fn metrics_show_every_family_after_traffic() {
    let env = TestEnv::new().await;
    let rx = Receiver::start().await;
    let flaky = env
        .add_webhook(WebhookSpec::new(
            "p",
            "t",
            &rx.url("flaky", vec![Reply::Status(500), Reply::Status(200)]),
        ))
        .await;
    let gone = env
        .add_webhook(WebhookSpec::new(
            "p",
            "t",
            &rx.url("gone", vec![Reply::Status(410)]),
        ))
        .await;
    let worker = env.start_worker(&["--retry-schedule", "200ms"]).await;
    let (id, body) = event("p", "t", serde_json::json!({}));
    env.publish(&body).await;
    env.publish(&body).await; // a duplicate
    env.publish_raw(
        topology::EXCHANGE,
        "t",
        b"not json",
        BasicProperties::default(),
    )
    .await;
    env.wait_for_status(flaky, id, &["delivered"], Duration::from_secs(10))
        .await;
    env.wait_for_status(gone, id, &["permanently_failed"], Duration::from_secs(10))
        .await;
    env.wait_for_dead_letters(1).await;

    let url = format!("http://{}/metrics", worker.http_addr);
    let response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    for line in [
        r#"webhook_worker_messages_consumed_total{kind="event",outcome="acked"} 1"#,
        r#"webhook_worker_messages_consumed_total{kind="event",outcome="duplicate"} 1"#,
        r#"webhook_worker_messages_consumed_total{kind="event",outcome="dead_lettered"} 1"#,
        r#"webhook_worker_messages_consumed_total{kind="retry",outcome="acked"} 1"#,
        r#"webhook_worker_deliveries_finished_total{status="delivered"} 1"#,
        r#"webhook_worker_deliveries_finished_total{status="permanently_failed"} 1"#,
        r#"webhook_worker_attempts_total{outcome="failed",error_type="HTTP_ERROR"} 2"#,
        r#"webhook_worker_attempts_total{outcome="succeeded",error_type="none"} 1"#,
        "webhook_worker_attempt_duration_seconds_count 3",
        "webhook_worker_delivery_latency_seconds_count 1",
        "webhook_worker_attempts_in_flight 0",
        r#"webhook_worker_retries_scheduled_total{delay="200ms"} 1"#,
        r#"webhook_worker_webhooks_disabled_total{reason="gone"} 1"#,
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    // No id, URL or project ever becomes a label.
    for leak in [id.to_string(), rx.addr.to_string(), "project".to_string()] {
        assert!(!text.contains(&leak), "{leak} in\n{text}");
    }
    worker.stop().await.unwrap();
}
