//! `webhooks …`: registering and managing webhooks without writing SQL. Every change goes
//! through the same checks a delivery applies to the row (so a webhook that `add` accepts
//! can be delivered to), and through the table's trigger (so disabling stops waiting
//! deliveries exactly as the worker's own disabling does).

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::{PgConnection, Postgres, Transaction};
use uuid::Uuid;

use super::table::{Table, fields};
use super::{Output, confirm, or_dash, time};
use crate::config::{Config, parse_duration};
use crate::webhook::{RESERVED_HEADERS, WebhookRow};
use crate::{destination, event};

#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// Register a webhook. Prints its new secret, once.
    Add(AddArgs),
    /// List webhooks.
    List(ListArgs),
    /// Show one webhook (never its secret).
    Show { id: Uuid },
    /// Change a webhook's URL, method, headers, project or event type.
    Update(UpdateArgs),
    /// Re-enable a webhook and clear its failure counter.
    Enable { id: Uuid },
    /// Disable a webhook: its waiting deliveries stop at once.
    Disable {
        id: Uuid,
        /// Why (shown in `show` and in the stopped deliveries' error message).
        #[arg(long, default_value = "by an operator")]
        reason: String,
    },
    /// Delete a webhook with its deliveries and attempts.
    Delete {
        id: Uuid,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Give a webhook a new secret; the old one keeps signing during the grace period.
    RotateSecret {
        id: Uuid,
        /// How long requests are also signed with the old secret (`0s`: not at all).
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        grace: Duration,
    },
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// The project whose events it receives.
    #[arg(long)]
    pub project: String,
    /// The event type it receives, or `*` for all of the project's events.
    #[arg(long, visible_alias = "type")]
    pub event_type: String,
    /// Where requests go (http or https).
    #[arg(long)]
    pub url: String,
    /// POST, PUT or PATCH.
    #[arg(long, default_value = "POST")]
    pub method: String,
    /// A header sent with every request, `Name: value` (repeatable).
    #[arg(long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// Use this secret (`whsec_…`) instead of generating one.
    #[arg(long, conflicts_with = "no_secret")]
    pub secret: Option<String>,
    /// Send requests unsigned.
    #[arg(long)]
    pub no_secret: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(long)]
    pub project: Option<String>,
    #[arg(long, visible_alias = "type")]
    pub event_type: Option<String>,
    /// Only disabled webhooks.
    #[arg(long, conflicts_with = "enabled")]
    pub disabled: bool,
    /// Only enabled webhooks.
    #[arg(long)]
    pub enabled: bool,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    pub id: Uuid,
    #[arg(long)]
    pub url: Option<String>,
    #[arg(long)]
    pub method: Option<String>,
    /// Replaces all headers with these, `Name: value` (repeatable).
    #[arg(
        long = "header",
        value_name = "NAME: VALUE",
        conflicts_with = "clear_headers"
    )]
    pub headers: Vec<String>,
    /// Removes all headers.
    #[arg(long)]
    pub clear_headers: bool,
    #[arg(long)]
    pub project: Option<String>,
    #[arg(long, visible_alias = "type")]
    pub event_type: Option<String>,
}

/// A webhook as the commands show it: everything but its secrets.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Webhook {
    pub id: Uuid,
    pub project_id: String,
    pub event_type: String,
    pub url: String,
    pub http_method: String,
    pub headers: Value,
    pub has_secret: bool,
    /// Until when requests are also signed with the previous secret.
    pub previous_secret_valid_until: Option<DateTime<Utc>>,
    pub disabled: bool,
    pub disabled_at: Option<DateTime<Utc>>,
    pub disabled_reason: Option<String>,
    pub consecutive_failures: i32,
    pub failing_since: Option<DateTime<Utc>>,
    pub last_delivery_at: Option<DateTime<Utc>>,
    pub last_failure_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The columns of a [`Webhook`].
macro_rules! columns {
    () => {
        "id, project_id, event_type, url, http_method, headers, \
         secret IS NOT NULL AS has_secret, \
         CASE WHEN previous_secret_expires_at > now() THEN previous_secret_expires_at END \
           AS previous_secret_valid_until, \
         disabled, disabled_at, disabled_reason, consecutive_failures, failing_since, \
         last_delivery_at, last_failure_at, created_at, updated_at"
    };
}

pub async fn run(command: WebhooksCommand, config: &Config, out: Output) -> anyhow::Result<()> {
    let store = super::store(config).await?;
    let mut conn = store
        .pool()
        .acquire()
        .await
        .context("connecting to Postgres")?;
    let conn = &mut *conn;
    match command {
        WebhooksCommand::Add(args) => add(conn, args, config, out).await,
        WebhooksCommand::List(args) => list(conn, args, out).await,
        WebhooksCommand::Show { id } => {
            let webhook = fetch(conn, id).await?;
            out.emit(&webhook, || print!("{}", describe(&webhook)))
        }
        WebhooksCommand::Update(args) => update(conn, args, config, out).await,
        WebhooksCommand::Enable { id } => enable(conn, id, out).await,
        WebhooksCommand::Disable { id, reason } => disable(conn, id, &reason, out).await,
        WebhooksCommand::Delete { id, yes } => delete(conn, id, yes, out).await,
        WebhooksCommand::RotateSecret { id, grace } => rotate_secret(conn, id, grace, out).await,
    }
}

/// What a new or changed webhook will be sent with.
struct Settings {
    project_id: String,
    event_type: String,
    url: String,
    http_method: String,
    headers: Value,
}

impl Settings {
    /// Refuses what a delivery would refuse (URL, method, headers, secret), reserved headers
    /// (which a delivery would silently drop), event types no event can have, and, unless
    /// `ALLOW_PRIVATE_IPS`, literal non-global addresses.
    fn validate(&self, secret: Option<&str>, config: &Config) -> anyhow::Result<()> {
        if self.project_id.is_empty() {
            bail!("--project must not be empty");
        }
        if self.event_type != "*" {
            event::validate_event_type(&self.event_type)
                .map_err(|e| anyhow!("--event-type: {e}"))?;
        }
        if let Some(name) = self.headers.as_object().and_then(|headers| {
            headers
                .keys()
                .find(|name| RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()))
        }) {
            bail!("header {name} is set by the worker; a webhook cannot override it");
        }
        let row = WebhookRow {
            id: Uuid::nil(),
            url: self.url.clone(),
            http_method: self.http_method.clone(),
            headers: self.headers.clone(),
            secret: secret.map(str::to_string),
            previous_secret: None,
            previous_secret_expires_at: None,
            disabled: false,
            disabled_changed_at: Utc::now(),
        };
        let target = row.target().map_err(|(_, message)| anyhow!("{message}"))?;
        if !config.allow_private_ips {
            destination::check_url(&target.url).map_err(|blocked| {
                anyhow!("url: {blocked} (set ALLOW_PRIVATE_IPS=true where the worker allows it)")
            })?;
        }
        Ok(())
    }
}

/// `Name: value` flags as the `headers` object.
fn parse_headers(flags: &[String]) -> anyhow::Result<Value> {
    let mut headers = Map::new();
    for flag in flags {
        let (name, value) = flag
            .split_once(':')
            .ok_or_else(|| anyhow!("--header {flag:?} is not `Name: value`"))?;
        headers.insert(
            name.trim().to_string(),
            Value::String(value.trim().to_string()),
        );
    }
    Ok(Value::Object(headers))
}

/// A new secret: `whsec_` and the base64 of 32 random bytes.
pub fn generate_secret() -> anyhow::Result<String> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| anyhow!("no randomness for a secret: {e}"))?;
    Ok(format!("whsec_{}", STANDARD.encode(key)))
}

async fn add(
    conn: &mut PgConnection,
    args: AddArgs,
    config: &Config,
    out: Output,
) -> anyhow::Result<()> {
    let settings = Settings {
        project_id: args.project,
        event_type: args.event_type,
        url: args.url,
        http_method: args.method.to_ascii_uppercase(),
        headers: parse_headers(&args.headers)?,
    };
    let secret = match (args.secret, args.no_secret) {
        (_, true) => None,
        (Some(secret), false) => Some(secret),
        (None, false) => Some(generate_secret()?),
    };
    settings.validate(secret.as_deref(), config)?;
    let id: Uuid = sqlx::query_scalar(
        "INSERT INTO control_plane.webhooks \
           (project_id, event_type, url, http_method, headers, secret) \
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
    )
    .bind(&settings.project_id)
    .bind(&settings.event_type)
    .bind(&settings.url)
    .bind(&settings.http_method)
    .bind(&settings.headers)
    .bind(&secret)
    .fetch_one(&mut *conn)
    .await
    .context("inserting the webhook")?;
    let webhook = fetch(conn, id).await?;
    let value = serde_json::json!({ "webhook": webhook, "secret": secret });
    out.emit(&value, || {
        print!("{}", describe(&webhook));
        match &secret {
            Some(secret) => println!(
                "\nsecret: {secret}\nStore it now: it is not shown again \
                 (`webhooks rotate-secret` makes a new one)."
            ),
            None => println!("\nno secret: requests are not signed"),
        }
    })
}

async fn list(conn: &mut PgConnection, args: ListArgs, out: Output) -> anyhow::Result<()> {
    let disabled = match (args.disabled, args.enabled) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    };
    let webhooks: Vec<Webhook> = sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM control_plane.webhooks \
         WHERE ($1::text IS NULL OR project_id = $1) AND ($2::text IS NULL OR event_type = $2) \
           AND ($3::bool IS NULL OR disabled = $3) \
         ORDER BY project_id, event_type, created_at"
    ))
    .bind(&args.project)
    .bind(&args.event_type)
    .bind(disabled)
    .fetch_all(conn)
    .await
    .context("listing webhooks")?;
    out.emit(&webhooks, || {
        let mut table = Table::new(&[
            "ID",
            "PROJECT",
            "EVENT TYPE",
            "METHOD",
            "URL",
            "STATE",
            "FAILURES",
            "LAST DELIVERY",
        ]);
        for w in &webhooks {
            table.row(vec![
                w.id.to_string(),
                w.project_id.clone(),
                w.event_type.clone(),
                w.http_method.clone(),
                w.url.clone(),
                state(w.disabled).into(),
                w.consecutive_failures.to_string(),
                time(w.last_delivery_at),
            ]);
        }
        table.print();
    })
}

fn state(disabled: bool) -> &'static str {
    if disabled { "disabled" } else { "enabled" }
}

/// Every field but the secret, as `name: value` lines.
fn describe(w: &Webhook) -> String {
    fields(&[
        ("id", w.id.to_string()),
        ("project", w.project_id.clone()),
        ("event type", w.event_type.clone()),
        ("url", w.url.clone()),
        ("method", w.http_method.clone()),
        ("headers", w.headers.to_string()),
        (
            "secret",
            match (w.has_secret, w.previous_secret_valid_until) {
                (false, _) => "none (requests are not signed)".into(),
                (true, None) => "set".into(),
                (true, Some(until)) => {
                    format!(
                        "set; the previous one also signs until {}",
                        time(Some(until))
                    )
                }
            },
        ),
        ("state", state(w.disabled).into()),
        ("disabled at", time(w.disabled_at)),
        ("disabled reason", or_dash(w.disabled_reason.as_deref())),
        ("consecutive failures", w.consecutive_failures.to_string()),
        ("failing since", time(w.failing_since)),
        ("last delivery", time(w.last_delivery_at)),
        ("last failure", time(w.last_failure_at)),
        ("created", time(Some(w.created_at))),
        ("updated", time(Some(w.updated_at))),
    ])
}

pub async fn fetch(conn: &mut PgConnection, id: Uuid) -> anyhow::Result<Webhook> {
    sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM control_plane.webhooks WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await
    .context("reading the webhook")?
    .ok_or_else(|| anyhow!("no webhook with id {id}"))
}

#[derive(sqlx::FromRow)]
struct Locked {
    #[sqlx(flatten)]
    webhook: Webhook,
    secret: Option<String>,
}

/// The webhook, locked until the transaction ends, with its current secret.
async fn lock(
    tx: &mut Transaction<'_, Postgres>,
    id: Uuid,
) -> anyhow::Result<(Webhook, Option<String>)> {
    let locked = sqlx::query_as::<_, Locked>(concat!(
        "SELECT ",
        columns!(),
        ", secret FROM control_plane.webhooks WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut **tx)
    .await
    .context("reading the webhook")?
    .ok_or_else(|| anyhow!("no webhook with id {id}"))?;
    Ok((locked.webhook, locked.secret))
}

async fn update(
    conn: &mut PgConnection,
    args: UpdateArgs,
    config: &Config,
    out: Output,
) -> anyhow::Result<()> {
    let headers_changed = args.clear_headers || !args.headers.is_empty();
    if args.url.is_none()
        && args.method.is_none()
        && args.project.is_none()
        && args.event_type.is_none()
        && !headers_changed
    {
        bail!(
            "nothing to update: give --url, --method, --header, --clear-headers, --project or --event-type"
        );
    }
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let (current, secret) = lock(&mut tx, args.id).await?;
    let settings = Settings {
        project_id: args.project.unwrap_or(current.project_id),
        event_type: args.event_type.unwrap_or(current.event_type),
        url: args.url.unwrap_or(current.url),
        http_method: args
            .method
            .map_or(current.http_method, |m| m.to_ascii_uppercase()),
        headers: match headers_changed {
            true => parse_headers(&args.headers)?,
            false => current.headers,
        },
    };
    settings.validate(secret.as_deref(), config)?;
    sqlx::query(
        "UPDATE control_plane.webhooks SET project_id = $2, event_type = $3, url = $4, \
           http_method = $5, headers = $6 WHERE id = $1",
    )
    .bind(args.id)
    .bind(&settings.project_id)
    .bind(&settings.event_type)
    .bind(&settings.url)
    .bind(&settings.http_method)
    .bind(&settings.headers)
    .execute(&mut *tx)
    .await
    .context("updating the webhook")?;
    tx.commit().await?;
    let webhook = fetch(conn, args.id).await?;
    out.emit(&webhook, || print!("{}", describe(&webhook)))
}

/// Enables the webhook and clears its counter. The trigger clears it when `disabled`
/// changes; setting it here too also clears the counter of a webhook that was not
/// disabled.
async fn enable(conn: &mut PgConnection, id: Uuid, out: Output) -> anyhow::Result<()> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let (before, _) = lock(&mut tx, id).await?;
    sqlx::query(
        "UPDATE control_plane.webhooks SET disabled = false, consecutive_failures = 0, \
           failing_since = NULL WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *tx)
    .await
    .context("enabling the webhook")?;
    let stopped: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM control_plane.webhook_deliveries \
         WHERE webhook_id = $1 AND status = 'disabled'",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    let value = serde_json::json!({
        "id": id, "was_disabled": before.disabled, "disabled_deliveries": stopped,
    });
    out.emit(&value, || {
        match before.disabled {
            true => println!("webhook {id} enabled; failure counter cleared"),
            false => println!("webhook {id} was enabled; failure counter cleared"),
        }
        if stopped > 0 {
            println!(
                "{stopped} deliveries stopped while it was disabled come back only by replay: \
                 webhook-worker replay --webhook {id} --since <time>"
            );
        }
    })
}

async fn disable(
    conn: &mut PgConnection,
    id: Uuid,
    reason: &str,
    out: Output,
) -> anyhow::Result<()> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let (before, _) = lock(&mut tx, id).await?;
    let stopped: i64 = match before.disabled {
        true => 0,
        false => {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM control_plane.webhook_deliveries \
                 WHERE webhook_id = $1 AND status IN ('pending', 'failed')",
            )
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
            // The trigger stops those deliveries in this transaction.
            sqlx::query(
                "UPDATE control_plane.webhooks SET disabled = true, disabled_at = now(), \
                   disabled_reason = $2 WHERE id = $1",
            )
            .bind(id)
            .bind(reason)
            .execute(&mut *tx)
            .await
            .context("disabling the webhook")?;
            waiting
        }
    };
    tx.commit().await?;
    let value = serde_json::json!({
        "id": id, "was_disabled": before.disabled, "stopped_deliveries": stopped,
    });
    out.emit(&value, || match before.disabled {
        true => println!("webhook {id} was already disabled"),
        false => println!("webhook {id} disabled; {stopped} waiting deliveries stopped"),
    })
}

async fn delete(conn: &mut PgConnection, id: Uuid, yes: bool, out: Output) -> anyhow::Result<()> {
    let webhook = fetch(conn, id).await?;
    let deliveries: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM control_plane.webhook_deliveries WHERE webhook_id = $1",
    )
    .bind(id)
    .fetch_one(&mut *conn)
    .await?;
    let question = format!(
        "Delete webhook {id} ({}) with its {deliveries} deliveries and their attempts?",
        webhook.url
    );
    if !confirm(&question, yes)? {
        bail!("not deleted");
    }
    sqlx::query("DELETE FROM control_plane.webhooks WHERE id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await
        .context("deleting the webhook")?;
    let value = serde_json::json!({ "id": id, "deleted_deliveries": deliveries });
    out.emit(&value, || {
        println!("webhook {id} deleted with {deliveries} deliveries")
    })
}

/// The old secret moves to `previous_secret` and keeps signing until the grace period
/// ends; a second rotation within the grace period drops the oldest secret.
async fn rotate_secret(
    conn: &mut PgConnection,
    id: Uuid,
    grace: Duration,
    out: Output,
) -> anyhow::Result<()> {
    let secret = generate_secret()?;
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let (_, old) = lock(&mut tx, id).await?;
    let keep_old = old.is_some() && !grace.is_zero();
    let until: Option<DateTime<Utc>> = sqlx::query_scalar(
        "UPDATE control_plane.webhooks SET \
           previous_secret = CASE WHEN $3 THEN secret END, \
           previous_secret_expires_at = CASE WHEN $3 THEN now() + make_interval(secs => $4) END, \
           secret = $2 \
         WHERE id = $1 RETURNING previous_secret_expires_at",
    )
    .bind(id)
    .bind(&secret)
    .bind(keep_old)
    .bind(grace.as_secs_f64())
    .fetch_one(&mut *tx)
    .await
    .context("storing the new secret")?;
    tx.commit().await?;
    let value = serde_json::json!({
        "id": id, "secret": secret, "previous_secret_valid_until": until,
    });
    out.emit(&value, || {
        println!("secret: {secret}");
        println!("Store it now: it is not shown again.");
        match until {
            Some(until) => println!(
                "Requests are signed with the new and the old secret until {} UTC, then with the new one only.",
                time(Some(until))
            ),
            None => println!("Requests are signed with the new secret only, from now on."),
        }
    })
}
