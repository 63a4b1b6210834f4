//! The worker process: one RabbitMQ session at a time (connect, declare, consume, hand each
//! message to the pipeline, settle it), reconnecting with backoff when a session is lost,
//! and draining in-flight work when asked to stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use std::panic::AssertUnwindSafe;

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::acks::{AckHandle, Acks};
use crate::amqp::{self, Publisher, with_header};
use crate::config::{Config, redact_url};
use crate::health::{self, Readiness};
use crate::metrics::Metrics;
use crate::pipeline::{Disposition, MessageKind, Pipeline, Session, message_ref};
use crate::store::Store;
use crate::{http, topology};

/// A built worker, ready to run: its health endpoint is already bound.
pub struct Worker {
    pipeline: Arc<Pipeline>,
    readiness: Readiness,
    listener: TcpListener,
}

/// How a RabbitMQ session ended, other than by a requested stop.
enum SessionEnd {
    /// Connection or channel lost: reconnect.
    Lost(String),
    /// The configuration and the broker disagree: exit.
    Fatal(anyhow::Error),
}

impl From<lapin::Error> for SessionEnd {
    fn from(e: lapin::Error) -> Self {
        SessionEnd::Lost(e.to_string())
    }
}

impl Worker {
    pub async fn build(config: Config) -> anyhow::Result<Worker> {
        let store = Store::connect_lazy(&config.database_url, config.database_pool_size)
            .with_context(|| {
                format!("invalid DATABASE_URL {}", redact_url(&config.database_url))
            })?;
        let http = http::client(config.allow_private_ips).context("building the HTTP client")?;
        let listener = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("binding HTTP_ADDR {}", config.http_addr))?;
        Ok(Worker {
            pipeline: Arc::new(Pipeline::new(
                Arc::new(config),
                store,
                http,
                Arc::new(Metrics::new()),
            )),
            readiness: Readiness::default(),
            listener,
        })
    }

    /// The address `/healthz` and `/readyz` are served on.
    pub fn http_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Consumes until `shutdown` is cancelled, then drains in-flight attempts for up to
    /// `SHUTDOWN_TIMEOUT`. Returns an error only for what retrying cannot fix.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let server = tokio::spawn(health::serve(
            self.listener,
            self.readiness.clone(),
            self.pipeline.store.clone(),
            self.pipeline.metrics.clone(),
            shutdown.clone(),
        ));
        let config = self.pipeline.config.clone();
        let mut backoff = Backoff::default();
        let result = loop {
            match session(&self.pipeline, &self.readiness, &shutdown, &mut backoff).await {
                Ok(()) => break Ok(()),
                Err(SessionEnd::Fatal(e)) => break Err(e),
                Err(SessionEnd::Lost(reason)) => {
                    let delay = backoff.next();
                    warn!(amqp_url = %redact_url(&config.amqp_url), %reason,
                        "not consuming; trying again in {delay:?}");
                    tokio::select! {
                        _ = shutdown.cancelled() => break Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };
        shutdown.cancel();
        let _ = server.await;
        result
    }
}

async fn session(
    pipeline: &Arc<Pipeline>,
    readiness: &Readiness,
    shutdown: &CancellationToken,
    backoff: &mut Backoff,
) -> Result<(), SessionEnd> {
    let config = &pipeline.config;
    pipeline
        .store
        .check_migrated()
        .await
        .map_err(SessionEnd::Lost)?;
    let conn = amqp::connect(&config.amqp_url).await?;
    topology::declare(&conn, config.queue_type, &config.retry_schedule)
        .await
        .map_err(|e| match e.is_fatal() {
            true => SessionEnd::Fatal(e.into()),
            false => SessionEnd::Lost(e.to_string()),
        })?;
    let session_state = Session::new(Publisher::open(&conn).await?);
    let channel = conn.create_channel().await?;
    // Enough unacknowledged messages to keep every HTTP slot busy while some events wait
    // on slow receivers; more would only hold work another process could do.
    let prefetch = (config.max_in_flight * 2).min(u16::MAX as u32) as u16;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let tag = format!(
        "webhook-worker-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    );
    // Manual acknowledgements (no_ack false): a message is settled only by the pipeline.
    let mut consumer = channel
        .basic_consume(
            topology::WORK_QUEUE.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    readiness.set(true);
    backoff.reset();
    info!(queue = topology::WORK_QUEUE, prefetch, "consuming");

    let mut tasks = JoinSet::new();
    let acks = Acks::start(channel.clone());
    let end = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    acks.arrived(delivery.delivery_tag);
                    let (pipeline, session) = (pipeline.clone(), session_state.clone());
                    let acks = acks.handle();
                    // Boxed: the handling of a message is a large future, and tokio moves a
                    // task's future (and its output slot) by value when spawning and when
                    // it ends; a profile of the drain showed those copies.
                    let settled = async move { settle(&pipeline, &session, delivery, acks).await };
                    tasks.spawn(Box::pin(settled));
                }
                Some(Err(e)) => break Err(SessionEnd::Lost(e.to_string())),
                None => break Err(SessionEnd::Lost("the broker cancelled the consumer".into())),
            }
        }
    };
    readiness.set(false);
    // Messages not yet at their request go back to the broker; requests under way finish.
    session_state.closing.cancel();
    let drain_for = match &end {
        Ok(()) => {
            info!(
                in_flight = tasks.len(),
                "stopping: no new messages, draining in-flight work"
            );
            let _ = channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await;
            config.shutdown_timeout
        }
        // Let the requests under way record their outcome.
        Err(_) => config.delivery_timeout + Duration::from_secs(5),
    };
    drain(&mut tasks, drain_for).await;
    acks.finish().await;
    amqp::close(&conn, "webhook-worker stopping").await;
    end
}

async fn drain(tasks: &mut JoinSet<()>, limit: Duration) {
    let all = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(limit, all).await.is_err() {
        warn!(
            abandoned = tasks.len(),
            "in-flight work did not finish in {limit:?}; it will be redelivered"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// Deliveries of one message whose processing panicked before the worker dead-letters it
/// (quorum queues; classic queues only tell a first delivery from a later one).
const MAX_PANICS: i64 = 3;

/// The pause before a message is returned to the queue.
const REQUEUE_PAUSE: Duration = Duration::from_secs(2);

/// Handles a message and settles it with the broker as the pipeline decided. A panic is
/// a bug, but it must not lose the message nor loop on it forever.
async fn settle(pipeline: &Pipeline, session: &Session, delivery: Delivery, acks: AckHandle) {
    let handled = AssertUnwindSafe(pipeline.handle(&delivery, session))
        .catch_unwind()
        .await;
    let disposition = handled.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        // Quorum queues count deliveries; classic ones only say "redelivered", so there the
        // second delivery is the last.
        let headers = delivery.properties.headers().as_ref();
        let count = topology::header_int(headers, "x-delivery-count");
        let deliveries = count.map_or(if delivery.redelivered { 2 } else { 1 }, |n| n + 1);
        let last = match count {
            Some(_) => deliveries >= MAX_PANICS,
            None => delivery.redelivered,
        };
        error!(message = %message_ref(&delivery), panic = %what, deliveries, "processing panicked");
        if last {
            Disposition::DeadLetter(format!(
                "processing panicked on {deliveries} deliveries: {what}"
            ))
        } else {
            Disposition::Requeue(format!("processing panicked: {what}"))
        }
    });
    let kind = MessageKind::of(&delivery).as_str();
    let outcome = match &disposition {
        Disposition::Ack => "acked",
        Disposition::Duplicate => "duplicate",
        Disposition::DeadLetter(_) => "dead_lettered",
        Disposition::Requeue(_) => "requeued",
    };
    pipeline.metrics.consumed(kind, outcome);
    let tag = delivery.delivery_tag;
    let requeued = match disposition {
        Disposition::Ack | Disposition::Duplicate => return acks.ack(tag),
        Disposition::DeadLetter(reason) => {
            warn!(message = %message_ref(&delivery), %reason, "message moved to {}", topology::DEAD_QUEUE);
            match dead_letter(&session.publisher, &delivery, &reason).await {
                Ok(()) => return acks.ack(tag),
                Err(e) => {
                    error!(error = %e, "could not dead-letter the message; returning it to the queue");
                    requeue_later(&delivery).await
                }
            }
        }
        Disposition::Requeue(reason) => {
            warn!(message = %message_ref(&delivery), %reason, "message returned to the queue");
            requeue_later(&delivery).await
        }
    };
    match requeued {
        // Sent: no acknowledgement may cover it now.
        Ok(_) => acks.settled(tag),
        Err(e) => warn!(error = %e, "could not settle a message; the broker will deliver it again"),
    }
}

/// Returns a message to the queue after a pause, so that a fault that persists while the
/// channel lives does not turn into a tight redelivery loop.
async fn requeue_later(delivery: &Delivery) -> Result<bool, lapin::Error> {
    tokio::time::sleep(REQUEUE_PAUSE).await;
    delivery
        .nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await
}

/// Moves a message to the dead-letter queue, unchanged but for the `x-error` header.
async fn dead_letter(
    publisher: &Publisher,
    delivery: &Delivery,
    reason: &str,
) -> Result<(), amqp::PublishError> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    let reason: String = reason.chars().take(1000).collect();
    with_header(&mut headers, "x-error", &reason);
    let properties = delivery.properties.clone().with_headers(headers);
    publisher
        .publish("", topology::DEAD_QUEUE, &delivery.data, properties)
        .await
}

/// Exponential reconnect delays: 0.5 s doubling to 15 s.
#[derive(Default)]
struct Backoff(u32);

impl Backoff {
    fn next(&mut self) -> Duration {
        let delay = Duration::from_millis(500) * 2u32.saturating_pow(self.0.min(5));
        self.0 += 1;
        delay.min(Duration::from_secs(15))
    }

    fn reset(&mut self) {
        self.0 = 0;
    }
}
