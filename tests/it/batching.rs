//! Writes of many messages as one statement: each request still gets its own answer, and
//! one that Postgres refuses fails alone.

use std::sync::Arc;

use chrono::Utc;
use futures_util::future::{BoxFuture, join_all};
use serde_json::json;
use uuid::Uuid;
use webhook_worker::batch::{Batcher, Limits};
use webhook_worker::event::{Event, TraceContext};
use webhook_worker::outcome::AttemptResult;
use webhook_worker::store::{FannedOut, Store, Success, Unclaim};

use crate::harness::{TestEnv, WebhookSpec, event};

fn parsed(project: &str, event_type: &str) -> Arc<Event> {
    let (_, body) = event(project, event_type, json!({"n": 1}));
    let bytes = serde_json::to_vec(&body).unwrap();
    Arc::new(Event::parse(&bytes, TraceContext::default(), Utc::now()).unwrap())
}

/// A request the receiver answered with `status`.
fn answered(status: u16) -> AttemptResult {
    AttemptResult {
        status: Some(status),
        body: None,
        error: None,
        retry_after: None,
        duration: std::time::Duration::from_millis(3),
    }
}

fn store(env: &TestEnv) -> Store {
    Store::connect_lazy(&env.db_url, 4).unwrap()
}

/// A test environment with one webhook for events `t` of project `p`.
async fn one_hook() -> (TestEnv, Uuid, Store) {
    let env = TestEnv::new().await;
    let hook = env
        .add_webhook(WebhookSpec::new("p", "t", "http://127.0.0.1:9/"))
        .await;
    let store = store(&env);
    (env, hook, store)
}

#[tokio::test]
async fn one_statement_stores_many_events_and_answers_each() {
    let env = TestEnv::new().await;
    let url = "http://127.0.0.1:9/";
    let a = env.add_webhook(WebhookSpec::new("p", "t", url)).await;
    let b = env.add_webhook(WebhookSpec::new("p", "*", url)).await;
    env.add_webhook(WebhookSpec::new("q", "t", url)).await;
    let store = store(&env);
    let before = parsed("p", "t");
    assert_eq!(
        store
            .store_events(std::slice::from_ref(&before), &[])
            .await
            .unwrap()[0]
            .as_ref()
            .unwrap()
            .jobs
            .len(),
        2
    );

    let (two, none) = (parsed("p", "t"), parsed("nobody", "t"));
    let stored = store
        .store_events(&[two.clone(), before.clone(), none.clone()], &[])
        .await
        .unwrap();
    let hooks = |i: usize| -> Vec<Uuid> {
        let mut ids: Vec<Uuid> = stored[i]
            .as_ref()
            .unwrap()
            .jobs
            .iter()
            .map(|j| j.webhook.id)
            .collect();
        ids.sort();
        ids
    };
    let mut both = vec![a, b];
    both.sort();
    assert_eq!(hooks(0), both, "each matching webhook, once");
    assert!(stored[1].is_none(), "an id stored before is a duplicate");
    assert!(hooks(2).is_empty(), "stored, with no webhook to deliver to");
    for job in &stored[0].as_ref().unwrap().jobs {
        assert_eq!(job.event.id, two.id);
        assert_eq!(job.event.data, two.data.get());
        assert!(!job.written, "written with its first attempt's outcome");
    }
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM control_plane.events")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(events, 3);
    let deliveries: i64 =
        sqlx::query_scalar("SELECT count(*) FROM control_plane.webhook_deliveries")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        deliveries, 0,
        "no delivery row before its first attempt ends"
    );
}

#[tokio::test]
async fn a_delivery_to_a_stalled_webhook_is_stored_unclaimed_for_parking() {
    let env = TestEnv::new().await;
    let url = "http://127.0.0.1:9/";
    let healthy = env.add_webhook(WebhookSpec::new("p", "t", url)).await;
    let stalled = env.add_webhook(WebhookSpec::new("p", "t", url)).await;
    let store = store(&env);
    let events = [parsed("p", "t"), parsed("p", "t")];
    let stored = store.store_events(&events, &[stalled]).await.unwrap();
    for (event, fanned_out) in events.iter().zip(&stored) {
        let FannedOut { jobs, parked } = fanned_out.as_ref().unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].webhook.id, healthy);
        assert_eq!(parked.len(), 1);
        assert_eq!(parked[0].webhook_id, stalled);
        let statuses: Vec<(Uuid, Uuid, String, i32)> = sqlx::query_as(
            "SELECT id, webhook_id, status, attempts FROM control_plane.webhook_deliveries \
             WHERE event_id = $1",
        )
        .bind(event.id)
        .fetch_all(&env.pool)
        .await
        .unwrap();
        assert_eq!(
            statuses,
            vec![(parked[0].delivery_id, stalled, "pending".to_string(), 0)],
            "stored unclaimed for the parked message to claim; the other not written yet"
        );
    }
    // The parked message's claim takes it, like any unclaimed first attempt.
    let parked = stored[0].as_ref().unwrap().parked[0];
    let job = store.claim(parked.delivery_id, 1, false).await.unwrap();
    assert_eq!(job.map(|j| j.webhook.id).ok(), Some(stalled));
}

fn record<'a>(
    store: &'a Store,
    done: &'a [Success],
) -> BoxFuture<'a, Result<Vec<bool>, sqlx::Error>> {
    Box::pin(store.record_successes(done))
}

#[tokio::test]
async fn a_batch_postgres_refuses_is_run_again_one_by_one_so_bad_requests_fail_alone() {
    let (env, hook, store) = one_hook().await;
    let events: Vec<Arc<Event>> = (0..40).map(|_| parsed("p", "t")).collect();
    let jobs: Vec<_> = store
        .store_events(&events, &[])
        .await
        .unwrap()
        .into_iter()
        .flat_map(|fanned_out| fanned_out.unwrap().jobs)
        .collect();
    assert_eq!(jobs.len(), 40);

    let ok = answered(204);
    let mut successes: Vec<Success> = jobs
        .iter()
        .map(|j| Success::new(j, Utc::now(), &ok))
        .collect();
    // A written delivery that does not exist: its attempt row breaks the foreign key.
    let mut gone = successes[0].clone();
    gone.delivery_id = Uuid::new_v4();
    gone.unwritten = None;
    successes.push(gone.clone());
    // A second delivery of an event to the same webhook breaks the unique constraint:
    // alone, it is found written by someone else.
    let mut twin = successes[1].clone();
    twin.delivery_id = Uuid::new_v4();
    successes.push(twin.clone());
    // One statement at a time, so the forty pile up behind the first and share a batch.
    let batcher = Batcher::spawn(
        store.clone(),
        record,
        |s| (s.delivery_id, s.attempt),
        Limits {
            concurrency: 1,
            max_batch: 256,
        },
    );
    let answers = join_all(successes.iter().map(|s| batcher.run(s.clone()))).await;
    for (success, answer) in successes.iter().zip(&answers) {
        let recorded = *answer
            .as_ref()
            .expect("no request fails for another's sake");
        let refused = [gone.delivery_id, twin.delivery_id];
        assert_eq!(
            recorded,
            !refused.contains(&success.delivery_id),
            "{success:?}"
        );
    }
    // Recording the same attempts again records nothing new.
    let again = join_all(successes.iter().map(|s| batcher.run(s.clone()))).await;
    assert!(again.into_iter().all(|a| !a.unwrap()));

    let delivered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM control_plane.webhook_deliveries d \
         JOIN control_plane.webhook_delivery_attempts a ON a.delivery_id = d.id \
         WHERE d.status = 'delivered' AND d.attempts = 1 AND a.succeeded",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(delivered, 40);
    let state = env.webhook(hook).await;
    assert!(state.has_last_delivery && state.consecutive_failures == 0);
}

#[tokio::test]
async fn recording_a_success_does_not_wait_for_deliveries_being_inserted_for_its_webhook() {
    let (env, hook, store) = one_hook().await;
    let stored = store.store_events(&[parsed("p", "t")], &[]).await.unwrap();
    let job = &stored[0].as_ref().unwrap().jobs[0];
    // Another batch inserting a delivery for the same webhook, not yet committed: its
    // foreign key check holds a key-share lock on the webhook row. A success that resets
    // the webhook's counter must not wait for it (two batches doing this in turn on
    // several webhooks deadlocked, stalling every write for deadlock_timeout).
    let mut inserting = env.pool.begin().await.unwrap();
    sqlx::query(
        "WITH e AS (INSERT INTO control_plane.events (id, project_id, event_type, data, occurred_at) \
           VALUES (gen_random_uuid(), 'p', 't', '{}', now()) RETURNING id) \
         INSERT INTO control_plane.webhook_deliveries (webhook_id, event_id, project_id, event_type) \
         SELECT $1, id, 'p', 't' FROM e",
    )
    .bind(hook)
    .execute(&mut *inserting)
    .await
    .unwrap();
    let ok = answered(200);
    let success = Success::new(job, Utc::now(), &ok);
    let recorded = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        store.record_successes(&[success]),
    )
    .await
    .expect("recording waited on the other transaction's lock")
    .unwrap();
    assert_eq!(recorded, vec![true]);
    assert!(
        env.webhook(hook).await.has_last_delivery,
        "the counter was reset"
    );
    inserting.rollback().await.unwrap();
}

#[tokio::test]
async fn a_new_events_delivery_is_written_once_by_whichever_outcome_comes_first() {
    let (env, hook, store) = one_hook().await;
    let stored = store.store_events(&[parsed("p", "t")], &[]).await.unwrap();
    let job = stored[0].as_ref().unwrap().jobs[0].clone();
    let row = || async {
        sqlx::query_as::<_, (Uuid, String, i32)>(
            "SELECT webhook_id, status, attempts FROM control_plane.webhook_deliveries \
             WHERE id = $1",
        )
        .bind(job.delivery_id)
        .fetch_optional(&env.pool)
        .await
        .unwrap()
    };
    assert_eq!(row().await, None);
    // Its webhook was busy: stored pending for the parked message, once.
    assert_eq!(
        store.unclaim(&[Unclaim::new(&job)]).await.unwrap(),
        vec![true]
    );
    assert_eq!(row().await, Some((hook, "pending".into(), 0)));
    assert_eq!(
        store.unclaim(&[Unclaim::new(&job)]).await.unwrap(),
        vec![false]
    );
    // A success of the same unwritten job now finds the row there: not recorded.
    let success = Success::new(&job, Utc::now(), &answered(204));
    assert_eq!(
        store.record_successes(&[success]).await.unwrap(),
        vec![false]
    );
    assert_eq!(row().await, Some((hook, "pending".into(), 0)));
}

#[tokio::test]
async fn an_event_handled_again_fans_out_again_to_webhooks_with_no_delivery_written() {
    let env = TestEnv::new().await;
    let url = "http://127.0.0.1:9/";
    let done = env.add_webhook(WebhookSpec::new("p", "t", url)).await;
    let lost = env.add_webhook(WebhookSpec::new("p", "t", url)).await;
    let store = store(&env);
    let event = parsed("p", "t");
    let stored = store
        .store_events(std::slice::from_ref(&event), &[])
        .await
        .unwrap();
    let jobs = &stored[0].as_ref().unwrap().jobs;
    let first = jobs.iter().find(|j| j.webhook.id == done).unwrap();
    let success = Success::new(first, Utc::now(), &answered(204));
    assert_eq!(
        store.record_successes(&[success]).await.unwrap(),
        vec![true]
    );
    // The other attempt's outcome was never written (its process died).
    assert_eq!(store.first_attempts_in_progress(event.id).await.unwrap(), 1);
    let (resumed, retries) = store.resume_event(event.id).await.unwrap();
    assert!(retries.is_empty());
    assert_eq!(resumed.len(), 1);
    assert_eq!(resumed[0].webhook.id, lost);
    assert!(!resumed[0].written);
    assert_eq!(resumed[0].event.project_id, "p");
    let success = Success::new(&resumed[0], Utc::now(), &answered(200));
    assert_eq!(
        store.record_successes(&[success]).await.unwrap(),
        vec![true]
    );
    assert_eq!(store.first_attempts_in_progress(event.id).await.unwrap(), 0);
    let delivered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM control_plane.webhook_deliveries \
         WHERE event_id = $1 AND status = 'delivered' AND attempts = 1",
    )
    .bind(event.id)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(delivered, 2);
}

#[tokio::test]
async fn a_new_events_delivery_to_a_webhook_disabled_meanwhile_is_written_stopped() {
    let (env, hook, store) = one_hook().await;
    let stored = store.store_events(&[parsed("p", "t")], &[]).await.unwrap();
    let job = stored[0].as_ref().unwrap().jobs[0].clone();
    sqlx::query("UPDATE control_plane.webhooks SET disabled = true WHERE id = $1")
        .bind(hook)
        .execute(&env.pool)
        .await
        .unwrap();
    store.stop_disabled(&job).await.unwrap();
    let row: (String, i32, Option<String>) = sqlx::query_as(
        "SELECT status, attempts, error_type FROM control_plane.webhook_deliveries \
         WHERE id = $1",
    )
    .bind(job.delivery_id)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(row, ("disabled".into(), 0, Some("WEBHOOK_DISABLED".into())));
}
