//! Istio's metric overrides as configured (`metrics.overrides`, Telemetry's
//! `metrics[].overrides[]`): read and checked here; resolved per side and applied to the series by
//! [`crate::metrics::overrides`], which names the sources of both.

use super::error::ConfigError;
use super::fields::{expression, Fields};

/// Istio's standard metrics as Telemetry's `match.metric` names them, each a bit of a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// `istio_requests_total`.
    RequestCount = 1 << 0,
    /// `istio_request_duration_milliseconds`.
    RequestDuration = 1 << 1,
    /// `istio_request_bytes`.
    RequestSize = 1 << 2,
    /// `istio_response_bytes`.
    ResponseSize = 1 << 3,
    /// `istio_tcp_connections_opened_total`.
    TcpOpened = 1 << 4,
    /// `istio_tcp_connections_closed_total`.
    TcpClosed = 1 << 5,
    /// `istio_tcp_sent_bytes_total`.
    TcpSent = 1 << 6,
    /// `istio_tcp_received_bytes_total`.
    TcpReceived = 1 << 7,
    /// `istio_request_messages_total`: accepted, meshtel does not count gRPC messages.
    GrpcRequestMessages = 1 << 8,
    /// `istio_response_messages_total`: likewise.
    GrpcResponseMessages = 1 << 9,
}

/// The metrics of a request.
pub const REQUEST_METRICS: u16 = 0b1111;
/// The metrics of a TCP connection.
pub const TCP_METRICS: u16 = 0b1111_0000;
/// Every metric.
pub const ALL_METRICS: u16 = 0b11_1111_1111;

const METRICS: [(&str, Option<Metric>); 11] = [
    ("ALL_METRICS", None),
    ("REQUEST_COUNT", Some(Metric::RequestCount)),
    ("REQUEST_DURATION", Some(Metric::RequestDuration)),
    ("REQUEST_SIZE", Some(Metric::RequestSize)),
    ("RESPONSE_SIZE", Some(Metric::ResponseSize)),
    ("TCP_OPENED_CONNECTIONS", Some(Metric::TcpOpened)),
    ("TCP_CLOSED_CONNECTIONS", Some(Metric::TcpClosed)),
    ("TCP_SENT_BYTES", Some(Metric::TcpSent)),
    ("TCP_RECEIVED_BYTES", Some(Metric::TcpReceived)),
    ("GRPC_REQUEST_MESSAGES", Some(Metric::GrpcRequestMessages)),
    ("GRPC_RESPONSE_MESSAGES", Some(Metric::GrpcResponseMessages)),
];

/// Which side of the proxy an override applies to (`match.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Gateways and a sidecar's outbound side (reporter `source`).
    Client,
    /// A sidecar's inbound side and waypoints (reporters `destination`, `waypoint`).
    Server,
    /// Both.
    ClientAndServer,
}

const MODES: [(&str, Mode); 3] =
    [("CLIENT", Mode::Client), ("SERVER", Mode::Server), ("CLIENT_AND_SERVER", Mode::ClientAndServer)];

/// What a tag override does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagOperation {
    /// Drop the label (`REMOVE`).
    Remove,
    /// Set the label to the value of this CEL expression (`UPSERT`).
    Upsert(String),
}

/// One entry of `metrics.overrides`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricOverride {
    /// The metrics it matches (a set of [`Metric`] bits).
    pub metrics: u16,
    /// The side it matches.
    pub mode: Mode,
    /// Whether the metrics are turned off (`None`: left as the overrides before say).
    pub disabled: Option<bool>,
    /// Label name to operation, in name order (a sorted list: a map type more in the module
    /// costs kilobytes).
    pub tags: Vec<(String, TagOperation)>,
}

/// Most overrides taken.
pub const MAX_OVERRIDES: usize = 64;
/// Most distinct UPSERT expressions: each is evaluated per request.
pub const MAX_UPSERT_EXPRESSIONS: usize = 16;

/// Whether `name` can be a Prometheus label name (`[a-zA-Z_][a-zA-Z0-9_]*`), where Istio's
/// labels end up; the series descriptor relies on it too.
fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Read `metrics.overrides`: an array of `{"match": {"metric", "mode"}, "disabled",
/// "tag_overrides": {NAME: {"operation": "UPSERT"|"REMOVE", "value"}}}`.
#[inline(never)]
pub(crate) fn read(f: &Fields<'_>) -> Result<Vec<MetricOverride>, ConfigError> {
    let entries = f.objects("overrides", &["match", "disabled", "tag_overrides"])?;
    if entries.len() > MAX_OVERRIDES {
        return Err(ConfigError::new(&f.path("overrides"), format!("at most {MAX_OVERRIDES} overrides")));
    }
    let mut out = Vec::new();
    for o in entries {
        let (metric, mode) = match o.object("match", &["metric", "mode", "custom_metric"])? {
            Some(m) => {
                if m.string("custom_metric")?.is_some() {
                    return Err(ConfigError::new(
                        &m.path("custom_metric"),
                        "custom metrics are not supported: meshtel exports Istio's standard metrics",
                    ));
                }
                (m.variant("metric", &METRICS, None)?, m.variant("mode", &MODES, Mode::ClientAndServer)?)
            }
            None => (None, Mode::ClientAndServer),
        };
        let disabled = o.optional_bool("disabled")?;
        let mut tags = Vec::new();
        if let Some(map) = o.map("tag_overrides")? {
            for (name, value) in map.entries() {
                let path = map.path(name);
                if !is_label_name(name) {
                    return Err(ConfigError::new(&path, "a label name is [a-zA-Z_][a-zA-Z0-9_]*"));
                }
                let t = Fields::new(&path, value, &["operation", "value"])?;
                let upsert = t.variant("operation", &[("UPSERT", true), ("REMOVE", false)], true)?;
                let op = match (upsert, t.string("value")?) {
                    (true, Some(v)) => TagOperation::Upsert(expression(&t.path("value"), Some(v))?.unwrap_or_default()),
                    (true, None) => return Err(ConfigError::new(&t.path("value"), "is required for UPSERT")),
                    (false, Some(_)) => return Err(ConfigError::new(&t.path("value"), "must not be set for REMOVE")),
                    (false, None) => TagOperation::Remove,
                };
                tags.push((name.clone(), op));
            }
        }
        let metrics = metric.map_or(ALL_METRICS, |m| m as u16);
        tags.sort_by(|a, b| a.0.cmp(&b.0));
        out.push(MetricOverride { metrics, mode, disabled, tags });
    }
    if expressions(&out).len() > MAX_UPSERT_EXPRESSIONS {
        return Err(ConfigError::new(
            &f.path("overrides"),
            format!("at most {MAX_UPSERT_EXPRESSIONS} distinct UPSERT expressions, each is evaluated per request"),
        ));
    }
    Ok(out)
}

/// The UPSERT expressions of `overrides`, each once, in the order they first appear, with the
/// path of the first field that holds each (for errors).
pub fn expressions(overrides: &[MetricOverride]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (i, o) in overrides.iter().enumerate() {
        for (name, op) in &o.tags {
            if let TagOperation::Upsert(e) = op {
                if !out.iter().any(|(x, _)| x == e) {
                    out.push((e.clone(), format!("metrics.overrides[{i}].tag_overrides.{name}.value")));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, MAX_EXPRESSION_LEN};

    fn refused(overrides: &str) -> String {
        let json = format!(r#"{{"collector":{{"cluster":"outbound|4317||c"}},"metrics":{{"overrides":{overrides}}}}}"#);
        config::parse(json.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn bad_overrides_are_refused_with_the_field_and_why() {
        for (overrides, expected) in [
            (r#"[{"match":{"metric":"REQUESTS"}}]"#, "metrics.overrides[0].match.metric: unknown variant"),
            (r#"[{"match":{"mode":"BOTH"}}]"#, "metrics.overrides[0].match.mode: unknown variant"),
            (r#"[{"match":{"custom_metric":"x"}}]"#, "custom metrics are not supported"),
            (r#"[{"tag_overrides":{"a":{"operation":"UPSERT"}}}]"#, "tag_overrides.a.value: is required for UPSERT"),
            (r#"[{"tag_overrides":{"a":{"operation":"REMOVE","value":"x"}}}]"#, "must not be set for REMOVE"),
            (r#"[{"tag_overrides":{"a-b":{"value":"x"}}}]"#, "a label name is"),
            (r#"[{"tag_overrides":{"a":{"value":" "}}}]"#, "tag_overrides.a.value: is an empty expression"),
            (r#"[{"tag_overrides":{"a":{"value":"x"},"b":{"operation":"DELETE"}}}]"#, "unknown variant `DELETE`"),
            (r#"[{"disabled":"yes"}]"#, "metrics.overrides[0].disabled"),
        ] {
            let err = refused(overrides);
            assert!(err.contains(expected), "{overrides}: {err}");
        }
        let many: Vec<String> =
            (0..=MAX_UPSERT_EXPRESSIONS).map(|i| format!(r#""t{i}":{{"value":"'{i}'"}}"#)).collect();
        assert!(refused(&format!(r#"[{{"tag_overrides":{{{}}}}}]"#, many.join(","))).contains("distinct UPSERT"));
        let huge = "a".repeat(MAX_EXPRESSION_LEN + 1);
        assert!(refused(&format!(r#"[{{"tag_overrides":{{"t":{{"value":"{huge}"}}}}}}]"#)).contains("at most 4096"));
    }
}
