//! The configuration the filter runs with, once read and validated (`config/raw.rs`).

use std::collections::BTreeMap;
use std::time::Duration;

use super::custom_tags::CustomTag;
use super::fields::is_header_value;
use super::metric_overrides::MetricOverride;

/// Trace context formats the filter reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    /// W3C Trace Context Level 1: `traceparent` and `tracestate`.
    W3c,
    /// B3: the `x-b3-*` headers, and the single `b3` header when the request carried one.
    B3,
}

/// How spans are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanNaming {
    /// `GET`: the method only, what the HTTP semantic conventions ask for when no route template
    /// is known (the default).
    Method,
    /// `GET reviews-v2`: the method and the name of the route Envoy chose, where Istio names one
    /// (a VirtualService route's `name`); else the method. A route name is not a path template,
    /// so it is never `http.route`.
    MethodRoute,
    /// `GET /api/items`: method and path, without the query string (one name per path: opt in
    /// only where paths are few).
    MethodPath,
}

/// The validated configuration the filter runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where telemetry goes.
    pub collector: Collector,
    /// Tracing settings.
    pub traces: Traces,
    /// Metric settings.
    pub metrics: Metrics,
    /// Access-log settings.
    pub logs: Logs,
    /// Batching, queueing and retry settings shared by all signals.
    pub export: Export,
    /// Extra resource attributes added to everything the proxy exports.
    pub resource_attributes: BTreeMap<String, String>,
}

/// The OTLP collector, reached through an Envoy cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Collector {
    /// Envoy cluster name passed to `dispatch_http_call` / `dispatch_grpc_call`.
    pub cluster: String,
    /// OTLP/HTTP (protobuf) or OTLP/gRPC.
    pub protocol: Protocol,
    /// `:authority` of export requests.
    pub authority: String,
    /// Timeout of one export call.
    pub timeout: Duration,
    /// Extra request headers, in a stable order.
    pub headers: Vec<(String, String)>,
    /// Headers whose values come from the proxy's environment (`vmConfig.env` with
    /// `valueFrom: HOST`), so that credentials never sit in a manifest: `(header, variable)`.
    pub headers_from_env: Vec<(String, String)>,
}

impl Collector {
    /// Add the headers configured from the environment, looked up with `env`. Returns the
    /// variables that were not set (their headers are not sent). Values are never logged.
    pub fn resolve_env_headers(&mut self, env: impl Fn(&str) -> Option<String>) -> Vec<String> {
        let mut missing = Vec::new();
        for (name, var) in &self.headers_from_env {
            match env(var).filter(|v| is_header_value(v)) {
                Some(value) => self.headers.push((name.clone(), value)),
                None => missing.push(var.clone()),
            }
        }
        missing
    }
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// OTLP/HTTP with protobuf bodies (`POST /v1/traces`, ...), usually port 4318.
    #[default]
    Http,
    /// OTLP/gRPC (`opentelemetry.proto.collector.*.v1.*Service/Export`), usually port 4317;
    /// the cluster must speak HTTP/2.
    Grpc,
}

/// Tracing settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Traces {
    /// Whether spans are recorded and exported (context is propagated either way).
    pub enabled: bool,
    /// Probability that a new trace (one with no incoming decision) is sampled.
    pub sampling_ratio: f64,
    /// Formats read (first valid one wins, in this order) and written (all of them).
    pub propagation: Vec<Propagation>,
    /// How spans are named.
    pub span_name: SpanNaming,
    /// Request headers recorded as `http.request.header.<name>` span attributes; none by default.
    /// Sensitive headers ([`crate::config::ALWAYS_SENSITIVE`] and `traces.sensitive_headers`) are refused.
    pub request_headers: Vec<String>,
    /// Whether the headers Envoy forces a trace with (`x-client-trace-id`, and
    /// `x-envoy-force-trace` on internal requests) sample a new trace whatever the ratio.
    pub force_headers: bool,
    /// Span attributes from a literal, the proxy's environment or a request header (Istio's
    /// `customTags`); environment tags become literals at configure time.
    pub custom_tags: Vec<CustomTag>,
}

/// Metric settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    /// Whether Istio's standard metrics are recorded and exported.
    pub enabled: bool,
    /// Interval between two metric exports.
    pub export_interval: Duration,
    /// Cumulative (one series per proxy and label set, Prometheus' model) or delta.
    pub temporality: Temporality,
    /// Most label sets per proxy; later ones fold into the `otel.metric.overflow` series.
    pub max_series: usize,
    /// Which kinds of histogram the duration and sizes are recorded in.
    pub histograms: Histograms,
    /// How long a series without requests keeps being exported (cumulative temporality) before
    /// its totals are dropped; `None`: for as long as the VM lives.
    pub series_expiry: Option<Duration>,
    /// Whether a peer may be taken from the `x-envoy-peer-metadata` headers when Istio's filter
    /// state has none (plain Envoy, old Istio). Any client can forge those headers.
    pub peer_metadata_headers: bool,
    /// Istio's Telemetry `metrics[].overrides[]`: metrics disabled, labels removed or set by
    /// CEL, per metric and side (see [`crate::metrics::overrides`]).
    pub overrides: Vec<MetricOverride>,
}

/// Access-log settings: one OTLP log record per request, Istio's access-log fields as attributes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Logs {
    /// Whether access logs are recorded and exported.
    pub enabled: bool,
    /// Which requests get a log record.
    pub mode: LogMode,
    /// A CEL expression a request must satisfy to be logged (Istio's
    /// `accessLogging[].filter.expression`, e.g. `response.code >= 400`), on top of `mode`.
    pub filter: Option<String>,
}

/// Which requests get an access-log record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogMode {
    /// Every request.
    #[default]
    All,
    /// Requests that failed: status 400 and above, no response, or Envoy response flags set.
    Errors,
    /// Requests whose trace is sampled, so that every log has its span.
    Sampled,
}

/// Which histograms the duration and sizes are recorded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Histograms {
    /// Istio's fixed buckets, under Istio's names (what Istio's dashboards and Kiali read).
    #[default]
    Explicit,
    /// Base-2 exponential histograms only, under names of their own.
    Exponential,
    /// Both: Istio's series exactly as with `Explicit`, and the exponential ones beside them.
    Both,
}

impl Histograms {
    /// Whether Istio's fixed-bucket histograms are recorded.
    pub fn explicit(self) -> bool {
        self != Histograms::Exponential
    }

    /// Whether exponential histograms are recorded.
    pub fn exponential(self) -> bool {
        self != Histograms::Explicit
    }
}

/// Aggregation temporality of exported metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Temporality {
    /// Totals since a start time.
    Cumulative,
    /// Changes since the previous export.
    Delta,
}

/// Batching, queueing and retry settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Export {
    /// A batch is sent at least this often when items are waiting.
    pub flush_interval: Duration,
    /// Most items in one export request; a full batch is sent without waiting for the interval.
    pub max_batch: usize,
    /// Most items waiting per proxy worker; past it the oldest are dropped and counted.
    pub max_queue: usize,
    /// Most export calls in flight per proxy worker.
    pub max_in_flight: usize,
    /// Retries of a retryable failure (429, 502, 503, 504, no answer) before the batch is dropped.
    pub max_retries: u32,
}
