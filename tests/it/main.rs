//! Integration tests: the real worker against the local RabbitMQ and Postgres, delivering
//! to a real HTTP receiver on loopback. Each test has its own database and vhost.

mod harness;

mod batching;
mod crash;
mod delivery;
mod events;
mod limits;
mod metrics;
mod notifications;
mod ops;
mod process;
mod receivers;
mod retries;
mod secrets;
mod ssrf;
mod timing;
mod traces;
mod webhook_state;
