//! Istio's filter metadata on Envoy clusters and endpoints (`xds.cluster_metadata`,
//! `xds.upstream_host_metadata`), decoded from the serialized `envoy.config.core.v3.Metadata`.

use std::collections::HashMap;

use prost::Message;
use prost_types::{value::Kind, Struct};

/// The part of `envoy.config.core.v3.Metadata` meshtel reads.
#[derive(Clone, PartialEq, Message)]
struct Metadata {
    #[prost(map = "string, message", tag = "1")]
    filter_metadata: HashMap<String, Struct>,
}

/// A service as Istio names it in cluster metadata (`istio.services[0]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ServiceInfo {
    /// FQDN, e.g. `reviews.shop.svc.cluster.local`.
    pub host: String,
    /// Short name, e.g. `reviews`.
    pub name: String,
    /// Namespace.
    pub namespace: String,
}

fn istio(metadata: &[u8]) -> Option<Struct> {
    Metadata::decode(metadata).ok()?.filter_metadata.remove("istio")
}

fn string(s: &Struct, key: &str) -> String {
    match s.fields.get(key).and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(v)) => v.clone(),
        _ => String::new(),
    }
}

/// `istio.services[0]` of a cluster's metadata.
pub fn cluster_service(metadata: &[u8]) -> Option<ServiceInfo> {
    let istio = istio(metadata)?;
    let Some(Kind::ListValue(list)) = istio.fields.get("services").and_then(|v| v.kind.as_ref()) else {
        return None;
    };
    let Some(Kind::StructValue(first)) = list.values.first().and_then(|v| v.kind.as_ref()) else {
        return None;
    };
    let service =
        ServiceInfo { host: string(first, "host"), name: string(first, "name"), namespace: string(first, "namespace") };
    (service != ServiceInfo::default()).then_some(service)
}

/// `istio.workload` of an endpoint's metadata (`workload;namespace;name;revision;cluster`).
pub fn host_workload(metadata: &[u8]) -> Option<String> {
    let w = string(&istio(metadata)?, "workload");
    (!w.is_empty()).then_some(w)
}

/// Istio's catch-all clusters, which name the destination service themselves
/// (istio_stats.cc, `populatePeerInfo`).
pub fn is_istio_catch_all(cluster: &str) -> bool {
    matches!(
        cluster,
        "BlackHoleCluster"
            | "PassthroughCluster"
            | "InboundPassthroughCluster"
            | "InboundPassthroughClusterIpv4"
            | "InboundPassthroughClusterIpv6"
    )
}

#[cfg(test)]
pub(crate) fn encode_metadata(istio_fields: Vec<(&str, prost_types::Value)>) -> Vec<u8> {
    let mut st = Struct::default();
    for (k, v) in istio_fields {
        st.fields.insert(k.to_string(), v);
    }
    Metadata { filter_metadata: [("istio".to_string(), st)].into() }.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::{ListValue, Value};

    fn sv(s: &str) -> Value {
        Value { kind: Some(Kind::StringValue(s.into())) }
    }

    #[test]
    fn reads_the_first_service_of_a_cluster() {
        let svc = |h: &str, n: &str, ns: &str| {
            let mut st = Struct::default();
            st.fields.insert("host".into(), sv(h));
            st.fields.insert("name".into(), sv(n));
            st.fields.insert("namespace".into(), sv(ns));
            Value { kind: Some(Kind::StructValue(st)) }
        };
        let list = Value {
            kind: Some(Kind::ListValue(ListValue {
                values: vec![svc("reviews.shop.svc.cluster.local", "reviews", "shop"), svc("x", "x", "x")],
            })),
        };
        let md = encode_metadata(vec![("services", list)]);
        assert_eq!(
            cluster_service(&md),
            Some(ServiceInfo {
                host: "reviews.shop.svc.cluster.local".into(),
                name: "reviews".into(),
                namespace: "shop".into()
            })
        );
    }

    #[test]
    fn malformed_metadata_is_unknown() {
        assert_eq!(cluster_service(&[0xff, 0x01, 0x02]), None);
        assert_eq!(cluster_service(&encode_metadata(vec![("services", sv("nope"))])), None);
        assert_eq!(cluster_service(&encode_metadata(vec![])), None);
        assert_eq!(host_workload(b"garbage\xff"), None);
    }

    #[test]
    fn reads_endpoint_workload() {
        let md = encode_metadata(vec![("workload", sv("reviews-v2;shop;reviews;v2;east"))]);
        assert_eq!(host_workload(&md).as_deref(), Some("reviews-v2;shop;reviews;v2;east"));
    }

    #[test]
    fn knows_istios_catch_all_clusters() {
        assert!(is_istio_catch_all("PassthroughCluster") && is_istio_catch_all("InboundPassthroughClusterIpv6"));
        assert!(!is_istio_catch_all("outbound|80||PassthroughCluster"));
    }
}
