//! Fan-out, the request each receiver gets, and what is recorded about it.

use std::time::Duration;

use serde_json::json;

use crate::harness::{OneHook, Receiver, Reply, TestEnv, WebhookSpec, event};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[tokio::test]
async fn fans_out_to_every_matching_webhook_with_method_headers_body_and_signature() {
    let env = TestEnv::new().await;
    let rx = Receiver::start().await;
    let exact = env
        .add_webhook(WebhookSpec {
            headers: json!({"X-Api-Key": "k1", "Content-Type": "text/plain", "webhook-id": "forged"}),
            ..WebhookSpec::new("p1", "order.created", &rx.url("exact", vec![Reply::Status(200)]))
        })
        .await;
    let star = env
        .add_webhook(WebhookSpec {
            method: "PUT",
            ..WebhookSpec::new("p1", "*", &rx.url("star", vec![Reply::Status(204)]))
        })
        .await;
    let signed = env
        .add_webhook(WebhookSpec {
            method: "PATCH",
            secret: Some(SECRET),
            ..WebhookSpec::new(
                "p1",
                "order.created",
                &rx.url("signed", vec![Reply::Status(202)]),
            )
        })
        .await;
    let other_type = env
        .add_webhook(WebhookSpec::new(
            "p1",
            "order.deleted",
            &rx.url("other-type", vec![Reply::Status(200)]),
        ))
        .await;
    let other_project = env
        .add_webhook(WebhookSpec::new(
            "p2",
            "order.created",
            &rx.url("other-project", vec![Reply::Status(200)]),
        ))
        .await;
    let disabled = env
        .add_webhook(WebhookSpec {
            disabled: true,
            ..WebhookSpec::new(
                "p1",
                "order.created",
                &rx.url("disabled", vec![Reply::Status(200)]),
            )
        })
        .await;
    let worker = env.start_worker(&[]).await;

    let (id, mut body) = event(
        "p1",
        "order.created",
        json!({"z": 1, "a": [1.50, "x"], "n": null}),
    );
    body["occurred_at"] = json!("2026-03-04T05:06:07.250Z");
    env.publish(&body).await;

    for (hook, method) in [("exact", "POST"), ("star", "PUT"), ("signed", "PATCH")] {
        let seen = rx.wait_for(hook, 1, Duration::from_secs(10)).await;
        let req = &seen[0];
        assert_eq!(req.method.as_str(), method, "{hook}");
        assert_eq!(req.headers["content-type"], "application/json", "{hook}");
        assert_eq!(req.headers["webhook-id"], id.to_string().as_str(), "{hook}");
        assert!(
            req.headers["user-agent"]
                .to_str()
                .unwrap()
                .starts_with("webhook-worker/")
        );
        let ts: i64 = req.headers["webhook-timestamp"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (chrono::Utc::now().timestamp() - ts).abs() < 30,
            "{hook}: timestamp {ts}"
        );
        let sent: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(
            sent,
            json!({"type": "order.created", "timestamp": "2026-03-04T05:06:07.250Z",
                   "data": {"z": 1, "a": [1.50, "x"], "n": null}}),
            "{hook}"
        );
    }
    let exact_req = &rx.seen("exact")[0];
    assert_eq!(exact_req.headers["x-api-key"], "k1");
    assert!(
        exact_req.headers.get("webhook-signature").is_none(),
        "no secret, no signature"
    );

    // The signature verifies with the official Standard Webhooks library.
    let signed_req = &rx.seen("signed")[0];
    let verifier = standardwebhooks::Webhook::new(SECRET).unwrap();
    verifier
        .verify(&signed_req.body, &signed_req.headers)
        .expect("an independent verifier accepts the signature");
    let mut tampered = signed_req.body.to_vec();
    tampered[10] ^= 1;
    assert!(verifier.verify(&tampered, &signed_req.headers).is_err());

    for (hook, code) in [(exact, 200), (star, 204), (signed, 202)] {
        let d = env
            .wait_for_status(hook, id, &["delivered"], Duration::from_secs(5))
            .await;
        assert_eq!((d.attempts, d.http_status_code), (1, Some(code)));
        assert!(d.is_delivered && !d.has_next_retry && d.error_type.is_none());
        let attempts = env.attempts(d.id).await;
        assert_eq!(attempts.len(), 1);
        assert_eq!(
            (attempts[0].attempt_number, attempts[0].succeeded),
            (1, true)
        );
        let state = env.webhook(hook).await;
        assert!(state.has_last_delivery && state.consecutive_failures == 0);
    }
    for hook in [other_type, other_project, disabled] {
        assert!(env.deliveries_of(hook).await.is_empty());
    }
    for path in ["other-type", "other-project", "disabled"] {
        assert!(rx.seen(path).is_empty(), "{path} must get nothing");
    }
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn response_bodies_are_capped_and_redirects_not_followed() {
    let env = TestEnv::new().await;
    let rx = Receiver::start().await;
    let big = env
        .add_webhook(WebhookSpec::new(
            "p",
            "big",
            &rx.url("big", vec![Reply::Body(200, "x".repeat(300_000))]),
        ))
        .await;
    let target = rx.url("target", vec![Reply::Status(200)]);
    let redirect = env
        .add_webhook(WebhookSpec::new(
            "p",
            "redirect",
            &rx.url("redirect", vec![Reply::WithHeader(302, "location", target)]),
        ))
        .await;
    let worker = env.start_worker(&["--retry-schedule", "none"]).await;

    let (big_event, body) = event("p", "big", json!({}));
    env.publish(&body).await;
    let (redirect_event, body) = event("p", "redirect", json!({}));
    env.publish(&body).await;

    let d = env
        .wait_for_status(big, big_event, &["delivered"], Duration::from_secs(10))
        .await;
    assert_eq!(d.response_body.as_deref().map(str::len), Some(64 * 1024));
    let attempts = env.attempts(d.id).await;
    assert_eq!(attempts[0].response_body, d.response_body);
    let d = env
        .wait_for_status(
            redirect,
            redirect_event,
            &["permanently_failed"],
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(
        (d.http_status_code, d.error_type.as_deref()),
        (Some(302), Some("HTTP_ERROR"))
    );
    assert!(
        rx.seen("target").is_empty(),
        "the redirect must not be followed"
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_receiver_that_never_answers_times_out() {
    let args = ["--retry-schedule", "none", "--delivery-timeout", "500ms"];
    let t = OneHook::start("hang", vec![Reply::Hang], &args).await;
    let id = t.publish().await;
    let d = t.wait(id, &["permanently_failed"], 10).await;
    assert_eq!(d.error_type.as_deref(), Some("REQUEST_TIMEOUT"));
    assert_eq!(d.http_status_code, None);
    let attempts = t.env.attempts(d.id).await;
    assert_eq!(attempts.len(), 1);
    assert!(!attempts[0].succeeded);
    t.stop().await;
}

#[tokio::test]
async fn a_slow_receiver_does_not_delay_a_fast_one() {
    let env = TestEnv::new().await;
    let rx = Receiver::start().await;
    let slow = env
        .add_webhook(WebhookSpec::new(
            "p",
            "slow",
            &rx.url("slow", vec![Reply::Hold]),
        ))
        .await;
    let fast = env
        .add_webhook(WebhookSpec::new(
            "p",
            "fast",
            &rx.url("fast", vec![Reply::Status(200)]),
        ))
        .await;
    // Three slow requests held open; one slot left for everything else.
    let worker = env
        .start_worker(&["--max-in-flight", "4", "--delivery-timeout", "60s"])
        .await;

    let mut slow_events = Vec::new();
    for _ in 0..3 {
        let (id, body) = event("p", "slow", json!({}));
        env.publish(&body).await;
        slow_events.push(id);
    }
    rx.wait_for("slow", 3, Duration::from_secs(10)).await;
    let mut fast_events = Vec::new();
    for i in 0..20 {
        let (id, body) = event("p", "fast", json!({"i": i}));
        env.publish(&body).await;
        fast_events.push(id);
    }
    for id in &fast_events {
        env.wait_for_status(fast, *id, &["delivered"], Duration::from_secs(10))
            .await;
    }
    // All twenty went through while the three slow requests were still held open.
    assert_eq!(rx.seen("slow").len(), 3);
    for id in &slow_events {
        // Still under way: a new event's delivery is written with its first outcome.
        assert!(env.delivery(slow, *id).await.is_none());
    }
    rx.release();
    for id in &slow_events {
        env.wait_for_status(slow, *id, &["delivered"], Duration::from_secs(10))
            .await;
    }
    worker.stop().await.unwrap();
}
