//! Publishing an event the way a producer does (CONTRACT §1), for the `publish` command.

use anyhow::Context;
use lapin::BasicProperties;
use lapin::types::FieldTable;

use crate::amqp::{self, Publisher, with_header};
use crate::config::{Config, redact_url};
use crate::event::{Event, TraceContext};
use crate::topology;

/// Declares the topology (so the event is kept even if no worker has run yet), checks the
/// body is a valid event, and publishes it with a broker confirm.
pub async fn publish_event(
    config: &Config,
    routing_key: &str,
    body: &[u8],
    traceparent: Option<&str>,
) -> anyhow::Result<()> {
    Event::parse(body, TraceContext::default(), chrono::Utc::now())
        .context("the event is not valid")?;
    let conn = amqp::connect(&config.amqp_url)
        .await
        .with_context(|| format!("connecting to {}", redact_url(&config.amqp_url)))?;
    topology::declare(&conn, config.queue_type, &config.retry_schedule).await?;
    let publisher = Publisher::open(&conn).await?;
    let mut headers = FieldTable::default();
    if let Some(tp) = traceparent {
        with_header(&mut headers, "traceparent", tp);
    }
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(headers);
    publisher
        .publish(topology::EXCHANGE, routing_key, body, properties)
        .await?;
    let _ = conn.close(200, "published".into()).await;
    Ok(())
}
