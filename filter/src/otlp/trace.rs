//! Spans to `ExportTraceServiceRequest`.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, status};
use opentelemetry_semantic_conventions::attribute as attr;
use prost::Message;

use super::common::Envelope;
use crate::istio::node::NodeInfo;
use crate::traces::span::{Completion, RequestInfo, SpanKind, SpanRecord};
use crate::wire::Writer;

// OTLP span flags (trace.proto): W3C trace flags in the low byte, then "is remote is known"
// and "is remote" for the parent.
const FLAG_SAMPLED: u32 = 0x01;
const FLAG_CONTEXT_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_CONTEXT_IS_REMOTE: u32 = 0x200;

const KNOWN_METHODS: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];

/// `trace.proto` field numbers.
mod field {
    pub const TRACE_ID: u32 = 1;
    pub const SPAN_ID: u32 = 2;
    pub const TRACE_STATE: u32 = 3;
    pub const PARENT_SPAN_ID: u32 = 4;
    pub const NAME: u32 = 5;
    pub const KIND: u32 = 6;
    pub const START_TIME: u32 = 7;
    pub const END_TIME: u32 = 8;
    pub const ATTRIBUTES: u32 = 9;
    pub const STATUS: u32 = 15;
    pub const FLAGS: u32 = 16;
    pub const STATUS_CODE: u32 = 3;
}

/// Encodes batches of spans for one workload; built once per VM.
#[derive(Debug, Clone)]
pub struct TraceEncoder {
    envelope: Envelope,
    mesh_attributes: Vec<(&'static str, String)>,
}

impl TraceEncoder {
    /// An encoder for spans of the workload `node` describes.
    pub fn new(resource: Resource, node: &NodeInfo) -> Self {
        let mesh_attributes = [
            ("istio.canonical_service", node.canonical_service().unwrap_or("")),
            ("istio.canonical_revision", node.canonical_revision()),
            ("istio.namespace", &node.namespace),
            ("istio.mesh_id", &node.mesh_id),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k, v.to_string()))
        .collect();
        Self { envelope: Envelope::new(&resource), mesh_attributes }
    }

    /// The protobuf body of an OTLP export (`ExportTraceServiceRequest`) of a batch of spans.
    pub fn encode(&self, spans: &[SpanRecord]) -> Vec<u8> {
        self.envelope.encode(spans.len() * 640, |w| {
            for s in spans {
                w.message(Envelope::ITEMS, |w| self.span(w, s));
            }
        })
    }

    fn span(&self, w: &mut Writer, s: &SpanRecord) {
        let mut flags = FLAG_SAMPLED | FLAG_CONTEXT_HAS_IS_REMOTE;
        if s.trace.parent_span_id.is_some() {
            flags |= FLAG_CONTEXT_IS_REMOTE;
        }
        w.bytes(field::TRACE_ID, &s.trace.trace_id.0);
        w.bytes(field::SPAN_ID, &s.trace.span_id.0);
        w.string(field::TRACE_STATE, s.trace.tracestate.as_deref().unwrap_or_default());
        if let Some(parent) = s.trace.parent_span_id {
            w.bytes(field::PARENT_SPAN_ID, &parent.0);
        }
        w.string(field::NAME, &s.name);
        let kind = match s.completion.kind {
            SpanKind::Server => span::SpanKind::Server,
            SpanKind::Client => span::SpanKind::Client,
        };
        w.varint(field::KIND, kind as u64);
        w.fixed64(field::START_TIME, s.start_unix_nanos);
        w.fixed64(field::END_TIME, s.completion.end_unix_nanos.max(s.start_unix_nanos));
        http_attributes(w, field::ATTRIBUTES, &s.request, &s.completion);
        for (k, v) in &self.mesh_attributes {
            w.string_attribute(field::ATTRIBUTES, k, v);
        }
        if let Some(cluster) = &s.completion.upstream_cluster {
            w.string_attribute(field::ATTRIBUTES, "upstream_cluster", cluster);
        }
        w.string_attribute(field::ATTRIBUTES, "response_flags", &s.completion.response_flags);
        let code = if s.is_error() { status::StatusCode::Error } else { status::StatusCode::Unset };
        w.message(field::STATUS, |w| w.varint(field::STATUS_CODE, code as u64));
        w.fixed32(field::FLAGS, flags);
    }
}

/// Spans the collector refused, from an OTLP/HTTP response body (partial success).
/// An empty or undecodable body means none: the status code already said "accepted".
pub fn rejected_spans(body: &[u8]) -> (u64, String) {
    ExportTraceServiceResponse::decode(body)
        .ok()
        .and_then(|r| r.partial_success)
        .map_or((0, String::new()), |p| (u64::try_from(p.rejected_spans).unwrap_or(0), p.error_message))
}

/// Stable HTTP semantic-convention attributes of a request (span or log), written as repeated `field`.
pub(super) fn http_attributes(w: &mut Writer, field: u32, r: &RequestInfo, c: &Completion) {
    if KNOWN_METHODS.contains(&r.method.as_str()) {
        w.string_attribute(field, attr::HTTP_REQUEST_METHOD, &r.method);
    } else {
        w.string_attribute(field, attr::HTTP_REQUEST_METHOD, "_OTHER");
        w.string_attribute(field, attr::HTTP_REQUEST_METHOD_ORIGINAL, &r.method);
    }
    let (host, port) = split_authority(&r.authority);
    match c.kind {
        SpanKind::Server => {
            w.string_attribute(field, attr::URL_PATH, &r.path);
            w.string_attribute(field, attr::URL_SCHEME, &r.scheme);
        }
        SpanKind::Client => {
            w.string_attribute(field, attr::URL_FULL, &format!("{}://{}{}", r.scheme, r.authority, r.path));
        }
    }
    if !host.is_empty() {
        w.string_attribute(field, attr::SERVER_ADDRESS, host);
    }
    if let Some(port) = port.or(match r.scheme.as_str() {
        "https" => Some(443),
        "http" if c.kind == SpanKind::Client => Some(80),
        _ => None,
    }) {
        w.int_attribute(field, attr::SERVER_PORT, i64::from(port));
    }
    if c.status_code != 0 {
        w.int_attribute(field, attr::HTTP_RESPONSE_STATUS_CODE, i64::from(c.status_code));
    }
    if let Some(v) = c.protocol.as_deref().and_then(protocol_version) {
        w.string_attribute(field, attr::NETWORK_PROTOCOL_VERSION, v);
    }
    if let Some(ua) = &r.user_agent {
        w.string_attribute(field, attr::USER_AGENT_ORIGINAL, ua);
    }
    for (name, values) in &r.headers {
        w.string_array_attribute(field, &format!("http.request.header.{name}"), values);
    }
    for (name, value) in &r.custom_tags {
        w.string_attribute(field, name, value);
    }
    if c.kind == SpanKind::Server {
        if let Some(addr) = c.client_address.as_deref() {
            let (ip, _) = split_authority(addr);
            w.string_attribute(field, attr::CLIENT_ADDRESS, ip);
        }
    }
    if let Some(e) = c.error_type() {
        w.string_attribute(field, attr::ERROR_TYPE, &e);
    }
}

/// `HTTP/1.1` -> `1.1`, `HTTP/2` -> `2`.
pub(super) fn protocol_version(protocol: &str) -> Option<&str> {
    protocol.strip_prefix("HTTP/").filter(|v| !v.is_empty())
}

/// Split `host:port`, `[v6]:port` or a bare host.
pub(super) fn split_authority(authority: &str) -> (&str, Option<u16>) {
    if let Some(rest) = authority.strip_prefix('[') {
        if let Some((host, tail)) = rest.split_once(']') {
            return (host, tail.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => match port.parse() {
            Ok(p) => (host, Some(p)),
            Err(_) => (authority, None),
        },
        _ => (authority, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SpanNaming;
    use crate::traces::propagation::TraceDecision;
    use crate::traces::trace_context::{SpanId, TraceId};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::trace::v1::Span;

    fn record(kind: SpanKind, code: u32, parent: bool) -> SpanRecord {
        SpanRecord::new(
            TraceDecision {
                trace_id: TraceId([7; 16]),
                span_id: SpanId([8; 8]),
                parent_span_id: parent.then_some(SpanId([9; 8])),
                sampled: true,
                tracestate: Some("a=1".into()),
            },
            SpanNaming::MethodPath,
            1_000,
            RequestInfo {
                method: "GET".into(),
                path: "/items".into(),
                scheme: "http".into(),
                authority: "shop.ns:8080".into(),
                user_agent: Some("curl/8".into()),
                headers: vec![("x-tenant".into(), vec!["a".into(), "b".into()])],
                request_id: None,
                custom_tags: vec![("zone".into(), "east".into())],
            },
            Completion {
                end_unix_nanos: 5_000,
                status_code: code,
                response_flags: "-".into(),
                upstream_cluster: Some("outbound|8080||shop.ns.svc.cluster.local".into()),
                protocol: Some("HTTP/1.1".into()),
                client_address: Some("10.0.0.9:51234".into()),
                kind,
                ..Default::default()
            },
        )
    }

    fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
        span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()?.value.as_ref())
    }

    fn encoder() -> TraceEncoder {
        let node = NodeInfo {
            namespace: "ns".into(),
            mesh_id: "m".into(),
            workload_name: "shop".into(),
            ..Default::default()
        };
        TraceEncoder::new(Resource::default(), &node)
    }

    fn decoded(spans: &[SpanRecord]) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest::decode(encoder().encode(spans).as_slice()).unwrap()
    }

    #[test]
    fn server_span_carries_http_and_mesh_attributes() {
        let req = decoded(&[record(SpanKind::Server, 200, true)]);
        let span = &req.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(span.kind, span::SpanKind::Server as i32);
        assert_eq!(span.name, "GET /items");
        assert_eq!((span.start_time_unix_nano, span.end_time_unix_nano), (1_000, 5_000));
        assert_eq!(span.parent_span_id, vec![9; 8]);
        assert_eq!(span.trace_state, "a=1");
        assert_eq!(span.flags, 0x301);
        let s = |v: &str| Some(Value::StringValue(v.into()));
        assert_eq!(attr(span, "http.request.method").cloned(), s("GET"));
        assert_eq!(attr(span, "url.path").cloned(), s("/items"));
        assert_eq!(attr(span, "url.scheme").cloned(), s("http"));
        assert_eq!(attr(span, "server.address").cloned(), s("shop.ns"));
        assert_eq!(attr(span, "server.port").cloned(), Some(Value::IntValue(8080)));
        assert_eq!(attr(span, "http.response.status_code").cloned(), Some(Value::IntValue(200)));
        assert_eq!(attr(span, "network.protocol.version").cloned(), s("1.1"));
        assert_eq!(attr(span, "user_agent.original").cloned(), s("curl/8"));
        let Some(Value::ArrayValue(tenant)) = attr(span, "http.request.header.x-tenant") else { panic!("an array") };
        assert_eq!(tenant.values.len(), 2);
        assert_eq!(attr(span, "zone").cloned(), s("east"), "a custom tag");
        assert_eq!(attr(span, "client.address").cloned(), s("10.0.0.9"));
        assert_eq!(attr(span, "istio.canonical_service").cloned(), s("shop"));
        assert_eq!(attr(span, "istio.mesh_id").cloned(), s("m"));
        assert_eq!(attr(span, "upstream_cluster").cloned(), s("outbound|8080||shop.ns.svc.cluster.local"));
        assert_eq!(attr(span, "response_flags").cloned(), s("-"));
        assert_eq!(attr(span, "error.type"), None);
        assert_eq!(span.status.as_ref().unwrap().code, status::StatusCode::Unset as i32);
    }

    #[test]
    fn client_span_has_full_url_and_4xx_errors() {
        let req = decoded(&[record(SpanKind::Client, 404, false)]);
        let span = &req.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(span.flags, 0x101);
        assert!(span.parent_span_id.is_empty());
        assert_eq!(attr(span, "url.full").cloned(), Some(Value::StringValue("http://shop.ns:8080/items".into())));
        assert_eq!(attr(span, "url.path"), None);
        assert_eq!(attr(span, "client.address"), None);
        assert_eq!(attr(span, "error.type").cloned(), Some(Value::StringValue("404".into())));
        assert_eq!(span.status.as_ref().unwrap().code, status::StatusCode::Error as i32);
    }

    #[test]
    fn unknown_methods_are_other() {
        let mut r = record(SpanKind::Server, 200, false);
        r.request.method = "PURGE".into();
        let req = decoded(&[r]);
        let span = &req.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(attr(span, "http.request.method").cloned(), Some(Value::StringValue("_OTHER".into())));
        assert_eq!(attr(span, "http.request.method_original").cloned(), Some(Value::StringValue("PURGE".into())));
    }

    #[test]
    fn encodes_decodable_protobuf() {
        let bytes = encoder().encode(&[record(SpanKind::Server, 500, true), record(SpanKind::Client, 200, true)]);
        let back = ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(back.resource_spans[0].scope_spans[0].spans.len(), 2);
        assert_eq!(back.resource_spans[0].scope_spans[0].scope.as_ref().unwrap().name, "meshtel");
    }

    #[test]
    fn reads_partial_success() {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTracePartialSuccess;
        let body = ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess { rejected_spans: 3, error_message: "x".into() }),
        }
        .encode_to_vec();
        assert_eq!(rejected_spans(&body), (3, "x".to_string()));
        assert_eq!(rejected_spans(&[]).0, 0);
        assert_eq!(rejected_spans(b"<html>garbage</html>").0, 0);
    }

    #[test]
    fn splits_authorities() {
        assert_eq!(split_authority("a:80"), ("a", Some(80)));
        assert_eq!(split_authority("a"), ("a", None));
        assert_eq!(split_authority("[::1]:8080"), ("::1", Some(8080)));
        assert_eq!(split_authority("::1"), ("::1", None));
        assert_eq!(split_authority("a:xyz"), ("a:xyz", None));
    }
}
