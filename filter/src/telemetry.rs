//! One VM's telemetry: what the HTTP contexts record and what the root context exports.
//!
//! The proxy-wasm glue owns one [`Telemetry`] per VM (per Envoy worker) and calls it from the
//! request path (`start_request`, `finish_request`: no protobuf, no I/O) and from the root
//! context's tick (`next_export`, `sent`, `completed`).

use crate::config::Config;
use crate::export::{BoundedQueue, ExportStats, FlushTimer, Outcome, Payload, Sender};
use crate::node::NodeInfo;
use crate::otlp::{self, TraceEncoder};
use crate::propagation::{start_trace, HeaderOp, Headers, IdGenerator, TraceDecision};
use crate::sampler::RatioSampler;
use crate::span::{Completion, RequestInfo, SpanRecord};

/// A request in progress whose trace was decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveRequest {
    /// Trace ids and sampling.
    pub trace: TraceDecision,
    /// Start time, nanoseconds since the Unix epoch.
    pub start_unix_nanos: u64,
    /// Captured request facts; only filled for sampled requests.
    pub request: RequestInfo,
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
    spans_recorded: u64,
    reported_drops: u64,
}

impl Telemetry {
    /// Telemetry for the workload `node` describes; `seed` seeds id generation.
    pub fn new(config: Config, node: NodeInfo, seed: u64, now_ns: u64) -> Self {
        let encoder = TraceEncoder::new(otlp::resource(&node, &config.resource_attributes), &node);
        Self {
            sampler: RatioSampler::new(config.traces.sampling_ratio),
            ids: IdGenerator::with_seed(seed),
            encoder,
            spans: BoundedQueue::new(config.export.max_queue),
            flush: FlushTimer::new(config.export.flush_interval, now_ns),
            traces: Sender::new(config.export.max_in_flight, config.export.max_retries),
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

    /// Decide the trace of a new request and the header changes that propagate it.
    /// `None` when tracing is off: the request is left alone.
    pub fn start_request(
        &mut self,
        headers: &[(String, Vec<u8>)],
        now_ns: u64,
    ) -> Option<(ActiveRequest, Vec<HeaderOp>)> {
        if !self.config.traces.enabled {
            return None;
        }
        let headers = Headers(headers);
        let (trace, ops) = start_trace(
            &self.config.traces.propagation,
            &self.sampler,
            headers,
            &mut self.ids,
        );
        let request = if trace.sampled {
            RequestInfo::from_headers(headers)
        } else {
            RequestInfo::default()
        };
        Some((
            ActiveRequest {
                trace,
                start_unix_nanos: now_ns,
                request,
            },
            ops,
        ))
    }

    /// Record the span of a finished sampled request; unsampled requests cost nothing here.
    pub fn finish_request(&mut self, active: ActiveRequest, completion: Completion) {
        if !active.trace.sampled {
            return;
        }
        self.spans_recorded += 1;
        self.spans.push(SpanRecord::new(
            active.trace,
            self.config.traces.span_name,
            active.start_unix_nanos,
            active.request,
            completion,
        ));
    }

    /// The next export call to make now, if any: a retry whose delay passed, else a new batch
    /// when one is due. Encoding happens here, off the request path.
    pub fn next_export(&mut self, now_ns: u64) -> Option<Payload> {
        if let Some(retry) = self.traces.due_retry(now_ns) {
            return Some(retry);
        }
        if !self.traces.has_capacity()
            || !self
                .flush
                .due(self.spans.len(), self.config.export.max_batch, now_ns)
        {
            return None;
        }
        let batch = self.spans.take(self.config.export.max_batch);
        self.flush.flushed(now_ns);
        Some(Payload::new(
            self.encoder.encode(&batch),
            batch.len() as u64,
        ))
    }

    /// Record that `payload` went out as call `token`.
    pub fn sent(&mut self, token: u32, payload: Payload) {
        self.traces.sent(token, payload);
    }

    /// Record that the proxy refused to make the call. Returns a line to log on a state change.
    pub fn not_sent(&mut self, payload: Payload, reason: String, now_ns: u64) -> Option<String> {
        self.traces.not_sent(payload, reason, now_ns)
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
        let outcome = match crate::export::classify(status, retry_after) {
            Outcome::Success { .. } => Outcome::Success {
                rejected: otlp::rejected_spans(body),
            },
            other => other,
        };
        self.traces.completed(token, outcome, now_ns)
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
    pub fn stats(&self) -> TelemetryStats {
        TelemetryStats {
            spans_recorded: self.spans_recorded,
            spans_dropped: self.spans.dropped(),
            traces: self.traces.stats().clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::span::SpanKind;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;

    const S: u64 = 1_000_000_000;

    fn telemetry(extra: &str) -> Telemetry {
        let json = format!(
            r#"{{"collector":{{"cluster":"outbound|4318||otel.obs.svc.cluster.local"}}{extra}}}"#
        );
        Telemetry::new(
            config::parse(json.as_bytes()).unwrap(),
            NodeInfo::default(),
            42,
            0,
        )
    }

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
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
            let (active, _) = t
                .start_request(&headers(&[(":method", "GET"), (":path", "/")]), 1)
                .unwrap();
            t.finish_request(active, completion());
        }
    }

    fn spans_in(p: &Payload) -> usize {
        ExportTraceServiceRequest::decode(p.body.as_slice())
            .unwrap()
            .resource_spans[0]
            .scope_spans[0]
            .spans
            .len()
    }

    #[test]
    fn batches_by_size_and_interval() {
        let mut t = telemetry(r#","export":{"max_batch":3,"flush_interval_ms":1000}"#);
        record(&mut t, 4);
        let p = t.next_export(1).unwrap();
        assert_eq!((p.items, spans_in(&p)), (3, 3), "a full batch goes at once");
        t.sent(1, p);
        assert_eq!(t.next_export(2), None, "one span waits for the interval");
        let p = t.next_export(S + 1).unwrap();
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
        let (active, ops) = t.start_request(&[], 1).unwrap();
        assert!(!active.trace.sampled);
        assert!(!ops.is_empty(), "context still propagates");
        t.finish_request(active, completion());
        assert_eq!(t.stats().spans_recorded, 0);
        assert_eq!(t.next_export(10 * S), None);
    }

    #[test]
    fn disabled_tracing_leaves_requests_alone() {
        let mut t = telemetry(r#","traces":{"enabled":false}"#);
        assert_eq!(t.start_request(&[], 1), None);
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
        record(&mut t, 2);
        let p = t.next_export(1).unwrap();
        t.sent(7, p);
        assert_eq!(t.next_export(2), None);
        t.completed(7, Some(200), None, &[], 3);
        assert!(t.next_export(4).is_some());
    }

    #[test]
    fn failed_export_is_retried_with_the_same_body() {
        let mut t = telemetry(r#","export":{"max_batch":1}"#);
        record(&mut t, 1);
        let p = t.next_export(1).unwrap();
        let body = p.body.clone();
        t.sent(1, p);
        let line = t.completed(1, None, None, &[], 1).unwrap();
        assert!(line.starts_with("export failing"), "{line}");
        let retry = t.next_export(2 * S).unwrap();
        assert_eq!(retry.body, body);
        assert_eq!(retry.attempts, 1);
    }
}
