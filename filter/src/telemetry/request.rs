//! One HTTP request's path through meshtel, over the [`Host`] seam: what is read, and when.
//!
//! The glue calls [`Telemetry::on_request_headers`] and [`Telemetry::on_log`] and nothing else;
//! every decision about a request is made here and in [`crate::istio`].

use std::rc::Rc;

use crate::config::SpanNaming;
use crate::headers::HeaderMap;
use crate::host::Host;
use crate::istio::facts::{self, DownstreamFacts};
use crate::istio::labels::{is_grpc_content_type, Reporter, RequestFacts};
use crate::istio::peer;
use crate::istio::response_flags;
use crate::prefetch::Prefetched;
use crate::telemetry::{ActiveRequest, MetricFacts, Telemetry};
use crate::traces::propagation::HeaderOp;
use crate::traces::span::{span_kind, Completion};

impl Telemetry {
    /// The request phase: decide the trace and propagate it. `None` when the request is left
    /// alone (all signals off).
    pub fn on_request_headers(&mut self, host: &dyn Host) -> Option<ActiveRequest> {
        let headers = host.headers(HeaderMap::Request);
        let (active, ops) = self.start_request(headers.view(), host.now_ns())?;
        apply(host, ops);
        Some(active)
    }

    /// The log phase, once per request that reaches it. `active` is what the request phase
    /// captured; `None` when meshtel's request phase never ran because an earlier filter
    /// answered first (an RBAC or ext_authz deny, any local reply). Istio's stats filter counts
    /// those (it records in the log phase too), so meshtel reads what the request phase would
    /// have read, now: the request headers as they stand and the request's start time. Such a
    /// request was not propagated, and Istio labels it `http` (it decides gRPC in its own
    /// request phase, which did not run either).
    pub fn on_log(&mut self, host: &dyn Host, active: Option<ActiveRequest>) {
        let Some(active) = active.or_else(|| self.answered_early(host)) else {
            return;
        };
        let metrics = self.metrics_enabled();
        let recorded = active.recorded();
        if !recorded && !metrics {
            return;
        }
        // Every read below is answered by one evaluation where the proxy has CEL.
        let phase = self.queries().evaluate(host);
        self.count_evaluation(phase.evaluation);
        let mut active = active;
        if active.log && !self.filter_keeps(self.queries().filter_value(&phase)) {
            active.log = false;
        }
        let upserts = if metrics { self.queries().upsert_values(&phase) } else { Vec::new() };
        let host: &dyn Host = &phase.host;
        let cluster = host.property_string(&["xds", "cluster_name"]);
        let reporter =
            facts::reporter(self.node(), cluster.as_deref(), || host.property_u64(&["xds", "listener_direction"]));
        let log = active.log;
        // The server side's metrics need the downstream connection's facts, cached per
        // connection; the protocol and the client's address are the connection's too, so they
        // come from that cache when it is read anyway.
        let connection = (metrics && reporter.is_server()).then(|| self.connection_facts(host));
        let (protocol, client_address) = match (&connection, recorded) {
            (_, false) => (None, None),
            (Some(c), true) => {
                (c.protocol.as_deref().map(str::to_string), c.client_address.as_deref().map(str::to_string))
            }
            (None, true) => protocol_and_client(host),
        };
        let flags = host.property_u64(&["response", "flags"]).unwrap_or(0);
        let completion = Completion {
            end_unix_nanos: host.now_ns(),
            status_code: status_code(host),
            response_flags: response_flags::short_string(flags),
            kind: span_kind(self.node(), reporter),
            protocol,
            client_address,
            upstream_cluster: cluster,
            upstream_host: log.then(|| host.property_string(&["upstream", "address"])).flatten(),
            bytes_received: if log { host.property_u64(&["request", "size"]).unwrap_or(0) } else { 0 },
            bytes_sent: if log { host.property_u64(&["response", "size"]).unwrap_or(0) } else { 0 },
            route_name: (active.sampled() && self.config().traces.span_name == SpanNaming::MethodRoute)
                .then(|| host.property_string(&["xds", "route_name"]))
                .flatten(),
        };
        let facts = metrics.then(|| MetricFacts {
            upserts,
            ..self.metric_facts(host, reporter, connection, &active, &completion, flags)
        });
        self.finish_request(active, completion, facts);
    }

    /// A request an earlier filter answered before meshtel's request phase ran: what that phase
    /// would have read, read now.
    fn answered_early(&mut self, host: &dyn Host) -> Option<ActiveRequest> {
        let headers = host.headers(HeaderMap::Request);
        let start = host.property_u64(&["request", "time"]).unwrap_or_else(|| host.now_ns());
        let (mut a, _) = self.start_request(headers.view(), start)?;
        a.grpc = false;
        a.grpc_web = false;
        Some(a)
    }

    /// The downstream connection's facts, read in one evaluation at its first request and cached
    /// for the others.
    fn connection_facts(&mut self, host: &dyn Host) -> DownstreamFacts {
        let id = host.property_u64(&["connection", "id"]);
        let query = self.queries().connection.clone();
        let mut evaluation = None;
        let facts = self.downstream_facts(id, || {
            let (prefetched, e) = Prefetched::new(host, &query);
            evaluation = Some(e);
            let (protocol, client_address) = protocol_and_client(&prefetched);
            DownstreamFacts {
                protocol: protocol.map(Rc::from),
                client_address: client_address.map(Rc::from),
                ..facts::read_downstream(&prefetched)
            }
        });
        if let Some(e) = evaluation {
            self.count_evaluation(e);
        }
        facts
    }

    /// Read what Istio's labels need, by the reporter's rules (see [`crate::istio::facts`]).
    fn metric_facts(
        &mut self,
        host: &dyn Host,
        reporter: Reporter,
        connection: Option<DownstreamFacts>,
        active: &ActiveRequest,
        completion: &Completion,
        flags: u64,
    ) -> MetricFacts {
        let headers = self.config().metrics.peer_metadata_headers;
        let mut f = RequestFacts { reporter, ..Default::default() };
        if let Some(DownstreamFacts { peer_principal, local_principal, peer, .. }) = connection {
            // The caller's header is the fallback of Istio's filter state: decoded only then (it
            // is kept only when `metrics.peer_metadata_headers` allows it).
            f.peer =
                peer.or_else(|| active.peer_header.as_deref().and_then(peer::from_peer_metadata_header).map(Rc::new));
            f.peer_principal = peer_principal;
            f.local_principal = local_principal;
            if reporter == Reporter::Waypoint {
                f.upstream_peer = facts::read_upstream_peer(host, headers).0.map(Rc::new);
            }
        } else {
            let up = facts::read_upstream(host, headers);
            f.peer = up.peer.map(Rc::new);
            f.peer_principal = up.peer_principal.map(Rc::from);
            f.local_principal = up.local_principal.map(Rc::from);
        }
        // The gRPC-Web filter Istio places after meshtel rewrites the request to gRPC before
        // Istio's stats filter looks: look again at what the request says now. A fault abort
        // between the two ends the request before Istio's stats filter saw it: plain HTTP to it.
        f.grpc = !response_flags::ended_before_istio_stats(flags)
            && (active.grpc
                || (active.grpc_web
                    && host.header(HeaderMap::Request, "content-type").is_some_and(|ct| is_grpc_content_type(&ct))));
        if f.grpc {
            f.grpc_status = host.property_u64(&["response", "grpc_status"]).and_then(|s| u32::try_from(s).ok());
        }
        f.response_code = completion.status_code;
        f.response_flags = completion.response_flags.clone();
        let header = facts::host_header_fallback(self.node(), reporter).then_some(active.request.authority.as_str());
        let cluster = completion.upstream_cluster.as_deref();
        // Istio's `allow_any` / `block_all` routes lead to its catch-all clusters or to no
        // cluster: behind an Istio service cluster the route name cannot change the answer,
        // so the property is read only where it can.
        let route_matters = !cluster.is_some_and(facts::is_istio_service_cluster);
        f.service = facts::destination(
            header.filter(|h| !h.is_empty()),
            || route_matters.then(|| host.property_string(&["xds", "route_name"])).flatten(),
            cluster,
            || cluster.and_then(|c| self.cluster_service(c, || host.property(&["xds", "cluster_metadata"]))),
        );
        MetricFacts {
            labels: f,
            request_bytes: host.property_u64(&["request", "total_size"]).unwrap_or(0),
            response_bytes: host.property_u64(&["response", "total_size"]).unwrap_or(0),
            upserts: Vec::new(),
        }
    }
}

/// The downstream connection's protocol and the client's address (the same for every request on
/// the connection).
fn protocol_and_client(host: &dyn Host) -> (Option<String>, Option<String>) {
    (host.property_string(&["request", "protocol"]), host.property_string(&["source", "address"]))
}

/// The response's HTTP status: `response.code`, what Istio's stats filter reports
/// (`responseCode()` in istio_stats.cc); the `:status` Envoy sent only when it has none.
fn status_code(host: &dyn Host) -> u32 {
    let code = host.property_u64(&["response", "code"]).and_then(|c| u32::try_from(c).ok());
    code.unwrap_or_else(|| {
        let header = host.header(HeaderMap::Response, ":status");
        header.and_then(|s| std::str::from_utf8(&s).ok()?.parse().ok()).unwrap_or(0)
    })
}

/// Apply the propagation header changes, one single-header call each. Envoy serves a whole-map
/// write (`set_map_bytes`) by clearing the map and adding every header again, so its cost grows
/// with the request's headers; a single-header replace does not (BENCHMARKS.md, cost model:
/// a map write of a 7-header request costs about as much as 3-4 single replaces, of a
/// 23-header one about 9). A change the proxy refuses costs propagation, never the request.
fn apply(host: &dyn Host, ops: Vec<HeaderOp>) {
    for op in &ops {
        match op {
            HeaderOp::Set(name, value) => host.set_request_header(name, Some(value)),
            HeaderOp::Remove(name) => host.set_request_header(name, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::host::mock::MockHost;
    use crate::istio::node::NodeInfo;
    use crate::istio::peer::{encode_filter_state, encode_peer_metadata};
    use std::collections::BTreeMap;

    const SIDECAR: &str = "sidecar~10.0.0.1~ratings-v1-x.default~default.svc.cluster.local";

    fn telemetry(node_id: &str, extra: &str) -> Telemetry {
        let json = format!(r#"{{"collector":{{"cluster":"outbound|4318||otel.obs.svc.cluster.local"}}{extra}}}"#);
        let node = NodeInfo {
            id: node_id.into(),
            namespace: "default".into(),
            workload_name: "ratings-v1".into(),
            labels: [("app", "ratings"), ("service.istio.io/canonical-name", "ratings")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        Telemetry::new(config::parse(json.as_bytes()).unwrap(), node, 7, "test", 0)
    }

    fn only_series(t: &Telemetry) -> BTreeMap<String, String> {
        let mut series = t.recorded_series();
        assert_eq!(series.len(), 1, "{series:#?}");
        series.remove(0).0
    }

    fn request(host: MockHost) -> MockHost {
        host.with_header(HeaderMap::Request, ":method", "GET")
            .with_header(HeaderMap::Request, ":path", "/")
            .with_header(HeaderMap::Request, ":authority", "ratings:9080")
    }

    #[test]
    fn a_request_denied_before_the_request_phase_is_still_counted() {
        // istio/proxy TestStats403Failure (testdata/metric/server_request_total.yaml.tmpl with
        // ResponseCode 403): RBAC answers before the stats plugins; Istio counts it in the log phase.
        let mut t = telemetry(SIDECAR, "");
        let peer = encode_peer_metadata(&[("WORKLOAD_NAME", "productpage-v1"), ("NAMESPACE", "default")], &[]);
        let host = request(MockHost::new())
            .with_header(HeaderMap::Request, "x-envoy-peer-metadata", &peer)
            .with_header(HeaderMap::Request, "content-type", "application/grpc")
            .with_u64("xds.listener_direction", 1)
            .with_u64("response.code", 403)
            .with_u64("request.time", 5)
            .at(9);
        t.on_log(&host, None);
        let l = only_series(&t);
        assert_eq!((l["reporter"].as_str(), l["response_code"].as_str()), ("destination", "403"));
        assert_eq!(l["source_workload"], "productpage-v1", "the peer header as it stood at log time");
        assert_eq!(l["request_protocol"], "http", "Istio decides gRPC in its own request phase, which never ran");
        assert_eq!(t.stats().spans_recorded, 1, "a sampled span too, with the request's start time");
        assert!(host.calls.borrow().set.is_empty(), "nothing propagated");
    }

    #[test]
    fn propagation_writes_each_header_with_its_own_call_and_never_the_whole_map() {
        let mut t = telemetry(SIDECAR, r#","traces":{"propagation":["w3c"]}"#);
        let host = request(MockHost::new());
        assert!(t.on_request_headers(&host).is_some());
        let calls = host.calls.borrow();
        assert_eq!(calls.set.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["traceparent"]);
        let mut t = telemetry(SIDECAR, r#","traces":{"propagation":["w3c","b3"]}"#);
        let host = request(MockHost::new()).with_header(HeaderMap::Request, "x-b3-flags", "1");
        t.on_request_headers(&host);
        let calls = host.calls.borrow();
        let names: Vec<_> = calls.set.iter().map(|(k, v)| (k.as_str(), v.is_some())).collect();
        assert_eq!(
            names,
            [("traceparent", true), ("x-b3-traceid", true), ("x-b3-spanid", true), ("x-b3-sampled", true)],
            "a new sampled root: the flags header is kept"
        );
        assert_eq!(host.counts().map_reads, 1);
    }

    #[test]
    fn grpc_web_counts_as_grpc_once_a_grpc_web_filter_rewrote_it() {
        let mut t = telemetry(SIDECAR, "");
        let host = request(MockHost::new()).with_header(HeaderMap::Request, "content-type", "application/grpc-web");
        let active = t.on_request_headers(&host);
        // What the request says at log time, after Envoy's grpc_web filter.
        let host = request(MockHost::new())
            .with_header(HeaderMap::Request, "content-type", "application/grpc")
            .with_property("xds.cluster_name", "inbound|9080||")
            .with_u64("response.grpc_status", 0);
        t.on_log(&host, active);
        let l = only_series(&t);
        assert_eq!((l["request_protocol"].as_str(), l["grpc_response_status"].as_str()), ("grpc", "0"));

        let mut t = telemetry(SIDECAR, "");
        let host = request(MockHost::new()).with_header(HeaderMap::Request, "content-type", "application/grpc-web");
        let active = t.on_request_headers(&host);
        t.on_log(&host.with_property("xds.cluster_name", "inbound|9080||"), active);
        assert_eq!(only_series(&t)["request_protocol"], "http", "gRPC-Web left as it is is not gRPC");
    }

    /// A gRPC request a fault filter after meshtel aborted with `grpcStatus: 14`: Istio's stats
    /// filter, after the fault filter, never saw its headers and counts it as HTTP without a gRPC
    /// status (istio/proxy istio_stats.cc, `decodeHeaders`); the span still says gRPC.
    #[test]
    fn a_fault_abort_after_meshtel_counts_as_istio_counts_it() {
        let mut t = telemetry(SIDECAR, "");
        let grpc = request(MockHost::new()).with_header(HeaderMap::Request, "content-type", "application/grpc");
        let active = t.on_request_headers(&grpc);
        let host = grpc
            .with_property("xds.cluster_name", "inbound|9080||")
            .with_u64("response.flags", 1 << 10)
            .with_u64("response.grpc_status", 14);
        t.on_log(&host, active);
        let l = only_series(&t);
        assert_eq!(
            (l["request_protocol"].as_str(), l["grpc_response_status"].as_str(), l["response_flags"].as_str()),
            ("http", "", "FI")
        );
    }

    #[test]
    fn peer_metadata_headers_can_be_refused() {
        let peer = encode_peer_metadata(&[("WORKLOAD_NAME", "forged")], &[]);
        for (setting, want) in [("true", "forged"), ("false", "unknown")] {
            let mut t = telemetry(SIDECAR, &format!(r#","metrics":{{"peer_metadata_headers":{setting}}}"#));
            let host = request(MockHost::new())
                .with_header(HeaderMap::Request, "x-envoy-peer-metadata", &peer)
                .with_property("xds.cluster_name", "inbound|9080||");
            let active = t.on_request_headers(&host);
            t.on_log(&host, active);
            assert_eq!(only_series(&t)["source_workload"], want, "peer_metadata_headers: {setting}");
        }
    }

    #[test]
    fn istio_filter_state_peer_wins_over_headers_and_is_read_once_per_connection() {
        let mut t = telemetry(SIDECAR, "");
        let header = encode_peer_metadata(&[("WORKLOAD_NAME", "from-header")], &[]);
        let state = encode_filter_state(&[("workload", "from-filter-state"), ("namespace", "ns-a")], &[]);
        let host = request(MockHost::new())
            .with_header(HeaderMap::Request, "x-envoy-peer-metadata", &header)
            .with_property("filter_state.downstream_peer", state)
            .with_property("filter_state.io.istio.peer_principal", "spiffe://td/ns/ns-a/sa/a")
            .with_property("filter_state.io.istio.local_principal", "spiffe://td/ns/default/sa/ratings")
            .with_property("xds.cluster_name", "inbound|9080||")
            .with_u64("connection.id", 42);
        for _ in 0..3 {
            let active = t.on_request_headers(&host);
            t.on_log(&host, active);
        }
        let series = t.recorded_series();
        assert_eq!(series.len(), 1);
        let (l, n) = &series[0];
        assert_eq!((l["source_workload"].as_str(), *n), ("from-filter-state", 3));
        assert_eq!(l["connection_security_policy"], "mutual_tls");
        assert_eq!(host.reads("filter_state.downstream_peer"), 1, "one read per connection, in one call");
        assert_eq!(host.reads("filter_state.io.istio.peer_principal"), 1);
    }

    #[test]
    fn outbound_resolves_the_service_from_the_host_header_and_routes() {
        let mut t = telemetry(SIDECAR, "");
        let host = MockHost::new()
            .with_header(HeaderMap::Request, ":authority", "example.com:8443")
            .with_property("xds.cluster_name", "PassthroughCluster")
            .with_property("xds.route_name", "allow_any")
            .with_u64("xds.listener_direction", 2);
        let active = t.on_request_headers(&host);
        t.on_log(&host, active);
        let l = only_series(&t);
        assert_eq!(l["reporter"], "source");
        assert_eq!(
            (l["destination_service"].as_str(), l["destination_service_name"].as_str()),
            ("example.com:8443", "PassthroughCluster")
        );
    }

    #[test]
    fn gateways_never_fall_back_to_the_host_header() {
        let mut t = telemetry("router~10.0.0.2~gw.istio-system~istio-system.svc.cluster.local", "");
        let host = request(MockHost::new()).with_property("xds.cluster_name", "outbound|80||nometa");
        let active = t.on_request_headers(&host);
        t.on_log(&host, active);
        let l = only_series(&t);
        assert_eq!((l["reporter"].as_str(), l["destination_service"].as_str()), ("source", "unknown"));
    }

    #[test]
    fn waypoints_report_both_peers_from_istios_filter_state() {
        let mut t = telemetry("waypoint~10.0.0.3~waypoint-x.default~default.svc.cluster.local", "");
        let down = encode_filter_state(&[("workload", "productpage-v1"), ("namespace", "default")], &[]);
        let up = encode_filter_state(
            &[("workload", "ratings-v1"), ("namespace", "default"), ("identity", "spiffe://td/ns/default/sa/ratings")],
            &[("app", "ratings")],
        );
        let host = request(MockHost::new())
            .with_property("filter_state.downstream_peer", down)
            .with_property("filter_state.upstream_peer", up)
            .with_property("filter_state.io.istio.peer_principal", "spiffe://td/ns/default/sa/productpage")
            .with_property("xds.cluster_name", "inbound-vip|9080|http|ratings.default.svc.cluster.local");
        let active = t.on_request_headers(&host);
        t.on_log(&host, active);
        let l = only_series(&t);
        assert_eq!(l["reporter"], "waypoint");
        assert_eq!(
            (l["source_workload"].as_str(), l["destination_workload"].as_str()),
            ("productpage-v1", "ratings-v1")
        );
        assert_eq!(l["source_principal"], "spiffe://td/ns/default/sa/productpage");
        assert_eq!(l["destination_principal"], "spiffe://td/ns/default/sa/ratings");
        assert_eq!(l["destination_canonical_revision"], "unknown");
        assert_eq!(l["connection_security_policy"], "none", "no local principal");
    }

    /// An inbound request on a kept-alive connection, as the benchmark sends it.
    fn steady_inbound() -> MockHost {
        request(MockHost::new())
            .with_header(HeaderMap::Request, ":scheme", "http")
            .with_header(HeaderMap::Request, "x-request-id", "5b0c4b0e")
            .with_header(HeaderMap::Response, ":status", "200")
            .with_property("xds.cluster_name", "inbound|9080||")
            .with_u64("response.code", 200)
            .with_u64("response.flags", 0)
            .with_property("request.protocol", "HTTP/1.1")
            .with_property("source.address", "10.0.0.9:51234")
            .with_u64("connection.id", 7)
            .with_u64("request.total_size", 120)
            .with_u64("response.total_size", 310)
    }

    /// The configurations the benchmark measures (BENCHMARKS.md).
    const CONFIGURATIONS: [(&str, &str); 5] = [
        ("traces + metrics, 100%", ""),
        ("metrics only", r#","traces":{"enabled":false}"#),
        ("traces 0% + metrics", r#","traces":{"sampling_ratio":0.0}"#),
        ("traces only", r#","metrics":{"enabled":false}"#),
        ("traces + metrics + access logs", r#","logs":{"enabled":true}"#),
    ];

    /// Two requests on one connection; the host calls of the second, with the log phase's CEL
    /// queries compiled or, as on a proxy without the CEL parser, not.
    fn second_request_calls(extra: &str, cel: bool) -> crate::host::mock::Counts {
        let mut t = telemetry(SIDECAR, extra);
        let host = steady_inbound();
        if cel {
            assert_eq!(t.compile_queries(&host), crate::prefetch::Compiled::Done);
        }
        for _ in 0..2 {
            host.reset();
            let active = t.on_request_headers(&host);
            t.on_log(&host, active);
        }
        host.counts()
    }

    #[test]
    fn host_calls_per_request_are_pinned_for_the_main_configurations() {
        use crate::host::mock::Counts;
        // The second request of a connection on a known series. A new call on the request path
        // fails here first: price it with the cost model in BENCHMARKS.md before changing these.
        // With CEL: the request headers read, the propagation headers written, the clock at
        // both ends, and one evaluation for everything the log phase needs.
        for (name, extra) in CONFIGURATIONS {
            let writes = if name == "metrics only" { 0 } else { 4 };
            let got = second_request_calls(extra, true);
            let want = Counts {
                properties: 0,
                header_reads: 0,
                map_reads: 1,
                header_writes: writes,
                time_reads: 2,
                evaluations: 1,
                returned_buffers: got.returned_buffers,
            };
            assert_eq!(got, want, "{name}, with CEL");
        }
        // Without CEL, fact by fact: (properties, header reads).
        let fact_by_fact = [(6, 0), (6, 0), (6, 0), (5, 0), (9, 0)];
        for ((name, extra), (properties, header_reads)) in CONFIGURATIONS.into_iter().zip(fact_by_fact) {
            let got = second_request_calls(extra, false);
            assert_eq!((got.properties, got.header_reads, got.evaluations), (properties, header_reads, 0), "{name}");
        }
    }

    /// Every side a request can be seen from, with what the proxy says there.
    fn sides() -> Vec<(&'static str, &'static str, MockHost)> {
        let down = encode_filter_state(&[("workload", "productpage-v1"), ("namespace", "default")], &[]);
        let up = encode_filter_state(
            &[("workload", "ratings-v1"), ("namespace", "default"), ("identity", "spiffe://td/ns/default/sa/ratings")],
            &[("app", "ratings")],
        );
        let header = encode_peer_metadata(&[("WORKLOAD_NAME", "reviews-v2"), ("NAMESPACE", "shop")], &[]);
        vec![
            ("sidecar inbound", SIDECAR, steady_inbound().with_property("filter_state.downstream_peer", down.clone())),
            (
                "sidecar inbound over mTLS, gRPC aborted by a fault",
                SIDECAR,
                steady_inbound()
                    .with_header(HeaderMap::Request, "content-type", "application/grpc")
                    .with_property("connection.mtls", [1])
                    .with_property("connection.uri_san_peer_certificate", "spiffe://td/ns/default/sa/productpage")
                    .with_property("connection.uri_san_local_certificate", "spiffe://td/ns/default/sa/ratings")
                    .with_u64("response.flags", 1 << 10)
                    .with_u64("response.grpc_status", 14),
            ),
            (
                "sidecar outbound",
                SIDECAR,
                request(MockHost::new())
                    .with_header(HeaderMap::Response, ":status", "503")
                    .with_header(HeaderMap::Response, "x-envoy-peer-metadata", &header)
                    .with_property("xds.cluster_name", "outbound|9080||reviews.shop.svc.cluster.local")
                    .with_property("upstream.uri_san_peer_certificate", "spiffe://td/ns/shop/sa/reviews")
                    .with_property("upstream.uri_san_local_certificate", "spiffe://td/ns/default/sa/ratings")
                    .with_property("upstream.address", "10.0.0.7:9080")
                    .with_u64("response.code", 503)
                    .with_u64("response.flags", 1 << 5)
                    .with_u64("request.size", 10)
                    .with_u64("response.size", 20),
            ),
            (
                "gateway, no cluster (a local reply)",
                "router~10.0.0.2~gw.istio-system~istio-system.svc.cluster.local",
                request(MockHost::new()).with_u64("response.code", 404).with_property("xds.route_name", "r1"),
            ),
            (
                "waypoint",
                "waypoint~10.0.0.3~waypoint-x.default~default.svc.cluster.local",
                request(MockHost::new())
                    .with_property("filter_state.downstream_peer", down)
                    .with_property("filter_state.upstream_peer", up)
                    .with_property("filter_state.io.istio.peer_principal", "spiffe://td/ns/default/sa/productpage")
                    .with_property("xds.cluster_name", "inbound-vip|9080|http|ratings.default.svc.cluster.local")
                    .with_u64("connection.id", 3),
            ),
        ]
    }

    #[test]
    fn one_evaluation_gives_the_same_telemetry_as_reading_fact_by_fact() {
        let all = r#","logs":{"enabled":true},"traces":{"span_name":"method_route"}"#;
        for (side, node, host) in sides() {
            let mut runs = Vec::new();
            for cel in [true, false] {
                let mut t = telemetry(node, all);
                if cel {
                    assert_eq!(t.compile_queries(&host), crate::prefetch::Compiled::Done);
                }
                for _ in 0..2 {
                    let active = t.on_request_headers(&host);
                    t.on_log(&host, active);
                }
                let (spans, logs) = t.take_records();
                assert_eq!((spans.len(), logs.len()), (2, 2), "{side}");
                assert_eq!(t.stats().cel_evaluations_failed, 0, "{side}");
                runs.push((t.recorded_series(), spans, logs));
            }
            assert_eq!(runs[0], runs[1], "{side}: with CEL (left) and fact by fact (right)");
        }
    }

    #[test]
    fn a_failed_evaluation_costs_reads_not_telemetry() {
        let (_, node, host) = sides().remove(2);
        let host = host.failing_evaluations();
        let mut t = telemetry(node, "");
        assert_eq!(t.compile_queries(&host), crate::prefetch::Compiled::Done);
        let active = t.on_request_headers(&host);
        t.on_log(&host, active);
        let l = only_series(&t);
        assert_eq!((l["source_workload"].as_str(), l["destination_workload"].as_str()), ("ratings-v1", "reviews-v2"));
        assert_eq!(l["response_flags"], "UF");
        assert_eq!(t.stats().cel_evaluations_failed, 1);
        let notices = t.notices(0);
        assert!(notices.iter().any(|l| l.contains("CEL evaluation is failing")), "{notices:?}");
        assert!(t.notices(0).is_empty(), "once, not per tick");
    }

    /// `metrics.overrides` as Istio's stats filter applies them (envoyproxy/envoy
    /// `contrib/istio/filters/http/istio_stats/source/istio_stats.cc`, `overrideTags` and
    /// `StreamOverrides::evaluate`): removed labels go, an UPSERT's value is its expression's
    /// string, `unknown` when it fails; a disabled metric is not recorded; the other side keeps
    /// Istio's labels. The UPSERTs join the one evaluation of the log phase.
    #[test]
    fn metric_overrides_label_the_series_they_match_with_the_values_cel_gives() {
        let extra = r#","metrics":{"overrides":[
            {"match":{"metric":"REQUEST_COUNT","mode":"SERVER"},"tag_overrides":{
              "request_protocol":{"operation":"REMOVE"},"response_flags":{"operation":"REMOVE"},
              "request_host":{"value":"request.host"},"destination_port":{"value":"string(destination.port)"}}},
            {"match":{"metric":"REQUEST_DURATION"},"disabled":true}]}"#;
        let (host_expr, port_expr) = ("string(request.host)", "string(string(destination.port))");
        // One more evaluation: the downstream connection's facts, read at its first request.
        for (host_value, evaluations) in [(Some(b"example.com".to_vec()), 2), (None, 5)] {
            let mut t = telemetry(SIDECAR, extra);
            let host = steady_inbound()
                .with_expression(host_expr, host_value.clone())
                .with_expression(port_expr, Some(b"9080".to_vec()));
            assert_eq!(t.compile_queries(&host), crate::prefetch::Compiled::Done);
            let active = t.on_request_headers(&host);
            host.reset();
            t.on_log(&host, active);
            assert_eq!(host.counts().evaluations, evaluations, "{host_value:?}: joined, or apart after a failure");
            let series = t.recorded_series();
            assert_eq!(series.len(), 1, "the histograms' series holds no request count: {series:?}");
            let (labels, n) = &series[0];
            assert_eq!(*n, 1);
            let expected_host = if host_value.is_some() { "example.com" } else { "unknown" };
            assert_eq!(labels["request_host"], expected_host);
            assert_eq!(labels["destination_port"], "9080");
            assert!(!labels.contains_key("request_protocol") && !labels.contains_key("response_flags"));
            assert_eq!(labels.len(), 25, "two removed, two added");
            assert_eq!(labels["destination_workload"], "ratings-v1", "the others as Istio derives them");
        }
    }

    /// Envoy's CEL access-log filter (envoyproxy/envoy
    /// `source/extensions/access_loggers/filters/cel/cel.cc`, what Istio renders
    /// `accessLogging[].filter.expression` to) logs a request only when the expression is `true`:
    /// an error or a value of another type does not log.
    #[test]
    fn logs_filter_keeps_the_requests_its_expression_selects() {
        use crate::prefetch::Compiled;
        let filter = "response.code >= 400";
        let extra = r#","logs":{"enabled":true,"filter":"response.code >= 400"}"#;
        for (value, logged, evaluations) in
            [(Some(vec![1]), 1, 1), (Some(vec![0]), 0, 1), (Some(b"yes".to_vec()), 0, 1), (None, 0, 3)]
        {
            let mut t = telemetry(SIDECAR, extra);
            let host = steady_inbound().with_expression(filter, value.clone());
            assert_eq!(t.compile_queries(&host), Compiled::Done);
            // The second request of a connection: its facts and the cluster's are cached.
            for _ in 0..2 {
                let active = t.on_request_headers(&host);
                host.reset();
                t.on_log(&host, active);
            }
            let (spans, logs) = t.take_records();
            assert_eq!((logs.len(), spans.len()), (2 * logged, 2), "{value:?}: the filter decides logs only");
            assert_eq!(only_series(&t)["response_code"], "200");
            // An error fails the joined evaluation: meshtel's facts, then the filter alone.
            let counts = (host.counts().evaluations, host.counts().properties);
            assert_eq!(counts, (evaluations, 0), "{value:?} {:?}", host.calls.borrow().properties);
            let errors = u64::from(value.is_none()) * 2;
            assert_eq!((t.stats().log_filter_errors, t.stats().cel_evaluations_failed), (errors, 0));
        }
        // Without CEL in the proxy the filter cannot be applied: every request is logged.
        let mut t = telemetry(SIDECAR, extra);
        let host = steady_inbound().without_cel();
        assert_eq!(t.compile_queries(&host), Compiled::NoCel);
        let active = t.on_request_headers(&host);
        t.on_log(&host, active);
        assert_eq!(t.take_records().1.len(), 1);
        // An expression the proxy cannot compile refuses the configuration.
        let mut t = telemetry(SIDECAR, extra);
        assert_eq!(
            t.compile_queries(&steady_inbound().refusing(filter)),
            Compiled::Refused { field: "logs.filter".into(), expression: filter.into() }
        );
    }
}
