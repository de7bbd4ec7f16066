//! The identity and metadata istiod gives a proxy (its node), for the proxies of the tests.

use serde_json::{json, Value};

/// Istio node identity and metadata of one proxy.
#[derive(Debug, Clone)]
pub struct Node {
    /// `node.id`.
    pub id: String,
    /// `node.metadata`.
    pub metadata: Value,
}

impl Node {
    /// A sidecar of workload `workload` (app label `app`, version `v1`) in `namespace`.
    pub fn sidecar(app: &str, namespace: &str) -> Self {
        let pod = format!("{app}-v1-6d8f7c9b5-x2x7k");
        Node {
            id: format!("sidecar~127.0.0.1~{pod}.{namespace}~{namespace}.svc.cluster.local"),
            metadata: json!({
                "NAME": pod,
                "NAMESPACE": namespace,
                "WORKLOAD_NAME": format!("{app}-v1"),
                "LABELS": {
                    "app": app,
                    "version": "v1",
                    "service.istio.io/canonical-name": app,
                    "service.istio.io/canonical-revision": "v1",
                    "pod-template-hash": "6d8f7c9b5",
                },
                "MESH_ID": "cluster.local",
                "CLUSTER_ID": "Kubernetes",
                "ISTIO_VERSION": "1.28.0",
            }),
        }
    }

    /// The ingress gateway in `istio-system`.
    pub fn gateway() -> Self {
        let pod = "istio-ingressgateway-5b7f8c6d9-q8w2z";
        Node {
            id: format!("router~127.0.0.1~{pod}.istio-system~istio-system.svc.cluster.local"),
            metadata: json!({
                "NAME": pod,
                "NAMESPACE": "istio-system",
                "WORKLOAD_NAME": "istio-ingressgateway",
                "LABELS": {
                    "app": "istio-ingressgateway",
                    "istio": "ingressgateway",
                    "service.istio.io/canonical-name": "istio-ingressgateway",
                    "service.istio.io/canonical-revision": "latest",
                },
                "MESH_ID": "cluster.local",
                "CLUSTER_ID": "Kubernetes",
            }),
        }
    }
}
