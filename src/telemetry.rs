//! Logs and traces. Logs go to stderr as text or one JSON object a line, filtered by
//! `RUST_LOG`, each carrying the `trace_id` and `span_id` it belongs to. Spans are
//! OpenTelemetry spans, recorded and exported over OTLP only when the standard `OTEL_*`
//! variables ask for it: recording spans nobody exports cost a fifth of the worker's CPU.
//! Without an exporter the trace still goes on: each message is handled [`within`] its
//! trace context, so requests, retry messages and log lines continue the producer's trace.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;

use anyhow::{Context as _, bail};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    SpanContext, Status, TraceContextExt, TraceFlags, TraceState, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider};
use tracing::{Level, Span, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;
use crate::event::TraceContext;
use crate::outcome::AttemptResult;

/// The tracer provider, kept to flush the spans still buffered when the process stops.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Exports what is still buffered and stops the exporter. Blocks: call it outside the
    /// async tasks (it still needs the runtime alive for the gRPC exporter).
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("webhook-worker: flushing spans: {e}");
        }
    }
}

/// Installs the logger and the tracer, logging at `info` unless `RUST_LOG` says otherwise.
/// Fails on an OTLP setting that cannot work, such as an unknown protocol.
pub fn init(format: LogFormat) -> anyhow::Result<Telemetry> {
    init_with(format, "info")
}

/// [`init`] with another default log filter (tests run quiet).
pub fn init_with(format: LogFormat, default_filter: &str) -> anyhow::Result<Telemetry> {
    let (provider, exporting) = tracer_provider()?;
    let tracer = provider.tracer("webhook-worker");
    // Our own spans only: a dependency's spans would only add noise to a delivery trace.
    let traced = Targets::new().with_target("webhook_worker", Level::INFO);
    // Nothing here reads OpenTelemetry's current context (trace context is taken from the
    // tracing span), and busy/idle times are not worth a clock read on every poll: each
    // waiting attempt is polled many times, and these two were 12% of a fan-out's CPU.
    let otel = exporting.then(|| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_context_activation(false)
            .with_tracked_inactivity(false)
            .with_filter(traced)
    });
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .event_format(WithTraceIds(tracing_subscriber::fmt::format()))
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .fmt_fields(JsonFields::new())
            .event_format(WithTraceIds(
                tracing_subscriber::fmt::format()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            ))
            .with_filter(filter)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(otel)
        .with(logs)
        .try_init()
        .context("installing the logger")?;
    Ok(Telemetry { provider })
}

/// A provider that samples by `OTEL_TRACES_SAMPLER(_ARG)` and, when an endpoint is set
/// and `OTEL_TRACES_EXPORTER` is not `none`, exports in batches over OTLP; and whether it
/// exports.
fn tracer_provider() -> anyhow::Result<(SdkTracerProvider, bool)> {
    let service = env("OTEL_SERVICE_NAME").unwrap_or_else(|| "webhook-worker".into());
    let resource = Resource::builder()
        .with_service_name(service)
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    let exporter = otlp_exporter()?;
    let exporting = exporter.is_some();
    if let Some(exporter) = exporter {
        builder = builder.with_batch_exporter(exporter);
    }
    Ok((builder.build(), exporting))
}

fn otlp_exporter() -> anyhow::Result<Option<opentelemetry_otlp::SpanExporter>> {
    let endpoint =
        env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
    if endpoint.is_none() || env("OTEL_TRACES_EXPORTER").as_deref() == Some("none") {
        return Ok(None);
    }
    let protocol = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "http/protobuf".into());
    let builder = opentelemetry_otlp::SpanExporter::builder();
    let exporter = match protocol.as_str() {
        "grpc" => builder.with_tonic().build(),
        "http/protobuf" => builder.with_http().build(),
        other => bail!("OTEL_EXPORTER_OTLP_PROTOCOL must be grpc or http/protobuf, not {other:?}"),
    };
    exporter.map(Some).context("setting up the OTLP exporter")
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The parent a span continues: a W3C trace context from a message's headers. An absent
/// or malformed one gives an empty context, and the span starts a new trace.
pub fn parent(trace: &TraceContext) -> Context {
    let mut carrier = HashMap::new();
    if let Some(tp) = &trace.traceparent {
        carrier.insert("traceparent".to_string(), tp.clone());
    }
    if let Some(ts) = &trace.tracestate {
        carrier.insert("tracestate".to_string(), ts.clone());
    }
    TraceContextPropagator::new().extract(&carrier)
}

tokio::task_local! {
    /// The trace context of the message being handled, when no span records it: a child
    /// of the context the message carried, or the root of a new trace.
    static HANDLING: SpanContext;
}

/// Runs `handling` (of a message, or a publish) within the trace of `inbound` (its
/// [`parent`]), or within a new trace when that is empty. Exported spans carry their trace
/// themselves; without an exporter, [`propagate`] and the log lines take it from here.
pub async fn within<F: Future>(inbound: &Context, handling: F) -> F::Output {
    let span = inbound.span();
    let producer = span.span_context();
    let handling_context = if producer.is_valid() {
        child_of(producer)
    } else {
        new_trace()
    };
    HANDLING.scope(handling_context, handling).await
}

/// The root of a new trace, sampled (as the default parent-based sampler would).
fn new_trace() -> SpanContext {
    let ids = RandomIdGenerator::default();
    SpanContext::new(
        ids.new_trace_id(),
        ids.new_span_id(),
        TraceFlags::SAMPLED,
        false,
        TraceState::default(),
    )
}

/// A new span id in `parent`'s trace, with its flags and state.
fn child_of(parent: &SpanContext) -> SpanContext {
    SpanContext::new(
        parent.trace_id(),
        RandomIdGenerator::default().new_span_id(),
        parent.trace_flags(),
        false,
        parent.trace_state().clone(),
    )
}

/// The W3C trace context naming `span` as the parent, for a request or a message that
/// continues the trace. When spans are not recorded (no exporter), a new span id in the
/// trace of the message being handled ([`within`]); outside any, a new trace.
pub fn propagate(span: &Span) -> TraceContext {
    let mut context = span.context();
    if !context.span().span_context().is_valid() {
        let child = HANDLING.try_with(child_of).unwrap_or_else(|_| new_trace());
        context = Context::new().with_remote_span_context(child);
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    TraceContext {
        traceparent: carrier.remove("traceparent"),
        tracestate: carrier.remove("tracestate").filter(|ts| !ts.is_empty()),
    }
}

/// What a span shows of an attempt's result: the response status, and for a failure its
/// error type (under `error_key`) and an error status.
pub fn record_result(span: &Span, result: &AttemptResult, error_key: &'static str) {
    if let Some(status) = result.status {
        span.set_attribute("http.response.status_code", i64::from(status));
    }
    if let Some(error_type) = result.error_type() {
        span.set_attribute(error_key, error_type.as_str());
        span.set_status(Status::error(
            result.error_message().unwrap_or_default().to_string(),
        ));
    }
}

/// Formats a log line with `inner`, adding the trace and span ids of the span it was
/// logged in: first keys of the JSON object, or at the end of a text line.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let cx = Span::current().context();
        let span = cx.span();
        let recorded = span.span_context();
        let ids = if recorded.is_valid() {
            Some((recorded.trace_id(), recorded.span_id()))
        } else {
            HANDLING.try_with(|c| (c.trace_id(), c.span_id())).ok()
        };
        let Some((trace_id, span_id)) = ids else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(
                writer,
                r#"{{"trace_id":"{trace_id}","span_id":"{span_id}",{rest}"#
            ),
            None => writeln!(
                writer,
                "{} trace_id={trace_id} span_id={span_id}",
                line.trim_end()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRODUCER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// The trace id and parent id of a `traceparent`.
    fn ids(trace: &TraceContext) -> (String, String) {
        let tp = trace.traceparent.as_deref().expect("a traceparent");
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{tp}");
        assert_eq!((parts[0], parts[3]), ("00", "01"), "{tp}");
        (parts[1].to_string(), parts[2].to_string())
    }

    #[tokio::test]
    async fn without_recorded_spans_requests_continue_the_messages_trace() {
        let given = TraceContext::new(Some(PRODUCER), Some("vendor=x"));
        let (first, second) = within(&parent(&given), async {
            (propagate(&Span::current()), propagate(&Span::none()))
        })
        .await;
        let (a, b) = (ids(&first), ids(&second));
        assert_eq!(
            a.0, "4bf92f3577b34da6a3ce929d0e0e4736",
            "the producer's trace"
        );
        assert_eq!(b.0, a.0);
        assert_ne!(
            a.1, "00f067aa0ba902b7",
            "a span of this process, not the producer's"
        );
        assert_ne!(a.1, b.1, "each request its own parent id");
        assert_eq!(first.tracestate.as_deref(), Some("vendor=x"));
    }

    #[tokio::test]
    async fn a_message_without_trace_context_starts_one_trace_for_all_it_sends() {
        for given in [
            TraceContext::default(),
            TraceContext::new(Some("00-garbage-01"), None),
        ] {
            let (first, second) = within(&parent(&given), async {
                (propagate(&Span::none()), propagate(&Span::none()))
            })
            .await;
            assert_eq!(ids(&first).0, ids(&second).0);
            assert_ne!(ids(&first).0, "0".repeat(32));
        }
        let outside = (propagate(&Span::none()), propagate(&Span::none()));
        assert_ne!(
            ids(&outside.0).0,
            ids(&outside.1).0,
            "outside a message, new traces"
        );
    }

    /// Log lines written into a shared buffer.
    #[derive(Clone, Default)]
    struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn without_recorded_spans_log_lines_carry_the_messages_trace() {
        let lines = Lines::default();
        let writer = lines.clone();
        let logs = tracing_subscriber::fmt::layer()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .event_format(WithTraceIds(tracing_subscriber::fmt::format()));
        let _default = tracing::subscriber::set_default(tracing_subscriber::registry().with(logs));
        let given = TraceContext::new(Some(PRODUCER), None);
        let sent = within(&parent(&given), async {
            tracing::info!("handling");
            propagate(&Span::current())
        })
        .await;
        let logged = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        assert!(
            logged.contains("handling trace_id=4bf92f3577b34da6a3ce929d0e0e4736 span_id="),
            "{logged}"
        );
        assert!(
            !logged.contains(&ids(&sent).1),
            "the request's span is the log's child"
        );
    }
}
