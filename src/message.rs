//! The worker's own queue message: "make attempt N of delivery D". Small and versioned;
//! everything else is read from Postgres when it arrives (CONTRACT §3).

use lapin::BasicProperties;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::amqp::trace_headers;
use crate::event::TraceContext;

/// The AMQP `type` property that tells a retry message from a producer's event.
pub const RETRY_KIND: &str = "webhook-worker.retry.v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryTask {
    pub v: u8,
    pub delivery_id: Uuid,
    pub attempt: u32,
    /// How many times this attempt was parked because its webhook was busy
    /// (`MAX_IN_FLIGHT_PER_WEBHOOK`); absent when never.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub parked: u32,
    /// The delivery's webhook, on a parked message: while that webhook is still stalled,
    /// the message is parked again without touching Postgres.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_id: Option<Uuid>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl RetryTask {
    pub fn new(delivery_id: Uuid, attempt: u32) -> Self {
        RetryTask {
            v: 1,
            delivery_id,
            attempt,
            parked: 0,
            webhook_id: None,
        }
    }

    /// The same attempt again later: its webhook was busy.
    pub fn parked(delivery_id: Uuid, attempt: u32, times: u32, webhook_id: Uuid) -> Self {
        RetryTask {
            parked: times,
            webhook_id: Some(webhook_id),
            ..RetryTask::new(delivery_id, attempt)
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a retry task serializes")
    }

    pub fn parse(body: &[u8]) -> Result<RetryTask, String> {
        let task: RetryTask =
            serde_json::from_slice(body).map_err(|e| format!("retry message is not valid: {e}"))?;
        // Attempt 1 comes from a replay of a delivery stopped before its first attempt.
        if task.v != 1 || task.attempt < 1 {
            return Err(format!(
                "retry message has version {} and attempt {}; expected version 1 and attempt >= 1",
                task.v, task.attempt
            ));
        }
        Ok(task)
    }

    /// Properties of the message: its kind, and the event's trace so that a retry hours
    /// later joins the same trace.
    pub fn properties(&self, trace: &TraceContext) -> BasicProperties {
        BasicProperties::default()
            .with_type(RETRY_KIND.into())
            .with_content_type("application/json".into())
            .with_headers(trace_headers(trace))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_other_versions() {
        let task = RetryTask::new(Uuid::new_v4(), 3);
        assert_eq!(RetryTask::parse(&task.to_bytes()).unwrap(), task);
        assert!(
            RetryTask::parse(
                br#"{"v":2,"delivery_id":"0b9c6a3e-4a8f-4a36-9d7e-6c5d3b2a1f00","attempt":2}"#
            )
            .is_err()
        );
        assert!(RetryTask::parse(b"junk").is_err());
        let parked = RetryTask::parked(Uuid::new_v4(), 2, 1, Uuid::new_v4());
        assert_eq!(RetryTask::parse(&parked.to_bytes()).unwrap(), parked);
    }
}
