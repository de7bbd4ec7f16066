//! The `pluginConfig` contract: parsed from JSON, validated, and compiled into [`Config`].
//!
//! Every rejection names the field (`traces.sampling_ratio`) and says why, so that a user
//! reading Envoy's log or `meshtel validate` output knows exactly what to fix.

pub mod custom_tags;
pub mod error;
pub(crate) mod fields;
pub mod metric_overrides;
pub mod model;
mod raw;
pub mod scopes;

pub use error::ConfigError;
pub use fields::MAX_EXPRESSION_LEN;
pub use model::*;
use raw::RawConfig;
pub use raw::{istio_cluster_authority, number_text, ALWAYS_SENSITIVE};

use std::collections::BTreeMap;

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
