//! Command-line interface and the resolution of flags and `--config` files into render options.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::istio_telemetry::CarriedOver;
use crate::render::{Api, CollectorAddress, Mode, RenderOptions};

/// Default module image: meshtel's release for this version.
pub const DEFAULT_IMAGE: &str = concat!("oci://ghcr.io/meshtel/meshtel-filter:", env!("CARGO_PKG_VERSION"));
/// Default collector: an OpenTelemetry Collector Service in the `observability` namespace.
pub const DEFAULT_COLLECTOR: &str = "otel-collector.observability:4318";

/// meshtel deploys OpenTelemetry tracing and Istio metrics into an Istio mesh as a Wasm filter.
#[derive(Debug, Parser)]
#[command(name = "meshtel", version, about, long_about = None, arg_required_else_help = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Render the Istio resources that deploy meshtel, ready for `kubectl apply -f -`.
    #[command(after_help = RENDER_EXAMPLES)]
    Render(Box<RenderArgs>),
    /// Check WasmPlugin and TrafficExtension YAML the way Istio would, and meshtel's pluginConfig.
    Validate(ValidateArgs),
    /// Package meshtel_filter.wasm as an OCI artifact Istio can pull, and optionally push it.
    Package(PackageArgs),
}

const RENDER_EXAMPLES: &str = "Examples:
  meshtel render --namespace shop | kubectl apply -f -
  meshtel render --gateway --collector otel-collector.observability:4318
  meshtel render --workload-label meshtel.io/trace=enabled --sampling 0.1";

/// `FAIL_OPEN` and friends.
/// The OTLP transport to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[value(rename_all = "lower")]
#[serde(rename_all = "lowercase")]
pub enum CollectorProtocol {
    /// OTLP/HTTP (protobuf), usually port 4318.
    Http,
    /// OTLP/gRPC, usually port 4317.
    Grpc,
}

/// Which requests get an access-log record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[value(rename_all = "lower")]
#[serde(rename_all = "lowercase")]
pub enum LogMode {
    /// Every request.
    All,
    /// Failed requests only (status >= 400, no response, or Envoy response flags).
    Errors,
    /// Requests whose trace is sampled.
    Sampled,
    /// No access logs.
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[value(rename_all = "SCREAMING_SNAKE_CASE")]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailStrategy {
    /// Requests go on without the filter if it cannot load (meshtel's default: telemetry never takes traffic down).
    FailOpen,
    /// Requests fail while the filter cannot load (Istio's default).
    FailClose,
    /// Reload the VM after a fatal error, failing open meanwhile (Istio >= 1.27).
    FailReload,
}

/// Filter chain phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[value(rename_all = "SCREAMING_SNAKE_CASE")]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Phase {
    /// Before Istio's authentication filters.
    Authn,
    /// Before Istio's authorization filters.
    Authz,
    /// Before Istio's stats filter (meshtel's default: it sees every request, denied ones included).
    Stats,
}

impl FailStrategy {
    fn as_str(self) -> &'static str {
        match self {
            FailStrategy::FailOpen => "FAIL_OPEN",
            FailStrategy::FailClose => "FAIL_CLOSE",
            FailStrategy::FailReload => "FAIL_RELOAD",
        }
    }
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Authn => "AUTHN",
            Phase::Authz => "AUTHZ",
            Phase::Stats => "STATS",
        }
    }
}

/// `meshtel render`.
#[derive(Debug, Args, Default)]
pub struct RenderArgs {
    /// Run in every workload of this namespace (repeatable); with --workload-label, only there.
    #[arg(long = "namespace", value_name = "NS", help_heading = "Where")]
    pub namespaces: Vec<String>,
    /// Run in the ingress gateway only (selector `istio: ingressgateway`); traces only unless --metrics.
    #[arg(long, help_heading = "Where")]
    pub gateway: bool,
    /// With --gateway: attach to this Gateway API Gateway (targetRefs) instead of the label selector.
    #[arg(long, value_name = "NAME", help_heading = "Where")]
    pub gateway_name: Option<String>,
    /// With --gateway: the gateway's namespace [default: istio-system].
    #[arg(long, value_name = "NS", help_heading = "Where")]
    pub gateway_namespace: Option<String>,
    /// Run in workloads carrying this label, mesh-wide (or in the --namespace given).
    #[arg(long, value_name = "KEY=VALUE", help_heading = "Where")]
    pub workload_label: Option<String>,
    /// Run in every workload of the mesh.
    #[arg(long, help_heading = "Where")]
    pub mesh_wide: bool,
    /// Run in the ambient waypoint of this Gateway name, in the one --namespace given.
    #[arg(long, value_name = "NAME", help_heading = "Where")]
    pub waypoint: Option<String>,
    /// Run in the waypoints for this Service, in the one --namespace given (the Service's).
    #[arg(long, value_name = "NAME", help_heading = "Where")]
    pub service: Option<String>,
    /// Run in every ambient waypoint of the mesh (GatewayClass istio-waypoint, root namespace).
    #[arg(long, help_heading = "Where")]
    pub all_waypoints: bool,

    /// The collector Service, NAME.NAMESPACE:PORT or an FQDN [default: otel-collector.observability:4318].
    #[arg(long, value_name = "HOST:PORT", help_heading = "Telemetry")]
    pub collector: Option<String>,
    /// OTLP transport [default: grpc for port 4317, else http].
    #[arg(long, value_enum, value_name = "PROTOCOL", help_heading = "Telemetry")]
    pub collector_protocol: Option<CollectorProtocol>,
    /// Export an access log per request as OTLP logs: all, errors or sampled requests [default: off].
    #[arg(long, value_enum, value_name = "MODE", help_heading = "Telemetry")]
    pub logs: Option<LogMode>,
    /// Share of new traces sampled, 0 to 1 [default: 1].
    #[arg(long, value_name = "RATIO", value_parser = parse_ratio, help_heading = "Telemetry")]
    pub sampling: Option<f64>,
    /// Record and export spans [default].
    #[arg(long, overrides_with = "no_traces", help_heading = "Telemetry")]
    pub traces: bool,
    /// Do not trace.
    #[arg(long, help_heading = "Telemetry")]
    pub no_traces: bool,
    /// Record and export Istio metrics [default, except with --gateway].
    #[arg(long, overrides_with = "no_metrics", help_heading = "Telemetry")]
    pub metrics: bool,
    /// Do not record metrics.
    #[arg(long, help_heading = "Telemetry")]
    pub no_metrics: bool,
    /// Also render the network filter (type NETWORK, pluginName meshtel-tcp) for Istio's TCP
    /// metrics, istio_tcp_* [default, wherever metrics are on].
    #[arg(long, overrides_with = "no_tcp", help_heading = "Telemetry")]
    pub tcp: bool,
    /// Do not render the network filter.
    #[arg(long, help_heading = "Telemetry")]
    pub no_tcp: bool,
    /// Send HEADER to the collector with the value of the proxy's environment variable VAR
    /// (vmConfig.env with valueFrom HOST: credentials from a Secret, never inline; repeatable).
    #[arg(long = "collector-header-from-env", value_name = "HEADER=VAR", help_heading = "Telemetry")]
    pub header_env: Vec<String>,

    /// The module image [default: the meshtel release image of this version].
    #[arg(long, value_name = "oci://REF", conflicts_with = "wasm_url", help_heading = "Module")]
    pub image: Option<String>,
    /// The module over http(s):// or file:// instead of an image.
    #[arg(long, value_name = "URL", help_heading = "Module")]
    pub wasm_url: Option<String>,
    /// Pin the module (or, for an image, the digest `meshtel package` printed).
    #[arg(long, value_name = "HEX", conflicts_with = "wasm_file", help_heading = "Module")]
    pub sha256: Option<String>,
    /// Pin the module served at --wasm-url by hashing this local copy.
    #[arg(long, value_name = "PATH", help_heading = "Module")]
    pub wasm_file: Option<PathBuf>,
    /// Pull the image with this Secret (type kubernetes.io/dockerconfigjson, in the namespace of
    /// each rendered resource: Istio looks it up there).
    #[arg(long, value_name = "NAME", help_heading = "Module")]
    pub image_pull_secret: Option<String>,

    /// What happens to requests if the module cannot load [default: FAIL_OPEN].
    #[arg(long, value_enum, help_heading = "Istio")]
    pub fail_strategy: Option<FailStrategy>,
    /// Filter chain phase [default: STATS].
    #[arg(long, value_enum, help_heading = "Istio")]
    pub phase: Option<Phase>,
    /// Priority within the phase.
    #[arg(long, allow_negative_numbers = true, help_heading = "Istio")]
    pub priority: Option<i32>,
    /// Render a WasmPlugin, or Istio's newer TrafficExtension (Istio >= 1.30) [default: wasmplugin].
    #[arg(long, value_enum, help_heading = "Istio")]
    pub api: Option<Api>,
    /// Also render a Telemetry resource that turns off Istio's own span reporting for the same workloads.
    #[arg(long, help_heading = "Istio")]
    pub disable_istio_tracing: bool,
    /// Also render a ServiceEntry for a collector outside the mesh.
    #[arg(long, help_heading = "Istio")]
    pub collector_service_entry: bool,
    /// Resource name [default: meshtel].
    #[arg(long, help_heading = "Istio")]
    pub name: Option<String>,
    /// Istio's root namespace [default: istio-system].
    #[arg(long, value_name = "NS", help_heading = "Istio")]
    pub root_namespace: Option<String>,

    /// Carry over a mesh's Istio Telemetry resources (YAML documents, or `kubectl get telemetry
    /// -A -o yaml`; `-` reads stdin): mesh-wide, per namespace and per workload selector, merged as
    /// istiod merges them; what cannot be carried is listed as comments and on stderr. Without
    /// a `Where` option, meshtel runs mesh-wide.
    #[arg(long, value_name = "FILE", help_heading = "Coming from Istio's Telemetry API")]
    pub from_istio_telemetry: Option<PathBuf>,
    /// With --from-istio-telemetry: also render those resources again with Istio's own metrics
    /// and span reporting off (applying them replaces them), so that nothing is counted twice.
    #[arg(long, requires = "from_istio_telemetry", help_heading = "Coming from Istio's Telemetry API")]
    pub disable_istio_telemetry: bool,
    /// Check the Telemetry resources against these CRDs' OpenAPI schemas
    /// (e.g. `kubectl get crd telemetries.telemetry.istio.io -o yaml`).
    #[arg(
        long,
        value_name = "FILE",
        requires = "from_istio_telemetry",
        help_heading = "Coming from Istio's Telemetry API"
    )]
    pub crds: Option<PathBuf>,

    /// A YAML file with `pluginConfig:` (the whole filter config) and any of these options
    /// (same names, e.g. `sampling: 0.1`); flags win over the file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Write to FILE instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// `meshtel validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// YAML files with WasmPlugin or TrafficExtension resources (other kinds are skipped).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Also validate against these CRDs' OpenAPI schemas
    /// (e.g. `kubectl get crd wasmplugins.extensions.istio.io -o yaml`).
    #[arg(long, value_name = "FILE")]
    pub crds: Option<PathBuf>,
}

/// `meshtel package`.
#[derive(Debug, Args)]
pub struct PackageArgs {
    /// The module to package.
    #[arg(value_name = "WASM", default_value = "target/wasm32-wasip1/release/meshtel_filter.wasm")]
    pub wasm: PathBuf,
    /// Write the artifact as an OCI image layout in this directory.
    #[arg(short, long, value_name = "DIR", default_value = "meshtel-oci")]
    pub output: PathBuf,
    /// Tag recorded in the layout.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    pub tag: String,
    /// Push the artifact to REGISTRY/REPO:TAG, with the credentials `docker login` stored
    /// (`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`: credential helpers, credsStore,
    /// auths), or those of --username and --password-stdin.
    #[arg(long, value_name = "REGISTRY/REPO:TAG")]
    pub push: Option<String>,
    /// The user name to push as; the password (or token) comes from --password-stdin.
    #[arg(long, value_name = "USER", requires = "push")]
    pub username: Option<String>,
    /// Read the password (or token) for --username from stdin.
    #[arg(long, requires = "push")]
    pub password_stdin: bool,
    /// Talk plain HTTP to a registry off the loopback interface (loopback registries are tried
    /// over HTTPS, then plain HTTP, without it, as Docker does).
    #[arg(long)]
    pub insecure: bool,
    /// What to print: text, or JSON for scripts (digest, size, reference, render flags).
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

/// What `meshtel package` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "lower")]
pub enum Format {
    /// Lines for people.
    Text,
    /// One JSON object.
    Json,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    let r: f64 = s.parse().map_err(|_| format!("not a number: {s:?}"))?;
    if !(0.0..=1.0).contains(&r) {
        return Err(format!("must be between 0 and 1, got {r}"));
    }
    Ok(r)
}

/// Options a `--config` file may set, named like the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct FileOptions {
    #[serde(rename = "pluginConfig")]
    plugin_config: Option<Value>,
    #[serde(default)]
    namespace: Vec<String>,
    gateway: Option<bool>,
    gateway_name: Option<String>,
    gateway_namespace: Option<String>,
    workload_label: Option<String>,
    mesh_wide: Option<bool>,
    collector: Option<String>,
    collector_protocol: Option<CollectorProtocol>,
    logs: Option<LogMode>,
    sampling: Option<f64>,
    traces: Option<bool>,
    metrics: Option<bool>,
    #[serde(default)]
    collector_header_from_env: Vec<String>,
    image: Option<String>,
    wasm_url: Option<String>,
    sha256: Option<String>,
    wasm_file: Option<PathBuf>,
    image_pull_secret: Option<String>,
    fail_strategy: Option<FailStrategy>,
    phase: Option<Phase>,
    priority: Option<i32>,
    api: Option<Api>,
    disable_istio_tracing: Option<bool>,
    collector_service_entry: Option<bool>,
    tcp: Option<bool>,
    name: Option<String>,
    root_namespace: Option<String>,
    cluster_domain: Option<String>,
}

fn read_file_options(path: &Path) -> Result<FileOptions, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("--config: cannot read {}: {e}", path.display()))?;
    serde_norway::from_str(&text).map_err(|e| format!("--config {}: {e}", path.display()))
}

fn flag(on: bool, off: bool) -> Option<bool> {
    match (on, off) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    }
}

fn sha256_file(path: &Path) -> Result<String, String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).map_err(|e| format!("--wasm-file: cannot read {}: {e}", path.display()))?;
    Ok(Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect())
}

fn set(config: &mut Value, path: &[&str], value: Value) {
    let mut at = config;
    for key in &path[..path.len() - 1] {
        if !at.get(*key).is_some_and(Value::is_object) {
            at[*key] = json!({});
        }
        at = &mut at[*key];
    }
    at[path[path.len() - 1]] = value;
}

/// Resolve flags and the optional `--config` file into validated render options.
pub fn render_options(args: &RenderArgs) -> Result<RenderOptions, String> {
    let file = match &args.config {
        Some(p) => read_file_options(p)?,
        None => FileOptions::default(),
    };
    let namespaces = if args.namespaces.is_empty() { file.namespace.clone() } else { args.namespaces.clone() };
    let gateway = args.gateway || file.gateway.unwrap_or(false);
    let mesh_wide = args.mesh_wide || file.mesh_wide.unwrap_or(false);
    let workload_label = args.workload_label.clone().or(file.workload_label.clone());
    let gateway_name = args.gateway_name.clone().or(file.gateway_name.clone());
    let root_namespace =
        args.root_namespace.clone().or(file.root_namespace.clone()).unwrap_or_else(|| "istio-system".into());
    for ns in namespaces.iter().chain(args.gateway_namespace.iter()).chain(std::iter::once(&root_namespace)) {
        if !crate::rules::is_dns_subdomain(ns) || ns.contains('.') || ns.len() > 63 {
            return Err(format!("{ns:?} is not a valid namespace name"));
        }
    }

    let waypoint_modes =
        usize::from(args.waypoint.is_some()) + usize::from(args.service.is_some()) + usize::from(args.all_waypoints);
    let mode = if waypoint_modes > 0 {
        waypoint_mode(args, &namespaces, gateway || mesh_wide || workload_label.is_some(), waypoint_modes)?
    } else {
        match (gateway, mesh_wide, &workload_label, namespaces.is_empty()) {
        (true, false, None, true) => Mode::Gateway {
            name: gateway_name,
            namespace: args
                .gateway_namespace
                .clone()
                .or(file.gateway_namespace.clone())
                .unwrap_or_else(|| "istio-system".into()),
        },
        (true, ..) => {
            return Err("--gateway cannot be combined with --namespace, --workload-label or --mesh-wide".into())
        }
        (false, true, None, true) => Mode::MeshWide,
        (false, true, ..) => return Err("--mesh-wide cannot be combined with --namespace or --workload-label".into()),
        (false, false, Some(label), _) => {
            let (key, value) =
                label.split_once('=').ok_or_else(|| format!("--workload-label: expected KEY=VALUE, got {label:?}"))?;
            if !crate::rules::is_label_key(key) {
                return Err(format!("--workload-label: {key:?} is not a valid label key"));
            }
            if value.is_empty() || !crate::rules::is_label_value(value) || value.contains('*') {
                return Err(format!("--workload-label: {value:?} is not a valid label value"));
            }
            Mode::WorkloadLabel { key: key.into(), value: value.into(), namespaces }
        }
        (false, false, None, false) => Mode::Namespaces(namespaces),
        (false, false, None, true) if args.from_istio_telemetry.is_some() => Mode::MeshWide,
        (false, false, None, true) => {
            return Err(
                "choose where meshtel runs: --namespace NS, --gateway, --workload-label KEY=VALUE, --mesh-wide, --waypoint NAME, --service NAME or --all-waypoints"
                    .into(),
            )
        }
    }
    };
    if gateway_name_without_gateway(args, &mode) {
        return Err("--gateway-name and --gateway-namespace need --gateway".into());
    }

    let cluster_domain = file.cluster_domain.clone().unwrap_or_else(|| "cluster.local".into());
    let mut plugin_config = file.plugin_config.clone().unwrap_or_else(|| json!({}));
    if !plugin_config.is_object() {
        return Err("--config: pluginConfig must be a mapping".into());
    }
    let carried = args
        .from_istio_telemetry
        .as_deref()
        .map(|p| carry_over(p, args.crds.as_deref(), &root_namespace))
        .transpose()?;
    if let Some(c) = &carried {
        c.apply_to(&mut plugin_config);
    }
    let collector_flag = args.collector.clone().or(file.collector.clone());
    let collector = match (&collector_flag, plugin_config.pointer("/collector/cluster")) {
        (Some(c), _) => Some(CollectorAddress::parse(c, &cluster_domain)?),
        (None, Some(_)) => None,
        (None, None) => Some(CollectorAddress::parse(DEFAULT_COLLECTOR, &cluster_domain)?),
    };
    if let Some(c) = &collector {
        set(&mut plugin_config, &["collector", "cluster"], json!(c.cluster()));
        set(&mut plugin_config, &["collector", "authority"], json!(c.authority()));
    }
    // Told, or else OTLP's well-known gRPC port decides (pluginConfig's own choice stands).
    let inferred = collector
        .as_ref()
        .filter(|c| c.port == 4317 && plugin_config.pointer("/collector/protocol").is_none())
        .map(|_| CollectorProtocol::Grpc);
    if let Some(p) = args.collector_protocol.or(file.collector_protocol).or(inferred) {
        let name = match p {
            CollectorProtocol::Http => "http",
            CollectorProtocol::Grpc => "grpc",
        };
        set(&mut plugin_config, &["collector", "protocol"], json!(name));
    }
    match args.logs.or(file.logs) {
        Some(LogMode::Off) => set(&mut plugin_config, &["logs", "enabled"], json!(false)),
        Some(mode) => {
            set(&mut plugin_config, &["logs", "enabled"], json!(true));
            let mode = match mode {
                LogMode::Errors => "errors",
                LogMode::Sampled => "sampled",
                _ => "all",
            };
            set(&mut plugin_config, &["logs", "mode"], json!(mode));
        }
        None => {}
    }
    if let Some(r) = args.sampling.or(file.sampling) {
        parse_ratio(&r.to_string()).map_err(|e| format!("--sampling: {e}"))?;
        set(&mut plugin_config, &["traces", "sampling_ratio"], json!(r));
    }
    if let Some(t) = flag(args.traces, args.no_traces).or(file.traces) {
        set(&mut plugin_config, &["traces", "enabled"], json!(t));
    }
    let metrics = flag(args.metrics, args.no_metrics).or(file.metrics);
    match (metrics, &mode) {
        (Some(m), _) => set(&mut plugin_config, &["metrics", "enabled"], json!(m)),
        // A gateway typically traces only; its metrics come from Istio's own stats.
        (None, Mode::Gateway { .. }) if plugin_config.pointer("/metrics/enabled").is_none() => {
            set(&mut plugin_config, &["metrics", "enabled"], json!(false))
        }
        _ => {}
    }
    let bytes = serde_json::to_vec(&plugin_config).map_err(|e| e.to_string())?;
    meshtel_filter::config::parse(&bytes).map_err(|e| format!("pluginConfig: {e}"))?;
    if let Some((field, reason)) = crate::cel::problems(&plugin_config).into_iter().next() {
        return Err(format!("pluginConfig: {field}: {reason}"));
    }

    let wasm_url = args.wasm_url.clone().or(file.wasm_url.clone());
    let image = args.image.clone().or(file.image.clone());
    let url = match (image, wasm_url.clone()) {
        (Some(_), Some(_)) => return Err("--image and --wasm-url are alternatives: give one".into()),
        (Some(i), None) => {
            if !i.starts_with("oci://") && i.contains("://") {
                return Err(format!("--image: expected oci://REGISTRY/REPO:TAG, got {i:?}"));
            }
            i
        }
        (None, Some(u)) => {
            if !(u.starts_with("http://") || u.starts_with("https://") || u.starts_with("file://")) {
                return Err(format!("--wasm-url: expected an http://, https:// or file:// URL, got {u:?}"));
            }
            u
        }
        (None, None) => DEFAULT_IMAGE.into(),
    };
    let wasm_file = args.wasm_file.clone().or(file.wasm_file.clone());
    let sha256 = match (args.sha256.clone().or(file.sha256.clone()), wasm_file) {
        (Some(_), Some(_)) => return Err("--sha256 and --wasm-file are alternatives: give one".into()),
        (Some(s), None) => {
            if !crate::rules::is_sha256(&s) {
                return Err(format!("--sha256: expected 64 lower-case hex characters, got {s:?}"));
            }
            Some(s)
        }
        (None, Some(path)) => {
            if wasm_url.is_none() {
                return Err("--wasm-file pins a module served at --wasm-url; for an oci:// image pin the digest `meshtel package` printed with --sha256".into());
            }
            Some(sha256_file(&path)?)
        }
        (None, None) => None,
    };
    let image_pull_secret = args.image_pull_secret.clone().or(file.image_pull_secret.clone());
    if let Some(secret) = &image_pull_secret {
        if !url.starts_with("oci://") {
            return Err("--image-pull-secret is for an oci:// image (--image), not --wasm-url".into());
        }
        if !crate::rules::is_dns_subdomain(secret) {
            return Err(format!("--image-pull-secret: {secret:?} is not a valid Secret name"));
        }
    }
    let header_env =
        if args.header_env.is_empty() { file.collector_header_from_env.clone() } else { args.header_env.clone() };
    let mut host_env = Vec::new();
    for pair in &header_env {
        let (header, var) = pair
            .split_once('=')
            .ok_or_else(|| format!("--collector-header-from-env: expected HEADER=VAR, got {pair:?}"))?;
        set(&mut plugin_config, &["collector", "headers_from_env", header], json!(var));
        if !host_env.contains(&var.to_string()) {
            host_env.push(var.to_string());
        }
    }
    if !header_env.is_empty() {
        let bytes = serde_json::to_vec(&plugin_config).map_err(|e| e.to_string())?;
        meshtel_filter::config::parse(&bytes).map_err(|e| format!("--collector-header-from-env: {e}"))?;
    }
    let collector_service_entry = if args.collector_service_entry || file.collector_service_entry.unwrap_or(false) {
        Some(collector.clone().ok_or("--collector-service-entry needs --collector HOST:PORT")?)
    } else {
        None
    };
    // On wherever metrics are: Istio counts TCP connections by default, and the network filter
    // costs HTTP chains nothing measurable (BENCHMARKS.md, "TCP network filter on an HTTP chain").
    let metrics_on = plugin_config.pointer("/metrics/enabled") != Some(&json!(false));
    let asked = if args.no_tcp {
        Some(false)
    } else if args.tcp {
        Some(true)
    } else {
        file.tcp
    };
    if asked == Some(true) && !metrics_on {
        return Err("--tcp records Istio's TCP metrics: it needs metrics on (drop --no-metrics, or add --metrics with --gateway)".into());
    }
    let tcp = asked.unwrap_or(metrics_on);
    let name = args.name.clone().or(file.name.clone()).unwrap_or_else(|| "meshtel".into());
    if !crate::rules::is_dns_subdomain(&name) {
        return Err(format!("--name: {name:?} is not a valid resource name"));
    }
    let extra = match &carried {
        Some(c) if args.disable_istio_telemetry => c.disabling_istio(&root_namespace, &crate::render::labels()),
        _ => Vec::new(),
    };
    Ok(RenderOptions {
        mode,
        name,
        root_namespace,
        url,
        sha256,
        image_pull_secret,
        plugin_config,
        fail_strategy: args.fail_strategy.or(file.fail_strategy).unwrap_or(FailStrategy::FailOpen).as_str().into(),
        phase: args.phase.or(file.phase).unwrap_or(Phase::Stats).as_str().into(),
        priority: args.priority.or(file.priority).map(i64::from),
        api: args.api.or(file.api).unwrap_or(Api::Wasmplugin),
        disable_istio_tracing: args.disable_istio_tracing || file.disable_istio_tracing.unwrap_or(false),
        collector_service_entry,
        host_env,
        tcp,
        notes: carried.as_ref().map(|c| c.notes.clone()).unwrap_or_default(),
        extra,
    })
}

/// Read the Telemetry resources of `--from-istio-telemetry` (`-`: stdin).
fn carry_over(path: &Path, crds: Option<&Path>, root_namespace: &str) -> Result<CarriedOver, String> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).map_err(|e| format!("--from-istio-telemetry: stdin: {e}"))?
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| format!("--from-istio-telemetry: cannot read {}: {e}", path.display()))?
    };
    let schemas = crds.map(crate::schema::CrdSchemas::load).transpose()?;
    crate::istio_telemetry::read(&text, root_namespace, schemas.as_ref())
        .map_err(|e| format!("--from-istio-telemetry: {e}"))
}

/// The waypoint modes: Istio attaches a WasmPlugin to a waypoint only through `targetRefs`
/// (istio/istio `pilot/pkg/model/policyattachment.go`); a selector never reaches one.
fn waypoint_mode(args: &RenderArgs, namespaces: &[String], other: bool, count: usize) -> Result<Mode, String> {
    if count > 1 || other {
        return Err("--waypoint, --service and --all-waypoints exclude each other and the other modes".into());
    }
    if args.all_waypoints {
        if !namespaces.is_empty() {
            return Err("--all-waypoints attaches from the root namespace (--root-namespace), not --namespace".into());
        }
        return Ok(Mode::AllWaypoints);
    }
    let (flag, name) = match (&args.waypoint, &args.service) {
        (Some(n), _) => ("--waypoint", n.clone()),
        (_, Some(n)) => ("--service", n.clone()),
        _ => return Err("no waypoint mode".into()),
    };
    if !crate::rules::is_dns_subdomain(&name) || name.len() > 253 {
        return Err(format!("{flag}: {name:?} is not a valid resource name"));
    }
    let [namespace] = namespaces else {
        return Err(format!("{flag} needs exactly one --namespace (the {} namespace)", &flag[2..]));
    };
    Ok(if args.waypoint.is_some() {
        Mode::Waypoint { name, namespace: namespace.clone() }
    } else {
        Mode::Service { name, namespace: namespace.clone() }
    })
}

fn gateway_name_without_gateway(args: &RenderArgs, mode: &Mode) -> bool {
    (args.gateway_name.is_some() || args.gateway_namespace.is_some()) && !matches!(mode, Mode::Gateway { .. })
}
