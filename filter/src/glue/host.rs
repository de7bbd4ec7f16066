//! Thin, failure-tolerant wrappers over host calls: every failure becomes `None` or a no-op.
//!
//! The two reads the request path makes most, `proxy_get_property` and
//! `proxy_get_header_map_pairs`, are called directly rather than through `proxy_wasm::hostcalls`:
//! the SDK builds each property path in two heap buffers, turns a header map into two strings per
//! header, and panics on a status it does not expect. Here a path is built on the stack, a map is
//! kept as the host's one buffer ([`HeaderPairs`]), and any status but `Ok` reads as absent.

use std::time::UNIX_EPOCH;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MapType, Status};

use crate::headers::HeaderMap;
use crate::headers::HeaderPairs;
use crate::host::Host;
use crate::metrics::shared::{SharedStore, StoreError};
use crate::prefetch::Query;

/// The proxy, as the request path sees it.
pub struct ProxyHost;

// proxy-wasm ABI 0.2.1 imports; statuses as raw integers (0 is `Ok`).
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_property(path: *const u8, path_len: usize, data: *mut *mut u8, len: *mut usize) -> u32;
    fn proxy_get_header_map_pairs(map: u32, data: *mut *mut u8, len: *mut usize) -> u32;
    fn proxy_register_shared_queue(name: *const u8, name_len: usize, id: *mut u32) -> u32;
    fn proxy_enqueue_shared_queue(id: u32, value: *const u8, value_len: usize) -> u32;
    fn proxy_dequeue_shared_queue(id: u32, data: *mut *mut u8, len: *mut usize) -> u32;
    fn proxy_call_foreign_function(
        name: *const u8,
        name_len: usize,
        arguments: *const u8,
        arguments_len: usize,
        results: *mut *mut u8,
        results_len: *mut usize,
    ) -> u32;
}

/// Take ownership of a buffer the host returned.
///
/// # Safety
/// `data` is null or was allocated by this module's `proxy_on_memory_allocate` with `len`
/// bytes (proxy-wasm's allocator: a boxed `[u8]` of that length), and the host wrote it.
unsafe fn returned(status: u32, data: *mut u8, len: usize) -> Option<Vec<u8>> {
    (status == 0 && !data.is_null()).then(|| unsafe { Vec::from_raw_parts(data, len, len) })
}

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

    fn headers(&self, map: HeaderMap) -> HeaderPairs {
        let (mut data, mut len) = (std::ptr::null_mut(), 0);
        // SAFETY: valid out-pointers; what the host returns is as `returned` requires.
        let bytes =
            unsafe { returned(proxy_get_header_map_pairs(map_type(map) as u32, &mut data, &mut len), data, len) };
        bytes.map(HeaderPairs::from_bytes).unwrap_or_default()
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) {
        let _ = match value {
            Some(v) => hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(v)),
            None => hostcalls::remove_map_value(MapType::HttpRequestHeaders, name),
        };
    }

    fn now_ns(&self) -> u64 {
        now_ns()
    }

    fn compile(&self, expression: &str) -> Option<u32> {
        // The test build stands in for a proxy without the CEL parser when told to: Envoy
        // refuses an expression that does not parse as it would refuse every one there.
        #[cfg(feature = "test-trap")]
        let expression = if std::env::var("MESHTEL_TEST_REFUSE_CEL").is_ok() { "[" } else { expression };
        let token = foreign("expr_create", expression.as_bytes())?;
        Some(u32::from_le_bytes(token.get(..4)?.try_into().ok()?))
    }

    fn evaluate(&self, query: &Query) -> Option<Vec<u8>> {
        foreign("expr_evaluate", &query.token()?.to_le_bytes())
    }
}

/// A foreign function's result; `None` on any status but `Ok` (the SDK's wrapper panics on a
/// status it does not expect, and a host without the function answers `NotFound`).
fn foreign(name: &str, arguments: &[u8]) -> Option<Vec<u8>> {
    let (mut data, mut len) = (std::ptr::null_mut(), 0);
    // SAFETY: valid name and argument buffers and out-pointers; what the host returns is as
    // `returned` requires.
    unsafe {
        let status = proxy_call_foreign_function(
            name.as_ptr(),
            name.len(),
            arguments.as_ptr(),
            arguments.len(),
            &mut data,
            &mut len,
        );
        returned(status, data, len)
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
fn property(path: &[&str]) -> Option<Vec<u8>> {
    let (mut stack, mut heap) = ([0u8; 96], Vec::new());
    let buffer = crate::host::property_path(path, &mut stack, &mut heap);
    let (mut data, mut len) = (std::ptr::null_mut(), 0);
    // SAFETY: a valid path buffer and out-pointers; what the host returns is as `returned` requires.
    unsafe { returned(proxy_get_property(buffer.as_ptr(), buffer.len(), &mut data, &mut len), data, len) }
}

/// Log a line; logging failures are ignored.
pub fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
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

    // The SDK's queue calls panic on a status they do not expect; these read any status but
    // `Ok` as a refusal.
    fn queue(&self, name: &str) -> Option<u32> {
        let mut id = 0;
        // SAFETY: a valid name buffer and out-pointer.
        let status = unsafe { proxy_register_shared_queue(name.as_ptr(), name.len(), &mut id) };
        (status == 0 && id != 0).then_some(id)
    }

    fn enqueue(&self, queue: u32, value: &[u8]) -> Result<(), StoreError> {
        // SAFETY: a valid value buffer.
        match unsafe { proxy_enqueue_shared_queue(queue, value.as_ptr(), value.len()) } {
            0 => Ok(()),
            _ => Err(StoreError::Failed),
        }
    }

    fn dequeue(&self, queue: u32) -> Option<Vec<u8>> {
        let (mut data, mut len) = (std::ptr::null_mut(), 0);
        // SAFETY: valid out-pointers; what the host returns is as `returned` requires.
        unsafe { returned(proxy_dequeue_shared_queue(queue, &mut data, &mut len), data, len) }
    }
}
