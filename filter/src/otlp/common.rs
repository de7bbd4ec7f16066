//! Attributes and the resource shared by all signals.

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_semantic_conventions::resource as res;

use crate::istio::node::NodeInfo;

use crate::wire::Writer;
use prost::Message;

/// The part every OTLP export request shares: `Export*ServiceRequest { resource_* { resource,
/// scope_* { scope, items... } } }`, with the same field numbers (1, 1, 2, 1, 2) for traces,
/// metrics and logs. The resource and scope are encoded once per VM.
#[derive(Debug, Clone)]
pub(crate) struct Envelope {
    resource: Vec<u8>,
    scope: Vec<u8>,
}

impl Envelope {
    /// Field number of the items (`spans`, `metrics`, `log_records`) inside the scope message.
    pub const ITEMS: u32 = 2;

    /// The envelope of everything this workload exports.
    pub fn new(resource: &Resource) -> Self {
        Self { resource: resource.encode_to_vec(), scope: scope().encode_to_vec() }
    }

    /// An export request whose items `items` writes (as repeated [`Envelope::ITEMS`]);
    /// `capacity` is a guess of the items' size.
    pub fn encode(&self, capacity: usize, items: impl FnOnce(&mut Writer)) -> Vec<u8> {
        let mut w = Writer::with_capacity(64 + self.resource.len() + capacity);
        w.message(1, |w| {
            w.encoded_message(1, &self.resource);
            w.message(2, |w| {
                w.encoded_message(1, &self.scope);
                items(w);
            });
        });
        w.into_bytes()
    }
}

/// The instrumentation scope of everything meshtel emits.
pub(crate) fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: super::SCOPE_NAME.to_string(),
        version: super::VERSION.to_string(),
        attributes: Vec::new(),
        dropped_attributes_count: 0,
    }
}

/// A string attribute.
pub(crate) fn string_kv(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }),
        key_strindex: 0,
    }
}

/// The resource attributes describing this workload, from node metadata, with the
/// configured `resource.attributes` added last (they win over derived ones).
pub fn resource_attributes(node: &NodeInfo, extra: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let mut attrs: Vec<(String, String)> = Vec::new();
    let mut put = |k: &str, v: &str| {
        if !v.is_empty() {
            attrs.push((k.to_string(), v.to_string()));
        }
    };
    put(res::SERVICE_NAME, node.canonical_service().unwrap_or("unknown_service:meshtel"));
    put(res::SERVICE_VERSION, node.canonical_revision());
    put(res::SERVICE_NAMESPACE, &node.namespace);
    put(res::SERVICE_INSTANCE_ID, &node.id);
    put(res::K8S_NAMESPACE_NAME, &node.namespace);
    put(res::K8S_POD_NAME, &node.name);
    put(res::K8S_CLUSTER_NAME, &node.cluster_id);
    put(res::TELEMETRY_SDK_NAME, super::SCOPE_NAME);
    put(res::TELEMETRY_SDK_LANGUAGE, "rust");
    put(res::TELEMETRY_SDK_VERSION, super::VERSION);
    for (k, v) in extra {
        attrs.retain(|(existing, _)| existing != k);
        attrs.push((k.clone(), v.clone()));
    }
    attrs
}

/// The OTLP resource for this workload.
pub fn resource(node: &NodeInfo, extra: &BTreeMap<String, String>) -> Resource {
    Resource {
        attributes: resource_attributes(node, extra).into_iter().map(|(k, v)| string_kv(&k, v)).collect(),
        dropped_attributes_count: 0,
        entity_refs: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(attrs: &'a [(String, String)], key: &str) -> Option<&'a str> {
        attrs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    #[test]
    fn describes_the_workload_from_node_metadata() {
        let node = NodeInfo {
            id: "sidecar~10.1.1.1~reviews-v2-abc.shop~shop.svc.cluster.local".into(),
            name: "reviews-v2-abc".into(),
            namespace: "shop".into(),
            workload_name: "reviews-v2".into(),
            labels: [("app".to_string(), "reviews".to_string()), ("version".to_string(), "v2".to_string())].into(),
            mesh_id: "mesh1".into(),
            cluster_id: "east".into(),
        };
        let extra = [
            ("deployment.environment.name".to_string(), "prod".to_string()),
            ("service.name".to_string(), "override".to_string()),
        ]
        .into();
        let attrs = resource_attributes(&node, &extra);
        assert_eq!(get(&attrs, "service.name"), Some("override"));
        assert_eq!(get(&attrs, "service.version"), Some("v2"));
        assert_eq!(get(&attrs, "service.namespace"), Some("shop"));
        assert_eq!(get(&attrs, "k8s.namespace.name"), Some("shop"));
        assert_eq!(get(&attrs, "k8s.pod.name"), Some("reviews-v2-abc"));
        assert_eq!(get(&attrs, "k8s.cluster.name"), Some("east"));
        assert_eq!(get(&attrs, "service.instance.id"), Some(node.id.as_str()));
        assert_eq!(get(&attrs, "deployment.environment.name"), Some("prod"));
        assert_eq!(attrs.iter().filter(|(k, _)| k == "service.name").count(), 1);
    }

    #[test]
    fn empty_metadata_still_names_the_service() {
        let attrs = resource_attributes(&NodeInfo::default(), &BTreeMap::new());
        assert_eq!(get(&attrs, "service.name"), Some("unknown_service:meshtel"));
        assert_eq!(get(&attrs, "service.version"), Some("latest"));
        assert_eq!(get(&attrs, "k8s.pod.name"), None);
    }
}
