//! Retries through the delay queues: the schedule, Retry-After, and retry messages that
//! arrive again.

use std::time::Duration;

use lapin::BasicProperties;
use webhook_worker::message::{RETRY_KIND, RetryTask};
use webhook_worker::topology;

use crate::harness::{OneHook, Reply, Seen, TestEnv};

fn gaps(seen: &[Seen]) -> Vec<f64> {
    seen.windows(2)
        .map(|w| (w[1].at - w[0].at).as_secs_f64())
        .collect()
}

fn assert_gaps(actual: &[f64], expected: &[f64]) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "gaps {actual:?}, expected {expected:?}"
    );
    for (a, e) in actual.iter().zip(expected) {
        assert!(
            (a - e).abs() <= 0.5,
            "gap {a:.3}s, expected {e}s +-0.5s (all gaps {actual:?})"
        );
    }
}

#[tokio::test]
async fn retries_follow_the_schedule_then_fail_permanently() {
    let t = OneHook::start(
        "down",
        vec![Reply::Status(500)],
        &["--retry-schedule", "200ms,1500ms,3s"],
    )
    .await;
    let id = t.publish().await;

    let d = t.wait(id, &["permanently_failed"], 15).await;
    let seen = t.seen();
    assert_eq!(seen.len(), 4, "one attempt and three retries");
    assert_gaps(&gaps(&seen), &[0.2, 1.5, 3.0]);
    assert_eq!(
        (d.attempts, d.http_status_code, d.error_type.as_deref()),
        (4, Some(500), Some("HTTP_ERROR"))
    );
    assert!(!d.has_next_retry);
    let attempts = t.env.attempts(d.id).await;
    assert_eq!(
        attempts
            .iter()
            .map(|a| a.attempt_number)
            .collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert!(
        attempts
            .iter()
            .all(|a| !a.succeeded && a.http_status_code == Some(500))
    );
    assert!(
        attempts
            .windows(2)
            .all(|w| w[0].started_at < w[1].started_at)
    );
    let state = t.env.webhook(t.hook).await;
    assert_eq!(state.consecutive_failures, 4);
    assert!(!state.disabled && state.is_failing && state.has_last_failure);
    // Every request carried the same webhook-id.
    assert!(
        seen.iter()
            .all(|s| s.headers["webhook-id"] == id.to_string().as_str())
    );
    t.stop().await;
}

#[tokio::test]
async fn a_retry_that_succeeds_resets_the_failure_counter() {
    let script = vec![Reply::Status(500), Reply::Status(503), Reply::Status(200)];
    let t = OneHook::start("flaky", script, &["--retry-schedule", "200ms,200ms,200ms"]).await;
    let id = t.publish().await;

    let d = t.wait(id, &["delivered"], 10).await;
    assert_eq!((d.attempts, d.http_status_code), (3, Some(200)));
    assert!(d.error_type.is_none() && d.error_message.is_none() && d.is_delivered);
    let attempts = t.env.attempts(d.id).await;
    assert_eq!(
        attempts
            .iter()
            .map(|a| (a.attempt_number, a.http_status_code, a.succeeded))
            .collect::<Vec<_>>(),
        vec![
            (1, Some(500), false),
            (2, Some(503), false),
            (3, Some(200), true)
        ]
    );
    let state = t.env.webhook(t.hook).await;
    assert_eq!(state.consecutive_failures, 0);
    assert!(!state.is_failing && state.has_last_delivery && state.has_last_failure);
    t.stop().await;
}

#[tokio::test]
async fn retry_after_chooses_the_smallest_delay_that_covers_it() {
    let script = vec![
        Reply::WithHeader(429, "retry-after", "1".into()),
        Reply::WithHeader(503, "retry-after", "2".into()),
        Reply::Status(200),
    ];
    let t = OneHook::start("busy", script, &["--retry-schedule", "200ms,1500ms,3s"]).await;
    let id = t.publish().await;

    let d = t.wait(id, &["delivered"], 15).await;
    assert_eq!(d.attempts, 3);
    // 429 with Retry-After 1 s after attempt 1: max(200ms, 1s) -> 1.5 s.
    // 503 with Retry-After 2 s after attempt 2: max(1.5s, 2s) -> 3 s.
    assert_gaps(&gaps(&t.seen()), &[1.5, 3.0]);
    t.stop().await;
}

#[tokio::test]
async fn a_retry_message_delivered_again_makes_no_second_request() {
    let script = vec![Reply::Status(500), Reply::Status(200)];
    let t = OneHook::start("once", script, &["--retry-schedule", "1500ms"]).await;
    let id = t.publish().await;
    let d = t.wait(id, &["failed"], 10).await;
    assert!(d.has_next_retry);

    // The retry of attempt 2 is waiting in its delay queue; publish it twice more now, as a
    // replay or a duplicate would, plus one for an attempt that is not due.
    for attempt in [2, 2, 3] {
        let task = RetryTask::new(d.id, attempt);
        t.env
            .publish_raw(
                "",
                topology::WORK_QUEUE,
                &task.to_bytes(),
                task.properties(&Default::default()),
            )
            .await;
    }

    let d = t.wait(id, &["delivered"], 10).await;
    // Let the original retry come out of its delay queue too.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        t.seen().len(),
        2,
        "attempt 1 and one attempt 2, nothing more"
    );
    assert_eq!(d.attempts, 2);
    assert_eq!(t.env.attempts(d.id).await.len(), 2);
    assert_eq!(
        t.env.delivery(t.hook, id).await.unwrap().status,
        "delivered"
    );
    assert!(t.env.dead_letters().await.is_empty());
    t.stop().await;
}

#[tokio::test]
async fn a_malformed_retry_message_is_dead_lettered() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(&[]).await;
    let props = BasicProperties::default().with_type(RETRY_KIND.into());
    env.publish_raw("", topology::WORK_QUEUE, b"{\"v\":1}", props)
        .await;
    let dead = env.wait_for_dead_letters(1).await;
    assert!(
        dead[0].1.contains("retry message is not valid"),
        "{}",
        dead[0].1
    );
    worker.stop().await.unwrap();
}
