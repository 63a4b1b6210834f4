//! Retries measured against the schedule: the gaps between attempts must match the
//! configured delays within 0.5 s. `scripts/test` runs these alone, after the other tests,
//! so that no other test's set-up competes for the two cores while they measure.

use crate::harness::{OneHook, Reply, Seen};

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
