//! Operational events (issue #6): `webhook.disabled` and `webhook.delivery.exhausted`,
//! published to `webhook.events` in OPERATIONAL_EVENTS_PROJECT and delivered to the
//! webhooks an operator registered there, with deterministic ids and no loops.

use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;
use webhook_worker::message::RetryTask;
use webhook_worker::topology;

use crate::harness::{
    DeliveryRow, Receiver, Reply, RunningWorker, Seen, TestEnv, WebhookSpec, event,
};

/// The namespace the README documents for the ids.
const NAMESPACE: Uuid = uuid::uuid!("b188bb07-a0dd-45bb-8a5b-8b56aeab7f46");

fn disabled_id(webhook: Uuid, delivery: Uuid, attempt: u32) -> Uuid {
    let name = format!("webhook.disabled/{webhook}/{delivery}/{attempt}");
    Uuid::new_v5(&NAMESPACE, name.as_bytes())
}

fn exhausted_id(delivery: Uuid, attempts: u32) -> Uuid {
    let name = format!("webhook.delivery.exhausted/{delivery}/{attempts}");
    Uuid::new_v5(&NAMESPACE, name.as_bytes())
}

/// A request's `webhook-id` and JSON body.
fn id_and_body(seen: &Seen) -> (Uuid, Value) {
    let id = seen.headers["webhook-id"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    (id, serde_json::from_slice(&seen.body).unwrap())
}

/// A fresh environment and receiver, with an operator webhook of project `ops` at `/ops`
/// for `ops_type` answering 200.
struct Fixture {
    env: TestEnv,
    rx: Receiver,
}

impl Fixture {
    async fn new(ops_type: &str) -> Fixture {
        let env = TestEnv::new().await;
        let rx = Receiver::start().await;
        let url = rx.url("ops", vec![Reply::Status(200)]);
        env.add_webhook(WebhookSpec::new("ops", ops_type, &url))
            .await;
        Fixture { env, rx }
    }

    /// A webhook for `project`/`event_type` answering `script` at `/path`.
    async fn hook(&self, project: &str, event_type: &str, path: &str, script: Vec<Reply>) -> Uuid {
        let url = self.rx.url(path, script);
        self.env
            .add_webhook(WebhookSpec::new(project, event_type, &url))
            .await
    }

    /// A worker with OPERATIONAL_EVENTS_PROJECT=ops and `args`.
    async fn worker(&self, args: &[&str]) -> RunningWorker {
        let mut args = args.to_vec();
        args.extend(["--operational-events-project", "ops"]);
        self.env.start_worker(&args).await
    }

    /// Publishes an event; returns its id and body.
    async fn publish(&self, project: &str, event_type: &str) -> (Uuid, Value) {
        let (id, body) = event(project, event_type, json!({}));
        self.env.publish(&body).await;
        (id, body)
    }

    async fn wait(&self, hook: Uuid, event_id: Uuid, status: &str) -> DeliveryRow {
        self.env
            .wait_for_status(hook, event_id, &[status], Duration::from_secs(10))
            .await
    }

    /// The requests `/ops` got, sorted by type, once `n` arrived and nothing more came.
    async fn operator_got(&self, n: usize) -> Vec<(Uuid, Value)> {
        self.rx.wait_for("ops", n, Duration::from_secs(15)).await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let mut got: Vec<_> = self.rx.seen("ops").iter().map(id_and_body).collect();
        assert_eq!(got.len(), n, "{got:?}");
        got.sort_by(|a, b| a.1["type"].as_str().cmp(&b.1["type"].as_str()));
        got
    }

    /// How many events of the operational kinds are stored.
    async fn operational_events(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM control_plane.events WHERE event_type LIKE 'webhook.%'",
        )
        .fetch_one(&self.env.pool)
        .await
        .unwrap()
    }

    /// Forgets operational events, as if the process that recorded what caused them died
    /// before publishing them.
    async fn forget(&self, ids: &[Uuid]) {
        sqlx::query("DELETE FROM control_plane.events WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.env.pool)
            .await
            .unwrap();
    }
}

fn at(value: &Value) -> chrono::DateTime<chrono::Utc> {
    value.as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn disabling_after_the_threshold_publishes_one_webhook_disabled() {
    let f = Fixture::new("*").await;
    let hook = f.hook("p", "t", "down", vec![Reply::Status(500)]).await;
    let args = [
        "--disable-after-failures",
        "3",
        "--retry-schedule",
        "100ms,100ms,100ms,100ms,100ms",
    ];
    let worker = f.worker(&args).await;
    let (event_id, _) = f.publish("p", "t").await;

    let d = f.wait(hook, event_id, "disabled").await;
    assert_eq!(d.attempts, 3);
    // Exactly one operational event: the delivery ended `disabled`, not exhausted.
    let got = f.operator_got(1).await;
    let (id, body) = &got[0];
    assert_eq!(*id, disabled_id(hook, d.id, 3));
    assert_eq!(body["type"], "webhook.disabled");
    let disabled_at = f.env.webhook(hook).await.disabled_at.unwrap();
    assert_eq!(at(&body["timestamp"]), disabled_at);
    assert_eq!(at(&body["data"]["disabled_at"]), disabled_at);
    assert_eq!(
        body["data"],
        json!({
            "webhook_id": hook,
            "project_id": "p",
            "event_type": "t",
            "url_host": "127.0.0.1",
            "reason": "consecutive_failures",
            "consecutive_failures": 3,
            "deliveries_stopped": 0,
            "disabled_at": body["data"]["disabled_at"],
            "delivery_id": d.id,
            "event_id": event_id,
            "attempt": 3,
            "error_type": "HTTP_ERROR",
            "http_status_code": 500,
        })
    );
    // A stored event of the operational project, delivered like any other.
    let stored: (String, String, String) = sqlx::query_as(
        "SELECT e.project_id, e.event_type, d.status FROM control_plane.events e \
         JOIN control_plane.webhook_deliveries d ON d.event_id = e.id WHERE e.id = $1",
    )
    .bind(id)
    .fetch_one(&f.env.pool)
    .await
    .unwrap();
    assert_eq!(
        stored,
        ("ops".into(), "webhook.disabled".into(), "delivered".into())
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_410_reports_gone_and_the_exhausted_delivery() {
    let f = Fixture::new("*").await;
    let hook = f.hook("p", "t", "gone", vec![Reply::Status(500)]).await;
    let worker = f.worker(&["--retry-schedule", "1500ms"]).await;
    // One delivery waits for its retry; the next event's first attempt gets a 410.
    let (waiting, _) = f.publish("p", "t").await;
    f.wait(hook, waiting, "failed").await;
    f.rx.set_script("gone", vec![Reply::Status(500), Reply::Status(410)]);
    let (gone, _) = f.publish("p", "t").await;
    let d = f.wait(hook, gone, "permanently_failed").await;

    let got = f.operator_got(2).await;
    let (exhausted, disabled) = (&got[0], &got[1]);
    assert_eq!(disabled.0, disabled_id(hook, d.id, 1));
    assert_eq!(disabled.1["type"], "webhook.disabled");
    let data = &disabled.1["data"];
    assert_eq!(data["reason"], "gone");
    assert_eq!(data["http_status_code"], 410);
    assert_eq!(data["consecutive_failures"], 2);
    assert_eq!(
        data["deliveries_stopped"], 1,
        "the waiting delivery: {data}"
    );

    assert_eq!(exhausted.0, exhausted_id(d.id, 1));
    assert_eq!(exhausted.1["type"], "webhook.delivery.exhausted");
    assert_eq!(
        exhausted.1["data"],
        json!({
            "delivery_id": d.id,
            "webhook_id": hook,
            "event_id": gone,
            "project_id": "p",
            "event_type": "t",
            "url_host": "127.0.0.1",
            "attempts": 1,
            "error_type": "HTTP_ERROR",
            "http_status_code": 410,
        })
    );
    // The waiting delivery was stopped, not exhausted: its retry is dropped, nothing more.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(f.rx.seen("ops").len(), 2);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_delivery_out_of_retries_publishes_webhook_delivery_exhausted() {
    // Subscribed to that type alone: the event is routed and matched by its type.
    let f = Fixture::new("webhook.delivery.exhausted").await;
    let hook = f.hook("p", "t", "down", vec![Reply::Status(503)]).await;
    let args = [
        "--disable-after-failures",
        "0",
        "--retry-schedule",
        "100ms,100ms",
    ];
    let worker = f.worker(&args).await;
    let (event_id, _) = f.publish("p", "t").await;
    let d = f.wait(hook, event_id, "permanently_failed").await;
    assert_eq!(d.attempts, 3);

    let got = f.operator_got(1).await;
    let (id, body) = &got[0];
    assert_eq!(*id, exhausted_id(d.id, 3));
    assert_eq!(body["type"], "webhook.delivery.exhausted");
    assert_eq!(body["data"]["attempts"], 3);
    assert_eq!(body["data"]["http_status_code"], 503);
    assert_eq!(body["data"]["event_id"], json!(event_id));
    assert!(!f.env.webhook(hook).await.disabled);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn nothing_is_published_about_the_operational_projects_own_webhooks() {
    let f = Fixture::new("*").await;
    let hook = f.hook("ops", "t", "gone", vec![Reply::Status(410)]).await;
    let worker = f.worker(&[]).await;
    let (event_id, _) = f.publish("ops", "t").await;

    // Disabled and exhausted, which for another project would publish two events.
    f.wait(hook, event_id, "permanently_failed").await;
    assert!(f.env.webhook(hook).await.disabled);
    let got = f.operator_got(1).await;
    assert_eq!(got[0].0, event_id, "only the event itself");
    assert_eq!(f.operational_events().await, 0);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn without_an_operational_project_nothing_is_published() {
    let f = Fixture::new("*").await;
    let hook = f.hook("p", "t", "gone", vec![Reply::Status(410)]).await;
    let worker = f.env.start_worker(&[]).await;
    let (event_id, _) = f.publish("p", "t").await;
    f.wait(hook, event_id, "permanently_failed").await;
    assert!(f.env.webhook(hook).await.disabled);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(f.operational_events().await, 0);
    assert!(f.rx.seen("ops").is_empty());
    worker.stop().await.unwrap();
}

/// A message handled again after its attempt was recorded (a crash before the publish)
/// publishes the same operational events, byte for byte: for a retry message, and for an
/// event message whose first attempt ended a delivery.
#[tokio::test]
async fn a_redelivered_message_publishes_the_same_events_again() {
    let f = Fixture::new("*").await;
    let down = f.hook("p", "t", "down", vec![Reply::Status(500)]).await;
    let gone = f.hook("p", "g", "gone", vec![Reply::Status(410)]).await;
    let args = [
        "--disable-after-failures",
        "2",
        "--retry-schedule",
        "100ms,100ms,100ms",
    ];

    // A retry message: attempt 2 disables the webhook.
    let worker = f.worker(&args).await;
    let (event_id, _) = f.publish("p", "t").await;
    let d = f.wait(down, event_id, "disabled").await;
    let first = f.operator_got(1).await;
    assert_eq!(first[0].0, disabled_id(down, d.id, 2));
    worker.stop().await.unwrap();

    f.forget(&[first[0].0]).await;
    let task = RetryTask::new(d.id, 2);
    let props = task.properties(&Default::default());
    f.env
        .publish_raw("", topology::WORK_QUEUE, &task.to_bytes(), props)
        .await;
    f.env.take_and_lose(1).await;
    let worker = f.worker(&args).await;
    let again = f.operator_got(2).await;
    let seen = f.rx.seen("ops");
    assert_eq!(again[0].0, again[1].0, "the same id");
    assert_eq!(seen[0].body, seen[1].body, "the same event");

    // An event message: its first attempt gets a 410, disabling and exhausting.
    let (event_id, body) = f.publish("p", "g").await;
    let d = f.wait(gone, event_id, "permanently_failed").await;
    let ids = [disabled_id(gone, d.id, 1), exhausted_id(d.id, 1)];
    f.operator_got(4).await;
    worker.stop().await.unwrap();

    f.forget(&ids).await;
    f.env.publish(&body).await;
    f.env.take_and_lose(1).await;
    let worker = f.worker(&args).await;
    f.operator_got(6).await;
    // The same two events again, byte for byte.
    let seen = f.rx.seen("ops");
    let sorted = |requests: &[Seen]| {
        let mut v: Vec<(Uuid, Vec<u8>)> = requests
            .iter()
            .map(|s| (id_and_body(s).0, s.body.to_vec()))
            .collect();
        v.sort();
        v
    };
    let (before, after) = (sorted(&seen[2..4]), sorted(&seen[4..6]));
    assert_eq!(before, after);
    let mut want = ids.to_vec();
    want.sort();
    assert_eq!(before.iter().map(|r| r.0).collect::<Vec<_>>(), want);
    worker.stop().await.unwrap();
}
