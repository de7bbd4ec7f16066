//! A typed model of the Istio resources meshtel renders and validates: `WasmPlugin` and
//! `TrafficExtension` (extensions.istio.io/v1alpha1), plus the companions `Telemetry` and
//! `ServiceEntry`. Field names and allowed values follow Istio's CRDs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// API group and version of WasmPlugin and TrafficExtension.
pub const EXTENSIONS_API: &str = "extensions.istio.io/v1alpha1";

/// Kubernetes object metadata, the part meshtel writes and checks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    /// Object name.
    #[serde(default)]
    pub name: String,
    /// Namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Anything else Kubernetes keeps in metadata (ignored by meshtel).
    #[serde(flatten, skip_serializing)]
    pub other: BTreeMap<String, Value>,
}

/// A Kubernetes resource with a typed spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resource<S> {
    /// `group/version`.
    pub api_version: String,
    /// Kind.
    pub kind: String,
    /// Metadata.
    pub metadata: Metadata,
    /// The spec.
    pub spec: S,
}

/// Workload selector.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    /// Labels a workload must carry.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// A policy attachment to a Gateway API resource or a Service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    /// API group (`gateway.networking.k8s.io`, `""` for core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Kind: `Gateway`, `GatewayClass`, `Service`, `ServiceEntry`.
    #[serde(default)]
    pub kind: String,
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Must be empty: cross-namespace references are not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// One `vmConfig.env` entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvVar {
    /// Variable name.
    #[serde(default)]
    pub name: String,
    /// `INLINE` (default) or `HOST` (taken from the proxy's environment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<String>,
    /// Inline value; not allowed with `HOST`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// The Wasm VM's configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmConfig {
    /// Environment variables the module can read.
    #[serde(default)]
    pub env: Vec<EnvVar>,
}

/// A port of a traffic selector.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSelector {
    /// Port number.
    pub number: i64,
}

/// Which traffic the plugin applies to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficSelector {
    /// `CLIENT`, `SERVER`, `CLIENT_AND_SERVER` (or `UNDEFINED`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSelector>,
}

/// The Wasm module fields WasmPlugin carries at its top level and TrafficExtension under `wasm`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WasmModule {
    /// Module location: `oci://`, `http(s)://` or `file://`.
    #[serde(default)]
    pub url: String,
    /// SHA-256 of the module or image, 64 lower-case hex characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// `IfNotPresent` or `Always`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    /// Secret for a private registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secret: Option<String>,
    /// Configuration passed to the module as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_config: Option<Value>,
    /// The module's root id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_name: Option<String>,
    /// `FAIL_CLOSE`, `FAIL_OPEN` or `FAIL_RELOAD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_strategy: Option<String>,
    /// VM configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_config: Option<VmConfig>,
    /// `HTTP` or `NETWORK`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub plugin_type: Option<String>,
    /// Public key verifying the image signature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_key: Option<String>,
}

/// `WasmPlugin.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WasmPluginSpec {
    /// Workloads it applies to; omitted: the whole namespace (or mesh, in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// Deprecated single target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<TargetRef>,
    /// Targets (at most 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_refs: Option<Vec<TargetRef>>,
    /// Where in the filter chain: `AUTHN`, `AUTHZ`, `STATS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Order within the phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    /// Traffic it applies to.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub traffic: Option<Vec<TrafficSelector>>,
    /// The module.
    #[serde(flatten)]
    pub module: WasmModule,
}

/// `TrafficExtension.spec` (Istio >= 1.30).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficExtensionSpec {
    /// Workloads it applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// Targets (at most 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_refs: Option<Vec<TargetRef>>,
    /// Where in the filter chain: `AUTHN`, `AUTHZ`, `STATS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Order within the phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    /// Traffic it applies to.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub traffic: Option<Vec<TrafficSelector>>,
    /// The Wasm module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm: Option<WasmModule>,
    /// A Lua filter instead (meshtel never renders one; accepted when validating).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lua: Option<Value>,
}

/// A WasmPlugin.
pub type WasmPlugin = Resource<WasmPluginSpec>;
/// A TrafficExtension.
pub type TrafficExtension = Resource<TrafficExtensionSpec>;

/// Allowed values of `failStrategy`.
pub const FAIL_STRATEGIES: &[&str] = &["FAIL_CLOSE", "FAIL_OPEN", "FAIL_RELOAD"];
/// Allowed values of `phase` on a WasmPlugin.
pub const WASMPLUGIN_PHASES: &[&str] = &["UNSPECIFIED_PHASE", "AUTHN", "AUTHZ", "STATS"];
/// Allowed values of `phase` on a TrafficExtension.
pub const TRAFFICEXTENSION_PHASES: &[&str] = &["UNSPECIFIED", "AUTHN", "AUTHZ", "STATS"];
/// Allowed values of `imagePullPolicy`.
pub const PULL_POLICIES: &[&str] = &["UNSPECIFIED_POLICY", "IfNotPresent", "Always"];
/// Allowed values of `type`.
pub const PLUGIN_TYPES: &[&str] = &["UNSPECIFIED_PLUGIN_TYPE", "HTTP", "NETWORK"];
/// Allowed values of `match[].mode`.
pub const MATCH_MODES: &[&str] = &["UNDEFINED", "CLIENT", "SERVER", "CLIENT_AND_SERVER"];
/// Allowed values of `vmConfig.env[].valueFrom`.
pub const ENV_SOURCES: &[&str] = &["INLINE", "HOST"];
