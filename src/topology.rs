//! The AMQP topology of CONTRACT §1 and §3: the events exchange, the work queue, the dead
//! letter queue and one delay queue per distinct retry (or parking) delay. Declared idempotently at
//! start-up; a queue that exists with other arguments stops the process with the difference.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::amqp;
use crate::config::{QueueType, RetrySchedule};

pub const EXCHANGE: &str = "webhook.events";
pub const WORK_QUEUE: &str = "webhook.events.work";
pub const DEAD_QUEUE: &str = "webhook.events.dead";

/// The broker's own limit on deliveries of one message of the work queue (quorum queues
/// only), after which it dead-letters the message. A backstop above the worker's own
/// limits: the worker dead-letters an event Postgres refuses at once, and one whose
/// processing panics on its third delivery.
pub const BROKER_DELIVERY_LIMIT: i64 = 20;

/// The delay queue for one retry delay: `webhook.retry.<ms>`.
pub fn retry_queue(delay: Duration) -> String {
    format!("webhook.retry.{}", delay.as_millis())
}

/// How long a delivery whose webhook is busy waits in RabbitMQ, by how many times it was
/// parked already: soon at first, then less often, so that a hung endpoint's backlog
/// costs the broker little. These share the delay queues with the retry schedule.
pub const PARK_DELAYS: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
];

/// The delay queue for a delivery parked `times` times before.
pub fn park_queue(times: u32) -> String {
    let tier = (times as usize).min(PARK_DELAYS.len() - 1);
    retry_queue(PARK_DELAYS[tier])
}

/// A declaration the broker refused, most often a queue that exists with other arguments.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error(
        "queue {queue} exists with other arguments than this configuration declares ({reason}); \
         delete the queue or restore the configuration it was created with"
    )]
    Mismatch { queue: String, reason: String },
    #[error("declaring {name}: {source}")]
    Broker { name: String, source: lapin::Error },
}

impl TopologyError {
    fn from_lapin(name: &str, e: lapin::Error) -> Self {
        let text = e.to_string();
        if text.contains("PRECONDITION_FAILED") || text.contains("inequivalent arg") {
            TopologyError::Mismatch {
                queue: name.to_string(),
                reason: text,
            }
        } else {
            TopologyError::Broker {
                name: name.to_string(),
                source: e,
            }
        }
    }

    /// True when retrying cannot help: the configuration and the broker disagree.
    pub fn is_fatal(&self) -> bool {
        matches!(self, TopologyError::Mismatch { .. })
    }
}

/// Declares everything. Each queue gets its own channel so that a refused declaration
/// (which closes the channel) names exactly one queue.
pub async fn declare(
    conn: &lapin::Connection,
    queue_type: QueueType,
    schedule: &RetrySchedule,
) -> Result<(), TopologyError> {
    let channel = open(conn, EXCHANGE).await?;
    // Durable, never auto-deleted: events published before any worker starts are kept
    // once the work queue is bound.
    channel
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| TopologyError::from_lapin(EXCHANGE, e))?;
    amqp::close_channel(&channel, "declared").await;

    declare_queue(conn, DEAD_QUEUE, dead_queue_args(queue_type)).await?;
    let work = declare_queue(conn, WORK_QUEUE, work_queue_args(queue_type)).await?;
    // `#`: every event type; the worker decides which webhooks match.
    work.queue_bind(
        WORK_QUEUE.into(),
        EXCHANGE.into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| TopologyError::from_lapin(WORK_QUEUE, e))?;
    amqp::close_channel(&work, "declared").await;

    let mut delays = schedule.tiers();
    delays.extend(PARK_DELAYS);
    delays.sort();
    delays.dedup();
    for delay in delays {
        let name = retry_queue(delay);
        let channel = declare_queue(conn, &name, retry_queue_args(queue_type, delay)).await?;
        amqp::close_channel(&channel, "declared").await;
    }
    Ok(())
}

async fn open(conn: &lapin::Connection, name: &str) -> Result<Channel, TopologyError> {
    conn.create_channel()
        .await
        .map_err(|e| TopologyError::Broker {
            name: name.to_string(),
            source: e,
        })
}

async fn declare_queue(
    conn: &lapin::Connection,
    name: &str,
    args: FieldTable,
) -> Result<Channel, TopologyError> {
    let channel = open(conn, name).await?;
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .map_err(|e| TopologyError::from_lapin(name, e))?;
    Ok(channel)
}

fn base_args(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), string(queue_type.as_str()));
    args
}

/// Rejected messages go to the dead-letter queue; with quorum queues the broker guarantees
/// the move (at-least-once dead-lettering needs `reject-publish` overflow).
fn dead_letter_to(args: &mut FieldTable, queue_type: QueueType, target: &str) {
    args.insert("x-dead-letter-exchange".into(), string(""));
    args.insert("x-dead-letter-routing-key".into(), string(target));
    if queue_type == QueueType::Quorum {
        args.insert("x-dead-letter-strategy".into(), string("at-least-once"));
        args.insert("x-overflow".into(), string("reject-publish"));
    }
}

fn work_queue_args(queue_type: QueueType) -> FieldTable {
    let mut args = base_args(queue_type);
    dead_letter_to(&mut args, queue_type, DEAD_QUEUE);
    if queue_type == QueueType::Quorum {
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(BROKER_DELIVERY_LIMIT),
        );
    }
    args
}

fn dead_queue_args(queue_type: QueueType) -> FieldTable {
    base_args(queue_type)
}

/// Messages wait `delay` (all messages of a queue share the TTL, so the head always
/// expires first), then are dead-lettered back to the work queue.
fn retry_queue_args(queue_type: QueueType, delay: Duration) -> FieldTable {
    let mut args = base_args(queue_type);
    // A signed 64-bit integer: RabbitMQ does not accept AMQP's unsigned types.
    let ttl = i64::try_from(delay.as_millis()).expect("the schedule parser caps delays");
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
    dead_letter_to(&mut args, queue_type, WORK_QUEUE);
    args
}

fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// A header value as an integer, whatever integer type it was sent as.
pub fn header_int(headers: Option<&FieldTable>, name: &str) -> Option<i64> {
    as_int(headers?.inner().get(&ShortString::from(name))?)
}

/// An AMQP value as an integer, whatever integer type it is.
pub fn as_int(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        _ => None,
    }
}

/// A header value as text, whatever string type the producer used.
pub fn header_str<'a>(headers: Option<&'a FieldTable>, name: &str) -> Option<&'a str> {
    let value = headers?.inner().get(&ShortString::from(name))?;
    match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}
