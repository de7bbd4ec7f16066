//! The `pluginConfig` contract: parsed from JSON, validated, and compiled into [`Config`].
//!
//! Every rejection names the field (`traces.sampling_ratio`) and says why, so that a user
//! reading Envoy's log or `meshtel validate` output knows exactly what to fix.

pub mod custom_tags;
pub mod error;
pub(crate) mod fields;
pub mod metric_overrides;
pub mod scopes;

pub use error::ConfigError;
pub use fields::MAX_EXPRESSION_LEN;
use fields::{expression, is_header_name};

use std::collections::BTreeMap;
use std::time::Duration;

use crate::quote::{name as quoted_name, quote};
use fields::Fields;
use metric_overrides::MetricOverride;

use custom_tags::CustomTag;

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
    /// Sensitive headers ([`ALWAYS_SENSITIVE`] and `traces.sensitive_headers`) are refused.
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

const MAX_TIMEOUT_MS: u64 = 60_000;
const MAX_INTERVAL_MS: u64 = 3_600_000;
/// Longest `metrics.series_expiry_ms`: a week.
const MAX_EXPIRY_MS: u64 = 7 * 24 * 3_600_000;
const MAX_BATCH: u64 = 16_384;
const MAX_QUEUE: u64 = 1_048_576;
const MAX_SERIES: u64 = 100_000;

/// Longest refusal [`parse`] gives, as text: a field path and a reason, each quoting at most a
/// prefix of the input (see [`crate::quote`]), so that it fits one log line.
pub const MAX_ERROR_LEN: usize = 1_024;

/// Parse and validate a `pluginConfig` JSON document: the settings of a proxy that no scope
/// matches, every scope checked (see [`crate::config::scopes`]).
pub fn parse(json: &[u8]) -> Result<Config, ConfigError> {
    parse_scoped(json, None)
}

/// [`parse`] for a proxy in `namespace` with `labels`: its settings with the scopes that match
/// it applied.
pub fn parse_for(json: &[u8], namespace: &str, labels: &BTreeMap<String, String>) -> Result<Config, ConfigError> {
    parse_scoped(json, Some((namespace, labels)))
}

fn parse_scoped(json: &[u8], proxy: Option<(&str, &BTreeMap<String, String>)>) -> Result<Config, ConfigError> {
    let doc: serde_json::Value = serde_json::from_slice(json).map_err(|e| ConfigError::new(".", e.to_string()))?;
    let resolved = scopes::resolve(doc, proxy)?;
    for (i, alone) in &resolved.each {
        typed(alone).map_err(|e| ConfigError { field: format!("scopes[{i}]: {}", e.field), reason: e.reason })?;
    }
    typed(&resolved.doc)
}

/// The document read and validated: one function, so that the reader and the validator are in
/// the module once (inlined into both calls above, they were twice: +17 KB).
#[inline(never)]
fn typed(doc: &serde_json::Value) -> Result<Config, ConfigError> {
    Config::try_from(RawConfig::read(doc)?)
}

const PROPAGATIONS: [(&str, Propagation); 2] = [("w3c", Propagation::W3c), ("b3", Propagation::B3)];
const SPAN_NAMINGS: [(&str, SpanNaming); 3] = [
    ("method", SpanNaming::Method),
    ("method_route", SpanNaming::MethodRoute),
    ("method_path", SpanNaming::MethodPath),
];
const PROTOCOLS: [(&str, Protocol); 2] = [("http", Protocol::Http), ("grpc", Protocol::Grpc)];
const LOG_MODES: [(&str, LogMode); 3] =
    [("all", LogMode::All), ("errors", LogMode::Errors), ("sampled", LogMode::Sampled)];
const HISTOGRAMS: [(&str, Histograms); 3] =
    [("explicit", Histograms::Explicit), ("exponential", Histograms::Exponential), ("both", Histograms::Both)];
const TEMPORALITIES: [(&str, Temporality); 2] =
    [("cumulative", Temporality::Cumulative), ("delta", Temporality::Delta)];

/// The document as written, defaults filled in, not yet validated.
struct RawConfig {
    collector: Option<RawCollector>,
    traces: RawTraces,
    metrics: RawMetrics,
    logs: RawLogs,
    export: RawExport,
    resource: RawResource,
}

impl RawConfig {
    fn read(doc: &serde_json::Value) -> Result<Self, ConfigError> {
        let f = Fields::new("", doc, &["collector", "traces", "metrics", "logs", "export", "resource", "scopes"])?;
        let section = |name: &str, known: &[&str]| f.object(name, known);
        Ok(Self {
            collector: section(
                "collector",
                &["cluster", "protocol", "authority", "timeout_ms", "headers", "headers_from_env"],
            )?
            .map(|c| RawCollector::read(&c))
            .transpose()?,
            traces: match section(
                "traces",
                &[
                    "enabled",
                    "sampling_ratio",
                    "propagation",
                    "span_name",
                    "request_headers",
                    "sensitive_headers",
                    "force_headers",
                    "custom_tags",
                ],
            )? {
                Some(t) => RawTraces::read(&t)?,
                None => RawTraces::default(),
            },
            metrics: match section(
                "metrics",
                &[
                    "enabled",
                    "export_interval_ms",
                    "temporality",
                    "max_series",
                    "histograms",
                    "series_expiry_ms",
                    "peer_metadata_headers",
                    "overrides",
                ],
            )? {
                Some(m) => RawMetrics::read(&m)?,
                None => RawMetrics::default(),
            },
            logs: match section("logs", &["enabled", "mode", "filter"])? {
                Some(l) => RawLogs {
                    enabled: l.bool("enabled", false)?,
                    mode: l.variant("mode", &LOG_MODES, LogMode::All)?,
                    filter: l.string("filter")?,
                },
                None => RawLogs::default(),
            },
            export: match section(
                "export",
                &["flush_interval_ms", "max_batch", "max_queue", "max_in_flight", "max_retries"],
            )? {
                Some(e) => RawExport::read(&e)?,
                None => RawExport::default(),
            },
            resource: match section("resource", &["attributes"])? {
                Some(r) => RawResource { attributes: r.string_map("attributes")? },
                None => RawResource::default(),
            },
        })
    }
}

struct RawCollector {
    cluster: Option<String>,
    protocol: Protocol,
    authority: Option<String>,
    timeout_ms: u64,
    headers: BTreeMap<String, String>,
    headers_from_env: BTreeMap<String, String>,
}

impl RawCollector {
    fn read(f: &Fields<'_>) -> Result<Self, ConfigError> {
        Ok(Self {
            cluster: f.string("cluster")?,
            protocol: f.variant("protocol", &PROTOCOLS, Protocol::Http)?,
            authority: f.string("authority")?,
            timeout_ms: f.u64("timeout_ms", default_timeout_ms())?,
            headers: f.string_map("headers")?,
            headers_from_env: f.string_map("headers_from_env")?,
        })
    }
}

struct RawTraces {
    enabled: bool,
    sampling_ratio: f64,
    propagation: Vec<Propagation>,
    span_name: SpanNaming,
    request_headers: Vec<String>,
    sensitive_headers: Vec<String>,
    force_headers: bool,
    custom_tags: Vec<CustomTag>,
}

impl Default for RawTraces {
    fn default() -> Self {
        Self {
            enabled: true,
            sampling_ratio: 1.0,
            propagation: vec![Propagation::W3c, Propagation::B3],
            span_name: SpanNaming::Method,
            request_headers: Vec::new(),
            sensitive_headers: Vec::new(),
            force_headers: true,
            custom_tags: Vec::new(),
        }
    }
}

impl RawTraces {
    fn read(f: &Fields<'_>) -> Result<Self, ConfigError> {
        let d = Self::default();
        Ok(Self {
            enabled: f.bool("enabled", d.enabled)?,
            sampling_ratio: f.f64("sampling_ratio", d.sampling_ratio)?,
            propagation: f.variants("propagation", &PROPAGATIONS, d.propagation)?,
            span_name: f.variant("span_name", &SPAN_NAMINGS, d.span_name)?,
            request_headers: f.strings("request_headers")?,
            sensitive_headers: f.strings("sensitive_headers")?,
            force_headers: f.bool("force_headers", d.force_headers)?,
            custom_tags: custom_tags::read(f)?,
        })
    }
}

struct RawMetrics {
    enabled: bool,
    export_interval_ms: u64,
    temporality: Temporality,
    max_series: u64,
    histograms: Histograms,
    series_expiry_ms: u64,
    peer_metadata_headers: bool,
    overrides: Vec<MetricOverride>,
}

impl Default for RawMetrics {
    fn default() -> Self {
        Self {
            enabled: true,
            export_interval_ms: 10_000,
            temporality: Temporality::Cumulative,
            max_series: 2_000,
            histograms: Histograms::Explicit,
            series_expiry_ms: 600_000,
            peer_metadata_headers: true,
            overrides: Vec::new(),
        }
    }
}

impl RawMetrics {
    fn read(f: &Fields<'_>) -> Result<Self, ConfigError> {
        let d = Self::default();
        Ok(Self {
            enabled: f.bool("enabled", d.enabled)?,
            export_interval_ms: f.u64("export_interval_ms", d.export_interval_ms)?,
            temporality: f.variant("temporality", &TEMPORALITIES, d.temporality)?,
            max_series: f.u64("max_series", d.max_series)?,
            histograms: f.variant("histograms", &HISTOGRAMS, d.histograms)?,
            series_expiry_ms: f.u64("series_expiry_ms", d.series_expiry_ms)?,
            peer_metadata_headers: f.bool("peer_metadata_headers", d.peer_metadata_headers)?,
            overrides: metric_overrides::read(f)?,
        })
    }
}

#[derive(Default)]
struct RawLogs {
    enabled: bool,
    mode: LogMode,
    filter: Option<String>,
}

struct RawExport {
    flush_interval_ms: u64,
    max_batch: u64,
    max_queue: u64,
    max_in_flight: u64,
    max_retries: u64,
}

impl Default for RawExport {
    fn default() -> Self {
        Self { flush_interval_ms: 1_000, max_batch: 512, max_queue: 8_192, max_in_flight: 4, max_retries: 3 }
    }
}

impl RawExport {
    fn read(f: &Fields<'_>) -> Result<Self, ConfigError> {
        let d = Self::default();
        Ok(Self {
            flush_interval_ms: f.u64("flush_interval_ms", d.flush_interval_ms)?,
            max_batch: f.u64("max_batch", d.max_batch)?,
            max_queue: f.u64("max_queue", d.max_queue)?,
            max_in_flight: f.u64("max_in_flight", d.max_in_flight)?,
            max_retries: f.u64("max_retries", d.max_retries)?,
        })
    }
}

#[derive(Default)]
struct RawResource {
    attributes: BTreeMap<String, String>,
}

fn default_timeout_ms() -> u64 {
    5_000
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        let collector = raw.collector.ok_or_else(|| ConfigError::new("collector", "is required"))?;
        if raw.logs.enabled && raw.logs.mode == LogMode::Sampled && !raw.traces.enabled {
            return Err(ConfigError::new(
                "logs.mode",
                "sampled logs the requests whose trace is sampled, and traces.enabled is false: use all or errors",
            ));
        }
        Ok(Config {
            collector: collector.compile()?,
            traces: raw.traces.compile()?,
            metrics: raw.metrics.compile()?,
            logs: Logs {
                enabled: raw.logs.enabled,
                mode: raw.logs.mode,
                filter: expression("logs.filter", raw.logs.filter)?,
            },
            export: raw.export.compile()?,
            resource_attributes: compile_resource(raw.resource)?,
        })
    }
}

impl RawCollector {
    fn compile(self) -> Result<Collector, ConfigError> {
        let cluster = self.cluster.unwrap_or_default();
        if cluster.trim().is_empty() {
            return Err(ConfigError::new(
                "collector.cluster",
                "is required: the Envoy cluster of the OTLP collector, e.g. outbound|4318||otel-collector.observability.svc.cluster.local",
            ));
        }
        let authority = match self.authority {
            Some(a) if a.trim().is_empty() => {
                return Err(ConfigError::new("collector.authority", "must not be empty"))
            }
            Some(a) => a,
            None => istio_cluster_authority(&cluster).ok_or_else(|| {
                ConfigError::new(
                    "collector.authority",
                    format!("is required when collector.cluster is not an Istio cluster name (outbound|PORT|SUBSET|HOST), got {}", quote(&cluster)),
                )
            })?,
        };
        in_range("collector.timeout_ms", self.timeout_ms, 1, MAX_TIMEOUT_MS)?;
        let check_name = |field: &str, name: &str| {
            if !is_header_name(name) {
                return Err(ConfigError::new(field, "header names must be lower-case HTTP tokens"));
            }
            if RESERVED_HEADERS.contains(&name) {
                return Err(ConfigError::new(field, "is set by meshtel itself and cannot be overridden"));
            }
            Ok(())
        };
        let mut headers = Vec::with_capacity(self.headers.len());
        for (name, value) in self.headers {
            let field = format!("collector.headers.{}", quoted_name(&name));
            check_name(&field, &name)?;
            if !is_header_value(&value) {
                return Err(ConfigError::new(&field, "header values must not contain CR, LF or NUL"));
            }
            headers.push((name, value));
        }
        let mut headers_from_env = Vec::with_capacity(self.headers_from_env.len());
        for (name, var) in self.headers_from_env {
            let field = format!("collector.headers_from_env.{}", quoted_name(&name));
            check_name(&field, &name)?;
            if headers.iter().any(|(h, _)| *h == name) {
                return Err(ConfigError::new(&field, "is also set in collector.headers"));
            }
            let valid_var = var.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid_var {
                return Err(ConfigError::new(&field, format!("{} is not an environment variable name", quote(&var))));
            }
            headers_from_env.push((name, var));
        }
        Ok(Collector {
            cluster,
            protocol: self.protocol,
            authority,
            timeout: Duration::from_millis(self.timeout_ms),
            headers,
            headers_from_env,
        })
    }
}

const RESERVED_HEADERS: &[&str] = &["content-type", "content-length", "host", "te"];

/// Headers that carry credentials: never recorded, whatever the configuration says.
pub const ALWAYS_SENSITIVE: &[&str] = &["authorization", "proxy-authorization", "cookie", "set-cookie"];
const MAX_RECORDED_HEADERS: usize = 32;

impl RawTraces {
    fn compile(self) -> Result<Traces, ConfigError> {
        let ratio = self.sampling_ratio;
        if !(0.0..=1.0).contains(&ratio) {
            return Err(ConfigError::new(
                "traces.sampling_ratio",
                format!("must be between 0 and 1, got {}", number_text(ratio)),
            ));
        }
        let mut propagation = Vec::with_capacity(self.propagation.len());
        for p in self.propagation {
            if propagation.contains(&p) {
                return Err(ConfigError::new("traces.propagation", format!("lists {p:?} twice")));
            }
            propagation.push(p);
        }
        let mut sensitive: Vec<String> = ALWAYS_SENSITIVE.iter().map(|h| h.to_string()).collect();
        for (i, h) in self.sensitive_headers.into_iter().enumerate() {
            if !is_header_name(&h) {
                return Err(ConfigError::new(
                    &format!("traces.sensitive_headers[{i}]"),
                    format!("{} is not a lower-case header name", quote(&h)),
                ));
            }
            sensitive.push(h);
        }
        let mut request_headers: Vec<String> = Vec::with_capacity(self.request_headers.len());
        for (i, h) in self.request_headers.into_iter().enumerate() {
            let field = format!("traces.request_headers[{i}]");
            if !is_header_name(&h) {
                return Err(ConfigError::new(&field, format!("{} is not a lower-case header name", quote(&h))));
            }
            if sensitive.contains(&h) {
                return Err(ConfigError::new(
                    &field,
                    format!("{} is sensitive and can never be recorded", quoted_name(&h)),
                ));
            }
            if request_headers.len() >= MAX_RECORDED_HEADERS {
                return Err(ConfigError::new(
                    "traces.request_headers",
                    format!("at most {MAX_RECORDED_HEADERS} headers"),
                ));
            }
            if !request_headers.contains(&h) {
                request_headers.push(h);
            }
        }
        custom_tags::refuse_sensitive(&self.custom_tags, &sensitive)?;
        Ok(Traces {
            enabled: self.enabled,
            sampling_ratio: ratio,
            propagation,
            span_name: self.span_name,
            request_headers,
            force_headers: self.force_headers,
            custom_tags: self.custom_tags,
        })
    }
}

impl RawMetrics {
    fn compile(self) -> Result<Metrics, ConfigError> {
        in_range("metrics.export_interval_ms", self.export_interval_ms, 1_000, MAX_INTERVAL_MS)?;
        in_range("metrics.max_series", self.max_series, 1, MAX_SERIES)?;
        in_range("metrics.series_expiry_ms", self.series_expiry_ms, 0, MAX_EXPIRY_MS)?;
        // A series is stamped at each export: an expiry shorter than the interval would drop
        // series that are still live.
        if self.series_expiry_ms != 0 && self.series_expiry_ms < self.export_interval_ms {
            return Err(ConfigError::new(
                "metrics.series_expiry_ms",
                format!(
                    "must be 0 (never) or at least metrics.export_interval_ms ({}), got {}",
                    self.export_interval_ms, self.series_expiry_ms
                ),
            ));
        }
        Ok(Metrics {
            enabled: self.enabled,
            export_interval: Duration::from_millis(self.export_interval_ms),
            temporality: self.temporality,
            max_series: checked(self.max_series),
            histograms: self.histograms,
            series_expiry: (self.series_expiry_ms != 0).then(|| Duration::from_millis(self.series_expiry_ms)),
            peer_metadata_headers: self.peer_metadata_headers,
            overrides: self.overrides,
        })
    }
}

impl RawExport {
    fn compile(self) -> Result<Export, ConfigError> {
        in_range("export.flush_interval_ms", self.flush_interval_ms, 10, MAX_INTERVAL_MS)?;
        in_range("export.max_batch", self.max_batch, 1, MAX_BATCH)?;
        in_range("export.max_queue", self.max_queue, 1, MAX_QUEUE)?;
        if self.max_queue < self.max_batch {
            return Err(ConfigError::new(
                "export.max_queue",
                format!("must be at least export.max_batch ({}), got {}", self.max_batch, self.max_queue),
            ));
        }
        in_range("export.max_in_flight", self.max_in_flight, 1, 64)?;
        in_range("export.max_retries", self.max_retries, 0, 10)?;
        Ok(Export {
            flush_interval: Duration::from_millis(self.flush_interval_ms),
            max_batch: checked(self.max_batch),
            max_queue: checked(self.max_queue),
            max_in_flight: checked(self.max_in_flight),
            max_retries: checked(self.max_retries),
        })
    }
}

fn compile_resource(raw: RawResource) -> Result<BTreeMap<String, String>, ConfigError> {
    if let Some(key) = raw.attributes.keys().find(|k| k.trim().is_empty()) {
        return Err(ConfigError::new(
            "resource.attributes",
            format!("attribute names must not be empty, got {}", quote(key)),
        ));
    }
    Ok(raw.attributes)
}

/// `v` as JSON writes it. (serde_json's float formatting is in the module anyway; core's `{}` for
/// f64 would add its own, ~15 KB.)
pub fn number_text(v: f64) -> String {
    serde_json::Number::from_f64(v).map_or_else(|| "a non-finite number".to_string(), |n| n.to_string())
}

/// A value already checked to be in range for `T`.
fn checked<T: TryFrom<u64> + Default>(v: u64) -> T {
    T::try_from(v).unwrap_or_default()
}

fn in_range<T: PartialOrd + std::fmt::Display>(field: &str, value: T, min: T, max: T) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::new(field, format!("must be between {min} and {max}, got {value}")));
    }
    Ok(())
}

fn is_header_value(value: &str) -> bool {
    !value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0)
}

/// The `host:port` an Istio cluster name such as `outbound|4318||otel.obs.svc.cluster.local` points at.
pub fn istio_cluster_authority(cluster: &str) -> Option<String> {
    let mut parts = cluster.split('|');
    let (direction, port, _subset, host) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || direction != "outbound" || host.is_empty() {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    Some(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        parse(json.as_bytes()).unwrap_err().to_string()
    }

    const MINIMAL: &str =
        r#"{"collector":{"cluster":"outbound|4318||otel-collector.observability.svc.cluster.local"}}"#;

    #[test]
    fn minimal_config_takes_documented_defaults() {
        let c = parse(MINIMAL.as_bytes()).unwrap();
        assert_eq!(c.collector.authority, "otel-collector.observability.svc.cluster.local:4318");
        assert_eq!(c.collector.timeout, Duration::from_secs(5));
        assert!(c.traces.enabled && c.metrics.enabled);
        assert_eq!(c.traces.sampling_ratio, 1.0);
        assert_eq!(c.traces.propagation, vec![Propagation::W3c, Propagation::B3]);
        assert_eq!(c.traces.span_name, SpanNaming::Method, "the HTTP conventions' default");
        assert_eq!(c.metrics.export_interval, Duration::from_secs(10));
        assert_eq!((c.metrics.temporality, c.metrics.max_series), (Temporality::Cumulative, 2000));
        assert_eq!(c.metrics.histograms, Histograms::Explicit, "Istio's buckets unless asked");
        assert_eq!(c.export.flush_interval, Duration::from_secs(1));
        assert_eq!((c.export.max_batch, c.export.max_queue), (512, 8192));
        assert_eq!((c.export.max_in_flight, c.export.max_retries), (4, 3));
        assert_eq!(c.collector.protocol, Protocol::Http);
        assert_eq!(c.logs, Logs { enabled: false, mode: LogMode::All, filter: None });
    }

    /// Every refusal that quotes input quotes a prefix of it: a 2 MB value, key or header name
    /// gives a line that fits a log line, naming the field and the length.
    #[test]
    fn refusals_quote_at_most_a_prefix_of_the_input() {
        let big = "v".repeat(2 * 1024 * 1024);
        let cut = format!("\"{}\"... (cut, 2097152 bytes)", "v".repeat(crate::quote::MAX_QUOTED));
        let collector = r#""collector":{"cluster":"outbound|4318||otel.obs.svc.cluster.local"}"#;
        let cases = [
            // invalid type
            format!(r#"{{{collector},"metrics":{{"max_series":"{big}"}}}}"#),
            // unknown field, at the top and nested
            format!(r#"{{{collector},"{big}":1}}"#),
            format!(r#"{{{collector},"traces":{{"{big}":1}}}}"#),
            // unknown variant
            format!(r#"{{{collector},"logs":{{"mode":"{big}"}}}}"#),
            // an authority that cannot be derived from the cluster
            format!(r#"{{"collector":{{"cluster":"{big}"}}}}"#),
            // header names, header values and environment variables
            format!(r#"{{"collector":{{"cluster":"outbound|4318||o.svc","headers":{{"X{big}":"x"}}}}}}"#),
            format!(r#"{{"collector":{{"cluster":"outbound|4318||o.svc","headers_from_env":{{"x-k":"-{big}"}}}}}}"#),
            format!(r#"{{{collector},"traces":{{"request_headers":["X{big}"]}}}}"#),
            format!(r#"{{{collector},"traces":{{"sensitive_headers":["X{big}"]}}}}"#),
        ];
        for (i, json) in cases.iter().enumerate() {
            let Err(e) = parse(json.as_bytes()).map_err(|e| e.to_string()) else { panic!("case {i} was accepted") };
            assert!(e.len() <= MAX_ERROR_LEN, "{} bytes: {}", e.len(), &e[..200]);
            assert!(e.contains("(cut, 209715") && e.contains(&cut[1..40]), "{e}");
        }
        let e = err(&format!(r#"{{{collector},"metrics":{{"max_series":"{big}"}}}}"#));
        assert_eq!(e, format!("metrics.max_series: invalid type: string {cut}, expected a non-negative integer"));
        let blank = " ".repeat(4096);
        let e = err(&format!(r#"{{{collector},"resource":{{"attributes":{{"{blank}":"x"}}}}}}"#));
        assert!(e.len() < 300 && e.ends_with("... (cut, 4096 bytes)"), "{e}");
    }

    #[test]
    fn logs_and_protocol_parse_and_name_bad_values() {
        let c = parse(
            br#"{"collector":{"cluster":"outbound|4317||c.ns.svc.cluster.local","protocol":"grpc"},
                 "logs":{"enabled":true,"mode":"errors"}}"#,
        )
        .unwrap();
        assert_eq!((c.collector.protocol, c.logs.enabled, c.logs.mode), (Protocol::Grpc, true, LogMode::Errors));
        let e = err(r#"{"collector":{"cluster":"outbound|4317||c","protocol":"thrift"}}"#);
        assert!(e.starts_with("collector.protocol: unknown variant `thrift`"), "{e}");
        let e = err(r#"{"collector":{"cluster":"outbound|4317||c"},"logs":{"mode":"some"}}"#);
        assert!(e.starts_with("logs.mode: unknown variant `some`"), "{e}");
        let e = err(r#"{"collector":{"cluster":"outbound|4317||c"},"logs":{"format":"json"}}"#);
        assert!(e.starts_with("logs.format: unknown field `format`"), "{e}");
        let e = err(
            r#"{"collector":{"cluster":"outbound|4317||c"},"logs":{"enabled":true,"mode":"sampled"},"traces":{"enabled":false}}"#,
        );
        assert!(e.starts_with("logs.mode: sampled logs the requests whose trace is sampled"), "{e}");
    }

    #[test]
    fn full_documented_example_parses() {
        let c = parse(
            br#"{
              "collector": {"cluster": "outbound|4318||otel-collector.observability.svc.cluster.local",
                            "authority": "otel:4318", "timeout_ms": 2000, "headers": {"x-api-key": "k"}},
              "traces": {"enabled": true, "sampling_ratio": 0.25, "propagation": ["b3"], "span_name": "method_route"},
              "metrics": {"enabled": false, "export_interval_ms": 15000, "temporality": "delta", "max_series": 50,
                          "histograms": "both"},
              "export": {"flush_interval_ms": 500, "max_batch": 100, "max_queue": 1000, "max_in_flight": 2, "max_retries": 0},
              "resource": {"attributes": {"deployment.environment.name": "prod"}}
            }"#,
        )
        .unwrap();
        assert_eq!(c.collector.authority, "otel:4318");
        assert_eq!(c.collector.headers, vec![("x-api-key".into(), "k".into())]);
        assert_eq!(c.traces.propagation, vec![Propagation::B3]);
        assert_eq!(c.traces.span_name, SpanNaming::MethodRoute);
        assert!(!c.metrics.enabled);
        assert_eq!((c.metrics.temporality, c.metrics.max_series), (Temporality::Delta, 50));
        assert_eq!(c.metrics.histograms, Histograms::Both);
        assert_eq!(c.export.max_retries, 0);
        assert_eq!(c.resource_attributes["deployment.environment.name"], "prod");
    }

    #[test]
    fn rejects_sampling_ratio_out_of_range_naming_the_field() {
        assert_eq!(
            err(r#"{"collector":{"cluster":"outbound|4318||c.ns.svc.cluster.local"},"traces":{"sampling_ratio":1.5}}"#),
            "traces.sampling_ratio: must be between 0 and 1, got 1.5"
        );
    }

    #[test]
    fn rejects_unknown_fields_with_their_path() {
        let e = err(r#"{"collector":{"cluster":"outbound|4318||c"},"traces":{"sampling":1}}"#);
        assert!(e.starts_with("traces.sampling: unknown field `sampling`"), "{e}");
        let e = err(r#"{"collector":{"cluster":"x","authority":"a"},"tracing":{}}"#);
        assert!(e.starts_with("tracing: unknown field `tracing`"), "{e}");
    }

    #[test]
    fn rejects_wrong_types_and_unknown_propagation() {
        let e = err(r#"{"collector":{"cluster":"outbound|4318||c"},"export":{"max_batch":"10"}}"#);
        assert!(e.starts_with("export.max_batch: invalid type"), "{e}");
        let e = err(r#"{"collector":{"cluster":"outbound|4318||c"},"traces":{"propagation":["jaeger"]}}"#);
        assert!(e.starts_with("traces.propagation[0]: unknown variant `jaeger`"), "{e}");
        let e = err(r#"{"collector":{"cluster":"outbound|4318||c"},"traces":{"propagation":["b3","b3"]}}"#);
        assert_eq!(e, "traces.propagation: lists B3 twice");
        let e = err(r#"{"collector":{"cluster":"outbound|4318||c"},"metrics":{"histograms":"native"}}"#);
        assert!(e.starts_with("metrics.histograms: unknown variant `native`"), "{e}");
    }

    #[test]
    fn requires_a_collector_cluster() {
        assert_eq!(err("{}"), "collector: is required");
        assert!(err(r#"{"collector":{}}"#).starts_with("collector.cluster: is required"));
        assert!(err("not json").starts_with(".: expected"));
    }

    #[test]
    fn requires_authority_for_non_istio_cluster_names() {
        let e = err(r#"{"collector":{"cluster":"otel"}}"#);
        assert!(e.starts_with("collector.authority: is required"), "{e}");
        let c = parse(br#"{"collector":{"cluster":"otel","authority":"otel:4318"}}"#).unwrap();
        assert_eq!(c.collector.cluster, "otel");
    }

    #[test]
    fn rejects_out_of_range_export_settings() {
        let base = r#"{"collector":{"cluster":"outbound|4318||c"},"export":"#;
        assert_eq!(
            err(&format!(r#"{base}{{"max_batch":0}}}}"#)),
            "export.max_batch: must be between 1 and 16384, got 0"
        );
        assert_eq!(
            err(&format!(r#"{base}{{"max_batch":100,"max_queue":10}}}}"#)),
            "export.max_queue: must be at least export.max_batch (100), got 10"
        );
        assert_eq!(
            err(&format!(r#"{base}{{"flush_interval_ms":1}}}}"#)),
            "export.flush_interval_ms: must be between 10 and 3600000, got 1"
        );
        assert!(err(r#"{"collector":{"cluster":"outbound|4318||c","timeout_ms":0}}"#)
            .starts_with("collector.timeout_ms: must be between 1 and 60000"));
    }

    #[test]
    fn series_expiry_is_never_shorter_than_the_export_interval() {
        let with = |m: &str| format!(r#"{{"collector":{{"cluster":"outbound|4318||c"}},"metrics":{{{m}}}}}"#);
        assert_eq!(
            err(&with(r#""series_expiry_ms":5000"#)),
            "metrics.series_expiry_ms: must be 0 (never) or at least metrics.export_interval_ms (10000), got 5000"
        );
        assert_eq!(
            err(&with(r#""series_expiry_ms":604800001"#)),
            "metrics.series_expiry_ms: must be between 0 and 604800000, got 604800001"
        );
        let expiry = |m: &str| parse(with(m).as_bytes()).unwrap().metrics.series_expiry;
        assert_eq!(expiry(""), Some(Duration::from_secs(600)), "ten minutes by default");
        assert_eq!(expiry(r#""series_expiry_ms":0"#), None);
        assert_eq!(expiry(r#""export_interval_ms":5000,"series_expiry_ms":5000"#), Some(Duration::from_secs(5)));
    }

    #[test]
    fn rejects_bad_collector_headers() {
        let e = err(r#"{"collector":{"cluster":"outbound|4318||c","headers":{"X-Key":"v"}}}"#);
        assert_eq!(e, "collector.headers.X-Key: header names must be lower-case HTTP tokens");
        let e = err(r#"{"collector":{"cluster":"outbound|4318||c","headers":{"x-key":"a\nb"}}}"#);
        assert_eq!(e, "collector.headers.x-key: header values must not contain CR, LF or NUL");
        let e = err(r#"{"collector":{"cluster":"outbound|4318||c","headers":{"content-type":"x"}}}"#);
        assert!(e.starts_with("collector.headers.content-type: is set by meshtel"));
    }

    #[test]
    fn sensitive_headers_can_never_be_recorded() {
        let base = r#"{"collector":{"cluster":"outbound|4318||c"},"traces":"#;
        let c = parse(format!(r#"{base}{{"request_headers":["x-tenant","x-tenant"]}}}}"#).as_bytes()).unwrap();
        assert_eq!(c.traces.request_headers, vec!["x-tenant".to_string()]);
        for h in ALWAYS_SENSITIVE {
            assert_eq!(
                err(&format!(r#"{base}{{"request_headers":["x-tenant","{h}"]}}}}"#)),
                format!("traces.request_headers[1]: {h} is sensitive and can never be recorded")
            );
        }
        assert_eq!(
            err(&format!(r#"{base}{{"sensitive_headers":["x-api-key"],"request_headers":["x-api-key"]}}}}"#)),
            "traces.request_headers[0]: x-api-key is sensitive and can never be recorded"
        );
        assert!(err(&format!(r#"{base}{{"request_headers":["X-Upper"]}}}}"#))
            .starts_with("traces.request_headers[0]: \"X-Upper\""));
        assert!(parse(br#"{"collector":{"cluster":"outbound|4318||c"}}"#).unwrap().traces.request_headers.is_empty());
    }

    #[test]
    fn headers_from_env_are_validated_and_resolved() {
        let mut c = parse(
            br#"{"collector":{"cluster":"outbound|4318||c.ns.svc.cluster.local","headers_from_env":{"x-api-key":"OTEL_KEY","x-tenant":"TENANT"}}}"#,
        )
        .unwrap()
        .collector;
        let missing = c.resolve_env_headers(|v| (v == "OTEL_KEY").then(|| "s3cret".to_string()));
        assert_eq!(c.headers, vec![("x-api-key".to_string(), "s3cret".to_string())]);
        assert_eq!(missing, vec!["TENANT".to_string()]);
        let e = err(r#"{"collector":{"cluster":"outbound|4318||c","headers_from_env":{"x-key":"1BAD"}}}"#);
        assert_eq!(e, "collector.headers_from_env.x-key: \"1BAD\" is not an environment variable name");
        let e = err(
            r#"{"collector":{"cluster":"outbound|4318||c","headers":{"x-key":"a"},"headers_from_env":{"x-key":"K"}}}"#,
        );
        assert_eq!(e, "collector.headers_from_env.x-key: is also set in collector.headers");
    }

    #[test]
    fn derives_authority_only_from_outbound_istio_names() {
        assert_eq!(
            istio_cluster_authority("outbound|4318|v1|otel.obs.svc.cluster.local").as_deref(),
            Some("otel.obs.svc.cluster.local:4318")
        );
        assert_eq!(istio_cluster_authority("inbound|4318||"), None);
        assert_eq!(istio_cluster_authority("outbound|http||otel"), None);
        assert_eq!(istio_cluster_authority("outbound|4318||"), None);
        assert_eq!(istio_cluster_authority("otel"), None);
    }
}
