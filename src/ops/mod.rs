//! The operator commands of issue #6, one module per command group. They share the
//! conventions kept here: aligned tables for people, one JSON document with `--json`,
//! times given as RFC 3339 or as a duration ago, a confirmation before anything is
//! re-sent or deleted in bulk, and errors that say what was wrong.

pub mod dead_letters;
pub mod deliveries;
pub mod prune;
pub mod publish;
pub mod replay;
pub mod stats;
pub mod table;
pub mod webhooks;

use std::io::{BufRead, IsTerminal, Write};
use std::str::FromStr;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::amqp;
use crate::config::{Config, redact_url};
use crate::store::Store;

/// How a command prints its result.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
}

impl Output {
    /// Prints `value` as one JSON document with `--json`, otherwise runs `human`.
    pub fn emit<T: Serialize>(&self, value: &T, human: impl FnOnce()) -> anyhow::Result<()> {
        if self.json {
            let text = serde_json::to_string_pretty(value).context("serializing the output")?;
            println!("{text}");
        } else {
            human();
        }
        Ok(())
    }
}

/// A Postgres pool for a command: few connections, and a clear message when the database
/// is not reachable or not migrated.
pub async fn store(config: &Config) -> anyhow::Result<Store> {
    let store = Store::connect_lazy(&config.database_url, 2)
        .with_context(|| format!("invalid DATABASE_URL {}", redact_url(&config.database_url)))?;
    if let Err(e) = store.check_migrated().await {
        bail!("{} ({e})", redact_url(&config.database_url));
    }
    Ok(store)
}

/// A RabbitMQ connection for a command.
pub async fn amqp(config: &Config) -> anyhow::Result<lapin::Connection> {
    amqp::connect(&config.amqp_url)
        .await
        .with_context(|| format!("connecting to {}", redact_url(&config.amqp_url)))
}

/// Asks `question` on the terminal; `yes` (from `--yes`) answers it. Without a terminal
/// to ask on, refuses rather than guessing.
pub fn confirm(question: &str, yes: bool) -> anyhow::Result<bool> {
    if yes {
        return Ok(true);
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!("{question} Refusing without --yes, as standard input is not a terminal");
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush().ok();
    let mut answer = String::new();
    stdin
        .lock()
        .read_line(&mut answer)
        .context("reading the answer")?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "Yes"))
}

/// A point in time on the command line: RFC 3339 (`2026-11-28T12:00:00Z`) or a duration
/// ago (`24h`, `30m`, `7days`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Since(pub DateTime<Utc>);

impl FromStr for Since {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(at) = DateTime::parse_from_rfc3339(s.trim()) {
            return Ok(Since(at.with_timezone(&Utc)));
        }
        let ago = humantime::parse_duration(s.trim())
            .map_err(|_| format!("{s:?} is neither an RFC 3339 time nor a duration such as 24h"))?;
        let ago = chrono::Duration::from_std(ago).map_err(|_| format!("{s:?} is too long ago"))?;
        Ok(Since(Utc::now() - ago))
    }
}

/// A time in a table: `2026-11-28 12:00:05`, UTC, or `-`.
pub fn time(at: Option<DateTime<Utc>>) -> String {
    at.map_or_else(
        || "-".into(),
        |at| at.format("%Y-%m-%d %H:%M:%S").to_string(),
    )
}

/// An optional value in a table, `-` when absent.
pub fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

/// The first `max` characters of `text` on one line, `…` when cut.
pub fn excerpt(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match flat.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &flat[..cut]),
        None => flat,
    }
}

/// Progress on stderr for long runs, only when stderr is a terminal.
pub struct Progress {
    label: &'static str,
    total: usize,
    shown: bool,
}

impl Progress {
    pub fn new(label: &'static str, total: usize) -> Progress {
        Progress {
            label,
            total,
            shown: total > 1 && std::io::stderr().is_terminal(),
        }
    }

    pub fn set(&self, done: usize) {
        if self.shown {
            eprint!("\r{} {done}/{}", self.label, self.total);
            std::io::stderr().flush().ok();
        }
    }

    pub fn finish(&self) {
        if self.shown {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_time_or_a_duration_ago() {
        let at: Since = "2026-11-28T12:00:00Z".parse().unwrap();
        assert_eq!(at.0.to_rfc3339(), "2026-11-28T12:00:00+00:00");
        let ago: Since = "2h".parse().unwrap();
        let diff = Utc::now() - ago.0;
        assert!((diff.num_seconds() - 7200).abs() < 5);
        assert!("yesterday".parse::<Since>().is_err());
    }

    #[test]
    fn excerpts_are_one_line_and_cut() {
        assert_eq!(excerpt("a\nb", 10), "a b");
        assert_eq!(excerpt("héllo world", 5), "héllo…");
    }
}
