//! The `pluginConfig` document read field by field, defaults filled in, then validated into
//! [`super::model::Config`]: each refusal names the field and says why.

use std::collections::BTreeMap;
use std::time::Duration;

use super::custom_tags::{self, CustomTag};
use super::error::ConfigError;
use super::fields::{expression, is_header_name, is_header_value, Fields};
use super::metric_overrides::{self, MetricOverride};
use super::model::*;
use crate::quote::{name as quoted_name, quote};

const MAX_TIMEOUT_MS: u64 = 60_000;
const MAX_INTERVAL_MS: u64 = 3_600_000;
/// Longest `metrics.series_expiry_ms`: a week.
const MAX_EXPIRY_MS: u64 = 7 * 24 * 3_600_000;
const MAX_BATCH: u64 = 16_384;
const MAX_QUEUE: u64 = 1_048_576;
const MAX_SERIES: u64 = 100_000;

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
pub(super) struct RawConfig {
    collector: Option<RawCollector>,
    traces: RawTraces,
    metrics: RawMetrics,
    logs: RawLogs,
    export: RawExport,
    resource: RawResource,
}

impl RawConfig {
    pub(super) fn read(doc: &serde_json::Value) -> Result<Self, ConfigError> {
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
