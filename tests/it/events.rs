//! Events as producers publish them: duplicates, malformed messages, exact data.

use lapin::BasicProperties;
use serde_json::json;
use webhook_worker::topology;

use crate::harness::{OneHook, Reply, event};

#[tokio::test]
async fn an_event_id_is_delivered_once_however_often_it_is_published() {
    let t = OneHook::start("hook", vec![Reply::Status(200)], &[]).await;
    let (id, body) = event("p", "t", json!({"version": 1}));
    t.env.publish(&body).await;
    t.wait(id, &["delivered"], 10).await;
    let mut changed = body.clone();
    changed["data"] = json!({"version": 2});
    t.env.publish(&changed).await;
    t.env.publish(&body).await;

    // An event published after the duplicates is delivered, so they were consumed.
    let later = t.publish().await;
    t.wait(later, &["delivered"], 10).await;
    let seen = t.seen();
    assert_eq!(seen.len(), 2);
    let first: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(first["data"], json!({"version": 1}));
    assert_eq!(t.env.deliveries_of(t.hook).await.len(), 2);
    t.stop().await;
}

#[tokio::test]
async fn data_reaches_the_receiver_byte_for_byte() {
    let t = OneHook::start("hook", vec![Reply::Status(200)], &[]).await;
    let id = uuid::Uuid::new_v4();
    let data = r#"{ "b" : 1.50, "a":[ "\u00e9", 1e3 ] ,"b":2}"#;
    let body = format!(r#"{{"id":"{id}","project_id":"p","event_type":"t","data":{data}}}"#);
    t.env
        .publish_raw(
            topology::EXCHANGE,
            "t",
            body.as_bytes(),
            BasicProperties::default(),
        )
        .await;
    t.wait(id, &["delivered"], 10).await;
    let sent = String::from_utf8(t.seen()[0].body.to_vec()).unwrap();
    assert!(sent.ends_with(&format!(r#""data":{data}}}"#)), "{sent}");
    t.stop().await;
}

#[tokio::test]
async fn malformed_events_are_dead_lettered_with_the_reason() {
    let t = OneHook::start("hook", vec![Reply::Status(200)], &[]).await;
    let id = uuid::Uuid::new_v4();
    let huge = format!(
        r#"{{"id":"{id}","project_id":"p","event_type":"t","data":"{}"}}"#,
        "x".repeat(1024 * 1024)
    );
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not json".to_vec(), "not JSON"),
        (b"[1, 2]".to_vec(), "JSON array"),
        (b"{\"id\": \"\xff\"}".to_vec(), "UTF-8"),
        (
            br#"{"project_id":"p","event_type":"t","data":1}"#.to_vec(),
            "`id` is missing",
        ),
        (
            format!(r#"{{"id":"{id}","project_id":"p","event_type":"a b","data":1}}"#).into_bytes(),
            "event_type",
        ),
        (
            format!(r#"{{"id":"{id}","project_id":"p","event_type":"t"}}"#).into_bytes(),
            "`data` is missing",
        ),
        (
            format!(r#"{{"id":"{id}","project_id":3,"event_type":"t","data":1}}"#).into_bytes(),
            "`project_id` is a JSON number",
        ),
        (huge.into_bytes(), "over the limit"),
    ];
    for (body, _) in &cases {
        t.env
            .publish_raw(topology::EXCHANGE, "t", body, BasicProperties::default())
            .await;
    }
    let good = t.publish().await;
    t.wait(good, &["delivered"], 10).await;

    let dead = t.env.wait_for_dead_letters(cases.len()).await;
    for (body, reason) in &cases {
        let (_, error) = dead.iter().find(|(b, _)| b == body).unwrap_or_else(|| {
            panic!("{reason}: the message is not in the dead-letter queue unchanged")
        });
        assert!(
            error.contains(reason),
            "x-error {error:?} should mention {reason:?}"
        );
    }
    assert_eq!(t.seen().len(), 1);
    t.stop().await;
}

#[tokio::test]
async fn an_event_postgres_refuses_is_dead_lettered_and_the_queue_moves_on() {
    let t = OneHook::start("hook", vec![Reply::Status(200)], &[]).await;
    // Valid JSON, but Postgres text cannot hold a NUL character.
    let poison = format!(
        r#"{{"id":"{}","project_id":"p\u0000x","event_type":"t","data":1}}"#,
        uuid::Uuid::new_v4()
    );
    t.env
        .publish_raw(
            topology::EXCHANGE,
            "t",
            poison.as_bytes(),
            BasicProperties::default(),
        )
        .await;
    let next = t.publish().await;
    t.wait(next, &["delivered"], 10).await;
    let dead = t.env.wait_for_dead_letters(1).await;
    assert_eq!(dead[0].0, poison.as_bytes());
    assert!(dead[0].1.contains("Postgres refused"), "{}", dead[0].1);
    t.stop().await;
}
