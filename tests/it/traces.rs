//! Traces: the binary exports its spans over OTLP (gRPC and HTTP/protobuf) to a real
//! collector built on `opentelemetry-proto`. One trace per event continues the producer's
//! `traceparent`, the receiver joins it, and a retry joins it too.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use lapin::BasicProperties;
use lapin::types::FieldTable;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use prost::Message;
use serde_json::json;
use tokio::net::TcpListener;
use webhook_worker::amqp::with_header;
use webhook_worker::topology;

use crate::harness::{Receiver, Reply, TestEnv, WebhookSpec, WorkerProcess, event};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PRODUCER_SPAN: &str = "00f067aa0ba902b7";

/// Spans as a collector received them, with the service name of their resource.
#[derive(Clone, Default)]
struct Collected(Arc<Mutex<Vec<(String, Span)>>>);

impl Collected {
    fn add(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.0.lock().unwrap();
        for resource_spans in request.resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| string(kv.value.as_ref()?.value.as_ref()?))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                spans.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
    }

    fn spans(&self) -> Vec<(String, Span)> {
        self.0.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl TraceService for Collected {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC collector on loopback; its endpoint URL.
async fn grpc_collector(collected: Collected) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collected))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    format!("http://{addr}")
}

/// An OTLP/HTTP collector (protobuf bodies on `/v1/traces`) on loopback; its endpoint URL.
async fn http_collector(collected: Collected) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| async move {
            let request = ExportTraceServiceRequest::decode(body)
                .map_err(|_| axum::http::StatusCode::BAD_REQUEST)?;
            collected.add(request);
            let response = ExportTraceServiceResponse::default().encode_to_vec();
            Ok::<_, axum::http::StatusCode>((
                [("content-type", "application/x-protobuf")],
                response,
            ))
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn string(value: &AnyValue) -> Option<String> {
    match value {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        AnyValue::BoolValue(b) => Some(b.to_string()),
        _ => None,
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| string(kv.value.as_ref()?.value.as_ref()?))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The trace and span ids on the "attempt failed" log line, as JSON keys or text pairs.
fn failed_attempt_log_ids(logs: &str, format: &str) -> (String, String) {
    let line = logs
        .lines()
        .find(|l| l.contains("attempt failed"))
        .expect("an \"attempt failed\" line");
    if format == "json" {
        let v: serde_json::Value = serde_json::from_str(line).expect("one JSON object a line");
        let id = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        return (id("trace_id"), id("span_id"));
    }
    let id = |k: &str| {
        let pair = line.split(' ').find_map(|w| w.strip_prefix(k));
        pair.unwrap_or_default().to_string()
    };
    (id("trace_id="), id("span_id="))
}

/// Publishes one event with the producer's `traceparent` to a webhook that fails once,
/// then checks the trace the worker exported through `protocol`.
async fn a_delivery_trace_reaches_the_collector(protocol: &str, log_format: &str) {
    let env = TestEnv::new().await;
    let collected = Collected::default();
    let endpoint = match protocol {
        "grpc" => grpc_collector(collected.clone()).await,
        _ => http_collector(collected.clone()).await,
    };
    let rx = Receiver::start().await;
    let url = rx.url("hook", vec![Reply::Status(500), Reply::Status(204)]);
    let hook = env
        .add_webhook(WebhookSpec::new("traced", "order.created", &url))
        .await;
    let child = WorkerProcess::command(
        &env,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
            ("OTEL_SERVICE_NAME", "traced-worker"),
            ("RETRY_SCHEDULE", "1s"),
            ("LOG_FORMAT", log_format),
        ],
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut worker = WorkerProcess { child };
    let stderr = worker.child.stderr.take().unwrap();
    let logs = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap());
    let (event_id, body) = event("traced", "order.created", json!({"n": 1}));
    let traceparent = format!("00-{TRACE_ID}-{PRODUCER_SPAN}-01");
    let mut headers = FieldTable::default();
    with_header(&mut headers, "traceparent", &traceparent);
    with_header(&mut headers, "tracestate", "vendor=1");
    env.declare_topology().await;
    env.publish_raw(
        topology::EXCHANGE,
        "order.created",
        &serde_json::to_vec(&body).unwrap(),
        BasicProperties::default().with_headers(headers),
    )
    .await;
    let seen = rx.wait_for("hook", 2, Duration::from_secs(30)).await;
    env.wait_for_status(hook, event_id, &["delivered"], Duration::from_secs(30))
        .await;

    // Flushed on SIGTERM: nothing is exported before the batch delay (5 s) otherwise.
    worker.signal("-TERM");
    assert_eq!(worker.wait().await, Some(0));
    let logs = logs.join().unwrap();

    // The receiver joined the producer's trace, as a child of the HTTP client span.
    let mut request_parents = Vec::new();
    for request in &seen {
        let tp = request.headers["traceparent"].to_str().unwrap();
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(
            (parts[0], parts[1], parts[3]),
            ("00", TRACE_ID, "01"),
            "{tp}"
        );
        assert_ne!(
            parts[2], PRODUCER_SPAN,
            "the worker's own span is the parent"
        );
        assert_eq!(request.headers["tracestate"], "vendor=1");
        request_parents.push(parts[2].to_string());
    }

    let spans = collected.spans();
    assert!(spans.iter().all(|(service, _)| service == "traced-worker"));
    let spans: Vec<Span> = spans.into_iter().map(|(_, s)| s).collect();
    assert!(
        spans.iter().all(|s| hex(&s.trace_id) == TRACE_ID),
        "every span is in the producer's trace: {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    let by_id: HashMap<String, &Span> = spans.iter().map(|s| (hex(&s.span_id), s)).collect();
    let parent_of = |s: &Span| by_id.get(&hex(&s.parent_span_id)).copied();
    let named = |name: &str| spans.iter().filter(|s| s.name == name).collect::<Vec<_>>();

    let consumes = named("process webhook.events.work");
    assert_eq!(consumes.len(), 2, "the event and its retry message");
    let first = consumes
        .iter()
        .find(|s| hex(&s.parent_span_id) == PRODUCER_SPAN)
        .expect("the event's span continues the producer's span");
    assert_eq!(first.kind, SpanKind::Consumer as i32);
    assert_eq!(attr(first, "messaging.system").as_deref(), Some("rabbitmq"));
    assert_eq!(attr(first, "event_id"), Some(event_id.to_string()));

    let fan_out = named("fan-out");
    assert_eq!(fan_out.len(), 1);
    assert_eq!(
        parent_of(fan_out[0]).map(|s| &s.span_id),
        Some(&first.span_id)
    );
    assert_eq!(attr(fan_out[0], "deliveries").as_deref(), Some("1"));

    let mut attempts = named("webhook attempt");
    attempts.sort_by_key(|s| attr(s, "attempt"));
    assert_eq!(attempts.len(), 2);
    assert_eq!(
        parent_of(attempts[0]).map(|s| &s.span_id),
        Some(&fan_out[0].span_id)
    );
    let delivery = env.delivery(hook, event_id).await.unwrap();
    for (n, attempt) in attempts.iter().enumerate() {
        assert_eq!(attr(attempt, "attempt"), Some((n + 1).to_string()));
        assert_eq!(attr(attempt, "event_id"), Some(event_id.to_string()));
        assert_eq!(attr(attempt, "webhook_id"), Some(hook.to_string()));
        assert_eq!(attr(attempt, "delivery_id"), Some(delivery.id.to_string()));
    }
    assert_eq!(
        attr(attempts[0], "http.response.status_code").as_deref(),
        Some("500")
    );
    assert_eq!(
        attr(attempts[0], "error_type").as_deref(),
        Some("HTTP_ERROR")
    );
    assert_eq!(
        attempts[0].status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );
    assert_eq!(
        attr(attempts[1], "http.response.status_code").as_deref(),
        Some("204")
    );
    assert_eq!(attr(attempts[1], "error_type"), None);

    // The failed attempt's log line names its trace and span.
    let span_of_log = failed_attempt_log_ids(&logs, log_format);
    assert_eq!(
        span_of_log,
        (TRACE_ID.to_string(), hex(&attempts[0].span_id)),
        "{logs}"
    );

    // The retry message carried the first attempt's context: its consume span is a child
    // of that attempt, and the second attempt a child of that consume span.
    let retry = parent_of(attempts[1]).expect("the second attempt has a parent");
    assert_eq!(retry.name, "process webhook.events.work");
    assert_eq!(hex(&retry.parent_span_id), hex(&attempts[0].span_id));
    assert_eq!(
        attr(retry, "webhook_worker.message").as_deref(),
        Some("retry")
    );

    // Inside each attempt, the HTTP client span whose id the receiver saw.
    for (attempt, parent) in attempts.iter().zip(&request_parents) {
        let client = by_id
            .get(parent)
            .expect("the receiver's parent span was exported");
        assert_eq!(client.kind, SpanKind::Client as i32);
        assert_eq!(client.name, "POST");
        assert_eq!(hex(&client.parent_span_id), hex(&attempt.span_id));
        assert_eq!(attr(client, "http.request.method").as_deref(), Some("POST"));
        assert_eq!(
            attr(client, "http.response.status_code"),
            attr(attempt, "http.response.status_code")
        );
    }
}

#[tokio::test]
async fn spans_export_over_otlp_grpc_in_the_producers_trace() {
    a_delivery_trace_reaches_the_collector("grpc", "text").await;
}

#[tokio::test]
async fn spans_export_over_otlp_http_protobuf_in_the_producers_trace() {
    a_delivery_trace_reaches_the_collector("http/protobuf", "json").await;
}

#[tokio::test]
async fn an_unusable_otlp_protocol_stops_the_process_with_a_clear_error() {
    let env = TestEnv::new().await;
    let out = WorkerProcess::command(
        &env,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ],
    )
    .stderr(Stdio::piped())
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL must be grpc or http/protobuf"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_publish_command_exports_a_producer_span_the_worker_continues() {
    let env = TestEnv::new().await;
    let collected = Collected::default();
    let endpoint = http_collector(collected.clone()).await;
    let rx = Receiver::start().await;
    let url = rx.url("hook", vec![Reply::Status(204)]);
    env.add_webhook(WebhookSpec::new("traced", "order.created", &url))
        .await;
    let otel = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())];
    let worker = WorkerProcess::spawn(&env, &otel);
    let traceparent = format!("00-{TRACE_ID}-{PRODUCER_SPAN}-01");
    let args = ["publish", "--project", "traced", "--type", "order.created"];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_webhook-worker"))
        .args(args)
        .args(["--traceparent", &traceparent])
        .envs([("AMQP_URL", env.amqp_url.as_str())])
        .envs(otel)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    rx.wait_for("hook", 1, Duration::from_secs(30)).await;
    worker.signal("-TERM");
    assert_eq!(worker.wait().await, Some(0));

    let spans: Vec<Span> = collected.spans().into_iter().map(|(_, s)| s).collect();
    let publish = spans
        .iter()
        .find(|s| s.name == "publish webhook.events")
        .expect("the command's producer span was exported before it exited");
    assert_eq!(publish.kind, SpanKind::Producer as i32);
    assert_eq!(hex(&publish.trace_id), TRACE_ID);
    assert_eq!(hex(&publish.parent_span_id), PRODUCER_SPAN);
    let consume = spans
        .iter()
        .find(|s| s.name == "process webhook.events.work")
        .expect("the worker's span");
    assert_eq!(hex(&consume.parent_span_id), hex(&publish.span_id));
}
