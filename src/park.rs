//! Parking in groups: the deliveries of a stalled webhook wait in RabbitMQ many to a
//! message, so that a hung endpoint's backlog costs the broker one publish, one
//! dead-lettering and one consume per group rather than per delivery. A group is whatever
//! parked for that webhook while its previous group was being published, so parking adds
//! no wait beyond one publish.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::message::{ParkedDelivery, ParkedGroup};

/// The most deliveries one parked group names.
pub const MAX_PARKED_GROUP: usize = 256;

/// Publishes one group with a broker confirm.
pub type Publish = Arc<dyn Fn(ParkedGroup) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// Deliveries share a group when they go to one webhook and were parked as often before.
type Key = (Uuid, u32);

struct Request {
    key: Key,
    deliveries: Vec<ParkedDelivery>,
    confirmed: oneshot::Sender<Result<(), String>>,
}

/// A handle to a running parker; cheap to clone. Its task ends when every handle is gone
/// and its last group is published.
#[derive(Clone)]
pub struct Parker {
    requests: mpsc::UnboundedSender<Request>,
}

impl Parker {
    pub fn spawn(publish: Publish) -> Parker {
        let (requests, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(publish, receiver));
        Parker { requests }
    }

    /// Parks deliveries of `webhook_id` parked `times` times before, and returns once the
    /// group holding them is confirmed by the broker (or could not be published).
    pub async fn park(
        &self,
        webhook_id: Uuid,
        times: u32,
        deliveries: Vec<ParkedDelivery>,
    ) -> Result<(), String> {
        let (confirmed, answer) = oneshot::channel();
        let request = Request {
            key: (webhook_id, times),
            deliveries,
            confirmed,
        };
        if self.requests.send(request).is_err() {
            return Err("the parker has stopped".into());
        }
        answer
            .await
            .unwrap_or_else(|_| Err("the parker has stopped".into()))
    }
}

/// One publish at a time per key; what queues behind it is the next group.
async fn run(publish: Publish, mut receiver: mpsc::UnboundedReceiver<Request>) {
    let mut waiting: HashMap<Key, Vec<Request>> = HashMap::new();
    let mut publishing = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            request = receiver.recv(), if open => match request {
                Some(request) => match waiting.entry(request.key) {
                    // A group of this key is being published: this one waits for the next.
                    Entry::Occupied(mut queued) => queued.get_mut().push(request),
                    Entry::Vacant(idle) => {
                        let key = request.key;
                        idle.insert(Vec::new());
                        publishing.push(publish_group(&publish, key, vec![request]));
                    }
                },
                None => open = false,
            },
            Some(key) = publishing.next(), if !publishing.is_empty() => {
                let queued = waiting.get_mut(&key).expect("a key being published waits");
                if queued.is_empty() {
                    waiting.remove(&key);
                } else {
                    let group = take_group(queued);
                    publishing.push(publish_group(&publish, key, group));
                }
            }
            else => return,
        }
    }
}

/// The first requests of the queue, as many as fit in one group (at least one).
fn take_group(queued: &mut Vec<Request>) -> Vec<Request> {
    let mut size = 0;
    let fit = queued
        .iter()
        .take_while(|r| {
            size += r.deliveries.len();
            size <= MAX_PARKED_GROUP
        })
        .count();
    queued.drain(..fit.max(1)).collect()
}

/// Publishes the requests' deliveries as one group and answers each request.
fn publish_group(
    publish: &Publish,
    (webhook_id, times): Key,
    requests: Vec<Request>,
) -> BoxFuture<'static, Key> {
    let mut deliveries = Vec::new();
    let mut answers = Vec::with_capacity(requests.len());
    for request in requests {
        deliveries.extend(request.deliveries);
        answers.push(request.confirmed);
    }
    let group = ParkedGroup {
        v: 1,
        webhook_id,
        parked: times.saturating_add(1),
        deliveries,
    };
    let published = publish(group);
    Box::pin(async move {
        let result = published.await;
        for answer in answers {
            let _ = answer.send(result.clone());
        }
        (webhook_id, times)
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use futures_util::future::join_all;

    use super::*;
    use crate::event::TraceContext;

    fn delivery(n: u32) -> ParkedDelivery {
        ParkedDelivery::new(Uuid::from_u128(n as u128), 1, TraceContext::default())
    }

    /// A parker whose publish takes 50 ms, records each group, and fails a group naming
    /// delivery 666.
    fn parker() -> (Parker, Arc<Mutex<Vec<ParkedGroup>>>) {
        let groups = Arc::new(Mutex::new(Vec::new()));
        let seen = groups.clone();
        let publish: Publish = Arc::new(move |group: ParkedGroup| {
            let seen = seen.clone();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let refused = group.deliveries.iter().any(|d| d == &delivery(666));
                seen.lock().unwrap().push(group);
                if refused {
                    Err("nacked".to_string())
                } else {
                    Ok(())
                }
            })
        });
        (Parker::spawn(publish), groups)
    }

    #[tokio::test]
    async fn what_parks_during_a_publish_becomes_the_next_group() {
        let (parker, groups) = parker();
        let webhook = Uuid::new_v4();
        let first = parker.park(webhook, 0, vec![delivery(0)]);
        let later = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            join_all((1..=300).map(|n| parker.park(webhook, 0, vec![delivery(n)]))).await
        };
        let (first, later) = tokio::join!(first, later);
        assert!(first.is_ok() && later.iter().all(Result::is_ok));
        let groups = groups.lock().unwrap();
        let sizes: Vec<usize> = groups.iter().map(|g| g.deliveries.len()).collect();
        assert_eq!(sizes, vec![1, MAX_PARKED_GROUP, 300 - MAX_PARKED_GROUP]);
        assert!(
            groups
                .iter()
                .all(|g| g.webhook_id == webhook && g.parked == 1)
        );
        let named: Vec<ParkedDelivery> = groups.iter().flat_map(|g| g.deliveries.clone()).collect();
        assert_eq!(named, (0..=300).map(delivery).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn webhooks_and_park_counts_never_share_a_group() {
        let (parker, groups) = parker();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let parked = join_all([
            parker.park(a, 0, vec![delivery(1)]),
            parker.park(b, 0, vec![delivery(2)]),
            parker.park(a, 2, vec![delivery(3), delivery(4)]),
        ])
        .await;
        assert!(parked.iter().all(Result::is_ok));
        let mut groups: Vec<(Uuid, u32, usize)> = groups
            .lock()
            .unwrap()
            .iter()
            .map(|g| (g.webhook_id, g.parked, g.deliveries.len()))
            .collect();
        groups.sort();
        let mut expected = vec![(a, 1, 1), (b, 1, 1), (a, 3, 2)];
        expected.sort();
        assert_eq!(groups, expected);
    }

    #[tokio::test]
    async fn a_park_count_at_its_limit_stays_there() {
        let (parker, groups) = parker();
        let parked = parker
            .park(Uuid::new_v4(), u32::MAX, vec![delivery(1)])
            .await;
        assert!(parked.is_ok());
        assert_eq!(groups.lock().unwrap()[0].parked, u32::MAX);
    }

    #[tokio::test]
    async fn a_refused_group_fails_every_request_in_it() {
        let (parker, _) = parker();
        let webhook = Uuid::new_v4();
        let first = parker.park(webhook, 0, vec![delivery(0)]);
        let later = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let a = parker.park(webhook, 0, vec![delivery(666)]);
            let b = parker.park(webhook, 0, vec![delivery(7)]);
            tokio::join!(a, b)
        };
        let (first, (a, b)) = tokio::join!(first, later);
        assert!(first.is_ok());
        assert_eq!(a, Err("nacked".to_string()));
        assert_eq!(b, Err("nacked".to_string()), "it shared the refused group");
    }
}
