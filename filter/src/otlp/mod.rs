//! Conversion of recorded telemetry to OTLP protobuf, done at flush time in the root context.

mod common;
pub mod metrics;
mod trace;
mod wire;

pub use common::{resource, resource_attributes};
pub use metrics::MetricsEncoder;
pub use trace::{rejected_spans, TraceEncoder};

/// Path of the OTLP/HTTP traces endpoint.
pub const TRACES_PATH: &str = "/v1/traces";
/// Path of the OTLP/HTTP metrics endpoint.
pub const METRICS_PATH: &str = "/v1/metrics";
/// Content type of OTLP/HTTP protobuf requests.
pub const CONTENT_TYPE: &str = "application/x-protobuf";
/// Instrumentation scope name of everything meshtel emits.
pub const SCOPE_NAME: &str = "meshtel";
/// meshtel's version, as the scope and `telemetry.sdk.version` report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
