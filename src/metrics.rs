//! Prometheus metrics for `/metrics`: what operators alert on and size by. Every label
//! comes from a closed set (outcomes, statuses, error types, the configured delays), never
//! a URL, an id or a project, so the number of series stays fixed.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::outcome::ErrorType;
use crate::store::DeliveryStatus;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MessageLabels {
    kind: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    outcome: &'static str,
    error_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DelayLabel {
    delay: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventTypeLabel {
    event_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The process's metrics.
pub struct Metrics {
    registry: Registry,
    consumed: Family<MessageLabels, Counter>,
    deliveries: Family<StatusLabel, Counter>,
    attempts: Family<AttemptLabels, Counter>,
    attempt_duration: Histogram,
    latency: Histogram,
    in_flight: Gauge,
    retries: Family<DelayLabel, Counter>,
    disabled: Family<ReasonLabel, Counter>,
    operational: Family<EventTypeLabel, Counter>,
    parked: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("webhook_worker");
        let consumed = Family::<MessageLabels, Counter>::default();
        registry.register(
            "messages_consumed",
            "Messages taken from the work queue: kind event or retry; outcome acked, duplicate, dead_lettered or requeued",
            consumed.clone(),
        );
        let deliveries = Family::<StatusLabel, Counter>::default();
        registry.register(
            "deliveries_finished",
            "Deliveries that reached a final status",
            deliveries.clone(),
        );
        let attempts = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "attempts",
            "Delivery attempts, by outcome and error type",
            attempts.clone(),
        );
        // 5 ms to ~80 s.
        let attempt_duration = Histogram::new(exponential_buckets(0.005, 2.0, 15));
        registry.register(
            "attempt_duration_seconds",
            "Duration of one HTTP attempt, response body included",
            attempt_duration.clone(),
        );
        // 5 ms to ~2 days: retries take hours.
        let latency = Histogram::new(exponential_buckets(0.005, 3.0, 18));
        registry.register(
            "delivery_latency_seconds",
            "From the event's arrival at a worker to its delivery",
            latency.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "attempts_in_flight",
            "HTTP attempts under way in this process",
            in_flight.clone(),
        );
        let retries = Family::<DelayLabel, Counter>::default();
        registry.register(
            "retries_scheduled",
            "Retries put into a delay queue, by delay",
            retries.clone(),
        );
        let disabled = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "webhooks_disabled",
            "Webhooks this process disabled, by reason",
            disabled.clone(),
        );
        let operational = Family::<EventTypeLabel, Counter>::default();
        registry.register(
            "operational_events_published",
            "Operational events published (confirmed), by type; one published again after a crash counts again",
            operational.clone(),
        );
        let parked = Counter::default();
        registry.register(
            "deliveries_parked",
            "Deliveries put back into RabbitMQ for a while because their webhook had MAX_IN_FLIGHT_PER_WEBHOOK attempts under way",
            parked.clone(),
        );
        Metrics {
            registry,
            consumed,
            deliveries,
            attempts,
            attempt_duration,
            latency,
            in_flight,
            retries,
            disabled,
            operational,
            parked,
        }
    }

    /// A message was settled; `kind` is `event` or `retry`.
    pub fn consumed(&self, kind: &'static str, outcome: &'static str) {
        self.consumed
            .get_or_create(&MessageLabels { kind, outcome })
            .inc();
    }

    /// An attempt finished: its outcome and how long it took.
    pub fn attempt(&self, error_type: Option<ErrorType>, duration: Duration) {
        let labels = AttemptLabels {
            outcome: if error_type.is_none() {
                "succeeded"
            } else {
                "failed"
            },
            error_type: error_type.map_or("none", ErrorType::as_str),
        };
        self.attempts.get_or_create(&labels).inc();
        self.attempt_duration.observe(duration.as_secs_f64());
    }

    /// A delivery reached `status`; `latency` is since its event arrived, when delivered.
    pub fn finished(&self, status: DeliveryStatus, latency: Option<Duration>) {
        self.deliveries
            .get_or_create(&StatusLabel {
                status: status.as_str(),
            })
            .inc();
        if let Some(latency) = latency {
            self.latency.observe(latency.as_secs_f64());
        }
    }

    /// `count` deliveries stopped (`disabled`) with their webhook.
    pub fn stopped(&self, count: u64) {
        self.deliveries
            .get_or_create(&StatusLabel {
                status: DeliveryStatus::Disabled.as_str(),
            })
            .inc_by(count);
    }

    /// Counts an HTTP attempt in flight until the guard is dropped.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    pub fn retry_scheduled(&self, delay: Duration) {
        let delay = humantime::format_duration(delay).to_string();
        self.retries.get_or_create(&DelayLabel { delay }).inc();
    }

    pub fn parked(&self, deliveries: usize) {
        self.parked.inc_by(deliveries as u64);
    }

    pub fn webhook_disabled(&self, gone: bool) {
        let reason = if gone { "gone" } else { "failures" };
        self.disabled.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// An operational event was published; `event_type` is one of [`crate::notify`]'s.
    pub fn operational_event(&self, event_type: &'static str) {
        self.operational
            .get_or_create(&EventTypeLabel { event_type })
            .inc();
    }

    /// The Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Decrements the in-flight gauge when dropped.
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_closed_labels() {
        let m = Metrics::new();
        m.consumed("event", "acked");
        m.attempt(Some(ErrorType::HttpError), Duration::from_millis(12));
        m.attempt(None, Duration::from_millis(3));
        m.finished(DeliveryStatus::Delivered, Some(Duration::from_millis(40)));
        m.retry_scheduled(Duration::from_secs(300));
        m.webhook_disabled(true);
        m.operational_event(crate::notify::WEBHOOK_DISABLED);
        {
            let _guard = m.in_flight();
            assert!(m.render().contains("webhook_worker_attempts_in_flight 1"));
        }
        let text = m.render();
        for line in [
            "webhook_worker_messages_consumed_total{kind=\"event\",outcome=\"acked\"} 1",
            "webhook_worker_attempts_total{outcome=\"failed\",error_type=\"HTTP_ERROR\"} 1",
            "webhook_worker_attempts_total{outcome=\"succeeded\",error_type=\"none\"} 1",
            "webhook_worker_deliveries_finished_total{status=\"delivered\"} 1",
            "webhook_worker_retries_scheduled_total{delay=\"5m\"} 1",
            "webhook_worker_webhooks_disabled_total{reason=\"gone\"} 1",
            "webhook_worker_operational_events_published_total{event_type=\"webhook.disabled\"} 1",
            "webhook_worker_attempts_in_flight 0",
            "webhook_worker_attempt_duration_seconds_count 2",
            "webhook_worker_delivery_latency_seconds_count 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
