//! A proxy-wasm module that makes `n` host calls of one kind per request (benchmarks only).
//!
//! It speaks the proxy-wasm ABI 0.2.1 directly instead of through the Rust SDK, so that it exports
//! only the callbacks it needs: the host skips a callback a module does not export
//! (proxy-wasm-cpp-host `src/context.cc`, e.g. `ContextBase::onResponseHeaders`), and the SDK
//! exports all of them. With no calls it is the floor of any filter that has a request-headers and
//! a log callback; built with `--features response-headers` it also has a (no-op) response-headers
//! callback, which prices one more callback per request, and with `--features no-log` it has no
//! log callback, which prices that one.
//!
//! The plugin configuration is JSON: `{"kind": K, "n": N, "arg": A}`, where K is one of
//! - `none`: no calls;
//! - `time`: `get_current_time_nanoseconds`, in the log phase;
//! - `property`: `get_property(A)` (a dotted path, e.g. `response.code`), in the log phase;
//! - `get_map_bytes`: `get_header_map_pairs` of the request headers;
//! - `get_map_value`: `get_header_map_value(A)` of the request headers;
//! - `set_map_bytes`: the request headers read once, then written back N times with 4 more
//!   headers (what propagation by map rewrite does);
//! - `replace_map_value` / `add_map_value`: N request headers `x-probe-I: 1` set;
//! - `remove_map_value`: N request headers `x-probe-I` removed (absent ones);
//! - `cel`: the CEL expression A compiled once at configure time (the `expr_create` foreign
//!   function) and evaluated N times in the log phase (`expr_evaluate`). With `"dump": true`, the
//!   first request's result is logged as `cel result: HEX` (what `tests/tests/cel.rs` decodes).
//!
//! Header calls are made in the request-headers callback. Results are read and dropped.

// Without a log callback, the log phase's calls go unused.
#![cfg_attr(feature = "no-log", allow(dead_code))]

use std::cell::Cell;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_buffer_bytes(kind: u32, start: usize, size: usize, data: *mut *mut u8, len: *mut usize) -> u32;
    fn proxy_get_property(path: *const u8, path_len: usize, data: *mut *mut u8, len: *mut usize) -> u32;
    fn proxy_get_header_map_pairs(map: u32, data: *mut *mut u8, len: *mut usize) -> u32;
    fn proxy_get_header_map_value(map: u32, key: *const u8, key_len: usize, data: *mut *mut u8, len: *mut usize)
        -> u32;
    fn proxy_set_header_map_pairs(map: u32, data: *const u8, len: usize) -> u32;
    fn proxy_replace_header_map_value(
        map: u32,
        key: *const u8,
        key_len: usize,
        value: *const u8,
        value_len: usize,
    ) -> u32;
    fn proxy_add_header_map_value(map: u32, key: *const u8, key_len: usize, value: *const u8, value_len: usize) -> u32;
    fn proxy_remove_header_map_value(map: u32, key: *const u8, key_len: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32;
    fn proxy_call_foreign_function(
        name: *const u8,
        name_len: usize,
        arguments: *const u8,
        arguments_len: usize,
        results: *mut *mut u8,
        results_len: *mut usize,
    ) -> u32;
    fn proxy_log(level: u32, message: *const u8, len: usize) -> u32;
}

const PLUGIN_CONFIGURATION: u32 = 7;
const REQUEST_HEADERS: u32 = 0;
const CONTINUE: u32 = 0;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    None,
    Time,
    Property,
    GetMapBytes,
    GetMapValue,
    SetMapBytes,
    ReplaceMapValue,
    AddMapValue,
    RemoveMapValue,
    Cel,
}

struct Probe {
    kind: Kind,
    n: usize,
    /// `arg`: a property path with `\0` between segments, or a header name; for `cel`, the
    /// expression's token (4 bytes, little-endian).
    arg: Vec<u8>,
    /// Log the first CEL result.
    dump: Cell<bool>,
}

thread_local! {
    static PROBE: Cell<Option<&'static Probe>> = const { Cell::new(None) };
}

/// Memory the host fills, returned to the module's allocator.
fn take(data: *mut u8, len: usize) -> Vec<u8> {
    if data.is_null() {
        return Vec::new();
    }
    // SAFETY: the host wrote `len` bytes into a buffer of `len` bytes that
    // `proxy_on_memory_allocate` made from a `Vec<u8>` with that capacity.
    unsafe { Vec::from_raw_parts(data, len, len) }
}

fn property(path: &[u8]) -> Vec<u8> {
    let (mut data, mut len) = (std::ptr::null_mut(), 0);
    // SAFETY: valid pointers for the host to write the result to.
    unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut len) };
    take(data, len)
}

/// A foreign function's result; `None` when the host refused the call.
fn foreign(name: &str, arguments: &[u8]) -> Option<Vec<u8>> {
    let (mut data, mut len) = (std::ptr::null_mut(), 0);
    // SAFETY: valid buffers for the host to read and pointers for it to write the result to.
    let status = unsafe {
        proxy_call_foreign_function(name.as_ptr(), name.len(), arguments.as_ptr(), arguments.len(), &mut data, &mut len)
    };
    let result = take(data, len);
    (status == 0).then_some(result)
}

fn request_headers() -> Vec<u8> {
    let (mut data, mut len) = (std::ptr::null_mut(), 0);
    // SAFETY: as above.
    unsafe { proxy_get_header_map_pairs(REQUEST_HEADERS, &mut data, &mut len) };
    take(data, len)
}

fn header(name: &[u8]) -> Vec<u8> {
    let (mut data, mut len) = (std::ptr::null_mut(), 0);
    // SAFETY: as above.
    unsafe { proxy_get_header_map_value(REQUEST_HEADERS, name.as_ptr(), name.len(), &mut data, &mut len) };
    take(data, len)
}

/// Decode the ABI's header-map encoding: a count, then the sizes, then the NUL-terminated bytes.
/// (meshtel's own codec is `meshtel_filter::headers`; depending on that crate would link the
/// proxy-wasm SDK's exports into the probe and defeat its purpose.)
fn decode_pairs(bytes: &[u8]) -> Vec<(&[u8], &[u8])> {
    let word = |i: usize| -> usize {
        bytes.get(i * 4..i * 4 + 4).map_or(0, |w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as usize)
    };
    let count = word(0);
    let mut at = 4 + count * 8;
    let mut pairs = Vec::with_capacity(count);
    for i in 0..count {
        let (k, v) = (word(1 + 2 * i), word(2 + 2 * i));
        let (Some(key), Some(value)) = (bytes.get(at..at + k), bytes.get(at + k + 1..at + k + 1 + v)) else {
            break;
        };
        pairs.push((key, value));
        at += k + v + 2;
    }
    pairs
}

fn encode_pairs(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

fn probe_name(i: usize) -> [u8; 10] {
    let mut name = *b"x-probe-00";
    name[8] = b'0' + (i / 10 % 10) as u8;
    name[9] = b'0' + (i % 10) as u8;
    name
}

fn request_phase(p: &Probe) {
    match p.kind {
        Kind::GetMapBytes => (0..p.n).for_each(|_| drop(request_headers())),
        Kind::GetMapValue => (0..p.n).for_each(|_| drop(header(&p.arg))),
        Kind::SetMapBytes => {
            let current = request_headers();
            let mut pairs = decode_pairs(&current);
            let extra: Vec<[u8; 10]> = (0..4).map(probe_name).collect();
            pairs.extend(extra.iter().map(|k| (&k[..], &b"1"[..])));
            let bytes = encode_pairs(&pairs);
            for _ in 0..p.n {
                // SAFETY: a valid buffer for the host to read.
                unsafe { proxy_set_header_map_pairs(REQUEST_HEADERS, bytes.as_ptr(), bytes.len()) };
            }
        }
        Kind::ReplaceMapValue | Kind::AddMapValue | Kind::RemoveMapValue => {
            for i in 0..p.n {
                let name = probe_name(i);
                // SAFETY: valid buffers for the host to read.
                unsafe {
                    match p.kind {
                        Kind::ReplaceMapValue => {
                            proxy_replace_header_map_value(REQUEST_HEADERS, name.as_ptr(), name.len(), b"1".as_ptr(), 1)
                        }
                        Kind::AddMapValue => {
                            proxy_add_header_map_value(REQUEST_HEADERS, name.as_ptr(), name.len(), b"1".as_ptr(), 1)
                        }
                        _ => proxy_remove_header_map_value(REQUEST_HEADERS, name.as_ptr(), name.len()),
                    }
                };
            }
        }
        _ => {}
    }
}

fn log_phase(p: &Probe) {
    match p.kind {
        Kind::Time => {
            for _ in 0..p.n {
                let mut t = 0;
                // SAFETY: a valid pointer for the host to write to.
                unsafe { proxy_get_current_time_nanoseconds(&mut t) };
            }
        }
        Kind::Property => (0..p.n).for_each(|_| drop(property(&p.arg))),
        Kind::Cel => {
            for _ in 0..p.n {
                let result = foreign("expr_evaluate", &p.arg);
                if p.dump.replace(false) {
                    let hex: String = match &result {
                        Some(bytes) => bytes.iter().map(|b| format!("{b:02x}")).collect(),
                        None => "refused".into(),
                    };
                    let line = format!("cel result: {hex}");
                    // SAFETY: a valid buffer for the host to read.
                    unsafe { proxy_log(2, line.as_ptr(), line.len()) };
                }
            }
        }
        _ => {}
    }
}

fn configure(config: &[u8]) -> Option<Probe> {
    let v: serde_json::Value = serde_json::from_slice(config).ok()?;
    let kind = match v.get("kind")?.as_str()? {
        "none" => Kind::None,
        "time" => Kind::Time,
        "property" => Kind::Property,
        "get_map_bytes" => Kind::GetMapBytes,
        "get_map_value" => Kind::GetMapValue,
        "set_map_bytes" => Kind::SetMapBytes,
        "replace_map_value" => Kind::ReplaceMapValue,
        "add_map_value" => Kind::AddMapValue,
        "remove_map_value" => Kind::RemoveMapValue,
        "cel" => Kind::Cel,
        _ => return None,
    };
    let n = v.get("n").and_then(|n| n.as_u64()).unwrap_or(0).min(99) as usize;
    let arg = v.get("arg").and_then(|a| a.as_str()).unwrap_or("");
    let arg = match kind {
        Kind::Property => arg.replace('.', "\0").into_bytes(),
        Kind::Cel => foreign("expr_create", arg.as_bytes())?,
        _ => arg.as_bytes().to_vec(),
    };
    let dump = Cell::new(v.get("dump").and_then(|d| d.as_bool()).unwrap_or(false));
    Some(Probe { kind, n, arg, dump })
}

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let mut buffer: Vec<u8> = Vec::with_capacity(size);
    let ptr = buffer.as_mut_ptr();
    std::mem::forget(buffer);
    ptr
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(_context: u32, _root: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root: u32, _size: usize) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(_root: u32, size: usize) -> u32 {
    let (mut data, mut len) = (std::ptr::null_mut(), 0);
    // SAFETY: valid pointers for the host to write the result to.
    unsafe { proxy_get_buffer_bytes(PLUGIN_CONFIGURATION, 0, size, &mut data, &mut len) };
    match configure(&take(data, len)) {
        Some(p) => {
            PROBE.with(|c| c.set(Some(Box::leak(Box::new(p)))));
            1
        }
        None => 0,
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(_context: u32, _headers: usize, _end_of_stream: u32) -> u32 {
    if let Some(p) = PROBE.with(Cell::get) {
        request_phase(p);
    }
    CONTINUE
}

#[cfg(feature = "response-headers")]
#[no_mangle]
pub extern "C" fn proxy_on_response_headers(_context: u32, _headers: usize, _end_of_stream: u32) -> u32 {
    CONTINUE
}

#[cfg(not(feature = "no-log"))]
#[no_mangle]
pub extern "C" fn proxy_on_log(_context: u32) {
    if let Some(p) = PROBE.with(Cell::get) {
        log_phase(p);
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_done(_context: u32) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(_context: u32) {}
