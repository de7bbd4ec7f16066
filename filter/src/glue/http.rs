//! The HTTP context: decide and propagate the trace on request headers; record the span and
//! the Istio metrics when the stream completes.

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};

use super::host::{self, property, property_string, property_u64};
use crate::peer::{self, PeerInfo};
use crate::propagation::HeaderOp;
use crate::response_flags;
use crate::span::{span_kind, Completion, SpanKind};
use crate::telemetry::{ActiveRequest, DownstreamFacts, MetricFacts, Telemetry};

/// One request's context.
pub struct Http {
    telemetry: Option<Rc<RefCell<Telemetry>>>,
    active: Option<ActiveRequest>,
}

impl Http {
    pub fn new(telemetry: Option<Rc<RefCell<Telemetry>>>) -> Self {
        Self { telemetry, active: None }
    }
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        #[cfg(feature = "test-trap")]
        if hostcalls::get_map_value(MapType::HttpRequestHeaders, "x-meshtel-test-trap").ok().flatten().is_some() {
            core::arch::wasm32::unreachable();
        }
        let Some(shared) = &self.telemetry else {
            return Action::Continue;
        };
        let headers = hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default();
        let now = host::now_ns();
        let started = match shared.try_borrow_mut() {
            Ok(mut telemetry) => telemetry.start_request(&headers, now),
            Err(_) => None,
        };
        let Some((active, ops)) = started else {
            return Action::Continue;
        };
        apply(headers, ops);
        self.active = Some(active);
        Action::Continue
    }

    fn on_log(&mut self) {
        let (Some(shared), Some(active)) = (&self.telemetry, self.active.take()) else {
            return;
        };
        let Ok(mut telemetry) = shared.try_borrow_mut() else {
            return;
        };
        let metrics = telemetry.metrics_enabled();
        let recorded = active.recorded();
        if !recorded && !metrics {
            return;
        }
        let cluster = property_string(&["xds", "cluster_name"]);
        // Istio's cluster names (and the node type) usually decide; only then is the listener asked.
        let kind = span_kind(telemetry.node(), cluster.as_deref(), || property_u64(&["xds", "listener_direction"]));
        // Gateways serve (SERVER spans) but report as the source: their peer is upstream.
        let peer_upstream = kind == SpanKind::Client || telemetry.node().is_gateway();
        let log = active.log;
        let completion = Completion {
            end_unix_nanos: host::now_ns(),
            status_code: property_u64(&["response", "code"]).and_then(|c| u32::try_from(c).ok()).unwrap_or(0),
            response_flags: response_flags::short_string(property_u64(&["response", "flags"]).unwrap_or(0)),
            kind,
            protocol: recorded.then(|| property_string(&["request", "protocol"])).flatten(),
            client_address: recorded.then(|| property_string(&["source", "address"])).flatten(),
            upstream_cluster: cluster,
            upstream_host: log.then(|| property_string(&["upstream", "address"])).flatten(),
            bytes_received: if log { property_u64(&["request", "size"]).unwrap_or(0) } else { 0 },
            bytes_sent: if log { property_u64(&["response", "size"]).unwrap_or(0) } else { 0 },
        };
        let facts = metrics.then(|| {
            let downstream = (!peer_upstream).then(|| {
                let id = property_u64(&["connection", "id"]);
                telemetry.downstream_facts(id, read_downstream_facts)
            });
            let mut facts = metric_facts(peer_upstream, active.grpc, downstream);
            if let Some(cluster) = completion.upstream_cluster.as_deref() {
                facts.cluster_service = telemetry.cluster_service(cluster, || property(&["xds", "cluster_metadata"]));
            }
            facts
        });
        telemetry.finish_request(active, completion, facts);
    }
}

/// Apply the propagation header changes. Several changes go to the proxy in one call that
/// replaces the header map: each single-header call costs a host call and a route-cache reset.
/// A change the proxy refuses costs propagation, never the request.
fn apply(mut headers: Vec<(String, Vec<u8>)>, ops: Vec<HeaderOp>) {
    if ops.len() == 1 {
        let _ = match &ops[0] {
            HeaderOp::Set(name, value) => hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value)),
            HeaderOp::Remove(name) => hostcalls::remove_map_value(MapType::HttpRequestHeaders, name),
        };
        return;
    }
    if ops.is_empty() {
        return;
    }
    for op in ops {
        match op {
            HeaderOp::Set(name, value) => {
                headers.retain(|(k, _)| k != name);
                headers.push((name.to_string(), value.into_bytes()));
            }
            HeaderOp::Remove(name) => headers.retain(|(k, _)| k != name),
        }
    }
    let pairs: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
    let _ = hostcalls::set_map_bytes(MapType::HttpRequestHeaders, pairs);
}

/// Read what a downstream connection says about the caller (cached per connection).
fn read_downstream_facts() -> DownstreamFacts {
    let non_empty = |s: Option<String>| s.filter(|v| !v.is_empty());
    let mtls = property(&["connection", "mtls"]).is_some_and(|b| b.first() == Some(&1));
    // Certificates exist only on TLS connections: plaintext traffic skips two reads.
    let peer_principal =
        if mtls { non_empty(property_string(&["connection", "uri_san_peer_certificate"])) } else { None };
    let local_principal =
        peer_principal.as_ref().and_then(|_| non_empty(property_string(&["connection", "uri_san_local_certificate"])));
    DownstreamFacts { mtls, peer_principal, local_principal, peer: filter_state_peer("downstream_peer") }
}

/// Read what the Istio labels need from the proxy; the downstream side comes from `downstream`
/// (inbound), the upstream side is read per request. Each absent property is simply unknown.
fn metric_facts(peer_upstream: bool, grpc: bool, downstream: Option<DownstreamFacts>) -> MetricFacts {
    let non_empty = |s: Option<String>| s.filter(|v| !v.is_empty());
    let (mtls, peer_principal, local_principal, filter_state) = match downstream {
        Some(d) => (d.mtls, d.peer_principal, d.local_principal, d.peer),
        None if peer_upstream => {
            let peer = non_empty(property_string(&["upstream", "uri_san_peer_certificate"]));
            let local =
                peer.as_ref().and_then(|_| non_empty(property_string(&["upstream", "uri_san_local_certificate"])));
            (false, peer, local, filter_state_peer("upstream_peer"))
        }
        None => (false, None, None, None),
    };
    // The upstream's peer metadata answer header is still readable in the log phase.
    let upstream_peer = peer_upstream
        .then(|| {
            hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, peer::PEER_METADATA_HEADER)
                .ok()
                .flatten()
                .and_then(|v| peer::from_peer_metadata_header(&v))
        })
        .flatten();
    let grpc_status =
        grpc.then(|| property_u64(&["response", "grpc_status"]).and_then(|s| u32::try_from(s).ok())).flatten();
    let host_workload = peer_upstream
        .then(|| property(&["xds", "upstream_host_metadata"]).and_then(|md| crate::xds_metadata::host_workload(&md)))
        .flatten();
    MetricFacts {
        request_bytes: property_u64(&["request", "total_size"]).unwrap_or(0),
        response_bytes: property_u64(&["response", "total_size"]).unwrap_or(0),
        grpc_status,
        mtls,
        peer_principal,
        local_principal,
        filter_state_peer: filter_state,
        upstream_peer,
        host_workload,
        cluster_service: None,
    }
}

/// Istio's peer filter state (`downstream_peer` / `upstream_peer`), when its filter ran.
fn filter_state_peer(key: &str) -> Option<PeerInfo> {
    let field = |name: &str| property_string(&["filter_state", key, name]).unwrap_or_default();
    let workload = property_string(&["filter_state", key, "workload"])?;
    Some(PeerInfo {
        workload,
        namespace: field("namespace"),
        app: field("app"),
        version: field("version"),
        canonical_service: field("service"),
        canonical_revision: field("revision"),
        cluster: field("cluster"),
    })
}
