//! The outbound HTTP client and one delivery attempt over it: no redirects, no proxy from
//! the environment, a timeout over the whole exchange and at most 64 KiB of body read.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use reqwest::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use reqwest::{Client, Response};

use tracing::{Instrument, Span, info_span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::destination::{Blocked, GlobalOnlyResolver};
use crate::outcome::{AttemptResult, ErrorType};
use crate::telemetry;
use crate::webhook::Target;

/// The most of a response body that is read and stored.
pub const MAX_RESPONSE_BODY: usize = 64 * 1024;

pub const USER_AGENT: &str = concat!("webhook-worker/", env!("CARGO_PKG_VERSION"));

/// A client shared by all attempts, so connections to receivers are reused. Proxies from
/// the environment are ignored (a proxy would hide the address actually connected to);
/// unless `allow_private_ips`, names resolve to global addresses only.
pub fn client(allow_private_ips: bool) -> reqwest::Result<Client> {
    let builder = Client::builder()
        .user_agent(USER_AGENT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .pool_idle_timeout(Duration::from_secs(60));
    match allow_private_ips {
        true => builder.build(),
        false => builder.dns_resolver(Arc::new(GlobalOnlyResolver)).build(),
    }
}

/// What is sent: the parts of the request that do not depend on the webhook.
pub struct Message<'a> {
    pub event_id: &'a str,
    pub body: &'a [u8],
}

/// Builds the request body `{"type", "timestamp", "data"}` with `data` verbatim.
pub fn body(event_type: &str, occurred_at: DateTime<Utc>, data: &str) -> Vec<u8> {
    let timestamp = occurred_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
    let mut out = Vec::with_capacity(data.len() + event_type.len() + 64);
    out.extend_from_slice(b"{\"type\":");
    serde_json::to_writer(&mut out, event_type).expect("a string serializes");
    out.extend_from_slice(b",\"timestamp\":");
    serde_json::to_writer(&mut out, &timestamp).expect("a string serializes");
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(data.as_bytes());
    out.push(b'}');
    out
}

/// Makes one attempt; never fails, every problem is an `AttemptResult` with its error type.
pub async fn send(
    client: &Client,
    target: &Target,
    msg: &Message<'_>,
    timeout: Duration,
) -> AttemptResult {
    let started = Instant::now();
    let timestamp = Utc::now().timestamp();
    let mut headers = target.headers.clone();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert("webhook-id", header_value(msg.event_id));
    headers.insert("webhook-timestamp", header_value(&timestamp.to_string()));
    if let Some(secret) = &target.secret {
        let signature = secret.sign(msg.event_id, timestamp, msg.body);
        headers.insert("webhook-signature", header_value(&signature));
    }
    let span = client_span(target);
    let trace = telemetry::propagate(&span);
    if let Some(tp) = &trace.traceparent {
        headers.insert("traceparent", header_value(tp));
    }
    if let Some(ts) = &trace.tracestate {
        headers.insert("tracestate", header_value(ts));
    }
    let request = client
        .request(target.method.clone(), target.url.clone())
        .headers(headers)
        .body(msg.body.to_vec());

    let exchange = async {
        let response = request.send().await?;
        read_response(response).await
    };
    let mut result = match tokio::time::timeout(timeout, exchange)
        .instrument(span.clone())
        .await
    {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => {
            let e = e.without_url();
            AttemptResult::failed(classify(&e), describe(&e))
        }
        Err(_) => AttemptResult::failed(
            ErrorType::RequestTimeout,
            format!(
                "no complete response within {}",
                humantime::format_duration(timeout)
            ),
        ),
    };
    result.duration = started.elapsed();
    telemetry::record_result(&span, &result, "error.type");
    result
}

/// The HTTP client span (OpenTelemetry HTTP conventions). The URL is left out on purpose:
/// webhook URLs often carry their credentials in the path or query (a Slack hook, a token),
/// and traces are read by more people than the webhooks table; `webhook_id` on the
/// attempt span leads to it.
fn client_span(target: &Target) -> Span {
    let url = &target.url;
    let span = info_span!("http", otel.name = %target.method, otel.kind = "client");
    span.set_attribute("http.request.method", target.method.to_string());
    span.set_attribute("url.scheme", url.scheme().to_string());
    span.set_attribute(
        "server.address",
        url.host_str().unwrap_or_default().to_string(),
    );
    if let Some(port) = url.port_or_known_default() {
        span.set_attribute("server.port", i64::from(port));
    }
    span
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).expect("generated header values are visible ASCII")
}

async fn read_response(mut response: Response) -> reqwest::Result<AttemptResult> {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, Utc::now()));
    let mut body = Vec::new();
    while body.len() < MAX_RESPONSE_BODY {
        match response.chunk().await? {
            Some(chunk) => {
                let room = MAX_RESPONSE_BODY - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            None => break,
        }
    }
    let body = String::from_utf8_lossy(&body).replace('\0', "\u{FFFD}");
    let error = (!(200..300).contains(&status)).then(|| {
        let reason = reqwest::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        (
            ErrorType::HttpError,
            format!("HTTP {status} {reason}").trim_end().to_string(),
        )
    });
    Ok(AttemptResult {
        status: Some(status),
        body: Some(body),
        error,
        retry_after,
        duration: Duration::ZERO,
    })
}

/// `Retry-After` as delay-seconds or an HTTP date, relative to `now`.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at: DateTime<Utc> = httpdate::parse_http_date(value).ok()?.into();
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

fn classify(e: &reqwest::Error) -> ErrorType {
    if e.is_timeout() {
        return ErrorType::RequestTimeout;
    }
    if e.is_builder() {
        return ErrorType::InvalidUrl;
    }
    for cause in causes(e) {
        if cause.is::<Blocked>() {
            return ErrorType::BlockedDestination;
        }
        if cause.is::<rustls::Error>() {
            return ErrorType::TlsError;
        }
    }
    ErrorType::UrlNotReachable
}

/// The causes of an error, innermost last. An `io::Error` hides the error it wraps from
/// `source()`, so the walk steps into it.
fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(e.source(), |cause| {
        match cause.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static))
                .or_else(|| cause.source()),
            None => cause.source(),
        }
    })
}

/// The error and its causes on one line, without the URL (it may carry credentials).
fn describe(e: &reqwest::Error) -> String {
    let mut parts = vec![e.to_string()];
    for cause in causes(e) {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_keeps_data_verbatim() {
        let at = DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z")
            .unwrap()
            .with_timezone(&Utc);
        let body = body("order.created", at, r#"{"b": 1,  "a":2}"#);
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"type":"order.created","timestamp":"2026-01-02T03:04:05Z","data":{"b": 1,  "a":2}}"#
        );
    }

    #[test]
    fn retry_after_accepts_seconds_and_dates() {
        let now = DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Fri, 02 Jan 2026 03:04:35 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Fri, 02 Jan 2026 03:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
