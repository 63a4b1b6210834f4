//! The event a producer publishes (CONTRACT §1), parsed and validated in one pure step so
//! that every malformed message gets one precise reason and never reaches the database.

use std::collections::BTreeMap;

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::value::RawValue;
use uuid::Uuid;

/// Largest accepted message body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// A valid event. `data` keeps the producer's exact JSON text, so receivers get it unchanged.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: Uuid,
    pub project_id: String,
    pub event_type: String,
    pub data: Box<RawValue>,
    pub occurred_at: DateTime<Utc>,
    pub trace: TraceContext,
}

/// W3C Trace Context carried in the AMQP headers; a malformed `traceparent` is dropped
/// (with its `tracestate`) so that a new trace starts, as W3C prescribes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceContext {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl TraceContext {
    pub fn new(traceparent: Option<&str>, tracestate: Option<&str>) -> Self {
        match traceparent.filter(|tp| is_valid_traceparent(tp)) {
            Some(tp) => TraceContext {
                traceparent: Some(tp.to_string()),
                tracestate: tracestate
                    .filter(|ts| ts.len() <= 512 && ts.is_ascii())
                    .map(str::to_string),
            },
            None => TraceContext::default(),
        }
    }
}

/// Why a message is not a valid event; becomes the `x-error` header of the dead letter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidEvent(pub String);

fn invalid(msg: impl Into<String>) -> InvalidEvent {
    InvalidEvent(msg.into())
}

impl Event {
    /// Parses a message body; `received_at` stands in for a missing `occurred_at`.
    pub fn parse(
        body: &[u8],
        trace: TraceContext,
        received_at: DateTime<Utc>,
    ) -> Result<Event, InvalidEvent> {
        if body.len() > MAX_BODY_BYTES {
            return Err(invalid(format!(
                "body is {} bytes, over the limit of {MAX_BODY_BYTES} bytes",
                body.len()
            )));
        }
        let text = std::str::from_utf8(body).map_err(|e| {
            invalid(format!(
                "body is not valid UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ))
        })?;
        match text.trim_start().chars().next() {
            None => return Err(invalid("body is empty, expected a JSON object")),
            Some('{') => {}
            Some(_) => {
                let what = match serde_json::from_str::<serde_json::Value>(text) {
                    Ok(v) => format!("body is a JSON {}, expected an object", json_kind(&v)),
                    Err(e) => format!("body is not JSON: {e}"),
                };
                return Err(invalid(what));
            }
        }
        let fields: BTreeMap<String, Box<RawValue>> =
            serde_json::from_str(text).map_err(|e| invalid(format!("body is not JSON: {e}")))?;

        let id = required_string(&fields, "id")?;
        let id = Uuid::parse_str(&id)
            .map_err(|_| invalid(format!("field `id` is not a UUID: {id:?}")))?;
        let project_id = required_string(&fields, "project_id")?;
        if project_id.is_empty() {
            return Err(invalid("field `project_id` is empty"));
        }
        let event_type = required_string(&fields, "event_type")?;
        validate_event_type(&event_type)?;
        let data = fields
            .get("data")
            .cloned()
            .ok_or_else(|| invalid("field `data` is missing"))?;
        let occurred_at = match fields.get("occurred_at").map(|raw| raw.get()) {
            None | Some("null") => received_at,
            Some(_) => {
                let text = required_string(&fields, "occurred_at")?;
                DateTime::parse_from_rfc3339(&text)
                    .map_err(|e| {
                        invalid(format!(
                            "field `occurred_at` is not an RFC 3339 timestamp ({e}): {text:?}"
                        ))
                    })?
                    .with_timezone(&Utc)
            }
        };
        // Postgres keeps microseconds: the timestamp must read the same on every attempt.
        let occurred_at = occurred_at.trunc_subsecs(6);
        Ok(Event {
            id,
            project_id,
            event_type,
            data,
            occurred_at,
            trace,
        })
    }
}

fn required_string(
    fields: &BTreeMap<String, Box<RawValue>>,
    name: &str,
) -> Result<String, InvalidEvent> {
    let raw = fields
        .get(name)
        .ok_or_else(|| invalid(format!("field `{name}` is missing")))?;
    match serde_json::from_str::<serde_json::Value>(raw.get()) {
        Ok(serde_json::Value::String(s)) => Ok(s),
        Ok(other) => Err(invalid(format!(
            "field `{name}` is a JSON {}, expected a string",
            json_kind(&other)
        ))),
        Err(e) => Err(invalid(format!("field `{name}` is not valid JSON: {e}"))),
    }
}

/// 1..255 characters of `[A-Za-z0-9_.:-]`.
pub fn validate_event_type(event_type: &str) -> Result<(), InvalidEvent> {
    if event_type.is_empty() || event_type.len() > 255 {
        return Err(invalid(format!(
            "field `event_type` must be 1..255 characters, got {}",
            event_type.chars().count()
        )));
    }
    if let Some(c) = event_type
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')))
    {
        return Err(invalid(format!(
            "field `event_type` has the character {c:?}; allowed are A-Z a-z 0-9 _ . : -"
        )));
    }
    Ok(())
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, ids not all zero, version not `ff`.
fn is_valid_traceparent(tp: &str) -> bool {
    let parts: Vec<&str> = tp.trim().split('-').collect();
    if parts.len() < 4 {
        return false;
    }
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let (version, trace_id, parent_id, flags) = (parts[0], parts[1], parts[2], parts[3]);
    hex(version, 2)
        && version != "ff"
        && (version != "00" || parts.len() == 4)
        && hex(trace_id, 32)
        && trace_id.bytes().any(|b| b != b'0')
        && hex(parent_id, 16)
        && parent_id.bytes().any(|b| b != b'0')
        && hex(flags, 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Event, InvalidEvent> {
        Event::parse(body.as_bytes(), TraceContext::default(), Utc::now())
    }

    const ID: &str = "0b9c6a3e-4a8f-4a36-9d7e-6c5d3b2a1f00";

    #[test]
    fn accepts_a_full_event_and_keeps_data_verbatim() {
        let body = format!(
            r#"{{"id":"{ID}","project_id":"p1","event_type":"order.created","data":{{"b": 1, "a":[1.50, "x"]}},"occurred_at":"2026-01-02T03:04:05.123+01:00"}}"#
        );
        let event = parse(&body).unwrap();
        assert_eq!(event.id.to_string(), ID);
        assert_eq!(event.data.get(), r#"{"b": 1, "a":[1.50, "x"]}"#);
        assert_eq!(
            event.occurred_at.to_rfc3339(),
            "2026-01-02T02:04:05.123+00:00"
        );
    }

    #[test]
    fn defaults_occurred_at_and_accepts_null_data() {
        let now = Utc::now();
        let body = format!(r#"{{"id":"{ID}","project_id":"p","event_type":"a","data":null}}"#);
        let event = Event::parse(body.as_bytes(), TraceContext::default(), now).unwrap();
        assert_eq!(event.occurred_at, now.trunc_subsecs(6));
        assert_eq!(event.data.get(), "null");
    }

    #[test]
    fn each_broken_rule_has_its_own_reason() {
        let cases = [
            ("", "empty"),
            ("not json", "not JSON"),
            ("[1,2]", "JSON array, expected an object"),
            ("{\"id\": 1", "not JSON"),
            (
                r#"{"project_id":"p","event_type":"a","data":1}"#,
                "`id` is missing",
            ),
            (
                r#"{"id":"nope","project_id":"p","event_type":"a","data":1}"#,
                "not a UUID",
            ),
            (
                &format!(r#"{{"id":"{ID}","project_id":"","event_type":"a","data":1}}"#),
                "`project_id` is empty",
            ),
            (
                &format!(r#"{{"id":"{ID}","project_id":7,"event_type":"a","data":1}}"#),
                "`project_id` is a JSON number",
            ),
            (
                &format!(r#"{{"id":"{ID}","project_id":"p","event_type":"a b","data":1}}"#),
                "character ' '",
            ),
            (
                &format!(r#"{{"id":"{ID}","project_id":"p","event_type":"","data":1}}"#),
                "1..255",
            ),
            (
                &format!(r#"{{"id":"{ID}","project_id":"p","event_type":"a"}}"#),
                "`data` is missing",
            ),
            (
                &format!(
                    r#"{{"id":"{ID}","project_id":"p","event_type":"a","data":1,"occurred_at":"yesterday"}}"#
                ),
                "RFC 3339",
            ),
            (
                &format!(
                    r#"{{"id":"{ID}","project_id":"p","event_type":"a","data":1,"occurred_at":5}}"#
                ),
                "`occurred_at` is a JSON number",
            ),
        ];
        for (body, expected) in cases {
            let err = parse(body).expect_err(body);
            assert!(err.0.contains(expected), "{body:?}: {err}");
        }
        let long_type = "a".repeat(256);
        let err = parse(&format!(
            r#"{{"id":"{ID}","project_id":"p","event_type":"{long_type}","data":1}}"#
        ))
        .unwrap_err();
        assert!(err.0.contains("1..255"), "{err}");
    }

    #[test]
    fn rejects_invalid_utf8_and_huge_bodies() {
        let err =
            Event::parse(b"{\"id\":\"\xff\"}", TraceContext::default(), Utc::now()).unwrap_err();
        assert!(err.0.contains("UTF-8"), "{err}");
        let huge = vec![b' '; MAX_BODY_BYTES + 1];
        let err = Event::parse(&huge, TraceContext::default(), Utc::now()).unwrap_err();
        assert!(err.0.contains("over the limit"), "{err}");
    }

    #[test]
    fn traceparent_is_validated() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            TraceContext::new(Some(good), Some("k=v"))
                .traceparent
                .as_deref(),
            Some(good)
        );
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "garbage",
        ] {
            assert_eq!(
                TraceContext::new(Some(bad), Some("k=v")),
                TraceContext::default(),
                "{bad}"
            );
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn json_value() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(serde_json::Value::from),
                any::<String>().prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(3, 32, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                    prop::collection::btree_map(any::<String>(), inner, 0..6)
                        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #[test]
            fn any_bytes_give_an_event_or_a_reason_never_a_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
                let _ = Event::parse(&body, TraceContext::default(), Utc::now());
            }

            #[test]
            fn any_json_gives_an_event_or_a_reason(value in json_value()) {
                let body = serde_json::to_vec(&value).unwrap();
                if let Err(e) = Event::parse(&body, TraceContext::default(), Utc::now()) {
                    prop_assert!(!e.0.is_empty());
                }
            }

            #[test]
            fn a_valid_event_keeps_its_data_verbatim(
                data in json_value(),
                project in "[^\\x00]{1,40}",
                event_type in "[A-Za-z0-9_.:-]{1,255}",
            ) {
                let data_text = serde_json::to_string(&data).unwrap();
                let body = format!(
                    r#"{{"id":"{ID}","project_id":{},"event_type":"{event_type}","data":{data_text}}}"#,
                    serde_json::to_string(&project).unwrap()
                );
                let event = Event::parse(body.as_bytes(), TraceContext::default(), Utc::now()).unwrap();
                prop_assert_eq!(event.data.get(), data_text.as_str());
                prop_assert_eq!(event.project_id, project);
                prop_assert_eq!(event.event_type, event_type);
            }

            #[test]
            fn event_types_outside_the_alphabet_are_refused(event_type in "[A-Za-z0-9]{0,5}[^A-Za-z0-9_.:-][A-Za-z0-9]{0,5}") {
                prop_assert!(validate_event_type(&event_type).is_err());
            }
        }
    }
}
