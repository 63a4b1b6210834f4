//! What one queue message leads to. An event is stored and fanned out to its webhooks; a
//! retry message claims its attempt, and a parked group each of its deliveries'; each
//! attempt is sent, decided, recorded, and its next attempt scheduled in a delay queue.
//! The answer is a [`Disposition`] for the message: it is acknowledged only once
//! everything it caused is committed or confirmed.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::future::{BoxFuture, try_join_all};
use futures_util::stream::{self, FuturesUnordered};
use lapin::BasicProperties;
use lapin::message::Delivery;
use tokio::sync::Semaphore;
use tokio_util::sync::{CancellationToken, PollSemaphore};
use tracing::{Instrument, Span, debug, info, info_span, warn};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use crate::amqp::{PublishError, Publisher};
use crate::batch::{self, Batcher};
use crate::config::Config;
use crate::destination;
use crate::event::{Event, TraceContext};
use crate::http;
use crate::message::{PARKED_KIND, ParkedDelivery, ParkedGroup, RETRY_KIND, RetryTask};
use crate::metrics::Metrics;
use crate::notify;
use crate::outcome::{AttemptResult, ErrorType, Outcome, decide};
use crate::park::{Parker, Publish};
use crate::store::{
    DeliveryStatus, DisablePolicy, FannedOut, Job, NoClaim, Parked, Recorded, ScheduledRetry,
    Store, Success, Unclaim,
};
use crate::telemetry;
use crate::topology::{self, header_str};
use crate::webhook_limit::PerWebhook;

/// What becomes of a message once handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Everything it caused is committed: acknowledge.
    Ack,
    /// An event id already stored: acknowledge, nothing to do.
    Duplicate,
    /// It can never be processed: move it to `webhook.events.dead` with this reason.
    DeadLetter(String),
    /// A dependency failed before its effects were committed: let the broker deliver it
    /// again (to this or another process).
    Requeue(String),
}

/// A failure that stops a message from being acknowledged.
#[derive(Debug)]
enum Failure {
    /// RabbitMQ or Postgres did not take what had to be written; the message comes back.
    Unavailable(String),
    /// Postgres refused the data itself; processing it again would fail again.
    Refused(String),
}

/// What became of a claimed delivery's turn to be sent.
enum Sent {
    /// The request was made, or refused: its result, to decide and record.
    Attempted(Job, DateTime<Utc>, AttemptResult),
    /// No attempt: the webhook was deleted (its deliveries with it) or is disabled (the
    /// delivery stops).
    Skipped,
    /// Its webhook had `MAX_IN_FLIGHT_PER_WEBHOOK` attempts under way and finished none
    /// for [`PARK_AFTER`]: the delivery waits in RabbitMQ instead of in this process.
    Busy(Job),
}

impl From<PublishError> for Failure {
    fn from(e: PublishError) -> Self {
        Failure::Unavailable(format!("publishing to RabbitMQ: {e}"))
    }
}

impl From<Failure> for Disposition {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Unavailable(reason) => Disposition::Requeue(reason),
            Failure::Refused(reason) => Disposition::DeadLetter(reason),
        }
    }
}

/// What the handlers of one RabbitMQ session share: its confirmed publisher, a token
/// cancelled when the session ends (lost, or stopping on SIGTERM), so that no new request
/// starts for a message the broker will hand to another process, and the parker that
/// publishes parked deliveries in groups on that publisher.
#[derive(Clone)]
pub struct Session {
    pub publisher: Publisher,
    pub closing: CancellationToken,
    parker: Parker,
}

impl Session {
    /// Starts a session's parker on the current runtime.
    pub fn new(publisher: Publisher) -> Session {
        let closing = CancellationToken::new();
        let (on, until) = (publisher.clone(), closing.clone());
        let publish: Publish = Arc::new(move |group: ParkedGroup| {
            let (publisher, closing) = (on.clone(), until.clone());
            Box::pin(async move {
                let queue = topology::park_queue(group.parked.saturating_sub(1));
                let body = group.to_bytes();
                let properties = ParkedGroup::properties();
                let published =
                    publish_confirmed(&publisher, &closing, "", &queue, &body, properties).await;
                published.map_err(|f| match f {
                    Failure::Unavailable(reason) | Failure::Refused(reason) => reason,
                })
            })
        });
        Session {
            publisher,
            closing,
            parker: Parker::spawn(publish),
        }
    }

    /// Publishes a message with a broker confirm, on this session's publisher.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), Failure> {
        let (publisher, closing) = (&self.publisher, &self.closing);
        publish_confirmed(publisher, closing, exchange, routing_key, body, properties).await
    }
}

/// What a message of the work queue is, by its AMQP `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// A producer's event (any other `type`).
    Event,
    /// The worker's retry of one delivery.
    Retry,
    /// The worker's group of parked deliveries.
    Parked,
}

impl MessageKind {
    pub fn of(delivery: &Delivery) -> MessageKind {
        match delivery.properties.kind().as_ref().map(|k| k.as_str()) {
            Some(RETRY_KIND) => MessageKind::Retry,
            Some(PARKED_KIND) => MessageKind::Parked,
            _ => MessageKind::Event,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Event => "event",
            MessageKind::Retry => "retry",
            MessageKind::Parked => "parked",
        }
    }
}

/// What every message handler shares within one process.
pub struct Pipeline {
    pub config: Arc<Config>,
    pub store: Store,
    pub http: reqwest::Client,
    /// `MAX_IN_FLIGHT`: a permit per HTTP attempt.
    pub in_flight: Arc<Semaphore>,
    /// A place per first attempt of an event's delivery under way in this process.
    admitted: Arc<Semaphore>,
    /// `MAX_IN_FLIGHT_PER_WEBHOOK`: a permit per attempt to one webhook.
    per_webhook: PerWebhook,
    pub metrics: Arc<Metrics>,
    /// Stores events, many messages' at a time, each with the webhooks stalled as it came.
    events: Batcher<(Arc<Event>, Vec<Uuid>), Option<FannedOut>>,
    /// Records successful attempts, many at a time.
    successes: Batcher<Success, bool>,
    /// Gives back the claims of parked deliveries, many at a time.
    unclaims: Batcher<Unclaim, bool>,
    /// When an outage was last reported, so that hundreds of waiting messages make one
    /// warning every few seconds, not one each.
    outage_reported: Mutex<Option<Instant>>,
}

/// Re-read the webhook row when an attempt waited this long for capacity, so that no
/// attempt uses a row older than CONTRACT §2 allows.
const STALE_ROW: Duration = Duration::from_secs(1);

/// How long a webhook may give back no place to a waiting delivery before that delivery
/// is parked: a fast webhook's burst just queues here, while a hung one's deliveries do
/// not hold their messages (and the prefetch) for long. Only a webhook with all of
/// `MAX_IN_FLIGHT_PER_WEBHOOK` requests open for this long, none of them answered, counts
/// as stalled; at 500 ms the prefetch filled up behind a hung one before that was known.
const PARK_AFTER: Duration = Duration::from_millis(250);

/// Attempts of fanned-out events under way per `MAX_IN_FLIGHT` slot: enough to keep every
/// slot busy while some wait for their webhook, few enough to bound the memory they hold.
const ATTEMPTS_PER_SLOT: usize = 4;

/// The most requests of one kind in one statement.
const MAX_BATCH: usize = 256;

/// Tries of a retry message's publish the broker refuses on a live channel.
const PUBLISH_TRIES: u32 = 5;

/// How much longer than `DELIVERY_TIMEOUT` an attempt under way elsewhere gets to be
/// recorded before a redelivered message takes it over.
const TAKEOVER_MARGIN: Duration = Duration::from_secs(5);

/// At most one warning per this interval while Postgres is unreachable.
const OUTAGE_REPORT_EVERY: Duration = Duration::from_secs(5);

impl Pipeline {
    pub fn new(
        config: Arc<Config>,
        store: Store,
        http: reqwest::Client,
        metrics: Arc<Metrics>,
    ) -> Pipeline {
        let in_flight = Arc::new(Semaphore::new(config.max_in_flight as usize));
        let admitted = Arc::new(Semaphore::new(
            config.max_in_flight as usize * ATTEMPTS_PER_SLOT,
        ));
        let per_webhook = PerWebhook::new(config.max_in_flight_per_webhook);
        // A quarter of the pool for each kind of batch leaves the rest to claims and
        // failures.
        let limits = batch::Limits {
            concurrency: (config.database_pool_size as usize / 4).max(1),
            max_batch: MAX_BATCH,
        };
        let events = Batcher::spawn(store.clone(), store_events, |(e, _)| (e.id, 0), limits);
        let successes = Batcher::spawn(
            store.clone(),
            record_successes,
            |s| (s.delivery_id, s.attempt),
            limits,
        );
        let unclaims = Batcher::spawn(
            store.clone(),
            unclaim,
            |c| (c.delivery_id, c.attempt),
            limits,
        );
        Pipeline {
            config,
            events,
            successes,
            unclaims,
            store,
            http,
            in_flight,
            admitted,
            per_webhook,
            metrics,
            outage_reported: Mutex::new(None),
        }
    }

    fn policy(&self) -> DisablePolicy {
        DisablePolicy {
            after_failures: self.config.disable_after_failures,
            after_failing_for: self.config.disable_after_failing_for,
        }
    }

    /// Handles one message from the work queue: a producer's event or a retry message, in
    /// a span that continues the trace named in its headers, or a parked group.
    pub async fn handle(&self, delivery: &Delivery, session: &Session) -> Disposition {
        let kind = MessageKind::of(delivery);
        if kind == MessageKind::Parked {
            // Its deliveries each continue their own trace.
            let handled = self.handle_parked(delivery, session).await;
            return handled.unwrap_or_else(Disposition::from);
        }
        let trace = trace_of(delivery);
        let inbound = telemetry::parent(&trace);
        let span = consume_span(delivery, kind, &inbound);
        let handling = async {
            match kind {
                MessageKind::Retry => self.handle_retry(delivery, session).await,
                _ => self.handle_event(delivery, trace, session).await,
            }
        };
        let result = telemetry::within(&inbound, handling.instrument(span)).await;
        result.unwrap_or_else(Disposition::from)
    }

    async fn handle_event(
        &self,
        delivery: &Delivery,
        trace: TraceContext,
        session: &Session,
    ) -> Result<Disposition, Failure> {
        let event = match Event::parse(&delivery.data, trace, Utc::now()) {
            Ok(event) => Arc::new(event),
            Err(invalid) => return Ok(Disposition::DeadLetter(invalid.0)),
        };
        Span::current().record("event_id", tracing::field::display(event.id));
        let span = info_span!("fan-out", deliveries = tracing::field::Empty);
        span.set_attribute("event_id", event.id.to_string());
        span.set_attribute("event_type", event.event_type.clone());
        span.set_attribute("project_id", event.project_id.clone());
        async {
            // Deliveries to a webhook known to be stalled are parked at once, never claimed.
            let stalled = self.per_webhook.stalled_webhooks(PARK_AFTER);
            let (stored, retried) = self
                .db_retried("storing the event", || {
                    self.events.run((event.clone(), stalled.clone()))
                })
                .await?;
            let (fanned_out, retries) = match stored {
                Some(fanned_out) => (fanned_out, Vec::new()),
                // Delivered again, or stored by our own first try whose answer was lost.
                None if delivery.redelivered || retried => {
                    debug!("event delivered again; resuming its unfinished deliveries");
                    let in_progress = self
                        .db("reading the event's deliveries", || {
                            self.store.first_attempts_in_progress(event.id)
                        })
                        .await?;
                    if in_progress > 0 {
                        self.takeover_grace(session).await?;
                    }
                    let (jobs, retries) = self
                        .db("resuming the event", || self.store.resume_event(event.id))
                        .await?;
                    self.renotify_event(event.id, session).await?;
                    let parked = Vec::new();
                    (FannedOut { jobs, parked }, retries)
                }
                None => {
                    info!("event id already stored; duplicate ignored");
                    return Ok(Disposition::Duplicate);
                }
            };
            let FannedOut { jobs, parked } = fanned_out;
            let deliveries = jobs.len() + parked.len() + retries.len();
            Span::current().record("deliveries", deliveries);
            debug!(deliveries, parked = parked.len(), "fanned out");
            for retry in &retries {
                self.reschedule(retry, session).await?;
            }
            // Both run to their end, so no attempt is dropped half-way for a failed park.
            let (parking, attempts) = tokio::join!(
                self.park_unclaimed(&parked, session),
                self.attempt_all(jobs, session)
            );
            parking?;
            attempts?;
            Ok(Disposition::Ack)
        }
        .instrument(span)
        .await
    }

    async fn handle_retry(
        &self,
        delivery: &Delivery,
        session: &Session,
    ) -> Result<Disposition, Failure> {
        let task = match RetryTask::parse(&delivery.data) {
            Ok(task) => task,
            Err(reason) => return Ok(Disposition::DeadLetter(reason)),
        };
        self.take_turn(task, delivery.redelivered, session).await?;
        Ok(Disposition::Ack)
    }

    /// A parked group: while its webhook is still stalled, it is parked again whole, at no
    /// cost to Postgres. Otherwise each delivery takes its turn as its own retry message
    /// would, in its own trace, a few at a time; the group is acknowledged once every one
    /// is attempted, or parked or scheduled again.
    async fn handle_parked(
        &self,
        delivery: &Delivery,
        session: &Session,
    ) -> Result<Disposition, Failure> {
        let group = match ParkedGroup::parse(&delivery.data) {
            Ok(group) => group,
            Err(reason) => return Ok(Disposition::DeadLetter(reason)),
        };
        if self.per_webhook.stalled(group.webhook_id, PARK_AFTER) {
            let (webhook_id, times) = (group.webhook_id, group.parked);
            self.park_deliveries(session, webhook_id, times, group.deliveries)
                .await?;
            return Ok(Disposition::Ack);
        }
        let turns: Vec<_> = group
            .deliveries
            .iter()
            .map(|parked| (parked.task(&group), telemetry::parent(&parked.trace())))
            .map(|(task, inbound)| async move {
                let span = consume_span(delivery, MessageKind::Parked, &inbound);
                let turn = self.take_turn(task, delivery.redelivered, session);
                telemetry::within(&inbound, turn.instrument(span)).await
            })
            .collect();
        let at_once = self.config.max_in_flight_per_webhook.max(1) as usize;
        let mut turns = stream::iter(turns).buffer_unordered(at_once);
        let mut failure = None;
        while let Some(turn) = turns.next().await {
            if let Err(e) = turn {
                failure.get_or_insert(e);
            }
        }
        failure.map_or(Ok(Disposition::Ack), Err)
    }

    /// The turn of attempt `task.attempt` of a delivery, named by a retry message or a
    /// parked group: claimed and attempted, or parked again while its webhook is stalled,
    /// or dropped when the attempt is recorded or the delivery moved on.
    async fn take_turn(
        &self,
        task: RetryTask,
        redelivered: bool,
        session: &Session,
    ) -> Result<(), Failure> {
        let span = Span::current();
        span.record("delivery_id", tracing::field::display(task.delivery_id));
        span.record("attempt", task.attempt);
        // Its webhook is still stalled here: park it again, unclaimed, at no cost to
        // Postgres (the delivery stays as it was parked: pending or failed).
        if let Some(webhook_id) = task.webhook_id
            && self.per_webhook.stalled(webhook_id, PARK_AFTER)
        {
            span.set_attribute("parked", true);
            let trace = telemetry::propagate(&span);
            let parked = ParkedDelivery::new(task.delivery_id, task.attempt, trace);
            return self
                .park_deliveries(session, webhook_id, task.parked, vec![parked])
                .await;
        }
        let claim_it = |take_over| {
            self.db_retried("claiming a retry", move || {
                self.store.claim(task.delivery_id, task.attempt, take_over)
            })
        };
        let (mut claim, retried) = claim_it(false).await?;
        if let Err(NoClaim::State {
            status: DeliveryStatus::Delivering,
            attempts,
            ..
        }) = claim
            && (redelivered || retried)
            && attempts + 1 == task.attempt
        {
            self.takeover_grace(session).await?;
            claim = claim_it(true).await?.0;
        }
        match claim {
            Ok(job) => {
                let job = Job {
                    parked: task.parked,
                    ..job
                };
                self.attempt(job, session).await?
            }
            Err(state) => {
                // This message made attempt N and then lost track (the broker gave it
                // again): the retry it scheduled may not exist, so schedule it again. A
                // duplicate of it is harmless, the claim lets one of them through. The same
                // goes for the operational events of an attempt that ended the delivery.
                if redelivered && state.ended_by(task.attempt) {
                    self.notify_operators(task.delivery_id, task.attempt, session)
                        .await?;
                }
                let lost = state.pending_retry(task.delivery_id, task.attempt);
                match lost.filter(|_| redelivered) {
                    Some(retry) => self.reschedule(&retry, session).await?,
                    None => debug!(delivery_id = %task.delivery_id, attempt = task.attempt,
                        ?state, "retry message dropped: its attempt is recorded or the delivery moved on"),
                }
            }
        }
        Ok(())
    }

    /// The first attempts of an event's deliveries, each admitted when the process holds
    /// fewer than [`ATTEMPTS_PER_SLOT`] × `MAX_IN_FLIGHT` attempts: a backlog of wide
    /// fan-outs waits as a list of jobs, not as thousands of attempts under way. The first
    /// failure is returned once every admitted attempt has ended.
    async fn attempt_all(&self, jobs: Vec<Job>, session: &Session) -> Result<(), Failure> {
        let mut jobs = jobs.into_iter();
        let mut places = PollSemaphore::new(self.admitted.clone());
        let mut attempts = FuturesUnordered::new();
        let mut failure = None;
        loop {
            tokio::select! {
                Some(place) = places.next(), if jobs.len() > 0 => {
                    let job = jobs.next().expect("a job is left");
                    attempts.push(async move {
                        let attempted = self.attempt(job, session).await;
                        drop(place);
                        attempted
                    });
                }
                Some(attempted) = attempts.next(), if !attempts.is_empty() => {
                    if let Err(e) = attempted {
                        failure.get_or_insert(e);
                    }
                }
                else => break,
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// One attempt of a claimed delivery, from request to recorded outcome and scheduled
    /// retry.
    async fn attempt(&self, job: Job, session: &Session) -> Result<(), Failure> {
        let span = info_span!("webhook attempt", delivery_id = %job.delivery_id,
            webhook_id = %job.webhook.id, attempt = job.attempt);
        span.set_attribute("event_id", job.event.id.to_string());
        async {
            let (job, started_at, result) = match self.send(job, session).await? {
                Sent::Attempted(job, started_at, result) => (job, started_at, result),
                Sent::Skipped => return Ok(()),
                Sent::Busy(job) => return Box::pin(self.park(&job, session)).await,
            };
            self.metrics.attempt(result.error_type(), result.duration);
            telemetry::record_result(&Span::current(), &result, "error_type");
            let outcome = decide(
                self.config.retry_schedule.delays(),
                job.schedule_attempt(),
                &result,
            );
            let (recorded, retried) = self.record(&job, started_at, &result, outcome).await?;
            log_attempt(&result, outcome, recorded);
            let Recorded::Status { status, stopped } = recorded else {
                if retried {
                    // Perhaps our own first try committed: make sure its retry and its
                    // operational events exist.
                    self.ensure_next_attempt(job.delivery_id, job.attempt, session)
                        .await?;
                    Box::pin(self.notify_operators(job.delivery_id, job.attempt, session)).await?;
                }
                return Ok(());
            };
            Span::current().set_attribute("status", status.as_str());
            if let Some(others) = stopped {
                self.metrics.webhook_disabled(outcome == Outcome::Gone);
                self.metrics.stopped(others);
            }
            match (status, outcome) {
                (DeliveryStatus::Failed, Outcome::Retry { after }) => {
                    let task = RetryTask::new(job.delivery_id, job.attempt + 1);
                    let queue = topology::retry_queue(after);
                    self.publish_task(session, &queue, task).await?;
                    self.metrics.retry_scheduled(after);
                }
                (DeliveryStatus::Delivered, _) => {
                    let latency = (Utc::now() - job.event.received_at).to_std().ok();
                    self.metrics.finished(status, latency);
                }
                _ => self.metrics.finished(status, None),
            }
            if stopped.is_some() || status == DeliveryStatus::PermanentlyFailed {
                Box::pin(self.notify_operators(job.delivery_id, job.attempt, session)).await?;
            }
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Records an attempt, telling also whether the step ran again after a transient error
    /// ([`Pipeline::db_retried`]). A success goes in a batch with others; a failure is its
    /// own transaction, as it may disable the webhook.
    async fn record(
        &self,
        job: &Job,
        started_at: DateTime<Utc>,
        result: &AttemptResult,
        outcome: Outcome,
    ) -> Result<(Recorded, bool), Failure> {
        if outcome == Outcome::Delivered {
            let success = Success::new(job, started_at, result);
            let (recorded, retried) = self
                .db_retried("recording the attempt", || {
                    self.successes.run(success.clone())
                })
                .await?;
            return Ok((Recorded::delivered(recorded), retried));
        }
        self.db_retried("recording the attempt", || {
            Box::pin(
                self.store
                    .record(job, started_at, result, outcome, self.policy()),
            )
        })
        .await
    }

    /// Waits for a place with the webhook and an HTTP slot and makes the request, or
    /// refuses it: a row that cannot be used or a blocked destination is a failed attempt
    /// too.
    async fn send(&self, mut job: Job, session: &Session) -> Result<Sent, Failure> {
        let waiting = Instant::now();
        let Some(_webhook_permit) = self.per_webhook.acquire(job.webhook.id, PARK_AFTER).await
        else {
            return Ok(Sent::Busy(job));
        };
        // A session that ended meanwhile (lost, or stopping): the broker will give this
        // message to another process, so no request may start for it here.
        let _permit = tokio::select! {
            biased;
            _ = session.closing.cancelled() => {
                return Err(Failure::Unavailable("the RabbitMQ session ended".into()));
            }
            permit = self.in_flight.acquire() => permit.expect("the semaphore is never closed"),
        };
        if waiting.elapsed() > STALE_ROW {
            match self
                .db("reading the webhook", || self.store.webhook(job.webhook.id))
                .await?
            {
                Some(row) => job.webhook = row,
                None => return Ok(Sent::Skipped),
            }
        }
        if job.webhook.disabled {
            // Boxed: its transaction makes a large future, which every attempt's future
            // would carry otherwise (and every message's with it).
            self.db("stopping the delivery", || {
                Box::pin(self.store.stop_disabled(&job))
            })
            .await?;
            self.metrics.finished(DeliveryStatus::Disabled, None);
            return Ok(Sent::Skipped);
        }
        let started_at = Utc::now();
        let target = job.webhook.target().and_then(|target| {
            if !self.config.allow_private_ips {
                destination::check_url(&target.url)
                    .map_err(|blocked| (ErrorType::BlockedDestination, blocked.to_string()))?;
            }
            Ok(target)
        });
        let result = match target {
            Err((error_type, message)) => AttemptResult::failed(error_type, message),
            Ok(target) => {
                let event = &job.event;
                let body = http::body(&event.event_type, event.occurred_at, &event.data);
                let event_id = event.id.to_string();
                let msg = http::Message {
                    event_id: &event_id,
                    body: &body,
                };
                let _counted = self.metrics.in_flight();
                // Boxed, like the other large steps below: a future is as large as its
                // largest step, and a fan-out holds thousands waiting for a permit.
                Box::pin(http::send(
                    &self.http,
                    &target,
                    &msg,
                    self.config.delivery_timeout,
                ))
                .await
            }
        };
        Ok(Sent::Attempted(job, started_at, result))
    }

    /// Gives a claimed delivery back and has RabbitMQ bring it back later, as its webhook is
    /// busy. Given back first (as it was before the claim, or stored `pending` if not
    /// written yet) and published second, so that the parked message can always claim it;
    /// if the publish fails, the message that claimed it comes back and finds it claimable
    /// again.
    async fn park(&self, job: &Job, session: &Session) -> Result<(), Failure> {
        Span::current().set_attribute("parked", true);
        let released = self
            .db("parking the delivery", || {
                self.unclaims.run(Unclaim::new(job))
            })
            .await?;
        if released {
            let trace = telemetry::propagate(&Span::current());
            let parked = ParkedDelivery::new(job.delivery_id, job.attempt, trace);
            self.park_deliveries(session, job.webhook.id, job.parked, vec![parked])
                .await?;
        }
        Ok(())
    }

    /// Parks a new event's deliveries stored unclaimed, as their webhook was stalled (one
    /// per webhook: the parker groups them with other events' deliveries).
    async fn park_unclaimed(&self, parked: &[Parked], session: &Session) -> Result<(), Failure> {
        let trace = telemetry::propagate(&Span::current());
        let parking = parked.iter().map(|p| {
            let delivery = ParkedDelivery::new(p.delivery_id, 1, trace.clone());
            self.park_deliveries(session, p.webhook_id, 0, vec![delivery])
        });
        try_join_all(parking).await.map(|_| ())
    }

    /// Parks deliveries not claimed (or given back) of a webhook, parked `times` times
    /// before, in a group of the session's parker; returns once the group is confirmed.
    async fn park_deliveries(
        &self,
        session: &Session,
        webhook_id: Uuid,
        times: u32,
        deliveries: Vec<ParkedDelivery>,
    ) -> Result<(), Failure> {
        let count = deliveries.len();
        session
            .parker
            .park(webhook_id, times, deliveries)
            .await
            .map_err(|e| Failure::Unavailable(format!("parking deliveries: {e}")))?;
        self.metrics.parked(count);
        debug!(%webhook_id, deliveries = count, "webhook busy: deliveries parked");
        Ok(())
    }

    /// If attempt `attempt` of the delivery is recorded as failed with a retry due, makes
    /// sure that retry is scheduled (a duplicate retry message is harmless: the claim lets
    /// one through).
    async fn ensure_next_attempt(
        &self,
        delivery_id: Uuid,
        attempt: u32,
        session: &Session,
    ) -> Result<(), Failure> {
        let state = self
            .db("reading the delivery", || self.store.state(delivery_id))
            .await?;
        if let Some(retry) = state.pending_retry(delivery_id, attempt) {
            self.reschedule(&retry, session).await?;
        }
        Ok(())
    }

    /// Publishes, each confirmed, the operational events ([`notify`]) of attempt `attempt`
    /// of a delivery: what it caused is read back from Postgres, so a message handled again
    /// after a crash between recording and publishing publishes the same events (the same
    /// ids, ignored as duplicates if the first ones made it).
    async fn notify_operators(
        &self,
        delivery_id: Uuid,
        attempt: u32,
        session: &Session,
    ) -> Result<(), Failure> {
        let Some(project) = &self.config.operational_events_project else {
            return Ok(());
        };
        let facts = self
            .db("reading what the attempt caused", || {
                self.store.attempt_facts(delivery_id, attempt)
            })
            .await?;
        let trace = telemetry::propagate(&Span::current());
        for notice in facts.iter().flat_map(|f| notify::notices(f, project)) {
            let (body, properties) = (notice.body(project), notice.properties(&trace));
            session
                .publish(topology::EXCHANGE, notice.event_type, &body, properties)
                .await?;
            self.metrics.operational_event(notice.event_type);
            info!(event_type = notice.event_type, id = %notice.id, "operational event published");
        }
        Ok(())
    }

    /// For an event message handled again: the operational events of the first attempts
    /// that ended its deliveries (the first processing may have died before publishing
    /// them).
    async fn renotify_event(&self, event_id: Uuid, session: &Session) -> Result<(), Failure> {
        if self.config.operational_events_project.is_none() {
            return Ok(());
        }
        let ended = self
            .db("reading the event's ended deliveries", || {
                self.store.ended_by_first_attempt(event_id)
            })
            .await?;
        for delivery_id in ended {
            self.notify_operators(delivery_id, 1, session).await?;
        }
        Ok(())
    }

    /// Publishes the retry of a `failed` delivery again, for when the message that should
    /// have scheduled it may have been lost: into the delay queue that ends soonest after
    /// `next_retry_at`, or straight to the work queue when that time has passed.
    async fn reschedule(&self, retry: &ScheduledRetry, session: &Session) -> Result<(), Failure> {
        let remaining = retry
            .next_retry_at
            .and_then(|at| (at - Utc::now()).to_std().ok())
            .unwrap_or(Duration::ZERO);
        let tiers = self.config.retry_schedule.tiers();
        let queue = match tiers.iter().find(|d| **d >= remaining) {
            _ if remaining.is_zero() => topology::WORK_QUEUE.to_string(),
            Some(delay) => topology::retry_queue(*delay),
            None => tiers.last().map_or(topology::WORK_QUEUE.to_string(), |d| {
                topology::retry_queue(*d)
            }),
        };
        let task = RetryTask::new(retry.delivery_id, retry.attempt);
        self.publish_task(session, &queue, task).await
    }

    /// Publishes a retry message with a broker confirm. The message continues the current
    /// span's trace, so a retry hours later joins it.
    async fn publish_task(
        &self,
        session: &Session,
        queue: &str,
        task: RetryTask,
    ) -> Result<(), Failure> {
        let properties = task.properties(&telemetry::propagate(&Span::current()));
        session
            .publish("", queue, &task.to_bytes(), properties)
            .await
    }

    /// A message the broker delivered again finds an attempt under way: its process may
    /// have lost only its connection and still be sending. Give that attempt time to end and
    /// be recorded before taking it over, so a lost connection alone causes no duplicate.
    async fn takeover_grace(&self, session: &Session) -> Result<(), Failure> {
        let grace = self.config.delivery_timeout + TAKEOVER_MARGIN;
        debug!(
            ?grace,
            "an attempt is under way elsewhere; waiting before taking it over"
        );
        tokio::select! {
            biased;
            _ = session.closing.cancelled() => {
                Err(Failure::Unavailable("the RabbitMQ session ended".into()))
            }
            _ = tokio::time::sleep(grace) => Ok(()),
        }
    }

    fn should_report_outage(&self) -> bool {
        let mut last = self.outage_reported.lock().expect("never poisoned");
        let due = last.is_none_or(|at| at.elapsed() >= OUTAGE_REPORT_EVERY);
        if due {
            *last = Some(Instant::now());
        }
        due
    }

    /// Runs a database step, waiting out outages: a transient error is retried with
    /// backoff for as long as it takes (the message stays unacknowledged meanwhile, which
    /// also stops the broker from sending more than the prefetch). Any other error means
    /// Postgres refuses this data.
    async fn db<T, F, Fut>(&self, what: &str, op: F) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        self.db_retried(what, op).await.map(|(value, _)| value)
    }

    /// [`Pipeline::db`], also telling whether the step was run again after a transient
    /// error. Then its first run may have committed without the answer arriving: a step
    /// that finds its own work done must not take it for someone else's.
    async fn db_retried<T, F, Fut>(&self, what: &str, mut op: F) -> Result<(T, bool), Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        let mut delay = Duration::from_millis(100);
        let mut retried = false;
        loop {
            match op().await {
                Ok(value) => return Ok((value, retried)),
                Err(e) if crate::store::is_transient(&e) => {
                    if self.should_report_outage() {
                        warn!(error = %e, "{what}: Postgres unavailable; messages wait unacknowledged and retry");
                    } else {
                        debug!(error = %e, "{what}: Postgres unavailable, retrying in {delay:?}");
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    retried = true;
                }
                Err(e) => {
                    return Err(Failure::Refused(format!(
                        "{what}: Postgres refused it: {e}"
                    )));
                }
            }
        }
    }
}

fn log_attempt(result: &AttemptResult, outcome: Outcome, recorded: Recorded) {
    let Recorded::Status { status, stopped } = recorded else {
        debug!("attempt already recorded by another process");
        return;
    };
    if result.succeeded() {
        debug!(
            status = status.as_str(),
            http_status = result.status,
            duration_ms = result.duration.as_millis() as u64,
            "delivered"
        );
    } else {
        info!(
            status = status.as_str(),
            http_status = result.status,
            error_type = result.error_type().map(|t| t.as_str()),
            error = result.error_message(),
            ?outcome,
            "attempt failed"
        );
    }
    if stopped.is_some() {
        warn!(
            error_type = result.error_type().map(|t| t.as_str()),
            "webhook disabled"
        );
    }
}

/// The W3C trace context in a message's headers (a producer's, or a retry message's).
fn trace_of(delivery: &Delivery) -> TraceContext {
    let headers = delivery.properties.headers().as_ref();
    TraceContext::new(
        header_str(headers, "traceparent"),
        header_str(headers, "tracestate"),
    )
}

/// The span of handling one message (OpenTelemetry messaging conventions), a child of the
/// span that published it: the producer's, or the attempt that scheduled a retry.
fn consume_span(delivery: &Delivery, kind: MessageKind, inbound: &opentelemetry::Context) -> Span {
    let span = info_span!(
        "process webhook.events.work",
        otel.kind = "consumer",
        event_id = tracing::field::Empty,
        delivery_id = tracing::field::Empty,
        attempt = tracing::field::Empty
    );
    // Fails only when spans are not recorded (no exporter): `telemetry::within` then keeps
    // the trace.
    let _ = span.set_parent(inbound.clone());
    span.set_attribute("messaging.system", "rabbitmq");
    span.set_attribute("messaging.operation.type", "process");
    span.set_attribute("messaging.operation.name", "process");
    span.set_attribute("messaging.destination.name", delivery.exchange.to_string());
    span.set_attribute(
        "messaging.rabbitmq.destination.routing_key",
        delivery.routing_key.to_string(),
    );
    if let Some(id) = delivery.properties.message_id() {
        span.set_attribute("messaging.message.id", id.to_string());
    }
    span.set_attribute("webhook_worker.message", kind.as_str());
    span.set_attribute("webhook_worker.redelivered", delivery.redelivered);
    span
}

/// Publishes a message with a broker confirm. A refusal on a live channel (a quorum queue
/// electing a leader, say) is tried again a few times, unless the session ends meanwhile,
/// before the message that caused it goes back to the queue.
async fn publish_confirmed(
    publisher: &Publisher,
    closing: &CancellationToken,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), Failure> {
    let mut pause = Duration::from_millis(250);
    for _ in 0..PUBLISH_TRIES - 1 {
        match Box::pin(publisher.publish(exchange, routing_key, body, properties.clone())).await {
            Ok(()) => return Ok(()),
            Err(PublishError::Broker(e)) => return Err(PublishError::Broker(e).into()),
            Err(e) => warn!(error = %e, exchange, routing_key,
                "publishing; trying again in {pause:?}"),
        }
        tokio::select! {
            biased;
            _ = closing.cancelled() => {
                return Err(Failure::Unavailable("the RabbitMQ session ended".into()));
            }
            _ = tokio::time::sleep(pause) => {}
        }
        pause *= 2;
    }
    Box::pin(publisher.publish(exchange, routing_key, body, properties)).await?;
    Ok(())
}

/// The id used in logs for a message that is not a valid event.
pub fn message_ref(delivery: &Delivery) -> String {
    delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.to_string())
        .unwrap_or_else(|| format!("delivery tag {}", delivery.delivery_tag))
}

/// [`Store::store_events`] as a [`batch::BatchOp`]: a webhook stalled when any event of
/// the batch came is parked for all of them.
fn store_events<'a>(
    store: &'a Store,
    requests: &'a [(Arc<Event>, Vec<Uuid>)],
) -> BoxFuture<'a, Result<Vec<Option<FannedOut>>, sqlx::Error>> {
    let events: Vec<Arc<Event>> = requests.iter().map(|(event, _)| event.clone()).collect();
    let mut park: Vec<Uuid> = requests
        .iter()
        .flat_map(|(_, p)| p.iter().copied())
        .collect();
    park.sort_unstable();
    park.dedup();
    Box::pin(async move { store.store_events(&events, &park).await })
}

/// [`Store::record_successes`] as a [`batch::BatchOp`].
fn record_successes<'a>(
    store: &'a Store,
    done: &'a [Success],
) -> BoxFuture<'a, Result<Vec<bool>, sqlx::Error>> {
    Box::pin(store.record_successes(done))
}

/// [`Store::unclaim`] as a [`batch::BatchOp`].
fn unclaim<'a>(
    store: &'a Store,
    claims: &'a [Unclaim],
) -> BoxFuture<'a, Result<Vec<bool>, sqlx::Error>> {
    Box::pin(store.unclaim(claims))
}
