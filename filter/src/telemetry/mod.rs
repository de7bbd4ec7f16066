//! One VM's telemetry: what the HTTP contexts record and what the root context exports.
//!
//! The proxy-wasm glue owns one [`Telemetry`] per VM (per Envoy worker) and calls it from the
//! request path (`start_request`, `finish_request`: no protobuf, no I/O, no shared data) and
//! from the root context's tick (`next_export`, `sent`, `completed`).

pub mod connection;
mod exports;
mod queue;
pub mod request;
pub mod tcp;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use crate::access_log::{self, AccessLog};
use crate::config::Config;
use crate::episode::CounterEpisode;
use crate::export::handoff;
use crate::export::ExportStats;
use crate::headers::Headers;
use crate::host::Host;
use crate::istio::facts::DownstreamFacts;
use crate::istio::labels::{is_grpc_content_type, is_grpc_web_content_type, with_label_values, RequestFacts};
use crate::istio::node::NodeInfo;
use crate::istio::peer;
use crate::istio::xds_metadata::{self, ServiceInfo};
use crate::metrics::aggregate::{Measurement, TcpDelta};
use crate::metrics::{MetricStats, MetricsPipeline};
use crate::otlp::{self, LogEncoder, TraceEncoder};
use crate::prefetch::{Compiled, Evaluation, LogQueries};
use crate::traces::propagation::{start_trace, HeaderOp, IdGenerator, TraceDecision};
use crate::traces::sampler::RatioSampler;
use crate::traces::span::{truncate, Completion, RequestInfo, SpanRecord, MAX_ATTRIBUTE_LEN};
use queue::Signal;
use tcp::{ConnectionLabels, TcpConnection};

/// Most clusters whose Istio service metadata is cached per VM.
const MAX_CACHED_CLUSTERS: usize = 1024;
/// Most downstream connections whose identity facts are cached per VM.
const MAX_CACHED_CONNECTIONS: usize = 1024;
/// Most open TCP connections per VM whose bytes are counted while they are open; past it a
/// connection is counted at its close only.
const MAX_REPORTED_CONNECTIONS: usize = 16_384;

/// Whether a request asks for its trace to be sampled the way Envoy lets it
/// (envoyproxy/envoy `source/common/tracing/http_tracer_impl.cc`, `mutateTraceStatus`, and the
/// HTTP header docs): `x-client-trace-id` from any client, `x-envoy-force-trace` from an
/// internal one. Internal is what Envoy says it is: it sets `x-envoy-internal: true` on
/// requests from its internal addresses (`internal_address_config`) where it uses the remote
/// address (an Istio gateway), and strips the header from every other request there.
/// (A B3 debug flag samples as any incoming decision does.)
fn forces_a_trace(headers: Headers<'_>) -> bool {
    headers.single("x-client-trace-id").is_some_and(|v| !v.is_empty())
        || (headers.single("x-envoy-force-trace").is_some() && headers.single("x-envoy-internal") == Some("true"))
}

/// A request in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveRequest {
    /// Trace ids and sampling; `None` when tracing is off.
    pub trace: Option<TraceDecision>,
    /// Start time, nanoseconds since the Unix epoch.
    pub start_unix_nanos: u64,
    /// Captured request facts; filled for sampled requests and when metrics are on.
    pub request: RequestInfo,
    /// Whether the request is gRPC by Istio's test of its `content-type`.
    pub grpc: bool,
    /// Whether the request is gRPC-Web (a `grpc_web` filter after meshtel may make it gRPC).
    pub grpc_web: bool,
    /// The caller's `x-envoy-peer-metadata` header as sent (metrics only), decoded only if Istio's
    /// filter state does not name the caller.
    pub peer_header: Option<Vec<u8>>,
    /// Whether the request may get an access-log record (the glue then reads what it needs).
    pub log: bool,
}

impl ActiveRequest {
    /// Whether the request's span is recorded.
    pub fn sampled(&self) -> bool {
        self.trace.as_ref().is_some_and(|t| t.sampled)
    }

    /// Whether the request needs its full request facts (span or access log).
    pub fn recorded(&self) -> bool {
        self.sampled() || self.log
    }
}

/// What the proxy knows at the end of a request that only metrics need.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricFacts {
    /// What the labels are derived from.
    pub labels: RequestFacts,
    /// Request bytes, headers included.
    pub request_bytes: u64,
    /// Response bytes, headers included.
    pub response_bytes: u64,
    /// The values of `metrics.overrides`' UPSERT expressions, in
    /// [`crate::metrics::overrides::Shapes::expressions`] order.
    pub upserts: Vec<String>,
}

/// meshtel's own health counters for one VM, cumulative.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TelemetryStats {
    /// Spans recorded on the request path.
    pub spans_recorded: u64,
    /// Spans dropped because the queue was full.
    pub spans_dropped: u64,
    /// Export counters of spans.
    pub traces: ExportStats,
    /// Metric recording counters.
    pub metrics: MetricStats,
    /// Export counters of metric data points.
    pub metric_exports: ExportStats,
    /// Access-log records recorded on the request path.
    pub logs_recorded: u64,
    /// Access-log records dropped because the queue was full.
    pub logs_dropped: u64,
    /// Export counters of access-log records.
    pub log_exports: ExportStats,
    /// Export payloads handed to other root contexts when this one ended.
    pub handed_over: u64,
    /// Export payloads taken from root contexts that ended, and sent by this one.
    pub taken_over: u64,
    /// 1 when the proxy refused to compile the log phase's CEL queries (it reads fact by fact).
    pub cel_refused: u64,
    /// Log-phase evaluations that failed (those requests were read fact by fact).
    pub cel_evaluations_failed: u64,
    /// Requests `logs.filter` could not decide (an evaluation error): not logged.
    pub log_filter_errors: u64,
}

/// All telemetry state of one VM.
#[derive(Debug)]
pub struct Telemetry {
    config: Config,
    node: NodeInfo,
    sampler: RatioSampler,
    ids: IdGenerator,
    encoder: TraceEncoder,
    spans: Signal<SpanRecord>,
    log_encoder: LogEncoder,
    logs: Signal<AccessLog>,
    metrics: Option<MetricsPipeline>,
    /// The log phase's reads as CEL queries (see [`crate::prefetch`]).
    queries: LogQueries,
    cel_refused: bool,
    cel_evaluations_failed: u64,
    /// Failing evaluations, as an episode.
    cel_failures: CounterEpisode,
    log_filter_errors: u64,
    /// `logs.filter` errors, as an episode.
    filter_failures: CounterEpisode,
    cluster_services: HashMap<String, Option<ServiceInfo>>,
    connections: HashMap<u64, DownstreamFacts>,
    /// The open TCP connections of the network filter, by context id, counted on an interval.
    open_connections: HashMap<u32, Rc<RefCell<TcpConnection>>>,
    last_connection_report_ns: u64,
    connection_report_interval_ns: u64,
    handoff_name: String,
    /// The queue of payloads handed over by root contexts that ended, once the proxy gave it.
    handoff: Option<u32>,
    /// Whether this root context is done: it sends nothing new, and hands retries over.
    ending: bool,
    handed_over: u64,
    taken_over: u64,
}

impl Telemetry {
    /// Telemetry for the workload `node` describes; `seed` seeds id generation and `scope`
    /// names this plugin's shared data.
    pub fn new(config: Config, node: NodeInfo, seed: u64, scope: &str, now_ns: u64) -> Self {
        let resource = otlp::resource(&node, &config.resource_attributes);
        let mut ids = IdGenerator::with_seed(seed);
        let metrics = config.metrics.enabled.then(|| {
            let token = u64::from_be_bytes(ids.span_id().0);
            MetricsPipeline::new(&config, resource.clone(), scope, token, now_ns)
        });
        Self {
            sampler: RatioSampler::new(config.traces.sampling_ratio),
            ids,
            log_encoder: LogEncoder::new(&resource),
            encoder: TraceEncoder::new(resource, &node),
            spans: Signal::new(otlp::Signal::Traces, &config, now_ns, seed),
            logs: Signal::new(otlp::Signal::Logs, &config, now_ns, seed),
            metrics,
            queries: LogQueries::new(&config, &node),
            cel_refused: false,
            cel_evaluations_failed: 0,
            cel_failures: CounterEpisode::default(),
            log_filter_errors: 0,
            filter_failures: CounterEpisode::default(),
            cluster_services: HashMap::new(),
            connections: HashMap::new(),
            open_connections: HashMap::new(),
            last_connection_report_ns: now_ns,
            // The metrics' heartbeat: bytes reach the deltas well before each hand-over.
            connection_report_interval_ns: crate::metrics::heartbeat_interval_ns(&config),
            handoff_name: handoff::queue_name(scope),
            handoff: None,
            ending: false,
            handed_over: 0,
            taken_over: 0,
            config,
            node,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The proxy's identity.
    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// Compile the log phase's queries in the proxy (once, from the root context). Where the
    /// proxy has no CEL, the request path reads fact by fact, with the same result, and
    /// `logs.filter` is not applied.
    pub fn compile_queries(&mut self, host: &dyn Host) -> Compiled {
        let compiled = self.queries.compile(host);
        self.cel_refused = compiled == Compiled::NoCel;
        compiled
    }

    /// Compile the user's expressions alone (a TCP root context: the UPSERT expressions of
    /// `metrics.overrides`, evaluated once per connection).
    pub fn compile_user_expressions(&mut self, host: &dyn Host) -> Compiled {
        self.queries.compile_user(host)
    }

    /// Whether a request whose `logs.filter` came to `value` is logged: only a `true` is, as
    /// Envoy's CEL access-log filter decides (an error or another type is not); without CEL
    /// in the proxy the filter is not applied.
    pub(crate) fn filter_keeps(&mut self, value: Option<&[u8]>) -> bool {
        if self.config.logs.filter.is_none() || self.cel_refused {
            return true;
        }
        if value.is_none() {
            self.log_filter_errors += 1;
        }
        value == Some(&[1])
    }

    /// The log phase's queries.
    pub fn queries(&self) -> &LogQueries {
        &self.queries
    }

    /// Count a failed evaluation.
    pub(crate) fn count_evaluation(&mut self, evaluation: Evaluation) {
        if evaluation == Evaluation::Failed {
            self.cel_evaluations_failed += 1;
        }
    }

    /// Whether Istio metrics are recorded (the glue then gathers [`MetricFacts`]).
    pub fn metrics_enabled(&self) -> bool {
        self.metrics.is_some()
    }

    /// The label sets recorded since the last tick, as `name -> value` maps, with their counts.
    #[cfg(test)]
    pub(crate) fn recorded_series(&self) -> Vec<(std::collections::BTreeMap<String, String>, u64)> {
        let series = self.metrics.as_ref().map(|m| m.local_series()).unwrap_or_default();
        series.into_iter().map(|(values, n)| (crate::metrics::overrides::attribute_map(&values), n)).collect()
    }

    /// A TCP connection opened (the network filter's `on_new_connection`): counted on an
    /// interval while it is open ([`Telemetry::connections_to_report`]) unless too many are.
    pub fn open_connection(&mut self, id: u32, now_ns: u64) -> Rc<RefCell<TcpConnection>> {
        let c = Rc::new(RefCell::new(TcpConnection::new(now_ns)));
        if self.metrics.is_some() && self.open_connections.len() < MAX_REPORTED_CONNECTIONS {
            self.open_connections.insert(id, c.clone());
        }
        c
    }

    /// A TCP connection closed: count it (see [`Telemetry::report_connection`]) and forget it.
    pub fn close_connection(&mut self, host: &dyn Host, id: u32, c: &mut TcpConnection) {
        self.report_connection(host, c, true);
        self.open_connections.remove(&id);
    }

    /// The open connections to report now, once per interval: the glue reports each as its
    /// own effective context.
    pub fn connections_to_report(&mut self, now_ns: u64) -> Vec<(u32, Rc<RefCell<TcpConnection>>)> {
        if self.open_connections.is_empty()
            || now_ns.saturating_sub(self.last_connection_report_ns) < self.connection_report_interval_ns
        {
            return Vec::new();
        }
        self.last_connection_report_ns = now_ns;
        // HTTP connections are found out at their first report and need no more.
        self.open_connections.retain(|_, c| c.try_borrow().map_or(true, |c| c.is_reported()));
        self.open_connections.iter().map(|(id, c)| (*id, c.clone())).collect()
    }

    /// Record a connection's report into the metrics.
    pub(crate) fn record_connection(&mut self, labels: &ConnectionLabels, delta: &TcpDelta) {
        if let Some(m) = self.metrics.as_mut() {
            m.record_connection(&labels.standard, &labels.upserts, labels.server, delta);
        }
    }

    /// The spans and access-log records queued so far (taken out of the queues).
    #[cfg(test)]
    pub(crate) fn take_records(&mut self) -> (Vec<SpanRecord>, Vec<AccessLog>) {
        (self.spans.queue.take(usize::MAX), self.logs.queue.take(usize::MAX))
    }

    /// The TCP series recorded since the last hand-over: label values and (opened, closed,
    /// sent, received).
    #[cfg(test)]
    pub(crate) fn recorded_tcp_series(&self) -> Vec<(Vec<String>, [u64; 4])> {
        self.metrics.as_ref().map(|m| m.local_tcp_series()).unwrap_or_default()
    }

    /// Start a request: decide its trace and the header changes that propagate it.
    /// `None` when tracing, metrics and logs are all off: the request is left alone.
    pub fn start_request(&mut self, headers: Headers<'_>, now_ns: u64) -> Option<(ActiveRequest, Vec<HeaderOp>)> {
        if !self.config.traces.enabled && self.metrics.is_none() && !self.config.logs.enabled {
            return None;
        }
        let (trace, ops) = if self.config.traces.enabled {
            let forced = self.config.traces.force_headers && forces_a_trace(headers);
            let (t, ops) = start_trace(&self.config.traces.propagation, &self.sampler, headers, &mut self.ids, forced);
            (Some(t), ops)
        } else {
            (None, Vec::new())
        };
        let metrics = self.metrics.is_some();
        let sampled = trace.as_ref().is_some_and(|t| t.sampled);
        let log = self.config.logs.enabled && access_log::wanted(self.config.logs.mode, sampled);
        let request = if sampled || log {
            let mut r = RequestInfo::from_headers(headers, &self.config.traces.request_headers);
            if sampled {
                r.custom_tags = crate::traces::custom_tags::values(&self.config.traces.custom_tags, headers);
            }
            if log {
                r.request_id = headers.single("x-request-id").map(|id| truncate(id, MAX_ATTRIBUTE_LEN));
            }
            r
        } else if metrics {
            // Metrics need only the authority (the Host fallback of destination_service).
            RequestInfo {
                authority: headers.single(":authority").unwrap_or_default().to_string(),
                ..Default::default()
            }
        } else {
            RequestInfo::default()
        };
        let content_type = if metrics { headers.single("content-type").unwrap_or_default() } else { "" };
        let grpc = is_grpc_content_type(content_type.as_bytes());
        let grpc_web = is_grpc_web_content_type(content_type.as_bytes());
        let peer_header = if metrics && self.config.metrics.peer_metadata_headers {
            headers.first(peer::PEER_METADATA_HEADER).map(<[u8]>::to_vec)
        } else {
            None
        };
        Some((ActiveRequest { trace, start_unix_nanos: now_ns, request, grpc, grpc_web, peer_header, log }, ops))
    }

    /// The Istio service behind `cluster`, from its metadata (read by `read` once per cluster).
    pub fn cluster_service(&mut self, cluster: &str, read: impl FnOnce() -> Option<Vec<u8>>) -> Option<ServiceInfo> {
        if let Some(cached) = self.cluster_services.get(cluster) {
            return cached.clone();
        }
        let service = read().and_then(|md| xds_metadata::cluster_service(&md));
        if self.cluster_services.len() >= MAX_CACHED_CLUSTERS {
            self.cluster_services.clear();
        }
        self.cluster_services.insert(cluster.to_string(), service.clone());
        service
    }

    /// What downstream connection `id` says about the caller, read by `read` once per connection
    /// (a keep-alive connection carries many requests; each fact is a host call). Without an id,
    /// `read` runs every time.
    pub fn downstream_facts(&mut self, id: Option<u64>, read: impl FnOnce() -> DownstreamFacts) -> DownstreamFacts {
        let Some(id) = id else {
            return read();
        };
        if let Some(cached) = self.connections.get(&id) {
            return cached.clone();
        }
        let facts = read();
        if self.connections.len() >= MAX_CACHED_CONNECTIONS {
            self.connections.clear();
        }
        self.connections.insert(id, facts.clone());
        facts
    }

    /// Finish a request: record its span if sampled, its metrics if they are on, and its access
    /// log if it was wanted and `logs.mode` keeps it.
    pub fn finish_request(&mut self, active: ActiveRequest, completion: Completion, facts: Option<MetricFacts>) {
        if let (Some(facts), Some(metrics)) = (facts, self.metrics.as_mut()) {
            let measurement = Measurement {
                duration_ms: completion.end_unix_nanos.saturating_sub(active.start_unix_nanos) as f64 / 1e6,
                request_bytes: facts.request_bytes,
                response_bytes: facts.response_bytes,
                // Only a recorded span can be an exemplar: the trace it names must exist.
                traced: active
                    .trace
                    .as_ref()
                    .filter(|t| t.sampled)
                    .map(|t| (t.trace_id.0, t.span_id.0, completion.end_unix_nanos)),
            };
            let server = facts.labels.reporter.is_server();
            with_label_values(&self.node, &facts.labels, |labels| {
                metrics.record_request(labels, &facts.upserts, server, &measurement)
            });
        }
        let log = active.log && access_log::keep(self.config.logs.mode, &completion);
        let ActiveRequest { trace, start_unix_nanos: start, request, .. } = active;
        if !log {
            if let Some(span) = trace.filter(|t| t.sampled) {
                self.push_span(span, start, request, completion);
            }
            return;
        }
        match trace.as_ref().filter(|t| t.sampled).cloned() {
            Some(span) => {
                let (r, c) = (request.clone(), completion.clone());
                self.logs.push(AccessLog { trace, start_unix_nanos: start, request: r, completion: c });
                self.push_span(span, start, request, completion);
            }
            None => self.logs.push(AccessLog { trace, start_unix_nanos: start, request, completion }),
        }
    }

    fn push_span(&mut self, trace: TraceDecision, start: u64, request: RequestInfo, completion: Completion) {
        self.spans.push(SpanRecord::new(trace, self.config.traces.span_name, start, request, completion));
    }

    /// Lines to log for the repeated conditions that started or settled since the last call
    /// (see [`crate::episode`]): full queues, failing exports, refused items, unreadable metric
    /// batches. Called on every tick; a condition that lasts gives no line until it settles.
    pub fn notices(&mut self, now_ns: u64) -> Vec<String> {
        let cap = self.config.export.max_queue;
        let mut lines = Vec::new();
        self.spans.notices("span", cap, now_ns, &mut lines);
        self.logs.notices("access-log", cap, now_ns, &mut lines);
        lines.extend(self.cel_failures.line(
            self.cel_evaluations_failed,
            now_ns,
            |_| "the log phase's CEL evaluation is failing: requests are read fact by fact (same telemetry, higher cost)".into(),
            |s| format!("the log phase's CEL evaluation works again: {} requests were read fact by fact over {} s", s.count, s.seconds),
        ));
        lines.extend(self.filter_failures.line(
            self.log_filter_errors,
            now_ns,
            |_| "logs.filter fails to evaluate for some requests (an attribute they lack?): they are not logged".into(),
            |s| {
                format!(
                    "logs.filter evaluates again: {} requests were not logged for an error over {} s",
                    s.count, s.seconds
                )
            },
        ));
        if let Some(m) = self.metrics.as_mut() {
            m.notices(now_ns, &mut lines);
        }
        lines
    }

    /// Cumulative health counters.
    pub fn stats(&mut self) -> TelemetryStats {
        let (metrics, metric_exports) = match self.metrics.as_mut() {
            Some(m) => (m.stats(), m.sender().stats().clone()),
            None => Default::default(),
        };
        TelemetryStats {
            spans_recorded: self.spans.recorded,
            spans_dropped: self.spans.queue.dropped(),
            traces: self.spans.sender.stats().clone(),
            metrics,
            metric_exports,
            logs_recorded: self.logs.recorded,
            logs_dropped: self.logs.queue.dropped(),
            log_exports: self.logs.sender.stats().clone(),
            handed_over: self.handed_over,
            taken_over: self.taken_over,
            cel_refused: u64::from(self.cel_refused),
            cel_evaluations_failed: self.cel_evaluations_failed,
            log_filter_errors: self.log_filter_errors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::export::Payload;
    use crate::metrics::shared::MemoryStore;
    use crate::traces::span::SpanKind;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;

    const S: u64 = 1_000_000_000;

    fn telemetry(extra: &str) -> Telemetry {
        let json = format!(r#"{{"collector":{{"cluster":"outbound|4318||otel.obs.svc.cluster.local"}}{extra}}}"#);
        Telemetry::new(config::parse(json.as_bytes()).unwrap(), NodeInfo::default(), 42, "test", 0)
    }

    fn headers(pairs: &[(&str, &str)]) -> crate::headers::HeaderPairs {
        crate::headers::HeaderPairs::from_pairs(pairs)
    }

    fn completion() -> Completion {
        Completion {
            end_unix_nanos: 10,
            status_code: 200,
            response_flags: "-".into(),
            kind: SpanKind::Server,
            ..Default::default()
        }
    }

    fn record(t: &mut Telemetry, n: usize) {
        for _ in 0..n {
            let (active, _) = t.start_request(headers(&[(":method", "GET"), (":path", "/")]).view(), 1).unwrap();
            t.finish_request(active, completion(), None);
        }
    }

    fn spans_in(p: &Payload) -> usize {
        ExportTraceServiceRequest::decode(p.body.as_slice()).unwrap().resource_spans[0].scope_spans[0].spans.len()
    }

    #[test]
    fn batches_by_size_and_interval() {
        let mut t = telemetry(r#","export":{"max_batch":3,"flush_interval_ms":1000}"#);
        let store = MemoryStore::default();
        record(&mut t, 4);
        let p = t.next_export(&store, 1).unwrap();
        assert_eq!((p.items, spans_in(&p)), (3, 3), "a full batch goes at once");
        t.sent(1, p);
        assert_eq!(t.next_export(&store, 2), None, "one span waits for the interval");
        let p = t.next_export(&store, S + 1).unwrap();
        assert_eq!(p.items, 1);
        t.sent(2, p);
        assert_eq!(t.completed(1, Some(200), None, &[], S), None);
        assert_eq!(t.completed(2, Some(200), None, &[], S), None);
        assert_eq!(t.stats().traces.exported, 4);
        assert_eq!(t.stats().spans_recorded, 4);
    }

    /// Send what `t` exports now, each call answered 200; returns the spans sent.
    fn export_all(t: &mut Telemetry, store: &MemoryStore) -> usize {
        let mut spans = 0;
        for token in 10..20 {
            if let Some(p) = t.next_export(store, 5) {
                spans += spans_in(&p);
                t.sent(token, p);
                t.completed(token, Some(200), None, &[], 5);
            }
        }
        spans
    }

    #[test]
    fn a_root_context_that_ends_hands_what_it_has_not_sent_to_one_that_goes_on() {
        let config = r#","export":{"max_batch":2,"max_in_flight":1},"metrics":{"enabled":false}"#;
        let store = MemoryStore::default();
        let (mut old, mut new) = (telemetry(config), telemetry(config));
        old.init_shared(&store);
        new.init_shared(&store);
        record(&mut old, 5);
        let p = old.next_export(&store, 1).unwrap();
        old.sent(1, p);
        // A new pluginConfig replaced `old`: 3 spans in 2 batches are handed over, 2 are in flight.
        assert!(!old.shutdown(&store, 2, false), "a call is in flight");
        record(&mut old, 1);
        assert_eq!(old.next_export(&store, 3 * S), None, "an ended root context sends nothing new");
        // The call fails: its payload is handed over instead of retried.
        assert!(old.completed(1, Some(503), None, &[], 4).is_some());
        assert!(old.shutdown(&store, 4, false), "nothing in flight any more");
        let spans = export_all(&mut new, &store);
        assert_eq!(spans, 5, "every span recorded before the end, once");
        assert_eq!((old.stats().handed_over, new.stats().taken_over), (3, 3));
        assert_eq!(new.stats().traces.exported, 5);
    }

    #[test]
    fn a_vm_that_ends_hands_copies_of_its_calls_in_flight_over_as_well() {
        let config = r#","export":{"max_batch":2,"max_in_flight":1},"metrics":{"enabled":false}"#;
        let store = MemoryStore::default();
        let (mut old, mut new) = (telemetry(config), telemetry(config));
        record(&mut old, 3);
        let p = old.next_export(&store, 1).unwrap();
        old.sent(1, p);
        // A new module replaced the VM: Envoy deletes it and cancels the call.
        assert!(old.shutdown(&store, 2, true), "nothing to wait for");
        assert_eq!(old.stats().handed_over, 2, "the call in flight and the queued span");
        let spans = export_all(&mut new, &store);
        assert_eq!(spans, 3, "at least once");
    }

    #[test]
    fn envoys_force_headers_sample_a_new_trace_at_ratio_zero_unless_turned_off() {
        let sampled = |extra: &str, hs: &[(&str, &str)]| {
            let mut t = telemetry(&format!(r#","traces":{{"sampling_ratio":0{extra}}}"#));
            t.start_request(headers(hs).view(), 1).unwrap().0.sampled()
        };
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(sampled("", &[("x-client-trace-id", "abc")]), "a client asks (Envoy: client-forced)");
        assert!(sampled("", &[("x-envoy-force-trace", "true"), ("x-envoy-internal", "true")]), "internal force");
        assert!(!sampled("", &[("x-envoy-force-trace", "true")]), "only an internal request may force");
        assert!(!sampled("", &[("x-client-trace-id", "abc"), ("traceparent", tp)]), "an incoming decision stands");
        assert!(!sampled(r#","force_headers":false"#, &[("x-client-trace-id", "abc")]), "turned off");
        assert!(!sampled("", &[]));
    }

    #[test]
    fn metrics_carry_the_same_resource_as_spans() {
        use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
        let node = NodeInfo {
            id: "sidecar~10.0.0.1~r-1.shop~shop.svc.cluster.local".into(),
            name: "r-1".into(),
            namespace: "shop".into(),
            workload_name: "r".into(),
            labels: [("service.istio.io/canonical-name".to_string(), "r".to_string())].into_iter().collect(),
            cluster_id: "c1".into(),
            ..Default::default()
        };
        let json = r#"{"collector":{"cluster":"outbound|4318||otel.obs.svc.cluster.local"},
            "metrics":{"export_interval_ms":1000},"resource":{"attributes":{"deployment.environment.name":"prod"}}}"#;
        let mut t = Telemetry::new(config::parse(json.as_bytes()).unwrap(), node, 42, "test", 0);
        let store = MemoryStore::default();
        t.init_shared(&store);
        let (active, _) = t.start_request(headers(&[(":method", "GET"), (":path", "/")]).view(), 1).unwrap();
        t.finish_request(active, completion(), Some(MetricFacts::default()));
        let mut payloads = Vec::new();
        for step in 0..30 {
            while let Some(p) = t.next_export(&store, step * 100_000_000) {
                payloads.push(p);
            }
        }
        let spans = payloads.iter().find(|p| p.signal == otlp::Signal::Traces).unwrap();
        let metrics = payloads.iter().find(|p| p.signal == otlp::Signal::Metrics).unwrap();
        let span_resource =
            ExportTraceServiceRequest::decode(spans.body.as_slice()).unwrap().resource_spans[0].resource.clone();
        let metric_resource =
            ExportMetricsServiceRequest::decode(metrics.body.as_slice()).unwrap().resource_metrics[0].resource.clone();
        assert!(span_resource.as_ref().is_some_and(|r| r.attributes.len() > 5));
        assert_eq!(metric_resource, span_resource, "one resource, the semantic conventions' attributes included");
    }

    #[test]
    fn unsampled_requests_cost_no_span() {
        let mut t = telemetry(r#","traces":{"sampling_ratio":0}"#);
        let store = MemoryStore::default();
        let (active, ops) = t.start_request(headers(&[]).view(), 1).unwrap();
        assert!(!active.sampled());
        assert!(!ops.is_empty(), "context still propagates");
        t.finish_request(active, completion(), None);
        assert_eq!(t.stats().spans_recorded, 0);
        assert_eq!(t.next_export(&store, 10 * S), None);
    }

    #[test]
    fn disabled_tracing_leaves_requests_alone() {
        let mut t = telemetry(r#","traces":{"enabled":false},"metrics":{"enabled":false}"#);
        assert_eq!(t.start_request(headers(&[]).view(), 1), None);
        let mut t = telemetry(r#","traces":{"enabled":false}"#);
        let (active, ops) = t.start_request(headers(&[]).view(), 1).unwrap();
        assert!(ops.is_empty() && active.trace.is_none(), "metrics only: headers untouched");
    }

    #[test]
    fn queue_overflow_is_counted_and_reported_once() {
        let mut t = telemetry(r#","export":{"max_batch":2,"max_queue":2,"max_in_flight":1}"#);
        record(&mut t, 5);
        assert_eq!(t.stats().spans_dropped, 3);
        let lines = t.notices(0);
        assert_eq!(
            lines,
            ["span queue full (export.max_queue = 2): dropping the oldest records until exports catch up"]
        );
        // Still dropping on every tick for a minute: no further line.
        for tick in 1..600 {
            record(&mut t, 1);
            assert!(t.notices(tick * S / 10).is_empty(), "tick {tick}");
        }
        assert_eq!(t.stats().spans_dropped, 3 + 599);
        // Exports caught up: the first tick without drops starts the quiet spell, which settles.
        assert!(t.notices(60 * S).is_empty());
        assert!(t.notices(64 * S).is_empty());
        assert_eq!(
            t.notices(65 * S),
            ["span queue has room again: dropped 602 records over 59 s, 602 since the VM started"]
        );
        assert!(t.notices(70 * S).is_empty());
    }

    fn logged(t: &mut Telemetry, code: u32, traceparent: Option<&str>) {
        let mut hs = vec![(":method", "GET"), (":path", "/p?secret=1"), ("x-request-id", "r1")];
        hs.extend(traceparent.map(|tp| ("traceparent", tp)));
        let (active, _) = t.start_request(headers(&hs).view(), 1).unwrap();
        t.finish_request(active, Completion { status_code: code, ..completion() }, None);
    }

    fn exports(t: &mut Telemetry) -> Vec<Payload> {
        let store = MemoryStore::default();
        std::iter::from_fn(|| t.next_export(&store, 10 * S)).collect()
    }

    #[test]
    fn access_logs_follow_their_mode() {
        let unsampled = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00");
        for (mode, expected) in [("all", 4), ("errors", 2), ("sampled", 3)] {
            let mut t =
                telemetry(&format!(r#","logs":{{"enabled":true,"mode":"{mode}"}},"metrics":{{"enabled":false}}"#));
            for code in [200, 404, 503] {
                logged(&mut t, code, None);
            }
            logged(&mut t, 200, unsampled);
            assert_eq!(t.stats().logs_recorded, expected, "mode {mode}");
            let logs: Vec<_> = exports(&mut t).into_iter().filter(|p| p.signal == otlp::Signal::Logs).collect();
            assert_eq!(logs.iter().map(|p| p.items).sum::<u64>(), expected, "mode {mode}");
        }
    }

    #[test]
    fn access_logs_carry_their_spans_ids() {
        use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
        let mut t = telemetry(r#","logs":{"enabled":true},"metrics":{"enabled":false}"#);
        logged(&mut t, 200, None);
        let payloads = exports(&mut t);
        let spans = payloads.iter().find(|p| p.signal == otlp::Signal::Traces).unwrap();
        let logs = payloads.iter().find(|p| p.signal == otlp::Signal::Logs).unwrap();
        let span = ExportTraceServiceRequest::decode(spans.body.as_slice()).unwrap().resource_spans[0].scope_spans[0]
            .spans[0]
            .clone();
        let log = ExportLogsServiceRequest::decode(logs.body.as_slice()).unwrap().resource_logs[0].scope_logs[0]
            .log_records[0]
            .clone();
        assert_eq!((&log.trace_id, &log.span_id), (&span.trace_id, &span.span_id));
        let path = log.attributes.iter().find(|kv| kv.key == "url.path").unwrap();
        assert_eq!(
            format!("{:?}", path.value),
            format!("{:?}", span.attributes.iter().find(|kv| kv.key == "url.path").unwrap().value)
        );
        assert!(!format!("{log:?}").contains("secret"), "no query string in logs");
    }

    #[test]
    fn access_logs_without_tracing_have_no_ids_and_leave_headers_alone() {
        use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
        let mut t = telemetry(r#","logs":{"enabled":true},"traces":{"enabled":false},"metrics":{"enabled":false}"#);
        let (active, ops) = t.start_request(headers(&[(":method", "GET")]).view(), 1).unwrap();
        assert!(ops.is_empty());
        t.finish_request(active, completion(), None);
        let payloads = exports(&mut t);
        assert_eq!(payloads.len(), 1);
        let req = ExportLogsServiceRequest::decode(payloads[0].body.as_slice()).unwrap();
        assert!(req.resource_logs[0].scope_logs[0].log_records[0].trace_id.is_empty());
    }

    #[test]
    fn access_log_overflow_is_counted_and_reported() {
        let config = r#","logs":{"enabled":true},"traces":{"enabled":false},"metrics":{"enabled":false},"export":{"max_batch":2,"max_queue":2}"#;
        let mut t = telemetry(config);
        for _ in 0..5 {
            logged(&mut t, 200, None);
        }
        assert_eq!((t.stats().logs_recorded, t.stats().logs_dropped), (5, 3));
        let lines = t.notices(0);
        assert!(lines.len() == 1 && lines[0].starts_with("access-log queue full"), "{lines:?}");
    }

    #[test]
    fn downstream_facts_are_read_once_per_connection() {
        let mut t = telemetry("");
        let reads = std::cell::Cell::new(0);
        let read = || {
            reads.set(reads.get() + 1);
            DownstreamFacts { peer_principal: Some("p".into()), ..Default::default() }
        };
        for _ in 0..3 {
            assert!(t.downstream_facts(Some(7), read).peer_principal.is_some());
        }
        assert_eq!(reads.get(), 1, "one read for three requests on connection 7");
        t.downstream_facts(Some(8), read);
        t.downstream_facts(None, read);
        t.downstream_facts(None, read);
        assert_eq!(reads.get(), 4, "a new connection, and no id: read each time");
        for id in 0..(MAX_CACHED_CONNECTIONS as u64 + 10) {
            t.downstream_facts(Some(1000 + id), DownstreamFacts::default);
        }
        assert!(t.connections.len() <= MAX_CACHED_CONNECTIONS, "bounded");
    }

    #[test]
    fn grpc_answers_go_to_the_calls_signal() {
        let mut t = telemetry(r#","logs":{"enabled":true},"metrics":{"enabled":false},"export":{"max_retries":1}"#);
        logged(&mut t, 200, None);
        let payloads = exports(&mut t);
        let (spans, logs) = (payloads[0].clone(), payloads[1].clone());
        assert_eq!((spans.signal, logs.signal), (otlp::Signal::Traces, otlp::Signal::Logs));
        t.sent(1, spans);
        t.sent(2, logs);
        t.completed_grpc(1, 0, &[], 10 * S);
        t.completed_grpc(2, 3, &[], 10 * S);
        let stats = t.stats();
        assert_eq!((stats.traces.exported, stats.log_exports.failed), (1, 1));
    }

    #[test]
    fn in_flight_limit_holds_back_batches() {
        let mut t = telemetry(r#","export":{"max_batch":1,"max_in_flight":1}"#);
        let store = MemoryStore::default();
        record(&mut t, 2);
        let p = t.next_export(&store, 1).unwrap();
        t.sent(7, p);
        assert_eq!(t.next_export(&store, 2), None);
        t.completed(7, Some(200), None, &[], 3);
        assert!(t.next_export(&store, 4).is_some());
    }

    #[test]
    fn failed_export_is_retried_with_the_same_body() {
        let mut t = telemetry(r#","export":{"max_batch":1}"#);
        let store = MemoryStore::default();
        record(&mut t, 1);
        let p = t.next_export(&store, 1).unwrap();
        let body = p.body.clone();
        t.sent(1, p);
        let line = t.completed(1, None, None, &[], 1).unwrap();
        assert!(line.starts_with("/v1/traces: export failing"), "{line}");
        let retry = t.next_export(&store, 2 * S).unwrap();
        assert_eq!(retry.body, body);
        assert_eq!(retry.attempts, 1);
    }
}
