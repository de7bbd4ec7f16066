//! The root context: hands each proxy callback to [`crate::root`] over [`ProxyRoot`], the
//! proxy-wasm implementation of its [`RootHost`] seam.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel, MapType, MetricType};

use super::host::{self, log, HostStore, ProxyHost};
use super::http::Http;
use super::tcp::Tcp;
use crate::host::Host;
use crate::metrics::shared::SharedStore;
use crate::root::{Level, Root as RootLogic, RootHost};

/// Configured root contexts in this VM that are not done. A new `pluginConfig` gets its root
/// context before the old one is done (observed in Envoy 1.40); when the last one is done, the
/// VM itself ends (a new module replaced it, the plugin was removed, or the proxy stops).
static LIVE_ROOTS: AtomicUsize = AtomicUsize::new(0);

/// The proxy, as one root context sees it.
struct ProxyRoot {
    /// The root context's id (the effective context to return to).
    id: u32,
}

impl RootHost for ProxyRoot {
    fn proxy(&self) -> &dyn Host {
        &ProxyHost
    }

    fn store(&self) -> &dyn SharedStore {
        &HostStore
    }

    fn log(&self, level: Level, line: &str) {
        let level = match level {
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        log(level, line);
    }

    fn http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
    ) -> Result<u32, String> {
        hostcalls::dispatch_http_call(cluster, headers.to_vec(), Some(body), vec![], timeout)
            .map_err(|status| format!("{status:?}"))
    }

    fn grpc_call(
        &self,
        target: &str,
        (service, method): (&str, &str),
        metadata: &[(&str, &[u8])],
        body: &[u8],
        timeout: Duration,
    ) -> Result<u32, String> {
        hostcalls::dispatch_grpc_call(target, service, method, metadata.to_vec(), Some(body), timeout)
            .map_err(|status| format!("{status:?}"))
    }

    fn answer_header(&self, name: &str) -> Option<String> {
        hostcalls::get_map_value(MapType::HttpCallResponseHeaders, name).ok().flatten()
    }

    fn answer_body(&self, grpc: bool, max: usize) -> Vec<u8> {
        let buffer = if grpc { BufferType::GrpcReceiveBuffer } else { BufferType::HttpCallResponseBody };
        hostcalls::get_buffer(buffer, 0, max).ok().flatten().unwrap_or_default()
    }

    fn set_effective_context(&self, id: Option<u32>) -> bool {
        hostcalls::set_effective_context(id.unwrap_or(self.id)).is_ok()
    }

    fn set_tick_period(&self, period: Duration) -> bool {
        hostcalls::set_tick_period(period).is_ok()
    }

    fn define_counter(&self, name: &str) -> Option<u32> {
        hostcalls::define_metric(MetricType::Counter, name).ok()
    }

    fn add_counter(&self, id: u32, delta: u64) {
        if let Ok(delta) = i64::try_from(delta) {
            let _ = hostcalls::increment_metric(id, delta);
        }
    }

    fn done(&self) {
        let _ = hostcalls::done();
    }

    fn live_roots(&self, change: isize) -> usize {
        match change {
            0 => LIVE_ROOTS.load(Ordering::Relaxed),
            1.. => LIVE_ROOTS.fetch_add(change.unsigned_abs(), Ordering::Relaxed) + change.unsigned_abs(),
            _ => LIVE_ROOTS.fetch_sub(change.unsigned_abs(), Ordering::Relaxed).saturating_sub(change.unsigned_abs()),
        }
    }
}

fn seed() -> u64 {
    // Entropy from the host (WASI random_get); the clock only if that fails.
    getrandom::u64().unwrap_or_else(|_| host::now_ns() ^ 0x9e37_79b9_7f4a_7c15)
}

/// Per-VM root context.
pub struct Root {
    host: ProxyRoot,
    logic: RootLogic,
}

impl Root {
    pub fn new(id: u32) -> Self {
        Self { host: ProxyRoot { id }, logic: RootLogic::default() }
    }
}

impl Context for Root {
    fn on_done(&mut self) -> bool {
        self.logic.on_done(&self.host)
    }

    fn on_grpc_call_response(&mut self, token: u32, status_code: u32, response_size: usize) {
        self.logic.grpc_answer(&self.host, token, status_code, response_size);
    }

    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        self.logic.http_answer(&self.host, token, body_size);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw =
            hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).ok().flatten().unwrap_or_default();
        self.logic.configure(&self.host, &raw, |var| std::env::var(var).ok(), seed())
    }

    fn on_tick(&mut self) {
        self.logic.tick(&self.host);
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http::new(self.logic.telemetry())))
    }

    fn create_stream_context(&self, context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(Tcp::new(context_id, self.logic.telemetry())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(if self.logic.is_tcp() { ContextType::StreamContext } else { ContextType::HttpContext })
    }
}
