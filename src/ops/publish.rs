//! `publish`: sends events the way a producer does, one from flags or many as JSON lines
//! from standard input, so that trying the service out or re-feeding a batch of events
//! needs no AMQP client.

use std::io::BufRead;

use anyhow::{Context, anyhow, bail};
use chrono::{DateTime, Utc};
use clap::Args;
use serde::Serialize;
use uuid::Uuid;

use super::Output;
use crate::config::Config;
use crate::event::{Event, TraceContext};
use crate::publish::Producer;

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The event's project.
    #[arg(long, required_unless_present = "stdin", conflicts_with = "stdin")]
    pub project: Option<String>,
    /// The event type, also the routing key.
    #[arg(
        long = "type",
        required_unless_present = "stdin",
        conflicts_with = "stdin"
    )]
    pub event_type: Option<String>,
    /// The event's `data`, as JSON, or `@file.json` to read it from a file.
    #[arg(long, default_value = "{}", conflicts_with = "stdin")]
    pub data: String,
    /// The event id (default: a new UUID). Publishing the same id twice delivers once.
    #[arg(long, conflicts_with = "stdin")]
    pub id: Option<Uuid>,
    /// When the event happened (RFC 3339; default: when the worker receives it).
    #[arg(long, conflicts_with = "stdin")]
    pub occurred_at: Option<DateTime<Utc>>,
    /// A W3C `traceparent` to continue.
    #[arg(long)]
    pub traceparent: Option<String>,
    /// Read events from standard input, one full event object (CONTRACT §1) per line.
    #[arg(long)]
    pub stdin: bool,
}

pub async fn run(args: PublishArgs, config: &Config, out: Output) -> anyhow::Result<()> {
    if args.stdin {
        return from_stdin(config, args.traceparent.as_deref(), out).await;
    }
    let body = event_from_flags(&args)?;
    let producer = Producer::connect(config).await?;
    let event = producer.publish(&body, args.traceparent.as_deref()).await;
    producer.close().await;
    let id = event?.id;
    out.emit(&serde_json::json!({ "id": id }), || println!("{id}"))
}

fn event_from_flags(args: &PublishArgs) -> anyhow::Result<Vec<u8>> {
    let (Some(project), Some(event_type)) = (&args.project, &args.event_type) else {
        bail!("give --project and --type, or --stdin");
    };
    let data_text = match args.data.strip_prefix('@') {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading --data from {path}"))?
        }
        None => args.data.clone(),
    };
    let data: serde_json::Value =
        serde_json::from_str(&data_text).context("--data is not valid JSON")?;
    let mut event = serde_json::json!({
        "id": args.id.unwrap_or_else(Uuid::new_v4),
        "project_id": project,
        "event_type": event_type,
        "data": data,
    });
    if let Some(at) = args.occurred_at {
        event["occurred_at"] = serde_json::json!(at.to_rfc3339());
    }
    Ok(serde_json::to_vec(&event)?)
}

#[derive(Debug, Default, Serialize)]
struct Report {
    published: Vec<Published>,
    rejected: Vec<Rejected>,
}

#[derive(Debug, Serialize)]
struct Published {
    line: usize,
    id: Uuid,
}

#[derive(Debug, Serialize)]
struct Rejected {
    line: usize,
    error: String,
}

/// Publishes every valid line; a bad line is reported with its number and the rest go on.
/// Exits non-zero at the end if any line was bad. Blank lines are skipped.
async fn from_stdin(config: &Config, traceparent: Option<&str>, out: Output) -> anyhow::Result<()> {
    let producer = Producer::connect(config).await?;
    let mut report = Report::default();
    for (index, line) in std::io::stdin().lock().lines().enumerate() {
        let line_no = index + 1;
        let line = line.with_context(|| format!("reading line {line_no} of standard input"))?;
        if line.trim().is_empty() {
            continue;
        }
        // A bad line is reported and skipped; a broker failure stops the whole run.
        match Event::parse(line.as_bytes(), TraceContext::default(), Utc::now()) {
            Ok(_) => {
                let event = producer
                    .publish(line.as_bytes(), traceparent)
                    .await
                    .with_context(|| format!("publishing line {line_no}"))?;
                if !out.json {
                    println!("{}", event.id);
                }
                report.published.push(Published {
                    line: line_no,
                    id: event.id,
                });
            }
            Err(invalid) => {
                let error = invalid.to_string();
                if !out.json {
                    eprintln!("line {line_no}: {error}");
                }
                report.rejected.push(Rejected {
                    line: line_no,
                    error,
                });
            }
        }
    }
    producer.close().await;
    if out.json {
        out.emit(&report, || {})?;
    }
    match report.rejected.len() {
        0 => Ok(()),
        bad => Err(anyhow!(
            "{bad} of {} lines were not published",
            bad + report.published.len()
        )),
    }
}
