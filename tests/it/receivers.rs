//! Receivers that misbehave: each costs bounded memory and time and gets the right
//! error type.

use std::time::Duration;

use crate::harness::{Receiver, Reply, TestEnv, WebhookSpec, event};

#[tokio::test]
async fn hostile_receivers_get_the_right_error_type_in_bounded_time() {
    let env = TestEnv::new().await;
    let rx = Receiver::start().await;
    let huge = env
        .add_webhook(WebhookSpec::new(
            "p",
            "t",
            &rx.url("huge", vec![Reply::Huge(1 << 30)]),
        ))
        .await;
    let trickle = env
        .add_webhook(WebhookSpec::new(
            "p",
            "t",
            &rx.url("trickle", vec![Reply::Trickle]),
        ))
        .await;
    let hang = env
        .add_webhook(WebhookSpec::new(
            "p",
            "t",
            &rx.url("hang", vec![Reply::Hang]),
        ))
        .await;
    // TLS spoken to a plain HTTP server.
    let tls_url = format!("https://127.0.0.1:{}/tls", rx.addr.port());
    let tls = env.add_webhook(WebhookSpec::new("p", "t", &tls_url)).await;
    // Nothing listens on port 9 (discard) of loopback here.
    let refused = env
        .add_webhook(WebhookSpec::new("p", "t", "http://127.0.0.1:9/nobody"))
        .await;
    let unresolvable = env
        .add_webhook(WebhookSpec::new("p", "t", "http://no-such-host.invalid/x"))
        .await;
    let worker = env
        .start_worker(&["--retry-schedule", "none", "--delivery-timeout", "2s"])
        .await;
    let (id, body) = event("p", "t", serde_json::json!({}));
    env.publish(&body).await;

    let wait = |hook, status: &'static str| {
        let env = &env;
        async move {
            env.wait_for_status(hook, id, &[status], Duration::from_secs(15))
                .await
        }
    };
    // A gigabyte answer: 64 KiB are read, the rest dropped unread.
    let d = wait(huge, "delivered").await;
    assert_eq!(d.response_body.map(|b| b.len()), Some(64 * 1024));
    for (hook, error_type) in [
        (trickle, "REQUEST_TIMEOUT"),
        (hang, "REQUEST_TIMEOUT"),
        (tls, "TLS_ERROR"),
        (refused, "URL_NOT_REACHABLE"),
        (unresolvable, "URL_NOT_REACHABLE"),
    ] {
        let d = wait(hook, "permanently_failed").await;
        assert_eq!(
            d.error_type.as_deref(),
            Some(error_type),
            "{:?}",
            d.error_message
        );
        assert!(
            d.duration_ms.unwrap() < 3000,
            "bounded by DELIVERY_TIMEOUT: {d:?}"
        );
    }
    worker.stop().await.unwrap();
}
