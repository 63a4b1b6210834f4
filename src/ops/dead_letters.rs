//! `dead-letters list | show | requeue`: what sits in `webhook.events.dead` and why, and
//! sending chosen messages back once their cause is fixed.
//!
//! Browsing takes the messages with `basic.get` without acknowledging them, all on one
//! channel, then returns them together with one `basic.nack` (`multiple`, `requeue`).
//! Nothing consumes the dead-letter queue, so nobody else sees them meanwhile, and the
//! broker puts returned messages back at their place (classic queues) or at the head in
//! the order they were taken (quorum queues): the queue's order is kept. A browse marks
//! the messages redelivered and, with quorum queues, raises their `x-delivery-count`; the
//! dead-letter queue has no delivery limit, so that loses nothing. A requeued message is
//! acknowledged (removed) only after its republish to `webhook.events` is confirmed.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::table::{Table, fields};
use super::{Output, confirm, excerpt};
use crate::amqp::{self, Publisher};
use crate::config::Config;
use crate::topology::{self, DEAD_QUEUE, header_str};

#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// List the dead letters, oldest first, with the reason each was moved there.
    List {
        /// Read at most this many messages.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Show the dead letters with this reference: headers, properties and body.
    Show { reference: String },
    /// Publish chosen dead letters to `webhook.events` again, with their original routing key.
    Requeue(RequeueArgs),
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["references", "all"]))]
pub struct RequeueArgs {
    /// References as `list` shows them (message id, event id or body hash).
    pub references: Vec<String>,
    /// Every dead letter.
    #[arg(long)]
    pub all: bool,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// Headers the broker or the worker added; a requeued message goes back without them.
const ADDED_HEADERS: &[&str] = &[
    "x-error",
    "x-death",
    "x-delivery-count",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

/// One message of the dead-letter queue, held unacknowledged.
#[derive(Debug, Serialize)]
pub struct DeadLetter {
    /// How commands name it: the AMQP message id, else the event id in the body, else
    /// `sha256:` and the start of the body's hash.
    pub reference: String,
    pub error: Option<String>,
    /// The routing key a requeue publishes it with.
    pub routing_key: String,
    pub headers: Value,
    pub content_type: Option<String>,
    pub message_type: Option<String>,
    pub body: String,
    #[serde(skip)]
    delivery_tag: u64,
    #[serde(skip)]
    raw: Vec<u8>,
    #[serde(skip)]
    properties: BasicProperties,
}

pub async fn run(command: DeadLettersCommand, config: &Config, out: Output) -> anyhow::Result<()> {
    let conn = super::amqp(config).await?;
    let channel = conn.create_channel().await?;
    let result = match command {
        DeadLettersCommand::List { limit } => list(&channel, limit, out).await,
        DeadLettersCommand::Show { reference } => show(&channel, &reference, out).await,
        DeadLettersCommand::Requeue(args) => requeue(&conn, &channel, args, out).await,
    };
    // Closed in order: a channel dropped while its connection closes makes lapin log an error.
    amqp::close_channel(&channel, "done").await;
    amqp::close(&conn, "done").await;
    result
}

/// Takes up to `limit` messages, unacknowledged; returns them and how many the queue had.
async fn browse(channel: &Channel, limit: u32) -> anyhow::Result<(Vec<DeadLetter>, u32)> {
    let queue = channel
        .queue_declare(
            DEAD_QUEUE.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("no queue {DEAD_QUEUE} (has a worker ever run here?)"))?;
    let total = queue.message_count();
    let mut letters = Vec::new();
    while letters.len() < limit.min(total) as usize {
        let got = channel
            .basic_get(DEAD_QUEUE.into(), BasicGetOptions { no_ack: false })
            .await
            .context("reading the dead-letter queue")?;
        let Some(message) = got else { break };
        letters.push(DeadLetter::from_delivery(message.delivery));
    }
    Ok((letters, total))
}

/// Returns every message still held to the queue, in order.
async fn give_back(channel: &Channel, letters: &[DeadLetter]) -> anyhow::Result<()> {
    if let Some(last) = letters.iter().map(|l| l.delivery_tag).max() {
        channel
            .basic_nack(
                last,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await
            .context("returning the messages to the dead-letter queue")?;
    }
    Ok(())
}

impl DeadLetter {
    fn from_delivery(delivery: lapin::message::Delivery) -> DeadLetter {
        let headers = delivery.properties.headers().as_ref();
        let body_json: Option<Value> = serde_json::from_slice(&delivery.data).ok();
        let field = |name: &str| {
            body_json
                .as_ref()
                .and_then(|b| b.get(name))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let reference = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .or_else(|| field("id"))
            .unwrap_or_else(|| {
                let hash = Sha256::digest(&delivery.data);
                let hex: String = hash[..6].iter().map(|b| format!("{b:02x}")).collect();
                format!("sha256:{hex}")
            });
        let routing_key = original_routing_key(headers)
            .or_else(|| field("event_type"))
            .unwrap_or_else(|| "requeued".into());
        DeadLetter {
            reference,
            error: header_str(headers, "x-error").map(str::to_string),
            routing_key,
            headers: headers.map_or(Value::Null, table_json),
            content_type: delivery
                .properties
                .content_type()
                .as_ref()
                .map(|c| c.to_string()),
            message_type: delivery.properties.kind().as_ref().map(|k| k.to_string()),
            body: String::from_utf8_lossy(&delivery.data).into_owned(),
            delivery_tag: delivery.delivery_tag,
            raw: delivery.data,
            properties: delivery.properties,
        }
    }

    /// The message as it was before it was dead-lettered.
    fn republished_properties(&self) -> BasicProperties {
        let mut headers = FieldTable::default();
        if let Some(old) = self.properties.headers() {
            for (name, value) in old.inner() {
                if !ADDED_HEADERS.contains(&name.as_str()) {
                    headers.insert(name.clone(), value.clone());
                }
            }
        }
        self.properties.clone().with_headers(headers)
    }
}

/// The routing key the broker recorded when it dead-lettered the message (`x-death`). The
/// worker's own dead letters carry none; their event type is the routing key producers use.
fn original_routing_key(headers: Option<&FieldTable>) -> Option<String> {
    let deaths = headers?.inner().get("x-death")?;
    let AMQPValue::FieldArray(deaths) = deaths else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    let AMQPValue::FieldArray(keys) = first.inner().get("routing-keys")? else {
        return None;
    };
    match keys.as_slice().first()? {
        AMQPValue::LongString(key) => Some(String::from_utf8_lossy(key.as_bytes()).into_owned()),
        _ => None,
    }
}

fn table_json(table: &FieldTable) -> Value {
    Value::Object(
        table
            .inner()
            .iter()
            .map(|(name, value)| (name.to_string(), value_json(value)))
            .collect(),
    )
}

fn value_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into()),
        AMQPValue::ShortString(s) => Value::String(s.to_string()),
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::FieldTable(t) => table_json(t),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_json).collect()),
        AMQPValue::Void => Value::Null,
        AMQPValue::Float(f) => Value::from(f64::from(*f)),
        AMQPValue::Double(d) => Value::from(*d),
        AMQPValue::Timestamp(t) => Value::from(*t),
        other => topology::as_int(other)
            .map(Value::from)
            .unwrap_or_else(|| Value::String(format!("{other:?}"))),
    }
}

async fn list(channel: &Channel, limit: u32, out: Output) -> anyhow::Result<()> {
    let (letters, total) = browse(channel, limit).await?;
    give_back(channel, &letters).await?;
    out.emit(&letters, || {
        let mut table = Table::new(&["REFERENCE", "ROUTING KEY", "ERROR", "BODY"]);
        for l in &letters {
            table.row(vec![
                l.reference.clone(),
                l.routing_key.clone(),
                excerpt(l.error.as_deref().unwrap_or("-"), 70),
                excerpt(&l.body, 40),
            ]);
        }
        table.print();
        println!("{} of {total} dead letters shown", letters.len());
    })
}

async fn show(channel: &Channel, reference: &str, out: Output) -> anyhow::Result<()> {
    let (letters, _) = browse(channel, u32::MAX).await?;
    give_back(channel, &letters).await?;
    let matching: Vec<&DeadLetter> = letters
        .iter()
        .filter(|l| l.reference == reference)
        .collect();
    if matching.is_empty() {
        bail!("no dead letter with reference {reference}");
    }
    out.emit(&matching, || {
        for l in &matching {
            print!(
                "{}",
                fields(&[
                    ("reference", l.reference.clone()),
                    ("error", l.error.clone().unwrap_or_else(|| "-".into())),
                    ("routing key", l.routing_key.clone()),
                    (
                        "content type",
                        l.content_type.clone().unwrap_or_else(|| "-".into())
                    ),
                    ("type", l.message_type.clone().unwrap_or_else(|| "-".into())),
                    ("headers", l.headers.to_string()),
                ])
            );
            println!("body:\n{}\n", l.body);
        }
    })
}

async fn requeue(
    conn: &lapin::Connection,
    channel: &Channel,
    args: RequeueArgs,
    out: Output,
) -> anyhow::Result<()> {
    let publisher = Publisher::open(conn).await.context("opening a channel")?;
    let (letters, _) = browse(channel, u32::MAX).await?;
    let chosen: Vec<&DeadLetter> = letters
        .iter()
        .filter(|l| args.all || args.references.contains(&l.reference))
        .collect();
    let missing: Vec<&String> = args
        .references
        .iter()
        .filter(|r| !letters.iter().any(|l| &l.reference == *r))
        .collect();
    let result = async {
        if !missing.is_empty() {
            bail!("no dead letter with reference {}", join(&missing));
        }
        let question = format!(
            "Publish {} dead letters to {} again?",
            chosen.len(),
            topology::EXCHANGE
        );
        if !confirm(&question, args.yes)? {
            bail!("nothing requeued");
        }
        let mut requeued = Vec::new();
        for letter in &chosen {
            republish(channel, &publisher, letter).await?;
            requeued.push(letter.reference.clone());
        }
        Ok(requeued)
    }
    .await;
    give_back(channel, &letters).await?;
    let requeued = result?;
    out.emit(&serde_json::json!({ "requeued": requeued }), || {
        println!(
            "{} dead letters published to {} again",
            requeued.len(),
            topology::EXCHANGE
        )
    })
}

/// Publishes the message to `webhook.events` and, once the broker confirmed it, removes
/// it from the dead-letter queue.
async fn republish(
    channel: &Channel,
    publisher: &Publisher,
    letter: &DeadLetter,
) -> anyhow::Result<()> {
    publisher
        .publish(
            topology::EXCHANGE,
            &letter.routing_key,
            &letter.raw,
            letter.republished_properties(),
        )
        .await
        .with_context(|| format!("republishing {}; it stays dead-lettered", letter.reference))?;
    channel
        .basic_ack(letter.delivery_tag, BasicAckOptions { multiple: false })
        .await
        .with_context(|| {
            format!(
                "removing {} from the dead-letter queue after its republish",
                letter.reference
            )
        })
}

fn join(items: &[&String]) -> String {
    items
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_strings_become_json() {
        assert_eq!(value_json(&AMQPValue::LongLongInt(3)), Value::from(3));
        assert_eq!(value_json(&AMQPValue::ShortInt(-2)), Value::from(-2));
        assert_eq!(
            value_json(&AMQPValue::LongString("why".into())),
            Value::from("why")
        );
    }

    #[test]
    fn the_broker_recorded_routing_key_is_found() {
        let mut death = FieldTable::default();
        death.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(vec![AMQPValue::LongString("order.created".into())].into()),
        );
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
        );
        assert_eq!(
            original_routing_key(Some(&headers)).as_deref(),
            Some("order.created")
        );
        assert_eq!(original_routing_key(None), None);
    }
}
