//! A webhook row as the worker reads it, and its conversion into a request target: a row
//! written by hand with a bad URL, method, header or secret fails that delivery alone.

use reqwest::Method;
use reqwest::Url;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use uuid::Uuid;

use crate::outcome::ErrorType;
use crate::signature::Secret;

/// The columns of `control_plane.webhooks` that a delivery needs.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WebhookRow {
    #[sqlx(rename = "webhook_id")]
    pub id: Uuid,
    pub url: String,
    pub http_method: String,
    pub headers: serde_json::Value,
    pub secret: Option<String>,
    /// The secret a rotation replaced, also used to sign until `previous_secret_expires_at`.
    pub previous_secret: Option<String>,
    pub previous_secret_expires_at: Option<chrono::DateTime<chrono::Utc>>,
    pub disabled: bool,
    /// Which enabled/disabled state of the webhook this row shows: an attempt counts on
    /// the webhook only if that state has not changed since (CONTRACT §3).
    pub disabled_changed_at: chrono::DateTime<chrono::Utc>,
}

/// Where and how to send: a validated webhook.
#[derive(Debug, Clone)]
pub struct Target {
    pub method: Method,
    pub url: Url,
    pub headers: HeaderMap,
    pub secret: Option<Secret>,
}

/// Headers the worker sets itself; a webhook's own `headers` cannot override them.
pub const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "host",
    "user-agent",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "traceparent",
    "tracestate",
    "transfer-encoding",
    "connection",
];

impl WebhookRow {
    /// Validates the row; the error says which column is unusable and why.
    pub fn target(&self) -> Result<Target, (ErrorType, String)> {
        let url = Url::parse(&self.url).map_err(|e| {
            (
                ErrorType::InvalidUrl,
                format!("url is not a valid URL: {e}"),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err((
                ErrorType::InvalidUrl,
                format!("url scheme {:?} is not http or https", url.scheme()),
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err((ErrorType::InvalidUrl, "url has no host".into()));
        }
        let method = match self.http_method.as_str() {
            "POST" => Method::POST,
            "PUT" => Method::PUT,
            "PATCH" => Method::PATCH,
            other => {
                return Err((
                    ErrorType::InvalidWebhook,
                    format!("http_method {other:?} is not POST, PUT or PATCH"),
                ));
            }
        };
        let headers = custom_headers(&self.headers).map_err(|e| (ErrorType::InvalidWebhook, e))?;
        let secret = self.secret().map_err(|e| (ErrorType::InvalidWebhook, e))?;
        Ok(Target {
            method,
            url,
            headers,
            secret,
        })
    }

    /// The signing secret: the current one, and the previous one while its grace period
    /// lasts. A previous secret is used only with a current one.
    fn secret(&self) -> Result<Option<Secret>, String> {
        let Some(current) = self.secret.as_deref() else {
            return Ok(None);
        };
        let current = Secret::parse(current)?;
        let previous = self
            .previous_secret
            .as_deref()
            .filter(|_| {
                self.previous_secret_expires_at
                    .is_some_and(|at| at > chrono::Utc::now())
            })
            .map(|text| Secret::parse(text).map_err(|e| format!("previous_secret: {e}")))
            .transpose()?;
        Ok(Some(match previous {
            Some(previous) => current.with_previous(previous),
            None => current,
        }))
    }
}

fn custom_headers(value: &serde_json::Value) -> Result<HeaderMap, String> {
    let object = value
        .as_object()
        .ok_or("headers is not a JSON object of strings")?;
    let mut headers = HeaderMap::with_capacity(object.len());
    for (name, value) in object {
        let value = value
            .as_str()
            .ok_or_else(|| format!("header {name:?} has a value that is not a string"))?;
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("header name {name:?} is not a valid HTTP header name"))?;
        if RESERVED_HEADERS.contains(&name.as_str()) {
            continue;
        }
        let value = HeaderValue::from_str(value)
            .map_err(|_| format!("header {name} has a value with control characters"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(
        url: &str,
        method: &str,
        headers: serde_json::Value,
        secret: Option<&str>,
    ) -> WebhookRow {
        WebhookRow {
            id: Uuid::nil(),
            url: url.into(),
            http_method: method.into(),
            headers,
            secret: secret.map(str::to_string),
            previous_secret: None,
            previous_secret_expires_at: None,
            disabled: false,
            disabled_changed_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn a_good_row_becomes_a_target_without_reserved_headers() {
        let t = row(
            "https://example.com/hook",
            "PUT",
            json!({"X-Api-Key": "k", "Content-Type": "text/plain", "Host": "evil"}),
            Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        )
        .target()
        .unwrap();
        assert_eq!(t.method, Method::PUT);
        assert_eq!(t.headers.len(), 1);
        assert_eq!(t.headers["x-api-key"], "k");
        assert!(t.secret.is_some());
    }

    #[test]
    fn each_bad_column_is_named() {
        let mut cases = vec![
            (
                row("not a url", "POST", json!({}), None),
                ErrorType::InvalidUrl,
                "not a valid URL",
            ),
            (
                row("ftp://h/x", "POST", json!({}), None),
                ErrorType::InvalidUrl,
                "scheme",
            ),
            (
                row("http://h/", "GET", json!({}), None),
                ErrorType::InvalidWebhook,
                "http_method",
            ),
            (
                row("http://h/", "POST", json!([1]), None),
                ErrorType::InvalidWebhook,
                "not a JSON object",
            ),
            (
                row("http://h/", "POST", json!({"a": 1}), None),
                ErrorType::InvalidWebhook,
                "not a string",
            ),
            (
                row("http://h/", "POST", json!({"a b": "x"}), None),
                ErrorType::InvalidWebhook,
                "header name",
            ),
            (
                row("http://h/", "POST", json!({"x": "a\r\nInjected: 1"}), None),
                ErrorType::InvalidWebhook,
                "control characters",
            ),
            (
                row("http://h/", "POST", json!({}), Some("whsec_short")),
                ErrorType::InvalidWebhook,
                "secret",
            ),
        ];
        let mut expired = row(
            "http://h/",
            "POST",
            json!({}),
            Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        );
        expired.previous_secret = Some("whsec_short".into());
        expired.previous_secret_expires_at =
            Some(chrono::Utc::now() - chrono::Duration::seconds(1));
        assert!(
            expired.target().is_ok(),
            "an expired previous secret is ignored"
        );
        let mut current = expired.clone();
        current.previous_secret_expires_at = Some(chrono::Utc::now() + chrono::Duration::hours(1));
        cases.push((current, ErrorType::InvalidWebhook, "previous_secret"));
        for (row, error_type, text) in cases {
            let (t, msg) = row.target().unwrap_err();
            assert_eq!(t, error_type, "{msg}");
            assert!(msg.contains(text), "{msg}");
        }
    }
}
