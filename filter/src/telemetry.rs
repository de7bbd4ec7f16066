//! One VM's telemetry: what the HTTP contexts record and what the root context exports.
//!
//! The proxy-wasm glue owns one [`Telemetry`] per VM (per Envoy worker) and calls it from the
//! request path (`start_request`, `finish_request`: no protobuf, no I/O, no shared data) and
//! from the root context's tick (`next_export`, `sent`, `completed`).

use std::collections::HashMap;

use crate::config::Config;
use crate::export::{BoundedQueue, ExportStats, FlushTimer, Outcome, Payload, Sender};
use crate::metrics::aggregate::Measurement;
use crate::metrics::labels::{IstioLabels, Reporter, RequestFacts};
use crate::metrics::shared::SharedStore;
use crate::metrics::{MetricStats, MetricsPipeline};
use crate::node::NodeInfo;
use crate::otlp::{self, TraceEncoder};
use crate::peer::{self, PeerInfo};
use crate::propagation::{start_trace, HeaderOp, Headers, IdGenerator, TraceDecision};
use crate::sampler::RatioSampler;
use crate::span::{Completion, RequestInfo, SpanKind, SpanRecord};
use crate::xds_metadata::{self, ServiceInfo};

/// Most clusters whose Istio service metadata is cached per VM.
const MAX_CACHED_CLUSTERS: usize = 1024;

/// A request in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveRequest {
    /// Trace ids and sampling; `None` when tracing is off.
    pub trace: Option<TraceDecision>,
    /// Start time, nanoseconds since the Unix epoch.
    pub start_unix_nanos: u64,
    /// Captured request facts; filled for sampled requests and when metrics are on.
    pub request: RequestInfo,
    /// Whether the request is gRPC.
    pub grpc: bool,
    /// The caller, from its `x-envoy-peer-metadata` header (metrics only).
    pub downstream_peer: Option<PeerInfo>,
}

impl ActiveRequest {
    /// Whether the request's span is recorded.
    pub fn sampled(&self) -> bool {
        self.trace.as_ref().is_some_and(|t| t.sampled)
    }
}

/// What the proxy knows at the end of a request that only metrics need.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricFacts {
    /// Request wire bytes, headers included.
    pub request_bytes: u64,
    /// Response wire bytes, headers included.
    pub response_bytes: u64,
    /// gRPC status, if the proxy saw one.
    pub grpc_status: Option<u32>,
    /// Whether the downstream connection used mutual TLS.
    pub mtls: bool,
    /// The peer's SPIFFE identity.
    pub peer_principal: Option<String>,
    /// This proxy's SPIFFE identity.
    pub local_principal: Option<String>,
    /// The peer from Istio's filter state (`downstream_peer` / `upstream_peer`).
    pub filter_state_peer: Option<PeerInfo>,
    /// The upstream, from its `x-envoy-peer-metadata` response header.
    pub upstream_peer: Option<PeerInfo>,
    /// The upstream endpoint's `istio.workload` metadata.
    pub host_workload: Option<String>,
    /// The destination service from the cluster's Istio metadata.
    pub cluster_service: Option<ServiceInfo>,
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
}

/// All telemetry state of one VM.
#[derive(Debug)]
pub struct Telemetry {
    config: Config,
    node: NodeInfo,
    sampler: RatioSampler,
    ids: IdGenerator,
    encoder: TraceEncoder,
    spans: BoundedQueue<SpanRecord>,
    flush: FlushTimer,
    traces: Sender,
    metrics: Option<MetricsPipeline>,
    cluster_services: HashMap<String, Option<ServiceInfo>>,
    spans_recorded: u64,
    reported_drops: u64,
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
            encoder: TraceEncoder::new(resource, &node),
            spans: BoundedQueue::new(config.export.max_queue),
            flush: FlushTimer::new(config.export.flush_interval, now_ns),
            traces: Sender::new(config.export.max_in_flight, config.export.max_retries),
            metrics,
            cluster_services: HashMap::new(),
            spans_recorded: 0,
            reported_drops: 0,
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

    /// Whether Istio metrics are recorded (the glue then gathers [`MetricFacts`]).
    pub fn metrics_enabled(&self) -> bool {
        self.metrics.is_some()
    }

    /// Create the proxy-wide shared entries if this is the first VM.
    pub fn init_shared(&self, store: &dyn SharedStore, now_ns: u64) {
        if let Some(m) = &self.metrics {
            m.init_shared(store, now_ns);
        }
    }

    /// Start a request: decide its trace and the header changes that propagate it.
    /// `None` when both tracing and metrics are off: the request is left alone.
    pub fn start_request(
        &mut self,
        headers: &[(String, Vec<u8>)],
        now_ns: u64,
    ) -> Option<(ActiveRequest, Vec<HeaderOp>)> {
        if !self.config.traces.enabled && self.metrics.is_none() {
            return None;
        }
        let headers = Headers(headers);
        let (trace, ops) = if self.config.traces.enabled {
            let (t, ops) = start_trace(&self.config.traces.propagation, &self.sampler, headers, &mut self.ids);
            (Some(t), ops)
        } else {
            (None, Vec::new())
        };
        let metrics = self.metrics.is_some();
        let sampled = trace.as_ref().is_some_and(|t| t.sampled);
        let request = if sampled {
            RequestInfo::from_headers(headers, &self.config.traces.request_headers)
        } else if metrics {
            // Metrics need only the authority (the Host fallback of destination_service).
            RequestInfo {
                authority: headers.single(":authority").unwrap_or_default().to_string(),
                ..Default::default()
            }
        } else {
            RequestInfo::default()
        };
        let grpc = metrics && headers.single("content-type").is_some_and(|ct| ct.starts_with("application/grpc"));
        let downstream_peer = if metrics {
            headers
                .0
                .iter()
                .find(|(n, _)| n == peer::PEER_METADATA_HEADER)
                .and_then(|(_, v)| peer::from_peer_metadata_header(v))
        } else {
            None
        };
        Some((ActiveRequest { trace, start_unix_nanos: now_ns, request, grpc, downstream_peer }, ops))
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

    /// Finish a request: record its span if sampled, and its metrics if they are on.
    pub fn finish_request(&mut self, active: ActiveRequest, completion: Completion, facts: Option<MetricFacts>) {
        if let (Some(facts), true) = (facts, self.metrics.is_some()) {
            let (labels, measurement) = self.metric_point(&active, &completion, facts);
            if let Some(m) = self.metrics.as_mut() {
                m.record(labels, &measurement);
            }
        }
        let Some(trace) = active.trace.filter(|t| t.sampled) else {
            return;
        };
        self.spans_recorded += 1;
        self.spans.push(SpanRecord::new(
            trace,
            self.config.traces.span_name,
            active.start_unix_nanos,
            active.request,
            completion,
        ));
    }

    fn metric_point(&self, active: &ActiveRequest, c: &Completion, f: MetricFacts) -> (Vec<String>, Measurement) {
        let reporter =
            if self.node.is_gateway() || c.kind == SpanKind::Client { Reporter::Source } else { Reporter::Destination };
        let peer = match reporter {
            Reporter::Destination => f.filter_state_peer.or_else(|| active.downstream_peer.clone()),
            Reporter::Source => f
                .filter_state_peer
                .or(f.upstream_peer)
                .or_else(|| f.host_workload.as_deref().and_then(peer::from_host_workload)),
        };
        // Istio falls back to the Host header only on sidecar outbound traffic.
        let header_fallback = reporter == Reporter::Source && !self.node.is_gateway();
        let service = f
            .cluster_service
            .or_else(|| {
                let host = c.upstream_cluster.as_deref()?.strip_prefix("outbound|")?.splitn(3, '|').nth(2)?;
                xds_metadata::service_from_host(host)
            })
            .or_else(|| header_fallback.then(|| xds_metadata::service_from_host(&active.request.authority)).flatten());
        let facts = RequestFacts {
            peer: peer.unwrap_or_default(),
            peer_principal: f.peer_principal,
            local_principal: f.local_principal,
            service,
            grpc: active.grpc,
            response_code: c.status_code,
            grpc_status: f.grpc_status,
            response_flags: c.response_flags.clone(),
            mtls: f.mtls,
        };
        let labels = IstioLabels::new(reporter, &self.node, facts).into_values();
        let measurement = Measurement {
            duration_ms: c.end_unix_nanos.saturating_sub(active.start_unix_nanos) as f64 / 1e6,
            request_bytes: f.request_bytes,
            response_bytes: f.response_bytes,
        };
        (labels, measurement)
    }

    /// The next export call to make now, if any: span retries and batches first, then metrics.
    /// Encoding happens here, off the request path.
    pub fn next_export(&mut self, store: &dyn SharedStore, now_ns: u64) -> Option<Payload> {
        if let Some(retry) = self.traces.due_retry(now_ns) {
            return Some(retry);
        }
        if self.traces.has_capacity() && self.flush.due(self.spans.len(), self.config.export.max_batch, now_ns) {
            let batch = self.spans.take(self.config.export.max_batch);
            self.flush.flushed(now_ns);
            return Some(Payload::new(otlp::TRACES_PATH, self.encoder.encode(&batch), batch.len() as u64));
        }
        self.metrics.as_mut()?.tick(store, now_ns)
    }

    fn sender_for(&mut self, path: &str) -> &mut Sender {
        match (&mut self.metrics, path) {
            (Some(m), otlp::METRICS_PATH) => m.sender(),
            _ => &mut self.traces,
        }
    }

    /// Record that `payload` went out as call `token`.
    pub fn sent(&mut self, token: u32, payload: Payload) {
        self.sender_for(payload.path).sent(token, payload);
    }

    /// Record that the proxy refused to make the call. Returns a line to log on a state change.
    pub fn not_sent(&mut self, payload: Payload, reason: String, now_ns: u64) -> Option<String> {
        let path = payload.path;
        self.sender_for(path).not_sent(payload, reason, now_ns).map(|l| format!("{path}: {l}"))
    }

    /// Record the collector's answer to call `token`: its status, `Retry-After` and body.
    /// Returns a line to log on a state change.
    pub fn completed(
        &mut self,
        token: u32,
        status: Option<u32>,
        retry_after: Option<&str>,
        body: &[u8],
        now_ns: u64,
    ) -> Option<String> {
        let metrics = self.metrics.as_ref().is_some_and(|m| m.owns(token));
        let path = if metrics { otlp::METRICS_PATH } else { otlp::TRACES_PATH };
        let outcome = match crate::export::classify(status, retry_after) {
            Outcome::Success { .. } if path == otlp::METRICS_PATH => {
                Outcome::Success { rejected: otlp::metrics::rejected_points(body) }
            }
            Outcome::Success { .. } => Outcome::Success { rejected: otlp::rejected_spans(body) },
            other => other,
        };
        self.sender_for(path).completed(token, outcome, now_ns).map(|l| format!("{path}: {l}"))
    }

    /// A line to log when spans started being dropped since the last call, if they did.
    pub fn drop_report(&mut self) -> Option<String> {
        let dropped = self.spans.dropped();
        if dropped == self.reported_drops {
            return None;
        }
        let new = dropped - self.reported_drops;
        self.reported_drops = dropped;
        Some(format!(
            "span queue full (export.max_queue = {}): dropped {new} oldest spans, {dropped} in all",
            self.config.export.max_queue
        ))
    }

    /// Cumulative health counters.
    pub fn stats(&mut self) -> TelemetryStats {
        let (metrics, metric_exports) = match self.metrics.as_mut() {
            Some(m) => (m.stats(), m.sender().stats().clone()),
            None => Default::default(),
        };
        TelemetryStats {
            spans_recorded: self.spans_recorded,
            spans_dropped: self.spans.dropped(),
            traces: self.traces.stats().clone(),
            metrics,
            metric_exports,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::metrics::shared::MemoryStore;
    use crate::span::SpanKind;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;

    const S: u64 = 1_000_000_000;

    fn telemetry(extra: &str) -> Telemetry {
        let json = format!(r#"{{"collector":{{"cluster":"outbound|4318||otel.obs.svc.cluster.local"}}{extra}}}"#);
        Telemetry::new(config::parse(json.as_bytes()).unwrap(), NodeInfo::default(), 42, "test", 0)
    }

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect()
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
            let (active, _) = t.start_request(&headers(&[(":method", "GET"), (":path", "/")]), 1).unwrap();
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

    #[test]
    fn unsampled_requests_cost_no_span() {
        let mut t = telemetry(r#","traces":{"sampling_ratio":0}"#);
        let store = MemoryStore::default();
        let (active, ops) = t.start_request(&[], 1).unwrap();
        assert!(!active.sampled());
        assert!(!ops.is_empty(), "context still propagates");
        t.finish_request(active, completion(), None);
        assert_eq!(t.stats().spans_recorded, 0);
        assert_eq!(t.next_export(&store, 10 * S), None);
    }

    #[test]
    fn disabled_tracing_leaves_requests_alone() {
        let mut t = telemetry(r#","traces":{"enabled":false},"metrics":{"enabled":false}"#);
        assert_eq!(t.start_request(&[], 1), None);
        let mut t = telemetry(r#","traces":{"enabled":false}"#);
        let (active, ops) = t.start_request(&[], 1).unwrap();
        assert!(ops.is_empty() && active.trace.is_none(), "metrics only: headers untouched");
    }

    #[test]
    fn queue_overflow_is_counted_and_reported_once() {
        let mut t = telemetry(r#","export":{"max_batch":2,"max_queue":2,"max_in_flight":1}"#);
        record(&mut t, 5);
        assert_eq!(t.stats().spans_dropped, 3);
        let line = t.drop_report().unwrap();
        assert!(line.contains("dropped 3 oldest spans"), "{line}");
        assert_eq!(t.drop_report(), None);
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
