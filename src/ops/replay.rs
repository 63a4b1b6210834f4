//! `replay`: gives failed deliveries new attempts, through RabbitMQ like any retry (the
//! command never makes an HTTP request itself). Built on the worker's claim rule: a retry
//! message runs only if its delivery is `failed` with the attempt before it recorded, so
//! a replay and a retry chain still under way make one chain between them (CONTRACT §3).

use anyhow::{Context, anyhow, bail};
use clap::Args;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::{Output, Progress, Since, confirm};
use crate::amqp::{self, Publisher};
use crate::config::Config;
use crate::event::TraceContext;
use crate::message::RetryTask;
use crate::topology;

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("what").required(true).args(["delivery", "webhook"]))]
pub struct ReplayArgs {
    /// Replay this delivery.
    #[arg(long)]
    pub delivery: Option<Uuid>,
    /// Replay every failed, permanently_failed or disabled delivery of this webhook…
    #[arg(long, requires = "since")]
    pub webhook: Option<Uuid>,
    /// …created since (RFC 3339, or a duration ago such as 24h).
    #[arg(long, requires = "webhook")]
    pub since: Option<Since>,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// Whether a replay starts a delivery in this status again (the queries below spell the
/// same list).
fn replayable(status: &str) -> bool {
    matches!(status, "failed" | "permanently_failed" | "disabled")
}

#[derive(Debug, Default, Serialize)]
struct Report {
    /// Deliveries given a new attempt, with its number.
    replayed: Vec<Replayed>,
    /// Deliveries that had moved on meanwhile (being delivered, delivered, deleted).
    skipped: Vec<Skipped>,
}

#[derive(Debug, Serialize)]
struct Replayed {
    delivery_id: Uuid,
    attempt: u32,
}

#[derive(Debug, Serialize)]
struct Skipped {
    delivery_id: Uuid,
    status: Option<String>,
}

pub async fn run(args: ReplayArgs, config: &Config, out: Output) -> anyhow::Result<()> {
    let store = super::store(config).await?;
    let pool = store.pool();
    let (ids, what) = match (args.delivery, args.webhook, args.since) {
        (Some(id), _, _) => (
            vec![one_delivery(pool, id).await?],
            format!("delivery {id}"),
        ),
        (None, Some(webhook), Some(since)) => {
            let ids = of_webhook(pool, webhook, since).await?;
            (ids, format!("deliveries of webhook {webhook}"))
        }
        _ => bail!("give --delivery ID, or --webhook ID with --since TIME"),
    };
    if ids.is_empty() {
        let report = Report::default();
        return out.emit(&report, || {
            println!("nothing to replay: no failed, permanently_failed or disabled {what}")
        });
    }
    let question = format!(
        "Replay {} {what}? Attempt numbers continue and the retry schedule starts again.",
        ids.len()
    );
    if !confirm(&question, args.yes)? {
        bail!("nothing replayed");
    }
    let conn = super::amqp(config).await?;
    let publisher = Publisher::open(&conn).await.context("opening a channel")?;
    let report = replay_all(pool, &publisher, &ids).await;
    amqp::close(&conn, "replayed").await;
    let report = report?;
    out.emit(&report, || {
        println!("replayed {} deliveries", report.replayed.len());
        for s in &report.skipped {
            println!(
                "skipped {}: it is {} now",
                s.delivery_id,
                s.status.as_deref().unwrap_or("deleted")
            );
        }
    })
}

/// The delivery, if a replay can start it again; otherwise an error saying why not.
async fn one_delivery(pool: &PgPool, id: Uuid) -> anyhow::Result<Uuid> {
    let row: Option<(String, Uuid, bool)> = sqlx::query_as(
        "SELECT d.status, d.webhook_id, w.disabled FROM control_plane.webhook_deliveries d \
         JOIN control_plane.webhooks w ON w.id = d.webhook_id WHERE d.id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
    .context("reading the delivery")?;
    let (status, webhook, disabled) = row.ok_or_else(|| anyhow!("no delivery with id {id}"))?;
    if disabled {
        bail!(webhook_disabled(webhook));
    }
    if !matches!(
        status.as_str(),
        "failed" | "permanently_failed" | "disabled"
    ) {
        bail!(
            "delivery {id} is {status}: only failed, permanently_failed and disabled deliveries \
             are replayed (one being delivered or retried already has its chain)"
        );
    }
    Ok(id)
}

fn webhook_disabled(webhook: Uuid) -> String {
    format!(
        "webhook {webhook} is disabled; enable it first (webhook-worker webhooks enable {webhook})"
    )
}

async fn of_webhook(pool: &PgPool, webhook: Uuid, since: Since) -> anyhow::Result<Vec<Uuid>> {
    let disabled: Option<bool> =
        sqlx::query_scalar("SELECT disabled FROM control_plane.webhooks WHERE id = $1")
            .bind(webhook)
            .fetch_optional(pool)
            .await
            .context("reading the webhook")?;
    match disabled {
        None => bail!("no webhook with id {webhook}"),
        Some(true) => bail!(webhook_disabled(webhook)),
        Some(false) => {}
    }
    sqlx::query_scalar(
        "SELECT id FROM control_plane.webhook_deliveries \
         WHERE webhook_id = $1 AND created_at >= $2 \
           AND status IN ('failed', 'permanently_failed', 'disabled') \
         ORDER BY created_at, id",
    )
    .bind(webhook)
    .bind(since.0)
    .fetch_all(pool)
    .await
    .context("listing the webhook's failed deliveries")
}

async fn replay_all(pool: &PgPool, publisher: &Publisher, ids: &[Uuid]) -> anyhow::Result<Report> {
    let progress = Progress::new("replaying", ids.len());
    let mut report = Report::default();
    for (done, &id) in ids.iter().enumerate() {
        progress.set(done);
        let outcome = replay_one(pool, publisher, id).await.with_context(|| {
            format!(
                "replaying delivery {id} ({} of {} replayed before it)",
                report.replayed.len(),
                ids.len()
            )
        });
        match outcome {
            Ok(Ok(attempt)) => report.replayed.push(Replayed {
                delivery_id: id,
                attempt,
            }),
            Ok(Err(status)) => report.skipped.push(Skipped {
                delivery_id: id,
                status,
            }),
            Err(e) => {
                progress.finish();
                return Err(e);
            }
        }
    }
    progress.set(ids.len());
    progress.finish();
    Ok(report)
}

/// A delivery as it was before a replay changed it, to put it back if the publish fails.
#[derive(sqlx::FromRow)]
struct Before {
    status: String,
    attempts: i32,
    next_retry_at: Option<chrono::DateTime<chrono::Utc>>,
    attempts_before_replay: i32,
    webhook_disabled: bool,
    traceparent: Option<String>,
    tracestate: Option<String>,
}

/// Sets the delivery `failed` and publishes the retry message for its next attempt, or
/// returns the status that stopped it.
///
/// Order: the change is committed first, then the message published. The worker's claim
/// (`UPDATE … WHERE status IN ('pending', 'failed') AND attempts = N - 1`) must see the
/// committed change when the message arrives, or it drops the message; publishing first,
/// or inside the transaction, would race with that. If the publish fails, the change is
/// reverted (only if the delivery is still as the replay left it), so the delivery is not
/// left `failed` without a message. Only a process killed between the commit and the
/// publish can leave it so; it shows as `failed` with a `next_retry_at` in the past, and
/// replaying it again (`failed` is replayable) sends its message. The claim rule also
/// makes a second replay start no second chain: a delivery being delivered is skipped
/// here, and two messages for the same attempt make one attempt.
async fn replay_one(
    pool: &PgPool,
    publisher: &Publisher,
    id: Uuid,
) -> anyhow::Result<Result<u32, Option<String>>> {
    let mut tx = pool.begin().await.context("starting a transaction")?;
    let before: Option<Before> = sqlx::query_as(
        "SELECT d.status, d.attempts, d.next_retry_at, d.attempts_before_replay, \
           w.disabled AS webhook_disabled, e.traceparent, e.tracestate \
         FROM control_plane.webhook_deliveries d \
         JOIN control_plane.webhooks w ON w.id = d.webhook_id \
         JOIN control_plane.events e ON e.id = d.event_id \
         WHERE d.id = $1 FOR UPDATE OF d",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await
    .context("reading the delivery")?;
    let Some(before) = before else {
        return Ok(Err(None));
    };
    if before.webhook_disabled || !replayable(&before.status) {
        return Ok(Err(Some(before.status)));
    }
    sqlx::query(
        "UPDATE control_plane.webhook_deliveries SET status = 'failed', next_retry_at = now(), \
           attempts_before_replay = attempts, updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *tx)
    .await
    .context("marking the delivery for replay")?;
    tx.commit().await.context("committing the replay")?;

    let attempt = before.attempts.max(0) as u32 + 1;
    let task = RetryTask::new(id, attempt);
    let trace = TraceContext::new(before.traceparent.as_deref(), before.tracestate.as_deref());
    let published = publisher
        .publish(
            "",
            topology::WORK_QUEUE,
            &task.to_bytes(),
            task.properties(&trace),
        )
        .await;
    if let Err(e) = published {
        revert(pool, id, &before).await?;
        return Err(
            anyhow!(e).context("publishing the retry message; the delivery is left as it was")
        );
    }
    Ok(Ok(attempt))
}

/// Puts a delivery back as it was before a replay whose message could not be published.
async fn revert(pool: &PgPool, id: Uuid, before: &Before) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE control_plane.webhook_deliveries SET status = $2, next_retry_at = $3, \
           attempts_before_replay = $4, updated_at = now() \
         WHERE id = $1 AND status = 'failed' AND attempts = $5",
    )
    .bind(id)
    .bind(&before.status)
    .bind(before.next_retry_at)
    .bind(before.attempts_before_replay)
    .bind(before.attempts)
    .execute(pool)
    .await
    .with_context(|| {
        format!("putting delivery {id} back after a failed publish; it is failed without a retry message, replay it again")
    })?;
    Ok(())
}
