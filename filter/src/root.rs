//! The root context's work over the [`RootHost`] seam: configuration, export on the tick, the
//! collector's answers, and the end of a root context. The glue (`glue/root.rs`) hands each
//! proxy callback here and decides nothing.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use crate::config::{self, Config, Protocol};
use crate::export::Payload;
use crate::host::Host;
use crate::istio::node::{decode_pairs, NodeInfo};
use crate::metrics::shared::SharedStore;
use crate::otlp;
use crate::prefetch::Compiled;
use crate::quote;
use crate::telemetry::{Telemetry, TelemetryStats};

/// Longest tick: a full batch waits at most this long for its flush.
pub const MAX_TICK: Duration = Duration::from_millis(100);
/// Most bytes of a collector answer read (an OTLP partial-success message is small).
pub const MAX_RESPONSE_BODY: usize = 64 * 1024;
/// The root id that makes the module the network filter (a WasmPlugin's `pluginName`).
pub const TCP_ROOT_ID: &str = "meshtel-tcp";

/// How loud a log line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// The configuration in force.
    Info,
    /// Telemetry is lost or degraded.
    Warn,
    /// Nothing will be exported.
    Error,
}

/// What the root context asks of the proxy, beyond what a request asks ([`Host`]).
pub trait RootHost {
    /// The request path's host, reading properties of the effective context.
    fn proxy(&self) -> &dyn Host;

    /// The proxy's shared data and queues.
    fn store(&self) -> &dyn SharedStore;

    /// Write a line to the proxy's log.
    fn log(&self, level: Level, line: &str);

    /// Call the collector over HTTP (`dispatch_http_call`): the call's token, or the proxy's
    /// refusal.
    fn http_call(&self, cluster: &str, headers: &[(&str, &str)], body: &[u8], timeout: Duration)
        -> Result<u32, String>;

    /// Call the collector over gRPC (`dispatch_grpc_call`) through `target` (a serialized
    /// `GrpcService`, or the cluster's name).
    fn grpc_call(
        &self,
        target: &str,
        method: (&str, &str),
        metadata: &[(&str, &[u8])],
        body: &[u8],
        timeout: Duration,
    ) -> Result<u32, String>;

    /// A header of the HTTP call's answer being delivered.
    fn answer_header(&self, name: &str) -> Option<String>;

    /// Up to `max` bytes of the answer being delivered (the HTTP body, or the gRPC message).
    fn answer_body(&self, grpc: bool, max: usize) -> Vec<u8>;

    /// Make context `id` the effective one (`None`: this root context again); `false` if refused.
    fn set_effective_context(&self, id: Option<u32>) -> bool;

    /// Ask for a tick every `period`; `false` if refused.
    fn set_tick_period(&self, period: Duration) -> bool;

    /// Define a counter in the proxy's stats; `None` if refused.
    fn define_counter(&self, name: &str) -> Option<u32>;

    /// Add to a counter.
    fn add_counter(&self, id: u32, delta: u64);

    /// Tell the proxy this root context may be deleted (`proxy_done`).
    fn done(&self);

    /// Change this VM's count of configured root contexts that are not done by `change`; the
    /// new count.
    fn live_roots(&self, change: isize) -> usize;
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
    ("log_filter_errors", |s| s.log_filter_errors),
];

/// The proxy's counters of [`COUNTERS`], and what this VM reported to them so far.
#[derive(Debug)]
struct Stats {
    counters: Vec<Option<u32>>,
    reported: TelemetryStats,
}

impl Stats {
    fn define(host: &dyn RootHost) -> Self {
        let counters = COUNTERS.iter().map(|(name, _)| host.define_counter(&format!("meshtel.{name}"))).collect();
        Self { counters, reported: TelemetryStats::default() }
    }

    /// Add what changed since the last report.
    fn report(&mut self, host: &dyn RootHost, now: TelemetryStats) {
        for ((_, read), counter) in COUNTERS.iter().zip(&self.counters) {
            let delta = read(&now).saturating_sub(read(&self.reported));
            if let (Some(id), true) = (counter, delta > 0) {
                host.add_counter(*id, delta);
            }
        }
        self.reported = now;
    }
}

/// One root context: owns the telemetry its HTTP (or TCP) contexts share.
#[derive(Debug, Default)]
pub struct Root {
    /// Whether this plugin is the network filter (root id [`TCP_ROOT_ID`]).
    tcp: bool,
    telemetry: Option<Rc<RefCell<Telemetry>>>,
    stats: Option<Stats>,
    /// What `dispatch_grpc_call` is given to reach the collector (gRPC only).
    grpc_target: String,
    /// Done, but waiting for calls in flight before telling the proxy.
    ending: bool,
    /// Counted in [`RootHost::live_roots`].
    live: bool,
}

/// The proxy's identity, from its node metadata.
pub fn read_node(host: &dyn Host) -> NodeInfo {
    let meta = |key: &str| host.property_string(&["xds", "node", "metadata", key]).unwrap_or_default();
    NodeInfo {
        id: host.property_string(&["xds", "node", "id"]).unwrap_or_default(),
        name: meta("NAME"),
        namespace: meta("NAMESPACE"),
        workload_name: meta("WORKLOAD_NAME"),
        labels: host
            .property(&["xds", "node", "metadata", "LABELS"])
            .and_then(|b| decode_pairs(&b))
            .map(|pairs| pairs.into_iter().collect())
            .unwrap_or_default(),
        mesh_id: meta("MESH_ID"),
        cluster_id: meta("CLUSTER_ID"),
    }
}

impl Root {
    /// The telemetry its contexts share, once configured.
    pub fn telemetry(&self) -> Option<Rc<RefCell<Telemetry>>> {
        self.telemetry.clone()
    }

    /// Whether this root context serves the network filter.
    pub fn is_tcp(&self) -> bool {
        self.tcp
    }

    /// Take a `pluginConfig`; `false` refuses it (the proxy then keeps what it had).
    /// `env` reads the proxy's environment; `seed` seeds the ids.
    pub fn configure(
        &mut self,
        host: &dyn RootHost,
        raw: &[u8],
        env: impl Fn(&str) -> Option<String>,
        seed: u64,
    ) -> bool {
        let proxy = host.proxy();
        // The scopes of the mesh's narrower Telemetry settings that match this proxy apply.
        let node = read_node(proxy);
        let mut config = match config::parse_for(raw, &node.namespace, &node.labels) {
            Ok(config) => config,
            Err(e) => {
                host.log(Level::Error, &format!("meshtel: invalid pluginConfig, refused: {e}"));
                return false;
            }
        };
        self.tcp = proxy.property_string(&["plugin_root_id"]).as_deref() == Some(TCP_ROOT_ID);
        // Credentials come from the proxy's environment (vmConfig.env, valueFrom HOST); their
        // values are never logged.
        crate::traces::custom_tags::resolve_environment(&mut config.traces.custom_tags, &env);
        for var in config.collector.resolve_env_headers(&env) {
            host.log(
                Level::Warn,
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
            host.log(
                Level::Warn,
                "meshtel: collector.cluster and collector.authority are too long to pass the authority with gRPC calls; the proxy sends the cluster name as :authority",
            );
        }
        host.log(Level::Info, &configured(&config, &node, self.tcp));
        let scope = proxy.property_string(&["plugin_name"]).unwrap_or_else(|| "meshtel".into());
        let mut telemetry = Telemetry::new(config, node, seed, &scope, proxy.now_ns());
        telemetry.init_shared(host.store());
        {
            // A TCP root context reads no request: it compiles the UPSERT expressions alone.
            let compiled =
                if self.tcp { telemetry.compile_user_expressions(proxy) } else { telemetry.compile_queries(proxy) };
            match compiled {
                Compiled::Done => {}
                Compiled::NoCel => host.log(
                    Level::Warn,
                    "meshtel: the proxy refused to compile the log phase's CEL query (expr_create): it was built without the CEL parser, or does not know an attribute; requests are read fact by fact, with the same telemetry at a higher cost (counter meshtel.cel_refused); logs.filter is not applied, and the labels metrics.overrides sets by CEL are `unknown`",
                ),
                Compiled::Refused { field, expression } => {
                    host.log(
                        Level::Error,
                        &format!(
                            "meshtel: invalid pluginConfig, refused: {field}: the proxy cannot compile {} (its log says why: `expr_create parse error` or `compile error`)",
                            quote::quote(&expression)
                        ),
                    );
                    return false;
                }
            }
        }
        self.telemetry = Some(Rc::new(RefCell::new(telemetry)));
        if !std::mem::replace(&mut self.live, true) {
            host.live_roots(1);
        }
        if self.stats.is_none() {
            self.stats = Some(Stats::define(host));
        }
        if !host.set_tick_period(tick) {
            host.log(Level::Error, "meshtel: the proxy refused a tick period; nothing will be exported");
        }
        true
    }

    /// The tick: count what open TCP connections moved, send what is due, log what changed,
    /// and report the counters.
    pub fn tick(&mut self, host: &dyn RootHost) {
        let Some(shared) = self.telemetry.clone() else {
            return;
        };
        let Ok(mut telemetry) = shared.try_borrow_mut() else {
            return;
        };
        let now = host.proxy().now_ns();
        report_connections(host, &mut telemetry, now);
        while let Some(payload) = telemetry.next_export(host.store(), now) {
            if let Some(line) = self.dispatch(host, &mut telemetry, payload, now) {
                host.log(Level::Warn, &format!("meshtel: {line}"));
            }
        }
        for line in telemetry.notices(now) {
            host.log(Level::Warn, &format!("meshtel: {line}"));
        }
        if let Some(stats) = self.stats.as_mut() {
            stats.report(host, telemetry.stats());
        }
    }

    fn dispatch(&self, host: &dyn RootHost, telemetry: &mut Telemetry, payload: Payload, now: u64) -> Option<String> {
        let c = &telemetry.config().collector;
        let (call, sent) = if c.protocol == Protocol::Grpc {
            let metadata: Vec<(&str, &[u8])> = c.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())).collect();
            let method = payload.signal.grpc_method();
            ("gRPC call", host.grpc_call(&self.grpc_target, method, &metadata, &payload.body, c.timeout))
        } else {
            let mut headers: Vec<(&str, &str)> = vec![
                (":method", "POST"),
                (":path", payload.signal.path()),
                (":authority", &c.authority),
                ("content-type", otlp::CONTENT_TYPE),
            ];
            headers.extend(c.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            ("call", host.http_call(&c.cluster, &headers, &payload.body, c.timeout))
        };
        match sent {
            Ok(token) => {
                telemetry.sent(token, payload);
                None
            }
            Err(status) => {
                let reason = format!(
                    "the proxy refused the {call} to cluster {} ({status}): is the cluster defined?",
                    quote::quote(&c.cluster)
                );
                telemetry.not_sent(payload, reason, now)
            }
        }
    }

    /// The answer to HTTP call `token`, whose body has `body_size` bytes.
    pub fn http_answer(&mut self, host: &dyn RootHost, token: u32, body_size: usize) {
        let Some(shared) = self.telemetry.clone() else {
            return;
        };
        let Ok(mut telemetry) = shared.try_borrow_mut() else {
            return;
        };
        let status = host.answer_header(":status").and_then(|s| s.parse::<u32>().ok());
        let retry_after = host.answer_header("retry-after");
        // Only a success carries a body worth reading (an OTLP partial success).
        let body = if body_size > 0 && status.is_some_and(|s| (200..300).contains(&s)) {
            host.answer_body(false, body_size.min(MAX_RESPONSE_BODY))
        } else {
            Vec::new()
        };
        let now = host.proxy().now_ns();
        if let Some(line) = telemetry.completed(token, status, retry_after.as_deref(), &body, now) {
            host.log(Level::Warn, &format!("meshtel: {line}"));
        }
        drop(telemetry);
        self.answered(host);
    }

    /// The answer to gRPC call `token`: its gRPC status and a message of `size` bytes.
    pub fn grpc_answer(&mut self, host: &dyn RootHost, token: u32, status: u32, size: usize) {
        let Some(shared) = self.telemetry.clone() else {
            return;
        };
        let Ok(mut telemetry) = shared.try_borrow_mut() else {
            return;
        };
        let body =
            if status == 0 && size > 0 { host.answer_body(true, size.min(MAX_RESPONSE_BODY)) } else { Vec::new() };
        if let Some(line) = telemetry.completed_grpc(token, status, &body, host.proxy().now_ns()) {
            host.log(Level::Warn, &format!("meshtel: {line}"));
        }
        drop(telemetry);
        self.answered(host);
    }

    /// The proxy is done with this root context: a new `pluginConfig` or module replaced it and
    /// its filter chains drained, or the proxy stops. Hands what is not sent over and reports
    /// the counters; `false` keeps the context until the calls in flight are answered, and then
    /// [`RootHost::done`] (proxy-wasm-cpp-host `WasmBase::startShutdown`).
    pub fn on_done(&mut self, host: &dyn RootHost) -> bool {
        let done = self.end(host);
        self.ending = !done;
        done
    }

    /// Returns whether the root context may be deleted: no call of its is in flight.
    fn end(&mut self, host: &dyn RootHost) -> bool {
        let live = if std::mem::take(&mut self.live) { host.live_roots(-1) } else { host.live_roots(0) };
        let Some(Ok(mut telemetry)) = self.telemetry.as_ref().map(|t| t.try_borrow_mut()) else {
            return true;
        };
        // The last root context of the VM: the VM itself ends with it.
        let done = telemetry.shutdown(host.store(), host.proxy().now_ns(), live == 0);
        if let Some(stats) = self.stats.as_mut() {
            stats.report(host, telemetry.stats());
        }
        done
    }

    /// After an answer: if this root context is ending and nothing is in flight any more,
    /// tell the proxy that it may delete it.
    fn answered(&mut self, host: &dyn RootHost) {
        if self.ending && self.end(host) {
            self.ending = false;
            host.done();
        }
    }
}

/// The line that says what a root context was configured with.
fn configured(config: &Config, node: &NodeInfo, tcp: bool) -> String {
    format!(
        "meshtel {}{} configured: service {} ({}), collector {} ({:?}), traces {}, sampling {}, metrics {}, logs {}",
        otlp::VERSION,
        if tcp { " (TCP network filter)" } else { "" },
        quote::quote(node.canonical_service().unwrap_or("unknown")),
        if node.is_gateway() { "gateway" } else { "sidecar" },
        quote::name(&config.collector.cluster),
        config.collector.protocol,
        if config.traces.enabled { "on" } else { "off" },
        config::number_text(config.traces.sampling_ratio),
        if config.metrics.enabled { "on" } else { "off" },
        if config.logs.enabled { format!("{:?}", config.logs.mode) } else { "off".into() },
    )
}

/// Count what the open TCP connections moved, once per interval. Each is read as the effective
/// context, so that property reads speak for it (observed in Envoy 1.40).
fn report_connections(host: &dyn RootHost, telemetry: &mut Telemetry, now: u64) {
    let due = telemetry.connections_to_report(now);
    if due.is_empty() {
        return;
    }
    for (id, connection) in due {
        if let (true, Ok(mut c)) = (host.set_effective_context(Some(id)), connection.try_borrow_mut()) {
            telemetry.report_connection(host.proxy(), &mut c, false);
        }
    }
    host.set_effective_context(None);
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};

    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;

    use super::*;
    use crate::headers::HeaderMap;
    use crate::host::mock::MockHost;
    use crate::metrics::shared::MemoryStore;

    const S: u64 = 1_000_000_000;

    /// One call the root context made.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Call {
        /// The cluster (HTTP) or the gRPC target.
        to: String,
        /// `:path` and headers (HTTP), or `service/method` and metadata (gRPC).
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    /// The headers and body of a collector's answer.
    type Answer = (Vec<(String, String)>, Vec<u8>);

    /// A proxy for one root context: a [`MockHost`] for properties and the clock, a
    /// [`MemoryStore`] for shared data, and everything else recorded.
    #[derive(Default)]
    struct MockRoot {
        proxy: MockHost,
        store: MemoryStore,
        logs: RefCell<Vec<(Level, String)>>,
        calls: RefCell<Vec<Call>>,
        refuse_calls: Cell<bool>,
        /// The answer being delivered.
        answer: RefCell<Answer>,
        counters: RefCell<Vec<(String, u64)>>,
        done: Cell<usize>,
        live: Cell<usize>,
    }

    impl MockRoot {
        fn new(proxy: MockHost) -> Self {
            Self { proxy, ..Default::default() }
        }

        fn counter(&self, name: &str) -> u64 {
            self.counters.borrow().iter().find(|(n, _)| n == &format!("meshtel.{name}")).map_or(0, |(_, v)| *v)
        }

        fn lines(&self, needle: &str) -> usize {
            self.logs.borrow().iter().filter(|(_, l)| l.contains(needle)).count()
        }

        fn answer_with(&self, status: &str, headers: &[(&str, &str)], body: Vec<u8>) {
            let mut all = vec![(":status".to_string(), status.to_string())];
            all.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            *self.answer.borrow_mut() = (all, body);
        }
    }

    impl RootHost for MockRoot {
        fn proxy(&self) -> &dyn Host {
            &self.proxy
        }
        fn store(&self) -> &dyn SharedStore {
            &self.store
        }
        fn log(&self, level: Level, line: &str) {
            self.logs.borrow_mut().push((level, line.to_string()));
        }
        fn http_call(&self, cluster: &str, headers: &[(&str, &str)], body: &[u8], _: Duration) -> Result<u32, String> {
            if self.refuse_calls.get() {
                return Err("BadArgument".into());
            }
            let headers = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            self.calls.borrow_mut().push(Call { to: cluster.into(), headers, body: body.to_vec() });
            Ok(self.calls.borrow().len() as u32)
        }
        fn grpc_call(
            &self,
            target: &str,
            (service, method): (&str, &str),
            metadata: &[(&str, &[u8])],
            body: &[u8],
            _: Duration,
        ) -> Result<u32, String> {
            let mut headers = vec![(":path".to_string(), format!("/{service}/{method}"))];
            headers.extend(metadata.iter().map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v).to_string())));
            self.calls.borrow_mut().push(Call { to: target.into(), headers, body: body.to_vec() });
            Ok(self.calls.borrow().len() as u32)
        }
        fn answer_header(&self, name: &str) -> Option<String> {
            self.answer.borrow().0.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        }
        fn answer_body(&self, _grpc: bool, max: usize) -> Vec<u8> {
            let body = &self.answer.borrow().1;
            body[..body.len().min(max)].to_vec()
        }
        fn set_effective_context(&self, _id: Option<u32>) -> bool {
            true
        }
        fn set_tick_period(&self, _period: Duration) -> bool {
            true
        }
        fn define_counter(&self, name: &str) -> Option<u32> {
            self.counters.borrow_mut().push((name.to_string(), 0));
            Some(self.counters.borrow().len() as u32 - 1)
        }
        fn add_counter(&self, id: u32, delta: u64) {
            self.counters.borrow_mut()[id as usize].1 += delta;
        }
        fn done(&self) {
            self.done.set(self.done.get() + 1);
        }
        fn live_roots(&self, change: isize) -> usize {
            self.live.set(self.live.get().saturating_add_signed(change));
            self.live.get()
        }
    }

    fn proxy() -> MockHost {
        MockHost::new()
            .with_property("xds.node.id", "sidecar~10.0.0.1~ratings-v1-x.default~default.svc.cluster.local")
            .with_property("plugin_name", "istio-system.meshtel")
            .with_header(HeaderMap::Request, ":method", "GET")
            .with_header(HeaderMap::Request, ":path", "/")
            .with_property("xds.cluster_name", "inbound|9080||")
            .at(S)
    }

    fn configured(host: &MockRoot, extra: &str) -> Root {
        let json = format!(
            r#"{{"collector":{{"cluster":"outbound|4318||otel.obs.svc.cluster.local","headers":{{"x-tenant":"a"}}}},"metrics":{{"enabled":false}},"export":{{"max_batch":1,"max_retries":1}}{extra}}}"#
        );
        let mut root = Root::default();
        assert!(root.configure(host, json.as_bytes(), |_| None, 7));
        root
    }

    /// One request through the root's telemetry.
    fn request(root: &Root, host: &MockRoot) {
        let telemetry = root.telemetry().unwrap();
        let mut t = telemetry.borrow_mut();
        let active = t.on_request_headers(&host.proxy);
        t.on_log(&host.proxy, active);
    }

    fn spans(body: &[u8]) -> usize {
        let r = ExportTraceServiceRequest::decode(body).unwrap();
        r.resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum()
    }

    #[test]
    fn a_tick_sends_each_due_batch_to_the_collector_over_otlp_http() {
        let host = MockRoot::new(proxy());
        let mut root = configured(&host, "");
        assert_eq!(host.lines("configured: service"), 1);
        request(&root, &host);
        root.tick(&host);
        let calls = host.calls.borrow();
        assert_eq!(calls.len(), 1);
        let call = &calls[0];
        assert_eq!(call.to, "outbound|4318||otel.obs.svc.cluster.local");
        let header = |name: &str| call.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        assert_eq!(
            (header(":method"), header(":path"), header(":authority"), header("content-type")),
            (Some("POST"), Some("/v1/traces"), Some("otel.obs.svc.cluster.local:4318"), Some("application/x-protobuf"))
        );
        assert_eq!(header("x-tenant"), Some("a"), "the configured headers too");
        assert_eq!(spans(&call.body), 1);
        assert_eq!(host.counter("spans_recorded"), 1);
    }

    #[test]
    fn over_grpc_the_call_names_the_service_and_carries_the_headers_as_metadata() {
        let host = MockRoot::new(proxy());
        let mut root = configured(
            &host,
            r#","collector":{"cluster":"outbound|4317||otel","authority":"otel","protocol":"grpc","headers":{"x-tenant":"b"}}"#,
        );
        request(&root, &host);
        root.tick(&host);
        let calls = host.calls.borrow();
        let want = otlp::envoy_grpc_service("outbound|4317||otel", "otel").unwrap();
        assert_eq!(calls[0].to, want, "a GrpcService that sets the authority");
        assert_eq!(
            calls[0].headers,
            [
                (":path".to_string(), "/opentelemetry.proto.collector.trace.v1.TraceService/Export".to_string()),
                ("x-tenant".to_string(), "b".to_string())
            ]
        );
    }

    #[test]
    fn a_refused_call_is_logged_once_and_retried_and_counters_report_deltas() {
        let host = MockRoot::new(proxy());
        let mut root = configured(&host, "");
        host.refuse_calls.set(true);
        for i in 0..5 {
            request(&root, &host);
            host.proxy.set_now(S * (2 + i));
            root.tick(&host);
        }
        assert_eq!(
            host.lines("refused the call to cluster \"outbound|4318||otel.obs.svc.cluster.local\" (BadArgument)"),
            1
        );
        assert_eq!(host.counter("spans_recorded"), 5, "reported as deltas, not totals");
        assert!(host.counter("export_failures") >= 1);
        host.refuse_calls.set(false);
        host.proxy.set_now(S * 60);
        root.tick(&host);
        assert!(!host.calls.borrow().is_empty(), "sends again once the proxy takes calls");
    }

    #[test]
    fn a_503_with_retry_after_is_sent_again_with_the_same_body_after_the_wait() {
        let host = MockRoot::new(proxy());
        let mut root = configured(&host, "");
        request(&root, &host);
        root.tick(&host);
        host.answer_with("503", &[("retry-after", "2")], b"ignored: not a success".to_vec());
        root.http_answer(&host, 1, 22);
        host.proxy.set_now(S + S / 2);
        root.tick(&host);
        assert_eq!(host.calls.borrow().len(), 1, "not before the collector's 2 s");
        host.proxy.set_now(4 * S);
        root.tick(&host);
        let calls = host.calls.borrow();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].body, calls[1].body);
        assert_eq!(host.counter("export_retries"), 1);
    }

    #[test]
    fn a_root_context_that_ends_with_a_call_in_flight_is_done_when_it_is_answered() {
        let host = MockRoot::new(proxy());
        let mut root = configured(&host, "");
        assert_eq!(host.live.get(), 1);
        // A new pluginConfig's root context came first: the VM goes on.
        host.live_roots(1);
        request(&root, &host);
        root.tick(&host);
        assert!(!root.on_done(&host), "a call is in flight");
        assert_eq!((host.live.get(), host.done.get()), (1, 0));
        host.answer_with("200", &[], Vec::new());
        root.http_answer(&host, 1, 0);
        assert_eq!(host.done.get(), 1, "done once answered");
        assert_eq!(host.counter("spans_exported"), 1);
    }

    #[test]
    fn the_last_root_context_of_a_vm_hands_its_calls_in_flight_over_and_is_done_at_once() {
        let host = MockRoot::new(proxy());
        let mut root = configured(&host, "");
        request(&root, &host);
        root.tick(&host);
        assert!(root.on_done(&host), "the VM ends with it: nothing to wait for");
        assert_eq!(host.live.get(), 0);
        assert_eq!(host.counter("exports_handed_over"), 1, "a copy of the call in flight, for whoever comes next");
    }

    #[test]
    fn bad_configuration_is_refused_with_the_field() {
        let host = MockRoot::new(proxy());
        let mut root = Root::default();
        assert!(!root.configure(&host, br#"{"collector":{}}"#, |_| None, 7));
        assert_eq!(host.logs.borrow()[0].0, Level::Error);
        assert!(host.logs.borrow()[0].1.contains("collector.cluster"), "{:?}", host.logs.borrow());
        assert!(root.telemetry().is_none());
    }

    #[test]
    fn a_proxy_without_cel_is_said_once_and_counted() {
        let host = MockRoot::new(proxy().without_cel());
        let mut root = configured(&host, "");
        assert_eq!(host.lines("refused to compile the log phase's CEL query"), 1);
        root.tick(&host);
        root.tick(&host);
        assert_eq!(host.counter("cel_refused"), 1);
        assert_eq!(host.lines("refused to compile"), 1);
        let tcp = MockRoot::new(proxy().without_cel().with_property("plugin_root_id", TCP_ROOT_ID));
        configured(&tcp, "");
        assert_eq!(tcp.lines("refused to compile"), 0, "the network filter has no log phase to read");
    }

    #[test]
    fn a_logs_filter_the_proxy_cannot_compile_refuses_the_configuration() {
        let host = MockRoot::new(proxy().refusing("response.code >>= 400"));
        let json = br#"{"collector":{"cluster":"outbound|4318||otel"},"logs":{"enabled":true,"filter":"response.code >>= 400"}}"#;
        let mut root = Root::default();
        assert!(!root.configure(&host, json, |_| None, 7));
        assert_eq!(host.lines("refused: logs.filter: the proxy cannot compile \"response.code >>= 400\""), 1);
        assert!(root.telemetry().is_none(), "the previous configuration keeps serving");
        let ok = br#"{"collector":{"cluster":"outbound|4318||otel"},"logs":{"enabled":true,"filter":"response.code >= 400"}}"#;
        assert!(Root::default().configure(&MockRoot::new(proxy()), ok, |_| None, 7));
    }

    #[test]
    fn unset_credentials_are_named_never_their_values() {
        let host = MockRoot::new(proxy());
        let json =
            br#"{"collector":{"cluster":"outbound|4318||otel","headers_from_env":{"authorization":"OTEL_TOKEN"}}}"#;
        assert!(Root::default().configure(&host, json, |_| None, 7));
        assert_eq!(host.lines("collector.headers_from_env: OTEL_TOKEN is not set"), 1);
        let host = MockRoot::new(proxy());
        assert!(Root::default().configure(&host, json, |_| Some("secret".into()), 7));
        assert!(host.logs.borrow().iter().all(|(_, l)| !l.contains("secret")));
    }
}
