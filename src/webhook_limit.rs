//! `MAX_IN_FLIGHT_PER_WEBHOOK`: how many attempts one webhook may have under way in this
//! process, so that one slow or hung endpoint cannot take all of `MAX_IN_FLIGHT`. A
//! delivery that finds its webhook busy for a while is parked in RabbitMQ (the pipeline
//! does that), not held in the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

type Slots = Arc<Mutex<HashMap<Uuid, Arc<Semaphore>>>>;

/// One semaphore per webhook with attempts under way; a webhook's entry goes when its
/// last permit does, so the map holds only busy webhooks.
pub struct PerWebhook {
    max: usize,
    slots: Slots,
}

/// A place for one attempt to a webhook, given back when dropped.
pub struct WebhookPermit {
    webhook_id: Uuid,
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

    /// A place for an attempt to `webhook_id`, waiting at most `patience` for one; `None`
    /// when the webhook stayed busy that long.
    pub async fn acquire(&self, webhook_id: Uuid, patience: Duration) -> Option<WebhookPermit> {
        let semaphore = {
            let mut slots = self.slots.lock().expect("never poisoned");
            let max = self.max;
            slots
                .entry(webhook_id)
                .or_insert_with(|| Arc::new(Semaphore::new(max)))
                .clone()
        };
        let acquired = match semaphore.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => tokio::time::timeout(patience, semaphore.clone().acquire_owned())
                .await
                .ok()
                .map(|permit| permit.expect("the semaphore is never closed")),
        };
        let permit = WebhookPermit {
            webhook_id,
            permit: acquired,
            slots: self.slots.clone(),
        };
        drop(semaphore);
        // Dropping a permit that did not get a place still tidies the map.
        permit.permit.is_some().then_some(permit)
    }

    /// Webhooks with attempts under way or waiting (for tests and metrics).
    pub fn busy_webhooks(&self) -> usize {
        self.slots.lock().expect("never poisoned").len()
    }
}

impl Drop for WebhookPermit {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut slots = self.slots.lock().expect("never poisoned");
        // Only the map still holds the semaphore: nobody is under way or waiting.
        if slots
            .get(&self.webhook_id)
            .is_some_and(|s| Arc::strong_count(s) == 1)
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
