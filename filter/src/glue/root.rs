//! The root context: configuration, node identity, and export on the tick.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel, MapType};

use super::host::{self, log, property, property_string, Counter, HostStore, ProxyHost};
use super::http::Http;
use super::tcp::Tcp;
use crate::config::{self, Config, Protocol};
use crate::export::Payload;
use crate::istio::node::{decode_pairs, NodeInfo};
use crate::otlp;
use crate::quote;
use crate::telemetry::{Telemetry, TelemetryStats};

/// Longest tick: a full batch waits at most this long for its flush.
const MAX_TICK: Duration = Duration::from_millis(100);
/// Most bytes of a collector answer read (an OTLP partial-success message is small).
const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// Configured root contexts in this VM that are not done. A new `pluginConfig` gets its root
/// context before the old one is done (observed in Envoy 1.40); when the last one is done, the
/// VM itself ends (a new module replaced it, the plugin was removed, or the proxy stops).
static LIVE_ROOTS: AtomicUsize = AtomicUsize::new(0);

/// The root id that makes the module the network filter (a WasmPlugin's `pluginName`).
pub const TCP_ROOT_ID: &str = "meshtel-tcp";

/// Per-VM root: owns the telemetry state shared with this VM's HTTP (or TCP) contexts.
#[derive(Default)]
pub struct Root {
    /// This root context's id (the effective context to return to).
    id: u32,
    /// Whether this plugin is the network filter (root id [`TCP_ROOT_ID`]).
    tcp: bool,
    telemetry: Option<Rc<RefCell<Telemetry>>>,
    stats: Option<Stats>,
    /// What `dispatch_grpc_call` is given to reach the collector (gRPC only).
    grpc_target: String,
    /// Done, but waiting for calls in flight before telling the proxy.
    ending: bool,
    /// Counted in [`LIVE_ROOTS`].
    live: bool,
}

/// How a counter is read from a VM's cumulative [`TelemetryStats`].
type Read = fn(&TelemetryStats) -> u64;

/// meshtel's counters in the proxy's stats (`wasmcustom.meshtel.<name>`, summed over the
/// proxy's VMs), one row each. The span export counters keep the names they were first
/// published under (`export_failures`, `export_retries`).
const COUNTERS: &[(&str, Read)] = &[
    ("spans_recorded", |s| s.spans_recorded),
    ("spans_dropped", |s| s.spans_dropped),
    ("spans_exported", |s| s.traces.exported),
    ("spans_failed", |s| s.traces.failed),
    ("export_failures", |s| s.traces.failed_requests),
    ("export_retries", |s| s.traces.retries),
    ("metric_requests_recorded", |s| s.metrics.recorded),
    ("metric_connections_recorded", |s| s.metrics.connections),
    ("metric_overflow", |s| s.metrics.overflowed),
    ("metric_series_expired", |s| s.metrics.expired),
    ("metric_batches_unreadable", |s| s.metrics.unreadable),
    ("metric_points_exported", |s| s.metric_exports.exported),
    ("metric_points_failed", |s| s.metric_exports.failed),
    ("metric_export_failures", |s| s.metric_exports.failed_requests),
    ("metric_export_retries", |s| s.metric_exports.retries),
    ("logs_recorded", |s| s.logs_recorded),
    ("logs_dropped", |s| s.logs_dropped),
    ("logs_exported", |s| s.log_exports.exported),
    ("logs_failed", |s| s.log_exports.failed),
    ("log_export_failures", |s| s.log_exports.failed_requests),
    ("log_export_retries", |s| s.log_exports.retries),
    ("exports_handed_over", |s| s.handed_over),
    ("exports_taken_over", |s| s.taken_over),
    ("cel_refused", |s| s.cel_refused),
    ("cel_evaluations_failed", |s| s.cel_evaluations_failed),
];

/// The proxy's counters of [`COUNTERS`], and what this VM reported to them so far.
struct Stats {
    counters: Vec<Counter>,
    reported: TelemetryStats,
}

impl Stats {
    fn define() -> Self {
        let counters = COUNTERS.iter().map(|(name, _)| Counter::define(&format!("meshtel.{name}"))).collect();
        Self { counters, reported: TelemetryStats::default() }
    }

    /// Add what changed since the last report.
    fn report(&mut self, now: TelemetryStats) {
        for ((_, read), counter) in COUNTERS.iter().zip(&self.counters) {
            counter.add(read(&now).saturating_sub(read(&self.reported)));
        }
        self.reported = now;
    }
}

fn read_node() -> NodeInfo {
    let meta = |key: &str| property_string(&["xds", "node", "metadata", key]).unwrap_or_default();
    NodeInfo {
        id: property_string(&["xds", "node", "id"]).unwrap_or_default(),
        name: meta("NAME"),
        namespace: meta("NAMESPACE"),
        workload_name: meta("WORKLOAD_NAME"),
        labels: property(&["xds", "node", "metadata", "LABELS"])
            .and_then(|b| decode_pairs(&b))
            .map(|pairs| pairs.into_iter().collect())
            .unwrap_or_default(),
        mesh_id: meta("MESH_ID"),
        cluster_id: meta("CLUSTER_ID"),
    }
}

fn seed() -> u64 {
    // Entropy from the host (WASI random_get); the clock only if that fails.
    getrandom::u64().unwrap_or_else(|_| host::now_ns() ^ 0x9e37_79b9_7f4a_7c15)
}

impl Root {
    pub fn new(id: u32) -> Self {
        Self { id, ..Default::default() }
    }

    fn configure(&mut self, mut config: Config) {
        self.tcp = property_string(&["plugin_root_id"]).as_deref() == Some(TCP_ROOT_ID);
        // Credentials come from the proxy's environment (vmConfig.env, valueFrom HOST); their
        // values are never logged.
        for var in config.collector.resolve_env_headers(|var| std::env::var(var).ok()) {
            log(
                LogLevel::Warn,
                &format!(
                    "meshtel: collector.headers_from_env: {} is not set in the proxy's environment; its header is not sent",
                    quote::name(&var)
                ),
            );
        }
        let tick = config.export.flush_interval.min(MAX_TICK);
        let c = &config.collector;
        self.grpc_target = otlp::envoy_grpc_service(&c.cluster, &c.authority).unwrap_or_else(|| c.cluster.clone());
        if c.protocol == Protocol::Grpc && self.grpc_target == c.cluster {
            log(
                LogLevel::Warn,
                "meshtel: collector.cluster and collector.authority are too long to pass the authority with gRPC calls; the proxy sends the cluster name as :authority",
            );
        }
        let node = read_node();
        log(
            LogLevel::Info,
            &format!(
                "meshtel {}{} configured: service {} ({}), collector {} ({:?}), traces {}, sampling {}, metrics {}, logs {}",
                otlp::VERSION,
                if self.tcp { " (TCP network filter)" } else { "" },
                quote::quote(node.canonical_service().unwrap_or("unknown")),
                if node.is_gateway() { "gateway" } else { "sidecar" },
                quote::name(&config.collector.cluster),
                config.collector.protocol,
                if config.traces.enabled { "on" } else { "off" },
                config::number_text(config.traces.sampling_ratio),
                if config.metrics.enabled { "on" } else { "off" },
                if config.logs.enabled { format!("{:?}", config.logs.mode) } else { "off".into() },
            ),
        );
        let scope = property_string(&["plugin_name"]).unwrap_or_else(|| "meshtel".into());
        let now = host::now_ns();
        let mut telemetry = Telemetry::new(config, node, seed(), &scope, now);
        telemetry.init_shared(&HostStore);
        if !self.tcp && !telemetry.compile_queries(&ProxyHost) {
            log(
                LogLevel::Warn,
                "meshtel: the proxy refused to compile the log phase's CEL query (expr_create): it was built without the CEL parser, or does not know an attribute; requests are read fact by fact, with the same telemetry at a higher cost (counter meshtel.cel_refused)",
            );
        }
        self.telemetry = Some(Rc::new(RefCell::new(telemetry)));
        if !std::mem::replace(&mut self.live, true) {
            LIVE_ROOTS.fetch_add(1, Ordering::Relaxed);
        }
        self.stats.get_or_insert_with(Stats::define);
        if hostcalls::set_tick_period(tick).is_err() {
            log(LogLevel::Error, "meshtel: the proxy refused a tick period; nothing will be exported");
        }
    }

    fn dispatch(&self, telemetry: &mut Telemetry, payload: Payload, now: u64) -> Option<String> {
        let c = &telemetry.config().collector;
        let (call, sent) = if c.protocol == Protocol::Grpc {
            let (service, method) = payload.signal.grpc_method();
            let metadata: Vec<(&str, &[u8])> = c.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())).collect();
            let body = Some(payload.body.as_slice());
            ("gRPC call", hostcalls::dispatch_grpc_call(&self.grpc_target, service, method, metadata, body, c.timeout))
        } else {
            let mut headers: Vec<(&str, &str)> = vec![
                (":method", "POST"),
                (":path", payload.signal.path()),
                (":authority", &c.authority),
                ("content-type", otlp::CONTENT_TYPE),
            ];
            headers.extend(c.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            ("call", hostcalls::dispatch_http_call(&c.cluster, headers, Some(&payload.body), vec![], c.timeout))
        };
        match sent {
            Ok(token) => {
                telemetry.sent(token, payload);
                None
            }
            Err(status) => {
                let reason = format!(
                    "the proxy refused the {call} to cluster {} ({status:?}): is the cluster defined?",
                    quote::quote(&c.cluster)
                );
                telemetry.not_sent(payload, reason, now)
            }
        }
    }

    /// Hand what is not sent over (see [`Telemetry::shutdown`]) and report the counters.
    /// Returns whether the root context may be deleted: no call of its is in flight.
    fn end(&mut self) -> bool {
        if std::mem::take(&mut self.live) {
            LIVE_ROOTS.fetch_sub(1, Ordering::Relaxed);
        }
        let vm_ends = LIVE_ROOTS.load(Ordering::Relaxed) == 0;
        let Some(Ok(mut telemetry)) = self.telemetry.as_ref().map(|t| t.try_borrow_mut()) else {
            return true;
        };
        let done = telemetry.shutdown(&HostStore, host::now_ns(), vm_ends);
        if let Some(stats) = self.stats.as_mut() {
            stats.report(telemetry.stats());
        }
        done
    }

    /// Count what the open TCP connections moved, once per interval. Each is read as the
    /// effective context, so that property reads speak for it (observed in Envoy 1.40).
    fn report_connections(&self, telemetry: &mut Telemetry, now: u64) {
        let due = telemetry.connections_to_report(now);
        if due.is_empty() {
            return;
        }
        for (id, connection) in due {
            if let (Ok(()), Ok(mut c)) = (hostcalls::set_effective_context(id), connection.try_borrow_mut()) {
                telemetry.report_connection(&ProxyHost, &mut c, false);
            }
        }
        let _ = hostcalls::set_effective_context(self.id);
    }

    /// After an answer: if this root context is ending and nothing is in flight any more,
    /// tell the proxy that it may delete it.
    fn answered(&mut self) {
        if self.ending && self.end() {
            self.ending = false;
            let _ = hostcalls::done();
        }
    }
}

impl Context for Root {
    // Envoy calls this when a new pluginConfig (same module: the VM goes on) or a new module
    // (Envoy deletes the VM right after) replaced this root context and its filter chains
    // drained, and at shutdown. Returning false keeps it until `proxy_done`, so that calls in
    // flight are answered (proxy-wasm-cpp-host `WasmBase::startShutdown`; observed in Envoy
    // 1.40 for a new pluginConfig).
    fn on_done(&mut self) -> bool {
        let done = self.end();
        self.ending = !done;
        done
    }

    fn on_grpc_call_response(&mut self, token: u32, status_code: u32, response_size: usize) {
        let Some(telemetry) = self.telemetry.clone() else {
            return;
        };
        let Ok(mut telemetry) = telemetry.try_borrow_mut() else {
            return;
        };
        let body = if status_code == 0 && response_size > 0 {
            hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, response_size.min(MAX_RESPONSE_BODY))
                .ok()
                .flatten()
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        if let Some(line) = telemetry.completed_grpc(token, status_code, &body, host::now_ns()) {
            log(LogLevel::Warn, &format!("meshtel: {line}"));
        }
        drop(telemetry);
        self.answered();
    }

    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let Some(telemetry) = self.telemetry.clone() else {
            return;
        };
        let Ok(mut telemetry) = telemetry.try_borrow_mut() else {
            return;
        };
        let header = |name: &str| hostcalls::get_map_value(MapType::HttpCallResponseHeaders, name).ok().flatten();
        let status = header(":status").and_then(|s| s.parse::<u32>().ok());
        let retry_after = header("retry-after");
        let body = if body_size > 0 && status.is_some_and(|s| (200..300).contains(&s)) {
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size.min(MAX_RESPONSE_BODY))
                .ok()
                .flatten()
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let now = host::now_ns();
        if let Some(line) = telemetry.completed(token, status, retry_after.as_deref(), &body, now) {
            log(LogLevel::Warn, &format!("meshtel: {line}"));
        }
        drop(telemetry);
        self.answered();
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw =
            hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).ok().flatten().unwrap_or_default();
        match config::parse(&raw) {
            Ok(config) => {
                self.configure(config);
                true
            }
            Err(e) => {
                log(LogLevel::Error, &format!("meshtel: invalid pluginConfig, refused: {e}"));
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let Some(shared) = self.telemetry.clone() else {
            return;
        };
        let Ok(mut telemetry) = shared.try_borrow_mut() else {
            return;
        };
        let now = host::now_ns();
        self.report_connections(&mut telemetry, now);
        while let Some(payload) = telemetry.next_export(&HostStore, now) {
            if let Some(line) = self.dispatch(&mut telemetry, payload, now) {
                log(LogLevel::Warn, &format!("meshtel: {line}"));
            }
        }
        for line in telemetry.notices(now) {
            log(LogLevel::Warn, &format!("meshtel: {line}"));
        }
        if let Some(stats) = self.stats.as_mut() {
            stats.report(telemetry.stats());
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http::new(self.telemetry.clone())))
    }

    fn create_stream_context(&self, context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(Tcp::new(context_id, self.telemetry.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(if self.tcp { ContextType::StreamContext } else { ContextType::HttpContext })
    }
}
