//! The webhook's failure counter and disabled state, and rows that cannot be used.

use std::time::Duration;

use serde_json::json;

use crate::harness::{OneHook, Receiver, Reply, TestEnv, WebhookSpec, event};

#[tokio::test]
async fn disables_after_the_threshold_and_stops_its_other_deliveries() {
    let args = [
        "--disable-after-failures",
        "3",
        "--retry-schedule",
        "300ms,300ms,300ms,300ms,300ms",
    ];
    let t = OneHook::start("down", vec![Reply::Status(500)], &args).await;
    let first = t.publish().await;
    let second = t.publish().await;

    t.wait(first, &["disabled"], 10).await;
    t.wait(second, &["disabled"], 10).await;
    let state = t.env.webhook(t.hook).await;
    assert!(state.disabled);
    let reason = state.disabled_reason.unwrap();
    assert!(
        reason.contains("3 consecutive failed attempts") && reason.contains("HTTP_ERROR"),
        "{reason}"
    );
    assert_eq!(state.consecutive_failures, 3);

    // The retries still queued are dropped without a request. The other delivery's
    // attempt may have been under way when the webhook was disabled: it is recorded, but
    // leaves the counter alone, and nothing starts after the disable.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let requests = t.seen().len();
    assert!((3..=4).contains(&requests), "{requests} requests");
    let mut attempts = 0;
    for d in t.env.deliveries_of(t.hook).await {
        let rows = t.env.attempts(d.id).await;
        assert_eq!(d.attempts as usize, rows.len());
        assert_eq!(d.error_type.as_deref(), Some("WEBHOOK_DISABLED"));
        attempts += rows.len();
    }
    assert_eq!(attempts, requests, "every request has its attempt row");
    assert_eq!(t.env.webhook(t.hook).await.consecutive_failures, 3);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(t.seen().len(), requests, "no request after the disable");

    // A disabled webhook gets no new deliveries.
    let third = t.publish().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(t.env.delivery(t.hook, third).await.is_none());

    // Re-enabled with plain SQL, it gets new events again and starts with a clean counter.
    sqlx::query("UPDATE control_plane.webhooks SET disabled = false WHERE id = $1")
        .bind(t.hook)
        .execute(&t.env.pool)
        .await
        .unwrap();
    let state = t.env.webhook(t.hook).await;
    assert!(!state.disabled && state.consecutive_failures == 0 && !state.is_failing);
    t.rx.set_script("down", vec![Reply::Status(200)]);
    let fourth = t.publish().await;
    t.wait(fourth, &["delivered"], 10).await;
    t.stop().await;
}

#[tokio::test]
async fn zero_never_disables() {
    let args = [
        "--disable-after-failures",
        "0",
        "--retry-schedule",
        "100ms,100ms,100ms,100ms,100ms,100ms,100ms",
    ];
    let t = OneHook::start("down", vec![Reply::Status(500)], &args).await;
    let id = t.publish().await;
    let d = t.wait(id, &["permanently_failed"], 10).await;
    assert_eq!(d.attempts, 8);
    let state = t.env.webhook(t.hook).await;
    assert!(!state.disabled);
    assert_eq!(state.consecutive_failures, 8);
    t.stop().await;
}

#[tokio::test]
async fn gone_disables_at_once_and_stops_waiting_retries() {
    let t = OneHook::start(
        "gone",
        vec![Reply::Status(500)],
        &["--retry-schedule", "1500ms"],
    )
    .await;
    let waiting = t.publish().await;
    t.wait(waiting, &["failed"], 10).await;

    t.rx.set_script("gone", vec![Reply::Status(500), Reply::Status(410)]);
    let gone = t.publish().await;
    let d = t.wait(gone, &["permanently_failed"], 10).await;
    assert_eq!(d.http_status_code, Some(410));
    let state = t.env.webhook(t.hook).await;
    assert!(state.disabled);
    assert!(state.disabled_reason.unwrap().contains("410"));
    let w = t.wait(waiting, &["disabled"], 5).await;
    assert_eq!(w.attempts, 1);
    // The first event's retry comes out of the delay queue and is dropped.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(t.seen().len(), 2);
    assert_eq!(
        t.env.delivery(t.hook, waiting).await.unwrap().status,
        "disabled"
    );
    t.stop().await;
}

#[tokio::test]
async fn a_broken_webhook_row_fails_that_delivery_alone() {
    let env = TestEnv::new().await;
    let rx = Receiver::start().await;
    let good = env
        .add_webhook(WebhookSpec::new(
            "p",
            "t",
            &rx.url("good", vec![Reply::Status(200)]),
        ))
        .await;
    let cases = [
        (
            WebhookSpec::new("p", "t", "not a url"),
            "INVALID_URL",
            "url",
        ),
        (
            WebhookSpec::new("p", "t", "ftp://127.0.0.1/x"),
            "INVALID_URL",
            "scheme",
        ),
        (
            WebhookSpec {
                method: "GET",
                ..WebhookSpec::new("p", "t", "http://127.0.0.1:9/")
            },
            "INVALID_WEBHOOK",
            "http_method",
        ),
        (
            WebhookSpec {
                headers: json!(["x"]),
                ..WebhookSpec::new("p", "t", "http://127.0.0.1:9/")
            },
            "INVALID_WEBHOOK",
            "headers",
        ),
        (
            WebhookSpec {
                headers: json!({"x": "a\r\nb: c"}),
                ..WebhookSpec::new("p", "t", "http://127.0.0.1:9/")
            },
            "INVALID_WEBHOOK",
            "header",
        ),
        (
            WebhookSpec {
                secret: Some("whsec_tooshort"),
                ..WebhookSpec::new("p", "t", "http://127.0.0.1:9/")
            },
            "INVALID_WEBHOOK",
            "secret",
        ),
    ];
    let mut broken = Vec::new();
    for (spec, error_type, words) in cases {
        broken.push((env.add_webhook(spec).await, error_type, words));
    }
    let worker = env.start_worker(&[]).await;
    let (id, body) = event("p", "t", json!({}));
    env.publish(&body).await;

    env.wait_for_status(good, id, &["delivered"], Duration::from_secs(10))
        .await;
    for (hook, error_type, words) in broken {
        let d = env
            .wait_for_status(hook, id, &["permanently_failed"], Duration::from_secs(10))
            .await;
        assert_eq!(d.error_type.as_deref(), Some(error_type));
        let message = d.error_message.unwrap();
        assert!(message.contains(words), "{message}");
        let attempts = env.attempts(d.id).await;
        assert_eq!(attempts.len(), 1, "a refusal is an attempt row too");
        assert_eq!(attempts[0].error_type.as_deref(), Some(error_type));
        assert_eq!(attempts[0].error_message.as_deref(), Some(message.as_str()));
        assert_eq!(env.webhook(hook).await.consecutive_failures, 1);
    }
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn disabling_with_sql_stops_waiting_retries() {
    let t = OneHook::start(
        "down",
        vec![Reply::Status(500)],
        &["--retry-schedule", "1s"],
    )
    .await;
    let id = t.publish().await;
    t.wait(id, &["failed"], 10).await;
    sqlx::query("UPDATE control_plane.webhooks SET disabled = true WHERE id = $1")
        .bind(t.hook)
        .execute(&t.env.pool)
        .await
        .unwrap();
    // In the same transaction as the disable.
    let d = t.env.delivery(t.hook, id).await.unwrap();
    assert_eq!(d.status, "disabled");
    assert_eq!(d.error_type.as_deref(), Some("WEBHOOK_DISABLED"));
    assert!(!d.has_next_retry);
    let state = t.env.webhook(t.hook).await;
    assert!(state.disabled_at.is_some());
    // Its retry comes out of the delay queue and is dropped without a request.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(t.seen().len(), 1);
    assert_eq!(t.env.delivery(t.hook, id).await.unwrap().attempts, 1);
    t.stop().await;
}
