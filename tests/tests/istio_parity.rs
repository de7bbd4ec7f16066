//! Label parity with Istio's own stats filter, case by case: each case is a scenario of
//! istio/proxy's end-to-end tests (its node metadata, listener and cluster shape, traffic) run
//! through meshtel in real Envoy 1.40, asserting all 25 labels the golden file it names states.
//!
//! Upstream Envoy has none of Istio's own filters (peer metadata exchange, workload discovery,
//! `istio_authn`). Where a golden case needs them, the case hands meshtel the same facts through
//! what upstream Envoy allows and says which: the `x-envoy-peer-metadata` headers Istio's
//! exchange sends (meshtel's fallback when the peer filter state is absent), and string filter
//! state for `io.istio.peer_principal` / `io.istio.local_principal`. Reading the peer filter
//! state itself (a Struct upstream Envoy cannot create) is unit-tested through the host seam
//! (`filter/src/telemetry/request.rs`, `filter/src/istio/facts.rs`).

use std::collections::BTreeMap;
use std::time::Duration;

use meshtel_tests::app::{App, Behavior, PEER_METADATA_REQUEST};
use meshtel_tests::collector::Collector;
use meshtel_tests::envoy::{
    set_connection_filter_state, set_filter_state, Cluster, Direction, Envoy, Listener, Node, Proxy, COLLECTOR_CLUSTER,
};
use meshtel_tests::istio::{
    client_node, client_request_total, server_cluster, server_node, server_request_total, waypoint_backend_node,
    waypoint_node, with, SERVER_SERVICE,
};
use meshtel_tests::mesh::plugin_config;
use meshtel_tests::metrics::{peer_metadata_of, series, total, Point};
use meshtel_tests::{free_port, request};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);
const REQUESTS: &str = "istio_requests_total";
/// `{{ .Vars.RequestCount }}` of the golden cases.
const COUNT: u64 = 10;

/// One proxy: `node`, one listener in front of meshtel, its clusters, and the collector.
fn proxy(node: Node, listener: Listener, clusters: Vec<Cluster>, collector: &Collector) -> Proxy {
    let mut clusters = clusters;
    clusters.push(Cluster::to(COLLECTOR_CLUSTER, collector.port));
    Proxy::new(node, vec![listener], clusters, Some(plugin_config(json!({"metrics": {"export_interval_ms": 1000}}))))
}

/// Send `COUNT` requests to `port` expecting `status`, then wait for them at the collector and
/// return the one series they make.
fn run(collector: &Collector, port: u16, headers: &[(&str, &str)], path: &str, status: u16) -> Point {
    for _ in 0..COUNT {
        let got = request(&format!("http://127.0.0.1:{port}{path}"), headers).map(|r| r.0);
        assert_eq!(got, Some(status), "{path}");
    }
    let points = collector.wait_for_points(WAIT, |p| total(p, REQUESTS, |_| true) == COUNT);
    let mut all = series(&points, REQUESTS);
    assert_eq!(all.len(), 1, "one series: {all:#?}");
    all.remove(0)
}

/// Assert the 25 labels of `golden`, naming the golden file on failure.
fn assert_labels(point: &Point, golden: &str, want: &BTreeMap<&'static str, &'static str>) {
    assert_eq!(point.value, COUNT);
    let got: BTreeMap<&str, &str> = point.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(got.len(), 25, "Istio's 25 labels ({golden})");
    for (name, value) in want {
        assert_eq!(got.get(name).copied(), Some(*value), "{name} ({golden})");
    }
}

fn inbound(port: u16) -> Listener {
    Listener::new("virtualInbound", port, Direction::Inbound, "inbound|9080||")
}

fn outbound(port: u16, cluster: &str) -> Listener {
    Listener::new("0.0.0.0_9080", port, Direction::Outbound, cluster)
}

/// The destination labels of a client-side request no peer answered for (no exchange, no
/// endpoint metadata, no service namespace): `unknown`, the canonical revision `latest`.
const NO_DESTINATION_PEER: &[(&str, &str)] = &[
    ("destination_workload", "unknown"),
    ("destination_workload_namespace", "unknown"),
    ("destination_app", "unknown"),
    ("destination_version", "unknown"),
    ("destination_canonical_service", "unknown"),
    ("destination_canonical_revision", "latest"),
    ("destination_cluster", "unknown"),
    ("destination_service_namespace", "unknown"),
];

const OUTBOUND_SERVER: &str = "outbound|9080||server.default.svc.cluster.local";

/// What Istio's client-side exchange sends: the client node's metadata header.
fn from_client() -> String {
    peer_metadata_of(&client_node())
}

/// Ask the echo app to answer as the server's sidecar does (its metadata header).
fn answer_as_server() -> String {
    peer_metadata_of(&server_node())
}

#[test]
fn sidecar_inbound_matches_server_request_total() {
    // TestStatsPayload/Default, testdata/metric/server_request_total.yaml.tmpl.
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let port = free_port();
    let p = proxy(server_node(), inbound(port), vec![server_cluster("inbound|9080||", app.port)], &collector);
    let _envoy = Envoy::start(&p);
    let point = run(&collector, port, &[("x-envoy-peer-metadata", &from_client())], "/", 200);
    assert_labels(&point, "server_request_total.yaml.tmpl", &server_request_total());
}

#[test]
fn sidecar_outbound_matches_client_request_total() {
    // TestStatsPayload/Default, testdata/metric/client_request_total.yaml.tmpl.
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let port = free_port();
    let p = proxy(
        client_node(),
        outbound(port, OUTBOUND_SERVER),
        vec![server_cluster(OUTBOUND_SERVER, app.port)],
        &collector,
    );
    let _envoy = Envoy::start(&p);
    let point = run(&collector, port, &[(PEER_METADATA_REQUEST, &answer_as_server())], "/", 200);
    assert_labels(&point, "client_request_total.yaml.tmpl", &client_request_total());
}

#[test]
fn endpoint_metadata_peer_has_no_app_or_version() {
    // TestStatsEndpointLabels, testdata/metric/client_request_total_endpoint_labels.yaml.tmpl:
    // no exchange; the endpoint's istio.workload names the peer.
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let port = free_port();
    let mut cluster = server_cluster(OUTBOUND_SERVER, app.port);
    cluster.workload = Some("ratings-v1;default;ratings;version-1;server-cluster".into());
    let p = proxy(client_node(), outbound(port, OUTBOUND_SERVER), vec![cluster], &collector);
    let _envoy = Envoy::start(&p);
    let point = run(&collector, port, &[], "/", 200);
    let want = with(client_request_total(), &[("destination_app", "unknown"), ("destination_version", "unknown")]);
    assert_labels(&point, "client_request_total_endpoint_labels.yaml.tmpl", &want);
}

#[test]
fn cluster_metadata_namespace_wins() {
    // testdata/bootstrap/client_cluster_metadata_precedence.yaml.tmpl,
    // testdata/metric/client_request_total_cluster_metadata_precedence.yaml.tmpl.
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let port = free_port();
    let mut cluster = server_cluster(OUTBOUND_SERVER, app.port);
    cluster.service_namespace = Some("server".into());
    let p = proxy(client_node(), outbound(port, OUTBOUND_SERVER), vec![cluster], &collector);
    let _envoy = Envoy::start(&p);
    let point = run(&collector, port, &[(PEER_METADATA_REQUEST, &answer_as_server())], "/", 200);
    let want = with(client_request_total(), &[("destination_service_namespace", "server")]);
    assert_labels(&point, "client_request_total_cluster_metadata_precedence.yaml.tmpl", &want);
}

#[test]
fn host_header_names_the_service_without_cluster_metadata() {
    // TestStatsPayload/UseHostHeader, testdata/metric/host_header_fallback.yaml.tmpl: the
    // Host header as sent, port included, for both service labels.
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let port = free_port();
    let p =
        proxy(client_node(), outbound(port, "host_header"), vec![Cluster::new("host_header", app.port)], &collector);
    let _envoy = Envoy::start(&p);
    let point = run(&collector, port, &[(PEER_METADATA_REQUEST, &answer_as_server())], "/", 200);
    let host: &'static str = Box::leak(format!("127.0.0.1:{port}").into_boxed_str());
    let want = with(client_request_total(), &[("destination_service", host), ("destination_service_name", host)]);
    assert_labels(&point, "host_header_fallback.yaml.tmpl", &want);
}

#[test]
fn grpc_is_reported_with_its_status() {
    // TestStatsGrpc (GrpcResponseStatus 7), testdata/metric/server_request_total.yaml.tmpl.
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let port = free_port();
    let p = proxy(server_node(), inbound(port), vec![server_cluster("inbound|9080||", app.port)], &collector);
    let _envoy = Envoy::start(&p);
    let headers = [("x-envoy-peer-metadata", from_client()), ("content-type", "application/grpc".into())];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let point = run(&collector, port, &headers, "/grpc/7", 200);
    let want = with(server_request_total(), &[("request_protocol", "grpc"), ("grpc_response_status", "7")]);
    assert_labels(&point, "server_request_total.yaml.tmpl (GrpcResponseStatus 7)", &want);
}

fn grpc_web_filter() -> Value {
    json!({"name": "envoy.filters.http.grpc_web", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb"}})
}

#[test]
fn grpc_web_is_grpc_behind_istios_grpc_web_filter_and_http_without_it() {
    // No Istio golden: istio_stats.cc decides gRPC on the request headers as its decodeHeaders
    // sees them, and Istio places grpc_web after the STATS plugins, before istio.stats
    // (istio/istio pilot/pkg/networking/core/httproute / listener_builder.go). The expectation
    // is server_request_total.yaml.tmpl with the gRPC labels of TestStatsGrpc.
    for (grpc_web, protocol, status) in [(true, "grpc", "7"), (false, "http", "")] {
        let collector = Collector::start();
        let app = App::start(Behavior::Echo);
        let port = free_port();
        let mut l = inbound(port);
        if grpc_web {
            l.filters_after.push(grpc_web_filter());
        }
        let p = proxy(server_node(), l, vec![server_cluster("inbound|9080||", app.port)], &collector);
        let _envoy = Envoy::start(&p);
        let headers = [("x-envoy-peer-metadata", from_client()), ("content-type", "application/grpc-web+proto".into())];
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let point = run(&collector, port, &headers, "/grpc/7", 200);
        let want = with(server_request_total(), &[("request_protocol", protocol), ("grpc_response_status", status)]);
        assert_labels(&point, "server_request_total.yaml.tmpl (gRPC-Web)", &want);
    }
}

#[test]
fn rbac_denied_request_is_counted_403() {
    // TestStats403Failure, testdata/filters/rbac.yaml.tmpl ahead of the stats filter,
    // testdata/metric/server_request_total.yaml.tmpl with ResponseCode 403.
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let port = free_port();
    let mut l = inbound(port);
    l.filters_before.push(json!({
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "DENY", "policies": {"ns[foo]-policy[httpbin-deny]-rule[0]": {
                "permissions": [{"any": true}], "principals": [{"any": true}]}}},
        },
    }));
    let p = proxy(server_node(), l, vec![server_cluster("inbound|9080||", app.port)], &collector);
    let _envoy = Envoy::start(&p);
    let point = run(&collector, port, &[("x-envoy-peer-metadata", &from_client())], "/", 403);
    assert_labels(
        &point,
        "server_request_total.yaml.tmpl (ResponseCode 403)",
        &with(server_request_total(), &[("response_code", "403")]),
    );
}

#[test]
fn outbound_passthrough_keeps_the_host_and_names_the_cluster() {
    // No Istio golden; istio_stats.cc populatePeerInfo: route allow_any / cluster
    // PassthroughCluster name the service, the Host header stays the service host.
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let port = free_port();
    let mut l = outbound(port, "PassthroughCluster");
    l.route_name = Some("allow_any".into());
    let p = proxy(client_node(), l, vec![Cluster::new("PassthroughCluster", app.port)], &collector);
    let _envoy = Envoy::start(&p);
    let point = run(&collector, port, &[], "/", 200);
    let host: &'static str = Box::leak(format!("127.0.0.1:{port}").into_boxed_str());
    let mut want = with(client_request_total(), NO_DESTINATION_PEER);
    want = with(want, &[("destination_service", host), ("destination_service_name", "PassthroughCluster")]);
    assert_labels(&point, "client_request_total.yaml.tmpl (passthrough, istio_stats.cc)", &want);
}

#[test]
fn inbound_passthrough_falls_back_to_the_local_canonical_name() {
    // No Istio golden; istio_stats.cc: the name from the cluster, the service from the local
    // canonical name (server_disable_host_header_fallback.yaml.tmpl's fallback).
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let port = free_port();
    let l = Listener::new("virtualInbound", port, Direction::Inbound, "InboundPassthroughClusterIpv4");
    let p = proxy(server_node(), l, vec![Cluster::new("InboundPassthroughClusterIpv4", app.port)], &collector);
    let _envoy = Envoy::start(&p);
    let point = run(&collector, port, &[("x-envoy-peer-metadata", &from_client())], "/", 200);
    let want = with(
        server_request_total(),
        &[("destination_service", "ratings"), ("destination_service_name", "InboundPassthroughClusterIpv4")],
    );
    assert_labels(&point, "server_request_total.yaml.tmpl (inbound passthrough)", &want);
}

#[test]
fn blackhole_route_names_blackhole_cluster() {
    // No Istio golden; istio_stats.cc: route block_all names BlackHoleCluster. No cluster was
    // chosen, so the listener's direction (OUTBOUND) makes the proxy the source.
    let collector = Collector::start();
    let port = free_port();
    let mut l = outbound(port, "BlackHoleCluster");
    l.route_name = Some("block_all".into());
    l.direct_response = Some(502);
    let p = proxy(client_node(), l, vec![], &collector);
    let _envoy = Envoy::start(&p);
    let point = run(&collector, port, &[], "/", 502);
    let host: &'static str = Box::leak(format!("127.0.0.1:{port}").into_boxed_str());
    let want = with(
        with(client_request_total(), NO_DESTINATION_PEER),
        &[("destination_service", host), ("destination_service_name", "BlackHoleCluster"), ("response_code", "502")],
    );
    assert_labels(&point, "client_request_total.yaml.tmpl (block_all, istio_stats.cc)", &want);
}

#[test]
fn missing_local_labels_are_empty_not_unknown() {
    // The labels-less node of testdata/server_waypoint_proxy_node_metadata.json.tmpl as a
    // sidecar: istio_stats.cc takes the local side from node metadata as it is.
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let port = free_port();
    let mut node = waypoint_node();
    node.id = "sidecar~10.52.0.37~bare-0.default~default.svc.cluster.local".into();
    let p = proxy(node, inbound(port), vec![server_cluster("inbound|9080||", app.port)], &collector);
    let _envoy = Envoy::start(&p);
    let point = run(&collector, port, &[("x-envoy-peer-metadata", &from_client())], "/", 200);
    let want = with(
        server_request_total(),
        &[
            ("destination_workload", ""),
            ("destination_app", ""),
            ("destination_version", ""),
            ("destination_canonical_service", ""),
            ("destination_canonical_revision", ""),
        ],
    );
    assert_labels(&point, "server_request_total.yaml.tmpl (no LABELS, no WORKLOAD_NAME)", &want);
}

#[test]
fn istio_principals_make_mutual_tls() {
    // The principals of testdata/metric/tcp_server_connection_open.yaml.tmpl, set as Istio's
    // istio_authn sets them (connection filter state, strings) instead of by a TLS handshake.
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let port = free_port();
    let mut l = inbound(port);
    l.network_filters.push(set_connection_filter_state(&[
        ("io.istio.peer_principal", "spiffe://cluster.local/ns/default/sa/client"),
        ("io.istio.local_principal", "spiffe://cluster.local/ns/default/sa/server"),
    ]));
    let p = proxy(server_node(), l, vec![server_cluster("inbound|9080||", app.port)], &collector);
    let _envoy = Envoy::start(&p);
    let point = run(&collector, port, &[("x-envoy-peer-metadata", &from_client())], "/", 200);
    let want = with(
        server_request_total(),
        &[
            ("source_principal", "spiffe://cluster.local/ns/default/sa/client"),
            ("destination_principal", "spiffe://cluster.local/ns/default/sa/server"),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    assert_labels(&point, "server_request_total.yaml.tmpl + tcp_server_connection_open principals", &want);
}

#[test]
fn gateway_reports_source_without_host_header_fallback() {
    // No Istio golden for gateways: a gateway listener is OUTBOUND (reporter source) with the
    // host-header fallback off (istio/istio pilot/pkg/model/telemetry.go).
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let port = free_port();
    let node = Node::gateway();
    let p = proxy(
        node,
        outbound(port, "outbound|9080||nometa"),
        vec![Cluster::new("outbound|9080||nometa", app.port)],
        &collector,
    );
    let _envoy = Envoy::start(&p);
    let point = run(&collector, port, &[(PEER_METADATA_REQUEST, &answer_as_server())], "/", 200);
    let want = with(
        client_request_total(),
        &[
            ("source_workload", "istio-ingressgateway"),
            ("source_canonical_service", "istio-ingressgateway"),
            ("source_canonical_revision", "latest"),
            ("source_workload_namespace", "istio-system"),
            ("source_app", "istio-ingressgateway"),
            ("source_version", ""),
            ("source_cluster", "Kubernetes"),
            ("destination_service", "unknown"),
            ("destination_service_name", "unknown"),
        ],
    );
    assert_labels(&point, "client_request_total.yaml.tmpl (gateway)", &want);
}

#[test]
fn waypoint_matches_server_waypoint_proxy_request_total() {
    // TestStatsServerWaypointProxy, testdata/metric/server_waypoint_proxy_request_total.yaml.tmpl.
    // Istio finds the destination by workload discovery; here the upstream answers with the
    // same facts (BackendMetadata) as its metadata header.
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let port = free_port();
    let cluster = format!("inbound-vip|9080|http|{SERVER_SERVICE}");
    let l = Listener::new("main_internal", port, Direction::Inbound, &cluster);
    let p = proxy(waypoint_node(), l, vec![server_cluster(&cluster, app.port)], &collector);
    let _envoy = Envoy::start(&p);
    let backend = peer_metadata_of(&waypoint_backend_node());
    let point = run(
        &collector,
        port,
        &[("x-envoy-peer-metadata", &from_client()), (PEER_METADATA_REQUEST, &backend)],
        "/",
        200,
    );
    let want = with(
        server_request_total(),
        &[
            ("reporter", "waypoint"),
            ("destination_principal", "spiffe://cluster.global/ns/default/sa/ratings"),
            ("destination_version", "version-1"),
            ("destination_cluster", "ratings-cluster"),
        ],
    );
    assert_labels(&point, "server_waypoint_proxy_request_total.yaml.tmpl", &want);
}

#[test]
fn waypoint_behind_hbone_termination_matches_server_waypoint_proxy_connect_request_total() {
    // TestStatsServerWaypointProxyCONNECT/full_metadata,
    // testdata/metric/server_waypoint_proxy_connect_request_total.yaml.tmpl: a client tunnels
    // HTTP/2 CONNECT to `connect_terminate`, which hands the stream to the internal listener
    // `main_internal` (meshtel, then the router to an `inbound-vip|...` cluster), as istiod's
    // buildWaypointInbound shapes it. The principals are set at termination, as Istio does from
    // the tunnel's certificates; the source is the workload name alone (Istio's workload
    // discovery of the client address), handed over as a metadata header.
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let (client_port, terminate_port) = (free_port(), free_port());
    let cluster = format!("inbound-vip|9080|http|{SERVER_SERVICE}");
    let mut main = Listener::new("main_internal", 0, Direction::Inbound, &cluster);
    main.internal = true;
    let mut p = proxy(waypoint_node(), main, vec![server_cluster(&cluster, app.port)], &collector);
    p.raw_listeners = vec![client_tunnel(client_port), connect_terminate(terminate_port)];
    p.raw_clusters = vec![hbone_cluster(terminate_port), main_internal_cluster()];
    let _envoy = Envoy::start(&p);
    let source = peer_metadata_of(&Node { id: String::new(), metadata: json!({"WORKLOAD_NAME": "productpage-v1"}) });
    let backend = peer_metadata_of(&waypoint_backend_node());
    let point = run(
        &collector,
        client_port,
        &[("x-envoy-peer-metadata", &source), (PEER_METADATA_REQUEST, &backend)],
        "/",
        200,
    );
    let want = with(
        server_request_total(),
        &[
            ("reporter", "waypoint"),
            ("source_canonical_service", "unknown"),
            ("source_canonical_revision", "latest"),
            ("source_principal", "spiffe://cluster.local/ns/default/sa/client"),
            ("source_app", "unknown"),
            ("source_version", "unknown"),
            ("source_cluster", "unknown"),
            ("destination_principal", "spiffe://cluster.global/ns/default/sa/ratings"),
            ("destination_version", "version-1"),
            ("destination_cluster", "ratings-cluster"),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    assert_labels(&point, "server_waypoint_proxy_connect_request_total.yaml.tmpl", &want);
}

/// A plain TCP listener that tunnels each connection as HTTP/2 CONNECT to the waypoint's
/// `connect_terminate` (what a ztunnel or sidecar does towards port 15008).
fn client_tunnel(port: u16) -> Value {
    json!({
        "name": "client_tunnel",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": "client_tunnel",
                "cluster": "hbone",
                "tunneling_config": {"hostname": "10.96.0.10:9080"},
            },
        }]}],
    })
}

fn hbone_cluster(port: u16) -> Value {
    json!({
        "name": "hbone",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "hbone", "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
            {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
    })
}

/// istiod's `connect_terminate` (pilot/pkg/networking/core/listener_waypoint.go,
/// buildConnectTerminateListener), in plaintext, with the principals Istio sets there.
fn connect_terminate(port: u16) -> Value {
    json!({
        "name": "connect_terminate",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"name": "default", "filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "connect_terminate",
                "codec_type": "HTTP2",
                "upgrade_configs": [{"upgrade_type": "CONNECT"}],
                "http2_protocol_options": {"allow_connect": true},
                "route_config": {"name": "default", "virtual_hosts": [{"name": "default", "domains": ["*"], "routes": [{
                    "match": {"connect_matcher": {}},
                    "route": {"cluster": "main_internal", "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]},
                }]}]},
                "http_filters": [
                    set_filter_state(&[
                        ("io.istio.peer_principal", "spiffe://cluster.local/ns/default/sa/client"),
                        ("io.istio.local_principal", "spiffe://cluster.local/ns/default/sa/server"),
                    ]),
                    {"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
                ],
            },
        }]}],
    })
}

/// istiod's `main_internal` cluster: the internal listener, through `internal_upstream`.
fn main_internal_cluster() -> Value {
    json!({
        "name": "main_internal",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "main_internal", "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
            {"envoy_internal_address": {"server_listener_name": "main_internal"}}}}]}]},
        "transport_socket": {"name": "internal_upstream", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
            "transport_socket": {"name": "raw_buffer", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}}},
    })
}

/// Envoy's fault filter, as Istio configures it from a VirtualService's `fault`: `abort` and
/// `delay` at 100%.
fn fault_filter(abort: Option<Value>, delay: bool) -> Value {
    let all = json!({"numerator": 100, "denominator": "HUNDRED"});
    let mut config = json!({"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"});
    if let Some(mut abort) = abort {
        abort["percentage"] = all.clone();
        config["abort"] = abort;
    }
    if delay {
        config["delay"] = json!({"fixed_delay": "0.010s", "percentage": all});
    }
    json!({"name": "envoy.filters.http.fault", "typed_config": config})
}

#[test]
fn grpc_aborted_by_a_fault_counts_as_http_as_in_istio() {
    // Istio places the fault filter after STATS-phase plugins and before its stats filter
    // (istio/istio pilot/pkg/networking/core/listener_test.go: wasm-stats, grpc_stats, fault,
    // cors, istio.stats, router). The abort ends the chain, so istio_stats.cc's decodeHeaders,
    // the only place that sets is_grpc_, never runs: request_protocol "http", no gRPC status.
    // Expectation: server_request_total.yaml.tmpl with those labels and the flag FI.
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let port = free_port();
    let mut l = inbound(port);
    l.filters_after.push(fault_filter(Some(json!({"grpc_status": 14})), false));
    let p = proxy(server_node(), l, vec![server_cluster("inbound|9080||", app.port)], &collector);
    let _envoy = Envoy::start(&p);
    let headers = [("x-envoy-peer-metadata", from_client()), ("content-type", "application/grpc".into())];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let point = run(&collector, port, &headers, "/grpc/0", 200);
    let want = with(
        server_request_total(),
        &[
            ("request_protocol", "http"),
            ("grpc_response_status", ""),
            ("response_flags", "FI"),
            ("response_code", "200"),
        ],
    );
    assert_labels(&point, "server_request_total.yaml.tmpl (a gRPC fault abort)", &want);
}

/// A request that ends with several flags: (case, upstream reachable, path, route options, fault
/// filter, Envoy's `%RESPONSE_FLAGS%`).
type FlagCase = (&'static str, bool, &'static str, Option<Value>, Option<Value>, &'static str);

/// Several response flags on one request, as Envoy joins them in `%RESPONSE_FLAGS%` (the order
/// they were set, source/common/stream_info/utility.cc) and as meshtel renders the bitmask
/// (filter/src/istio/response_flags.rs): the same string, request by request.
#[test]
fn several_response_flags_read_as_envoy_writes_them() {
    let connect_retries = json!({"retry_policy": {"retry_on": "connect-failure", "num_retries": 2}});
    let per_try = json!({"retry_policy": {"retry_on": "5xx", "num_retries": 1, "per_try_timeout": "0.2s"}});
    let cases: [FlagCase; 6] = [
        ("refused endpoint, Istio's default retries", false, "/", Some(connect_retries.clone()), None, "URX,UF"),
        ("refused endpoint, no retries", false, "/", None, None, "UF"),
        ("delay, then a refused endpoint", false, "/", None, Some(fault_filter(None, true)), "DI,UF"),
        ("delay, retries, refused", false, "/", Some(connect_retries), Some(fault_filter(None, true)), "DI,URX,UF"),
        ("delay, then abort", true, "/", None, Some(fault_filter(Some(json!({"http_status": 503})), true)), "DI,FI"),
        ("per-try timeouts until the budget is spent", true, "/delay/1000", Some(per_try), None, "URX,UT"),
    ];
    for (case, reachable, path, route, fault, want) in cases {
        let collector = Collector::start();
        let app = App::start(Behavior::Echo);
        let upstream = if reachable { app.port } else { free_port() };
        let port = free_port();
        let mut l = outbound(port, OUTBOUND_SERVER);
        l.route_options = route;
        l.filters_after.extend(fault);
        l.access_log = true;
        let p = proxy(client_node(), l, vec![server_cluster(OUTBOUND_SERVER, upstream)], &collector);
        let envoy = Envoy::start(&p);
        let status = request(&format!("http://127.0.0.1:{port}{path}"), &[]).map(|r| r.0);
        assert!(status.is_some_and(|s| s >= 500), "{case}: {status:?}");
        let points = collector.wait_for_points(WAIT, |p| total(p, REQUESTS, |_| true) == 1);
        let got = series(&points, REQUESTS)[0].label("response_flags").to_string();
        let envoys = envoy.access_log();
        assert_eq!(envoys, [want], "{case}: Envoy's own %RESPONSE_FLAGS%");
        assert_eq!(got, want, "{case}: meshtel's response_flags");
    }
}

/// istio/proxy `testdata/stats/client_config_customized.yaml.tmpl`, the stats filter's
/// configuration of TestStatsPayload/Customized, as the Telemetry-shaped `metrics.overrides`
/// istiod's translation starts from (istio/istio `pilot/pkg/model/telemetry.go`,
/// `generateStatsConfig`: `disabled` is `drop`, UPSERTs are `dimensions`, REMOVEs are
/// `tags_to_remove`), entry by entry and in its order. Two entries differ, and say why.
fn customized_overrides() -> Value {
    let client = |metric: Option<&str>, tags: Value| {
        let mut m = json!({"mode": "CLIENT"});
        if let Some(metric) = metric {
            m["metric"] = json!(metric);
        }
        json!({"match": m, "tag_overrides": tags})
    };
    let upsert = |v: &str| json!({"value": v});
    let remove = json!({"operation": "REMOVE"});
    json!([
        {"match": {"metric": "REQUEST_DURATION", "mode": "CLIENT"}, "disabled": true},
        // The `custom` metric's definition and its entry: meshtel exports Istio's standard metrics only.
        client(None, json!({"response_flags": remove, "source_principal": remove})),
        client(Some("REQUEST_COUNT"), json!({
            "configurable_metric_a": upsert("'gateway'"),
            "source_workload": upsert("'_' + xds.node.metadata['WORKLOAD_NAME']"),
            "source_workload_namespace": upsert("'_' + xds.node.metadata['NAMESPACE']"),
            "source_app": upsert("'_' + xds.node.metadata['LABELS'].app"),
            "source_version": upsert("'_' + xds.node.metadata['LABELS'].app"),
            "request_protocol": upsert("request.protocol"),
            "destination_version": upsert("'_' + xds.node.metadata.LABELS.version"),
            "destination_service_namespace": upsert("'_' + filter_state.upstream_peer.service"),
            // Istio's `cannot _ parse | ...` fails to parse, and its stats filter then drops the
            // label (`tag_overrides_[metric][tag] = {}`); meshtel refuses an expression Envoy
            // cannot compile, so the configuration says REMOVE.
            "destination_app": remove,
            "destination_workload": upsert("cannot_evaluate"),
            "route_name": upsert("xds.route_name + \",\" + xds.cluster_name + \",\" + xds.cluster_metadata.filter_metadata.istio.services[0].name"),
            "grpc_response_status": remove,
        })),
        client(Some("REQUEST_SIZE"), json!({"configurable_metric_b": upsert("'test'"), "reporter": remove})),
        client(None, json!({"source_principal": upsert("'malicious'")})),
    ])
}

#[test]
fn sidecar_outbound_customized_matches_client_request_total_customized() {
    // TestStatsPayload/Customized: testdata/metric/client_request_total_customized.yaml.tmpl,
    // and `istio_request_duration_milliseconds` missing (a `MissingStat`).
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let port = free_port();
    let mut listener = outbound(port, OUTBOUND_SERVER);
    listener.route_name = Some("client_route".into());
    let mut p = proxy(client_node(), listener, vec![server_cluster(OUTBOUND_SERVER, app.port)], &collector);
    p.plugin_config =
        Some(plugin_config(json!({"metrics": {"export_interval_ms": 1000, "overrides": customized_overrides()}})));
    let _envoy = Envoy::start(&p);
    let point = run(&collector, port, &[(PEER_METADATA_REQUEST, &answer_as_server())], "/", 200);
    let mut want = client_request_total();
    for removed in ["destination_app", "grpc_response_status", "response_flags"] {
        want.remove(removed);
    }
    let route = format!("client_route,{OUTBOUND_SERVER},server");
    want.extend([
        ("source_workload", "_productpage-v1"),
        ("source_workload_namespace", "_default"),
        ("source_principal", "malicious"),
        ("source_app", "_productpage"),
        ("source_version", "_productpage"),
        ("destination_workload", "unknown"),
        ("destination_version", "_v1"),
        // Istio's test has `_ratings` from the upstream peer's filter state, which upstream
        // Envoy cannot create: the expression fails here, and a failed value is `unknown`
        // (`StreamOverrides::evaluate`).
        ("destination_service_namespace", "unknown"),
        ("request_protocol", "HTTP/1.1"),
        ("configurable_metric_a", "gateway"),
        ("route_name", route.as_str()),
    ]);
    let got: BTreeMap<&str, &str> = point.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(got, want, "client_request_total_customized.yaml.tmpl");
    assert_eq!(point.value, COUNT);
    let points = collector.wait_for_points(WAIT, |p| !series(p, "istio_request_bytes").is_empty());
    assert!(series(&points, "istio_request_duration_milliseconds").is_empty(), "dropped");
    let bytes = series(&points, "istio_request_bytes");
    assert_eq!(bytes.len(), 1);
    assert_eq!(bytes[0].label("configurable_metric_b"), "test");
    assert_eq!(bytes[0].label("source_principal"), "malicious");
    assert!(!bytes[0].labels.contains_key("reporter") && !bytes[0].labels.contains_key("response_flags"));
    assert_eq!(bytes[0].labels.len(), 24, "two removed, one added");
    assert_eq!(series(&points, "istio_response_bytes")[0].labels.len(), 24, "the all-metrics entries only");
}

#[test]
fn an_override_labels_the_side_and_metrics_it_matches_and_no_other() {
    // server_request_total.yaml.tmpl's labels as `overrideTags` (envoyproxy/envoy
    // contrib/istio/filters/http/istio_stats/source/istio_stats.cc) changes them: REMOVEs
    // dropped, UPSERTs of other names appended; the client side keeps
    // client_request_total.yaml.tmpl's; a disabled metric is exported by neither.
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let (inbound_port, outbound_port) = (free_port(), free_port());
    let tags = json!({
        "request_protocol": {"operation": "REMOVE"},
        "response_flags": {"operation": "REMOVE"},
        "request_host": {"operation": "UPSERT", "value": "request.host"},
        "destination_port": {"operation": "UPSERT", "value": "string(destination.port)"},
    });
    let overrides = json!([
        {"match": {"metric": "REQUEST_COUNT", "mode": "SERVER"}, "tag_overrides": tags},
        {"match": {"metric": "REQUEST_DURATION", "mode": "SERVER"}, "tag_overrides": tags},
        {"match": {"metric": "RESPONSE_SIZE"}, "disabled": true},
    ]);
    let mut clusters = vec![server_cluster("inbound|9080||", app.port), server_cluster(OUTBOUND_SERVER, app.port)];
    clusters.push(Cluster::to(COLLECTOR_CLUSTER, collector.port));
    let config = plugin_config(json!({"metrics": {"export_interval_ms": 1000, "overrides": overrides}}));
    let listeners = vec![inbound(inbound_port), outbound(outbound_port, OUTBOUND_SERVER)];
    let _envoy = Envoy::start(&Proxy::new(server_node(), listeners, clusters, Some(config)));
    for _ in 0..COUNT {
        let url = format!("http://127.0.0.1:{inbound_port}/");
        assert_eq!(request(&url, &[("x-envoy-peer-metadata", &from_client())]).map(|r| r.0), Some(200));
        let url = format!("http://127.0.0.1:{outbound_port}/");
        assert_eq!(request(&url, &[(PEER_METADATA_REQUEST, &answer_as_server())]).map(|r| r.0), Some(200));
    }
    let points = collector.wait_for_points(WAIT, |p| {
        total(p, REQUESTS, |_| true) == 2 * COUNT && series(p, "istio_request_bytes").len() == 2
    });
    let side = |metric: &str, reporter: &str| -> Point {
        let mut s: Vec<Point> =
            series(&points, metric).into_iter().filter(|p| p.label("reporter") == reporter).collect();
        assert_eq!(s.len(), 1, "{metric} {reporter}: {s:#?}");
        s.remove(0)
    };
    let host = format!("127.0.0.1:{inbound_port}");
    let port = inbound_port.to_string();
    let mut server = server_request_total();
    server.remove("request_protocol");
    server.remove("response_flags");
    server.extend([("request_host", host.as_str()), ("destination_port", port.as_str())]);
    for metric in [REQUESTS, "istio_request_duration_milliseconds"] {
        let got = side(metric, "destination");
        assert_eq!(got.value, COUNT, "{metric}");
        let labels: BTreeMap<&str, &str> = got.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(labels, server, "{metric} on the server side");
    }
    // The request size matches no override: Istio's labels; so does the client side.
    assert_eq!(side("istio_request_bytes", "destination").labels.len(), 25);
    for metric in [REQUESTS, "istio_request_duration_milliseconds", "istio_request_bytes"] {
        let got = side(metric, "source");
        assert_eq!(got.labels.len(), 25, "{metric} on the client side");
        assert_eq!(got.label("destination_workload"), client_request_total()["destination_workload"]);
    }
    assert!(series(&points, "istio_response_bytes").is_empty(), "disabled on both sides");
}
