//! meshtel's proxy-wasm filter.
//!
//! Everything but [`glue`] is host-independent: it compiles natively, is unit-tested natively
//! and on `wasm32-wasip1`, and is reused by the installer (the config parser). Only `glue`, built
//! for the proxy, imports `proxy_wasm`.

pub mod access_log;
pub mod base64;
pub mod config;
pub mod episode;
pub mod export;
pub mod headers;
pub mod host;
pub mod istio;
pub mod metrics;
pub mod otlp;
pub mod prefetch;
pub mod query;
pub mod quote;
pub mod root;
pub mod telemetry;
pub mod traces;
pub mod wire;

// Unit-test binaries are commands with their own entry point; the glue is the reactor's.
#[cfg(all(target_arch = "wasm32", not(test)))]
mod glue;
