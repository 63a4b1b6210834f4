//! `MAX_IN_FLIGHT_PER_WEBHOOK`: a hung webhook holds no more than its share of attempts,
//! its excess deliveries wait in RabbitMQ, and the other webhooks go on meanwhile.

use std::time::Duration;

use lapin::BasicProperties;
use webhook_worker::message::{ParkedDelivery, ParkedGroup, RETRY_KIND};
use webhook_worker::topology;

use crate::harness::{Receiver, Reply, TestEnv, WebhookSpec, event};

#[tokio::test]
async fn a_hung_webhook_takes_its_share_and_its_excess_is_parked_not_lost() {
    let env = TestEnv::new().await;
    let rx = Receiver::start().await;
    let hung = env
        .add_webhook(WebhookSpec::new(
            "p",
            "t",
            &rx.url("hung", vec![Reply::Hold]),
        ))
        .await;
    let healthy = env
        .add_webhook(WebhookSpec::new(
            "p",
            "t",
            &rx.url("ok", vec![Reply::Status(204)]),
        ))
        .await;
    let worker = env
        .start_worker(&["--max-in-flight-per-webhook", "2", "--max-in-flight", "8"])
        .await;
    let mut ids = Vec::new();
    for n in 0..6 {
        let (id, body) = event("p", "t", serde_json::json!({ "n": n }));
        env.publish(&body).await;
        ids.push(id);
    }

    // The healthy webhook gets all six while the hung one holds two requests.
    for id in &ids {
        env.wait_for_status(healthy, *id, &["delivered"], Duration::from_secs(10))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        rx.seen("hung").len(),
        2,
        "at most 2 attempts to one webhook"
    );
    let metrics = reqwest::get(format!("http://{}/metrics", worker.http_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let parked: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("webhook_worker_deliveries_parked_total "))
        .and_then(|n| n.parse().ok())
        .expect("the parked counter");
    assert!(parked >= 4, "the other four wait in RabbitMQ: {parked}");

    // Events that come while it is stalled: their deliveries to it are parked from the
    // start, without holding their messages, and wait unclaimed.
    for n in 6..9 {
        let (id, body) = event("p", "t", serde_json::json!({ "n": n }));
        env.publish(&body).await;
        env.wait_for_status(healthy, id, &["delivered"], Duration::from_secs(10))
            .await;
        let d = env
            .wait_for_status(hung, id, &["pending"], Duration::from_secs(10))
            .await;
        assert_eq!(d.attempts, 0);
        ids.push(id);
    }
    assert_eq!(rx.seen("hung").len(), 2, "still only its share");

    // Once it answers, every parked delivery comes back and is delivered once.
    rx.release();
    for id in &ids {
        let d = env
            .wait_for_status(hung, *id, &["delivered"], Duration::from_secs(30))
            .await;
        assert_eq!(d.attempts, 1, "parking is not an attempt");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.seen("hung").len(), 9, "one request per delivery");
    assert_eq!(rx.seen("ok").len(), 9);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn fan_outs_wider_than_the_attempts_admitted_at_once_are_delivered_in_full() {
    let env = TestEnv::new().await;
    let rx = Receiver::start().await;
    let mut hooks = Vec::new();
    for n in 0..10 {
        let url = rx.url(&format!("ok{n}"), vec![Reply::Status(204)]);
        hooks.push(env.add_webhook(WebhookSpec::new("p", "t", &url)).await);
    }
    // One HTTP slot: four attempts admitted at a time for the fifty deliveries.
    let worker = env.start_worker(&["--max-in-flight", "1"]).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        let (id, body) = event("p", "t", serde_json::json!({ "n": n }));
        env.publish(&body).await;
        ids.push(id);
    }
    for id in &ids {
        for hook in &hooks {
            let d = env
                .wait_for_status(*hook, *id, &["delivered"], Duration::from_secs(20))
                .await;
            assert_eq!(d.attempts, 1);
        }
    }
    for n in 0..10 {
        assert_eq!(
            rx.seen(&format!("ok{n}")).len(),
            5,
            "one request per delivery"
        );
    }
    worker.stop().await.unwrap();
}

/// Parked messages as this version and earlier ones write them: groups, and a delivery
/// parked alone (a retry message with `parked` and `webhook_id`). Each delivery they name
/// is attempted once, however many messages name it, and a group that is not valid is
/// dead-lettered with the reason.
#[tokio::test]
async fn parked_groups_and_singly_parked_deliveries_each_deliver_once() {
    let env = TestEnv::new().await;
    let rx = Receiver::start().await;
    let hook = env
        .add_webhook(WebhookSpec::new(
            "p",
            "t",
            &rx.url("ok", vec![Reply::Status(204)]),
        ))
        .await;
    env.declare_topology().await;
    // Three events' deliveries to the webhook, stored pending: parked before their first
    // attempt.
    let mut events = Vec::new();
    for _ in 0..3 {
        let event_id = uuid::Uuid::new_v4();
        let delivery_id: uuid::Uuid = sqlx::query_scalar(
            "WITH e AS (INSERT INTO control_plane.events \
               (id, project_id, event_type, data, occurred_at) \
               VALUES ($1, 'p', 't', '{}', now()) RETURNING id) \
             INSERT INTO control_plane.webhook_deliveries \
               (webhook_id, event_id, project_id, event_type, status) \
             SELECT $2, id, 'p', 't', 'pending' FROM e RETURNING id",
        )
        .bind(event_id)
        .bind(hook)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        events.push((event_id, delivery_id));
    }
    let ids: Vec<uuid::Uuid> = events.iter().map(|(_, d)| *d).collect();
    let parked = |id| ParkedDelivery::new(id, 1, Default::default());
    // A group naming the first two, and another naming the second again and the third.
    for named in [&ids[0..2], &ids[1..3]] {
        let group = ParkedGroup {
            v: 1,
            webhook_id: hook,
            parked: 1,
            deliveries: named.iter().copied().map(parked).collect(),
        };
        let body = group.to_bytes();
        let props = ParkedGroup::properties();
        env.publish_raw("", topology::WORK_QUEUE, &body, props)
            .await;
    }
    // The third once more, parked alone by an earlier version.
    let old = serde_json::json!({
        "v": 1, "delivery_id": ids[2], "attempt": 1, "parked": 2, "webhook_id": hook,
    });
    let props = BasicProperties::default().with_type(RETRY_KIND.into());
    let body = serde_json::to_vec(&old).unwrap();
    env.publish_raw("", topology::WORK_QUEUE, &body, props)
        .await;
    let broken = ParkedGroup::properties();
    env.publish_raw("", topology::WORK_QUEUE, b"{\"v\":1}", broken)
        .await;

    let worker = env.start_worker(&[]).await;
    for (event_id, delivery_id) in &events {
        let d = env
            .wait_for_status(hook, *event_id, &["delivered"], Duration::from_secs(10))
            .await;
        assert_eq!((d.id, d.attempts), (*delivery_id, 1));
    }
    let dead = env.wait_for_dead_letters(1).await;
    assert!(
        dead[0].1.contains("parked message is not valid"),
        "{}",
        dead[0].1
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.seen("ok").len(), 3, "one request per delivery");
    assert!(
        env.dead_letters().await.is_empty(),
        "only the broken group is dead-lettered"
    );
    worker.stop().await.unwrap();
}
