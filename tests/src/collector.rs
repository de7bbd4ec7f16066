//! An OTLP/HTTP receiver: decodes what the proxies export with the official `opentelemetry-proto` types.

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

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
}

#[derive(Default)]
struct State {
    /// Only count spans and data points (benchmarks), do not keep them.
    count_only: bool,
    counted_spans: u64,
    spans: Vec<ReceivedSpan>,
    metrics: Vec<ExportMetricsServiceRequest>,
    requests: Vec<(String, String)>,
    headers: Vec<Vec<(String, String)>>,
    bad_requests: Vec<String>,
}

/// A running receiver on 127.0.0.1; stops when dropped.
pub struct Collector {
    /// Port it listens on.
    pub port: u16,
    state: Arc<Mutex<State>>,
    answer: Arc<Mutex<Answer>>,
    _server: HttpServer,
}

impl Collector {
    /// Start a receiver on a free port.
    pub fn start() -> Collector {
        let state = Arc::new(Mutex::new(State::default()));
        let answer = Arc::new(Mutex::new(Answer::Ok));
        let (st, ans) = (state.clone(), answer.clone());
        let server = HttpServer::start(move |req| handle(req, &st, &ans));
        Collector { port: server.port, state, answer, _server: server }
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
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            let bad = self.state.lock().unwrap().bad_requests.clone();
            assert!(bad.is_empty(), "the receiver got malformed exports: {bad:?}");
            if spans.len() >= n {
                return spans;
            }
            if Instant::now() > deadline {
                let names: Vec<String> = spans.iter().map(|s| format!("{} ({})", s.span.name, s.service())).collect();
                panic!("expected {n} spans within {timeout:?}, got {}: {names:?}", spans.len());
            }
            thread::sleep(Duration::from_millis(20));
        }
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

fn handle(req: Req, state: &Mutex<State>, answer: &Mutex<Answer>) -> Resp {
    let answer = *answer.lock().unwrap();
    match answer {
        Answer::Status(code) | Answer::RetryAfter(code, _) => {
            let mut st = state.lock().unwrap();
            st.requests.push((req.path.clone(), req.header("content-type").unwrap_or_default().to_string()));
            st.headers.push(req.headers.clone());
            let mut resp = Resp::new(code, "application/x-protobuf", Vec::new());
            if let Answer::RetryAfter(_, secs) = answer {
                resp.headers.push(("retry-after".into(), secs.to_string()));
            }
            return resp;
        }
        Answer::DelayMs(ms) => thread::sleep(Duration::from_millis(ms)),
        _ => {}
    }
    let mut st = state.lock().unwrap();
    st.requests.push((req.path.clone(), req.header("content-type").unwrap_or_default().to_string()));
    st.headers.push(req.headers.clone());
    if answer == Answer::Garbage {
        keep(&req, &mut st);
        return Resp::new(200, "text/html", b"<html>not protobuf</html>".to_vec());
    }
    if let Answer::PartialSuccess(rejected) = answer {
        keep(&req, &mut st);
        let body = ExportTraceServiceResponse {
            partial_success: Some(opentelemetry_proto::tonic::collector::trace::v1::ExportTracePartialSuccess {
                rejected_spans: rejected,
                error_message: "rejected by the test".into(),
            }),
        };
        return Resp::new(200, "application/x-protobuf", body.encode_to_vec());
    }
    keep(&req, &mut st);
    match req.path.as_str() {
        "/v1/metrics" => {
            Resp::new(200, "application/x-protobuf", ExportMetricsServiceResponse::default().encode_to_vec())
        }
        _ => Resp::new(200, "application/x-protobuf", ExportTraceServiceResponse::default().encode_to_vec()),
    }
}

/// Decode and keep what an export carries.
fn keep(req: &Req, st: &mut State) {
    if st.count_only {
        if req.path == "/v1/traces" {
            if let Ok(export) = ExportTraceServiceRequest::decode(req.body.as_slice()) {
                let n: usize = export.resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
                st.counted_spans += n as u64;
            }
        }
        return;
    }
    match req.path.as_str() {
        "/v1/traces" => match ExportTraceServiceRequest::decode(req.body.as_slice()) {
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
            Err(e) => st.bad_requests.push(format!("{}: {e}", req.path)),
        },
        "/v1/metrics" => match ExportMetricsServiceRequest::decode(req.body.as_slice()) {
            Ok(export) => st.metrics.push(export),
            Err(e) => st.bad_requests.push(format!("{}: {e}", req.path)),
        },
        other => st.bad_requests.push(format!("unexpected path {other}")),
    }
}
