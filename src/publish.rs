//! Publishing events the way a producer does (CONTRACT §1), for the `publish` command.

use anyhow::Context;
use lapin::BasicProperties;
use tracing::{Instrument, info_span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::amqp::{self, Publisher, trace_headers};
use crate::config::{Config, redact_url};
use crate::event::{Event, TraceContext};
use crate::{telemetry, topology};

/// A connection that publishes events with broker confirms.
pub struct Producer {
    conn: lapin::Connection,
    publisher: Publisher,
}

impl Producer {
    /// Connects and declares the topology, so that events are kept even if no worker has
    /// run yet.
    pub async fn connect(config: &Config) -> anyhow::Result<Producer> {
        let conn = amqp::connect(&config.amqp_url)
            .await
            .with_context(|| format!("connecting to {}", redact_url(&config.amqp_url)))?;
        topology::declare(&conn, config.queue_type, &config.retry_schedule).await?;
        let publisher = Publisher::open(&conn).await?;
        Ok(Producer { conn, publisher })
    }

    /// Checks the body is a valid event and publishes it with its type as routing key, in a
    /// producer span (a child of `traceparent` when given) whose context the message
    /// carries; returns the event.
    pub async fn publish(&self, body: &[u8], traceparent: Option<&str>) -> anyhow::Result<Event> {
        let event = Event::parse(body, TraceContext::default(), chrono::Utc::now())
            .context("the event is not valid")?;
        let given = TraceContext::new(traceparent, None);
        let span =
            info_span!("publish webhook.events", otel.kind = "producer", event_id = %event.id);
        let inbound = telemetry::parent(&given);
        let _ = span.set_parent(inbound.clone());
        span.set_attribute("messaging.system", "rabbitmq");
        span.set_attribute("messaging.operation.type", "send");
        span.set_attribute("messaging.destination.name", topology::EXCHANGE);
        span.set_attribute(
            "messaging.rabbitmq.destination.routing_key",
            event.event_type.clone(),
        );
        let publishing = async {
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_headers(trace_headers(&telemetry::propagate(&span)));
            self.publisher
                .publish(topology::EXCHANGE, &event.event_type, body, properties)
                .instrument(span.clone())
                .await
        };
        telemetry::within(&inbound, publishing).await?;
        Ok(event)
    }

    pub async fn close(self) {
        amqp::close(&self.conn, "published").await;
    }
}
