//! Everything the worker keeps in Postgres: events stored once, one delivery per webhook and
//! event, the claim that makes an attempt exclusive, and the transaction that records an
//! attempt together with the webhook's failure counter and disabled state (CONTRACT §2, §3).

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};
use sqlx::{FromRow, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::event::Event;
use crate::outcome::{AttemptResult, ErrorType, Outcome};
use crate::webhook::WebhookRow;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The `status` of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    Pending,
    Delivering,
    Delivered,
    Failed,
    PermanentlyFailed,
    Disabled,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivering => "delivering",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
            DeliveryStatus::PermanentlyFailed => "permanently_failed",
            DeliveryStatus::Disabled => "disabled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => DeliveryStatus::Pending,
            "delivering" => DeliveryStatus::Delivering,
            "delivered" => DeliveryStatus::Delivered,
            "failed" => DeliveryStatus::Failed,
            "permanently_failed" => DeliveryStatus::PermanentlyFailed,
            "disabled" => DeliveryStatus::Disabled,
            _ => return None,
        })
    }
}

/// What a delivery is sent from: the stored event.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredEvent {
    #[sqlx(rename = "event_id")]
    pub id: Uuid,
    pub project_id: String,
    pub event_type: String,
    pub occurred_at: DateTime<Utc>,
    /// When a worker first took the event from the queue.
    pub received_at: DateTime<Utc>,
    pub data: String,
}

/// A delivery claimed for attempt number `attempt`: nobody else makes that attempt.
#[derive(Debug, Clone)]
pub struct Job {
    pub delivery_id: Uuid,
    pub attempt: u32,
    /// Whether the delivery's row exists. A new event's deliveries are written with their
    /// first attempt's outcome (or when they park): one insert, not an insert and then an
    /// update over the table's seven indexes. Until then the event's message, not yet
    /// acknowledged, is what stands for them.
    pub written: bool,
    /// Attempts the delivery had when it was last replayed (0 if never): the retry
    /// schedule counts from there.
    pub attempts_before_replay: u32,
    /// Times this attempt was parked because its webhook was busy.
    pub parked: u32,
    pub webhook: WebhookRow,
    pub event: Arc<StoredEvent>,
}

/// A new event's deliveries: those to attempt now (not written yet, see [`Job::written`]),
/// and those to a stalled webhook, stored unclaimed, to park.
#[derive(Debug)]
pub struct FannedOut {
    pub jobs: Vec<Job>,
    pub parked: Vec<Parked>,
}

/// A delivery stored `pending` (its first attempt unclaimed) because its webhook is stalled.
#[derive(Debug, Clone, Copy)]
pub struct Parked {
    pub delivery_id: Uuid,
    pub webhook_id: Uuid,
}

impl Job {
    /// Its event, when the delivery's row is not written yet, for the write that creates it.
    pub fn unwritten(&self) -> Option<Arc<StoredEvent>> {
        (!self.written).then(|| self.event.clone())
    }

    /// Which attempt of the retry schedule this is (1-based): the attempt number, counted
    /// again from 1 after a replay.
    pub fn schedule_attempt(&self) -> u32 {
        self.attempt
            .saturating_sub(self.attempts_before_replay)
            .max(1)
    }
}

/// Why a retry message found no attempt to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoClaim {
    /// The delivery no longer exists (its webhook was deleted).
    Missing,
    /// The delivery is in another state: its attempt is recorded, or it is no longer `failed`.
    State {
        status: DeliveryStatus,
        attempts: u32,
        next_retry_at: Option<DateTime<Utc>>,
    },
}

impl NoClaim {
    /// The retry that recording attempt `attempt` scheduled, if the delivery is still
    /// waiting for it: `failed`, with that attempt the last one recorded.
    pub fn pending_retry(&self, delivery_id: Uuid, attempt: u32) -> Option<ScheduledRetry> {
        match *self {
            NoClaim::State {
                status: DeliveryStatus::Failed,
                attempts,
                next_retry_at,
            } if attempts == attempt => Some(ScheduledRetry {
                delivery_id,
                attempt: attempt + 1,
                next_retry_at,
            }),
            _ => None,
        }
    }

    /// Whether attempt `attempt` was the delivery's last and ended it (`permanently_failed`,
    /// or `disabled` with its webhook): what it caused may have operational events.
    pub fn ended_by(&self, attempt: u32) -> bool {
        matches!(*self, NoClaim::State {
            status: DeliveryStatus::PermanentlyFailed | DeliveryStatus::Disabled,
            attempts,
            ..
        } if attempts == attempt)
    }
}

/// A `failed` delivery whose next attempt must be (re)scheduled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledRetry {
    pub delivery_id: Uuid,
    pub attempt: u32,
    pub next_retry_at: Option<DateTime<Utc>>,
}

/// When a webhook is disabled (CONTRACT §3).
#[derive(Debug, Clone, Copy)]
pub struct DisablePolicy {
    pub after_failures: u32,
    pub after_failing_for: Duration,
}

/// The state a recorded attempt left its delivery in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Status {
        status: DeliveryStatus,
        /// When this attempt disabled the webhook: how many of its other deliveries it
        /// stopped (`pending` or `failed` ones, now `disabled`).
        stopped: Option<u64>,
    },
    /// Another process recorded this attempt first, or the delivery was deleted.
    Superseded,
}

impl Recorded {
    /// What recording a success did: delivered, or nothing (superseded).
    pub fn delivered(recorded: bool) -> Recorded {
        match recorded {
            true => Recorded::Status {
                status: DeliveryStatus::Delivered,
                stopped: None,
            },
            false => Recorded::Superseded,
        }
    }
}

/// What an attempt did that operators hear of, read back from Postgres after it was
/// recorded ([`Store::attempt_facts`]).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AttemptFacts {
    pub delivery_id: Uuid,
    pub attempt: i32,
    pub event_id: Uuid,
    pub webhook_id: Uuid,
    /// The webhook's project.
    pub project_id: String,
    /// The event type the webhook subscribes to (maybe `*`).
    pub webhook_event_type: String,
    /// The delivered event's type.
    pub event_type: String,
    pub url: String,
    pub http_status_code: Option<i32>,
    pub error_type: Option<String>,
    /// When this attempt made the delivery `permanently_failed`, if it is still so.
    pub exhausted_at: Option<DateTime<Utc>>,
    /// When this attempt disabled the webhook, if that disable still stands.
    pub disabled_at: Option<DateTime<Utc>>,
    /// The webhook's counter (frozen while it is disabled).
    pub consecutive_failures: i32,
    /// The webhook's other deliveries the disable stopped.
    pub deliveries_stopped: i64,
}

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

/// The columns of a [`WebhookRow`] from `control_plane.webhooks w`.
macro_rules! webhook_columns {
    () => {
        "w.id AS webhook_id, w.url, w.http_method, w.headers, w.secret, w.previous_secret, \
         w.previous_secret_expires_at, w.disabled, w.disabled_changed_at"
    };
}

/// The columns of a [`StoredEvent`] from `control_plane.events e`.
macro_rules! event_columns {
    () => {
        "e.id AS event_id, e.project_id, e.event_type, e.occurred_at, e.received_at, \
         e.data::text AS data"
    };
}

/// Whether webhook `w` has no delivery of event `e` yet.
macro_rules! unwritten {
    () => {
        "NOT EXISTS (SELECT 1 FROM control_plane.webhook_deliveries d \
           WHERE d.webhook_id = w.id AND d.event_id = e.id)"
    };
}

/// Whether webhook `w` matches event `e` (CONTRACT §2).
macro_rules! webhook_matches {
    () => {
        "w.project_id = e.project_id AND NOT w.disabled \
         AND (w.event_type = e.event_type OR w.event_type = '*')"
    };
}

impl Store {
    /// A pool that connects lazily, so the process starts (not ready) while Postgres is down.
    pub fn connect_lazy(url: &str, max_connections: u32) -> Result<Store, sqlx::Error> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(connect_options(url)?);
        Ok(Store { pool })
    }

    /// Applies the embedded migrations; safe from several processes at once (sqlx holds an
    /// advisory lock while migrating).
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        MIGRATOR.run(&self.pool).await
    }

    /// Fails unless every embedded migration is applied: a worker never consumes against a
    /// schema it does not know.
    pub async fn check_migrated(&self) -> Result<(), String> {
        let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
        let applied: Result<Option<i64>, sqlx::Error> =
            sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await;
        match applied {
            Ok(Some(v)) if v >= latest => Ok(()),
            Ok(_) => Err("the database is not migrated; run `webhook-worker migrate`".into()),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => {
                Err("the database is not migrated; run `webhook-worker migrate`".into())
            }
            Err(e) => Err(format!("Postgres unreachable: {e}")),
        }
    }

    /// The pool, for the operator commands' own queries.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    /// Stores new events and fans each out to its matching webhooks, in one statement (so
    /// one round trip and one transaction for the whole batch). A delivery gets its id
    /// here and its row with its first attempt's outcome ([`Job::written`]), except to a
    /// webhook in `park`: that one is stored `pending` now, unclaimed, to be parked at
    /// once. For each event in order: its fan-out, or `None` when its id was already
    /// stored (nothing is written for it). The ids must be distinct ([`crate::batch`]
    /// sees to it).
    pub async fn store_events(
        &self,
        events: &[Arc<Event>],
        park: &[Uuid],
    ) -> Result<Vec<Option<FannedOut>>, sqlx::Error> {
        let received_at = Utc::now().trunc_subsecs(6);
        let column = |f: fn(&Event) -> Option<&str>| -> Vec<Option<&str>> {
            events.iter().map(|e| f(e)).collect()
        };
        let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
        let occurred: Vec<DateTime<Utc>> = events.iter().map(|e| e.occurred_at).collect();
        // Every stored event comes back at least once (with no delivery when no webhook
        // matches), so a missing id is one that was stored before.
        let rows = sqlx::query(concat!(
            "WITH e AS ( \
               INSERT INTO control_plane.events \
                 (id, project_id, event_type, data, occurred_at, traceparent, tracestate, \
                  received_at) \
               SELECT id, project_id, event_type, data::json, occurred_at, traceparent, \
                 tracestate, $8 \
               FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], \
                 $5::timestamptz[], $6::text[], $7::text[]) \
                 AS i(id, project_id, event_type, data, occurred_at, traceparent, tracestate) \
               ON CONFLICT (id) DO NOTHING \
               RETURNING id, project_id, event_type), \
             m AS ( \
               SELECT gen_random_uuid() AS delivery_id, w.id AS webhook_id, e.id AS event_id, \
                 e.project_id, e.event_type, w.id = ANY($9::uuid[]) AS parked \
               FROM e JOIN control_plane.webhooks w ON ",
            webhook_matches!(),
            "), \
             ins AS ( \
               INSERT INTO control_plane.webhook_deliveries \
                 (id, webhook_id, event_id, project_id, event_type, status, created_at) \
               SELECT delivery_id, webhook_id, event_id, project_id, event_type, 'pending', $8 \
               FROM m WHERE parked) \
             SELECT e.id AS event_id, m.delivery_id, m.parked, ",
            webhook_columns!(),
            " FROM e LEFT JOIN m ON m.event_id = e.id \
             LEFT JOIN control_plane.webhooks w ON w.id = m.webhook_id"
        ))
        .bind(&ids)
        .bind(column(|e| Some(&e.project_id)))
        .bind(column(|e| Some(&e.event_type)))
        .bind(column(|e| Some(e.data.get())))
        .bind(&occurred)
        .bind(column(|e| e.trace.traceparent.as_deref()))
        .bind(column(|e| e.trace.tracestate.as_deref()))
        .bind(received_at)
        .bind(park)
        .fetch_all(&self.pool)
        .await?;
        let mut stored: HashMap<Uuid, (ToSend, Vec<Parked>)> = HashMap::new();
        for row in rows {
            let (to_send, parked) = stored.entry(row.try_get("event_id")?).or_default();
            let Some(delivery_id) = row.try_get::<Option<Uuid>, _>("delivery_id")? else {
                continue;
            };
            if row.try_get("parked")? {
                let webhook_id = row.try_get("webhook_id")?;
                parked.push(Parked {
                    delivery_id,
                    webhook_id,
                });
            } else {
                to_send.push((delivery_id, WebhookRow::from_row(&row)?));
            }
        }
        Ok(events
            .iter()
            .map(|event| {
                let (to_send, parked) = stored.remove(&event.id)?;
                let stored = Arc::new(StoredEvent {
                    id: event.id,
                    project_id: event.project_id.clone(),
                    event_type: event.event_type.clone(),
                    occurred_at: event.occurred_at,
                    received_at,
                    data: event.data.get().to_string(),
                });
                Some(FannedOut {
                    jobs: jobs(to_send, false, stored),
                    parked,
                })
            })
            .collect())
    }

    /// For an event message the broker delivers again (its first processing did not finish):
    /// claims the deliveries whose first attempt was never recorded, fans out again to the
    /// matching webhooks that have no delivery yet (their first attempt's outcome was never
    /// written), and lists the deliveries whose first attempt failed, so that their retry
    /// can be scheduled again.
    pub async fn resume_event(
        &self,
        event_id: Uuid,
    ) -> Result<(Vec<Job>, Vec<ScheduledRetry>), sqlx::Error> {
        let (written, unwritten): (Vec<DeliveryWebhook>, Vec<DeliveryWebhook>) =
            sqlx::query_as::<_, DeliveryWebhook>(concat!(
                "WITH claimed AS ( \
                   UPDATE control_plane.webhook_deliveries \
                   SET status = 'delivering', updated_at = now() \
                   WHERE event_id = $1 AND attempts = 0 AND status IN ('pending', 'delivering') \
                   RETURNING id, webhook_id) \
                 SELECT claimed.id AS delivery_id, true AS written, ",
                webhook_columns!(),
                " FROM claimed JOIN control_plane.webhooks w ON w.id = claimed.webhook_id \
                 UNION ALL \
                 SELECT gen_random_uuid(), false, ",
                webhook_columns!(),
                " FROM control_plane.events e JOIN control_plane.webhooks w ON ",
                webhook_matches!(),
                " WHERE e.id = $1 AND ",
                unwritten!()
            ))
            .bind(event_id)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .partition(|r| r.written);
        let retries = sqlx::query_as::<_, (Uuid, Option<DateTime<Utc>>)>(
            "SELECT id, next_retry_at FROM control_plane.webhook_deliveries \
             WHERE event_id = $1 AND attempts = 1 AND status = 'failed'",
        )
        .bind(event_id)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|(delivery_id, next_retry_at)| ScheduledRetry {
            delivery_id,
            attempt: 2,
            next_retry_at,
        })
        .collect();
        if written.is_empty() && unwritten.is_empty() {
            return Ok((Vec::new(), retries));
        }
        let event = sqlx::query_as::<_, StoredEvent>(concat!(
            "SELECT ",
            event_columns!(),
            " FROM control_plane.events e WHERE e.id = $1"
        ))
        .bind(event_id)
        .fetch_one(&self.pool)
        .await?;
        let event = Arc::new(event);
        let pairs = |rows: Vec<DeliveryWebhook>| -> ToSend {
            rows.into_iter()
                .map(|r| (r.delivery_id, r.webhook))
                .collect()
        };
        let mut to_send = jobs(pairs(written), true, event.clone());
        to_send.extend(jobs(pairs(unwritten), false, event));
        Ok((to_send, retries))
    }

    /// How many of an event's deliveries may have their first attempt under way: those
    /// `delivering` it, and those to a matching webhook not written yet.
    pub async fn first_attempts_in_progress(&self, event_id: Uuid) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(concat!(
            "SELECT (SELECT count(*) FROM control_plane.webhook_deliveries \
               WHERE event_id = $1 AND attempts = 0 AND status = 'delivering') \
             + (SELECT count(*) FROM control_plane.events e \
                JOIN control_plane.webhooks w ON ",
            webhook_matches!(),
            " WHERE e.id = $1 AND ",
            unwritten!(),
            ")"
        ))
        .bind(event_id)
        .fetch_one(&self.pool)
        .await
    }

    /// Claims attempt `attempt` of a delivery: it must be `pending` or `failed` with
    /// `attempt - 1` attempts recorded. With `take_over`, a `delivering` one too: the
    /// process making that attempt died (or lost its connection and had its grace).
    pub async fn claim(
        &self,
        delivery_id: Uuid,
        attempt: u32,
        take_over: bool,
    ) -> Result<Result<Job, NoClaim>, sqlx::Error> {
        let row = sqlx::query_as::<_, ClaimRow>(concat!(
            "WITH claimed AS ( \
               UPDATE control_plane.webhook_deliveries SET status = 'delivering', updated_at = now() \
               WHERE id = $1 AND attempts = $2 - 1 \
                 AND (status IN ('pending', 'failed') OR (status = 'delivering' AND $3)) \
               RETURNING id, webhook_id, event_id, attempts_before_replay) \
             SELECT claimed.attempts_before_replay, ",
            webhook_columns!(),
            ", ",
            event_columns!(),
            " FROM claimed \
             JOIN control_plane.webhooks w ON w.id = claimed.webhook_id \
             JOIN control_plane.events e ON e.id = claimed.event_id"
        ))
        .bind(delivery_id)
        .bind(attempt as i32)
        .bind(take_over)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = row {
            return Ok(Ok(Job {
                delivery_id,
                attempt,
                written: true,
                attempts_before_replay: row.attempts_before_replay.max(0) as u32,
                parked: 0,
                webhook: row.webhook,
                event: Arc::new(row.event),
            }));
        }
        Ok(Err(self.state(delivery_id).await?))
    }

    /// Gives back claims that made no request (their webhook was busy), for the parked
    /// message to claim: a written delivery is `pending` or `failed` again, as before the
    /// claim; an unwritten one is stored `pending`. For each in order: false when the
    /// delivery moved on meanwhile (or its webhook is gone).
    pub async fn unclaim(&self, claims: &[Unclaim]) -> Result<Vec<bool>, sqlx::Error> {
        let new = NewRows::of(claims.iter().map(|c| c.unwritten.as_deref()));
        let released: Result<HashSet<Uuid>, sqlx::Error> = sqlx::query_scalar(
            "WITH c AS ( \
               SELECT * FROM unnest($1::uuid[], $2::int4[], $3::uuid[], $4::uuid[], \
                 $5::text[], $6::text[], $7::timestamptz[]) \
                 AS c(id, attempt, webhook_id, event_id, project_id, event_type, created_at)), \
             ins AS ( \
               INSERT INTO control_plane.webhook_deliveries \
                 (id, webhook_id, event_id, project_id, event_type, status, created_at) \
               SELECT id, webhook_id, event_id, project_id, event_type, 'pending', created_at \
               FROM c WHERE event_id IS NOT NULL \
               ON CONFLICT DO NOTHING RETURNING id), \
             upd AS ( \
               UPDATE control_plane.webhook_deliveries d \
               SET status = CASE WHEN d.attempts = 0 THEN 'pending' ELSE 'failed' END, \
                 updated_at = now() \
               FROM c WHERE c.event_id IS NULL AND d.id = c.id AND d.status = 'delivering' \
                 AND d.attempts = c.attempt - 1 \
               RETURNING d.id) \
             SELECT id FROM ins UNION ALL SELECT id FROM upd",
        )
        .bind(claims.iter().map(|c| c.delivery_id).collect::<Vec<_>>())
        .bind(claims.iter().map(|c| c.attempt as i32).collect::<Vec<_>>())
        .bind(claims.iter().map(|c| c.webhook_id).collect::<Vec<_>>())
        .bind(new.event_id)
        .bind(new.project_id)
        .bind(new.event_type)
        .bind(new.created_at)
        .fetch_all(&self.pool)
        .await
        .map(|ids| ids.into_iter().collect());
        let released = alone_superseded(released, claims.len())?;
        Ok(claims
            .iter()
            .map(|c| released.contains(&c.delivery_id))
            .collect())
    }

    /// Where a delivery stands, for a message that could not claim it.
    pub async fn state(&self, delivery_id: Uuid) -> Result<NoClaim, sqlx::Error> {
        let state = sqlx::query_as::<_, (String, i32, Option<DateTime<Utc>>)>(
            "SELECT status, attempts, next_retry_at FROM control_plane.webhook_deliveries \
             WHERE id = $1",
        )
        .bind(delivery_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match state {
            None => NoClaim::Missing,
            Some((status, attempts, next_retry_at)) => NoClaim::State {
                status: DeliveryStatus::parse(&status).unwrap_or(DeliveryStatus::Delivering),
                attempts: attempts.max(0) as u32,
                next_retry_at,
            },
        })
    }

    /// Stops a claimed delivery whose webhook turned out to be disabled, without an attempt
    /// (an unwritten one is written stopped).
    pub async fn stop_disabled(&self, job: &Job) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        if !job.written && !write_delivery(&mut tx, job).await? {
            return Ok(());
        }
        sqlx::query(
            "UPDATE control_plane.webhook_deliveries d SET status = 'disabled', \
               next_retry_at = NULL, error_type = 'WEBHOOK_DISABLED', \
               error_message = 'webhook disabled: ' || coalesce(w.disabled_reason, 'by an operator'), \
               updated_at = now() \
             FROM control_plane.webhooks w \
             WHERE d.id = $1 AND w.id = d.webhook_id AND d.status = 'delivering'",
        )
        .bind(job.delivery_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// What recording attempt `attempt` of a delivery did that operators are told about
    /// ([`crate::notify`]); `None` when that attempt is not recorded (or was deleted).
    pub async fn attempt_facts(
        &self,
        delivery_id: Uuid,
        attempt: u32,
    ) -> Result<Option<AttemptFacts>, sqlx::Error> {
        // The disabling transaction set the attempt's `disabled_webhook_at`, the webhook's
        // `disabled_at` and the `updated_at` of the deliveries its trigger stopped to the
        // same now(); the delivery it ended keeps its `attempts` and `updated_at` until a
        // replay. So this reads the same on every call until an operator acts.
        sqlx::query_as::<_, AttemptFacts>(
            "SELECT a.delivery_id, a.attempt_number AS attempt, d.event_id, a.webhook_id, \
               w.project_id, w.event_type AS webhook_event_type, d.event_type, w.url, \
               a.http_status_code, a.error_type, \
               CASE WHEN d.status = 'permanently_failed' AND d.attempts = a.attempt_number \
                 THEN d.updated_at END AS exhausted_at, \
               CASE WHEN w.disabled AND w.disabled_at = a.disabled_webhook_at \
                 THEN a.disabled_webhook_at END AS disabled_at, \
               w.consecutive_failures, \
               (SELECT count(*) FROM control_plane.webhook_deliveries s \
                WHERE s.webhook_id = a.webhook_id AND s.status = 'disabled' \
                  AND s.updated_at = a.disabled_webhook_at AND s.id <> a.delivery_id) \
                 AS deliveries_stopped \
             FROM control_plane.webhook_delivery_attempts a \
             JOIN control_plane.webhook_deliveries d ON d.id = a.delivery_id \
             JOIN control_plane.webhooks w ON w.id = a.webhook_id \
             WHERE a.delivery_id = $1 AND a.attempt_number = $2",
        )
        .bind(delivery_id)
        .bind(attempt as i32)
        .fetch_optional(&self.pool)
        .await
    }

    /// The deliveries of an event that its first attempt ended (`permanently_failed`, or
    /// `disabled` with its webhook): for an event message handled again, whose first
    /// processing may have died before publishing what those attempts caused.
    pub async fn ended_by_first_attempt(&self, event_id: Uuid) -> Result<Vec<Uuid>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT id FROM control_plane.webhook_deliveries WHERE event_id = $1 \
               AND attempts = 1 AND status IN ('permanently_failed', 'disabled')",
        )
        .bind(event_id)
        .fetch_all(&self.pool)
        .await
    }

    /// Reads the webhook row again, for an attempt that waited for capacity: every attempt
    /// uses the row as it was at most 2 seconds before it started.
    pub async fn webhook(&self, id: Uuid) -> Result<Option<WebhookRow>, sqlx::Error> {
        sqlx::query_as::<_, WebhookRow>(concat!(
            "SELECT ",
            webhook_columns!(),
            " FROM control_plane.webhooks w WHERE w.id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
    }

    /// Records an attempt: its row, the webhook's counter (and disabled state), and the
    /// delivery's new state, in one transaction. A success is handed to
    /// [`Store::record_successes`] (the worker batches those itself).
    pub async fn record(
        &self,
        job: &Job,
        started_at: DateTime<Utc>,
        result: &AttemptResult,
        outcome: Outcome,
        policy: DisablePolicy,
    ) -> Result<Recorded, sqlx::Error> {
        if outcome == Outcome::Delivered {
            let success = Success::new(job, started_at, result);
            let recorded = self.record_successes(&[success]).await?;
            return Ok(Recorded::delivered(recorded[0]));
        }
        let duration_ms = duration_ms(result);
        let mut tx = self.pool.begin().await?;
        if !job.written && !write_delivery(&mut tx, job).await? {
            return Ok(Recorded::Superseded);
        }
        let inserted = sqlx::query(
            "INSERT INTO control_plane.webhook_delivery_attempts \
               (delivery_id, webhook_id, attempt_number, started_at, duration_ms, \
                http_status_code, response_body, error_type, error_message, succeeded) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (delivery_id, attempt_number) DO NOTHING",
        )
        .bind(job.delivery_id)
        .bind(job.webhook.id)
        .bind(job.attempt as i32)
        .bind(started_at)
        .bind(duration_ms)
        .bind(result.status.map(i32::from))
        .bind(result.body.as_deref())
        .bind(result.error_type().map(ErrorType::as_str))
        .bind(result.error_message())
        .bind(result.succeeded())
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(r) if r.rows_affected() == 1 => {}
            Ok(_) => return Ok(Recorded::Superseded),
            // The delivery was deleted with its webhook meanwhile.
            Err(sqlx::Error::Database(e)) if e.is_foreign_key_violation() => {
                return Ok(Recorded::Superseded);
            }
            Err(e) => return Err(e),
        }

        let stopped = update_webhook(&mut tx, job, result, outcome, policy).await?;

        let (status, next_retry_at) = match outcome {
            Outcome::Delivered => (DeliveryStatus::Delivered, None),
            Outcome::Retry { after } => (
                DeliveryStatus::Failed,
                Some(Utc::now() + chrono::Duration::from_std(after).unwrap_or_default()),
            ),
            Outcome::GiveUp | Outcome::Gone => (DeliveryStatus::PermanentlyFailed, None),
        };
        // A retry of a webhook disabled meanwhile (here or by another process) stops here,
        // like the webhook's other waiting deliveries.
        let (final_status,): (String,) = sqlx::query_as(
            "UPDATE control_plane.webhook_deliveries d SET \
               status = CASE WHEN stopped THEN 'disabled' ELSE $2 END, \
               attempts = $3, http_status_code = $4, response_body = $5, \
               error_type = CASE WHEN stopped THEN 'WEBHOOK_DISABLED' ELSE $6 END, \
               error_message = CASE WHEN stopped \
                 THEN 'webhook disabled: ' || coalesce(w.disabled_reason, 'by an operator') \
                 ELSE $7 END, \
               duration_ms = $8, \
               next_retry_at = CASE WHEN $2 = 'failed' AND NOT stopped THEN $9 END, \
               updated_at = now() \
             FROM (SELECT id, disabled_reason, $2 = 'failed' AND disabled AS stopped \
                   FROM control_plane.webhooks) w \
             WHERE d.id = $1 AND w.id = d.webhook_id RETURNING d.status",
        )
        .bind(job.delivery_id)
        .bind(status.as_str())
        .bind(job.attempt as i32)
        .bind(result.status.map(i32::from))
        .bind(result.body.as_deref())
        .bind(result.error_type().map(ErrorType::as_str))
        .bind(result.error_message())
        .bind(duration_ms)
        .bind(next_retry_at)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Recorded::Status {
            status: DeliveryStatus::parse(&final_status).unwrap_or(status),
            stopped,
        })
    }

    /// Records successful attempts, many in one statement (one round trip and one
    /// transaction): each attempt's row, its delivery `delivered` (inserted so if not
    /// written yet), and its webhook's counter reset. A delivery not written yet is
    /// inserted without `ON CONFLICT`, which would probe its unique indexes first: if
    /// another process wrote it meanwhile, the batch fails, and run alone it is simply
    /// not recorded ([`alone_superseded`]). The reset is skipped when there is
    /// nothing to reset but `last_delivery_at` within the last second: otherwise every
    /// delivery to a busy webhook would queue on its row lock. Webhooks are locked in id
    /// order and `FOR NO KEY UPDATE`, which leaves alone the key-share locks that inserting
    /// a delivery takes on its webhook, so batches never deadlock on them. The webhook
    /// changes only where the attempt row is new. For each success in order: whether it
    /// was recorded here (false: recorded before, or its delivery is gone, or another
    /// process wrote the delivery first). A success never disables anything.
    pub async fn record_successes(&self, done: &[Success]) -> Result<Vec<bool>, sqlx::Error> {
        let column =
            |f: fn(&Success) -> Option<i32>| -> Vec<Option<i32>> { done.iter().map(f).collect() };
        let new = NewRows::of(done.iter().map(|s| s.unwritten.as_deref()));
        let recorded: Result<Vec<(Uuid, i32)>, sqlx::Error> = sqlx::query_as(
            "WITH i AS ( \
               SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::int4[], $4::timestamptz[], \
                 $5::int4[], $6::int4[], $7::text[], $8::timestamptz[], $9::uuid[], \
                 $10::text[], $11::text[], $12::timestamptz[]) \
                 AS i(delivery_id, webhook_id, attempt, started_at, duration_ms, status, body, \
                   disabled_changed_at, event_id, project_id, event_type, created_at)), \
             ins AS ( \
               INSERT INTO control_plane.webhook_deliveries \
                 (id, webhook_id, event_id, project_id, event_type, status, attempts, \
                  http_status_code, response_body, duration_ms, delivered_at, created_at) \
               SELECT delivery_id, webhook_id, event_id, project_id, event_type, 'delivered', \
                 attempt, status, body, duration_ms, now(), created_at \
               FROM i WHERE event_id IS NOT NULL), \
             a_new AS ( \
               INSERT INTO control_plane.webhook_delivery_attempts \
                 (delivery_id, webhook_id, attempt_number, started_at, duration_ms, \
                  http_status_code, response_body, succeeded) \
               SELECT delivery_id, webhook_id, attempt, started_at, duration_ms, status, body, \
                 true FROM i WHERE event_id IS NOT NULL \
               RETURNING delivery_id, attempt_number), \
             a_old AS ( \
               INSERT INTO control_plane.webhook_delivery_attempts \
                 (delivery_id, webhook_id, attempt_number, started_at, duration_ms, \
                  http_status_code, response_body, succeeded) \
               SELECT delivery_id, webhook_id, attempt, started_at, duration_ms, status, body, \
                 true FROM i WHERE event_id IS NULL \
               ON CONFLICT (delivery_id, attempt_number) DO NOTHING \
               RETURNING delivery_id, attempt_number), \
             a AS (SELECT * FROM a_new UNION ALL SELECT * FROM a_old), \
             new AS ( \
               SELECT i.* FROM i JOIN a \
                 ON a.delivery_id = i.delivery_id AND a.attempt_number = i.attempt), \
             locked AS ( \
               SELECT w.id FROM control_plane.webhooks w \
               WHERE EXISTS (SELECT 1 FROM new WHERE new.webhook_id = w.id \
                   AND new.disabled_changed_at = w.disabled_changed_at) \
                 AND NOT w.disabled \
                 AND NOT (w.consecutive_failures = 0 AND w.failing_since IS NULL \
                   AND coalesce(w.last_delivery_at > now() - interval '1 second', false)) \
               ORDER BY w.id FOR NO KEY UPDATE), \
             w AS ( \
               UPDATE control_plane.webhooks SET consecutive_failures = 0, \
                 failing_since = NULL, last_delivery_at = now() \
               WHERE id IN (SELECT id FROM locked)), \
             d AS ( \
               UPDATE control_plane.webhook_deliveries d SET status = 'delivered', \
                 attempts = new.attempt, http_status_code = new.status, \
                 response_body = new.body, error_type = NULL, error_message = NULL, \
                 duration_ms = new.duration_ms, next_retry_at = NULL, delivered_at = now(), \
                 updated_at = now() \
               FROM new WHERE d.id = new.delivery_id AND new.event_id IS NULL) \
             SELECT delivery_id, attempt_number FROM a",
        )
        .bind(done.iter().map(|s| s.delivery_id).collect::<Vec<_>>())
        .bind(done.iter().map(|s| s.webhook_id).collect::<Vec<_>>())
        .bind(column(|s| Some(s.attempt as i32)))
        .bind(done.iter().map(|s| s.started_at).collect::<Vec<_>>())
        .bind(column(|s| Some(s.duration_ms)))
        .bind(column(|s| s.http_status))
        .bind(done.iter().map(|s| s.body.as_deref()).collect::<Vec<_>>())
        .bind(
            done.iter()
                .map(|s| s.disabled_changed_at)
                .collect::<Vec<_>>(),
        )
        .bind(new.event_id)
        .bind(new.project_id)
        .bind(new.event_type)
        .bind(new.created_at)
        .fetch_all(&self.pool)
        .await;
        let recorded: HashSet<(Uuid, i32)> = alone_superseded(recorded, done.len())?
            .into_iter()
            .collect();
        Ok(done
            .iter()
            .map(|s| recorded.contains(&(s.delivery_id, s.attempt as i32)))
            .collect())
    }
}

/// A claim given back without a request, as [`Store::unclaim`] writes it.
#[derive(Debug, Clone)]
pub struct Unclaim {
    pub delivery_id: Uuid,
    pub attempt: u32,
    pub webhook_id: Uuid,
    /// The event of a delivery not written yet ([`Job::written`]), to store it from.
    pub unwritten: Option<Arc<StoredEvent>>,
}

impl Unclaim {
    pub fn new(job: &Job) -> Unclaim {
        Unclaim {
            delivery_id: job.delivery_id,
            attempt: job.attempt,
            webhook_id: job.webhook.id,
            unwritten: job.unwritten(),
        }
    }
}

/// A successful attempt, as [`Store::record_successes`] writes it.
#[derive(Debug, Clone)]
pub struct Success {
    /// The event of a delivery not written yet ([`Job::written`]), to store it from.
    pub unwritten: Option<Arc<StoredEvent>>,
    pub delivery_id: Uuid,
    pub webhook_id: Uuid,
    pub attempt: u32,
    pub started_at: DateTime<Utc>,
    pub duration_ms: i32,
    pub http_status: Option<i32>,
    pub body: Option<String>,
    /// The webhook state the attempt used: its counter is reset only if that still holds.
    pub disabled_changed_at: DateTime<Utc>,
}

impl Success {
    pub fn new(job: &Job, started_at: DateTime<Utc>, result: &AttemptResult) -> Success {
        Success {
            unwritten: job.unwritten(),
            delivery_id: job.delivery_id,
            webhook_id: job.webhook.id,
            attempt: job.attempt,
            started_at,
            duration_ms: duration_ms(result),
            http_status: result.status.map(i32::from),
            body: result.body.clone(),
            disabled_changed_at: job.webhook.disabled_changed_at,
        }
    }
}

fn duration_ms(result: &AttemptResult) -> i32 {
    i32::try_from(result.duration.as_millis()).unwrap_or(i32::MAX)
}

/// The columns a batch binds to insert the rows of deliveries not written yet, one entry per
/// request (`None` where the delivery is written): its event, project, event type, and
/// `created_at`, when the event was stored.
struct NewRows<'a> {
    event_id: Vec<Option<Uuid>>,
    project_id: Vec<Option<&'a str>>,
    event_type: Vec<Option<&'a str>>,
    created_at: Vec<Option<DateTime<Utc>>>,
}

impl<'a> NewRows<'a> {
    fn of(events: impl Iterator<Item = Option<&'a StoredEvent>>) -> NewRows<'a> {
        let mut rows = NewRows {
            event_id: Vec::new(),
            project_id: Vec::new(),
            event_type: Vec::new(),
            created_at: Vec::new(),
        };
        for event in events {
            rows.event_id.push(event.map(|e| e.id));
            rows.project_id.push(event.map(|e| e.project_id.as_str()));
            rows.event_type.push(event.map(|e| e.event_type.as_str()));
            rows.created_at.push(event.map(|e| e.received_at));
        }
        rows
    }
}

/// Stores the row of a delivery not written yet, `delivering` its first attempt, for what
/// became of that attempt to update in the same transaction. False when it exists already
/// (another process took the event over) or its webhook or event is gone.
async fn write_delivery(
    tx: &mut Transaction<'_, Postgres>,
    job: &Job,
) -> Result<bool, sqlx::Error> {
    let event = &job.event;
    let inserted = sqlx::query(
        "INSERT INTO control_plane.webhook_deliveries \
           (id, webhook_id, event_id, project_id, event_type, status, created_at) \
         VALUES ($1, $2, $3, $4, $5, 'delivering', $6) ON CONFLICT DO NOTHING",
    )
    .bind(job.delivery_id)
    .bind(job.webhook.id)
    .bind(event.id)
    .bind(&event.project_id)
    .bind(&event.event_type)
    .bind(event.received_at)
    .execute(&mut **tx)
    .await
    .map(|r| r.rows_affected() == 1);
    alone_superseded(inserted, 1)
}

/// A statement's answer where a foreign-key or unique violation by a lone request means
/// that its delivery, webhook or event was deleted meanwhile, or that another process wrote
/// the delivery first: nothing of it is written. In a batch the error stands, and
/// [`crate::batch`] runs each request alone to find it.
fn alone_superseded<T: Default>(
    result: Result<T, sqlx::Error>,
    requests: usize,
) -> Result<T, sqlx::Error> {
    match result {
        Err(sqlx::Error::Database(e))
            if (e.is_foreign_key_violation() || e.is_unique_violation()) && requests == 1 =>
        {
            Ok(T::default())
        }
        other => other,
    }
}

/// Counts a failed attempt on the webhook unless the webhook was disabled or re-enabled
/// since the row the attempt used was read, and disables it when the policy says so
/// (successes reset the counter in [`Store::record_successes`]). Returns, when it
/// disabled it, how many other deliveries it stopped.
async fn update_webhook(
    tx: &mut Transaction<'_, Postgres>,
    job: &Job,
    result: &AttemptResult,
    outcome: Outcome,
    policy: DisablePolicy,
) -> Result<Option<u64>, sqlx::Error> {
    let counted: Option<(i32, Option<f64>)> = sqlx::query_as(
        "UPDATE control_plane.webhooks SET \
           consecutive_failures = consecutive_failures + 1, \
           failing_since = COALESCE(failing_since, now()), \
           last_failure_at = now() \
         WHERE id = $1 AND NOT disabled AND disabled_changed_at = $2 \
         RETURNING consecutive_failures, \
           EXTRACT(EPOCH FROM now() - failing_since)::float8",
    )
    .bind(job.webhook.id)
    .bind(job.webhook.disabled_changed_at)
    .fetch_optional(&mut **tx)
    .await?;
    let Some((failures, failing_secs)) = counted else {
        return Ok(None);
    };
    let failing_for = Duration::from_secs_f64(failing_secs.unwrap_or(0.0).max(0.0));
    let reason = if outcome == Outcome::Gone {
        Some("the endpoint answered 410 Gone".to_string())
    } else if policy.after_failures > 0
        && failures as u32 >= policy.after_failures
        && failing_for >= policy.after_failing_for
    {
        let last = match result.error.as_ref() {
            Some((t, m)) => format!("{t}: {m}"),
            None => "unknown".into(),
        };
        Some(format!(
            "{failures} consecutive failed attempts over {}; last error: {last}",
            humantime::format_duration(Duration::from_secs(failing_for.as_secs()))
        ))
    } else {
        None
    };
    let Some(reason) = reason else {
        return Ok(None);
    };
    let stopped: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM control_plane.webhook_deliveries \
         WHERE webhook_id = $1 AND status IN ('pending', 'failed')",
    )
    .bind(job.webhook.id)
    .fetch_one(&mut **tx)
    .await?;
    // The trigger stops those deliveries in this same transaction. The attempt row keeps
    // that it did this (see `attempt_facts`).
    sqlx::query(
        "UPDATE control_plane.webhooks SET disabled = true, disabled_at = now(), \
           disabled_reason = $2 WHERE id = $1",
    )
    .bind(job.webhook.id)
    .bind(&reason)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "UPDATE control_plane.webhook_delivery_attempts SET disabled_webhook_at = now() \
         WHERE delivery_id = $1 AND attempt_number = $2",
    )
    .bind(job.delivery_id)
    .bind(job.attempt as i32)
    .execute(&mut **tx)
    .await?;
    Ok(Some(stopped.max(0) as u64))
}

/// The connection options of `DATABASE_URL`. Without an `sslmode` (in the URL or
/// `PGSSLMODE`), a Postgres on this host (loopback or a Unix socket) is reached without
/// TLS, which protects nothing there and costs CPU on both sides of every statement;
/// anywhere else TLS is used when the server offers it (`prefer`), as libpq does.
fn connect_options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?;
    let sslmode_given = std::env::var_os("PGSSLMODE").is_some()
        || url::Url::parse(url).is_ok_and(|u| u.query_pairs().any(|(k, _)| k == "sslmode"));
    if sslmode_given || !is_local(options.get_host()) {
        return Ok(options);
    }
    Ok(options.ssl_mode(PgSslMode::Disable))
}

/// Whether a Postgres host is this machine: loopback, `localhost`, or a socket directory.
fn is_local(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host.starts_with('/')
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Deliveries of an event to attempt: each delivery id with its webhook.
type ToSend = Vec<(Uuid, WebhookRow)>;

/// First attempts of an event's deliveries, `written` or not yet.
fn jobs(rows: ToSend, written: bool, event: Arc<StoredEvent>) -> Vec<Job> {
    rows.into_iter()
        .map(|(delivery_id, webhook)| Job {
            delivery_id,
            attempt: 1,
            written,
            attempts_before_replay: 0,
            parked: 0,
            webhook,
            event: event.clone(),
        })
        .collect()
}

#[derive(sqlx::FromRow)]
struct DeliveryWebhook {
    delivery_id: Uuid,
    written: bool,
    #[sqlx(flatten)]
    webhook: WebhookRow,
}

#[derive(sqlx::FromRow)]
struct ClaimRow {
    attempts_before_replay: i32,
    #[sqlx(flatten)]
    webhook: WebhookRow,
    #[sqlx(flatten)]
    event: StoredEvent,
}

/// Errors that pass when the database comes back: retrying the same work is right.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception, 40: rollback (serialization, deadlock),
            // 53: insufficient resources, 57P0x: server shutting down.
            code.starts_with("08")
                || code.starts_with("40")
                || code.starts_with("53")
                || code.starts_with("57P")
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(url: &str) -> PgSslMode {
        connect_options(url).unwrap().get_ssl_mode()
    }

    #[test]
    fn a_postgres_on_this_host_is_reached_without_tls_unless_the_url_says_otherwise() {
        assert!(matches!(
            mode("postgres://u@127.0.0.1:5432/db"),
            PgSslMode::Disable
        ));
        assert!(matches!(
            mode("postgres://u@localhost/db"),
            PgSslMode::Disable
        ));
        assert!(matches!(
            mode("postgres://u@[::1]:5432/db"),
            PgSslMode::Disable
        ));
        assert!(matches!(
            mode("postgres://u@127.0.0.1/db?sslmode=require"),
            PgSslMode::Require
        ));
        assert!(matches!(
            mode("postgres://u@db.internal/db"),
            PgSslMode::Prefer
        ));
        assert!(matches!(
            mode("postgres://u@10.0.0.5/db"),
            PgSslMode::Prefer
        ));
    }
}
