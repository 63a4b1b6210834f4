//! webhook-worker turns events published to RabbitMQ into signed HTTP webhook deliveries.
//!
//! How a message flows through the modules:
//!
//! - [`worker`] owns the RabbitMQ session: it declares the [`topology`], consumes the work
//!   queue and settles every message as the [`pipeline`] decides (ack, dead-letter, requeue);
//!   [`acks`] acknowledges many finished messages in one frame.
//! - [`pipeline`] handles one message. A producer's [`event`] is stored once and fanned out
//!   by the [`store`] into one delivery per matching webhook; a retry [`message`] claims
//!   attempt N of one delivery.
//! - Each attempt turns the [`webhook`] row into a target, checked by [`destination`], is
//!   sent by [`http`] (signed with [`signature`]), judged by the pure retry policy in [`outcome`], and recorded by the
//!   [`store`] together with the webhook's failure counter; a retry goes to a delay queue
//!   through [`amqp`]'s confirmed publisher before the message is acknowledged, and so do
//!   the operational events of [`notify`] when an attempt disabled its webhook or ended its
//!   delivery.
//! - [`batch`] groups the writes every message makes (storing its event, recording a
//!   success) into one statement for many messages.
//! - [`config`] and [`cli`] are the process's surface, [`health`] its probes,
//!   [`metrics`] its numbers and [`telemetry`] its logs and traces; [`ops`] holds the
//!   operator commands (webhooks, deliveries, replay, dead letters, stats, publish,
//!   prune), which work on the same tables and queues.

pub mod acks;
pub mod amqp;
pub mod batch;
pub mod cli;
pub mod config;
pub mod destination;
pub mod event;
pub mod health;
pub mod http;
pub mod message;
pub mod metrics;
pub mod notify;
pub mod ops;
pub mod outcome;
pub mod park;
pub mod pipeline;
pub mod publish;
pub mod shutdown;
pub mod signature;
pub mod store;
pub mod telemetry;
pub mod topology;
pub mod webhook;
pub mod webhook_limit;
pub mod worker;

pub use config::Config;
pub use worker::Worker;
