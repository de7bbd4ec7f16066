//! Who is on the other side of a request, from the sources Istio uses, best first.
//!
//! Every decoder here takes untrusted bytes and degrades to "nothing known" on any malformed
//! input; it never fails a request.

use prost::Message;
use prost_types::{value::Kind, Struct};

use crate::istio::node::{
    LABEL_APP, LABEL_APP_QUALIFIED, LABEL_CANONICAL_NAME, LABEL_CANONICAL_REVISION, LABEL_VERSION,
    LABEL_VERSION_QUALIFIED,
};

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
    /// SPIFFE identity, when the peer's metadata names it.
    pub identity: String,
}

impl PeerInfo {
    /// No peer: every field empty.
    pub const EMPTY: PeerInfo = PeerInfo {
        workload: String::new(),
        namespace: String::new(),
        app: String::new(),
        version: String::new(),
        canonical_service: String::new(),
        canonical_revision: String::new(),
        cluster: String::new(),
        identity: String::new(),
    };

    /// Whether any field is known.
    pub fn is_known(&self) -> bool {
        *self != PeerInfo::default()
    }
}

/// Decode an `x-envoy-peer-metadata` header value: base64 of a deterministically serialized
/// `google.protobuf.Struct` of node metadata (`WORKLOAD_NAME`, `NAMESPACE`, `CLUSTER_ID`, `LABELS`).
///
/// Fields as `convertStructToWorkloadMetadata` takes them (istio/proxy
/// `extensions/common/metadata_object.cc`): the canonical names from their labels only,
/// `app.kubernetes.io/name|version` before `app` / `version`.
pub fn from_peer_metadata_header(value: &[u8]) -> Option<PeerInfo> {
    if value.len() > MAX_PEER_METADATA_LEN {
        return None;
    }
    let bytes = crate::base64::decode(value)?;
    let st = Struct::decode(bytes.as_slice()).ok()?;
    let labels = match st.fields.get("LABELS").and_then(|v| v.kind.as_ref()) {
        Some(Kind::StructValue(l)) => l.clone(),
        _ => Struct::default(),
    };
    let label = |key: &str| string(&labels, key);
    let first = |a: String, b: String| if a.is_empty() { b } else { a };
    let peer = PeerInfo {
        workload: string(&st, "WORKLOAD_NAME"),
        namespace: string(&st, "NAMESPACE"),
        app: first(label(LABEL_APP_QUALIFIED), label(LABEL_APP)),
        version: first(label(LABEL_VERSION_QUALIFIED), label(LABEL_VERSION)),
        canonical_service: label(LABEL_CANONICAL_NAME),
        canonical_revision: label(LABEL_CANONICAL_REVISION),
        cluster: string(&st, "CLUSTER_ID"),
        identity: string(&st, "IDENTITY"),
    };
    peer.is_known().then_some(peer)
}

fn string(s: &Struct, key: &str) -> String {
    match s.fields.get(key).and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(v)) => v.clone(),
        _ => String::new(),
    }
}

/// Decode Istio's peer filter state (`downstream_peer` / `upstream_peer`) as Envoy returns the
/// whole object to a Wasm module: the `CelState`'s `google.protobuf.Struct` as a proxy-wasm pairs
/// map of its fields (string values raw; the nested `labels` Struct as a pairs map of its own,
/// not needed here). Field names are Istio's tokens (istio/proxy
/// `extensions/common/metadata_object.h`: `workload`, `namespace`, `cluster`, `service`,
/// `revision`, `app`, `version`, `identity`), read as `peerInfo` in istio_stats.cc reads them.
pub fn from_filter_state(bytes: &[u8]) -> Option<PeerInfo> {
    let pairs = crate::istio::node::decode_pairs(bytes)?;
    let mut peer = PeerInfo::default();
    for (key, value) in pairs {
        let field = match key.as_str() {
            "workload" => &mut peer.workload,
            "namespace" => &mut peer.namespace,
            "cluster" => &mut peer.cluster,
            "service" => &mut peer.canonical_service,
            "revision" => &mut peer.canonical_revision,
            "app" => &mut peer.app,
            "version" => &mut peer.version,
            "identity" => &mut peer.identity,
            _ => continue,
        };
        *field = value;
    }
    peer.is_known().then_some(peer)
}

/// The bytes Envoy hands a Wasm module for a peer filter state with these string fields and
/// `labels` (a fixture built from the format in Envoy's `serializeValue`).
#[cfg(any(test, feature = "mock-host"))]
pub fn encode_filter_state(fields: &[(&str, &str)], labels: &[(&str, &str)]) -> Vec<u8> {
    use crate::headers::HeaderPairs;
    let nested = HeaderPairs::from_pairs(labels).into_bytes();
    let mut all: Vec<(&str, &[u8])> = fields.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
    all.push(("labels", &nested));
    HeaderPairs::from_pairs(&all).into_bytes()
}

/// Decode Istio's endpoint metadata `istio.workload`:
/// `workload;namespace;canonical_name;canonical_revision;cluster`. As `convertEndpointMetadata`
/// (istio/proxy `extensions/common/metadata_object.cc`): fewer than five parts is nothing, and
/// the encoding carries no app, version or identity.
pub fn from_host_workload(value: &str) -> Option<PeerInfo> {
    let parts: Vec<&str> = value.split(';').collect();
    if parts.len() < 5 {
        return None;
    }
    let peer = PeerInfo {
        workload: parts[0].into(),
        namespace: parts[1].into(),
        canonical_service: parts[2].into(),
        canonical_revision: parts[3].into(),
        cluster: parts[4].into(),
        ..Default::default()
    };
    peer.is_known().then_some(peer)
}

/// The namespace in a SPIFFE identity `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
pub fn spiffe_namespace(principal: &str) -> Option<&str> {
    let path = principal.strip_prefix("spiffe://")?;
    // The segment after the first `ns` segment past the trust domain (`split_once("/ns/")`,
    // without the substring searcher it would link into the module).
    let mut segments = path.split('/').skip(1);
    segments.position(|s| s == "ns")?;
    let ns = segments.next()?;
    (!ns.is_empty()).then_some(ns)
}

/// The `x-envoy-peer-metadata` value of a peer with these node metadata `fields` and `LABELS`.
#[cfg(any(test, feature = "mock-host"))]
pub fn encode_peer_metadata(fields: &[(&str, &str)], labels: &[(&str, &str)]) -> String {
    use base64::Engine;
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
    use base64::Engine;

    #[test]
    fn decodes_the_peer_metadata_header() {
        let h = encode_peer_metadata(
            &[("WORKLOAD_NAME", "productpage-v1"), ("NAMESPACE", "shop"), ("CLUSTER_ID", "east")],
            &[
                ("app", "productpage"),
                ("version", "v1"),
                (LABEL_CANONICAL_NAME, "productpage"),
                (LABEL_CANONICAL_REVISION, "v1"),
            ],
        );
        let p = from_peer_metadata_header(h.as_bytes()).unwrap();
        assert_eq!(p.workload, "productpage-v1");
        assert_eq!(p.namespace, "shop");
        assert_eq!(p.cluster, "east");
        assert_eq!((p.app.as_str(), p.version.as_str()), ("productpage", "v1"));
        assert_eq!((p.canonical_service.as_str(), p.canonical_revision.as_str()), ("productpage", "v1"));
    }

    #[test]
    fn canonical_names_come_from_their_labels_only() {
        // istio/proxy extensions/common/metadata_object.cc, convertStructToWorkloadMetadata.
        let h = encode_peer_metadata(&[("WORKLOAD_NAME", "w")], &[("app", "a"), ("version", "v")]);
        let p = from_peer_metadata_header(h.as_bytes()).unwrap();
        assert_eq!((p.canonical_service.as_str(), p.canonical_revision.as_str()), ("", ""));
        let h = encode_peer_metadata(
            &[("WORKLOAD_NAME", "w")],
            &[("app", "a"), ("app.kubernetes.io/name", "k"), ("version", "v"), ("app.kubernetes.io/version", "kv")],
        );
        let p = from_peer_metadata_header(h.as_bytes()).unwrap();
        assert_eq!((p.app.as_str(), p.version.as_str()), ("k", "kv"), "the qualified labels win");
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
    fn decodes_host_workload_metadata_without_app_and_version() {
        // istio/proxy extensions/common/metadata_object.cc, convertEndpointMetadata.
        let p = from_host_workload("reviews-v2;shop;reviews;v2;east").unwrap();
        assert_eq!((p.workload.as_str(), p.namespace.as_str(), p.cluster.as_str()), ("reviews-v2", "shop", "east"));
        assert_eq!((p.canonical_service.as_str(), p.canonical_revision.as_str()), ("reviews", "v2"));
        assert_eq!((p.app.as_str(), p.version.as_str()), ("", ""), "the encoding has no app or version");
        assert_eq!(from_host_workload("reviews-v2;shop;reviews;v2"), None, "fewer than five parts");
        assert_eq!(from_host_workload("garbage"), None);
        assert!(from_host_workload(";shop;a;b;c").is_some(), "Istio keeps a part-empty encoding");
        assert_eq!(from_host_workload(";;;;"), None);
        assert!(from_host_workload("a;b;c;d;e;f").is_some(), "extra parts are ignored");
    }

    #[test]
    fn decodes_the_peer_filter_state_struct() {
        let bytes = encode_filter_state(
            &[
                ("type", "deployment"),
                ("workload", "ratings-v1"),
                ("name", "ratings-v1-84975bc778-pxz2w"),
                ("namespace", "default"),
                ("cluster", "server-cluster"),
                ("service", "ratings"),
                ("revision", "version-1"),
                ("app", "ratings"),
                ("version", "v1"),
                ("identity", "spiffe://cluster.local/ns/default/sa/ratings"),
            ],
            &[("role", "server")],
        );
        let p = from_filter_state(&bytes).unwrap();
        assert_eq!(
            p,
            PeerInfo {
                workload: "ratings-v1".into(),
                namespace: "default".into(),
                app: "ratings".into(),
                version: "v1".into(),
                canonical_service: "ratings".into(),
                canonical_revision: "version-1".into(),
                cluster: "server-cluster".into(),
                identity: "spiffe://cluster.local/ns/default/sa/ratings".into(),
            }
        );
        // Istio omits empty fields; what is absent stays unknown.
        let p = from_filter_state(&encode_filter_state(&[("workload", "w")], &[])).unwrap();
        assert_eq!((p.workload.as_str(), p.app.as_str()), ("w", ""));
        assert_eq!(from_filter_state(&encode_filter_state(&[], &[])), None);
        assert_eq!(from_filter_state(b"\xff\xff\xff\xff"), None, "not a pairs map");
    }

    #[test]
    fn reads_namespace_from_spiffe_principals() {
        assert_eq!(spiffe_namespace("spiffe://cluster.local/ns/shop/sa/reviews"), Some("shop"));
        assert_eq!(spiffe_namespace("spiffe://cluster.local/ns//sa/x"), None);
        assert_eq!(spiffe_namespace("https://cluster.local/ns/shop/sa/x"), None);
        assert_eq!(spiffe_namespace("spiffe://td/sa/x"), None);
        // As `split_once("/ns/")` reads it.
        fn reference(p: &str) -> Option<&str> {
            let (_, rest) = p.strip_prefix("spiffe://")?.split_once("/ns/")?;
            Some(rest.split('/').next()?).filter(|ns| !ns.is_empty())
        }
        for p in [
            "spiffe://ns/ns/a",
            "spiffe://td/ns/",
            "spiffe://td/x/ns",
            "spiffe://td//ns/a",
            "spiffe://td/ns/a/ns/b",
            "spiffe://td/nss/a/ns/b",
            "spiffe://td/ns",
            "spiffe://",
            "spiffe:///ns/a",
            "spiffe://td/x/ns/y",
        ] {
            assert_eq!(spiffe_namespace(p), reference(p), "{p}");
        }
    }
}
