//! Thin, failure-tolerant wrappers over host calls: every failure becomes `None` or a no-op.

use std::time::UNIX_EPOCH;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MetricType, Status};

use crate::metrics::shared::{SharedStore, StoreError};

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

/// An integer property (8 bytes, little-endian).
pub fn property_u64(path: &[&str]) -> Option<u64> {
    let bytes: [u8; 8] = property(path)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
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
