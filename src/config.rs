//! One typed configuration, read from environment variables or `--flags` (CONTRACT §5),
//! validated once at start-up so that a bad value stops the process with a clear message.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// Everything the worker and the other subcommands need to reach RabbitMQ and Postgres and
/// to decide how deliveries behave. Every field is also an environment variable.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Postgres connection URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true,
        global = true
    )]
    pub database_url: String,

    /// Most Postgres connections this process opens (an extension of the contract).
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub database_pool_size: u32,

    /// RabbitMQ connection URL; the vhost is the path (`%2f` for `/`).
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true,
        global = true
    )]
    pub amqp_url: String,

    /// Address of the `/healthz` and `/readyz` endpoints.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8080", global = true)]
    pub http_addr: SocketAddr,

    /// Delays between attempts: attempt n+1 waits the n-th delay after attempt n failed.
    #[arg(
        long,
        env = "RETRY_SCHEDULE",
        default_value = "5s,5m,30m,2h,5h,10h,14h,20h,24h",
        global = true
    )]
    pub retry_schedule: RetrySchedule,

    /// Consecutive failed attempts that disable a webhook; 0 never disables.
    #[arg(
        long,
        env = "DISABLE_AFTER_FAILURES",
        default_value_t = 5,
        global = true
    )]
    pub disable_after_failures: u32,

    /// The least time the consecutive failures must span before the webhook is disabled.
    #[arg(long, env = "DISABLE_AFTER_FAILING_FOR", default_value = "0s", value_parser = parse_duration, global = true)]
    pub disable_after_failing_for: Duration,

    /// Time limit of one HTTP attempt, response body included.
    #[arg(long, env = "DELIVERY_TIMEOUT", default_value = "15s", value_parser = parse_duration, global = true)]
    pub delivery_timeout: Duration,

    /// Concurrent HTTP attempts in this process, a hard cap.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65535), global = true)]
    pub max_in_flight: u32,

    /// Concurrent attempts to one webhook in this process.
    #[arg(long, env = "MAX_IN_FLIGHT_PER_WEBHOOK", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub max_in_flight_per_webhook: u32,

    /// Allow deliveries to loopback, private and other non-global addresses.
    #[arg(long, env = "ALLOW_PRIVATE_IPS", default_value_t = false, action = clap::ArgAction::Set, global = true)]
    pub allow_private_ips: bool,

    /// How long a SIGTERM or SIGINT waits for in-flight attempts before exiting.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration, global = true)]
    pub shutdown_timeout: Duration,

    /// Type of the worker's queues.
    #[arg(long, env = "QUEUE_TYPE", value_enum, default_value_t = QueueType::Quorum, global = true)]
    pub queue_type: QueueType,

    /// The project of the operational events the worker publishes to `webhook.events`
    /// (`webhook.disabled`, `webhook.delivery.exhausted`); unset, none are published. Off by
    /// default: events nobody subscribed to would only fill the events table.
    #[arg(long, env = "OPERATIONAL_EVENTS_PROJECT", value_parser = clap::builder::NonEmptyStringValueParser::new(), global = true)]
    pub operational_events_project: Option<String>,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// `quorum` queues are replicated and dead-letter at least once; `classic` ones live on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueueType {
    Quorum,
    Classic,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The delays between attempts, each at least 1 ms; never empty-by-accident (an empty
/// schedule is written `none` and means a single attempt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule(Vec<Duration>);

impl RetrySchedule {
    pub fn new(delays: Vec<Duration>) -> Self {
        RetrySchedule(delays)
    }

    pub fn delays(&self) -> &[Duration] {
        &self.0
    }

    /// The distinct delays, ascending: one delay queue each.
    pub fn tiers(&self) -> Vec<Duration> {
        let mut tiers = self.0.clone();
        tiers.sort();
        tiers.dedup();
        tiers
    }
}

impl FromStr for RetrySchedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "none" {
            return Ok(RetrySchedule(Vec::new()));
        }
        let delays = s
            .split(',')
            .map(|part| {
                let delay = parse_duration(part.trim())?;
                if delay < Duration::from_millis(1) {
                    return Err(format!("delay {part:?} must be at least 1ms"));
                }
                if delay.as_millis() > u32::MAX as u128 {
                    return Err(format!(
                        "delay {part:?} is longer than RabbitMQ's TTL limit (~49 days)"
                    ));
                }
                Ok(delay)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RetrySchedule(delays))
    }
}

impl fmt::Display for RetrySchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|d| humantime::format_duration(*d).to_string())
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// Durations as `humantime` writes them: `500ms`, `5s`, `2h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// A URL with its password replaced by `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{path}")
            } else {
                format!("{scheme}://{user}@{host}{path}")
            }
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_default_schedule() {
        let s: RetrySchedule = "5s,5m,30m,2h,5h,10h,14h,20h,24h".parse().unwrap();
        assert_eq!(s.delays().len(), 9);
        assert_eq!(s.delays()[1], Duration::from_secs(300));
        assert_eq!(s.to_string(), "5s,5m,30m,2h,5h,10h,14h,20h,1day");
    }

    #[test]
    fn tiers_are_distinct_and_sorted() {
        let s: RetrySchedule = "3s,200ms,3s,1500ms".parse().unwrap();
        assert_eq!(
            s.tiers(),
            vec![
                Duration::from_millis(200),
                Duration::from_millis(1500),
                Duration::from_secs(3)
            ]
        );
    }

    #[test]
    fn rejects_bad_schedules() {
        assert!("5s,,5m".parse::<RetrySchedule>().is_err());
        assert!("0s".parse::<RetrySchedule>().is_err());
        assert!("soon".parse::<RetrySchedule>().is_err());
        assert!("none".parse::<RetrySchedule>().unwrap().delays().is_empty());
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1/db"),
            "postgres://postgres@127.0.0.1/db"
        );
        assert_eq!(redact_url("postgres://h/db?x=a@b"), "postgres://h/db?x=a@b");
    }
}
