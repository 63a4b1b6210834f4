//! Logs and traces. Logs go to stderr as text or one JSON object a line, filtered by
//! `RUST_LOG`, each carrying the `trace_id` and `span_id` it belongs to. Spans are
//! OpenTelemetry spans, exported over OTLP only when the standard `OTEL_*` variables ask
//! for it; without an exporter they still give every event a trace to continue, so the
//! `traceparent` sent to receivers and carried by retry messages is always real.

use std::collections::HashMap;
use std::fmt;

use anyhow::{Context as _, bail};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Status, TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
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
    let provider = tracer_provider()?;
    let tracer = provider.tracer("webhook-worker");
    // Our own spans only: a dependency's spans would only add noise to a delivery trace.
    let traced = Targets::new().with_target("webhook_worker", Level::INFO);
    // Nothing here reads OpenTelemetry's current context (trace context is taken from the
    // tracing span), and busy/idle times are not worth a clock read on every poll: each
    // waiting attempt is polled many times, and these two were 12% of a fan-out's CPU.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_context_activation(false)
        .with_tracked_inactivity(false)
        .with_filter(traced);
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
/// and `OTEL_TRACES_EXPORTER` is not `none`, exports in batches over OTLP.
fn tracer_provider() -> anyhow::Result<SdkTracerProvider> {
    let service = env("OTEL_SERVICE_NAME").unwrap_or_else(|| "webhook-worker".into());
    let resource = Resource::builder()
        .with_service_name(service)
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if let Some(exporter) = otlp_exporter()? {
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
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

/// The W3C trace context naming `span` as the parent, for a request or a message that
/// continues the trace. Empty when no tracer is installed.
pub fn propagate(span: &Span) -> TraceContext {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
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
        let ids = span.span_context();
        if !ids.is_valid() {
            return self.0.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let (trace_id, span_id) = (ids.trace_id(), ids.span_id());
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
