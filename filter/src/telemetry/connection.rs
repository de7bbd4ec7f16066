//! One TCP connection's path through meshtel, over the [`Host`] seam: the network filter that
//! the same module becomes under the root id `meshtel-tcp` (an Istio `WasmPlugin` with
//! `type: NETWORK` and `pluginName: meshtel-tcp`).
//!
//! The rules are those of Istio's network stats filter (istio/proxy
//! `source/extensions/filters/http/istio_stats/istio_stats.cc`, `reportHelper`, release-1.30):
//! - the bytes are the downstream connection's, the same on every reporter: `received` was read
//!   from the downstream peer, `sent` written to it;
//! - nothing is counted until Istio's metadata exchange is done with the connection
//!   ([`facts::connection_peer_read`]) or it closes. Then its labels are fixed for its life,
//!   `istio_tcp_connections_opened_total` counts it, and its bytes so far are counted;
//! - after that, its bytes are counted on an interval while it is open, and at its close, where
//!   `istio_tcp_connections_closed_total` counts it.
//!
//! Two differences, both for connections Istio's exchange never finishes:
//! - meshtel waits for the peer at most [`PEER_WAIT_NS`] (Istio's default reporting interval)
//!   and then labels the connection with what it knows. Istio would wait until the close, but
//!   in a mesh its exchange finishes with the first bytes.
//! - Istio runs its network stats filter only on chains that end in `tcp_proxy`, while it puts a
//!   NETWORK WasmPlugin in front of HTTP chains too (istio/istio
//!   `pilot/pkg/networking/core/listener_inbound.go`, `buildInboundNetworkFiltersForHTTP`).
//!   meshtel counts a connection only if Envoy proxies it as a whole: its stream info then names
//!   an upstream cluster (`xds.cluster_name`). An HTTP connection's never does; its requests
//!   each have one (observed in Envoy 1.40).

use crate::host::Host;
use crate::istio::facts;
use crate::istio::labels::{label_values, Reporter, RequestFacts};
use crate::istio::response_flags;
use crate::metrics::aggregate::TcpDelta;
use crate::telemetry::tcp::{ConnectionLabels, Labels, TcpConnection, PEER_WAIT_NS};
use crate::telemetry::Telemetry;

impl Telemetry {
    /// Count what `c` moved since its last report: on an interval while it is open, and once
    /// at its close (`end`). `host` must speak for the connection (the glue makes it the
    /// effective context). Host calls are made only until the connection is labelled.
    pub fn report_connection(&mut self, host: &dyn Host, c: &mut TcpConnection, end: bool) {
        if c.closed || c.labels == Labels::NotProxied || !self.metrics_enabled() {
            return;
        }
        let mut opened = 0;
        if c.labels == Labels::Waiting {
            let Some(cluster) = host.property_string(&["xds", "cluster_name"]) else {
                // tcp_proxy picks its cluster before any byte moves: bytes without one are an
                // HTTP connection's.
                if end || c.received > 0 || c.sent > 0 {
                    c.labels = Labels::NotProxied;
                    c.closed = end;
                }
                return;
            };
            let reporter =
                facts::reporter(self.node(), Some(&cluster), || host.property_u64(&["xds", "listener_direction"]));
            let waited = host.now_ns().saturating_sub(c.opened_ns) >= PEER_WAIT_NS;
            if !(end || waited || facts::connection_peer_read(host, reporter)) {
                return;
            }
            c.labels = Labels::Counted(self.connection_labels(host, reporter, &cluster));
            opened = 1;
        }
        let Labels::Counted(labels) = &c.labels else { return };
        let delta = TcpDelta {
            opened,
            closed: u64::from(end),
            sent_bytes: std::mem::take(&mut c.sent),
            received_bytes: std::mem::take(&mut c.received),
        };
        c.closed = end;
        self.record_connection(labels, &delta);
    }

    /// Istio's labels of a connection, by the reporter's rules (see [`crate::istio::facts`]):
    /// read once, when it is first counted. The response flags are those of that moment, as
    /// Istio's (it builds a connection's tags once).
    fn connection_labels(&mut self, host: &dyn Host, reporter: Reporter, cluster: &str) -> Box<ConnectionLabels> {
        let mut f = RequestFacts { reporter, tcp: true, ..Default::default() };
        if reporter.is_server() {
            let down = facts::read_downstream(host);
            f.peer = down.peer;
            f.peer_principal = down.peer_principal;
            f.local_principal = down.local_principal;
            if reporter == Reporter::Waypoint {
                // Istio's waypoint exchange puts both peers in the downstream filter state.
                f.upstream_peer = facts::filter_state_peer(host, facts::UPSTREAM_PEER).map(Into::into);
            }
        } else {
            let up = facts::read_upstream_connection(host);
            f.peer = up.peer.map(Into::into);
            f.peer_principal = up.peer_principal.map(Into::into);
            f.local_principal = up.local_principal.map(Into::into);
        }
        f.response_flags = response_flags::short_string(host.property_u64(&["response", "flags"]).unwrap_or(0));
        f.service = facts::destination(
            None,
            || None,
            Some(cluster),
            || self.cluster_service(cluster, || host.property(&["xds", "cluster_metadata"])),
        );
        let standard = label_values(self.node(), &f).into();
        let upserts = self.queries().upsert_values_alone(host);
        Box::new(ConnectionLabels { standard, upserts, server: reporter.is_server() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::host::mock::MockHost;
    use crate::istio::labels::LABEL_NAMES;
    use crate::istio::node::NodeInfo;
    use crate::istio::peer::encode_filter_state;
    use crate::metrics::shared::MemoryStore;
    use std::collections::BTreeMap;

    fn node(id: &str, workload: &str, app: &str, canonical: &str, cluster: &str) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            namespace: "default".into(),
            workload_name: workload.into(),
            labels: [
                ("app", app),
                ("version", "v1"),
                ("service.istio.io/canonical-name", canonical),
                ("service.istio.io/canonical-revision", "version-1"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            cluster_id: cluster.into(),
            ..Default::default()
        }
    }

    // The node metadata of istio/proxy `testdata/client_node_metadata.json.tmpl` and
    // `testdata/server_node_metadata.json.tmpl`, as `TestTCPMetadataExchange` runs them.
    fn client() -> NodeInfo {
        node(
            "sidecar~10.0.0.1~productpage-v1-x.default~default.svc.cluster.local",
            "productpage-v1",
            "productpage",
            "productpage-v1",
            "client-cluster",
        )
    }

    fn server() -> NodeInfo {
        node(
            "sidecar~10.0.0.2~ratings-v1-x.default~default.svc.cluster.local",
            "ratings-v1",
            "ratings",
            "ratings",
            "server-cluster",
        )
    }

    fn telemetry(node: NodeInfo) -> Telemetry {
        let json = r#"{"collector":{"cluster":"outbound|4318||otel.obs.svc.cluster.local"}}"#;
        let mut t = Telemetry::new(config::parse(json.as_bytes()).unwrap(), node, 7, "tcp", 0);
        t.init_shared(&MemoryStore::default());
        t
    }

    /// Cluster metadata naming the Istio service `host` (`istio.services[0]`).
    fn services(host: &str, name: &str) -> Vec<u8> {
        use prost_types::{value::Kind, ListValue, Struct, Value};
        let text = |s: &str| Value { kind: Some(Kind::StringValue(s.into())) };
        let mut service = Struct::default();
        for (k, v) in [("host", host), ("name", name), ("namespace", "default")] {
            service.fields.insert(k.into(), text(v));
        }
        let list = ListValue { values: vec![Value { kind: Some(Kind::StructValue(service)) }] };
        crate::istio::xds_metadata::encode_metadata(vec![("services", Value { kind: Some(Kind::ListValue(list)) })])
    }

    /// The peer Istio's exchange stores for the other proxy of `TestTCPMetadataExchange`.
    fn peer_of(workload: &str, app: &str, canonical: &str, cluster: &str) -> Vec<u8> {
        encode_filter_state(
            &[
                ("workload", workload),
                ("namespace", "default"),
                ("app", app),
                ("version", "v1"),
                ("service", canonical),
                ("revision", "version-1"),
                ("cluster", cluster),
            ],
            &[],
        )
    }

    /// What one recorded TCP series says: its labels by name and its four counters.
    fn recorded(t: &Telemetry) -> Vec<(BTreeMap<&'static str, String>, [u64; 4])> {
        t.recorded_tcp_series()
            .into_iter()
            .map(|(values, counts)| {
                let labels = LABEL_NAMES.iter().copied().zip(values).filter(|(_, v)| !v.is_empty()).collect();
                (labels, counts)
            })
            .collect()
    }

    /// The labels both proxies of `TestTCPMetadataExchange` report (productpage-v1 calls
    /// ratings-v1), with the side's own values in `side`.
    fn exchange_golden(side: &[(&'static str, &str)]) -> BTreeMap<&'static str, String> {
        let common = [
            ("source_workload", "productpage-v1"),
            ("source_canonical_service", "productpage-v1"),
            ("source_canonical_revision", "version-1"),
            ("source_workload_namespace", "default"),
            ("source_principal", "spiffe://cluster.local/ns/default/sa/client"),
            ("source_app", "productpage"),
            ("source_version", "v1"),
            ("source_cluster", "client-cluster"),
            ("destination_workload", "ratings-v1"),
            ("destination_workload_namespace", "default"),
            ("destination_principal", "spiffe://cluster.local/ns/default/sa/server"),
            ("destination_app", "ratings"),
            ("destination_version", "v1"),
            ("destination_canonical_service", "ratings"),
            ("destination_canonical_revision", "version-1"),
            ("destination_service_namespace", "default"),
            ("destination_cluster", "server-cluster"),
            ("request_protocol", "tcp"),
            ("response_flags", "-"),
        ];
        common.iter().chain(side).map(|(k, v)| (*k, v.to_string())).collect()
    }

    /// Ten connections as `TestTCPMetadataExchange` makes them: 6 bytes in, 12 out each.
    fn ten_connections(t: &mut Telemetry, host: &MockHost) {
        for _ in 0..10 {
            let mut c = TcpConnection::new(host.now_ns());
            t.report_connection(host, &mut c, false);
            c.received(6);
            c.sent(12);
            t.report_connection(host, &mut c, false);
            t.report_connection(host, &mut c, true);
            assert!(c.is_closed());
        }
    }

    /// `metrics.overrides` on TCP metrics: the UPSERT is evaluated once per connection, a
    /// disabled metric is not counted, and each metric keeps its own labels and counts.
    #[test]
    fn tcp_overrides_label_each_metric_as_its_override_says() {
        let json = r#"{"collector":{"cluster":"outbound|4318||otel.obs.svc.cluster.local"},"metrics":{"overrides":[
            {"match":{"metric":"TCP_SENT_BYTES","mode":"CLIENT"},"tag_overrides":{"sni":{"value":"connection.requested_server_name"}}},
            {"match":{"metric":"TCP_OPENED_CONNECTIONS"},"disabled":true}]}}"#;
        let mut t = Telemetry::new(config::parse(json.as_bytes()).unwrap(), client(), 7, "tcp", 0);
        t.init_shared(&MemoryStore::default());
        let host = MockHost::new()
            .with_property("xds.cluster_name", "outbound|9080||server.default.svc.cluster.local")
            .with_expression("string(connection.requested_server_name)", Some(b"ratings.example".to_vec()))
            .with_u64("response.flags", 0);
        assert_eq!(t.compile_user_expressions(&host), crate::prefetch::Compiled::Done);
        ten_connections(&mut t, &host);
        assert_eq!(host.counts().evaluations, 10, "once per connection");
        let series: Vec<_> = t
            .recorded_tcp_series()
            .into_iter()
            .map(|(values, counts)| (crate::metrics::overrides::attribute_map(&values), counts))
            .collect();
        assert_eq!(series.len(), 2, "{series:?}");
        let sent = series.iter().find(|(l, _)| l.contains_key("sni")).expect("the sent bytes' series");
        assert_eq!(sent.0["sni"], "ratings.example");
        assert_eq!(sent.1, [0, 0, 120, 0], "sent bytes only");
        let rest = series.iter().find(|(l, _)| !l.contains_key("sni")).expect("the others' series");
        assert_eq!(rest.0.len(), 23, "Istio's TCP labels");
        assert_eq!(rest.1, [0, 10, 0, 60], "closed and received; opened is disabled");
    }

    #[test]
    fn the_client_side_reproduces_istios_tcp_golden_files() {
        // istio/proxy testdata/metric/tcp_client_{connection_open,connection_close,sent_bytes,
        // received_bytes}.yaml.tmpl (`TestTCPMetadataExchange`, in-band exchange).
        let host = MockHost::new()
            .with_property("xds.cluster_name", "outbound|9080||server.default.svc.cluster.local")
            .with_property("xds.cluster_metadata", services("server.default.svc.cluster.local", "server"))
            .with_property(
                "upstream_filter_state.upstream_peer",
                peer_of("ratings-v1", "ratings", "ratings", "server-cluster"),
            )
            .with_property("upstream.uri_san_peer_certificate", "spiffe://cluster.local/ns/default/sa/server")
            .with_property("upstream.uri_san_local_certificate", "spiffe://cluster.local/ns/default/sa/client")
            .with_u64("response.flags", 0);
        let mut t = telemetry(client());
        ten_connections(&mut t, &host);
        let series = recorded(&t);
        assert_eq!(series.len(), 1);
        assert_eq!(series[0].1, [10, 10, 120, 60], "opened, closed, sent, received");
        let golden = exchange_golden(&[
            ("reporter", "source"),
            ("destination_service", "server.default.svc.cluster.local"),
            ("destination_service_name", "server"),
            ("connection_security_policy", "unknown"),
        ]);
        assert_eq!(series[0].0, golden);
    }

    #[test]
    fn the_server_side_reproduces_istios_tcp_golden_files() {
        // istio/proxy testdata/metric/tcp_server_{connection_open,connection_close,sent_bytes,
        // received_bytes}.yaml.tmpl.
        let host = MockHost::new()
            .with_property("xds.cluster_name", "inbound|9080||")
            .with_property(
                "filter_state.downstream_peer",
                peer_of("productpage-v1", "productpage", "productpage-v1", "client-cluster"),
            )
            .with_property("connection.mtls", vec![1])
            .with_property("connection.uri_san_peer_certificate", "spiffe://cluster.local/ns/default/sa/client")
            .with_property("connection.uri_san_local_certificate", "spiffe://cluster.local/ns/default/sa/server")
            .with_u64("response.flags", 0);
        let mut t = telemetry(server());
        ten_connections(&mut t, &host);
        let series = recorded(&t);
        assert_eq!(series.len(), 1);
        assert_eq!(series[0].1, [10, 10, 120, 60]);
        let golden = exchange_golden(&[
            ("reporter", "destination"),
            // The inbound cluster has no service metadata here: the local canonical name.
            ("destination_service", "ratings"),
            ("destination_service_name", "ratings"),
            ("connection_security_policy", "mutual_tls"),
        ]);
        assert_eq!(series[0].0, golden);
    }

    #[test]
    fn without_the_exchange_the_server_side_counts_the_peer_from_its_certificate() {
        // istio/proxy testdata/metric/tcp_server_connection_open_without_mx.yaml.tmpl: the
        // namespace from the SAN, the rest unknown, canonical revision `latest`.
        let host = MockHost::new()
            .with_property("xds.cluster_name", "inbound|9080||")
            .with_property("filter_state.peer_not_found", vec![1])
            .with_property("connection.mtls", vec![1])
            .with_property("connection.uri_san_peer_certificate", "spiffe://cluster.local/ns/default/sa/client")
            .with_property("connection.uri_san_local_certificate", "spiffe://cluster.local/ns/default/sa/server");
        let mut t = telemetry(server());
        ten_connections(&mut t, &host);
        let (labels, counts) = &recorded(&t)[0];
        assert_eq!(counts[0], 10);
        for (k, v) in [
            ("source_workload", "unknown"),
            ("source_canonical_service", "unknown"),
            ("source_canonical_revision", "latest"),
            ("source_workload_namespace", "default"),
            ("source_principal", "spiffe://cluster.local/ns/default/sa/client"),
            ("source_app", "unknown"),
            ("source_version", "unknown"),
            ("source_cluster", "unknown"),
            ("connection_security_policy", "mutual_tls"),
        ] {
            assert_eq!(labels.get(k).map(String::as_str), Some(v), "{k}");
        }
    }

    #[test]
    fn nothing_counts_until_the_exchange_is_done_then_the_labels_stay() {
        let mut host = MockHost::new().with_property("xds.cluster_name", "inbound|9080||");
        let mut t = telemetry(server());
        let mut c = TcpConnection::new(0);
        c.received(100);
        t.report_connection(&host, &mut c, false);
        assert!(!c.is_counted() && recorded(&t).is_empty(), "waiting for the peer");
        host = host
            .with_property(
                "filter_state.downstream_peer",
                peer_of("productpage-v1", "productpage", "productpage-v1", "c"),
            )
            .with_u64("response.flags", 0);
        c.sent(7);
        t.report_connection(&host, &mut c, false);
        assert_eq!(recorded(&t)[0].1, [1, 0, 7, 100], "opened, and the bytes so far");
        // Flags set later (Istio samples them once) and a changed peer change nothing.
        host = host.with_u64("response.flags", 0x20).with_property("filter_state.downstream_peer", vec![]);
        c.received(5);
        t.report_connection(&host, &mut c, true);
        let series = recorded(&t);
        assert_eq!((series.len(), series[0].1), (1, [1, 1, 7, 105]));
        assert_eq!(series[0].0["response_flags"], "-");
    }

    #[test]
    fn a_connection_whose_exchange_never_finishes_is_labelled_after_the_wait() {
        let host = MockHost::new().with_property("xds.cluster_name", "inbound|9080||").at(PEER_WAIT_NS - 1);
        let mut t = telemetry(server());
        let mut c = TcpConnection::new(0);
        c.received(3);
        t.report_connection(&host, &mut c, false);
        assert!(!c.is_counted());
        t.report_connection(&host.at(PEER_WAIT_NS), &mut c, false);
        assert_eq!(recorded(&t)[0].1, [1, 0, 0, 3]);
        assert_eq!(recorded(&t)[0].0["source_workload"], "unknown");
    }

    #[test]
    fn a_refused_upstream_is_counted_at_close_with_its_flags() {
        let host = MockHost::new()
            .with_property("xds.cluster_name", "outbound|5432||db.default.svc.cluster.local")
            .with_u64("response.flags", 0x20);
        let mut t = telemetry(client());
        let mut c = TcpConnection::new(0);
        t.report_connection(&host, &mut c, true);
        let (labels, counts) = &recorded(&t)[0];
        assert_eq!(*counts, [1, 1, 0, 0]);
        assert_eq!(labels["response_flags"], "UF");
        assert_eq!(labels["destination_workload"], "unknown");
    }

    #[test]
    fn an_http_connection_is_never_counted() {
        // The network filter in front of an HTTP connection manager: no cluster, ever.
        let host = MockHost::new().with_u64("xds.listener_direction", 1);
        let mut t = telemetry(server());
        let mut c = TcpConnection::new(0);
        t.report_connection(&host, &mut c, false);
        c.received(500);
        c.sent(900);
        t.report_connection(&host, &mut c, false);
        t.report_connection(&host, &mut c, true);
        assert!(recorded(&t).is_empty());
        assert_eq!(host.reads("xds.cluster_name"), 2, "and it stops asking");
        let mut idle = TcpConnection::new(0);
        t.report_connection(&host, &mut idle, true);
        assert!(recorded(&t).is_empty(), "not at its close either");
    }

    #[test]
    fn a_waypoint_reports_both_peers_from_the_downstream_filter_state() {
        let waypoint = NodeInfo {
            id: "waypoint~10.0.0.3~waypoint-x.default~default.svc.cluster.local".into(),
            ..Default::default()
        };
        let host = MockHost::new()
            .with_property("xds.cluster_name", "inbound-vip|9080|tcp|ratings.default.svc.cluster.local")
            .with_property(
                "filter_state.downstream_peer",
                peer_of("productpage-v1", "productpage", "productpage-v1", "c1"),
            )
            .with_property("filter_state.upstream_peer", peer_of("ratings-v1", "ratings", "ratings", "c2"))
            .with_property("filter_state.io.istio.peer_principal", "spiffe://td/ns/default/sa/productpage")
            .with_property("filter_state.io.istio.local_principal", "spiffe://td/ns/default/sa/waypoint");
        let mut t = telemetry(waypoint);
        let mut c = TcpConnection::new(0);
        c.received(1);
        t.report_connection(&host, &mut c, false);
        let (labels, _) = &recorded(&t)[0];
        assert_eq!(
            (labels["reporter"].as_str(), labels["source_workload"].as_str(), labels["destination_workload"].as_str()),
            ("waypoint", "productpage-v1", "ratings-v1")
        );
        assert_eq!(labels["connection_security_policy"], "mutual_tls");
    }
}
