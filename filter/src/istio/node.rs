//! The proxy's own identity, read once per VM from Istio's node metadata.

use std::collections::BTreeMap;

use crate::headers::Headers;

/// Istio label naming a workload's canonical service.
pub const LABEL_CANONICAL_NAME: &str = "service.istio.io/canonical-name";
/// Istio label naming a workload's canonical revision.
pub const LABEL_CANONICAL_REVISION: &str = "service.istio.io/canonical-revision";
/// The pod label Istio's stats filter reads for the local `*_app`.
pub const LABEL_APP: &str = "app";
/// The pod label Istio's stats filter reads for the local `*_version`.
pub const LABEL_VERSION: &str = "version";
/// Kubernetes' recommended app label, which Istio prefers for peers.
pub const LABEL_APP_QUALIFIED: &str = "app.kubernetes.io/name";
/// Kubernetes' recommended version label, which Istio prefers for peers.
pub const LABEL_VERSION_QUALIFIED: &str = "app.kubernetes.io/version";

/// What kind of proxy this is, from the type in its node id (istio/istio
/// `pilot/pkg/model/context.go`, `NodeType`: `sidecar`, `router`, `waypoint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    /// A workload's sidecar (and anything not recognised).
    Sidecar,
    /// An ingress or egress gateway (`router~`).
    Gateway,
    /// An ambient waypoint (`waypoint~`).
    Waypoint,
}

/// What Istio's node metadata says about this proxy. Missing fields are empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// `node.id`, e.g. `sidecar~10.0.0.1~pod.ns~ns.svc.cluster.local`.
    pub id: String,
    /// Pod name (`NAME`).
    pub name: String,
    /// Namespace (`NAMESPACE`).
    pub namespace: String,
    /// Workload, e.g. the Deployment name (`WORKLOAD_NAME`).
    pub workload_name: String,
    /// Pod labels (`LABELS`).
    pub labels: BTreeMap<String, String>,
    /// Mesh id (`MESH_ID`).
    pub mesh_id: String,
    /// Cluster id (`CLUSTER_ID`).
    pub cluster_id: String,
}

impl NodeInfo {
    /// The proxy's kind, from its node id.
    pub fn kind(&self) -> ProxyKind {
        match self.id.split('~').next() {
            Some("router") => ProxyKind::Gateway,
            Some("waypoint") => ProxyKind::Waypoint,
            _ => ProxyKind::Sidecar,
        }
    }

    /// Istio gateways run with a node id of type `router`.
    pub fn is_gateway(&self) -> bool {
        self.kind() == ProxyKind::Gateway
    }

    /// A pod label as it is, empty when absent (Istio's `extractMapString` on `LABELS`).
    pub fn label(&self, key: &str) -> &str {
        self.labels.get(key).map(String::as_str).unwrap_or_default()
    }

    fn non_empty_label(&self, key: &str) -> Option<&str> {
        Some(self.label(key)).filter(|v| !v.is_empty())
    }

    fn non_empty(s: &str) -> Option<&str> {
        (!s.is_empty()).then_some(s)
    }

    /// The app for the OpenTelemetry resource: `app.kubernetes.io/name`, else `app`.
    pub fn app(&self) -> Option<&str> {
        self.non_empty_label(LABEL_APP_QUALIFIED).or_else(|| self.non_empty_label(LABEL_APP))
    }

    /// The version for the OpenTelemetry resource: `app.kubernetes.io/version`, else `version`.
    pub fn version(&self) -> Option<&str> {
        self.non_empty_label(LABEL_VERSION_QUALIFIED).or_else(|| self.non_empty_label(LABEL_VERSION))
    }

    /// Canonical service as istiod derives the label when a pod lacks it (the label, else the
    /// app, else the workload name): `service.name` of the OpenTelemetry resource. Istio's
    /// metric labels use the label alone ([`NodeInfo::label`]).
    pub fn canonical_service(&self) -> Option<&str> {
        self.non_empty_label(LABEL_CANONICAL_NAME)
            .or_else(|| self.app())
            .or_else(|| Self::non_empty(&self.workload_name))
    }

    /// Canonical revision as istiod derives it (the label, else the version, else `latest`):
    /// `service.version` of the OpenTelemetry resource.
    pub fn canonical_revision(&self) -> &str {
        self.non_empty_label(LABEL_CANONICAL_REVISION).or_else(|| self.version()).unwrap_or("latest")
    }
}

/// Decode a proxy-wasm pairs map (as the host returns `xds.node.metadata.LABELS`; the encoding of
/// [`crate::headers`]). Returns `None` unless every declared pair fits; pairs that are not UTF-8
/// are skipped.
pub fn decode_pairs(bytes: &[u8]) -> Option<Vec<(String, String)>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let map = Headers::over(bytes);
    let pairs: Vec<(&[u8], &[u8])> = map.iter().collect();
    (pairs.len() == map.declared()?).then(|| {
        pairs
            .into_iter()
            .filter_map(|(k, v)| {
                Some((std::str::from_utf8(k).ok()?.to_string(), std::str::from_utf8(v).ok()?.to_string()))
            })
            .collect()
    })
}

#[cfg(test)]
pub(crate) fn encode_pairs(pairs: &[(&str, &str)]) -> Vec<u8> {
    crate::headers::HeaderPairs::from_pairs(pairs).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(labels: &[(&str, &str)], workload: &str) -> NodeInfo {
        NodeInfo {
            workload_name: workload.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn decodes_pairs_round_trip() {
        let bytes = encode_pairs(&[("app", "reviews"), ("version", "v2"), ("", "")]);
        assert_eq!(
            decode_pairs(&bytes).unwrap(),
            vec![("app".into(), "reviews".into()), ("version".into(), "v2".into()), ("".into(), "".into())]
        );
        assert_eq!(decode_pairs(&[]).unwrap(), vec![]);
    }

    #[test]
    fn rejects_truncated_or_lying_pairs() {
        let bytes = encode_pairs(&[("app", "reviews")]);
        for cut in 1..bytes.len() {
            assert_eq!(decode_pairs(&bytes[..cut]), None, "cut at {cut}");
        }
        let mut huge = bytes.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_pairs(&huge), None);
    }

    #[test]
    fn canonical_names_follow_istio_precedence() {
        let n = node(
            &[(LABEL_CANONICAL_NAME, "canon"), ("app", "a"), (LABEL_CANONICAL_REVISION, "r1"), ("version", "v1")],
            "w",
        );
        assert_eq!((n.canonical_service(), n.canonical_revision()), (Some("canon"), "r1"));
        let n = node(&[("app.kubernetes.io/name", "k8sapp"), ("app", "a"), ("version", "v1")], "w");
        assert_eq!((n.canonical_service(), n.canonical_revision()), (Some("k8sapp"), "v1"));
        assert_eq!(n.app(), Some("k8sapp"));
        let n = node(&[], "w");
        assert_eq!((n.canonical_service(), n.canonical_revision()), (Some("w"), "latest"));
        assert_eq!(node(&[], "").canonical_service(), None);
    }

    #[test]
    fn kind_comes_from_the_node_id_type() {
        let kind = |id: &str| NodeInfo { id: id.into(), ..Default::default() }.kind();
        assert_eq!(kind("router~10.0.0.1~gw.istio-system~istio-system.svc.cluster.local"), ProxyKind::Gateway);
        assert_eq!(kind("waypoint~10.0.0.2~waypoint-7d9.shop~shop.svc.cluster.local"), ProxyKind::Waypoint);
        assert_eq!(kind("sidecar~10.0.0.3~a.ns~ns.svc.cluster.local"), ProxyKind::Sidecar);
        assert_eq!(kind(""), ProxyKind::Sidecar);
        assert_eq!(kind("waypointish~1~a~b"), ProxyKind::Sidecar);
    }

    #[test]
    fn labels_are_read_as_they_are() {
        let n = node(&[("app", "a"), ("version", "")], "w");
        assert_eq!((n.label("app"), n.label("version"), n.label("missing")), ("a", "", ""));
    }

    #[test]
    fn gateways_are_router_nodes() {
        let mut n = NodeInfo {
            id: "router~10.0.0.1~gw.istio-system~istio-system.svc.cluster.local".into(),
            ..Default::default()
        };
        assert!(n.is_gateway());
        n.id = "sidecar~10.0.0.1~a.ns~ns.svc.cluster.local".into();
        assert!(!n.is_gateway());
    }
}
