//! Conversion of recorded telemetry to OTLP protobuf, done at flush time in the root context.

mod common;
pub mod logs;
pub mod metrics;
mod trace;
mod wire;

pub use common::{resource, resource_attributes};
pub use logs::{rejected_log_records, LogEncoder};
pub use metrics::MetricsEncoder;
pub use trace::{rejected_spans, TraceEncoder};

/// Path of the OTLP/HTTP traces endpoint.
pub const TRACES_PATH: &str = "/v1/traces";
/// Path of the OTLP/HTTP metrics endpoint.
pub const METRICS_PATH: &str = "/v1/metrics";
/// Path of the OTLP/HTTP logs endpoint.
pub const LOGS_PATH: &str = "/v1/logs";

/// The OTLP/gRPC service and method that take what goes to an OTLP/HTTP `path`.
pub fn grpc_method(path: &str) -> (&'static str, &'static str) {
    let service = match path {
        METRICS_PATH => "opentelemetry.proto.collector.metrics.v1.MetricsService",
        LOGS_PATH => "opentelemetry.proto.collector.logs.v1.LogsService",
        _ => "opentelemetry.proto.collector.trace.v1.TraceService",
    };
    (service, "Export")
}
/// Content type of OTLP/HTTP protobuf requests.
pub const CONTENT_TYPE: &str = "application/x-protobuf";
/// Instrumentation scope name of everything meshtel emits.
pub const SCOPE_NAME: &str = "meshtel";
/// meshtel's version, as the scope and `telemetry.sdk.version` report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
