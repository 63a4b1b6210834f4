//! The command line: `run` (the default), `migrate`, `publish` and the operator commands
//! of [`crate::ops`], all sharing one [`Config`] (CONTRACT §5).

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, redact_url};
use crate::ops::{self, Output};
use crate::shutdown;
use crate::store::Store;
use crate::worker::Worker;

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
    /// Print machine-readable JSON (one document; a list is an array) instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume events and deliver webhooks (the default).
    Run,
    /// Apply the database migrations, then exit.
    Migrate,
    /// Publish events to the `webhook.events` exchange: one from flags, or JSON lines.
    Publish(ops::publish::PublishArgs),
    /// Register and manage webhooks.
    #[command(subcommand)]
    Webhooks(ops::webhooks::WebhooksCommand),
    /// Inspect deliveries and their attempts.
    #[command(subcommand)]
    Deliveries(ops::deliveries::DeliveriesCommand),
    /// Give failed deliveries new attempts, through RabbitMQ.
    Replay(ops::replay::ReplayArgs),
    /// Inspect and requeue the messages in `webhook.events.dead`.
    #[command(subcommand)]
    DeadLetters(ops::dead_letters::DeadLettersCommand),
    /// Delivery statistics per webhook and per project.
    Stats(ops::stats::StatsArgs),
    /// Delete finished deliveries, their attempts and old events.
    Prune(ops::prune::PruneArgs),
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.config;
    let out = Output { json: cli.json };
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
        Command::Publish(args) => ops::publish::run(args, &config, out).await,
        Command::Webhooks(command) => ops::webhooks::run(command, &config, out).await,
        Command::Deliveries(command) => ops::deliveries::run(command, &config, out).await,
        Command::Replay(args) => ops::replay::run(args, &config, out).await,
        Command::DeadLetters(command) => ops::dead_letters::run(command, &config, out).await,
        Command::Stats(args) => ops::stats::run(args, &config, out).await,
        Command::Prune(args) => ops::prune::run(args, &config, out).await,
    }
}
