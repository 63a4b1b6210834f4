//! The command line: `run` (the default), `migrate` and `publish`, all sharing one
//! [`Config`] (CONTRACT §5).

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{Config, redact_url};
use crate::store::Store;
use crate::worker::Worker;
use crate::{publish, shutdown};

#[derive(Debug, Parser)]
#[command(
    name = "webhook-worker",
    version,
    about = "Delivers webhooks for events published to RabbitMQ",
    args_override_self = true
)]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume events and deliver webhooks (the default).
    Run,
    /// Apply the database migrations, then exit.
    Migrate,
    /// Publish one event to the `webhook.events` exchange, for trying things out.
    Publish(PublishArgs),
}

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// The event's project.
    #[arg(long)]
    pub project: String,
    /// The event type, also the routing key.
    #[arg(long = "type")]
    pub event_type: String,
    /// The event's `data`, as JSON.
    #[arg(long, default_value = "{}")]
    pub data: String,
    /// The event id (default: a new UUID). Publishing the same id twice delivers once.
    #[arg(long)]
    pub id: Option<Uuid>,
    /// When the event happened (RFC 3339; default: when the worker receives it).
    #[arg(long)]
    pub occurred_at: Option<DateTime<Utc>>,
    /// A W3C `traceparent` to continue.
    #[arg(long)]
    pub traceparent: Option<String>,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.config;
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let worker = Worker::build(config).await?;
            tracing::info!(http_addr = %worker.http_addr(), "webhook-worker starting");
            let stop: CancellationToken = shutdown::on_signal();
            worker.run_until_stopped(stop).await
        }
        Command::Migrate => {
            let store = Store::connect_lazy(&config.database_url, 1)?;
            store
                .migrate()
                .await
                .with_context(|| format!("migrating {}", redact_url(&config.database_url)))?;
            println!("migrations applied");
            Ok(())
        }
        Command::Publish(args) => {
            let id = args.id.unwrap_or_else(Uuid::new_v4);
            let data: serde_json::Value =
                serde_json::from_str(&args.data).context("--data is not valid JSON")?;
            let mut event = serde_json::json!({
                "id": id,
                "project_id": args.project,
                "event_type": args.event_type,
                "data": data,
            });
            if let Some(at) = args.occurred_at {
                event["occurred_at"] = serde_json::json!(at.to_rfc3339());
            }
            let body = serde_json::to_vec(&event)?;
            publish::publish_event(
                &config,
                &args.event_type,
                &body,
                args.traceparent.as_deref(),
            )
            .await?;
            println!("{id}");
            Ok(())
        }
    }
}
