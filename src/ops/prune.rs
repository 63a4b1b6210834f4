//! `prune`: keeps the tables from growing forever. Deletes finished deliveries (with their
//! attempt rows) and stored events older than a cut-off, in small batches so that no
//! statement holds many locks or runs long beside the worker.
//!
//! What is never deleted: a delivery still `pending`, `delivering` or `failed` (a retry is
//! scheduled), nor its event, as any retry or replay is built from it. Attempt rows go only
//! with their delivery, so a delivery's `attempts` always equals its attempt rows
//! (CONTRACT §2). Nor is an event stored less than a day ago: a new event's deliveries
//! are written as their first attempts end, so one without any may still be under way.
//! An event id that is pruned can be delivered again if it is published again:
//! deduplication lasts as long as the stored event (CONTRACT §1).

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use sqlx::PgPool;

use super::Output;
use crate::config::{Config, parse_duration};

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Delete what ended longer ago than this (e.g. 30d).
    #[arg(long, value_parser = parse_duration)]
    pub older_than: Duration,
    /// Rows per statement.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub batch: i64,
    /// Count what would be deleted, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    cutoff: chrono::DateTime<chrono::Utc>,
    dry_run: bool,
    deliveries: i64,
    attempts: i64,
    events: i64,
}

/// Finished deliveries of the cut-off's past; `$1` is the cut-off. `created_at` (indexed)
/// narrows the scan; `updated_at` keeps a delivery replayed or finished recently.
macro_rules! old_deliveries {
    () => {
        "SELECT id, attempts FROM control_plane.webhook_deliveries \
         WHERE created_at < $1 AND updated_at < $1 \
           AND status IN ('delivered', 'permanently_failed', 'disabled')"
    };
}

/// Events of the cut-off's past with no delivery left (deleting an event deletes its
/// deliveries, so one with any delivery left is kept).
macro_rules! old_events {
    () => {
        "SELECT e.id FROM control_plane.events e \
         WHERE e.received_at < least($1, now() - interval '1 day') \
           AND NOT EXISTS (SELECT 1 FROM control_plane.webhook_deliveries d \
                           WHERE d.event_id = e.id)"
    };
}

pub async fn run(args: PruneArgs, config: &Config, out: Output) -> anyhow::Result<()> {
    let store = super::store(config).await?;
    let pool = store.pool();
    let age = chrono::Duration::from_std(args.older_than).context("--older-than is too long")?;
    let mut report = Report {
        cutoff: chrono::Utc::now() - age,
        dry_run: args.dry_run,
        ..Report::default()
    };
    if args.dry_run {
        count(pool, &mut report).await?;
    } else {
        delete(pool, &mut report, args.batch).await?;
    }
    out.emit(&report, || {
        let verb = if report.dry_run {
            "would delete"
        } else {
            "deleted"
        };
        println!(
            "{verb} {} deliveries ({} attempts) and {} events that ended before {} UTC",
            report.deliveries,
            report.attempts,
            report.events,
            super::time(Some(report.cutoff))
        );
    })
}

async fn count(pool: &PgPool, report: &mut Report) -> anyhow::Result<()> {
    let (deliveries, attempts): (i64, i64) = sqlx::query_as(concat!(
        "SELECT count(*), coalesce(sum(attempts), 0)::int8 FROM (",
        old_deliveries!(),
        ") old"
    ))
    .bind(report.cutoff)
    .fetch_one(pool)
    .await
    .context("counting old deliveries")?;
    // Events whose deliveries are all old would be left without any: count them too.
    report.events = sqlx::query_scalar(
        "SELECT count(*) FROM control_plane.events e \
         WHERE e.received_at < least($1, now() - interval '1 day') \
           AND NOT EXISTS (SELECT 1 FROM control_plane.webhook_deliveries d WHERE d.event_id = e.id \
             AND NOT (d.created_at < $1 AND d.updated_at < $1 \
                      AND d.status IN ('delivered', 'permanently_failed', 'disabled')))",
    )
    .bind(report.cutoff)
    .fetch_one(pool)
    .await
    .context("counting old events")?;
    report.deliveries = deliveries;
    report.attempts = attempts;
    Ok(())
}

/// Deliveries first (their attempts go with them), then the events left without any.
/// Each statement deletes at most `batch` rows and commits on its own.
async fn delete(pool: &PgPool, report: &mut Report, batch: i64) -> anyhow::Result<()> {
    loop {
        let (deliveries, attempts): (i64, i64) = sqlx::query_as(concat!(
            // The conditions again on the row itself: Postgres checks them once more on
            // a row a replay changed meanwhile, so a delivery replayed now is kept.
            "WITH gone AS (DELETE FROM control_plane.webhook_deliveries \
               WHERE id IN (SELECT id FROM (",
            old_deliveries!(),
            ") old LIMIT $2) AND updated_at < $1 \
                 AND status IN ('delivered', 'permanently_failed', 'disabled') \
               RETURNING attempts) \
             SELECT count(*), coalesce(sum(attempts), 0)::int8 FROM gone"
        ))
        .bind(report.cutoff)
        .bind(batch)
        .fetch_one(pool)
        .await
        .context("deleting old deliveries")?;
        report.deliveries += deliveries;
        report.attempts += attempts;
        if deliveries < batch {
            break;
        }
    }
    loop {
        let events = sqlx::query(concat!(
            "DELETE FROM control_plane.events WHERE id IN (",
            old_events!(),
            " LIMIT $2)"
        ))
        .bind(report.cutoff)
        .bind(batch)
        .execute(pool)
        .await
        .context("deleting old events")?
        .rows_affected() as i64;
        report.events += events;
        if events < batch {
            break;
        }
    }
    Ok(())
}
