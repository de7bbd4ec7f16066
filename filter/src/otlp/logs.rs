//! Access logs to `ExportLogsServiceRequest`.

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceResponse;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_semantic_conventions::attribute as attr;
use prost::Message;

use super::common::Envelope;
use super::trace::http_attributes;
use crate::access_log::AccessLog;
use crate::wire::Writer;

/// `logs.proto` field numbers.
mod field {
    pub const TIME: u32 = 1;
    pub const SEVERITY_NUMBER: u32 = 2;
    pub const SEVERITY_TEXT: u32 = 3;
    pub const BODY: u32 = 5;
    pub const ATTRIBUTES: u32 = 6;
    pub const FLAGS: u32 = 8;
    pub const TRACE_ID: u32 = 9;
    pub const SPAN_ID: u32 = 10;
    pub const OBSERVED_TIME: u32 = 11;
    pub const EVENT_NAME: u32 = 12;
    pub const ANY_STRING: u32 = 1;
}

/// `event_name` of meshtel's access-log records.
pub const EVENT_NAME: &str = "meshtel.access_log";

/// Encodes batches of access-log records for one workload; built once per VM.
#[derive(Debug, Clone)]
pub struct LogEncoder {
    envelope: Envelope,
}

impl LogEncoder {
    /// An encoder for the workload `resource` describes.
    pub fn new(resource: &Resource) -> Self {
        Self { envelope: Envelope::new(resource) }
    }

    /// The protobuf body of an OTLP export (`ExportLogsServiceRequest`) of a batch of records.
    pub fn encode(&self, logs: &[AccessLog]) -> Vec<u8> {
        self.envelope.encode(logs.len() * 768, |w| {
            for log in logs {
                w.message(Envelope::ITEMS, |w| record(w, log));
            }
        })
    }
}

fn record(w: &mut Writer, log: &AccessLog) {
    let (r, c) = (&log.request, &log.completion);
    let severity = log.severity();
    w.fixed64(field::TIME, log.start_unix_nanos);
    w.varint(field::SEVERITY_NUMBER, severity.number() as u64);
    w.string(field::SEVERITY_TEXT, severity.text());
    let body = log.summary();
    w.message(field::BODY, |w| w.string(field::ANY_STRING, &body));
    http_attributes(w, field::ATTRIBUTES, r, c);
    if let Some(name) = c.protocol.as_deref().and_then(|p| p.split_once('/')).map(|(name, _)| name) {
        w.string_attribute(field::ATTRIBUTES, attr::NETWORK_PROTOCOL_NAME, &name.to_ascii_lowercase());
    }
    w.int_attribute(field::ATTRIBUTES, attr::HTTP_REQUEST_BODY_SIZE, clamp(c.bytes_received));
    w.int_attribute(field::ATTRIBUTES, attr::HTTP_RESPONSE_BODY_SIZE, clamp(c.bytes_sent));
    // Istio's access-log names where the conventions have none.
    w.int_attribute(field::ATTRIBUTES, "duration", clamp(log.duration_ms()));
    w.string_attribute(field::ATTRIBUTES, "response_flags", &c.response_flags);
    if let Some(host) = &c.upstream_host {
        w.string_attribute(field::ATTRIBUTES, "upstream_host", host);
    }
    if let Some(cluster) = &c.upstream_cluster {
        w.string_attribute(field::ATTRIBUTES, "upstream_cluster", cluster);
    }
    if let Some(id) = &r.request_id {
        w.string_attribute(field::ATTRIBUTES, "request_id", id);
    }
    if let Some(t) = &log.trace {
        w.fixed32(field::FLAGS, u32::from(t.sampled));
        w.bytes(field::TRACE_ID, &t.trace_id.0);
        w.bytes(field::SPAN_ID, &t.span_id.0);
    }
    w.fixed64(field::OBSERVED_TIME, c.end_unix_nanos.max(log.start_unix_nanos));
    w.string(field::EVENT_NAME, EVENT_NAME);
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Log records the collector refused, from an export response body (partial success).
pub fn rejected_log_records(body: &[u8]) -> (u64, String) {
    ExportLogsServiceResponse::decode(body)
        .ok()
        .and_then(|r| r.partial_success)
        .map_or((0, String::new()), |p| (u64::try_from(p.rejected_log_records).unwrap_or(0), p.error_message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traces::propagation::TraceDecision;
    use crate::traces::span::{Completion, RequestInfo, SpanKind};
    use crate::traces::trace_context::{SpanId, TraceId};
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::logs::v1::LogRecord;

    fn log(code: u32, trace: bool) -> AccessLog {
        AccessLog {
            trace: trace.then_some(TraceDecision {
                trace_id: TraceId([7; 16]),
                span_id: SpanId([8; 8]),
                parent_span_id: Some(SpanId([9; 8])),
                sampled: true,
                tracestate: None,
            }),
            start_unix_nanos: 1_000_000,
            request: RequestInfo {
                method: "POST".into(),
                path: "/orders".into(),
                scheme: "http".into(),
                authority: "shop:8080".into(),
                user_agent: Some("curl/8".into()),
                request_id: Some("req-1".into()),
                headers: Vec::new(),
                custom_tags: Vec::new(),
            },
            completion: Completion {
                end_unix_nanos: 8_000_000,
                status_code: code,
                response_flags: "-".into(),
                upstream_cluster: Some("inbound|8080||".into()),
                protocol: Some("HTTP/1.1".into()),
                client_address: Some("10.0.0.9:5000".into()),
                kind: SpanKind::Server,
                upstream_host: Some("10.0.0.2:8080".into()),
                bytes_received: 12,
                bytes_sent: 345,
                route_name: None,
            },
        }
    }

    fn decoded(logs: &[AccessLog]) -> Vec<LogRecord> {
        let bytes = LogEncoder::new(&Resource::default()).encode(logs);
        let req = ExportLogsServiceRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(req.resource_logs[0].scope_logs[0].scope.as_ref().unwrap().name, "meshtel");
        req.resource_logs.into_iter().flat_map(|r| r.scope_logs).flat_map(|s| s.log_records).collect()
    }

    fn attr<'a>(r: &'a LogRecord, key: &str) -> Option<&'a Value> {
        r.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()?.value.as_ref())
    }

    #[test]
    fn records_carry_ids_fields_and_body() {
        let records = decoded(&[log(503, true), log(200, false)]);
        let r = &records[0];
        assert_eq!((r.time_unix_nano, r.observed_time_unix_nano), (1_000_000, 8_000_000));
        assert_eq!((r.severity_number, r.severity_text.as_str()), (17, "ERROR"));
        assert_eq!((r.trace_id.as_slice(), r.span_id.as_slice(), r.flags), (&[7u8; 16][..], &[8u8; 8][..], 1));
        assert_eq!(r.event_name, EVENT_NAME);
        let Some(Value::StringValue(body)) = r.body.as_ref().and_then(|b| b.value.as_ref()) else { panic!("a body") };
        assert!(body.starts_with("\"POST /orders HTTP/1.1\" 503 - 12 345 7 "), "{body}");
        let s = |v: &str| Some(Value::StringValue(v.into()));
        let i = |v: i64| Some(Value::IntValue(v));
        assert_eq!(attr(r, "http.request.method").cloned(), s("POST"));
        assert_eq!(attr(r, "url.path").cloned(), s("/orders"));
        assert_eq!(attr(r, "http.response.status_code").cloned(), i(503));
        assert_eq!(attr(r, "network.protocol.name").cloned(), s("http"));
        assert_eq!(attr(r, "network.protocol.version").cloned(), s("1.1"));
        assert_eq!(attr(r, "http.request.body.size").cloned(), i(12));
        assert_eq!(attr(r, "http.response.body.size").cloned(), i(345));
        assert_eq!(attr(r, "duration").cloned(), i(7));
        assert_eq!(attr(r, "client.address").cloned(), s("10.0.0.9"));
        assert_eq!(attr(r, "user_agent.original").cloned(), s("curl/8"));
        assert_eq!(attr(r, "server.address").cloned(), s("shop"));
        assert_eq!(attr(r, "upstream_host").cloned(), s("10.0.0.2:8080"));
        assert_eq!(attr(r, "upstream_cluster").cloned(), s("inbound|8080||"));
        assert_eq!(attr(r, "request_id").cloned(), s("req-1"));
        assert_eq!(attr(r, "response_flags").cloned(), s("-"));
        assert_eq!(attr(r, "error.type").cloned(), s("503"));
        let ok = &records[1];
        assert_eq!((ok.severity_number, ok.severity_text.as_str()), (9, "INFO"));
        assert!(ok.trace_id.is_empty() && ok.span_id.is_empty());
        assert_eq!(attr(ok, "error.type"), None);
    }

    #[test]
    fn reads_partial_success() {
        use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsPartialSuccess;
        let body = ExportLogsServiceResponse {
            partial_success: Some(ExportLogsPartialSuccess { rejected_log_records: 2, error_message: String::new() }),
        }
        .encode_to_vec();
        assert_eq!(rejected_log_records(&body).0, 2);
        assert_eq!(rejected_log_records(b"garbage").0, 0);
    }
}
