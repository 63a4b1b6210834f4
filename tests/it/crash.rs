//! The short crash drill: two worker processes share a stream of events; one is killed
//! with SIGKILL mid-stream and started again. Nothing is lost, and every duplicate
//! request is one whose attempt the killed process never recorded.

use std::collections::HashMap;
use std::time::Duration;

use crate::harness::{Receiver, Reply, TestEnv, WebhookSpec, WorkerProcess, event};

const EVENTS: usize = 300;

/// A redelivered attempt is taken over DELIVERY_TIMEOUT + 5 s after it was handed out:
/// keep that short.
const FAST: &[(&str, &str)] = &[("DELIVERY_TIMEOUT", "2s")];

#[tokio::test]
async fn sigkill_under_load_loses_nothing() {
    let env = TestEnv::new().await;
    let rx = Receiver::start().await;
    let slow = Reply::Slow(Duration::from_millis(50));
    let hook = env
        .add_webhook(WebhookSpec::new("p", "t", &rx.url("hook", vec![slow])))
        .await;
    env.declare_topology().await;
    let survivor = WorkerProcess::spawn(&env, FAST);
    let mut victim = Some(WorkerProcess::spawn(&env, FAST));

    let mut ids = Vec::new();
    for i in 0..EVENTS {
        let (id, body) = event("p", "t", serde_json::json!({"i": i}));
        env.publish(&body).await;
        ids.push(id);
        if i == EVENTS / 3 {
            // Mid-stream, with requests in flight.
            let victim = victim.take().unwrap();
            victim.signal("-KILL");
            assert_eq!(victim.wait().await, None, "killed by the signal");
        }
    }
    let restarted = WorkerProcess::spawn(&env, FAST);

    for id in &ids {
        env.wait_for_status(hook, *id, &["delivered"], Duration::from_secs(60))
            .await;
    }
    let mut requests: HashMap<String, usize> = HashMap::new();
    for seen in rx.seen("hook") {
        let id = seen.headers["webhook-id"].to_str().unwrap().to_string();
        *requests.entry(id).or_default() += 1;
    }
    let mut duplicates = 0;
    for id in &ids {
        let d = env.delivery(hook, *id).await.unwrap();
        let attempts = env.attempts(d.id).await;
        assert_eq!(attempts.len(), 1, "one recorded attempt per delivery");
        assert_eq!(d.attempts, 1);
        let seen = requests.get(&id.to_string()).copied().unwrap_or(0);
        assert!(seen >= 1, "event {id} never reached the receiver");
        // Only the recorded attempt is accounted for: any extra request is one the
        // killed process sent but could not record.
        duplicates += seen - 1;
    }
    assert_eq!(requests.len(), EVENTS, "no request for an unknown event");
    eprintln!("crash drill: {EVENTS} events, 0 lost, {duplicates} unrecorded duplicate requests");
    drop((survivor, restarted));
}
