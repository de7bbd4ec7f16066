//! Who is on the other side of a request, from the sources Istio uses, best first.
//!
//! Every decoder here takes untrusted bytes and degrades to "nothing known" on any malformed
//! input; it never fails a request.

use base64::Engine;
use prost::Message;
use prost_types::{value::Kind, Struct};

use crate::node::{LABEL_CANONICAL_NAME, LABEL_CANONICAL_REVISION};

/// Request header carrying the peer's node metadata (base64 of a `google.protobuf.Struct`).
pub const PEER_METADATA_HEADER: &str = "x-envoy-peer-metadata";
/// Request header carrying the peer's node id.
pub const PEER_METADATA_ID_HEADER: &str = "x-envoy-peer-metadata-id";

/// Longest peer metadata header decoded; longer ones are ignored.
const MAX_PEER_METADATA_LEN: usize = 16 * 1024;

/// What is known of a peer workload. Empty strings are unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerInfo {
    /// Workload name, e.g. the Deployment.
    pub workload: String,
    /// Namespace.
    pub namespace: String,
    /// `app` label (`app.kubernetes.io/name` first).
    pub app: String,
    /// `version` label (`app.kubernetes.io/version` first).
    pub version: String,
    /// Canonical service.
    pub canonical_service: String,
    /// Canonical revision.
    pub canonical_revision: String,
    /// Cluster id.
    pub cluster: String,
}

impl PeerInfo {
    /// Whether any field is known.
    pub fn is_known(&self) -> bool {
        *self != PeerInfo::default()
    }
}

/// Decode an `x-envoy-peer-metadata` header value: base64 of a deterministically serialized
/// `google.protobuf.Struct` of node metadata (`WORKLOAD_NAME`, `NAMESPACE`, `CLUSTER_ID`, `LABELS`).
pub fn from_peer_metadata_header(value: &[u8]) -> Option<PeerInfo> {
    if value.len() > MAX_PEER_METADATA_LEN {
        return None;
    }
    let bytes = base64::engine::general_purpose::STANDARD.decode(value).ok()?;
    let st = Struct::decode(bytes.as_slice()).ok()?;
    let string = |s: &Struct, key: &str| -> String {
        match s.fields.get(key).and_then(|v| v.kind.as_ref()) {
            Some(Kind::StringValue(v)) => v.clone(),
            _ => String::new(),
        }
    };
    let labels = match st.fields.get("LABELS").and_then(|v| v.kind.as_ref()) {
        Some(Kind::StructValue(l)) => l.clone(),
        _ => Struct::default(),
    };
    let label = |key: &str| string(&labels, key);
    let first = |a: String, b: String| if a.is_empty() { b } else { a };
    let app = first(label("app.kubernetes.io/name"), label("app"));
    let version = first(label("app.kubernetes.io/version"), label("version"));
    let workload = string(&st, "WORKLOAD_NAME");
    let peer = PeerInfo {
        canonical_service: first(first(label(LABEL_CANONICAL_NAME), app.clone()), workload.clone()),
        canonical_revision: first(label(LABEL_CANONICAL_REVISION), version.clone()),
        workload,
        namespace: string(&st, "NAMESPACE"),
        app,
        version,
        cluster: string(&st, "CLUSTER_ID"),
    };
    peer.is_known().then_some(peer)
}

/// Decode Istio's endpoint metadata `istio.workload`:
/// `workload;namespace;canonical_name;canonical_revision;cluster`.
pub fn from_host_workload(value: &str) -> Option<PeerInfo> {
    let parts: Vec<&str> = value.split(';').collect();
    if parts.len() < 4 || parts.len() > 5 || parts[0].is_empty() {
        return None;
    }
    Some(PeerInfo {
        workload: parts[0].into(),
        namespace: parts[1].into(),
        app: parts[2].into(),
        version: parts[3].into(),
        canonical_service: parts[2].into(),
        canonical_revision: parts[3].into(),
        cluster: parts.get(4).copied().unwrap_or_default().into(),
    })
}

/// The namespace in a SPIFFE identity `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
pub fn spiffe_namespace(principal: &str) -> Option<&str> {
    let path = principal.strip_prefix("spiffe://")?;
    let (_, rest) = path.split_once("/ns/")?;
    let ns = rest.split('/').next()?;
    (!ns.is_empty()).then_some(ns)
}

#[cfg(test)]
pub(crate) fn encode_peer_metadata(fields: &[(&str, &str)], labels: &[(&str, &str)]) -> String {
    use prost_types::Value;
    let sv = |s: &str| Value { kind: Some(Kind::StringValue(s.into())) };
    let mut st = Struct::default();
    for (k, v) in fields {
        st.fields.insert(k.to_string(), sv(v));
    }
    let mut l = Struct::default();
    for (k, v) in labels {
        l.fields.insert(k.to_string(), sv(v));
    }
    st.fields.insert("LABELS".into(), Value { kind: Some(Kind::StructValue(l)) });
    base64::engine::general_purpose::STANDARD.encode(st.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_peer_metadata_header() {
        let h = encode_peer_metadata(
            &[("WORKLOAD_NAME", "productpage-v1"), ("NAMESPACE", "shop"), ("CLUSTER_ID", "east")],
            &[("app", "productpage"), ("version", "v1"), (LABEL_CANONICAL_NAME, "productpage")],
        );
        let p = from_peer_metadata_header(h.as_bytes()).unwrap();
        assert_eq!(p.workload, "productpage-v1");
        assert_eq!(p.namespace, "shop");
        assert_eq!(p.cluster, "east");
        assert_eq!((p.app.as_str(), p.version.as_str()), ("productpage", "v1"));
        assert_eq!((p.canonical_service.as_str(), p.canonical_revision.as_str()), ("productpage", "v1"));
    }

    #[test]
    fn canonical_names_fall_back_like_istio() {
        let h = encode_peer_metadata(&[("WORKLOAD_NAME", "w")], &[]);
        let p = from_peer_metadata_header(h.as_bytes()).unwrap();
        assert_eq!((p.canonical_service.as_str(), p.canonical_revision.as_str()), ("w", ""));
        let h = encode_peer_metadata(&[("WORKLOAD_NAME", "w")], &[("app.kubernetes.io/name", "k"), ("app", "a")]);
        assert_eq!(from_peer_metadata_header(h.as_bytes()).unwrap().canonical_service, "k");
    }

    #[test]
    fn malformed_peer_metadata_is_unknown() {
        assert_eq!(from_peer_metadata_header(b"not base64!!"), None);
        let not_a_struct = base64::engine::general_purpose::STANDARD.encode([0xff, 0xff, 0xff, 0x01]);
        assert_eq!(from_peer_metadata_header(not_a_struct.as_bytes()), None);
        let empty = base64::engine::general_purpose::STANDARD.encode(Struct::default().encode_to_vec());
        assert_eq!(from_peer_metadata_header(empty.as_bytes()), None);
        // A Struct whose fields have the wrong types yields nothing usable.
        let wrong = {
            let mut st = Struct::default();
            st.fields.insert("WORKLOAD_NAME".into(), prost_types::Value { kind: Some(Kind::NumberValue(1.0)) });
            base64::engine::general_purpose::STANDARD.encode(st.encode_to_vec())
        };
        assert_eq!(from_peer_metadata_header(wrong.as_bytes()), None);
        assert_eq!(from_peer_metadata_header(&vec![b'A'; MAX_PEER_METADATA_LEN + 4]), None);
    }

    #[test]
    fn decodes_host_workload_metadata() {
        let p = from_host_workload("reviews-v2;shop;reviews;v2;east").unwrap();
        assert_eq!((p.workload.as_str(), p.namespace.as_str(), p.cluster.as_str()), ("reviews-v2", "shop", "east"));
        assert_eq!(p.canonical_service, "reviews");
        assert!(from_host_workload("reviews-v2;shop;reviews;v2").is_some());
        assert_eq!(from_host_workload("garbage"), None);
        assert_eq!(from_host_workload(";shop;a;b;c"), None);
        assert_eq!(from_host_workload("a;b;c;d;e;f"), None);
    }

    #[test]
    fn reads_namespace_from_spiffe_principals() {
        assert_eq!(spiffe_namespace("spiffe://cluster.local/ns/shop/sa/reviews"), Some("shop"));
        assert_eq!(spiffe_namespace("spiffe://cluster.local/ns//sa/x"), None);
        assert_eq!(spiffe_namespace("https://cluster.local/ns/shop/sa/x"), None);
        assert_eq!(spiffe_namespace("spiffe://td/sa/x"), None);
    }
}
