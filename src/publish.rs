//! Publishing events the way a producer does (CONTRACT §1), for the `publish` command.

use anyhow::Context;
use lapin::BasicProperties;
use lapin::types::FieldTable;

use crate::amqp::{self, Publisher, with_header};
use crate::config::{Config, redact_url};
use crate::event::{Event, TraceContext};
use crate::topology;

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

    /// Checks the body is a valid event and publishes it with its type as routing key;
    /// returns the event.
    pub async fn publish(&self, body: &[u8], traceparent: Option<&str>) -> anyhow::Result<Event> {
        let event = Event::parse(body, TraceContext::default(), chrono::Utc::now())
            .context("the event is not valid")?;
        let mut headers = FieldTable::default();
        if let Some(tp) = traceparent {
            with_header(&mut headers, "traceparent", tp);
        }
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(headers);
        self.publisher
            .publish(topology::EXCHANGE, &event.event_type, body, properties)
            .await?;
        Ok(event)
    }

    pub async fn close(self) {
        let _ = self.conn.close(200, "published".into()).await;
    }
}
