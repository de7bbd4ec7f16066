//! The span recorded for one request: plain data captured on the request path, turned into
//! OTLP only at flush time (see [`crate::otlp`]).

use crate::config::SpanNaming;
use crate::headers::Headers;
use crate::istio::labels::Reporter;
use crate::istio::node::NodeInfo;
use crate::traces::propagation::TraceDecision;

/// Span kind from the proxy's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpanKind {
    /// Inbound sidecar traffic and gateway traffic.
    #[default]
    Server,
    /// Outbound sidecar traffic.
    Client,
}

/// The span kind of a request its `reporter` counts: the client side is a CLIENT span, except
/// at gateways, which serve their callers (Istio reports gateways as the source because their
/// peer is upstream). Sidecar inbound and waypoints serve: a waypoint is its destination
/// service's reverse proxy, as a gateway is, and the caller's own CLIENT span comes from the
/// caller (ztunnel makes none).
pub fn span_kind(node: &NodeInfo, reporter: Reporter) -> SpanKind {
    match reporter {
        Reporter::Source if !node.is_gateway() => SpanKind::Client,
        _ => SpanKind::Server,
    }
}

/// What the request headers say, captured when the request arrives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    /// `:method`.
    pub method: String,
    /// `:path` without the query string.
    pub path: String,
    /// `:scheme` (`http` when absent).
    pub scheme: String,
    /// `:authority`.
    pub authority: String,
    /// `user-agent`.
    pub user_agent: Option<String>,
    /// `x-request-id`; captured only for access logs.
    pub request_id: Option<String>,
    /// Configured request headers present on the request, `(name, values)`.
    pub headers: Vec<(String, Vec<String>)>,
    /// `traces.custom_tags` with their values for this request (sampled requests only).
    pub custom_tags: Vec<(String, String)>,
}

/// Longest value kept for a recorded header or path; longer ones are cut at a char boundary.
pub const MAX_ATTRIBUTE_LEN: usize = 1024;

impl RequestInfo {
    /// Capture the request's pseudo-headers, user agent and the `record`ed headers.
    pub fn from_headers(headers: Headers<'_>, record: &[String]) -> Self {
        let get = |name: &str| headers.single(name).map(|v| truncate(v, MAX_ATTRIBUTE_LEN));
        let path = get(":path").unwrap_or_default();
        let path = match path.split_once('?') {
            Some((p, _)) => p.to_string(),
            None => path,
        };
        Self {
            method: get(":method").unwrap_or_default(),
            path,
            scheme: get(":scheme").unwrap_or_else(|| "http".into()),
            authority: get(":authority").unwrap_or_default(),
            user_agent: get("user-agent"),
            request_id: None,
            headers: record
                .iter()
                .filter_map(|name| {
                    let values: Vec<String> = headers
                        .values(name)
                        .filter_map(|v| std::str::from_utf8(v).ok().map(|v| truncate(v, MAX_ATTRIBUTE_LEN)))
                        .collect();
                    (!values.is_empty()).then(|| (name.clone(), values))
                })
                .collect(),
            custom_tags: Vec::new(),
        }
    }
}

/// What is known when the request completes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Completion {
    /// End time, nanoseconds since the Unix epoch.
    pub end_unix_nanos: u64,
    /// HTTP status sent downstream; 0 when no response was sent.
    pub status_code: u32,
    /// Envoy response flags, short form (`-`, `UF`, ...).
    pub response_flags: String,
    /// Upstream cluster name.
    pub upstream_cluster: Option<String>,
    /// `HTTP/1.1`, `HTTP/2`, ... as Envoy reports `request.protocol`.
    pub protocol: Option<String>,
    /// Downstream peer address (`ip:port`).
    pub client_address: Option<String>,
    /// Span kind.
    pub kind: SpanKind,
    /// Upstream host address (`ip:port`); read for access logs.
    pub upstream_host: Option<String>,
    /// Request body bytes received; read for access logs.
    pub bytes_received: u64,
    /// Response body bytes sent; read for access logs.
    pub bytes_sent: u64,
    /// The route's name (`xds.route_name`); read for `traces.span_name: method_route`.
    pub route_name: Option<String>,
}

/// Whether a route's name names something: Istio names the route it makes when no
/// VirtualService routes a service `default` (istio/istio `pilot/pkg/networking/core/route/route.go`,
/// `DefaultRouteName`); a VirtualService's routes carry their `name` (and `.match name`).
fn is_named_route(route: &str) -> bool {
    !route.is_empty() && route != "default"
}

impl Completion {
    /// Whether the request failed per the HTTP conventions: 5xx on servers, 4xx and 5xx on
    /// clients, and any request that got no response.
    pub fn is_error(&self) -> bool {
        let code = self.status_code;
        match self.kind {
            _ if code == 0 => true,
            SpanKind::Server => code >= 500,
            SpanKind::Client => code >= 400,
        }
    }

    /// `error.type`: the status code, else the response flags, else `_OTHER`; `None` when no error.
    pub fn error_type(&self) -> Option<String> {
        if !self.is_error() {
            return None;
        }
        Some(if self.status_code != 0 {
            self.status_code.to_string()
        } else if self.response_flags != "-" && !self.response_flags.is_empty() {
            self.response_flags.clone()
        } else {
            "_OTHER".to_string()
        })
    }
}

/// A finished span, ready to be queued for export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanRecord {
    /// Ids and sampling of the request's trace.
    pub trace: TraceDecision,
    /// Span name.
    pub name: String,
    /// Start time, nanoseconds since the Unix epoch.
    pub start_unix_nanos: u64,
    /// Request facts.
    pub request: RequestInfo,
    /// Completion facts.
    pub completion: Completion,
}

impl SpanRecord {
    /// Assemble a span from what was captured at the start and the end of a request.
    pub fn new(
        trace: TraceDecision,
        naming: SpanNaming,
        start_unix_nanos: u64,
        request: RequestInfo,
        completion: Completion,
    ) -> Self {
        let method = if request.method.is_empty() { "HTTP" } else { request.method.as_str() };
        // The HTTP semantic conventions name a span `{method} {target}` only with a
        // low-cardinality target (a route), else `{method}`.
        let name = match naming {
            SpanNaming::MethodPath if !request.path.is_empty() => format!("{method} {}", request.path),
            SpanNaming::MethodRoute => match completion.route_name.as_deref() {
                Some(route) if is_named_route(route) => format!("{method} {route}"),
                _ => method.to_string(),
            },
            _ => method.to_string(),
        };
        Self { trace, name, start_unix_nanos, request, completion }
    }

    /// Whether the span is an error (see [`Completion::is_error`]).
    pub fn is_error(&self) -> bool {
        self.completion.is_error()
    }

    /// The span's `error.type` (see [`Completion::error_type`]).
    pub fn error_type(&self) -> Option<String> {
        self.completion.error_type()
    }
}

/// Cut `s` to at most `max` bytes at a char boundary.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traces::trace_context::{SpanId, TraceId};

    fn decision() -> TraceDecision {
        TraceDecision {
            trace_id: TraceId([1; 16]),
            span_id: SpanId([2; 8]),
            parent_span_id: None,
            sampled: true,
            tracestate: None,
        }
    }

    fn record(kind: SpanKind, code: u32, flags: &str) -> SpanRecord {
        let completion = Completion { kind, status_code: code, response_flags: flags.into(), ..Default::default() };
        SpanRecord::new(decision(), SpanNaming::MethodPath, 0, RequestInfo::default(), completion)
    }

    #[test]
    fn kind_follows_the_reporter_and_gateways_serve() {
        let sidecar = NodeInfo { id: "sidecar~1~a.ns~ns.svc.cluster.local".into(), ..Default::default() };
        let gateway = NodeInfo { id: "router~1~gw.istio-system~x".into(), ..Default::default() };
        let waypoint = NodeInfo { id: "waypoint~1~wp.ns~x".into(), ..Default::default() };
        assert_eq!(span_kind(&sidecar, Reporter::Source), SpanKind::Client);
        assert_eq!(span_kind(&sidecar, Reporter::Destination), SpanKind::Server);
        assert_eq!(span_kind(&gateway, Reporter::Source), SpanKind::Server);
        assert_eq!(span_kind(&waypoint, Reporter::Waypoint), SpanKind::Server);
    }

    #[test]
    fn request_info_drops_the_query_string() {
        let h = crate::headers::HeaderPairs::from_pairs(&[
            (":method", "GET"),
            (":path", "/items?token=secret"),
            (":authority", "shop:8080"),
        ]);
        let r = RequestInfo::from_headers(h.view(), &[]);
        assert_eq!((r.method.as_str(), r.path.as_str(), r.scheme.as_str()), ("GET", "/items", "http"));
        assert_eq!(r.authority, "shop:8080");
        assert_eq!(r.user_agent, None);
    }

    #[test]
    fn names_spans_by_method_and_path() {
        let req = RequestInfo { method: "POST".into(), path: "/a".into(), ..Default::default() };
        let s = SpanRecord::new(decision(), SpanNaming::MethodPath, 0, req.clone(), Completion::default());
        assert_eq!(s.name, "POST /a");
        let s = SpanRecord::new(decision(), SpanNaming::Method, 0, req.clone(), Completion::default());
        assert_eq!(s.name, "POST");
        // By route: a VirtualService route's name; Istio's unnamed default route and no route
        // leave the method alone.
        for (route, name) in
            [(Some("reviews-v2.canary"), "POST reviews-v2.canary"), (Some("default"), "POST"), (None, "POST")]
        {
            let done = Completion { route_name: route.map(Into::into), ..Default::default() };
            assert_eq!(SpanRecord::new(decision(), SpanNaming::MethodRoute, 0, req.clone(), done).name, name);
        }
    }

    #[test]
    fn error_status_follows_http_conventions() {
        assert!(!record(SpanKind::Server, 404, "-").is_error());
        assert!(record(SpanKind::Server, 503, "UF").is_error());
        assert!(record(SpanKind::Client, 404, "-").is_error());
        assert!(!record(SpanKind::Client, 200, "-").is_error());
        assert_eq!(record(SpanKind::Server, 503, "UF").error_type().as_deref(), Some("503"));
        assert_eq!(record(SpanKind::Server, 0, "DC").error_type().as_deref(), Some("DC"));
        assert_eq!(record(SpanKind::Server, 0, "-").error_type().as_deref(), Some("_OTHER"));
        assert_eq!(record(SpanKind::Server, 200, "-").error_type(), None);
    }

    #[test]
    fn truncates_at_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
