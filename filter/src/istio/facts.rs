//! What the proxy says about a request's peers, read through the [`Host`] seam in the log phase.
//!
//! Each reader follows `populatePeerInfo` in istio/proxy
//! `source/extensions/filters/http/istio_stats/istio_stats.cc` (release-1.30; from 1.31 the same
//! code is envoyproxy/envoy `contrib/istio/filters/http/istio_stats`), reading only what the
//! reporter's rules use, and each connection's identity once.

use std::rc::Rc;

use crate::headers::HeaderMap;
use crate::host::Host;
use crate::istio::labels::{Destination, Reporter};
use crate::istio::node::{NodeInfo, ProxyKind};
use crate::istio::peer::{self, PeerInfo};
use crate::istio::xds_metadata::{self, ServiceInfo};

/// Envoy's `xds.listener_direction` value for inbound listeners.
pub const LISTENER_INBOUND: u64 = 1;
/// Envoy's `xds.listener_direction` value for outbound listeners.
pub const LISTENER_OUTBOUND: u64 = 2;

/// Filter-state key of Istio's downstream peer (`downstream_peer`, a `CelState` Struct).
pub const DOWNSTREAM_PEER: &str = "downstream_peer";
/// Filter-state key of Istio's upstream peer.
pub const UPSTREAM_PEER: &str = "upstream_peer";
/// Filter-state key Istio's metadata exchange sets when it found no peer (`peer_not_found`).
pub const PEER_NOT_FOUND: &str = "peer_not_found";
/// Filter-state key of the caller's identity on HBONE / ambient connections (a string).
pub const PEER_PRINCIPAL: &str = "io.istio.peer_principal";
/// Filter-state key of this proxy's identity on HBONE / ambient connections (a string).
pub const LOCAL_PRINCIPAL: &str = "io.istio.local_principal";

/// Decide who reports a request, in one place. Istio decides per listener: a waypoint's stats
/// filter is configured `SERVER_GATEWAY`; otherwise an INBOUND listener reports `destination` and
/// every other one (sidecar outbound, gateways) `source` (istio_stats.cc, `Config`). A Wasm
/// module sees the listener per request: Istio's cluster names decide for free (`inbound|` is
/// only routed to from inbound listeners), and only then is the listener asked.
pub fn reporter(node: &NodeInfo, cluster: Option<&str>, direction: impl FnOnce() -> Option<u64>) -> Reporter {
    match node.kind() {
        ProxyKind::Waypoint => Reporter::Waypoint,
        ProxyKind::Gateway => Reporter::Source,
        ProxyKind::Sidecar => match cluster {
            Some(c) if c.starts_with("inbound|") => Reporter::Destination,
            Some(c) if c.starts_with("outbound|") => Reporter::Source,
            _ => match direction() {
                Some(LISTENER_INBOUND) => Reporter::Destination,
                _ => Reporter::Source,
            },
        },
    }
}

/// Whether Istio falls back to the Host header for `destination_service`: istio/istio
/// `pilot/pkg/model/telemetry.go` (`disableHostHeaderFallback`) turns it off on sidecar
/// inbound and gateway listeners; waypoints serve as inbound.
pub fn host_header_fallback(node: &NodeInfo, reporter: Reporter) -> bool {
    reporter == Reporter::Source && node.kind() == ProxyKind::Sidecar
}

/// Whether `cluster` is one istiod builds for a service (`inbound|`, `outbound|`,
/// `inbound-vip|`: istio/istio `pilot/pkg/model/service.go`, `BuildSubsetKey`).
pub fn is_istio_service_cluster(cluster: &str) -> bool {
    ["inbound|", "outbound|", "inbound-vip|"].iter().any(|p| cluster.starts_with(p))
}

/// What a downstream connection says about the caller; the same for every request on it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DownstreamFacts {
    /// The caller's SPIFFE identity.
    pub peer_principal: Option<Rc<str>>,
    /// This proxy's SPIFFE identity.
    pub local_principal: Option<Rc<str>>,
    /// The caller from Istio's `downstream_peer` filter state.
    pub peer: Option<Rc<PeerInfo>>,
    /// `request.protocol`: a downstream connection has one codec.
    pub protocol: Option<Rc<str>>,
    /// `source.address`.
    pub client_address: Option<Rc<str>>,
}

/// Read the server side's identity facts: `io.istio.peer_principal` / `io.istio.local_principal`
/// filter state, and the TLS URI SANs only when both are empty ("This fallback should be deleted
/// once istio_authn is globally enabled"); then the `downstream_peer` filter state.
pub fn read_downstream(host: &dyn Host) -> DownstreamFacts {
    let mut peer_principal = host.property_non_empty(&["filter_state", PEER_PRINCIPAL]);
    let mut local_principal = host.property_non_empty(&["filter_state", LOCAL_PRINCIPAL]);
    // Certificates exist only on TLS connections: plaintext traffic skips two reads.
    if peer_principal.is_none() && local_principal.is_none() && host.property_bool(&["connection", "mtls"]) {
        peer_principal = host.property_non_empty(&["connection", "uri_san_peer_certificate"]);
        local_principal = host.property_non_empty(&["connection", "uri_san_local_certificate"]);
    }
    DownstreamFacts {
        peer_principal: peer_principal.map(Rc::from),
        local_principal: local_principal.map(Rc::from),
        peer: filter_state_peer(host, DOWNSTREAM_PEER).map(Rc::new),
        ..Default::default()
    }
}

/// Istio's peer filter state (`downstream_peer` / `upstream_peer`), in one property read.
pub fn filter_state_peer(host: &dyn Host, key: &str) -> Option<PeerInfo> {
    host.property(&["filter_state", key]).and_then(|bytes| peer::from_filter_state(&bytes))
}

/// What the client side knows of the upstream, read per request: the peer (Istio's
/// `upstream_peer` filter state, else the `x-envoy-peer-metadata` response header, else the
/// endpoint's `istio.workload` metadata) and the principals (the upstream certificate's SAN,
/// else the peer's identity; this proxy's own SAN on that connection).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamFacts {
    /// The upstream peer.
    pub peer: Option<PeerInfo>,
    /// Whether `peer` came from Istio's exchange (filter state or header), not endpoint metadata.
    pub exchanged: bool,
    /// The upstream's SPIFFE identity.
    pub peer_principal: Option<String>,
    /// This proxy's SPIFFE identity on the upstream connection.
    pub local_principal: Option<String>,
}

/// Read the upstream peer. `headers`: whether the `x-envoy-peer-metadata` fallback is allowed.
pub fn read_upstream_peer(host: &dyn Host, headers: bool) -> (Option<PeerInfo>, bool) {
    let exchanged = filter_state_peer(host, UPSTREAM_PEER).or_else(|| {
        headers
            .then(|| host.header(HeaderMap::Response, peer::PEER_METADATA_HEADER))
            .flatten()
            .and_then(|v| peer::from_peer_metadata_header(&v))
    });
    match exchanged {
        Some(p) => (Some(p), true),
        None => (None, false),
    }
}

/// Read what the client side needs (see [`UpstreamFacts`]).
pub fn read_upstream(host: &dyn Host, headers: bool) -> UpstreamFacts {
    let (peer, exchanged) = read_upstream_peer(host, headers);
    upstream_facts(host, peer, exchanged)
}

/// Read what the client side of a TCP connection needs: as [`read_upstream`], but the peer is
/// where Istio's TCP metadata exchange writes it, the *upstream* connection's filter state
/// (the stats filter reads `upstreamInfo()->upstreamFilterState()` first: istio_stats.cc,
/// `reportHelper`), read as `upstream_filter_state` (observed in Envoy 1.40).
pub fn read_upstream_connection(host: &dyn Host) -> UpstreamFacts {
    let peer = host
        .property(&["upstream_filter_state", UPSTREAM_PEER])
        .and_then(|bytes| peer::from_filter_state(&bytes))
        .or_else(|| filter_state_peer(host, UPSTREAM_PEER));
    let exchanged = peer.is_some();
    upstream_facts(host, peer, exchanged)
}

/// Whether Istio's metadata exchange is done with a connection (it found the peer or found
/// there is none): Istio's network stats filter labels a connection only then, or at its close
/// (istio_stats.cc, `peerInfoRead`). The server side waits for `downstream_peer`, the client
/// side for `upstream_peer`.
pub fn connection_peer_read(host: &dyn Host, reporter: Reporter) -> bool {
    let present = |path: &[&str]| host.property(path).is_some();
    if reporter.is_server() {
        present(&["filter_state", DOWNSTREAM_PEER]) || present(&["filter_state", PEER_NOT_FOUND])
    } else {
        present(&["upstream_filter_state", UPSTREAM_PEER])
            || present(&["upstream_filter_state", PEER_NOT_FOUND])
            || present(&["filter_state", UPSTREAM_PEER])
    }
}

/// The principals and the endpoint-metadata fallback of the client side, around `peer`.
fn upstream_facts(host: &dyn Host, mut peer: Option<PeerInfo>, exchanged: bool) -> UpstreamFacts {
    let peer_san = host.property_non_empty(&["upstream", "uri_san_peer_certificate"]);
    let local_principal =
        peer_san.as_ref().and_then(|_| host.property_non_empty(&["upstream", "uri_san_local_certificate"]));
    let peer_principal = peer_san.or_else(|| peer.as_ref().map(|p| p.identity.clone()).filter(|i| !i.is_empty()));
    if peer.is_none() {
        peer = host
            .property(&["xds", "upstream_host_metadata"])
            .and_then(|md| xds_metadata::host_workload(&md))
            .and_then(|w| peer::from_host_workload(&w));
    }
    UpstreamFacts { peer, exchanged, peer_principal, local_principal }
}

/// `destination_service`, `_name` and `_namespace` before the reporter's fallbacks, as
/// `populatePeerInfo` computes `service_host`, `service_host_name` and `service_namespace`:
/// the Host header as sent (port kept) where the fallback is on; route `block_all` /
/// `allow_any` and Istio's passthrough and blackhole clusters name only the service name; else
/// the cluster's `istio.services[0]` (`host`; `name`, or the host's first label; `namespace`).
pub fn destination(
    host_header: Option<&str>,
    route_name: impl FnOnce() -> Option<String>,
    cluster: Option<&str>,
    cluster_service: impl FnOnce() -> Option<ServiceInfo>,
) -> Destination {
    let mut d = Destination::default();
    if let Some(h) = host_header {
        d.host = h.to_string();
        d.name = h.to_string();
    }
    match route_name().as_deref() {
        Some("block_all") => d.name = "BlackHoleCluster".into(),
        Some("allow_any") => d.name = "PassthroughCluster".into(),
        _ => match cluster {
            Some(c) if xds_metadata::is_istio_catch_all(c) => d.name = c.to_string(),
            Some(_) => {
                if let Some(s) = cluster_service() {
                    if !s.host.is_empty() {
                        d.host = s.host;
                    }
                    if !s.namespace.is_empty() {
                        d.namespace = s.namespace;
                    }
                    d.name = if s.name.is_empty() {
                        d.host.split('.').next().unwrap_or_default().to_string()
                    } else {
                        s.name
                    };
                }
            }
            None => {}
        },
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::mock::MockHost;
    use crate::istio::peer::encode_peer_metadata;

    fn node(id: &str) -> NodeInfo {
        NodeInfo { id: id.into(), ..Default::default() }
    }

    #[test]
    fn reporter_is_decided_by_node_type_then_cluster_then_listener() {
        let sidecar = node("sidecar~1~a.ns~ns.svc.cluster.local");
        let never = || -> Option<u64> { panic!("the listener is not asked when the cluster decides") };
        assert_eq!(reporter(&node("router~1~gw.istio-system~x"), Some("inbound|80||"), never), Reporter::Source);
        assert_eq!(reporter(&node("waypoint~1~wp.ns~x"), Some("outbound|80||a"), never), Reporter::Waypoint);
        assert_eq!(reporter(&sidecar, Some("outbound|80||a"), never), Reporter::Source);
        assert_eq!(reporter(&sidecar, Some("inbound|80||"), never), Reporter::Destination);
        assert_eq!(reporter(&sidecar, Some("PassthroughCluster"), || Some(LISTENER_OUTBOUND)), Reporter::Source);
        assert_eq!(
            reporter(&sidecar, Some("InboundPassthroughClusterIpv4"), || Some(LISTENER_INBOUND)),
            Reporter::Destination
        );
        assert_eq!(reporter(&sidecar, None, || Some(LISTENER_INBOUND)), Reporter::Destination, "a local reply");
        assert_eq!(reporter(&sidecar, None, || None), Reporter::Source, "Istio: anything not INBOUND is a client");
    }

    #[test]
    fn knows_istios_service_clusters() {
        assert!(is_istio_service_cluster("inbound-vip|9080|http|r.ns.svc.cluster.local"));
        assert!(is_istio_service_cluster("outbound|80||a"));
        assert!(!is_istio_service_cluster("PassthroughCluster"));
    }

    #[test]
    fn host_header_fallback_only_on_sidecar_outbound() {
        let sidecar = node("sidecar~1~a.ns~ns.svc.cluster.local");
        assert!(host_header_fallback(&sidecar, Reporter::Source));
        assert!(!host_header_fallback(&sidecar, Reporter::Destination));
        assert!(!host_header_fallback(&node("router~1~gw~x"), Reporter::Source));
        assert!(!host_header_fallback(&node("waypoint~1~wp~x"), Reporter::Waypoint));
    }

    fn service(host: &str, name: &str, namespace: &str) -> Option<ServiceInfo> {
        Some(ServiceInfo { host: host.into(), name: name.into(), namespace: namespace.into() })
    }

    #[test]
    fn destination_follows_istio_precedence() {
        let none = || None::<ServiceInfo>;
        let d = |header, route: Option<&str>, cluster, svc: Option<ServiceInfo>| {
            destination(header, || route.map(str::to_string), cluster, || svc)
        };
        // Cluster metadata wins over the Host header.
        let got = d(Some("127.0.0.1:8080"), None, Some("outbound|80||s"), service("s.ns.svc.cluster.local", "s", "ns"));
        assert_eq!(
            (got.host.as_str(), got.name.as_str(), got.namespace.as_str()),
            ("s.ns.svc.cluster.local", "s", "ns")
        );
        // No metadata: the Host header as sent, port kept, for both host and name.
        let got = d(Some("127.0.0.1:8080"), None, Some("host_header"), None);
        assert_eq!(
            (got.host.as_str(), got.name.as_str(), got.namespace.as_str()),
            ("127.0.0.1:8080", "127.0.0.1:8080", "")
        );
        // Routes and catch-all clusters name the service only.
        let got = d(Some("example.com"), Some("allow_any"), Some("PassthroughCluster"), None);
        assert_eq!((got.host.as_str(), got.name.as_str()), ("example.com", "PassthroughCluster"));
        let got = d(Some("example.com"), Some("block_all"), None, None);
        assert_eq!((got.host.as_str(), got.name.as_str()), ("example.com", "BlackHoleCluster"));
        let got = d(None, None, Some("InboundPassthroughClusterIpv4"), None);
        assert_eq!((got.host.as_str(), got.name.as_str()), ("", "InboundPassthroughClusterIpv4"));
        // A service without a name is named by its host's first label.
        let got = d(None, None, Some("c"), service("reviews.shop.svc.cluster.local", "", ""));
        assert_eq!(got.name, "reviews");
        assert_eq!(destination(None, || None, None, none), Destination::default());
    }

    #[test]
    fn server_principals_prefer_istio_filter_state_over_certificates() {
        let host = MockHost::new()
            .with_property("filter_state.io.istio.peer_principal", "spiffe://td/ns/a/sa/client")
            .with_property("connection.mtls", [1])
            .with_property("connection.uri_san_peer_certificate", "spiffe://td/ns/tls/sa/x")
            .with_property("connection.uri_san_local_certificate", "spiffe://td/ns/tls/sa/y");
        let d = read_downstream(&host);
        assert_eq!(d.peer_principal.as_deref(), Some("spiffe://td/ns/a/sa/client"));
        assert_eq!(d.local_principal, None, "one filter-state principal is enough: no certificate fallback");
        assert_eq!(host.reads("connection.uri_san_peer_certificate"), 0);
    }

    #[test]
    fn server_principals_fall_back_to_tls_sans_when_both_are_empty() {
        let host = MockHost::new()
            .with_property("filter_state.io.istio.peer_principal", "")
            .with_property("connection.mtls", [1])
            .with_property("connection.uri_san_peer_certificate", "spiffe://td/ns/tls/sa/x")
            .with_property("connection.uri_san_local_certificate", "spiffe://td/ns/tls/sa/y");
        let d = read_downstream(&host);
        assert_eq!(d.peer_principal.as_deref(), Some("spiffe://td/ns/tls/sa/x"));
        assert_eq!(d.local_principal.as_deref(), Some("spiffe://td/ns/tls/sa/y"));
        let plaintext = MockHost::new().with_property("connection.uri_san_peer_certificate", "spiffe://td/ns/x/sa/x");
        assert_eq!(read_downstream(&plaintext).peer_principal, None, "no mTLS, no certificate read");
        assert_eq!(plaintext.reads("connection.uri_san_peer_certificate"), 0);
    }

    #[test]
    fn client_principal_is_the_upstream_san_then_the_peer_identity() {
        let peer = peer::encode_filter_state(&[("workload", "ratings-v1"), ("identity", "spiffe://td/ns/d/sa/r")], &[]);
        let host = MockHost::new().with_property("filter_state.upstream_peer", peer.clone());
        let u = read_upstream(&host, true);
        assert_eq!(u.peer_principal.as_deref(), Some("spiffe://td/ns/d/sa/r"));
        assert!(u.exchanged);
        let host = MockHost::new()
            .with_property("filter_state.upstream_peer", peer)
            .with_property("upstream.uri_san_peer_certificate", "spiffe://td/ns/d/sa/cert")
            .with_property("upstream.uri_san_local_certificate", "spiffe://td/ns/s/sa/me");
        let u = read_upstream(&host, true);
        assert_eq!(u.peer_principal.as_deref(), Some("spiffe://td/ns/d/sa/cert"));
        assert_eq!(u.local_principal.as_deref(), Some("spiffe://td/ns/s/sa/me"));
    }

    #[test]
    fn client_peer_falls_back_from_filter_state_to_header_to_endpoint_metadata() {
        let header = encode_peer_metadata(&[("WORKLOAD_NAME", "from-header")], &[]);
        let endpoint = xds_metadata::encode_metadata(vec![(
            "workload",
            prost_types::Value { kind: Some(prost_types::value::Kind::StringValue("from-endpoint;ns;c;r;k".into())) },
        )]);
        let base = || {
            MockHost::new()
                .with_header(HeaderMap::Response, peer::PEER_METADATA_HEADER, &header)
                .with_property("xds.upstream_host_metadata", endpoint.clone())
        };
        let fs = peer::encode_filter_state(&[("workload", "from-filter-state")], &[]);
        let u = read_upstream(&base().with_property("filter_state.upstream_peer", fs), true);
        assert_eq!(u.peer.unwrap().workload, "from-filter-state");
        let u = read_upstream(&base(), true);
        assert_eq!(u.peer.unwrap().workload, "from-header");
        let u = read_upstream(&base(), false);
        assert_eq!(u.peer.as_ref().unwrap().workload, "from-endpoint", "headers off: the endpoint metadata");
        assert!(!u.exchanged);
        assert_eq!(read_upstream(&MockHost::new(), true), UpstreamFacts::default());
    }
}
