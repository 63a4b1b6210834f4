//! What one attempt produced and what follows from it, as plain data: the retry policy is a
//! pure function of the schedule, the attempt number and the response (CONTRACT §3).

use std::fmt;
use std::time::Duration;

/// The closed set of `error_type` values (CONTRACT §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorType {
    InvalidUrl,
    BlockedDestination,
    UrlNotReachable,
    RequestTimeout,
    TlsError,
    HttpError,
    InvalidWebhook,
    WebhookDisabled,
}

impl ErrorType {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::InvalidUrl => "INVALID_URL",
            ErrorType::BlockedDestination => "BLOCKED_DESTINATION",
            ErrorType::UrlNotReachable => "URL_NOT_REACHABLE",
            ErrorType::RequestTimeout => "REQUEST_TIMEOUT",
            ErrorType::TlsError => "TLS_ERROR",
            ErrorType::HttpError => "HTTP_ERROR",
            ErrorType::InvalidWebhook => "INVALID_WEBHOOK",
            ErrorType::WebhookDisabled => "WEBHOOK_DISABLED",
        }
    }

    /// A refusal that no later attempt could change.
    pub fn is_retryable(self) -> bool {
        !matches!(
            self,
            ErrorType::InvalidUrl | ErrorType::InvalidWebhook | ErrorType::BlockedDestination
        )
    }
}

impl fmt::Display for ErrorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of one attempt, whether or not a request was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptResult {
    pub status: Option<u16>,
    /// The first 64 KiB of the response body, as text.
    pub body: Option<String>,
    pub error: Option<(ErrorType, String)>,
    /// `Retry-After` of a 429 or 503 response, as a delay from now.
    pub retry_after: Option<Duration>,
    pub duration: Duration,
}

impl AttemptResult {
    /// A failed attempt without a response: a refusal, or a network error.
    pub fn failed(error_type: ErrorType, message: impl Into<String>) -> Self {
        AttemptResult {
            status: None,
            body: None,
            error: Some((error_type, message.into())),
            retry_after: None,
            duration: Duration::ZERO,
        }
    }

    pub fn succeeded(&self) -> bool {
        self.error.is_none() && matches!(self.status, Some(200..=299))
    }

    pub fn error_type(&self) -> Option<ErrorType> {
        self.error.as_ref().map(|(t, _)| *t)
    }

    pub fn error_message(&self) -> Option<&str> {
        self.error.as_ref().map(|(_, m)| m.as_str())
    }
}

/// What happens to the delivery after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx: the delivery is `delivered`.
    Delivered,
    /// The next attempt waits `after` in the delay queue of that length.
    Retry { after: Duration },
    /// `permanently_failed`: the schedule is used up or the failure cannot be retried.
    GiveUp,
    /// `410 Gone`: `permanently_failed`, and the webhook is disabled at once.
    Gone,
}

/// Decides the outcome of attempt `attempt` (1-based) under `schedule`.
pub fn decide(schedule: &[Duration], attempt: u32, result: &AttemptResult) -> Outcome {
    if result.succeeded() {
        return Outcome::Delivered;
    }
    if result.status == Some(410) {
        return Outcome::Gone;
    }
    if result.error_type().is_some_and(|t| !t.is_retryable()) {
        return Outcome::GiveUp;
    }
    let Some(&base) = schedule.get(attempt as usize - 1) else {
        return Outcome::GiveUp;
    };
    let after = match result.retry_after {
        Some(retry_after) if matches!(result.status, Some(429 | 503)) => {
            let wanted = base.max(retry_after);
            schedule
                .iter()
                .copied()
                .filter(|d| *d >= wanted)
                .min()
                .or_else(|| schedule.iter().copied().max())
                .unwrap_or(base)
        }
        _ => base,
    };
    Outcome::Retry { after }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn status(code: u16, retry_after: Option<Duration>) -> AttemptResult {
        AttemptResult {
            status: Some(code),
            body: None,
            error: (!(200..300).contains(&code))
                .then(|| (ErrorType::HttpError, format!("HTTP {code}"))),
            retry_after,
            duration: ms(3),
        }
    }

    #[test]
    fn success_is_any_2xx() {
        for code in [200, 201, 204, 299] {
            assert_eq!(decide(&[ms(5)], 1, &status(code, None)), Outcome::Delivered);
        }
        for code in [199, 301, 302, 400, 500] {
            assert_ne!(decide(&[ms(5)], 1, &status(code, None)), Outcome::Delivered);
        }
    }

    #[test]
    fn retries_follow_the_schedule_then_give_up() {
        let schedule = [ms(200), ms(1500), ms(3000)];
        assert_eq!(
            decide(&schedule, 1, &status(500, None)),
            Outcome::Retry { after: ms(200) }
        );
        assert_eq!(
            decide(&schedule, 2, &status(500, None)),
            Outcome::Retry { after: ms(1500) }
        );
        assert_eq!(
            decide(&schedule, 3, &status(500, None)),
            Outcome::Retry { after: ms(3000) }
        );
        assert_eq!(decide(&schedule, 4, &status(500, None)), Outcome::GiveUp);
        assert_eq!(decide(&[], 1, &status(500, None)), Outcome::GiveUp);
    }

    #[test]
    fn retry_after_picks_the_smallest_delay_that_covers_it() {
        let schedule = [ms(200), ms(1500), ms(3000)];
        let r = |code, secs| status(code, Some(Duration::from_secs_f64(secs)));
        assert_eq!(
            decide(&schedule, 1, &r(429, 1.0)),
            Outcome::Retry { after: ms(1500) }
        );
        assert_eq!(
            decide(&schedule, 1, &r(503, 2.0)),
            Outcome::Retry { after: ms(3000) }
        );
        assert_eq!(
            decide(&schedule, 1, &r(429, 0.1)),
            Outcome::Retry { after: ms(200) }
        );
        // Longer than any delay: the largest one.
        assert_eq!(
            decide(&schedule, 1, &r(429, 60.0)),
            Outcome::Retry { after: ms(3000) }
        );
        // Never shorter than the schedule's own delay for this attempt.
        assert_eq!(
            decide(&schedule, 3, &r(429, 0.1)),
            Outcome::Retry { after: ms(3000) }
        );
        // Only 429 and 503 are heeded.
        assert_eq!(
            decide(&schedule, 1, &r(500, 2.0)),
            Outcome::Retry { after: ms(200) }
        );
        // It still uses one attempt of the schedule.
        assert_eq!(decide(&schedule, 4, &r(429, 1.0)), Outcome::GiveUp);
    }

    #[test]
    fn gone_and_refusals_are_final() {
        let schedule = [ms(200)];
        assert_eq!(decide(&schedule, 1, &status(410, None)), Outcome::Gone);
        for t in [
            ErrorType::InvalidUrl,
            ErrorType::InvalidWebhook,
            ErrorType::BlockedDestination,
        ] {
            assert_eq!(
                decide(&schedule, 1, &AttemptResult::failed(t, "x")),
                Outcome::GiveUp
            );
        }
        for t in [
            ErrorType::UrlNotReachable,
            ErrorType::RequestTimeout,
            ErrorType::TlsError,
        ] {
            assert_eq!(
                decide(&schedule, 1, &AttemptResult::failed(t, "x")),
                Outcome::Retry { after: ms(200) }
            );
        }
    }
}
