//! Conversion of recorded telemetry to OTLP protobuf, done at flush time in the root context.

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse;
use prost::Message;

mod common;
pub mod logs;
mod trace;

pub(crate) use common::Envelope;
pub use common::{resource, resource_attributes};
pub use logs::{rejected_log_records, LogEncoder};
pub use trace::{rejected_spans, TraceEncoder};

/// What meshtel exports, each to its own OTLP endpoint: one place for what tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Signal {
    /// Spans.
    Traces,
    /// Istio's metrics (data points).
    Metrics,
    /// Access logs (log records).
    Logs,
}

impl Signal {
    /// Every signal.
    pub const ALL: [Signal; 3] = [Signal::Traces, Signal::Metrics, Signal::Logs];

    /// The path of its OTLP/HTTP endpoint.
    pub fn path(self) -> &'static str {
        match self {
            Signal::Traces => "/v1/traces",
            Signal::Metrics => "/v1/metrics",
            Signal::Logs => "/v1/logs",
        }
    }

    /// The OTLP/gRPC service and method that take it.
    pub fn grpc_method(self) -> (&'static str, &'static str) {
        let service = match self {
            Signal::Traces => "opentelemetry.proto.collector.trace.v1.TraceService",
            Signal::Metrics => "opentelemetry.proto.collector.metrics.v1.MetricsService",
            Signal::Logs => "opentelemetry.proto.collector.logs.v1.LogsService",
        };
        (service, "Export")
    }

    /// The items the collector refused and its message for them, from the body of a partial
    /// success.
    pub fn rejected(self, body: &[u8]) -> (u64, String) {
        match self {
            Signal::Traces => rejected_spans(body),
            Signal::Metrics => rejected_points(body),
            Signal::Logs => rejected_log_records(body),
        }
    }
}

/// The target of `dispatch_grpc_call`: Envoy's `GrpcService` with `envoy_grpc { cluster_name,
/// authority }`, serialized. Envoy takes a plain cluster name too, but then sends the cluster name
/// (`outbound|4317||...`) as `:authority`, which strict HTTP/2 servers refuse. The SDK passes the
/// target as a string, so the serialized form is used only when it is valid UTF-8 (names short
/// enough for one-byte lengths); `None` otherwise.
pub fn envoy_grpc_service(cluster: &str, authority: &str) -> Option<String> {
    let mut w = crate::wire::Writer::with_capacity(cluster.len() + authority.len() + 8);
    // GrpcService.envoy_grpc = 1; EnvoyGrpc.cluster_name = 1, .authority = 2.
    w.message(1, |w| {
        w.string(1, cluster);
        w.string(2, authority);
    });
    String::from_utf8(w.into_bytes()).ok()
}

/// Content type of OTLP/HTTP protobuf requests.
pub const CONTENT_TYPE: &str = "application/x-protobuf";
/// Instrumentation scope name of everything meshtel emits.
pub const SCOPE_NAME: &str = "meshtel";
/// meshtel's version, as the scope and `telemetry.sdk.version` report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Data points the collector refused, from an OTLP/HTTP metrics response body.
pub fn rejected_points(body: &[u8]) -> (u64, String) {
    ExportMetricsServiceResponse::decode(body)
        .ok()
        .and_then(|r| r.partial_success)
        .map_or((0, String::new()), |p| (u64::try_from(p.rejected_data_points).unwrap_or(0), p.error_message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[derive(Clone, PartialEq, Message)]
    struct EnvoyGrpc {
        #[prost(string, tag = "1")]
        cluster_name: String,
        #[prost(string, tag = "2")]
        authority: String,
    }

    #[derive(Clone, PartialEq, Message)]
    struct GrpcService {
        #[prost(message, optional, tag = "1")]
        envoy_grpc: Option<EnvoyGrpc>,
    }

    #[test]
    fn grpc_target_names_cluster_and_authority() {
        let cluster = "outbound|4317||otel-collector.observability.svc.cluster.local";
        let authority = "otel-collector.observability.svc.cluster.local:4317";
        let target = envoy_grpc_service(cluster, authority).unwrap();
        let got = GrpcService::decode(target.as_bytes()).unwrap().envoy_grpc.unwrap();
        assert_eq!((got.cluster_name.as_str(), got.authority.as_str()), (cluster, authority));
        // Lengths of 128 and more take two bytes, which are not UTF-8.
        assert_eq!(envoy_grpc_service(&"c".repeat(100), &"a".repeat(40)), None);
    }

    #[test]
    fn grpc_methods_per_signal() {
        assert_eq!(Signal::Logs.grpc_method().0, "opentelemetry.proto.collector.logs.v1.LogsService");
        assert_eq!(Signal::Metrics.grpc_method().0, "opentelemetry.proto.collector.metrics.v1.MetricsService");
        assert_eq!(Signal::Traces.grpc_method(), ("opentelemetry.proto.collector.trace.v1.TraceService", "Export"));
        let paths: Vec<&str> = Signal::ALL.iter().map(|s| s.path()).collect();
        assert_eq!(paths, ["/v1/traces", "/v1/metrics", "/v1/logs"]);
    }

    #[test]
    fn reads_partial_success() {
        use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsPartialSuccess;
        let body = opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse {
            partial_success: Some(ExportMetricsPartialSuccess {
                rejected_data_points: 4,
                error_message: String::new(),
            }),
        }
        .encode_to_vec();
        assert_eq!(rejected_points(&body).0, 4);
        assert_eq!(rejected_points(b"junk").0, 0);
    }
}
