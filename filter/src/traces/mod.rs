//! Tracing: the trace context read and written (W3C, B3), the sampling decision, the span
//! recorded per request and its custom tags.

pub mod custom_tags;
pub mod propagation;
pub mod sampler;
pub mod span;
pub mod trace_context;
