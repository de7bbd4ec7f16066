//! Istio-shaped proxies on 127.0.0.1: sidecars with inbound and outbound listeners, and a gateway.

use serde_json::{json, Value};

use crate::envoy::{Cluster, Direction, Endpoint, Envoy, Listener, Node, Proxy, COLLECTOR_CLUSTER};
use crate::free_port;
use crate::tls::Identity;

/// The plugin config the tests start from: the collector cluster and a short flush interval,
/// with `overrides` merged in (objects merge key by key, anything else replaces).
pub fn plugin_config(overrides: Value) -> Value {
    let mut config = json!({
        "collector": {"cluster": COLLECTOR_CLUSTER},
        "export": {"flush_interval_ms": 100},
    });
    merge(&mut config, overrides);
    config
}

/// Merge `patch` into `base`.
pub fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, p) => *b = p,
    }
}

/// The Istio cluster name of service `host` (e.g. `b.ns-b.svc.cluster.local`) on port 8080.
pub fn service_cluster(host: &str) -> String {
    format!("outbound|8080||{host}")
}

/// A running sidecar proxy.
pub struct Sidecar {
    /// The Envoy process.
    pub envoy: Envoy,
    /// Port of the inbound listener (what other proxies call).
    pub inbound: u16,
    /// Port of the outbound listener (what the app calls).
    pub outbound: u16,
}

/// What a sidecar is started with.
pub struct SidecarSpec {
    /// App label and canonical service.
    pub app: String,
    /// Namespace.
    pub namespace: String,
    /// Port of the app behind the inbound listener.
    pub app_port: u16,
    /// Service host and port the outbound listener routes to, if any.
    pub upstream: Option<(String, u16)>,
    /// The OTLP receiver (an unused port simulates a collector that is down).
    pub collector: Endpoint,
    /// meshtel's plugin config; `None` runs without meshtel.
    pub plugin_config: Option<Value>,
    /// Worker threads.
    pub concurrency: u32,
    /// Port of the outbound listener, when the app must know it before the sidecar starts.
    pub outbound_port: Option<u16>,
    /// Serve inbound traffic with mutual TLS under this identity.
    pub mtls: Option<Identity>,
    /// Send this workload's `x-envoy-peer-metadata` as Istio's metadata exchange does
    /// (on outbound requests and inbound responses).
    pub exchange: bool,
    /// Environment of the proxy exposed to the filter (Istio's `vmConfig.env` with `valueFrom: HOST`).
    pub vm_env: Vec<(String, String)>,
    /// The module; `None` is the release build.
    pub wasm: Option<std::path::PathBuf>,
    /// Envoy's failure policy for the module.
    pub failure_policy: &'static str,
}

/// Istio's peer metadata header.
const PEER_METADATA: &str = "x-envoy-peer-metadata";

impl SidecarSpec {
    /// A sidecar for `app` in `namespace` with the default test plugin config and one worker.
    pub fn new(app: &str, namespace: &str, app_port: u16, collector: impl Into<Endpoint>) -> Self {
        Self {
            app: app.into(),
            namespace: namespace.into(),
            app_port,
            upstream: None,
            collector: collector.into(),
            plugin_config: Some(plugin_config(json!({}))),
            concurrency: 1,
            outbound_port: None,
            mtls: None,
            exchange: false,
            vm_env: Vec::new(),
            wasm: None,
            failure_policy: "FAIL_OPEN",
        }
    }

    /// Run this module with this Envoy failure policy.
    pub fn module(mut self, wasm: std::path::PathBuf, failure_policy: &'static str) -> Self {
        self.wasm = Some(wasm);
        self.failure_policy = failure_policy;
        self
    }

    /// Set `name` in the proxy's environment and expose it to the filter.
    pub fn host_env(mut self, name: &str, value: &str) -> Self {
        self.vm_env.push((name.into(), value.into()));
        self
    }

    /// Exchange peer metadata headers as Istio's sidecars do.
    pub fn exchange_metadata(mut self) -> Self {
        self.exchange = true;
        self
    }

    /// Require mutual TLS on the inbound listener, serving `identity`.
    pub fn mtls(mut self, identity: Identity) -> Self {
        self.mtls = Some(identity);
        self
    }

    /// Bind the outbound listener to `port` (chosen with [`free_port`] before the app starts).
    pub fn outbound_port(mut self, port: u16) -> Self {
        self.outbound_port = Some(port);
        self
    }

    /// Route the outbound listener to `host` at `port`.
    pub fn upstream(mut self, host: &str, port: u16) -> Self {
        self.upstream = Some((host.into(), port));
        self
    }

    /// Merge `overrides` into the plugin config.
    pub fn config(mut self, overrides: Value) -> Self {
        self.plugin_config = Some(plugin_config(overrides));
        self
    }

    /// Use this many worker threads.
    pub fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = n;
        self
    }

    /// The Envoy configuration this spec describes, with the ports chosen.
    pub fn proxy(&self) -> (Proxy, u16, u16) {
        let (inbound, outbound) = (free_port(), self.outbound_port.unwrap_or_else(free_port));
        let inbound_cluster = format!("inbound|{}||", 8080);
        let exchange = self.exchange.then(|| crate::metrics::peer_metadata(&self.app, &self.namespace));
        let mut inbound_listener = Listener::new("virtualInbound", inbound, Direction::Inbound, &inbound_cluster);
        inbound_listener.mtls = self.mtls.clone();
        if let Some(md) = &exchange {
            inbound_listener.response_headers.push((PEER_METADATA.into(), md.clone()));
        }
        let mut listeners = vec![inbound_listener];
        let own_service = format!("{}.{}.svc.cluster.local", self.app, self.namespace);
        let mut clusters = vec![
            Cluster::new(&inbound_cluster, self.app_port).istio_service(&own_service, false),
            Cluster::to(COLLECTOR_CLUSTER, self.collector.clone()),
        ];
        if let Some((host, port)) = &self.upstream {
            let mut outbound_listener =
                Listener::new("0.0.0.0_8080", outbound, Direction::Outbound, &service_cluster(host));
            if let Some(md) = &exchange {
                outbound_listener.request_headers.push((PEER_METADATA.into(), md.clone()));
            }
            listeners.push(outbound_listener);
            clusters.push(Cluster::new(&service_cluster(host), *port).istio_service(host, true));
        }
        let proxy = Proxy {
            concurrency: self.concurrency,
            vm_env: self.vm_env.clone(),
            wasm: self.wasm.clone(),
            failure_policy: self.failure_policy,
            ..Proxy::new(Node::sidecar(&self.app, &self.namespace), listeners, clusters, self.plugin_config.clone())
        };
        (proxy, inbound, outbound)
    }

    /// Start the sidecar.
    pub fn start(self) -> Sidecar {
        let (proxy, inbound, outbound) = self.proxy();
        Sidecar { envoy: Envoy::start(&proxy), inbound, outbound }
    }
}

/// A running ingress gateway.
pub struct Gateway {
    /// The Envoy process.
    pub envoy: Envoy,
    /// Port of its listener.
    pub port: u16,
}

/// Start an ingress gateway routing everything to service `host` at `port`.
pub fn gateway(host: &str, port: u16, collector: impl Into<Endpoint>, config: Value) -> Gateway {
    gateway_with(host, port, collector, config, None, false)
}

/// Start an ingress gateway that calls `host` with mutual TLS (presenting `identity`) and, with
/// `exchange`, sends its peer metadata header as Istio's gateways do.
pub fn gateway_with(
    host: &str,
    port: u16,
    collector: impl Into<Endpoint>,
    config: Value,
    identity: Option<Identity>,
    exchange: bool,
) -> Gateway {
    let listen = free_port();
    let mut upstream = Cluster::new(&service_cluster(host), port).istio_service(host, true);
    upstream.mtls = identity;
    let mut listener = Listener::new("0.0.0.0_8080", listen, Direction::Outbound, &service_cluster(host));
    if exchange {
        listener.request_headers.push((PEER_METADATA.into(), crate::metrics::peer_metadata_of(&Node::gateway())));
    }
    let proxy = Proxy::new(
        Node::gateway(),
        vec![listener],
        vec![upstream, Cluster::to(COLLECTOR_CLUSTER, collector)],
        Some(config),
    );
    Gateway { envoy: Envoy::start(&proxy), port: listen }
}
