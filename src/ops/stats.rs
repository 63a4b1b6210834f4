//! `stats`: how each webhook and each project has fared over a window (the seed design's
//! `WebhookStatistics`): deliveries by status, success rate, attempts per delivery,
//! attempt durations, and the failure counter and disabled state. One query computes
//! both levels with `GROUPING SETS`, so the project figures are exact (percentiles of all
//! its attempts, not averages of its webhooks').

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Args;
use serde::Serialize;
use uuid::Uuid;

use super::table::Table;
use super::{Output, Since, or_dash, time};
use crate::config::Config;

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// The window's start (RFC 3339, or a duration ago).
    #[arg(long, default_value = "24h")]
    pub since: Since,
    /// Only this project.
    #[arg(long)]
    pub project: Option<String>,
}

/// The figures of one webhook (`webhook_id` set) or one project (`webhook_id` null).
/// Deliveries count those created in the window; attempts, those started in it.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Stats {
    pub project_id: String,
    pub webhook_id: Option<Uuid>,
    pub event_type: Option<String>,
    pub webhooks: i64,
    pub disabled_webhooks: i64,
    /// For a webhook its counter; for a project the highest of its webhooks'.
    pub consecutive_failures: i32,
    pub deliveries: i64,
    pub pending: i64,
    pub delivering: i64,
    pub delivered: i64,
    pub failed: i64,
    pub permanently_failed: i64,
    pub disabled: i64,
    /// delivered / (delivered + permanently_failed + disabled); null before any ended.
    pub success_rate: Option<f64>,
    pub attempts_per_delivery: Option<f64>,
    pub attempts: i64,
    pub p50_attempt_ms: Option<f64>,
    pub p95_attempt_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    since: DateTime<Utc>,
    webhooks: Vec<Stats>,
    projects: Vec<Stats>,
}

const QUERY: &str = "\
WITH w AS (
  SELECT project_id, id AS webhook_id, min(event_type) AS event_type,
    count(*) AS webhooks, count(*) FILTER (WHERE disabled) AS disabled_webhooks,
    max(consecutive_failures) AS consecutive_failures
  FROM control_plane.webhooks WHERE $2::text IS NULL OR project_id = $2
  GROUP BY GROUPING SETS ((project_id, id), (project_id))),
d AS (
  SELECT project_id, webhook_id, count(*) AS deliveries,
    count(*) FILTER (WHERE status = 'pending') AS pending,
    count(*) FILTER (WHERE status = 'delivering') AS delivering,
    count(*) FILTER (WHERE status = 'delivered') AS delivered,
    count(*) FILTER (WHERE status = 'failed') AS failed,
    count(*) FILTER (WHERE status = 'permanently_failed') AS permanently_failed,
    count(*) FILTER (WHERE status = 'disabled') AS disabled,
    avg(attempts)::float8 AS attempts_per_delivery
  FROM control_plane.webhook_deliveries
  WHERE created_at >= $1 AND ($2::text IS NULL OR project_id = $2)
  GROUP BY GROUPING SETS ((project_id, webhook_id), (project_id))),
a AS (
  SELECT h.project_id, a.webhook_id, count(*) AS attempts,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY a.duration_ms)::float8 AS p50_attempt_ms,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY a.duration_ms)::float8 AS p95_attempt_ms
  FROM control_plane.webhook_delivery_attempts a
  JOIN control_plane.webhooks h ON h.id = a.webhook_id
  WHERE a.started_at >= $1 AND ($2::text IS NULL OR h.project_id = $2)
  GROUP BY GROUPING SETS ((h.project_id, a.webhook_id), (h.project_id)))
SELECT w.project_id, w.webhook_id, CASE WHEN w.webhook_id IS NOT NULL THEN w.event_type END
    AS event_type,
  w.webhooks, w.disabled_webhooks, w.consecutive_failures,
  coalesce(d.deliveries, 0) AS deliveries, coalesce(d.pending, 0) AS pending,
  coalesce(d.delivering, 0) AS delivering, coalesce(d.delivered, 0) AS delivered,
  coalesce(d.failed, 0) AS failed, coalesce(d.permanently_failed, 0) AS permanently_failed,
  coalesce(d.disabled, 0) AS disabled,
  d.delivered::float8 / nullif(d.delivered + d.permanently_failed + d.disabled, 0)
    AS success_rate,
  d.attempts_per_delivery, coalesce(a.attempts, 0) AS attempts,
  a.p50_attempt_ms, a.p95_attempt_ms
FROM w
LEFT JOIN d ON d.project_id = w.project_id AND d.webhook_id IS NOT DISTINCT FROM w.webhook_id
LEFT JOIN a ON a.project_id = w.project_id AND a.webhook_id IS NOT DISTINCT FROM w.webhook_id
ORDER BY w.project_id, w.webhook_id NULLS FIRST";

pub async fn run(args: StatsArgs, config: &Config, out: Output) -> anyhow::Result<()> {
    let store = super::store(config).await?;
    let rows: Vec<Stats> = sqlx::query_as(QUERY)
        .bind(args.since.0)
        .bind(&args.project)
        .fetch_all(store.pool())
        .await
        .context("computing statistics")?;
    let (projects, webhooks) = rows.into_iter().partition(|s| s.webhook_id.is_none());
    let report = Report {
        since: args.since.0,
        webhooks,
        projects,
    };
    out.emit(&report, || {
        println!("since {} UTC\n", time(Some(report.since)));
        println!("per webhook:");
        render(&report.webhooks, "WEBHOOK").print();
        println!("\nper project:");
        render(&report.projects, "WEBHOOKS").print();
    })
}

fn render(rows: &[Stats], who: &'static str) -> Table {
    let mut table = Table::new(&[
        "PROJECT",
        who,
        "DELIVERIES",
        "DELIVERED",
        "FAILED",
        "PERM FAILED",
        "DISABLED",
        "IN PROGRESS",
        "SUCCESS",
        "ATTEMPTS/DELIVERY",
        "P50 MS",
        "P95 MS",
        "CONSEC FAILURES",
        "STATE",
    ]);
    for s in rows {
        let (name, state) = match s.webhook_id {
            Some(id) => (
                id.to_string(),
                if s.disabled_webhooks > 0 {
                    "disabled"
                } else {
                    "enabled"
                }
                .to_string(),
            ),
            None => (
                s.webhooks.to_string(),
                format!("{} disabled", s.disabled_webhooks),
            ),
        };
        table.row(vec![
            s.project_id.clone(),
            name,
            s.deliveries.to_string(),
            s.delivered.to_string(),
            s.failed.to_string(),
            s.permanently_failed.to_string(),
            s.disabled.to_string(),
            (s.pending + s.delivering).to_string(),
            or_dash(s.success_rate.map(|r| format!("{:.1}%", r * 100.0))),
            or_dash(s.attempts_per_delivery.map(|a| format!("{a:.2}"))),
            or_dash(s.p50_attempt_ms.map(|ms| format!("{ms:.0}"))),
            or_dash(s.p95_attempt_ms.map(|ms| format!("{ms:.0}"))),
            s.consecutive_failures.to_string(),
            state,
        ]);
    }
    table
}
