//! RabbitMQ plumbing: connecting, and publishing with confirms so that nothing is
//! acknowledged before what replaces it is safely in a queue.

use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::config::redact_url;
use crate::event::TraceContext;

/// Connects with a name that shows in the management UI.
pub async fn connect(url: &str) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(LongString::from(format!(
        "webhook-worker/{}",
        std::process::id()
    )));
    Connection::connect(url, props).await.inspect_err(|e| {
        tracing::debug!(url = %redact_url(url), error = %e, "AMQP connection failed");
    })
}

/// How long closing a channel or connection may take: the work is done by then, and a
/// close whose answer never comes (the socket already gone) must not keep a command or a
/// stopping worker from exiting.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Closes a connection, politely but within [`CLOSE_TIMEOUT`].
pub async fn close(conn: &Connection, reason: &str) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, reason.into())).await;
}

/// Closes a channel, politely but within [`CLOSE_TIMEOUT`].
pub async fn close_channel(channel: &Channel, reason: &str) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, reason.into())).await;
}

/// A publish the broker did not take.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused the message (nack) for {0}")]
    Nacked(String),
    #[error("no queue is bound for {0}; declare the topology first (start a worker)")]
    Unroutable(String),
}

/// A channel in confirm mode. Every publish is `mandatory` (an unroutable message is an
/// error, not a silent drop), persistent, and awaited until the broker confirms it.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    pub async fn open(conn: &Connection) -> Result<Publisher, lapin::Error> {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Publisher { channel })
    }

    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let confirmation = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties.with_delivery_mode(2),
            )
            .await?
            .await?;
        let target = || format!("{exchange:?} / {routing_key:?}");
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable(target())),
            Confirmation::Nack(_) | Confirmation::NotRequested => {
                Err(PublishError::Nacked(target()))
            }
        }
    }
}

/// Adds a string header.
pub fn with_header(headers: &mut FieldTable, name: &str, value: &str) {
    headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
}

/// The `traceparent` and `tracestate` headers of a message that continues `trace`.
pub fn trace_headers(trace: &TraceContext) -> FieldTable {
    let mut headers = FieldTable::default();
    if let Some(tp) = &trace.traceparent {
        with_header(&mut headers, "traceparent", tp);
    }
    if let Some(ts) = &trace.tracestate {
        with_header(&mut headers, "tracestate", ts);
    }
    headers
}
