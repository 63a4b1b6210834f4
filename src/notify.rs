//! Operational events (issue #6): what operators hear when the worker gives up, published as
//! ordinary events of a configured project, so that they route them like any other.
//!
//! When an attempt disables its webhook (the failure threshold, or a `410 Gone`) the worker
//! publishes `webhook.disabled`; when an attempt leaves its delivery `permanently_failed`,
//! `webhook.delivery.exhausted` (a 410 causes both). Each is a CONTRACT §1 event of the
//! project `OPERATIONAL_EVENTS_PROJECT`, published to `webhook.events` with its type as
//! routing key, so the workers deliver it to the webhooks registered for that project, as
//! Svix's operational webhooks do; a queue of the operator's own bound to the exchange gets
//! it too.
//!
//! - **Confirmed before the ack.** The pipeline publishes them after the attempt is
//!   recorded and before the message that caused it is acknowledged.
//! - **Deterministic.** An event's id is a UUIDv5 of what it reports (the disabling
//!   attempt; the delivery and its attempt count), and its whole body is read back from
//!   Postgres, where the recording transaction left it. A message handled again after a
//!   crash between commit and publish publishes the same event again; the worker's
//!   deduplication of event ids makes a copy harmless.
//! - **No loops.** Nothing is published about the operational project's own webhooks, so
//!   a failing operator webhook cannot feed itself.
//! - **No secrets.** Only the URL's host is reported (a URL may carry a token in its path,
//!   query or user info), and no error message or response body, which can quote the URL.

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::BasicProperties;
use serde_json::{Value, json};
use uuid::{Uuid, uuid};

use crate::amqp::trace_headers;
use crate::event::TraceContext;
use crate::store::AttemptFacts;

/// The namespace of the operational events' UUIDv5 ids (documented in the README, so a
/// consumer can recompute an id).
pub const NAMESPACE: Uuid = uuid!("b188bb07-a0dd-45bb-8a5b-8b56aeab7f46");

pub const WEBHOOK_DISABLED: &str = "webhook.disabled";
pub const DELIVERY_EXHAUSTED: &str = "webhook.delivery.exhausted";

/// One operational event to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub id: Uuid,
    pub event_type: &'static str,
    pub occurred_at: DateTime<Utc>,
    pub data: Value,
}

/// The id of the `webhook.disabled` event about attempt `attempt` of a delivery, which
/// disabled the webhook.
pub fn disabled_id(webhook_id: Uuid, delivery_id: Uuid, attempt: u32) -> Uuid {
    let name = format!("{WEBHOOK_DISABLED}/{webhook_id}/{delivery_id}/{attempt}");
    Uuid::new_v5(&NAMESPACE, name.as_bytes())
}

/// The id of the `webhook.delivery.exhausted` event about a delivery that ended after
/// `attempts` attempts (a replay that fails again reports anew).
pub fn exhausted_id(delivery_id: Uuid, attempts: u32) -> Uuid {
    let name = format!("{DELIVERY_EXHAUSTED}/{delivery_id}/{attempts}");
    Uuid::new_v5(&NAMESPACE, name.as_bytes())
}

/// The operational events an attempt caused, none about the operational `project`'s own
/// webhooks.
pub fn notices(facts: &AttemptFacts, project: &str) -> Vec<Notice> {
    if facts.project_id == project {
        return Vec::new();
    }
    let attempt = facts.attempt.max(0) as u32;
    let mut out = Vec::new();
    if let Some(disabled_at) = facts.disabled_at {
        let reason = if facts.http_status_code == Some(410) {
            "gone"
        } else {
            "consecutive_failures"
        };
        out.push(Notice {
            id: disabled_id(facts.webhook_id, facts.delivery_id, attempt),
            event_type: WEBHOOK_DISABLED,
            occurred_at: disabled_at,
            data: json!({
                "webhook_id": facts.webhook_id,
                "project_id": facts.project_id,
                "event_type": facts.webhook_event_type,
                "url_host": url_host(&facts.url),
                "reason": reason,
                "consecutive_failures": facts.consecutive_failures,
                "deliveries_stopped": facts.deliveries_stopped,
                "disabled_at": timestamp(disabled_at),
                "delivery_id": facts.delivery_id,
                "event_id": facts.event_id,
                "attempt": attempt,
                "error_type": facts.error_type,
                "http_status_code": facts.http_status_code,
            }),
        });
    }
    if let Some(exhausted_at) = facts.exhausted_at {
        out.push(Notice {
            id: exhausted_id(facts.delivery_id, attempt),
            event_type: DELIVERY_EXHAUSTED,
            occurred_at: exhausted_at,
            data: json!({
                "delivery_id": facts.delivery_id,
                "webhook_id": facts.webhook_id,
                "event_id": facts.event_id,
                "project_id": facts.project_id,
                "event_type": facts.event_type,
                "url_host": url_host(&facts.url),
                "attempts": attempt,
                "error_type": facts.error_type,
                "http_status_code": facts.http_status_code,
            }),
        });
    }
    out
}

impl Notice {
    /// The event's body (CONTRACT §1) in the operational `project`.
    pub fn body(&self, project: &str) -> Vec<u8> {
        let event = json!({
            "id": self.id,
            "project_id": project,
            "event_type": self.event_type,
            "data": self.data,
            "occurred_at": timestamp(self.occurred_at),
        });
        serde_json::to_vec(&event).expect("a JSON value serializes")
    }

    /// Its message properties: a producer's (the worker consumes it as any event), its id
    /// as `message_id`, and the trace of the attempt that caused it.
    pub fn properties(&self, trace: &TraceContext) -> BasicProperties {
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(self.id.to_string().into())
            .with_headers(trace_headers(trace))
    }
}

fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The URL's host, without user info, port, path or query.
fn url_host(url: &str) -> Option<String> {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;
    use chrono::SubsecRound;

    fn facts() -> AttemptFacts {
        AttemptFacts {
            delivery_id: Uuid::new_v4(),
            attempt: 3,
            event_id: Uuid::new_v4(),
            webhook_id: Uuid::new_v4(),
            project_id: "acme".into(),
            webhook_event_type: "*".into(),
            event_type: "order.created".into(),
            url: "https://user:pw@hooks.example.com:8443/t/s3cret?token=x".into(),
            http_status_code: Some(500),
            error_type: Some("HTTP_ERROR".into()),
            exhausted_at: None,
            disabled_at: None,
            consecutive_failures: 5,
            deliveries_stopped: 2,
        }
    }

    #[test]
    fn an_attempt_that_changed_nothing_says_nothing() {
        assert!(notices(&facts(), "ops").is_empty());
    }

    #[test]
    fn a_disable_reports_the_reason_and_counts_without_the_url() {
        let at = Utc::now();
        let f = AttemptFacts {
            disabled_at: Some(at),
            ..facts()
        };
        let [notice] = &notices(&f, "ops")[..] else {
            panic!("one notice")
        };
        assert_eq!(notice.event_type, WEBHOOK_DISABLED);
        assert_eq!(notice.id, disabled_id(f.webhook_id, f.delivery_id, 3));
        assert_eq!(notice.data["reason"], "consecutive_failures");
        assert_eq!(notice.data["consecutive_failures"], 5);
        assert_eq!(notice.data["deliveries_stopped"], 2);
        assert_eq!(notice.data["url_host"], "hooks.example.com");
        let text = String::from_utf8(notice.body("ops")).unwrap();
        assert!(!text.contains("s3cret") && !text.contains("pw@"), "{text}");

        let gone = AttemptFacts {
            http_status_code: Some(410),
            exhausted_at: Some(at),
            ..f
        };
        let both = notices(&gone, "ops");
        assert_eq!(both.len(), 2);
        assert_eq!(both[0].data["reason"], "gone");
        assert_eq!(both[1].event_type, DELIVERY_EXHAUSTED);
        assert_eq!(both[1].id, exhausted_id(gone.delivery_id, 3));
        assert_eq!(both[1].data["attempts"], 3);
    }

    #[test]
    fn never_about_the_operational_projects_own_webhooks() {
        let f = AttemptFacts {
            project_id: "ops".into(),
            disabled_at: Some(Utc::now()),
            exhausted_at: Some(Utc::now()),
            ..facts()
        };
        assert!(notices(&f, "ops").is_empty());
        assert_eq!(notices(&f, "other").len(), 2);
    }

    #[test]
    fn ids_are_uuidv5_of_what_they_report() {
        let (w, d) = (Uuid::new_v4(), Uuid::new_v4());
        let id = disabled_id(w, d, 4);
        assert_eq!(id.get_version_num(), 5);
        assert_eq!(id, disabled_id(w, d, 4));
        assert_ne!(id, disabled_id(w, d, 5));
        assert_eq!(
            exhausted_id(d, 4),
            Uuid::new_v5(
                &NAMESPACE,
                format!("webhook.delivery.exhausted/{d}/4").as_bytes()
            )
        );
    }

    #[test]
    fn the_body_is_a_valid_event_of_the_operational_project() {
        let f = AttemptFacts {
            exhausted_at: Some(Utc::now()),
            ..facts()
        };
        let notice = &notices(&f, "ops")[0];
        let event = Event::parse(
            &notice.body("ops"),
            TraceContext::default(),
            DateTime::UNIX_EPOCH,
        )
        .unwrap();
        assert_eq!(event.id, notice.id);
        assert_eq!(event.project_id, "ops");
        assert_eq!(event.event_type, DELIVERY_EXHAUSTED);
        assert_eq!(event.occurred_at, f.exhausted_at.unwrap().trunc_subsecs(6));
    }
}
