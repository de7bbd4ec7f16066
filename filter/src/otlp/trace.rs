//! Spans to `ExportTraceServiceRequest`.

use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, status, ResourceSpans, ScopeSpans, Span, Status};
use opentelemetry_semantic_conventions::attribute as attr;
use prost::Message;

use super::common::{int_kv, string_kv};
use crate::node::NodeInfo;
use crate::span::{SpanKind, SpanRecord};

// OTLP span flags (trace.proto): W3C trace flags in the low byte, then "is remote is known"
// and "is remote" for the parent.
const FLAG_SAMPLED: u32 = 0x01;
const FLAG_CONTEXT_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_CONTEXT_IS_REMOTE: u32 = 0x200;

const KNOWN_METHODS: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];

/// Encodes batches of spans for one workload; built once per VM.
#[derive(Debug, Clone)]
pub struct TraceEncoder {
    resource: Resource,
    scope: InstrumentationScope,
    mesh_attributes: Vec<KeyValue>,
}

impl TraceEncoder {
    /// An encoder for spans of the workload `node` describes.
    pub fn new(resource: Resource, node: &NodeInfo) -> Self {
        let mut mesh_attributes = Vec::new();
        let mut put = |k: &str, v: &str| {
            if !v.is_empty() {
                mesh_attributes.push(string_kv(k, v));
            }
        };
        put("istio.canonical_service", node.canonical_service().unwrap_or(""));
        put("istio.canonical_revision", node.canonical_revision());
        put("istio.namespace", &node.namespace);
        put("istio.mesh_id", &node.mesh_id);
        Self { resource, scope: super::common::scope(), mesh_attributes }
    }

    /// The `ExportTraceServiceRequest` for a batch of spans.
    pub fn request(&self, spans: &[SpanRecord]) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(self.scope.clone()),
                    spans: spans.iter().map(|s| self.span(s)).collect(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    /// The protobuf body of an OTLP/HTTP export of a batch of spans.
    pub fn encode(&self, spans: &[SpanRecord]) -> Vec<u8> {
        self.request(spans).encode_to_vec()
    }

    fn span(&self, s: &SpanRecord) -> Span {
        let mut flags = FLAG_SAMPLED | FLAG_CONTEXT_HAS_IS_REMOTE;
        if s.trace.parent_span_id.is_some() {
            flags |= FLAG_CONTEXT_IS_REMOTE;
        }
        let mut attributes = http_attributes(s);
        attributes.extend(self.mesh_attributes.iter().cloned());
        if let Some(cluster) = &s.completion.upstream_cluster {
            attributes.push(string_kv("upstream_cluster", cluster.as_str()));
        }
        attributes.push(string_kv("response_flags", s.completion.response_flags.as_str()));
        let error = s.is_error();
        Span {
            trace_id: s.trace.trace_id.0.to_vec(),
            span_id: s.trace.span_id.0.to_vec(),
            trace_state: s.trace.tracestate.clone().unwrap_or_default(),
            parent_span_id: s.trace.parent_span_id.map(|p| p.0.to_vec()).unwrap_or_default(),
            flags,
            name: s.name.clone(),
            kind: match s.completion.kind {
                SpanKind::Server => span::SpanKind::Server,
                SpanKind::Client => span::SpanKind::Client,
            } as i32,
            start_time_unix_nano: s.start_unix_nanos,
            end_time_unix_nano: s.completion.end_unix_nanos.max(s.start_unix_nanos),
            attributes,
            dropped_attributes_count: 0,
            events: Vec::new(),
            dropped_events_count: 0,
            links: Vec::new(),
            dropped_links_count: 0,
            status: Some(Status {
                message: String::new(),
                code: if error { status::StatusCode::Error } else { status::StatusCode::Unset } as i32,
            }),
        }
    }
}

/// Spans the collector refused, from an OTLP/HTTP response body (partial success).
/// An empty or undecodable body means none: the status code already said "accepted".
pub fn rejected_spans(body: &[u8]) -> u64 {
    ExportTraceServiceResponse::decode(body)
        .ok()
        .and_then(|r| r.partial_success)
        .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0))
}

/// Stable HTTP semantic-convention attributes of a span.
fn http_attributes(s: &SpanRecord) -> Vec<KeyValue> {
    let r = &s.request;
    let c = &s.completion;
    let mut out = Vec::with_capacity(16);
    if KNOWN_METHODS.contains(&r.method.as_str()) {
        out.push(string_kv(attr::HTTP_REQUEST_METHOD, r.method.as_str()));
    } else {
        out.push(string_kv(attr::HTTP_REQUEST_METHOD, "_OTHER"));
        out.push(string_kv(attr::HTTP_REQUEST_METHOD_ORIGINAL, r.method.as_str()));
    }
    let (host, port) = split_authority(&r.authority);
    match c.kind {
        SpanKind::Server => {
            out.push(string_kv(attr::URL_PATH, r.path.as_str()));
            out.push(string_kv(attr::URL_SCHEME, r.scheme.as_str()));
        }
        SpanKind::Client => {
            out.push(string_kv(attr::URL_FULL, format!("{}://{}{}", r.scheme, r.authority, r.path)));
        }
    }
    if !host.is_empty() {
        out.push(string_kv(attr::SERVER_ADDRESS, host));
    }
    if let Some(port) = port.or(match r.scheme.as_str() {
        "https" => Some(443),
        "http" if c.kind == SpanKind::Client => Some(80),
        _ => None,
    }) {
        out.push(int_kv(attr::SERVER_PORT, i64::from(port)));
    }
    if c.status_code != 0 {
        out.push(int_kv(attr::HTTP_RESPONSE_STATUS_CODE, i64::from(c.status_code)));
    }
    if let Some(v) = c.protocol.as_deref().and_then(protocol_version) {
        out.push(string_kv(attr::NETWORK_PROTOCOL_VERSION, v));
    }
    if let Some(ua) = &r.user_agent {
        out.push(string_kv(attr::USER_AGENT_ORIGINAL, ua.as_str()));
    }
    for (name, values) in &r.headers {
        out.push(super::common::string_array_kv(&format!("http.request.header.{name}"), values));
    }
    if c.kind == SpanKind::Server {
        if let Some(addr) = c.client_address.as_deref() {
            let (ip, _) = split_authority(addr);
            out.push(string_kv(attr::CLIENT_ADDRESS, ip));
        }
    }
    if let Some(e) = s.error_type() {
        out.push(string_kv(attr::ERROR_TYPE, e));
    }
    out
}

/// `HTTP/1.1` -> `1.1`, `HTTP/2` -> `2`.
fn protocol_version(protocol: &str) -> Option<&str> {
    protocol.strip_prefix("HTTP/").filter(|v| !v.is_empty())
}

/// Split `host:port`, `[v6]:port` or a bare host.
fn split_authority(authority: &str) -> (&str, Option<u16>) {
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
    use crate::propagation::TraceDecision;
    use crate::span::{Completion, RequestInfo};
    use crate::trace_context::{SpanId, TraceId};
    use opentelemetry_proto::tonic::common::v1::any_value::Value;

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
            },
            Completion {
                end_unix_nanos: 5_000,
                status_code: code,
                response_flags: "-".into(),
                upstream_cluster: Some("outbound|8080||shop.ns.svc.cluster.local".into()),
                protocol: Some("HTTP/1.1".into()),
                client_address: Some("10.0.0.9:51234".into()),
                kind,
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

    #[test]
    fn server_span_carries_http_and_mesh_attributes() {
        let req = encoder().request(&[record(SpanKind::Server, 200, true)]);
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
        let req = encoder().request(&[record(SpanKind::Client, 404, false)]);
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
        let req = encoder().request(&[r]);
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
        assert_eq!(rejected_spans(&body), 3);
        assert_eq!(rejected_spans(&[]), 0);
        assert_eq!(rejected_spans(b"<html>garbage</html>"), 0);
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
