//! Thin, failure-tolerant wrappers over host calls: every failure becomes `None` or a no-op.

use std::time::UNIX_EPOCH;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MapType, MetricType, Status};

use crate::host::{HeaderMap, Host};
use crate::metrics::shared::{SharedStore, StoreError};

/// The proxy, as the request path sees it.
pub struct ProxyHost;

fn map_type(map: HeaderMap) -> MapType {
    match map {
        HeaderMap::Request => MapType::HttpRequestHeaders,
        HeaderMap::Response => MapType::HttpResponseHeaders,
    }
}

impl Host for ProxyHost {
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        property(path)
    }

    fn header(&self, map: HeaderMap, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(map_type(map), name).ok().flatten()
    }

    fn headers(&self, map: HeaderMap) -> Vec<(String, Vec<u8>)> {
        hostcalls::get_map_bytes(map_type(map)).unwrap_or_default()
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) {
        let _ = match value {
            Some(v) => hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(v)),
            None => hostcalls::remove_map_value(MapType::HttpRequestHeaders, name),
        };
    }

    fn replace_request_headers(&self, headers: &[(&str, &[u8])]) {
        let _ = hostcalls::set_map_bytes(MapType::HttpRequestHeaders, headers.to_vec());
    }

    fn now_ns(&self) -> u64 {
        now_ns()
    }
}

/// Current time in nanoseconds since the Unix epoch; 0 if the host cannot tell.
pub fn now_ns() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .and_then(|d| u64::try_from(d.as_nanos()).ok())
        .unwrap_or(0)
}

/// A property's raw bytes; `None` when absent or unreadable.
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    hostcalls::get_property(path.to_vec()).ok().flatten()
}

/// A string property.
pub fn property_string(path: &[&str]) -> Option<String> {
    property(path).and_then(|b| String::from_utf8(b).ok())
}

/// Log a line; logging failures are ignored.
pub fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// A proxy counter (`wasmcustom.<name>` in Envoy's stats); inert if the host refused to define it.
#[derive(Debug, Default)]
pub struct Counter(Option<u32>);

impl Counter {
    /// Define (or look up) the counter `name`.
    pub fn define(name: &str) -> Self {
        Self(hostcalls::define_metric(MetricType::Counter, name).ok())
    }

    /// Add `delta`.
    pub fn add(&self, delta: u64) {
        if let (Some(id), Ok(delta)) = (self.0, i64::try_from(delta)) {
            if delta > 0 {
                let _ = hostcalls::increment_metric(id, delta);
            }
        }
    }
}

/// The proxy's shared data (one store for all VMs with this VM id).
pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(value), cas)) => Some((value, cas.unwrap_or(0))),
            _ => None,
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        let cas = (cas != 0).then_some(cas);
        hostcalls::set_shared_data(key, Some(value), cas).map_err(|status| match status {
            Status::CasMismatch => StoreError::CasMismatch,
            _ => StoreError::Failed,
        })
    }
}
