//! Retries through the delay queues: the schedule, Retry-After, and retry messages that
//! arrive again.

use std::time::Duration;

use lapin::BasicProperties;
use webhook_worker::message::{RETRY_KIND, RetryTask};
use webhook_worker::topology;

use crate::harness::{OneHook, Reply, TestEnv};

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

/// A retry message the broker delivers again (its consumer's connection closed) finds its
/// attempt still marked under way: the worker waits DELIVERY_TIMEOUT + 5 s before taking
/// it over, and takes nothing over that was recorded meanwhile.
#[tokio::test]
async fn a_redelivered_retry_waits_for_the_attempt_under_way() {
    let env = TestEnv::new().await;
    let rx = crate::harness::Receiver::start().await;
    env.declare_topology().await;
    let event_id = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO control_plane.events (id, project_id, event_type, data, occurred_at) \
         VALUES ($1, 'p', 't', '{}', now())",
    )
    .bind(event_id)
    .execute(&env.pool)
    .await
    .unwrap();
    // Two deliveries whose second attempt another process claimed and is making.
    let mut deliveries = Vec::new();
    for path in ["abandoned", "finished"] {
        let url = rx.url(path, vec![Reply::Status(200)]);
        let hook = env
            .add_webhook(crate::harness::WebhookSpec::new("p", "t", &url))
            .await;
        let delivery: uuid::Uuid = sqlx::query_scalar(
            "INSERT INTO control_plane.webhook_deliveries \
               (webhook_id, event_id, project_id, event_type, status, attempts) \
             VALUES ($1, $2, 'p', 't', 'delivering', 1) RETURNING id",
        )
        .bind(hook)
        .bind(event_id)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        let task = RetryTask::new(delivery, 2);
        env.publish_raw(
            "",
            topology::WORK_QUEUE,
            &task.to_bytes(),
            task.properties(&Default::default()),
        )
        .await;
        deliveries.push((hook, delivery));
    }
    // That process's consumer takes both messages, then its connection drops.
    env.take_and_lose(2).await;

    let started = std::time::Instant::now();
    let worker = env.start_worker(&["--delivery-timeout", "1s"]).await;
    // Meanwhile the other process records the attempt it was making for one of them.
    let (_, finished) = deliveries[1];
    sqlx::query(
        "INSERT INTO control_plane.webhook_delivery_attempts \
           (delivery_id, webhook_id, attempt_number, started_at, duration_ms, http_status_code, succeeded) \
         SELECT id, webhook_id, 2, now(), 5, 200, true FROM control_plane.webhook_deliveries WHERE id = $1",
    )
    .bind(finished)
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE control_plane.webhook_deliveries SET status = 'delivered', attempts = 2 WHERE id = $1",
    )
    .bind(finished)
    .execute(&env.pool)
    .await
    .unwrap();

    let (abandoned_hook, _) = deliveries[0];
    let d = env
        .wait_for_status(
            abandoned_hook,
            event_id,
            &["delivered"],
            Duration::from_secs(20),
        )
        .await;
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "taken over after {:?}, before its grace ran out",
        started.elapsed()
    );
    assert_eq!(d.attempts, 2);
    assert_eq!(rx.seen("abandoned").len(), 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        rx.seen("finished").is_empty(),
        "the recorded attempt was made again"
    );
    worker.stop().await.unwrap();
}
