//! An OTLP receiver, over HTTP or gRPC: decodes what the proxies export with the official
//! `opentelemetry-proto` types.

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

use crate::envoy::Endpoint;
use crate::grpc::GrpcServer;
use crate::server::{HttpServer, Req, Resp};

/// A span as received, with its resource's attributes.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// The span.
    pub span: Span,
    /// Attributes of the resource it came with.
    pub resource: Vec<KeyValue>,
}

/// Render an attribute value as a string (ints in decimal).
pub fn value_string(v: &Option<AnyValue>) -> Option<String> {
    match v.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        any_value::Value::DoubleValue(d) => Some(d.to_string()),
        _ => None,
    }
}

fn find(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| value_string(&kv.value))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl ReceivedSpan {
    /// A span attribute as a string.
    pub fn attr(&self, key: &str) -> Option<String> {
        find(&self.span.attributes, key)
    }

    /// A resource attribute as a string.
    pub fn resource_attr(&self, key: &str) -> Option<String> {
        find(&self.resource, key)
    }

    /// Trace id, lower-case hex.
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    /// Span id, lower-case hex.
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    /// Parent span id, lower-case hex (empty for a root span).
    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// `service.name` of the resource.
    pub fn service(&self) -> String {
        self.resource_attr("service.name").unwrap_or_default()
    }
}

/// An access-log record as received, with its resource's attributes.
#[derive(Debug, Clone)]
pub struct ReceivedLog {
    /// The record.
    pub record: LogRecord,
    /// Attributes of the resource it came with.
    pub resource: Vec<KeyValue>,
}

impl ReceivedLog {
    /// A record attribute as a string.
    pub fn attr(&self, key: &str) -> Option<String> {
        find(&self.record.attributes, key)
    }

    /// Trace id, lower-case hex (empty when the record has none).
    pub fn trace_id(&self) -> String {
        hex(&self.record.trace_id)
    }

    /// Span id, lower-case hex (empty when the record has none).
    pub fn span_id(&self) -> String {
        hex(&self.record.span_id)
    }

    /// The body, when it is a string.
    pub fn body(&self) -> String {
        value_string(&self.record.body).unwrap_or_default()
    }
}

/// How the receiver answers export requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 200 with an empty `Export*ServiceResponse` (the data is kept).
    Ok,
    /// This HTTP status with an empty body (the data is not kept).
    Status(u16),
    /// This status with `Retry-After: <seconds>` (the data is not kept).
    RetryAfter(u16, u32),
    /// 200 with a body that is not protobuf (the data is kept).
    Garbage,
    /// 200 with an OTLP partial success rejecting this many items (the data is kept).
    PartialSuccess(i64),
    /// Answer 200 after this many milliseconds (the data is kept).
    DelayMs(u64),
    /// The gRPC receiver answers with this gRPC status (the HTTP one with 500); data not kept.
    Grpc(i32),
}

#[derive(Default)]
pub(crate) struct State {
    /// Only count spans and data points (benchmarks), do not keep them.
    count_only: bool,
    counted_spans: u64,
    spans: Vec<ReceivedSpan>,
    metrics: Vec<ExportMetricsServiceRequest>,
    logs: Vec<ReceivedLog>,
    requests: Vec<(String, String)>,
    headers: Vec<Vec<(String, String)>>,
    bad_requests: Vec<String>,
}

/// A running receiver on 127.0.0.1; stops when dropped.
pub struct Collector {
    /// Port it listens on.
    pub port: u16,
    /// Whether it speaks OTLP/gRPC (else OTLP/HTTP).
    pub grpc: bool,
    state: Arc<Mutex<State>>,
    answer: Arc<Mutex<Answer>>,
    _server: Server,
}

enum Server {
    Http(#[allow(dead_code)] HttpServer),
    Grpc(#[allow(dead_code)] GrpcServer),
}

impl Collector {
    /// Start a receiver on a free port.
    pub fn start() -> Collector {
        let state = Arc::new(Mutex::new(State::default()));
        let answer = Arc::new(Mutex::new(Answer::Ok));
        let (st, ans) = (state.clone(), answer.clone());
        let server = HttpServer::start(move |req| handle(req, &st, &ans));
        Collector { port: server.port, grpc: false, state, answer, _server: Server::Http(server) }
    }

    /// Start an OTLP/gRPC receiver (tonic, the three collector services) on a free port.
    pub fn start_grpc() -> Collector {
        let state = Arc::new(Mutex::new(State::default()));
        let answer = Arc::new(Mutex::new(Answer::Ok));
        let server = GrpcServer::start(state.clone(), answer.clone());
        Collector { port: server.port, grpc: true, state, answer, _server: Server::Grpc(server) }
    }

    /// Where the proxies reach it (HTTP/2 for gRPC).
    pub fn endpoint(&self) -> Endpoint {
        Endpoint { http2: self.grpc, ..Endpoint::from(self.port) }
    }

    /// The `collector` pluginConfig overrides that select this receiver's protocol.
    pub fn protocol_config(&self) -> serde_json::Value {
        serde_json::json!({"collector": {"protocol": if self.grpc { "grpc" } else { "http" }}})
    }

    /// All access-log records received so far.
    pub fn logs(&self) -> Vec<ReceivedLog> {
        self.state.lock().unwrap().logs.clone()
    }

    /// Wait until at least `n` log records arrived; panics after `timeout` with what did arrive.
    pub fn wait_for_logs(&self, n: usize, timeout: Duration) -> Vec<ReceivedLog> {
        self.wait_for(n, timeout, "log records", Self::logs, ReceivedLog::body)
    }

    /// Wait until `items` returns at least `n`; panics after `timeout` with what did arrive, or at
    /// once when an export could not be decoded.
    fn wait_for<T>(
        &self,
        n: usize,
        timeout: Duration,
        what: &str,
        items: impl Fn(&Self) -> Vec<T>,
        describe: impl Fn(&T) -> String,
    ) -> Vec<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = items(self);
            let bad = self.state.lock().unwrap().bad_requests.clone();
            assert!(bad.is_empty(), "the receiver got malformed exports: {bad:?}");
            if got.len() >= n {
                return got;
            }
            if Instant::now() > deadline {
                let seen: Vec<String> = got.iter().map(&describe).collect();
                panic!("expected {n} {what} within {timeout:?}, got {}: {seen:?}", got.len());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Change how export requests are answered from now on.
    pub fn answer_with(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    /// All spans received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.state.lock().unwrap().spans.clone()
    }

    /// A receiver that only counts what it gets (for benchmarks: it must not be the bottleneck).
    pub fn start_counting() -> Collector {
        let c = Collector::start();
        c.state.lock().unwrap().count_only = true;
        c
    }

    /// Spans received by a counting receiver.
    pub fn counted_spans(&self) -> u64 {
        self.state.lock().unwrap().counted_spans
    }

    /// Every metrics export received, in arrival order.
    pub fn metric_exports(&self) -> Vec<ExportMetricsServiceRequest> {
        self.state.lock().unwrap().metrics.clone()
    }

    /// The metric points received so far, flattened.
    pub fn points(&self) -> Vec<crate::metrics::Point> {
        crate::metrics::flatten(&self.metric_exports())
    }

    /// Wait until `check` holds for the points received; panics after `timeout` with the last view.
    pub fn wait_for_points(
        &self,
        timeout: Duration,
        check: impl Fn(&[crate::metrics::Point]) -> bool,
    ) -> Vec<crate::metrics::Point> {
        let deadline = Instant::now() + timeout;
        loop {
            let bad = self.state.lock().unwrap().bad_requests.clone();
            assert!(bad.is_empty(), "the receiver got malformed exports: {bad:?}");
            let points = self.points();
            if check(&points) {
                return points;
            }
            if Instant::now() > deadline {
                panic!("metrics never matched within {timeout:?}; last view:\n{}", crate::metrics::describe(&points));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The headers of every export request received.
    pub fn request_headers(&self) -> Vec<Vec<(String, String)>> {
        self.state.lock().unwrap().headers.clone()
    }

    /// `(path, content-type)` of every export request received.
    pub fn requests(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Wait until at least `n` spans arrived; panics after `timeout` with what did arrive.
    pub fn wait_for_spans(&self, n: usize, timeout: Duration) -> Vec<ReceivedSpan> {
        self.wait_for(n, timeout, "spans", Self::spans, |s| format!("{} ({})", s.span.name, s.service()))
    }

    /// Wait for the span with this parent span id.
    pub fn wait_for_child_of(&self, parent_span_id: &str, timeout: Duration) -> ReceivedSpan {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.spans().into_iter().find(|s| s.parent_span_id() == parent_span_id) {
                return s;
            }
            assert!(Instant::now() < deadline, "no span with parent {parent_span_id} within {timeout:?}");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// What the receiver does with one export.
pub(crate) enum Reply {
    /// Accepted: the encoded `Export*ServiceResponse`.
    Accepted(Vec<u8>),
    /// Accepted, answered with a body that is not protobuf (HTTP only).
    Garbage,
    /// Refused as `Answer` says.
    Refused(Answer),
}

/// Receive one export of `body` for OTLP/HTTP `path`, answering as `answer` says.
pub(crate) fn receive(
    path: &str,
    content_type: &str,
    headers: Vec<(String, String)>,
    body: &[u8],
    state: &Mutex<State>,
    answer: &Mutex<Answer>,
) -> Reply {
    let answer = *answer.lock().unwrap();
    {
        let mut st = state.lock().unwrap();
        st.requests.push((path.to_string(), content_type.to_string()));
        st.headers.push(headers);
    }
    if let Answer::DelayMs(ms) = answer {
        thread::sleep(Duration::from_millis(ms));
    }
    let mut st = state.lock().unwrap();
    match answer {
        Answer::Status(_) | Answer::RetryAfter(..) | Answer::Grpc(_) => return Reply::Refused(answer),
        _ => keep(path, body, &mut st),
    }
    match (answer, path) {
        (Answer::Garbage, _) => Reply::Garbage,
        (Answer::PartialSuccess(rejected), "/v1/traces") => Reply::Accepted(
            ExportTraceServiceResponse {
                partial_success: Some(opentelemetry_proto::tonic::collector::trace::v1::ExportTracePartialSuccess {
                    rejected_spans: rejected,
                    error_message: "rejected by the test".into(),
                }),
            }
            .encode_to_vec(),
        ),
        (Answer::PartialSuccess(rejected), "/v1/logs") => Reply::Accepted(
            ExportLogsServiceResponse {
                partial_success: Some(opentelemetry_proto::tonic::collector::logs::v1::ExportLogsPartialSuccess {
                    rejected_log_records: rejected,
                    error_message: "rejected by the test".into(),
                }),
            }
            .encode_to_vec(),
        ),
        (_, "/v1/metrics") => Reply::Accepted(ExportMetricsServiceResponse::default().encode_to_vec()),
        (_, "/v1/logs") => Reply::Accepted(ExportLogsServiceResponse::default().encode_to_vec()),
        _ => Reply::Accepted(ExportTraceServiceResponse::default().encode_to_vec()),
    }
}

fn handle(req: Req, state: &Mutex<State>, answer: &Mutex<Answer>) -> Resp {
    let content_type = req.header("content-type").unwrap_or_default().to_string();
    match receive(&req.path, &content_type, req.headers.clone(), &req.body, state, answer) {
        Reply::Accepted(body) => Resp::new(200, "application/x-protobuf", body),
        Reply::Garbage => Resp::new(200, "text/html", b"<html>not protobuf</html>".to_vec()),
        Reply::Refused(Answer::RetryAfter(code, secs)) => {
            let mut resp = Resp::new(code, "application/x-protobuf", Vec::new());
            resp.headers.push(("retry-after".into(), secs.to_string()));
            resp
        }
        Reply::Refused(Answer::Status(code)) => Resp::new(code, "application/x-protobuf", Vec::new()),
        Reply::Refused(_) => Resp::new(500, "application/x-protobuf", Vec::new()),
    }
}

/// Decode and keep what an export carries.
fn keep(path: &str, body: &[u8], st: &mut State) {
    if st.count_only {
        if path == "/v1/traces" {
            if let Ok(export) = ExportTraceServiceRequest::decode(body) {
                let n: usize = export.resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
                st.counted_spans += n as u64;
            }
        }
        return;
    }
    match path {
        "/v1/traces" => match ExportTraceServiceRequest::decode(body) {
            Ok(export) => {
                for rs in export.resource_spans {
                    let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
                    for ss in rs.scope_spans {
                        for span in ss.spans {
                            st.spans.push(ReceivedSpan { span, resource: resource.clone() });
                        }
                    }
                }
            }
            Err(e) => st.bad_requests.push(format!("{path}: {e}")),
        },
        "/v1/metrics" => match ExportMetricsServiceRequest::decode(body) {
            Ok(export) => st.metrics.push(export),
            Err(e) => st.bad_requests.push(format!("{path}: {e}")),
        },
        "/v1/logs" => match ExportLogsServiceRequest::decode(body) {
            Ok(export) => {
                for rl in export.resource_logs {
                    let resource = rl.resource.map(|r| r.attributes).unwrap_or_default();
                    for sl in rl.scope_logs {
                        for record in sl.log_records {
                            st.logs.push(ReceivedLog { record, resource: resource.clone() });
                        }
                    }
                }
            }
            Err(e) => st.bad_requests.push(format!("{path}: {e}")),
        },
        other => st.bad_requests.push(format!("unexpected path {other}")),
    }
}
