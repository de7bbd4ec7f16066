//! Istio's own end-to-end test data, as named parts of a bootstrap: the node metadata of
//! istio/proxy `testdata/*node_metadata.json.tmpl`, the peer headers its metadata exchange sends
//! for them, the clusters of `testdata/bootstrap/*.yaml.tmpl`, and the label sets of
//! `testdata/metric/*.yaml.tmpl` (identical in istio/proxy release-1.30, release-1.31 and master).

use serde_json::json;

use crate::envoy::{Cluster, Node};

pub use meshtel_filter::istio::golden::{client_request_total, server_request_total, with, SERVER_SERVICE};

/// `testdata/client_node_metadata.json.tmpl` (productpage), the parts a proxy reads.
pub fn client_node() -> Node {
    Node {
        id: "sidecar~10.52.0.34~productpage-v1-84975bc778-pxz2w.default~default.svc.cluster.local".into(),
        metadata: json!({
            "NAME": "productpage-v1-84975bc778-pxz2w",
            "NAMESPACE": "default",
            "WORKLOAD_NAME": "productpage-v1",
            "OWNER": "kubernetes://apis/apps/v1/namespaces/default/deployments/productpage-v1",
            "LABELS": {
                "app": "productpage",
                "pod-template-hash": "84975bc778",
                "version": "v1",
                "service.istio.io/canonical-name": "productpage-v1",
                "service.istio.io/canonical-revision": "version-1",
                "role": "client",
            },
            "MESH_ID": "mesh",
            "CLUSTER_ID": "client-cluster",
            "SERVICE_ACCOUNT": "bookinfo-productpage",
            "ISTIO_VERSION": "1.5-dev",
        }),
    }
}

/// `testdata/server_node_metadata.json.tmpl` (ratings), the parts a proxy reads.
pub fn server_node() -> Node {
    Node {
        id: "sidecar~10.52.0.35~ratings-v1-84975bc778-pxz2w.default~default.svc.cluster.local".into(),
        metadata: json!({
            "NAME": "ratings-v1-84975bc778-pxz2w",
            "NAMESPACE": "default",
            "WORKLOAD_NAME": "ratings-v1",
            "OWNER": "kubernetes://apis/apps/v1/namespaces/default/deployments/ratings-v1",
            "LABELS": {
                "app": "ratings",
                "pod-template-hash": "84975bc778",
                "version": "v1",
                "service.istio.io/canonical-name": "ratings",
                "service.istio.io/canonical-revision": "version-1",
                "role": "server",
            },
            "MESH_ID": "proj-123",
            "CLUSTER_ID": "server-cluster",
            "SERVICE_ACCOUNT": "bookinfo-ratings",
            "ISTIO_VERSION": "1.5-dev",
        }),
    }
}

/// `testdata/server_waypoint_proxy_node_metadata.json.tmpl` (three keys, no labels) with the
/// node id type a waypoint has (`waypoint~`, istio/istio `pkg/bootstrap/config.go`).
pub fn waypoint_node() -> Node {
    Node {
        id: "waypoint~10.52.0.36~waypoint-7d9f8c6b5-x2x7k.default~default.svc.cluster.local".into(),
        metadata: json!({"MESH_ID": "proj-123", "NAMESPACE": "default", "CLUSTER_ID": "server-cluster"}),
    }
}

/// The waypoint's upstream in `TestStatsServerWaypointProxy`: `BackendMetadata` of
/// `test/envoye2e/stats_plugin/stats_test.go`, as Istio's workload discovery turns it into a
/// peer (app and version from the canonical name and revision, identity from the trust domain).
/// Upstream Envoy has no workload discovery: the test hands these facts over as the
/// `x-envoy-peer-metadata` answer header, the fallback meshtel reads without Istio's filter.
pub fn waypoint_backend_node() -> Node {
    Node {
        id: String::new(),
        metadata: json!({
            "WORKLOAD_NAME": "ratings-v1",
            "NAMESPACE": "default",
            "CLUSTER_ID": "ratings-cluster",
            "IDENTITY": "spiffe://cluster.global/ns/default/sa/ratings",
            "LABELS": {
                "app": "ratings",
                "version": "version-1",
                "service.istio.io/canonical-name": "ratings",
                "service.istio.io/canonical-revision": "version-1",
            },
        }),
    }
}

/// A cluster to `port` with the `istio.services` metadata of Istio's test bootstraps.
pub fn server_cluster(name: &str, port: u16) -> Cluster {
    let mut c = Cluster::new(name, port);
    c.service = Some(SERVER_SERVICE.into());
    c
}
