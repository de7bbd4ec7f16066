//! Istio's standard metric labels, derived as Istio's stats filter derives them.

use crate::istio::node::{NodeInfo, LABEL_APP, LABEL_CANONICAL_NAME, LABEL_CANONICAL_REVISION, LABEL_VERSION};
use std::rc::Rc;

use crate::istio::peer::{spiffe_namespace, PeerInfo};

/// Value of a label nothing is known about.
pub const UNKNOWN: &str = "unknown";

/// Declares Istio's standard labels once: the fields of [`IstioLabels`], their names in
/// [`LABEL_NAMES`] and their order in [`IstioLabels::values`] come from this one list.
macro_rules! istio_labels {
    ($($field:ident),* $(,)?) => {
        /// Istio's standard label set of one request or connection, each label by its name
        /// (ztunnel's `CommonTrafficLabels`, istio/ztunnel `src/proxy/metrics.rs`, is the same idea).
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct IstioLabels<'a> {
            $(
                #[doc = concat!("`", stringify!($field), "`.")]
                pub $field: &'a str,
            )*
        }

        /// Istio's standard label names, in the order of [`IstioLabels::values`].
        pub const LABEL_NAMES: [&str; 25] = [$(stringify!($field)),*];

        impl<'a> IstioLabels<'a> {
            /// The values, in [`LABEL_NAMES`] order: how a series stores them.
            pub fn values(&self) -> [&'a str; 25] {
                [$(self.$field),*]
            }
        }
    };
}

istio_labels!(
    reporter,
    source_workload,
    source_workload_namespace,
    source_principal,
    source_app,
    source_version,
    source_canonical_service,
    source_canonical_revision,
    source_cluster,
    destination_workload,
    destination_workload_namespace,
    destination_principal,
    destination_app,
    destination_version,
    destination_service,
    destination_service_name,
    destination_service_namespace,
    destination_canonical_service,
    destination_canonical_revision,
    destination_cluster,
    request_protocol,
    response_code,
    grpc_response_status,
    response_flags,
    connection_security_policy,
);

/// Where `request_protocol` is in [`LABEL_NAMES`].
pub const REQUEST_PROTOCOL: usize = 20;
/// Where the labels TCP metrics do not have are in [`LABEL_NAMES`]: Istio's network stats
/// filter labels a connection with the others only (`response_code` and
/// `grpc_response_status` are pushed by its HTTP `log` alone).
pub const NOT_TCP_LABELS: [usize; 2] = [21, 22];
/// `request_protocol` of a TCP connection.
pub const TCP_PROTOCOL: &str = "tcp";

/// Whether the label values of a series are a TCP connection's.
pub fn is_tcp<S: AsRef<str>>(values: &[S]) -> bool {
    values.get(REQUEST_PROTOCOL).is_some_and(|v| v.as_ref() == TCP_PROTOCOL)
}

/// Which of Istio's reporters a request is counted by (`Reporter` in `istio_stats.cc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Reporter {
    /// The client side: sidecar outbound and gateways (`ClientSidecar`, label `source`).
    Source,
    /// The server side: sidecar inbound (`ServerSidecar`, label `destination`).
    #[default]
    Destination,
    /// An ambient waypoint (`ServerGateway`, label `waypoint`).
    Waypoint,
}

impl Reporter {
    /// The `reporter` label value.
    pub fn label(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
            Reporter::Waypoint => "waypoint",
        }
    }

    /// Whether the proxy serves the request (Istio's server-side rules for principals, the
    /// peer from `downstream_peer`, and a connection security policy).
    pub fn is_server(self) -> bool {
        self != Reporter::Source
    }
}

/// The destination service as the proxy names it, before Istio's per-reporter fallbacks.
/// Empty strings are not known.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Destination {
    /// `destination_service` (`service_host` in `istio_stats.cc`).
    pub host: String,
    /// `destination_service_name` (`service_host_name`).
    pub name: String,
    /// `destination_service_namespace` (`service_namespace`).
    pub namespace: String,
}

/// What one request contributes to its labels, beyond the proxy's own identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFacts {
    /// The reporter.
    pub reporter: Reporter,
    /// The peer: the downstream one on the server side, the upstream one (or the endpoint's
    /// `istio.workload` metadata) on the client side.
    pub peer: Option<Rc<PeerInfo>>,
    /// Waypoints only: the upstream peer, the destination side.
    pub upstream_peer: Option<Rc<PeerInfo>>,
    /// The peer's SPIFFE identity, by the reporter's rules (see [`crate::istio::facts`]).
    pub peer_principal: Option<Rc<str>>,
    /// This proxy's SPIFFE identity on the connection.
    pub local_principal: Option<Rc<str>>,
    /// The destination service (see [`crate::istio::xds_metadata::destination`]).
    pub service: Destination,
    /// Whether the request is gRPC by Istio's test (`Grpc::Common::isGrpcRequestHeaders`).
    pub grpc: bool,
    /// Whether these are a TCP connection's facts (`request_protocol` `tcp`, no response code).
    pub tcp: bool,
    /// HTTP status; 0 when none was sent.
    pub response_code: u32,
    /// gRPC status, for gRPC requests that got one.
    pub grpc_status: Option<u32>,
    /// Envoy's response flags, short form.
    pub response_flags: String,
}

fn known(s: &str) -> &str {
    known_or(s, UNKNOWN)
}

fn known_or<'a>(s: &'a str, fallback: &'a str) -> &'a str {
    if s.is_empty() {
        fallback
    } else {
        s
    }
}

/// A number written in decimal on the stack (status codes as label values).
struct Decimal {
    digits: [u8; 10],
    start: usize,
}

impl Decimal {
    fn new(mut n: u32) -> Self {
        let mut d = Decimal { digits: [b'0'; 10], start: 10 };
        loop {
            d.start -= 1;
            d.digits[d.start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                return d;
            }
        }
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.digits[self.start..]).unwrap_or_default()
    }
}

/// Whether a `content-type` is gRPC as Istio's stats filter tests it (Envoy's
/// `Grpc::Common::hasGrpcContentType`): exactly `application/grpc` or `application/grpc+...`;
/// `application/grpc-web` is not gRPC.
pub fn is_grpc_content_type(content_type: &[u8]) -> bool {
    match content_type.strip_prefix(b"application/grpc") {
        Some(rest) => rest.is_empty() || rest.first() == Some(&b'+'),
        None => false,
    }
}

/// Whether a `content-type` is gRPC-Web, which Envoy's `grpc_web` filter turns into gRPC.
pub fn is_grpc_web_content_type(content_type: &[u8]) -> bool {
    content_type.starts_with(b"application/grpc-web")
}

/// Istio's full standard label set of one request, as values in [`LABEL_NAMES`] order.
///
/// Each rule is that of `populatePeerInfo` and `log` in istio/proxy
/// `source/extensions/filters/http/istio_stats/istio_stats.cc` (release-1.30): the local side
/// straight from node metadata (empty stays empty), each missing peer value `unknown`, a
/// missing peer canonical revision `latest` (`unknown` for a waypoint's destination).
///
/// The values are lent to `visit`, borrowed from `node` and `f`: a request on a series already
/// known costs no allocation here.
pub fn with_label_values<R>(node: &NodeInfo, f: &RequestFacts, visit: impl FnOnce(&[&str; 25]) -> R) -> R {
    static NO_PEER: PeerInfo = PeerInfo::EMPTY;
    let peer = f.peer.as_deref().unwrap_or(&NO_PEER);
    let peer_san = f.peer_principal.as_deref().unwrap_or_default();
    let local_san = f.local_principal.as_deref().unwrap_or_default();
    // The namespace of the peer's SAN, else the peer's own.
    let peer_namespace = spiffe_namespace(peer_san).unwrap_or(&peer.namespace);
    let svc = &f.service;
    let (source, destination): (Side, Side);
    let (service_host, service_name, service_namespace);
    match f.reporter {
        Reporter::Destination => {
            source = peer_side(peer, peer_namespace, peer_san, "latest");
            destination = local_side(node, local_san);
            let canonical = node.label(LABEL_CANONICAL_NAME);
            service_host = known_or(&svc.host, canonical);
            service_name = known_or(&svc.name, canonical);
            service_namespace = node.namespace.as_str();
        }
        Reporter::Waypoint => {
            source = peer_side(peer, peer_namespace, peer_san, "latest");
            // The destination is the upstream peer alone: its own namespace and identity.
            let up = f.upstream_peer.as_deref().unwrap_or(&NO_PEER);
            destination = peer_side(up, &up.namespace, &up.identity, UNKNOWN);
            service_host = known(&svc.host);
            service_name = known(&svc.name);
            service_namespace = known(&svc.namespace);
        }
        Reporter::Source => {
            source = local_side(node, local_san);
            destination = peer_side(peer, peer_namespace, peer_san, "latest");
            service_host = known(&svc.host);
            service_name = known(&svc.name);
            service_namespace = known_or(&svc.namespace, known(peer_namespace));
        }
    }
    let policy = match (f.reporter.is_server(), !peer_san.is_empty() && !local_san.is_empty()) {
        (false, _) => UNKNOWN,
        (true, true) => "mutual_tls",
        (true, false) => "none",
    };
    let code = Decimal::new(f.response_code);
    let grpc_status = f.grpc_status.filter(|_| f.grpc).map(Decimal::new);
    let labels = IstioLabels {
        reporter: f.reporter.label(),
        source_workload: source.workload,
        source_workload_namespace: source.namespace,
        source_principal: source.principal,
        source_app: source.app,
        source_version: source.version,
        source_canonical_service: source.canonical_service,
        source_canonical_revision: source.canonical_revision,
        source_cluster: source.cluster,
        destination_workload: destination.workload,
        destination_workload_namespace: destination.namespace,
        destination_principal: destination.principal,
        destination_app: destination.app,
        destination_version: destination.version,
        destination_service: service_host,
        destination_service_name: service_name,
        destination_service_namespace: service_namespace,
        destination_canonical_service: destination.canonical_service,
        destination_canonical_revision: destination.canonical_revision,
        destination_cluster: destination.cluster,
        // Istio decides gRPC in its decodeHeaders: a request answered before it is `http`.
        request_protocol: match (f.tcp, f.grpc) {
            (true, _) => TCP_PROTOCOL,
            (false, true) => "grpc",
            (false, false) => "http",
        },
        response_code: if f.tcp { "" } else { code.as_str() },
        grpc_response_status: grpc_status.as_ref().filter(|_| !f.tcp).map(Decimal::as_str).unwrap_or_default(),
        response_flags: known_or(&f.response_flags, "-"),
        connection_security_policy: policy,
    };
    visit(&labels.values())
}

/// One side of a request (source or destination): the eight labels each side has.
struct Side<'a> {
    workload: &'a str,
    namespace: &'a str,
    principal: &'a str,
    app: &'a str,
    version: &'a str,
    canonical_service: &'a str,
    canonical_revision: &'a str,
    cluster: &'a str,
}

/// One side of a request (source or destination) as its peer describes it.
fn peer_side<'a>(p: &'a PeerInfo, namespace: &'a str, principal: &'a str, latest: &'a str) -> Side<'a> {
    Side {
        workload: known(&p.workload),
        namespace: known(namespace),
        principal: known(principal),
        app: known(&p.app),
        version: known(&p.version),
        canonical_service: known(&p.canonical_service),
        canonical_revision: known_or(&p.canonical_revision, latest),
        cluster: known(&p.cluster),
    }
}

/// This proxy's side, from its node metadata (empty stays empty).
fn local_side<'a>(node: &'a NodeInfo, principal: &'a str) -> Side<'a> {
    Side {
        workload: node.workload_name.as_str(),
        namespace: node.namespace.as_str(),
        principal: known(principal),
        app: node.label(LABEL_APP),
        version: node.label(LABEL_VERSION),
        canonical_service: node.label(LABEL_CANONICAL_NAME),
        canonical_revision: node.label(LABEL_CANONICAL_REVISION),
        cluster: node.cluster_id.as_str(),
    }
}

/// [`with_label_values`] as owned strings.
pub fn label_values(node: &NodeInfo, f: &RequestFacts) -> Vec<String> {
    with_label_values(node, f, |v| v.iter().map(|s| s.to_string()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::istio::golden;

    #[test]
    fn the_positions_named_here_are_those_labels() {
        assert_eq!(LABEL_NAMES[REQUEST_PROTOCOL], "request_protocol");
        assert_eq!(NOT_TCP_LABELS.map(|i| LABEL_NAMES[i]), ["response_code", "grpc_response_status"]);
        let l = IstioLabels { request_protocol: "tcp", connection_security_policy: "none", ..Default::default() };
        assert_eq!(l.values()[REQUEST_PROTOCOL], "tcp");
        assert_eq!(l.values()[24], "none", "the last of the list is the last field");
    }

    #[test]
    fn status_codes_are_written_in_decimal() {
        for n in [0, 7, 200, 403, 1000, u32::MAX] {
            assert_eq!(Decimal::new(n).as_str(), n.to_string());
        }
    }

    /// istio/proxy `testdata/server_node_metadata.json.tmpl` (the parts the labels read).
    fn ratings() -> NodeInfo {
        NodeInfo {
            id: "sidecar~10.52.0.34~ratings-v1-84975bc778-pxz2w.default~default.svc.cluster.local".into(),
            name: "ratings-v1-84975bc778-pxz2w".into(),
            namespace: "default".into(),
            workload_name: "ratings-v1".into(),
            labels: [
                ("app", "ratings"),
                ("version", "v1"),
                ("service.istio.io/canonical-name", "ratings"),
                ("service.istio.io/canonical-revision", "version-1"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            mesh_id: "proj-123".into(),
            cluster_id: "server-cluster".into(),
        }
    }

    /// The client of istio/proxy `testdata/client_node_metadata.json.tmpl`, as a peer.
    fn productpage() -> PeerInfo {
        PeerInfo {
            workload: "productpage-v1".into(),
            namespace: "default".into(),
            app: "productpage".into(),
            version: "v1".into(),
            canonical_service: "productpage-v1".into(),
            canonical_revision: "version-1".into(),
            cluster: "client-cluster".into(),
            identity: String::new(),
        }
    }

    fn labels(node: &NodeInfo, f: RequestFacts) -> std::collections::BTreeMap<&'static str, String> {
        LABEL_NAMES.iter().copied().zip(label_values(node, &f)).collect()
    }

    fn server_service() -> Destination {
        Destination { host: golden::SERVER_SERVICE.into(), name: "server".into(), namespace: "default".into() }
    }

    #[test]
    fn server_side_matches_istios_server_request_total_golden() {
        // istio/proxy testdata/metric/server_request_total.yaml.tmpl (TestStatsPayload/Default).
        let f = RequestFacts {
            reporter: Reporter::Destination,
            peer: Some(productpage().into()),
            service: server_service(),
            response_code: 200,
            response_flags: "-".into(),
            ..Default::default()
        };
        let l = labels(&ratings(), f);
        let want = golden::server_request_total();
        for (name, value) in want {
            assert_eq!(l[name], value, "{name}");
        }
        assert_eq!(l.len(), 25);
    }

    #[test]
    fn local_labels_are_taken_as_they_are() {
        // istio_stats.cc Context: LABELS["app"] / ["version"] and the canonical labels, no fallback.
        let mut node = ratings();
        node.labels.clear();
        node.labels.insert("app.kubernetes.io/name".into(), "k8s-name".into());
        let l = labels(&node, RequestFacts::default());
        for name in ["destination_app", "destination_version", "destination_canonical_service"] {
            assert_eq!(l[name], "", "{name}: empty, not unknown, and no app.kubernetes.io/name");
        }
        assert_eq!(l["destination_canonical_revision"], "");
        assert_eq!(l["destination_service"], "", "the inbound fallback is the (empty) local canonical name");
        assert_eq!(l["destination_service_namespace"], "default", "always the node's namespace");
        assert_eq!(l["source_canonical_revision"], "latest");
        assert_eq!(l["source_workload"], "unknown");
    }

    #[test]
    fn inbound_without_a_service_falls_back_to_the_local_canonical_name() {
        // istio/proxy testdata/metric/server_disable_host_header_fallback.yaml.tmpl.
        let f = RequestFacts {
            service: Destination { name: "InboundPassthroughClusterIpv4".into(), ..Default::default() },
            ..Default::default()
        };
        let l = labels(&ratings(), f);
        assert_eq!(l["destination_service"], "ratings");
        assert_eq!(l["destination_service_name"], "InboundPassthroughClusterIpv4");
        assert_eq!(labels(&ratings(), RequestFacts::default())["destination_service_name"], "ratings");
    }

    #[test]
    fn client_side_matches_istios_client_request_total_golden() {
        // istio/proxy testdata/metric/client_request_total.yaml.tmpl, seen from productpage.
        let client = NodeInfo {
            id: "sidecar~10.52.0.34~productpage-v1-84975bc778-pxz2w.default~default.svc.cluster.local".into(),
            namespace: "default".into(),
            workload_name: "productpage-v1".into(),
            labels: [
                ("app", "productpage"),
                ("version", "v1"),
                ("service.istio.io/canonical-name", "productpage-v1"),
                ("service.istio.io/canonical-revision", "version-1"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            cluster_id: "client-cluster".into(),
            ..Default::default()
        };
        let server = PeerInfo {
            workload: "ratings-v1".into(),
            namespace: "default".into(),
            app: "ratings".into(),
            version: "v1".into(),
            canonical_service: "ratings".into(),
            canonical_revision: "version-1".into(),
            cluster: "server-cluster".into(),
            identity: String::new(),
        };
        let f = RequestFacts {
            reporter: Reporter::Source,
            peer: Some(server.into()),
            service: server_service(),
            grpc: true,
            grpc_status: Some(7),
            response_code: 200,
            response_flags: "-".into(),
            ..Default::default()
        };
        let l = labels(&client, f);
        // The golden file's request, answered over gRPC with status 7.
        let want = golden::with(
            golden::client_request_total(),
            &[("request_protocol", "grpc"), ("grpc_response_status", "7")],
        );
        for (name, value) in want {
            assert_eq!(l[name], value, "{name}");
        }
        assert_eq!(l.len(), 25);
    }

    #[test]
    fn client_service_namespace_falls_back_to_the_peer() {
        let f = RequestFacts {
            reporter: Reporter::Source,
            peer: Some(PeerInfo { namespace: "peer-ns".into(), ..Default::default() }.into()),
            service: Destination { host: "127.0.0.1:8080".into(), name: "127.0.0.1:8080".into(), ..Default::default() },
            ..Default::default()
        };
        let l = labels(&ratings(), f);
        assert_eq!(l["destination_service_namespace"], "peer-ns");
        assert_eq!(l["destination_service"], "127.0.0.1:8080");
        assert_eq!(l["destination_canonical_revision"], "latest");
        let l = labels(&ratings(), RequestFacts { reporter: Reporter::Source, ..Default::default() });
        assert_eq!(
            (l["destination_service"].as_str(), l["destination_service_namespace"].as_str()),
            ("unknown", "unknown")
        );
    }

    #[test]
    fn principal_namespace_wins_and_mutual_tls_needs_both_principals() {
        let f = RequestFacts {
            peer: Some(productpage().into()),
            peer_principal: Some("spiffe://cluster.local/ns/other/sa/client".into()),
            local_principal: Some("spiffe://cluster.local/ns/default/sa/server".into()),
            ..Default::default()
        };
        let l = labels(&ratings(), f.clone());
        assert_eq!(l["source_workload_namespace"], "other");
        assert_eq!(l["source_principal"], "spiffe://cluster.local/ns/other/sa/client");
        assert_eq!(l["destination_principal"], "spiffe://cluster.local/ns/default/sa/server");
        assert_eq!(l["connection_security_policy"], "mutual_tls");
        let l = labels(&ratings(), RequestFacts { local_principal: None, ..f });
        assert_eq!(l["connection_security_policy"], "none");
    }

    #[test]
    fn waypoint_matches_istios_server_waypoint_proxy_golden() {
        // istio/proxy testdata/metric/server_waypoint_proxy_request_total.yaml.tmpl: the node
        // (testdata/server_waypoint_proxy_node_metadata.json.tmpl) has no labels and is not used.
        let node = NodeInfo {
            id: "waypoint~10.0.0.9~waypoint-5c8.default~default.svc.cluster.local".into(),
            namespace: "default".into(),
            cluster_id: "server-cluster".into(),
            mesh_id: "proj-123".into(),
            ..Default::default()
        };
        let upstream = PeerInfo {
            workload: "ratings-v1".into(),
            namespace: "default".into(),
            app: "ratings".into(),
            version: "version-1".into(),
            canonical_service: "ratings".into(),
            canonical_revision: "version-1".into(),
            cluster: "ratings-cluster".into(),
            identity: "spiffe://cluster.global/ns/default/sa/ratings".into(),
        };
        let f = RequestFacts {
            reporter: Reporter::Waypoint,
            peer: Some(productpage().into()),
            upstream_peer: Some(upstream.into()),
            service: server_service(),
            response_code: 200,
            ..Default::default()
        };
        let l = labels(&node, f);
        assert_eq!(l["reporter"], "waypoint");
        assert_eq!(l["source_workload"], "productpage-v1");
        assert_eq!(l["destination_principal"], "spiffe://cluster.global/ns/default/sa/ratings");
        assert_eq!(
            (l["destination_version"].as_str(), l["destination_cluster"].as_str()),
            ("version-1", "ratings-cluster")
        );
        assert_eq!(l["destination_service_name"], "server");
        assert_eq!(l["connection_security_policy"], "none");
        let l = labels(&node, RequestFacts { reporter: Reporter::Waypoint, ..Default::default() });
        assert_eq!(l["destination_canonical_revision"], "unknown", "unknown, not latest, at a waypoint");
        assert_eq!(l["source_canonical_revision"], "latest");
        assert_eq!(l["destination_service_namespace"], "unknown");
    }

    #[test]
    fn grpc_is_tested_as_envoy_tests_it() {
        assert!(is_grpc_content_type(b"application/grpc"));
        assert!(is_grpc_content_type(b"application/grpc+proto"));
        assert!(!is_grpc_content_type(b"application/grpc-web"));
        assert!(!is_grpc_content_type(b"application/grpcx"));
        assert!(!is_grpc_content_type(b"text/plain"));
        assert!(is_grpc_web_content_type(b"application/grpc-web+proto"));
        let l = labels(&ratings(), RequestFacts { grpc_status: Some(3), ..Default::default() });
        assert_eq!((l["request_protocol"].as_str(), l["grpc_response_status"].as_str()), ("http", ""));
        let l = labels(&ratings(), RequestFacts { grpc: true, ..Default::default() });
        assert_eq!(l["grpc_response_status"], "", "gRPC without a status");
    }
}
