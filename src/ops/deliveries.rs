//! `deliveries list | show`: what happened to deliveries, down to every attempt, so an
//! operator can answer "did the receiver get it, and what did it say" without SQL.

use anyhow::{Context, anyhow};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use super::table::{Table, fields};
use super::{Output, Since, excerpt, or_dash, time};
use crate::config::Config;
use crate::store::DeliveryStatus;

#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// List deliveries, newest first.
    List(ListArgs),
    /// Show one delivery with every attempt.
    Show { id: Uuid },
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this webhook's deliveries.
    #[arg(long)]
    pub webhook: Option<Uuid>,
    /// Only this event's deliveries.
    #[arg(long)]
    pub event: Option<Uuid>,
    /// pending, delivering, delivered, failed, permanently_failed or disabled.
    #[arg(long, value_parser = parse_status)]
    pub status: Option<DeliveryStatus>,
    #[arg(long)]
    pub project: Option<String>,
    /// Created at or after (RFC 3339, or a duration ago such as 24h).
    #[arg(long)]
    pub since: Option<Since>,
    /// Created before (RFC 3339, or a duration ago).
    #[arg(long)]
    pub until: Option<Since>,
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
}

fn parse_status(s: &str) -> Result<DeliveryStatus, String> {
    DeliveryStatus::parse(s).ok_or_else(|| {
        "expected pending, delivering, delivered, failed, permanently_failed or disabled".into()
    })
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Delivery {
    pub id: Uuid,
    pub webhook_id: Uuid,
    pub event_id: Uuid,
    pub project_id: String,
    pub event_type: String,
    pub status: String,
    pub attempts: i32,
    pub http_status_code: Option<i32>,
    pub error_type: Option<String>,
    pub error_message: Option<String>,
    pub next_retry_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<i32>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Attempt {
    pub attempt_number: i32,
    pub started_at: DateTime<Utc>,
    pub duration_ms: i32,
    pub http_status_code: Option<i32>,
    pub succeeded: bool,
    pub error_type: Option<String>,
    pub error_message: Option<String>,
    /// The stored response body (at most 64 KiB).
    pub response_body: Option<String>,
}

/// The columns of a [`Delivery`].
macro_rules! columns {
    () => {
        "id, webhook_id, event_id, project_id, event_type, status, attempts, http_status_code, \
         error_type, error_message, next_retry_at, duration_ms, delivered_at, created_at, \
         updated_at"
    };
}

pub async fn run(command: DeliveriesCommand, config: &Config, out: Output) -> anyhow::Result<()> {
    let store = super::store(config).await?;
    let mut conn = store
        .pool()
        .acquire()
        .await
        .context("connecting to Postgres")?;
    match command {
        DeliveriesCommand::List(args) => list(&mut conn, args, out).await,
        DeliveriesCommand::Show { id } => show(&mut conn, id, out).await,
    }
}

async fn list(conn: &mut PgConnection, args: ListArgs, out: Output) -> anyhow::Result<()> {
    let deliveries: Vec<Delivery> = sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM control_plane.webhook_deliveries \
         WHERE ($1::uuid IS NULL OR webhook_id = $1) AND ($2::uuid IS NULL OR event_id = $2) \
           AND ($3::text IS NULL OR status = $3) AND ($4::text IS NULL OR project_id = $4) \
           AND ($5::timestamptz IS NULL OR created_at >= $5) \
           AND ($6::timestamptz IS NULL OR created_at < $6) \
         ORDER BY created_at DESC, id LIMIT $7"
    ))
    .bind(args.webhook)
    .bind(args.event)
    .bind(args.status.map(DeliveryStatus::as_str))
    .bind(&args.project)
    .bind(args.since.map(|s| s.0))
    .bind(args.until.map(|s| s.0))
    .bind(i64::from(args.limit))
    .fetch_all(conn)
    .await
    .context("listing deliveries")?;
    out.emit(&deliveries, || {
        let mut table = Table::new(&[
            "ID",
            "WEBHOOK",
            "EVENT",
            "EVENT TYPE",
            "STATUS",
            "ATTEMPTS",
            "HTTP",
            "ERROR",
            "CREATED",
        ]);
        for d in &deliveries {
            table.row(vec![
                d.id.to_string(),
                d.webhook_id.to_string(),
                d.event_id.to_string(),
                d.event_type.clone(),
                d.status.clone(),
                d.attempts.to_string(),
                or_dash(d.http_status_code),
                or_dash(d.error_type.as_deref()),
                time(Some(d.created_at)),
            ]);
        }
        table.print();
    })
}

async fn show(conn: &mut PgConnection, id: Uuid, out: Output) -> anyhow::Result<()> {
    let delivery: Delivery = sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM control_plane.webhook_deliveries WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await
    .context("reading the delivery")?
    .ok_or_else(|| anyhow!("no delivery with id {id}"))?;
    let attempts: Vec<Attempt> = sqlx::query_as(
        "SELECT attempt_number, started_at, duration_ms, http_status_code, succeeded, \
           error_type, error_message, response_body \
         FROM control_plane.webhook_delivery_attempts WHERE delivery_id = $1 \
         ORDER BY attempt_number",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await
    .context("reading the attempts")?;
    let value = serde_json::json!({ "delivery": delivery, "attempts": attempts });
    out.emit(&value, || {
        print!("{}", describe(&delivery));
        println!();
        attempts_table(&attempts).print();
    })
}

fn describe(d: &Delivery) -> String {
    fields(&[
        ("id", d.id.to_string()),
        ("webhook", d.webhook_id.to_string()),
        ("event", d.event_id.to_string()),
        ("project", d.project_id.clone()),
        ("event type", d.event_type.clone()),
        ("status", d.status.clone()),
        ("attempts", d.attempts.to_string()),
        ("last http status", or_dash(d.http_status_code)),
        ("last error", or_dash(d.error_type.as_deref())),
        ("error message", or_dash(d.error_message.as_deref())),
        ("next retry", time(d.next_retry_at)),
        ("delivered", time(d.delivered_at)),
        ("created", time(Some(d.created_at))),
        ("updated", time(Some(d.updated_at))),
    ])
}

fn attempts_table(attempts: &[Attempt]) -> Table {
    let mut table = Table::new(&[
        "#",
        "STARTED",
        "DURATION",
        "HTTP",
        "RESULT",
        "MESSAGE",
        "RESPONSE BODY",
    ]);
    for a in attempts {
        let result = match a.succeeded {
            true => "ok".to_string(),
            false => or_dash(a.error_type.as_deref()),
        };
        table.row(vec![
            a.attempt_number.to_string(),
            time(Some(a.started_at)),
            format!("{} ms", a.duration_ms),
            or_dash(a.http_status_code),
            result,
            excerpt(a.error_message.as_deref().unwrap_or("-"), 60),
            excerpt(a.response_body.as_deref().unwrap_or("-"), 60),
        ]);
    }
    table
}
