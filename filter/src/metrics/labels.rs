//! Istio's standard metric labels, derived as Istio's stats filter derives them.

use crate::node::NodeInfo;
use crate::peer::{spiffe_namespace, PeerInfo};
use crate::xds_metadata::ServiceInfo;

/// Value of a label nothing is known about.
pub const UNKNOWN: &str = "unknown";

/// Istio's standard label names, in the order [`IstioLabels::values`] returns them.
pub const LABEL_NAMES: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

/// Which side of the request reports: the server (`destination`) or the client (`source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// Sidecar outbound and gateways.
    Source,
    /// Sidecar inbound.
    Destination,
}

/// One workload side of the label set.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Side {
    workload: String,
    namespace: String,
    principal: String,
    app: String,
    version: String,
    canonical_service: String,
    canonical_revision: String,
    cluster: String,
}

fn owned_or_unknown(s: String) -> String {
    if s.is_empty() {
        UNKNOWN.to_string()
    } else {
        s
    }
}

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        UNKNOWN.to_string()
    } else {
        s.to_string()
    }
}

impl Side {
    fn local(node: &NodeInfo, principal: Option<&str>) -> Self {
        Side {
            workload: or_unknown(&node.workload_name),
            namespace: or_unknown(principal.and_then(spiffe_namespace).unwrap_or(&node.namespace)),
            principal: or_unknown(principal.unwrap_or_default()),
            app: or_unknown(node.app().unwrap_or_default()),
            version: or_unknown(node.version().unwrap_or_default()),
            canonical_service: or_unknown(node.canonical_service().unwrap_or_default()),
            canonical_revision: node.canonical_revision().to_string(),
            cluster: or_unknown(&node.cluster_id),
        }
    }

    fn peer(peer: PeerInfo, principal: Option<String>) -> Self {
        let namespace = match principal.as_deref().and_then(spiffe_namespace) {
            Some(ns) => ns.to_string(),
            None => owned_or_unknown(peer.namespace),
        };
        Side {
            workload: owned_or_unknown(peer.workload),
            namespace,
            principal: owned_or_unknown(principal.unwrap_or_default()),
            app: owned_or_unknown(peer.app),
            version: owned_or_unknown(peer.version),
            canonical_service: owned_or_unknown(peer.canonical_service),
            canonical_revision: if peer.canonical_revision.is_empty() {
                "latest".to_string()
            } else {
                peer.canonical_revision
            },
            cluster: owned_or_unknown(peer.cluster),
        }
    }
}

/// Istio's full standard label set of one request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IstioLabels {
    reporter: Reporter,
    source: Side,
    destination: Side,
    service: ServiceInfo,
    request_protocol: &'static str,
    response_code: u32,
    grpc_response_status: Option<u32>,
    response_flags: String,
    connection_security_policy: &'static str,
}

/// What one request contributes to its labels, beyond the proxy's own identity.
#[derive(Debug, Clone, Default)]
pub struct RequestFacts {
    /// The peer workload, from the best source available (see [`crate::peer`]).
    pub peer: PeerInfo,
    /// The peer's SPIFFE identity, when the connection used mTLS.
    pub peer_principal: Option<String>,
    /// This proxy's SPIFFE identity on that connection.
    pub local_principal: Option<String>,
    /// The destination service, when known.
    pub service: Option<ServiceInfo>,
    /// Whether the request is gRPC (`content-type: application/grpc...`).
    pub grpc: bool,
    /// HTTP status; 0 when none was sent.
    pub response_code: u32,
    /// gRPC status, for gRPC requests that got one.
    pub grpc_status: Option<u32>,
    /// Envoy's response flags, short form.
    pub response_flags: String,
    /// Whether the downstream connection used mutual TLS.
    pub mtls: bool,
}

impl IstioLabels {
    /// The label set of a request reported by `reporter` on the proxy `node`.
    pub fn new(reporter: Reporter, node: &NodeInfo, facts: RequestFacts) -> Self {
        let local = Side::local(node, facts.local_principal.as_deref());
        let peer = Side::peer(facts.peer, facts.peer_principal);
        let (source, destination, policy) = match reporter {
            Reporter::Destination => (peer, local, if facts.mtls { "mutual_tls" } else { "none" }),
            Reporter::Source => (local, peer, UNKNOWN),
        };
        let service = facts.service.unwrap_or_default();
        IstioLabels {
            reporter,
            source,
            destination,
            service: ServiceInfo {
                host: owned_or_unknown(service.host),
                name: owned_or_unknown(service.name),
                namespace: owned_or_unknown(service.namespace),
            },
            request_protocol: if facts.grpc { "grpc" } else { "http" },
            response_code: facts.response_code,
            grpc_response_status: if facts.grpc { facts.grpc_status } else { None },
            response_flags: if facts.response_flags.is_empty() { "-".to_string() } else { facts.response_flags },
            connection_security_policy: policy,
        }
    }

    /// Label values in [`LABEL_NAMES`] order, moved out of the label set (no copies).
    pub fn into_values(self) -> Vec<String> {
        let (s, d) = (self.source, self.destination);
        vec![
            match self.reporter {
                Reporter::Source => "source",
                Reporter::Destination => "destination",
            }
            .to_string(),
            s.workload,
            s.namespace,
            s.principal,
            s.app,
            s.version,
            s.canonical_service,
            s.canonical_revision,
            s.cluster,
            d.workload,
            d.namespace,
            d.principal,
            d.app,
            d.version,
            self.service.host,
            self.service.name,
            self.service.namespace,
            d.canonical_service,
            d.canonical_revision,
            d.cluster,
            self.request_protocol.to_string(),
            self.response_code.to_string(),
            self.grpc_response_status.map(|s| s.to_string()).unwrap_or_default(),
            self.response_flags,
            self.connection_security_policy.to_string(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeInfo {
        NodeInfo {
            id: "sidecar~1~reviews-v2-x.shop~shop.svc.cluster.local".into(),
            name: "reviews-v2-x".into(),
            namespace: "shop".into(),
            workload_name: "reviews-v2".into(),
            labels: [("app", "reviews"), ("version", "v2")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            mesh_id: "m".into(),
            cluster_id: "east".into(),
        }
    }

    fn get(l: &IstioLabels, name: &str) -> String {
        let i = LABEL_NAMES.iter().position(|n| *n == name).unwrap();
        l.clone().into_values()[i].clone()
    }

    fn peer() -> PeerInfo {
        PeerInfo {
            workload: "productpage-v1".into(),
            namespace: "front".into(),
            app: "productpage".into(),
            version: "v1".into(),
            canonical_service: "productpage".into(),
            canonical_revision: "v1".into(),
            cluster: "west".into(),
        }
    }

    #[test]
    fn inbound_reports_destination_with_local_destination() {
        let facts = RequestFacts {
            peer: peer(),
            peer_principal: Some("spiffe://cluster.local/ns/front/sa/pp".into()),
            local_principal: Some("spiffe://cluster.local/ns/shop/sa/reviews".into()),
            service: Some(ServiceInfo {
                host: "reviews.shop.svc.cluster.local".into(),
                name: "reviews".into(),
                namespace: "shop".into(),
            }),
            response_code: 200,
            response_flags: "-".into(),
            mtls: true,
            ..Default::default()
        };
        let l = IstioLabels::new(Reporter::Destination, &node(), facts.clone());
        assert_eq!(get(&l, "reporter"), "destination");
        assert_eq!(get(&l, "source_workload"), "productpage-v1");
        assert_eq!(get(&l, "source_workload_namespace"), "front");
        assert_eq!(get(&l, "source_principal"), "spiffe://cluster.local/ns/front/sa/pp");
        assert_eq!(get(&l, "source_cluster"), "west");
        assert_eq!(get(&l, "destination_workload"), "reviews-v2");
        assert_eq!(get(&l, "destination_app"), "reviews");
        assert_eq!(get(&l, "destination_canonical_service"), "reviews");
        assert_eq!(get(&l, "destination_canonical_revision"), "v2");
        assert_eq!(get(&l, "destination_principal"), "spiffe://cluster.local/ns/shop/sa/reviews");
        assert_eq!(get(&l, "destination_service"), "reviews.shop.svc.cluster.local");
        assert_eq!(get(&l, "destination_service_name"), "reviews");
        assert_eq!(get(&l, "request_protocol"), "http");
        assert_eq!(get(&l, "response_code"), "200");
        assert_eq!(get(&l, "grpc_response_status"), "");
        assert_eq!(get(&l, "connection_security_policy"), "mutual_tls");
    }

    #[test]
    fn outbound_reports_source_with_peer_destination() {
        let facts = RequestFacts {
            peer: peer(),
            grpc: true,
            grpc_status: Some(14),
            response_code: 503,
            response_flags: "UF".into(),
            ..Default::default()
        };
        let l = IstioLabels::new(Reporter::Source, &node(), facts.clone());
        assert_eq!(get(&l, "reporter"), "source");
        assert_eq!(get(&l, "source_workload"), "reviews-v2");
        assert_eq!(get(&l, "source_principal"), "unknown");
        assert_eq!(get(&l, "destination_workload"), "productpage-v1");
        assert_eq!(get(&l, "destination_service"), "unknown");
        assert_eq!(get(&l, "request_protocol"), "grpc");
        assert_eq!(get(&l, "grpc_response_status"), "14");
        assert_eq!(get(&l, "response_flags"), "UF");
        assert_eq!(get(&l, "connection_security_policy"), "unknown");
    }

    #[test]
    fn unknown_peer_is_unknown_and_latest() {
        let l = IstioLabels::new(Reporter::Destination, &node(), RequestFacts::default());
        for name in [
            "source_workload",
            "source_workload_namespace",
            "source_app",
            "source_canonical_service",
            "source_cluster",
            "source_principal",
        ] {
            assert_eq!(get(&l, name), "unknown", "{name}");
        }
        assert_eq!(get(&l, "source_canonical_revision"), "latest");
        assert_eq!(get(&l, "response_code"), "0");
        assert_eq!(get(&l, "response_flags"), "-");
        assert_eq!(get(&l, "connection_security_policy"), "none");
    }

    #[test]
    fn principal_namespace_wins_over_metadata() {
        let facts = RequestFacts {
            peer: peer(),
            peer_principal: Some("spiffe://td/ns/other/sa/x".into()),
            ..Default::default()
        };
        let l = IstioLabels::new(Reporter::Destination, &node(), facts.clone());
        assert_eq!(get(&l, "source_workload_namespace"), "other");
        let facts = RequestFacts { peer_principal: Some("spiffe://td/ns/only/sa/x".into()), ..Default::default() };
        let l = IstioLabels::new(Reporter::Destination, &node(), facts.clone());
        assert_eq!(get(&l, "source_workload_namespace"), "only");
        assert_eq!(get(&l, "source_workload"), "unknown");
    }

    #[test]
    fn equal_requests_share_a_label_set() {
        let a = IstioLabels::new(Reporter::Destination, &node(), RequestFacts { peer: peer(), ..Default::default() });
        let b = IstioLabels::new(Reporter::Destination, &node(), RequestFacts { peer: peer(), ..Default::default() });
        assert_eq!(a, b);
        let c =
            IstioLabels::new(Reporter::Destination, &node(), RequestFacts { response_code: 500, ..Default::default() });
        assert_ne!(a, c);
    }
}
