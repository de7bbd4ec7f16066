//! Rendering: deployment options to Istio resources (YAML), with the pluginConfig validated by
//! the filter's own parser.

use serde_json::{json, Value};

use crate::model::*;

/// Where the filter runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Every workload of these namespaces (one WasmPlugin each, no selector).
    Namespaces(Vec<String>),
    /// The ingress gateway only: by `istio: ingressgateway` selector, or a Gateway API Gateway by name.
    Gateway {
        /// Gateway API `Gateway` name; `None` selects the classic ingress gateway by label.
        name: Option<String>,
        /// Namespace of the gateway.
        namespace: String,
    },
    /// Workloads carrying a label, in these namespaces (empty: mesh-wide, in the root namespace).
    WorkloadLabel {
        /// Label key.
        key: String,
        /// Label value.
        value: String,
        /// Namespaces; empty means the whole mesh.
        namespaces: Vec<String>,
    },
    /// Every workload of the mesh.
    MeshWide,
    /// An ambient waypoint, by its Gateway (`targetRefs` kind `Gateway`; Istio attaches nothing
    /// else to a waypoint but Services and the `istio-waypoint` GatewayClass).
    Waypoint {
        /// The waypoint's Gateway name.
        name: String,
        /// Its namespace.
        namespace: String,
    },
    /// What the waypoints serving one Service do for it (`targetRefs` kind `Service`, in the
    /// Service's namespace).
    Service {
        /// Service name.
        name: String,
        /// Its namespace.
        namespace: String,
    },
    /// Every waypoint of the mesh (`targetRefs` GatewayClass `istio-waypoint`, root namespace).
    AllWaypoints,
}

/// Which Istio API to render.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// `WasmPlugin` (every Istio release since 1.12).
    Wasmplugin,
    /// `TrafficExtension` (Istio >= 1.30).
    Trafficextension,
}

/// A collector service address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectorAddress {
    /// Fully qualified host.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl CollectorAddress {
    /// Parse `HOST:PORT`. `name.namespace` and `name.namespace.svc` are completed to the
    /// cluster-local FQDN Istio names clusters after.
    pub fn parse(s: &str, cluster_domain: &str) -> Result<Self, String> {
        let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("--collector: expected HOST:PORT, got {s:?}"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("--collector: {port:?} is not a port number (1-65535) in {s:?}"))?;
        let valid = !host.is_empty()
            && host
                .split('.')
                .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        if !valid {
            return Err(format!("--collector: {host:?} is not a lower-case DNS name in {s:?}"));
        }
        let labels = host.split('.').count();
        let host = match labels {
            1 => return Err(format!("--collector: name the namespace too (NAME.NAMESPACE:PORT), got {s:?}")),
            2 => format!("{host}.svc.{cluster_domain}"),
            3 if host.ends_with(".svc") => format!("{host}.{cluster_domain}"),
            _ => host.to_string(),
        };
        Ok(Self { host, port })
    }

    /// The Istio cluster name sidecars know the service by.
    pub fn cluster(&self) -> String {
        format!("outbound|{}||{}", self.port, self.host)
    }

    /// `host:port`.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Everything a render needs, resolved and validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderOptions {
    /// Where the filter runs.
    pub mode: Mode,
    /// Resource name.
    pub name: String,
    /// Istio's root namespace (mesh-wide resources live there).
    pub root_namespace: String,
    /// Module URL (`oci://...`, `https://...`).
    pub url: String,
    /// Module digest to pin.
    pub sha256: Option<String>,
    /// The Secret the image is pulled with, in each resource's namespace.
    pub image_pull_secret: Option<String>,
    /// The pluginConfig, already accepted by the filter's parser.
    pub plugin_config: Value,
    /// `FAIL_OPEN`, `FAIL_CLOSE` or `FAIL_RELOAD`.
    pub fail_strategy: String,
    /// `AUTHN`, `AUTHZ` or `STATS`.
    pub phase: String,
    /// Priority within the phase.
    pub priority: Option<i64>,
    /// Which API to render.
    pub api: Api,
    /// Also render a Telemetry resource disabling Istio's own span reporting for the same workloads.
    pub disable_istio_tracing: bool,
    /// Also render a ServiceEntry for a collector outside the mesh.
    pub collector_service_entry: Option<CollectorAddress>,
    /// Host environment variables the filter reads (`vmConfig.env` with `valueFrom: HOST`).
    pub host_env: Vec<String>,
    /// Also render the network filter for Istio's TCP metrics, beside each HTTP one.
    pub tcp: bool,
    /// What could not be carried over from Istio's Telemetry resources, written as comments.
    pub notes: Vec<String>,
    /// More resources to render after meshtel's (Istio's telemetry turned off).
    pub extra: Vec<Value>,
}

/// The root id that makes the module Istio's TCP metrics' network filter (`pluginName`).
pub const TCP_PLUGIN_NAME: &str = "meshtel-tcp";

/// The two roles of the one module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The HTTP filter (`type: HTTP`).
    Http,
    /// The network filter for TCP metrics (`type: NETWORK`, `pluginName: meshtel-tcp`).
    Tcp,
}

/// Labels meshtel puts on what it renders.
pub fn labels() -> std::collections::BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name".to_string(), "meshtel".to_string()),
        ("app.kubernetes.io/managed-by".to_string(), "meshtel".to_string()),
    ]
    .into()
}

/// One attachment: namespace plus selector or target refs.
struct Attachment {
    namespace: String,
    selector: Option<Selector>,
    target_refs: Option<Vec<TargetRef>>,
}

fn attachments(opts: &RenderOptions) -> Vec<Attachment> {
    let selector = |k: &str, v: &str| Some(Selector { match_labels: [(k.to_string(), v.to_string())].into() });
    match &opts.mode {
        Mode::Namespaces(nss) => {
            nss.iter().map(|ns| Attachment { namespace: ns.clone(), selector: None, target_refs: None }).collect()
        }
        Mode::Gateway { name: None, namespace } => {
            vec![Attachment {
                namespace: namespace.clone(),
                selector: selector("istio", "ingressgateway"),
                target_refs: None,
            }]
        }
        Mode::Gateway { name: Some(name), namespace } => vec![Attachment {
            namespace: namespace.clone(),
            selector: None,
            target_refs: Some(vec![TargetRef {
                group: Some("gateway.networking.k8s.io".into()),
                kind: "Gateway".into(),
                name: name.clone(),
                namespace: None,
            }]),
        }],
        Mode::WorkloadLabel { key, value, namespaces } if namespaces.is_empty() => {
            vec![Attachment {
                namespace: opts.root_namespace.clone(),
                selector: selector(key, value),
                target_refs: None,
            }]
        }
        Mode::WorkloadLabel { key, value, namespaces } => namespaces
            .iter()
            .map(|ns| Attachment { namespace: ns.clone(), selector: selector(key, value), target_refs: None })
            .collect(),
        Mode::MeshWide => {
            vec![Attachment { namespace: opts.root_namespace.clone(), selector: None, target_refs: None }]
        }
        Mode::Waypoint { name, namespace } => {
            vec![target(namespace, Some(GATEWAY_API_GROUP), "Gateway", name)]
        }
        Mode::Service { name, namespace } => vec![target(namespace, Some(""), "Service", name)],
        Mode::AllWaypoints => {
            vec![target(&opts.root_namespace, Some(GATEWAY_API_GROUP), "GatewayClass", WAYPOINT_GATEWAY_CLASS)]
        }
    }
}

/// The Gateway API group of `Gateway` and `GatewayClass` targets.
pub const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";
/// The GatewayClass of Istio's waypoints.
pub const WAYPOINT_GATEWAY_CLASS: &str = "istio-waypoint";

fn target(namespace: &str, group: Option<&str>, kind: &str, name: &str) -> Attachment {
    Attachment {
        namespace: namespace.to_string(),
        selector: None,
        target_refs: Some(vec![TargetRef {
            group: group.map(str::to_string),
            kind: kind.into(),
            name: name.into(),
            namespace: None,
        }]),
    }
}

fn module(opts: &RenderOptions, role: Role) -> WasmModule {
    let env: Vec<EnvVar> = opts
        .host_env
        .iter()
        .map(|name| EnvVar { name: name.clone(), value_from: Some("HOST".into()), value: None })
        .collect();
    WasmModule {
        url: opts.url.clone(),
        sha256: opts.sha256.clone(),
        image_pull_policy: Some("IfNotPresent".into()),
        image_pull_secret: opts.image_pull_secret.clone(),
        plugin_config: Some(opts.plugin_config.clone()),
        fail_strategy: Some(opts.fail_strategy.clone()),
        vm_config: (!env.is_empty()).then_some(VmConfig { env }),
        plugin_type: Some(if role == Role::Tcp { "NETWORK" } else { "HTTP" }.into()),
        plugin_name: (role == Role::Tcp).then(|| TCP_PLUGIN_NAME.into()),
        ..Default::default()
    }
}

fn metadata(name: &str, namespace: &str) -> Metadata {
    Metadata { name: name.into(), namespace: Some(namespace.into()), labels: labels(), ..Default::default() }
}

/// The WasmPlugin or TrafficExtension of one attachment and role. The network filter's is
/// named `<name>-tcp`.
fn extension(opts: &RenderOptions, a: &Attachment, role: Role) -> Result<Value, String> {
    let name = match role {
        Role::Http => opts.name.clone(),
        Role::Tcp => format!("{}-tcp", opts.name),
    };
    match opts.api {
        Api::Wasmplugin => serde_json::to_value(WasmPlugin {
            api_version: EXTENSIONS_API.into(),
            kind: "WasmPlugin".into(),
            metadata: metadata(&name, &a.namespace),
            spec: WasmPluginSpec {
                selector: a.selector.clone(),
                target_ref: None,
                target_refs: a.target_refs.clone(),
                phase: Some(opts.phase.clone()),
                priority: opts.priority,
                traffic: None,
                module: module(opts, role),
            },
        }),
        Api::Trafficextension => serde_json::to_value(TrafficExtension {
            api_version: EXTENSIONS_API.into(),
            kind: "TrafficExtension".into(),
            metadata: metadata(&name, &a.namespace),
            spec: TrafficExtensionSpec {
                selector: a.selector.clone(),
                target_refs: a.target_refs.clone(),
                phase: Some(opts.phase.clone()),
                priority: opts.priority,
                traffic: None,
                wasm: Some(module(opts, role)),
                lua: None,
            },
        }),
    }
    .map_err(|e| format!("cannot serialize the resource: {e}"))
}

/// The resources for `opts`, as JSON values in render order.
pub fn resources(opts: &RenderOptions) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    let roles: &[Role] = if opts.tcp { &[Role::Http, Role::Tcp] } else { &[Role::Http] };
    for a in attachments(opts) {
        for role in roles {
            out.push(extension(opts, &a, *role)?);
        }
        if opts.disable_istio_tracing {
            let mut spec = json!({"tracing": [{"disableSpanReporting": true}]});
            if let Some(s) = &a.selector {
                spec["selector"] = json!({"matchLabels": s.match_labels});
            }
            if let Some(t) = &a.target_refs {
                spec["targetRefs"] = serde_json::to_value(t).map_err(|e| e.to_string())?;
            }
            out.push(json!({
                "apiVersion": "telemetry.istio.io/v1",
                "kind": "Telemetry",
                "metadata": metadata(&format!("{}-disable-istio-tracing", opts.name), &a.namespace),
                "spec": spec,
            }));
        }
    }
    if let Some(c) = &opts.collector_service_entry {
        let grpc = opts.plugin_config.pointer("/collector/protocol").and_then(|p| p.as_str()) == Some("grpc");
        let port = if grpc {
            json!({"number": c.port, "name": "grpc-otlp", "protocol": "GRPC"})
        } else {
            json!({"number": c.port, "name": "http-otlp", "protocol": "HTTP"})
        };
        out.push(json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": metadata(&format!("{}-collector", opts.name), &opts.root_namespace),
            "spec": {
                "hosts": [c.host],
                "location": "MESH_EXTERNAL",
                "resolution": "DNS",
                "ports": [port],
            },
        }));
    }
    out.extend(opts.extra.iter().cloned());
    Ok(out)
}

/// Render `opts` as a multi-document YAML stream.
pub fn render(opts: &RenderOptions) -> Result<String, String> {
    let mut yaml = String::new();
    if !opts.notes.is_empty() {
        yaml.push_str("# From Istio's Telemetry resources, not carried over or carried with a caveat:\n");
        for n in &opts.notes {
            yaml.push_str(&format!("# - {}\n", n.replace('\n', " ")));
        }
    }
    for r in resources(opts)? {
        yaml.push_str("---\n");
        yaml.push_str(&serde_norway::to_string(&r).map_err(|e| format!("cannot write YAML: {e}"))?);
        if !yaml.ends_with('\n') {
            yaml.push('\n');
        }
    }
    Ok(yaml)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completes_short_collector_names() {
        let c = CollectorAddress::parse("otel-collector.observability:4318", "cluster.local").unwrap();
        assert_eq!(c.cluster(), "outbound|4318||otel-collector.observability.svc.cluster.local");
        assert_eq!(c.authority(), "otel-collector.observability.svc.cluster.local:4318");
        let c = CollectorAddress::parse("otel.obs.svc:4318", "corp.local").unwrap();
        assert_eq!(c.host, "otel.obs.svc.corp.local");
        let c = CollectorAddress::parse("otlp.example.com:443", "cluster.local").unwrap();
        assert_eq!(c.host, "otlp.example.com");
    }

    #[test]
    fn refuses_bad_collector_addresses() {
        for (bad, why) in [
            ("otel", "expected HOST:PORT"),
            ("otel.obs:http", "is not a port number"),
            ("otel.obs:0", "is not a port number"),
            ("otel.obs:70000", "is not a port number"),
            ("OTEL.obs:4318", "is not a lower-case DNS name"),
            (":4318", "is not a lower-case DNS name"),
            ("otel:4318", "name the namespace too"),
        ] {
            let e = CollectorAddress::parse(bad, "cluster.local").unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
