//! `MAX_IN_FLIGHT_PER_WEBHOOK`: how many attempts one webhook may have under way in this
//! process, so that one slow or hung endpoint cannot take all of `MAX_IN_FLIGHT`. A
//! delivery whose webhook makes no progress for a while is parked in RabbitMQ (the
//! pipeline does that), not held in the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

type Slots = Arc<Mutex<HashMap<Uuid, Arc<Entry>>>>;

/// A busy webhook: its places, and when one was last given back (its progress).
struct Entry {
    places: Arc<Semaphore>,
    last_release: Mutex<Instant>,
}

impl Entry {
    /// Whether no place was given back for `patience` (or since the entry was made).
    fn stalled_for(&self, patience: Duration) -> bool {
        Instant::now() >= self.stalled_at(patience)
    }

    /// When it counts as stalled unless it gives a place back before.
    fn stalled_at(&self, patience: Duration) -> Instant {
        *self.last_release.lock().expect("never poisoned") + patience
    }

    /// Every place taken, and none given back for `patience`.
    fn full_and_stalled_for(&self, patience: Duration) -> bool {
        self.places.available_permits() == 0 && self.stalled_for(patience)
    }
}

/// One entry per webhook with attempts under way or waiting; a webhook's entry goes when
/// its last permit does, so the map holds only busy webhooks.
pub struct PerWebhook {
    max: usize,
    slots: Slots,
}

/// A place for one attempt to a webhook, given back when dropped.
pub struct WebhookPermit {
    webhook_id: Uuid,
    entry: Arc<Entry>,
    permit: Option<OwnedSemaphorePermit>,
    slots: Slots,
}

impl PerWebhook {
    pub fn new(max: u32) -> PerWebhook {
        PerWebhook {
            max: max.max(1) as usize,
            slots: Arc::default(),
        }
    }

    /// A place for an attempt to `webhook_id`. Waits as long as the webhook makes progress
    /// (a place was given back within `patience`): a fast webhook's burst just queues.
    /// `None` once it has given back no place for `patience` (counted from its last one,
    /// not from when this began to wait): it is slow or hung, and the delivery should wait
    /// elsewhere. Every waiter of a webhook that stalls leaves at the same moment.
    pub async fn acquire(&self, webhook_id: Uuid, patience: Duration) -> Option<WebhookPermit> {
        let entry = {
            let mut slots = self.slots.lock().expect("never poisoned");
            let max = self.max;
            slots
                .entry(webhook_id)
                .or_insert_with(|| {
                    Arc::new(Entry {
                        places: Arc::new(Semaphore::new(max)),
                        last_release: Mutex::new(Instant::now()),
                    })
                })
                .clone()
        };
        let mut permit = WebhookPermit {
            webhook_id,
            entry,
            permit: None,
            slots: self.slots.clone(),
        };
        // A webhook with every place taken and none given back for `patience` is stalled:
        // a newcomer parks at once instead of waiting out the patience again.
        match permit.entry.places.clone().try_acquire_owned() {
            Ok(acquired) => {
                permit.permit = Some(acquired);
                return Some(permit);
            }
            Err(_) if permit.entry.stalled_for(patience) => return None,
            Err(_) => {}
        }
        // One wait, kept across the progress checks, so the waiter keeps its place in the
        // semaphore's queue.
        let acquire = permit.entry.places.clone().acquire_owned();
        tokio::pin!(acquire);
        loop {
            tokio::select! {
                acquired = &mut acquire => {
                    permit.permit = Some(acquired.expect("the semaphore is never closed"));
                    return Some(permit);
                }
                _ = tokio::time::sleep_until(permit.entry.stalled_at(patience).into()) => {
                    if permit.entry.stalled_for(patience) {
                        return None; // dropping `permit` tidies the map
                    }
                }
            }
        }
    }

    /// Whether the webhook has every place taken and gave none back for `patience`: a
    /// delivery to it would only be parked again.
    pub fn stalled(&self, webhook_id: Uuid, patience: Duration) -> bool {
        let slots = self.slots.lock().expect("never poisoned");
        slots
            .get(&webhook_id)
            .is_some_and(|entry| entry.full_and_stalled_for(patience))
    }

    /// The webhooks that are [`PerWebhook::stalled`] now (usually none).
    pub fn stalled_webhooks(&self, patience: Duration) -> Vec<Uuid> {
        let slots = self.slots.lock().expect("never poisoned");
        slots
            .iter()
            .filter(|(_, entry)| entry.full_and_stalled_for(patience))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Webhooks with attempts under way or waiting.
    #[cfg(test)]
    fn busy_webhooks(&self) -> usize {
        self.slots.lock().expect("never poisoned").len()
    }
}

impl Drop for WebhookPermit {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            *self.entry.last_release.lock().expect("never poisoned") = Instant::now();
            drop(permit);
        }
        let mut slots = self.slots.lock().expect("never poisoned");
        // Only the map and this permit still hold the entry: nobody else is under way or
        // waiting.
        if slots
            .get(&self.webhook_id)
            .is_some_and(|e| Arc::strong_count(e) == 2)
        {
            slots.remove(&self.webhook_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_busy_webhook_waits_then_gives_up_and_others_are_not_affected() {
        let limit = PerWebhook::new(2);
        let (hung, other) = (Uuid::new_v4(), Uuid::new_v4());
        let patience = Duration::from_millis(50);
        let first = limit.acquire(hung, patience).await.expect("a place");
        let second = limit.acquire(hung, patience).await.expect("a place");
        assert!(limit.acquire(hung, patience).await.is_none(), "busy");
        assert!(limit.acquire(other, patience).await.is_some());
        drop(first);
        let third = limit.acquire(hung, patience).await.expect("a freed place");
        drop((second, third));
        assert_eq!(limit.busy_webhooks(), 0, "idle webhooks leave the map");
    }

    #[tokio::test]
    async fn once_a_full_webhook_gave_nothing_back_for_its_patience_newcomers_park_at_once() {
        let limit = Arc::new(PerWebhook::new(1));
        let id = Uuid::new_v4();
        let patience = Duration::from_millis(600);
        let busy_since = Instant::now();
        let held = limit.acquire(id, patience).await.unwrap();
        let first = {
            let limit = limit.clone();
            tokio::spawn(async move { limit.acquire(id, patience).await.is_none() })
        };
        tokio::time::sleep(patience / 2).await;
        assert!(limit.acquire(id, patience).await.is_none());
        let left = busy_since.elapsed();
        assert!(left >= patience, "the waiters give it time");
        assert!(
            left < patience + patience / 3,
            "a later waiter leaves when it is stalled, not a patience after it came: {left:?}"
        );
        assert!(first.await.unwrap());
        let at_once = Instant::now();
        assert!(limit.acquire(id, patience).await.is_none());
        assert!(
            at_once.elapsed() < patience,
            "a stalled webhook parks newcomers"
        );
        assert!(limit.stalled(id, patience));
        let busy = Uuid::new_v4();
        let _busy = limit.acquire(busy, patience).await.unwrap();
        assert_eq!(
            limit.stalled_webhooks(patience),
            vec![id],
            "a webhook that just got busy is not stalled"
        );
        drop(held);
        assert!(!limit.stalled(id, patience));
        assert!(limit.stalled_webhooks(patience).is_empty());
        assert!(limit.acquire(id, patience).await.is_some(), "free again");
    }

    #[tokio::test]
    async fn a_waiter_gets_the_place_freed_within_its_patience() {
        let limit = Arc::new(PerWebhook::new(1));
        let id = Uuid::new_v4();
        let held = limit.acquire(id, Duration::ZERO).await.unwrap();
        let waiter = {
            let limit = limit.clone();
            tokio::spawn(async move { limit.acquire(id, Duration::from_secs(5)).await.is_some() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        assert!(waiter.await.unwrap());
        assert_eq!(limit.busy_webhooks(), 0);
    }
}
