//! Istio's golden label sets: the labels istio/proxy's end-to-end tests expect
//! (`testdata/metric/*.yaml.tmpl`, identical in release-1.30, release-1.31 and master), one copy
//! for meshtel's unit tests and its integration tests in real Envoy. Test data only: nothing in
//! the module calls it.

use std::collections::BTreeMap;

/// The service every golden case calls (the `istio.services` metadata of
/// `testdata/bootstrap/client.yaml.tmpl` and `server.yaml.tmpl`).
pub const SERVER_SERVICE: &str = "server.default.svc.cluster.local";

/// The labels of `testdata/metric/client_request_total.yaml.tmpl` (no gRPC status).
pub fn client_request_total() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        ("reporter", "source"),
        ("source_workload", "productpage-v1"),
        ("source_canonical_service", "productpage-v1"),
        ("source_canonical_revision", "version-1"),
        ("source_workload_namespace", "default"),
        ("source_principal", "unknown"),
        ("source_app", "productpage"),
        ("source_version", "v1"),
        ("source_cluster", "client-cluster"),
        ("destination_workload", "ratings-v1"),
        ("destination_workload_namespace", "default"),
        ("destination_principal", "unknown"),
        ("destination_app", "ratings"),
        ("destination_version", "v1"),
        ("destination_service", SERVER_SERVICE),
        ("destination_canonical_service", "ratings"),
        ("destination_canonical_revision", "version-1"),
        ("destination_service_name", "server"),
        ("destination_service_namespace", "default"),
        ("destination_cluster", "server-cluster"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("grpc_response_status", ""),
        ("response_flags", "-"),
        ("connection_security_policy", "unknown"),
    ])
}

/// The labels of `testdata/metric/server_request_total.yaml.tmpl`: the client file's, reported
/// by the destination with policy `none`.
pub fn server_request_total() -> BTreeMap<&'static str, &'static str> {
    let mut l = client_request_total();
    l.insert("reporter", "destination");
    l.insert("connection_security_policy", "none");
    l
}

/// Change `labels` as a variant golden file does against its base file.
pub fn with(
    mut labels: BTreeMap<&'static str, &'static str>,
    changes: &[(&'static str, &'static str)],
) -> BTreeMap<&'static str, &'static str> {
    for (k, v) in changes {
        assert!(labels.insert(k, v).is_some(), "{k} is not one of Istio's labels");
    }
    labels
}
