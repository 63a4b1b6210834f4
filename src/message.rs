//! The worker's own queue messages: "make attempt N of delivery D" (a retry), and "these
//! deliveries of webhook W wait until it answers again" (a parked group). Small and
//! versioned; everything else is read from Postgres when they arrive (CONTRACT §3).

use lapin::BasicProperties;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::amqp::trace_headers;
use crate::event::TraceContext;

/// The AMQP `type` property that tells a retry message from a producer's event.
pub const RETRY_KIND: &str = "webhook-worker.retry.v1";

/// The AMQP `type` property of a parked group.
pub const PARKED_KIND: &str = "webhook-worker.parked.v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryTask {
    pub v: u8,
    pub delivery_id: Uuid,
    pub attempt: u32,
    /// How many times this attempt was parked because its webhook was busy
    /// (`MAX_IN_FLIGHT_PER_WEBHOOK`); absent when never. Parked deliveries now travel in
    /// a [`ParkedGroup`]; this and `webhook_id` are read from messages parked one by one
    /// by earlier versions.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub parked: u32,
    /// The delivery's webhook, on a message parked by an earlier version.
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

/// Deliveries of one stalled webhook waiting together in a delay queue: one broker message
/// for as many deliveries as parked while the previous group was being published. Each
/// names its delivery and attempt, like a retry message, and the trace it continues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedGroup {
    pub v: u8,
    pub webhook_id: Uuid,
    /// How many times these deliveries were parked, this time included.
    pub parked: u32,
    pub deliveries: Vec<ParkedDelivery>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedDelivery {
    pub delivery_id: Uuid,
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

impl ParkedDelivery {
    pub fn new(delivery_id: Uuid, attempt: u32, trace: TraceContext) -> Self {
        ParkedDelivery {
            delivery_id,
            attempt,
            traceparent: trace.traceparent,
            tracestate: trace.tracestate,
        }
    }

    /// The trace it continues: the span that parked it.
    pub fn trace(&self) -> TraceContext {
        TraceContext::new(self.traceparent.as_deref(), self.tracestate.as_deref())
    }

    /// Its turn as a retry message would name it.
    pub fn task(&self, group: &ParkedGroup) -> RetryTask {
        RetryTask {
            parked: group.parked,
            webhook_id: Some(group.webhook_id),
            ..RetryTask::new(self.delivery_id, self.attempt)
        }
    }
}

impl ParkedGroup {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a parked group serializes")
    }

    pub fn parse(body: &[u8]) -> Result<ParkedGroup, String> {
        let group: ParkedGroup = serde_json::from_slice(body)
            .map_err(|e| format!("parked message is not valid: {e}"))?;
        if group.v != 1 {
            return Err(format!(
                "parked message has version {}; expected version 1",
                group.v
            ));
        }
        if let Some(d) = group.deliveries.iter().find(|d| d.attempt < 1) {
            return Err(format!(
                "parked message names attempt {} of delivery {}; expected attempt >= 1",
                d.attempt, d.delivery_id
            ));
        }
        Ok(group)
    }

    /// Properties of the message: its kind. It carries no trace of its own, as its
    /// deliveries belong to different events' traces.
    pub fn properties() -> BasicProperties {
        BasicProperties::default()
            .with_type(PARKED_KIND.into())
            .with_content_type("application/json".into())
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
    }

    #[test]
    fn reads_a_delivery_parked_alone_by_an_earlier_version() {
        let body = br#"{"v":1,"delivery_id":"0b9c6a3e-4a8f-4a36-9d7e-6c5d3b2a1f00","attempt":2,"parked":1,"webhook_id":"1b9c6a3e-4a8f-4a36-9d7e-6c5d3b2a1f00"}"#;
        let task = RetryTask::parse(body).unwrap();
        assert_eq!((task.attempt, task.parked), (2, 1));
        assert!(task.webhook_id.is_some());
    }

    #[test]
    fn a_parked_group_round_trips_with_each_delivery_s_trace() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let group = ParkedGroup {
            v: 1,
            webhook_id: Uuid::new_v4(),
            parked: 2,
            deliveries: vec![
                ParkedDelivery::new(Uuid::new_v4(), 1, TraceContext::new(Some(tp), None)),
                ParkedDelivery::new(Uuid::new_v4(), 3, TraceContext::default()),
            ],
        };
        let parsed = ParkedGroup::parse(&group.to_bytes()).unwrap();
        assert_eq!(parsed, group);
        assert_eq!(
            parsed.deliveries[0].trace().traceparent.as_deref(),
            Some(tp)
        );
        let task = parsed.deliveries[1].task(&parsed);
        assert_eq!((task.attempt, task.parked), (3, 2));
        let zero = br#"{"v":1,"webhook_id":"0b9c6a3e-4a8f-4a36-9d7e-6c5d3b2a1f00","parked":1,"deliveries":[{"delivery_id":"0b9c6a3e-4a8f-4a36-9d7e-6c5d3b2a1f00","attempt":0}]}"#;
        assert!(ParkedGroup::parse(zero).is_err());
        assert!(ParkedGroup::parse(b"{}").is_err());
    }
}
